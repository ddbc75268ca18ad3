"""Two commits side by side: batchrun's zero-latency throughput, alternating runs.

    python tests/bench/ab.py REV [--scenario zero|latency|embeddings] [--rounds 6] [--rows N]

Checks REV out into a temporary worktree and runs the same job (the scenario's rows:
`zero`, 20,000 at concurrency 256; `latency`, 16,000 at 400 with 200 +- 50 ms answers;
`embeddings`, 20,000 documents 64 a request at 16 in flight, vectors of 1,024 floats)
with it and with this checkout, one after the other, `rounds` times, each against a
fresh bench server. Prints every run and the median ratios of the rates, over the wall
time and over the server's span (first request to last answer): the machine is shared
and noisy, so only runs this close together compare. Both trees' bytecode is compiled
first, as an installed package has it: with PYTHONDONTWRITEBYTECODE set, a tree without
it compiles every module at each start (0.1-0.15 s a run).
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import run as bench
from stages import SCENARIOS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with this checkout")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "embeddings"], default="zero")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int)
    args = parser.parse_args()
    rows, concurrency, server_opts = SCENARIOS.get(args.scenario) or EMBEDDINGS
    rows = args.rows or rows
    work = Path(tempfile.mkdtemp(prefix="batchrun-ab-"))
    old = work / "old"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.rev], cwd=bench.REPO, check=True)
    try:
        for tree in (old, bench.REPO):
            compileall.compile_dir(tree / "batchrun", quiet=1)
        embeddings = args.scenario == "embeddings"
        data = (bench.make_docs if embeddings else bench.make_input)(work / "in.jsonl", rows)
        extra = bench.EMBED if embeddings else {"endpoint": "completions", "params": {"max_tokens": 16}}
        times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for n in range(args.rounds):
            for name, tree in (("old", old), ("new", bench.REPO)):
                times[name].append(run_once(work / f"{name}{n}", tree, data, concurrency, server_opts, extra))
                wall, span = times[name][-1]
                print(f"{name} ({args.rev if name == 'old' else 'this checkout'}) round {n}: "
                      f"{rows / wall:,.0f} req/s, {rows / span:,.0f} over the span", flush=True)
        for label, at in (("wall", 0), ("span", 1)):
            ratios = [old[at] / new[at] for new, old in zip(times["new"], times["old"])]
            print(f"median new/old ({label}): {sorted(ratios)[len(ratios) // 2]:.3f} (rounds: "
                  f"{', '.join(f'{r:.3f}' for r in ratios)})")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=bench.REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)


EMBEDDINGS = (20_000, 16, {"embed_dims": 1024})  # as run.py --scenario embeddings, its first dimension


def run_once(job: Path, tree: Path, data: Path, concurrency: int, server_opts: dict,
             extra: dict) -> tuple[float, float]:
    """(wall seconds, the server's span) of one run of `tree`'s batchrun; `extra`: its
    endpoint and params."""
    job.mkdir()
    with bench.Server(job, "server", **server_opts) as server:
        spec = {"input": str(data), "output": str(job / "out.parquet"), "model": "bench", **extra,
                "concurrency": concurrency, "api": {"base_url": server.base_url, "api_key_env": bench.KEY_ENV}}
        (job / "job.yaml").write_text(json.dumps(spec))
        env = bench.child_env()
        env["PYTHONPATH"] = str(tree)  # this tree's batchrun, whatever the venv installed
        started = time.perf_counter()
        result = subprocess.run([bench.PY, "-m", "batchrun", "run", str(job / "job.yaml"), "--no-progress"],
                                env=env, cwd=tree, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{tree}: exit {result.returncode}: {result.stderr[-500:]}")
    return wall, server.stats["span_s"]


if __name__ == "__main__":
    main()
