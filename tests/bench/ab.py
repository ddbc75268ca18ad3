"""Two commits side by side: batchrun's zero-latency throughput, alternating runs.

    python tests/bench/ab.py REV [--rounds 6] [--rows 20000]

Checks REV out into a temporary worktree and runs the same job (the `zero` scenario's
rows, concurrency 256) with it and with this checkout, one after the other, `rounds`
times, each against a fresh bench server. Prints every run and the median ratio: the
machine is shared and noisy, so only runs this close together compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import run as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with this checkout")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchrun-ab-"))
    old = work / "old"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.rev], cwd=bench.REPO, check=True)
    try:
        data = bench.make_input(work / "in.jsonl", args.rows)
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for n in range(args.rounds):
            for name, tree in (("old", old), ("new", bench.REPO)):
                rates[name].append(args.rows / run_once(work / f"{name}{n}", tree, data))
                print(f"{name} ({args.rev if name == 'old' else 'this checkout'}) round {n}: "
                      f"{rates[name][-1]:,.0f} req/s", flush=True)
        ratios = [new / old for new, old in zip(rates["new"], rates["old"])]
        print(f"median new/old: {sorted(ratios)[len(ratios) // 2]:.3f} (rounds: "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=bench.REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)


def run_once(job: Path, tree: Path, data: Path) -> float:
    job.mkdir()
    with bench.Server(job, "server") as server:
        spec = {"input": str(data), "output": str(job / "out.parquet"), "model": "bench", "endpoint": "completions",
                "params": {"max_tokens": 16}, "concurrency": 256,
                "api": {"base_url": server.base_url, "api_key_env": bench.KEY_ENV}}
        (job / "job.yaml").write_text(json.dumps(spec))
        env = bench.child_env()
        env["PYTHONPATH"] = str(tree)  # this tree's batchrun, whatever the venv installed
        started = time.perf_counter()
        result = subprocess.run([bench.PY, "-m", "batchrun", "run", str(job / "job.yaml"), "--no-progress"],
                                env=env, cwd=tree, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{tree}: exit {result.returncode}: {result.stderr[-500:]}")
    return wall


if __name__ == "__main__":
    main()
