"""Benchmark: rows through the batch path on the fakes against the same rows live.

    python tests/bench/batch.py [--rows 100000] [--rows-per-batch 50000] [--submit-rows 10000]
                                [--live-server bench|fake] [--keep]

The same N chat rows run twice through `batchrun run`, each in its own process:
  batch  `batch_api` (kind openai) against tests/fakebatch.py's FakeBatchAPI, which ends a
         batch on its second poll (poll_interval_s 0.01: the waiting is negligible);
         rows_per_batch 50,000, so 100,000 rows are 2 batches
  live   zero latency, concurrency 256 (as run.py's `zero`), against tests/bench/server.py
         (`--live-server fake`: tests/fakeserver.py's FakeServer, slower)
then `batchrun submit jobs/submit.yaml` on `--submit-rows` rows, as a user runs it.

The fakes run in a process of their own, so a client's CPU (os.wait4: user + sys of all
its threads) is batchrun's alone. The batch run's stages (sending = building lines +
upload; collecting = download + parse + saving; the Parquet output) are timed by
tests/bench/batchclient.py's wrappers, in the benchmark only. Each run is checked
before it is reported: every row ok in the output, in input order, answered by the
path measured, no custom id in two batches; a broken run makes the exit code 1.
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (KEY_ENV, PY, REPO, Run, Server, child_env, compile_checkout, git_describe, run_client,  # noqa: E402,I001
                 source_fingerprint, table)

CONCURRENCY = 256  # run.py's zero-latency scenario
ROWS_PER_BATCH = 50_000
POLL_INTERVAL_S = 0.01


def make_chat_input(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            messages = [{"role": "user", "content": f"Write one short sentence about item number {i}."}]
            f.write(json.dumps({"id": f"r{i}", "messages": messages}) + "\n")
    return path


class Fakes:
    """tests/bench/batchfakes.py in its own process; `stats` is filled in on exit."""

    def __init__(self, workdir: Path, label: str, *, polls_to_finish: int = 2, live: bool = True) -> None:
        self.stats_path = workdir / f"fakes-{label}.json"
        self.cmd = [PY, str(HERE / "batchfakes.py"), "--stats", str(self.stats_path),
                    "--polls-to-finish", str(polls_to_finish)] + (["--live"] if live else [])
        self.proc: subprocess.Popen[str] | None = None
        self.batch_url = self.live_url = ""
        self.stats: dict = {}

    def __enter__(self) -> Fakes:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=child_env())
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"the fakes did not start: {line!r}")
        _, self.batch_url, self.live_url = line.split()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stats = json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}


@dataclass
class Measured:
    """A run, its stages (batchclient.py's) and what was wrong with it."""

    run: Run
    stages: dict = field(default_factory=dict)
    server_cpu_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def write_job(jobdir: Path, input_path: Path, live_url: str, batch_url: str | None,
              rows_per_batch: int = ROWS_PER_BATCH) -> Path:
    jobdir.mkdir(parents=True)
    spec = {
        "input": str(input_path),
        "output": str(jobdir / "out.parquet"),
        "model": "bench",
        "endpoint": "chat",
        "params": {"max_tokens": 16},
        "concurrency": CONCURRENCY,
        "api": {"base_url": live_url, "api_key_env": KEY_ENV},
    }
    if batch_url is not None:
        spec["batch_api"] = {"kind": "openai", "base_url": batch_url, "poll_interval_s": POLL_INTERVAL_S,
                             "rows_per_batch": rows_per_batch}
    job = jobdir / "job.yaml"
    job.write_text(json.dumps(spec, indent=2))  # JSON is valid YAML, and a valid spec
    return job


def timed_run(label: str, workdir: Path, job: Path, rows: int, server: Fakes | Server) -> Measured:
    stages_path = workdir / f"stages-{label}.json"
    cmd = [PY, str(HERE / "batchclient.py"), str(stages_path), "run", str(job), "--no-progress"]
    run = run_client(label, rows, cmd, workdir, server)  # type: ignore[arg-type]
    run.output = job.with_name("out.parquet")
    stages = json.loads(stages_path.read_text()) if stages_path.exists() else {}
    return Measured(run, stages)


def batch_path(workdir: Path, data: Path, rows: int, rows_per_batch: int) -> Measured:
    with Fakes(workdir, "batch") as fakes:
        job = write_job(workdir / "batch", data, fakes.live_url, fakes.batch_url, rows_per_batch)
        measured = timed_run("batch", workdir, job, rows, fakes)
    measured.server_cpu_s = fakes.stats.get("cpu_s", 0.0)
    measured.problems = output_problems(measured.run, rows, "batch") + batch_problems(fakes.stats, rows,
                                                                                         rows_per_batch)
    return measured


def live_path(workdir: Path, data: Path, rows: int, server_kind: str) -> Measured:
    if server_kind == "fake":
        with Fakes(workdir, "live") as fakes:
            job = write_job(workdir / "live", data, fakes.live_url, None)
            measured = timed_run("live", workdir, job, rows, fakes)
        measured.server_cpu_s = fakes.stats.get("cpu_s", 0.0)
        served = fakes.stats.get("live_requests", 0)
    else:
        with Server(workdir, "live") as server:
            job = write_job(workdir / "live", data, server.base_url, None)
            measured = timed_run("live", workdir, job, rows, server)
        measured.server_cpu_s = server.stats.get("cpu_s", 0.0)
        served = server.stats.get("requests", 0)
    measured.problems = output_problems(measured.run, rows, "live")
    if served != rows:
        measured.problems.append(f"the live server saw {served:,} requests, not {rows:,}")
    return measured


def submit(workdir: Path, rows: int) -> Measured:
    """`batchrun submit jobs/submit.yaml` from the job's folder, as a user types it."""
    data = make_chat_input(workdir / f"submit-{rows}.jsonl", rows)
    command = Path(PY).with_name("batchrun")
    with Fakes(workdir, "submit", polls_to_finish=0) as fakes:
        job = write_job(workdir / "jobs", data, fakes.live_url, fakes.batch_url)
        job = job.rename(job.with_name("submit.yaml"))
        cmd = [str(command)] if command.exists() else [PY, "-m", "batchrun"]
        run = run_client("submit", rows, cmd + ["submit", "jobs/submit.yaml"], workdir, fakes)  # type: ignore[arg-type]
    measured = Measured(run, server_cpu_s=fakes.stats.get("cpu_s", 0.0))
    if run.rc != 0:
        measured.problems.append(f"exit {run.rc}: {run.last_log_line()}")
    measured.problems += batch_problems(fakes.stats, rows, states=("validating",))
    return measured


def output_problems(run: Run, rows: int, backend: str) -> list[str]:
    """Why the run cannot be counted: an exit code, a row missing, failed or answered by
    the other path; empty when it did all it should."""
    problems = [] if run.rc == 0 else [f"exit {run.rc}: {run.last_log_line()}"]
    if run.output is None or not run.output.exists():
        return problems + ["no output file"]
    names = pq.read_schema(run.output).names
    out = pq.read_table(run.output, columns=[c for c in ("row_index", "status", "backend") if c in names])
    if out.num_rows != rows:
        problems.append(f"{out.num_rows:,} rows in the output, not {rows:,}")
    if out.column("row_index").to_pylist() != list(range(out.num_rows)):
        problems.append("the output is not in input order")
    failed = out.num_rows - out.column("status").to_pylist().count("ok")
    if failed:
        problems.append(f"{failed:,} rows not ok")
    if backend == "batch" and "backend" not in names:
        problems.append("no backend column")
    elif "backend" in names and (other := out.num_rows - out.column("backend").to_pylist().count(backend)):
        problems.append(f"{other:,} rows not answered by the {backend} path")
    return problems


def batch_problems(stats: dict, rows: int, rows_per_batch: int = ROWS_PER_BATCH,
                   states: tuple[str, ...] = ("completed",)) -> list[str]:
    """What the batch fake received, against what it should have: every row once."""
    problems = []
    if stats.get("custom_ids") != rows:
        problems.append(f"the batch fake received {stats.get('custom_ids')} custom ids, not {rows:,}")
    if stats.get("custom_ids_in_two_batches"):
        problems.append(f"{stats['custom_ids_in_two_batches']} custom ids in two batches")
    if stats.get("live_requests"):
        problems.append(f"{stats['live_requests']} rows went live")
    wanted = -(-rows // rows_per_batch)
    if stats.get("batches") != wanted or set(stats.get("states", [])) - set(states):
        problems.append(f"batches: {stats.get('batches')} ({stats.get('states')}), not {wanted} {'/'.join(states)}")
    return problems


# --- reporting ----------------------------------------------------------------------

# The batch run's stages as batchclient.py names them, nested as they run; "(rest)" is a
# stage less the ones named inside it
STAGE_TREE = (
    ("start-up (Python and imports)", ()),
    ("open the state (validate the input)", ()),
    ("send", ("read the input: send", "upload (HTTP)", "create (HTTP)")),
    ("poll (HTTP)", ()),
    ("wait between polls", ()),
    ("collect", ("download (HTTP)", "download + parse", "read the input: collect", "save to the state")),
    ("live engine", ("engine: open the state", "read the input: live engine", "write the Parquet output")),
)
REST = {"send": "build the lines (rest)", "collect": "settle the rows (rest)", "live engine": "the rest"}  # a stage less what is inside


def stage_rows(stages: dict, rows: int) -> list[list[object]]:
    """Each stage's wall s, CPU s, CPU ms per 1,000 rows and calls; nested ones indented,
    then what no stage holds ("other") and the total."""

    def line(name: str, wall: float, cpu: float, calls: object, indent: int = 0) -> list[object]:
        return ["  " * indent + ("└ " if indent else "") + name, wall, cpu, cpu / rows * 1e6, calls]

    def time_of(name: str) -> tuple[float, float]:
        stage = stages.get(name, {})
        return stage.get("wall_s", 0.0), stage.get("cpu_s", 0.0)

    out: list[list[object]] = []
    top_wall = top_cpu = 0.0
    for name, inner in STAGE_TREE:
        if name not in stages:
            continue
        wall, cpu = time_of(name)
        top_wall, top_cpu = top_wall + wall, top_cpu + cpu
        out.append(line(name, wall, cpu, stages[name]["calls"]))
        inner_wall = inner_cpu = 0.0
        for sub in inner:
            if sub not in stages:
                continue
            (sub_wall, sub_cpu), calls = time_of(sub), stages[sub]["calls"]
            if sub == "download + parse":  # shown as its parse: the download is a line of its own
                got_wall, got_cpu = time_of("download (HTTP)")
                sub, sub_wall, sub_cpu = "parse the lines", sub_wall - got_wall, sub_cpu - got_cpu
            inner_wall, inner_cpu = inner_wall + sub_wall, inner_cpu + sub_cpu
            out.append(line(sub, sub_wall, sub_cpu, calls, 1))
        if name in REST:
            out.append(line(REST[name], wall - inner_wall, cpu - inner_cpu, "", 1))
    if "total" in stages:
        wall, cpu = time_of("total")
        out.append(line("other (spec, status, closing)", wall - top_wall, cpu - top_cpu, ""))
        out.append(line("total (in process)", wall, cpu, ""))
    return out


def summary_row(label: str, m: Measured, rows: int) -> list[object]:
    r = m.run
    return [label, rows, r.rc, r.wall_s, r.rps, r.cpu_s, r.cpu_s / rows * 1000, r.maxrss_mb, m.server_cpu_s,
            "ok" if not m.problems else "BROKEN: " + "; ".join(m.problems)]


def as_json(m: Measured, rows: int) -> dict:
    r = m.run
    return {"rows": rows, "exit": r.rc, "wall_s": round(r.wall_s, 3), "rows_per_s": round(r.rps, 1),
            "cpu_s": round(r.cpu_s, 3), "cpu_s_per_1k_rows": round(r.cpu_s / rows * 1000, 4),
            "peak_rss_mb": round(r.maxrss_mb, 1), "server_cpu_s": round(m.server_cpu_s, 3),
            "stages": {k: {"wall_s": round(v["wall_s"], 3), "cpu_s": round(v["cpu_s"], 3)} for k, v in m.stages.items()},
            "problems": m.problems}


def report(rows: int, batch: Measured, live: Measured, submitted: Measured | None, live_server: str,
           rows_per_batch: int) -> dict:
    headers = ["path", "rows", "exit", "wall s", "rows/s (wall)", "batchrun CPU s", "CPU s / 1k rows",
               "peak RSS MB", "fakes' CPU s", "check"]
    lines = [summary_row("batch (FakeBatchAPI)", batch, rows), summary_row(f"live, zero latency ({live_server})",
                                                                          live, rows)]
    if submitted is not None:
        lines.append(summary_row("`batchrun submit` alone", submitted, submitted.run.rows))
    count = -(-rows // rows_per_batch)
    print(f"\n### batch path vs live: {rows:,} chat rows, {count} batch{'es' if count != 1 else ''}\n\n"
          f"{table(headers, lines)}\n")
    stage_headers = ["stage", "wall s", "CPU s", "CPU ms / 1k rows", "calls (rows, reading the input)"]
    print(f"batch path, by stage (batchclient.py):\n\n{table(stage_headers, stage_rows(batch.stages, rows))}\n")
    print(f"live path, by stage (the workers run beside the output's writing and the state's saving, so "
          f"their CPU is at most what is shown):\n\n{table(stage_headers, stage_rows(live.stages, rows))}\n")
    ratio = batch.run.cpu_s / live.run.cpu_s if live.run.cpu_s and not batch.problems + live.problems else None
    print(f"batchrun CPU, batch path / live path: {f'{ratio:.2f}' if ratio else 'n/a (a run is broken)'}")
    runs = [batch.run, live.run] + ([submitted.run] if submitted is not None else [])
    print("commands:\n" + "\n".join(f"  {r.label}: {shlex.join(r.cmd)}\n    fakes/server: {shlex.join(r.server_cmd)}"
                                    for r in runs))
    result = {"bench": "batch", "rows": rows, "rows_per_batch": rows_per_batch, "live_server": live_server, "batch": as_json(batch, rows),
              "live": as_json(live, rows), "cpu_ratio_batch_over_live": round(ratio, 3) if ratio else None}
    if submitted is not None:
        result["submit"] = as_json(submitted, submitted.run.rows)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in each run (default 100,000)")
    parser.add_argument("--rows-per-batch", type=int, default=ROWS_PER_BATCH,
                        help="batch_api.rows_per_batch of the batch run (default 50,000)")
    parser.add_argument("--submit-rows", type=int, default=10_000, help="rows for `batchrun submit`; 0: skip it")
    parser.add_argument("--live-server", choices=("bench", "fake"), default="bench",
                        help="the live run's server: tests/bench/server.py (default) or tests/fakeserver.py")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (inputs, outputs, logs)")
    args = parser.parse_args()

    print(f"command: {shlex.join([os.path.relpath(PY, REPO) if PY.startswith(str(REPO)) else PY] + sys.argv)}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    compile_checkout()
    before = source_fingerprint()
    print(f"batchrun: {git_describe()}; source fingerprint {before}")
    workdir = Path(tempfile.mkdtemp(prefix="batchrun-bench-batch-"))
    try:
        data = make_chat_input(workdir / "input.jsonl", args.rows)
        batch = batch_path(workdir, data, args.rows, args.rows_per_batch)
        live = live_path(workdir, data, args.rows, args.live_server)
        submitted = submit(workdir, args.submit_rows) if args.submit_rows else None
        result = report(args.rows, batch, live, submitted, args.live_server, args.rows_per_batch)
        if source_fingerprint() != before:
            print("\nWARNING: batchrun's source changed during the benchmark: rerun it")
        print("\n" + json.dumps(result))
    finally:
        if args.keep:
            print(f"\nkept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    broken = [m for m in (batch, live, submitted) if m is not None and m.problems]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
