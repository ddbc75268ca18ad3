"""Benchmark harness: batchrun against the fake server, side by side with a baseline.

    python tests/bench/run.py [--scenario NAME ...] [--rows N] [--keep]

Scenarios (default: zero latency memory; the minute-long ones only when named):
  zero       20,000 rows, concurrency 256, zero latency: batchrun vs the bare aiohttp loop, a
             bare loop over batchrun's wire transport, and the AsyncOpenAI baseline
  latency    16,000 rows, concurrency 400, 200 +- 50 ms: % of the Little's-law bound, beside
             the two bare loops and the baseline
  ratelimit  3,000 rows, spec rate_limit 1200 rpm, unlimited server: what the server sees
  adapt      3,000 rows, server limited to 1200 rpm, no rate_limit in the spec: 429s
  adapt-blind  the same, the server sending no x-ratelimit-* headers (429s teach the limit)
  memory     peak RSS of batchrun at 20,000 vs 200,000 rows
  embeddings 20,000 rows, 64 a request, concurrency 16, dimensions 1,024 and 1,536:
             batchrun vs the openai SDK's embeddings.create with the same batch size
  template   20,000 chat rows at zero latency: rendered by a template from Parquet columns
             vs the same messages pre-rendered in JSONL
  validate   1,000,000 templated Parquet rows: validation alone (in process), and
             `batchrun run --limit 1` from start to exit
  embed-memory  peak RSS of batchrun embedding 20,000 vs 200,000 rows of dimension 1,024
  ray        2,700 rows, server admitting 50/s, spec limit 45/s: 4 Ray workers sharing the
             limit (a local cluster; pip install 'batchrun[ray]') vs 4 independent shards
  bomb       peak RSS of batchrun at concurrency 400, every answer but one in 20 a gzip bomb
             (1 GB of zeros), then an endless stream: about 5 minutes

Every client runs in its own subprocess against a fresh server process, so its CPU and
peak RSS are its own (os.wait4). The machine is shared and noisy: compare the ratios of
one run, not absolute numbers across runs. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable
KEY_ENV = "BENCH_API_KEY"
CLIENT_TIMEOUT_S = 20 * 60  # a hung client is killed, and its row says so

SCENARIOS = ("zero", "latency", "ratelimit", "adapt", "adapt-blind", "inflight", "memory", "embeddings", "template",
             "validate", "embed-memory", "ray", "ray-inflight", "bomb")
DEFAULT_SCENARIOS = ("zero", "latency", "memory")


def child_env() -> dict[str, str]:
    """The clients' environment: a dummy key, and no proxy (httpx honours *_PROXY
    variables, which would send the benchmark's traffic off this machine)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env[KEY_ENV] = "bench-dummy-key"
    env.pop("OPENAI_API_BASE", None)
    return env


def make_input(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"Write one short sentence about item number {i}."}) + "\n")
    return path


# --- the fake server -------------------------------------------------------------


class Server:
    """tests/bench/server.py in its own process; `stats` is filled in by stop()."""

    def __init__(self, workdir: Path, label: str, *, latency_ms: float = 0, jitter_ms: float = 0,
                 rpm_limit: int = 0, silent: bool = False, embed_dims: int = 256, max_in_flight: int = 0) -> None:
        self.stats_path = workdir / f"server-{label.replace(' ', '_')}.json"
        self.cmd = [PY, str(HERE / "server.py"), "--port", "0", "--latency-ms", f"{latency_ms:g}",
                    "--jitter-ms", f"{jitter_ms:g}", "--stats", str(self.stats_path), "--embed-dims", str(embed_dims)]
        if rpm_limit:
            self.cmd += ["--rpm-limit", str(rpm_limit)]
        if silent:
            self.cmd.append("--no-ratelimit-headers")
        if max_in_flight:
            self.cmd += ["--max-in-flight", str(max_in_flight)]
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.stats: dict = {}

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=child_env())
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # it writes its stats, then exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stats = json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}


# --- one client run ---------------------------------------------------------------


@dataclass
class Run:
    label: str
    rows: int
    cmd: list[str]
    server_cmd: list[str] = field(default_factory=list)
    rc: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_mb: float = 0.0
    server: dict = field(default_factory=dict)
    log: str = ""
    output: Path | None = None
    started: float = 0.0  # monotonic, as the server's first_at and last_at (one clock per machine)
    ended: float = 0.0

    @property
    def lead_s(self) -> float:
        """From the client's start to the server's first request: start-up, input, validation."""
        first = self.server.get("first_at")
        return first - self.started if first else 0.0

    @property
    def tail_s(self) -> float:
        """From the server's last answer to the client's exit: the output's last writes."""
        last = self.server.get("last_at")
        return self.ended - last if last else 0.0

    @property
    def rps(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0

    @property
    def span_rps(self) -> float:
        """Rows per second between the server's first request and last answer: the
        client's Python start-up, input reading and output writing left out."""
        span = self.server.get("span_s") or 0.0
        return self.rows / span if span else 0.0

    @property
    def requests(self) -> int:
        return self.server.get("requests", self.rows)

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.requests * 1000 if self.requests else 0.0

    @property
    def server_cpu_pct(self) -> float:
        """The server's CPU over its busy span: near 100 % means the server, not the
        client, was the bottleneck."""
        span = self.server.get("span_s") or 0.0
        return 100 * self.server.get("cpu_s", 0.0) / span if span else 0.0

    def last_log_line(self) -> str:
        lines = [line for line in self.log.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_client(label: str, rows: int, cmd: list[str], workdir: Path, server: Server) -> Run:
    """Run `cmd` to completion against `server`, measuring it alone: os.wait4 returns
    this child's own rusage (user+sys of all its threads, and its peak RSS), which
    getrusage(RUSAGE_CHILDREN) deltas would mix with any other child reaped meanwhile."""
    run = Run(label, rows, cmd, server_cmd=server.cmd)
    log_path = workdir / f"{label.replace(' ', '_')}.log"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        run.started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir)
        watchdog = threading.Timer(CLIENT_TIMEOUT_S, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            run.ended = time.monotonic()
        finally:
            watchdog.cancel()
        run.wall_s = time.perf_counter() - started
    proc.returncode = run.rc = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.maxrss_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    run.log = log_path.read_text(errors="replace")
    return run


def batchrun(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *,
             server: Server, extra: dict | None = None, args: tuple[str, ...] = ()) -> Run:
    """The real CLI on a fresh job (its own folder: nothing to resume), checkpointing and
    writing Parquet as in production."""
    job = job_spec(label, workdir, input_path, concurrency, server, extra)
    run = run_client(label, rows, [PY, "-m", "batchrun", "run", str(job), "--no-progress", *args], workdir, server)
    run.output = job.with_name("out.parquet")
    return run


SHARDS = """\
import subprocess, sys
count, job = int(sys.argv[1]), sys.argv[2]
procs = [subprocess.Popen([sys.executable, "-m", "batchrun", "run", job, "--shard", f"{i}/{count}", "--no-progress"])
         for i in range(count)]
sys.exit(max(proc.wait() for proc in procs))
"""


def batchrun_shards(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *,
                    server: Server, extra: dict | None = None, count: int = 4) -> Run:
    """`count` independent `batchrun run JOB --shard I/N` processes on the same spec, each
    with its rate limit (the last to finish merges): exit code the worst of theirs."""
    job = job_spec(label, workdir, input_path, concurrency, server, extra)
    run = run_client(label, rows, [PY, "-c", SHARDS, str(count), str(job)], workdir, server)
    run.output = job.with_name("out.parquet")
    return run


def job_spec(label: str, workdir: Path, input_path: Path, concurrency: int, server: Server,
             extra: dict | None) -> Path:
    jobdir = workdir / label.replace(" ", "_")
    jobdir.mkdir()
    spec = {
        "input": str(input_path),
        "output": str(jobdir / "out.parquet"),
        "model": "bench",
        "endpoint": "completions",
        "params": {"max_tokens": 16},
        "concurrency": concurrency,
        "api": {"base_url": server.base_url, "api_key_env": KEY_ENV},
        **(extra or {}),
    }
    job = jobdir / "job.yaml"
    job.write_text(json.dumps(spec, indent=2))  # JSON is valid YAML, and a valid spec
    return job


def baseline(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *, server: Server) -> Run:
    cmd = [PY, str(HERE / "baseline_openai.py"), str(input_path), server.base_url, str(concurrency)]
    return run_client(label, rows, cmd, workdir, server)


def floor(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *, server: Server) -> Run:
    cmd = [PY, str(HERE / "bare_aiohttp.py"), str(input_path), server.base_url, str(concurrency)]
    return run_client(label, rows, cmd, workdir, server)


def wire_floor(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *, server: Server) -> Run:
    cmd = [PY, str(HERE / "bare_wire.py"), str(input_path), server.base_url, str(concurrency)]
    return run_client(label, rows, cmd, workdir, server)


def measured(workdir: Path, client, label: str, input_path: Path, rows: int, concurrency: int,
             server_opts: dict | None = None, **kw) -> Run:
    """One client against its own fresh server; the server's stats end up in the Run."""
    with Server(workdir, label, **(server_opts or {})) as server:
        run = client(label, workdir, input_path, rows, concurrency, server=server, **kw)
    run.server = server.stats
    return run


# --- reporting ----------------------------------------------------------------------


def table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def commands(runs: list[Run]) -> str:
    out = []
    for run in runs:
        out.append(f"  {run.label}: {shlex.join(run.cmd)}")
        out.append(f"    server: {shlex.join(run.server_cmd)}")
    return "commands:\n" + "\n".join(out)


def failure_note(run: Run) -> str:
    return "" if run.rc == 0 else f"\n{run.label} exited {run.rc}: {run.last_log_line()}"


def report(title: str, body: str, runs: list[Run]) -> None:
    print(f"\n### {title}\n\n{body}\n" + "".join(failure_note(r) for r in runs) + "\n")
    print(commands(runs), flush=True)


THROUGHPUT_HEADERS = ["client", "rows", "exit", "wall s", "req/s (wall)", "req/s (server span)",
                      "CPU s / 1k req", "peak RSS MB", "server CPU %", "s to first request", "s after last answer"]


def throughput_row(run: Run) -> list[object]:
    return [run.label, run.rows, run.rc, run.wall_s, run.rps, run.span_rps, run.cpu_per_1k, run.maxrss_mb,
            f"{run.server_cpu_pct:.0f}", run.lead_s, run.tail_s]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


# --- scenarios ----------------------------------------------------------------------


def scenario_zero(workdir: Path, rows: int | None) -> None:
    rows = rows or 20_000
    data = make_input(workdir / "zero.jsonl", rows)
    b = measured(workdir, batchrun, "batchrun", data, rows, 256)
    f = measured(workdir, floor, "bare aiohttp", data, rows, 256)
    w = measured(workdir, wire_floor, "bare wire", data, rows, 256)
    o = measured(workdir, baseline, "openai baseline", data, rows, 256)
    body = table(THROUGHPUT_HEADERS + ["batchrun/this req/s"], [
        throughput_row(b) + [""],
        *(throughput_row(r) + [f"{ratio(b.rps, r.rps)} (wall), {ratio(b.span_rps, r.span_rps)} (span)"]
          for r in (f, w, o)),
    ])
    report(f"zero: {rows:,} rows, concurrency 256, zero latency", body, [b, f, w, o])


def scenario_latency(workdir: Path, rows: int | None) -> None:
    rows = rows or 16_000
    concurrency, latency_s = 400, 0.2
    bound = concurrency / latency_s  # Little's law: in flight / mean latency
    data = make_input(workdir / "latency.jsonl", rows)
    opts = {"latency_ms": 200, "jitter_ms": 50}
    b = measured(workdir, batchrun, "batchrun", data, rows, concurrency, opts)
    f = measured(workdir, floor, "bare aiohttp", data, rows, concurrency, opts)
    w = measured(workdir, wire_floor, "bare wire", data, rows, concurrency, opts)
    o = measured(workdir, baseline, "openai baseline", data, rows, concurrency, opts)
    body = table(THROUGHPUT_HEADERS + ["% of bound (wall)", "% of bound (span)"], [
        throughput_row(r) + [f"{100 * r.rps / bound:.1f}", f"{100 * r.span_rps / bound:.1f}"] for r in (b, f, w, o)
    ])
    body += f"\n\nLittle's-law bound: {concurrency} / {latency_s} s = {bound:,.0f} req/s; " \
            f"batchrun/baseline req/s: {ratio(b.rps, o.rps)} (wall), {ratio(b.span_rps, o.span_rps)} (span); " \
            f"batchrun/bare aiohttp: {ratio(b.rps, f.rps)} (wall), {ratio(b.span_rps, f.span_rps)} (span)"
    report(f"latency: {rows:,} rows, concurrency {concurrency}, 200 ± 50 ms", body, [b, f, w, o])


def rejected_rate_limit(run: Run) -> str | None:
    """batchrun versions without the `rate_limit` key refuse the spec (exit 2)."""
    if run.rc == 2 and "rate_limit" in run.log:
        return f"batchrun rejects the `rate_limit` key (exit 2): {run.last_log_line()}"
    return None


def scenario_ratelimit(workdir: Path, rows: int | None) -> None:
    rows = rows or 3_000
    rpm = 1200
    data = make_input(workdir / "ratelimit.jsonl", rows)
    b = measured(workdir, batchrun, "batchrun", data, rows, 64, extra={"rate_limit": {"requests_per_minute": rpm}})
    title = f"ratelimit: {rows:,} rows, rate_limit {rpm} rpm in the spec, concurrency 64, unlimited server"
    rejected = rejected_rate_limit(b)
    if rejected:
        report(title, rejected, [b])
        return
    per_s = b.server.get("received_per_s", [])
    complete = len(per_s) - 1  # the last second is cut short by the end of the run
    minutes = [sum(per_s[m * 60:(m + 1) * 60]) for m in range(complete // 60)]
    # 10 s windows in steady state: the first 10 s (a start-up burst is allowed) and the
    # incomplete tail are left out.
    windows = [sum(per_s[s:s + 10]) for s in range(10, complete - 9, 10)]
    body = table(
        ["rows", "exit", "wall s", "server requests", "requests per full minute", "per 10 s: min", "per 10 s: max",
         "first 10 s"],
        [[rows, b.rc, b.wall_s, b.requests, ", ".join(map(str, minutes)) or "(none)",
          min(windows) if windows else "n/a", max(windows) if windows else "n/a", sum(per_s[:10])]],
    )
    body += f"\n\ntarget: {rpm} per minute = {rpm // 6} per 10 s"
    report(title, body, [b])


def ok_rows(run: Run) -> int | str:
    if run.output is None or not run.output.exists():
        return "no output"
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(run.output, columns=["status"]).column("status")
    return pc.sum(pc.equal(status, "ok")).as_py() or 0


def scenario_adapt(workdir: Path, rows: int | None, *, silent: bool = False) -> None:
    rows = rows or 3_000
    rpm = 1200
    data = make_input(workdir / "adapt.jsonl", rows)
    b = measured(workdir, batchrun, "batchrun", data, rows, 64, {"rpm_limit": rpm, "silent": silent})
    throttled = b.server.get("throttled_429", 0)
    ok_per_s = b.server.get("ok_per_s", [])
    body = table(
        ["rows", "exit", "rows ok", "wall s", "requests", "429s", "429s / row", "200s per minute (span)"],
        [[rows, b.rc, ok_rows(b), b.wall_s, b.requests, throttled, f"{throttled / rows:.2f}",
          f"{60 * sum(ok_per_s) / b.server['span_s']:.0f}" if b.server.get("span_s") else "n/a"]],
    )
    headers = "429 + retry-after only, no x-ratelimit-* headers" if silent else "x-ratelimit-* headers on every answer"
    body += f"\n\nserver: token bucket, {rpm} requests/min, burst 3 s ({rpm // 20} requests); {headers}"
    name = "adapt-blind" if silent else "adapt"
    report(f"{name}: {rows:,} rows, server limited to {rpm} rpm, no rate_limit in the spec, concurrency 64",
           body, [b])


def scenario_adapt_blind(workdir: Path, rows: int | None) -> None:
    scenario_adapt(workdir, rows, silent=True)


def scenario_inflight(workdir: Path, rows: int | None) -> None:
    """A server that holds 2 requests in flight and refuses a third with 429 and
    retry-after: 60, answering in 50 ms: concurrency 32 with nothing stated against 2."""
    rows = rows or 2_000
    data = make_input(workdir / "inflight.jsonl", rows)
    server = {"latency_ms": 50, "max_in_flight": 2}
    two = measured(workdir, batchrun, "batchrun concurrency 2", data, rows, 2, server)
    many = measured(workdir, batchrun, "batchrun concurrency 32", data, rows, 32, server)
    bound = 1.5 * two.wall_s + 60
    body = table(
        ["client", "rows ok", "exit", "wall s", "429s", "429s / row"],
        [[run.label, ok_rows(run), run.rc, run.wall_s, run.server.get("throttled_429", 0),
          f"{run.server.get('throttled_429', 0) / rows:.3f}"] for run in (two, many)],
    )
    body += (f"\n\nconcurrency 32 took {many.wall_s:.1f} s against a bound of 1.5 × {two.wall_s:.1f} s + 60 s "
             f"(one retry-after) = {bound:.1f} s: {many.wall_s / bound:.2f} of it")
    report(f"inflight: {rows:,} rows, server holds 2 in flight (429, retry-after: 60), 50 ms answers", body,
           [two, many])


def scenario_ray(workdir: Path, rows: int | None) -> None:
    """4 workers against a server that admits 50 requests/s, the job limited to 45/s:
    on Ray, sharing one limit; beside it, 4 independent shards, each with the spec's limit."""
    rows = rows or 2_700  # a minute at 45/s
    rpm, server_rpm, workers = 2700, 3000, 4
    data = make_input(workdir / "ray.jsonl", rows)
    opts, limit = {"rpm_limit": server_rpm}, {"rate_limit": {"requests_per_minute": rpm}}
    ray = measured(workdir, batchrun, f"batchrun --ray --ray-workers {workers}", data, rows, 32, opts,
                   extra=limit, args=("--ray", "--ray-workers", str(workers)))
    alone = measured(workdir, batchrun_shards, f"{workers} x batchrun --shard I of {workers}", data, rows, 32, opts,
                     extra=limit, count=workers)
    target = rpm / 60

    def line(run: Run) -> list[object]:
        ok_per_s = run.server.get("ok_per_s", [])
        span = run.server.get("span_s") or 0.0
        throttled = run.server.get("throttled_429", 0)
        achieved = sum(ok_per_s) / span if span else 0.0
        steady = ok_per_s[5:-5]  # past the start, before the last shards finish
        return [run.label, ok_rows(run), run.rc, run.wall_s, span, run.requests, throttled,
                f"{throttled / rows:.2f}", achieved, f"{100 * achieved / target:.1f}",
                f"{min(steady)}-{max(steady)}" if steady else "n/a"]

    body = table(["client", "rows ok", "exit", "wall s", "server span s", "requests", "429s", "429s / row",
                  "200s/s over the span", "% of 45/s", "200s per s (min-max, 5 s in to 5 s before the end)"], [line(ray), line(alone)])
    body += (f"\n\nserver: token bucket, {server_rpm} requests/min ({server_rpm / 60:g}/s), burst 3 s; spec: "
             f"rate_limit.requests_per_minute {rpm} ({target:g}/s), concurrency 32. The Ray run's wall time "
             "includes starting a local Ray cluster; its span is the server's first request to its last answer.")
    report(f"ray: {rows:,} rows, {workers} workers, job limit {target:g}/s, server admits {server_rpm / 60:g}/s",
           body, [ray, alone])


def scenario_ray_inflight(workdir: Path, rows: int | None) -> None:
    """The inflight server (holds 2 in flight; 429, retry-after: 60; 50 ms answers) and 4
    workers at concurrency 32: on Ray, one limit found for all; beside it, 4 independent
    shards, each finding its own; and one process at concurrency 2."""
    rows = rows or 2_000
    workers = 4
    data = make_input(workdir / "ray-inflight.jsonl", rows)
    server = {"latency_ms": 50, "max_in_flight": 2}
    two = measured(workdir, batchrun, "batchrun concurrency 2", data, rows, 2, server)
    ray = measured(workdir, batchrun, f"batchrun --ray --ray-workers {workers}, concurrency 32", data, rows, 32,
                   server, args=("--ray", "--ray-workers", str(workers)))
    alone = measured(workdir, batchrun_shards, f"{workers} x batchrun --shard I of {workers}, concurrency 32", data,
                     rows, 32, server, count=workers)
    bound = 1.5 * two.wall_s + 60
    body = table(
        ["client", "rows ok", "exit", "wall s", "server span s", "429s", "429s / row"],
        [[run.label, ok_rows(run), run.rc, run.wall_s, run.server.get("span_s") or 0.0,
          run.server.get("throttled_429", 0), f"{run.server.get('throttled_429', 0) / rows:.3f}"]
         for run in (two, ray, alone)],
    )
    body += (f"\n\nbound: 1.5 × {two.wall_s:.1f} s + 60 s (one retry-after) = {bound:.1f} s. The Ray run's wall "
             "time includes starting a local Ray cluster; its span is the server's first request to its last answer.")
    report(f"ray-inflight: {rows:,} rows, {workers} workers, server holds 2 in flight (429, retry-after: 60), "
           "50 ms answers", body, [two, ray, alone])


def memory_report(workdir: Path, small: int, make, title: str, concurrency: int, **kw) -> None:
    """batchrun at `small` and 10 x `small` rows made by `make(path, n)`: peak RSS side by side."""
    large = small * 10
    runs = []
    for n in (small, large):
        data = make(workdir / f"memory-{n}.jsonl", n)
        runs.append(measured(workdir, batchrun, f"batchrun {n}", data, n, concurrency, **kw))
    s, big = runs
    body = table(["client", "rows", "exit", "wall s", "rows/s (wall)", "peak RSS MB"],
                 [[r.label, r.rows, r.rc, r.wall_s, r.rps, r.maxrss_mb] for r in runs])
    body += f"\n\npeak RSS ratio {large:,} / {small:,} rows: {ratio(big.maxrss_mb, s.maxrss_mb)} " \
            f"(rows ratio {large // small})"
    report(title.format(small=small, large=large), body, runs)


def scenario_memory(workdir: Path, rows: int | None) -> None:
    memory_report(workdir, rows or 20_000, make_input,
                  "memory: batchrun at {small:,} vs {large:,} rows, concurrency 256, zero latency", 256)


def make_docs(path: Path, rows: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"d{i}", "input": f"Document {i}: a short passage to embed, about item {i}."})
                    + "\n")
    return path


def embeddings_baseline(label: str, workdir: Path, input_path: Path, rows: int, concurrency: int, *,
                        server: Server) -> Run:
    cmd = [PY, str(HERE / "baseline_openai_embeddings.py"), str(input_path), server.base_url, str(concurrency),
           "--batch", "64"]
    return run_client(label, rows, cmd, workdir, server)


EMBED = {"endpoint": "embeddings", "params": {}, "inputs_per_request": 64}
EMBED_DIMS = (1024, 1536)  # common sizes (BGE and e5 large; OpenAI's text-embedding-3-small)


def scenario_embeddings(workdir: Path, rows: int | None) -> None:
    """At two common dimensions: the baseline's cost grows with the floats it makes, batchrun's with bytes."""
    rows = rows or 20_000
    data = make_docs(workdir / "docs.jsonl", rows)
    headers = ["client", "dimension", "rows", "exit", "wall s", "rows/s (wall)", "rows/s (server span)", "CPU s",
               "peak RSS MB", "s to first request", "s after last answer", "batchrun/baseline rows/s"]
    lines, runs = [], []
    for dims in EMBED_DIMS:
        server_opts = {"embed_dims": dims}
        b = measured(workdir, batchrun, f"batchrun {dims}", data, rows, 16, extra=EMBED, server_opts=server_opts)
        o = measured(workdir, embeddings_baseline, f"openai embeddings.create {dims}", data, rows, 16,
                     server_opts=server_opts)
        lines += [[b.label, dims, b.rows, b.rc, b.wall_s, b.rps, b.span_rps, b.cpu_s, b.maxrss_mb, b.lead_s, b.tail_s,
                   f"{ratio(b.rps, o.rps)} (wall), {ratio(b.span_rps, o.span_rps)} (span)"],
                  [o.label, dims, o.rows, o.rc, o.wall_s, o.rps, o.span_rps, o.cpu_s, o.maxrss_mb, o.lead_s, o.tail_s, ""]]
        runs += [b, o]
    report(f"embeddings: {rows:,} rows, 64 a request, concurrency 16, zero latency", table(headers, lines), runs)


QA_TEMPLATE = {"messages": [{"role": "system", "content": "Answer from the context."},
                            {"role": "user", "content": "Context: {{ context }}\nQuestion: {{ question }}"}]}


def make_qa(workdir: Path, rows: int) -> tuple[Path, Path]:
    """The same requests twice: Parquet columns for the template, and JSONL pre-rendered.

    Made in a child process: a client's peak RSS (os.wait4) counts the pages it shares
    with this process between fork and exec, so this process must stay small."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import run; run._make_qa({str(workdir)!r}, {rows})"
    subprocess.run([PY, "-c", code], check=True)
    return workdir / f"qa-{rows}.parquet", workdir / f"qa-{rows}.jsonl"


def _make_qa(workdir: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = [f"What is item {i} for?" for i in range(rows)]
    contexts = [f"Item {i} is a part of the benchmark's data set, number {i}." for i in range(rows)]
    parquet = Path(workdir) / f"qa-{rows}.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(rows)], "question": questions, "context": contexts}),
                   parquet, row_group_size=64_000)
    jsonl = Path(workdir) / f"qa-{rows}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, (q, c) in enumerate(zip(questions, contexts)):
            messages = [{"role": "system", "content": "Answer from the context."},
                        {"role": "user", "content": f"Context: {c}\nQuestion: {q}"}]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")


def scenario_template(workdir: Path, rows: int | None) -> None:
    rows = rows or 20_000
    parquet, jsonl = make_qa(workdir, rows)
    chat = {"endpoint": "chat"}
    t = measured(workdir, batchrun, "batchrun templated", parquet, rows, 256, extra={**chat, "template": QA_TEMPLATE})
    p = measured(workdir, batchrun, "batchrun pre-rendered", jsonl, rows, 256, extra=chat)
    body = table(THROUGHPUT_HEADERS + ["templated/pre-rendered req/s"], [
        throughput_row(t) + [f"{ratio(t.rps, p.rps)} (wall), {ratio(t.span_rps, p.span_rps)} (span)"],
        throughput_row(p) + [""],
    ])
    report(f"template: {rows:,} chat rows, concurrency 256, zero latency", body, [t, p])


VALIDATE = """\
import sys, time
from pathlib import Path
from batchrun.inputs.reader import InputReader
from batchrun.spec.parse import load_spec
from batchrun.inputs.template import Template
spec = load_spec(sys.argv[1])
reader = InputReader(list(spec.input), endpoint=spec.endpoint, template=Template(spec.template))
started = time.perf_counter()
reader.fingerprint()
count, _ = reader.validate()
print(f"validated {count} rows in {time.perf_counter() - started:.2f} s")
"""


def scenario_validate(workdir: Path, rows: int | None) -> None:
    rows = rows or 1_000_000
    parquet, _ = make_qa(workdir, rows)
    job = workdir / "job.yaml"
    with Server(workdir, "validate") as server:
        job.write_text(json.dumps({
            "input": str(parquet), "output": str(workdir / "out.parquet"), "model": "bench", "endpoint": "chat",
            "template": QA_TEMPLATE, "api": {"base_url": server.base_url, "api_key_env": KEY_ENV}}))
        alone = run_client("validate only", rows, [PY, "-c", VALIDATE, str(job)], workdir, server)
        limited = run_client("batchrun run --limit 1", rows,
                             [PY, "-m", "batchrun", "run", str(job), "--no-progress", "--limit", "1"], workdir, server)
    body = table(["what", "rows", "exit", "wall s", "peak RSS MB", "said"], [
        [alone.label, rows, alone.rc, alone.wall_s, alone.maxrss_mb, alone.last_log_line()],
        [limited.label, rows, limited.rc, limited.wall_s, limited.maxrss_mb, limited.last_log_line()[:80]],
    ])
    report(f"validate: {rows:,} templated Parquet rows before the first request", body, [alone, limited])


def scenario_embed_memory(workdir: Path, rows: int | None) -> None:
    memory_report(workdir, rows or 20_000, make_docs,
                  "embed-memory: batchrun embedding {small:,} vs {large:,} rows of dimension 1,024", 16,
                  extra=EMBED, server_opts={"embed_dims": 1024})


HOSTILE = """\
import itertools, json, signal, sys, threading, zlib
kind, stats = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
from tests.fakeserver import FakeServer, Faults
if kind == "bomb":
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    body = b"".join(packer.compress(bytes(1 << 20)) for _ in range(1024)) + packer.flush()
    head = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-encoding: gzip\\r\\n"
            b"content-length: %d\\r\\n\\r\\n" % len(body))
    hostile = lambda: [head, body]
else:
    chunk = b"100000\\r\\n" + b": keep-alive\\n".ljust(1 << 20, b" ") + b"\\r\\n"
    def hostile():
        yield b"HTTP/1.1 200 OK\\r\\ncontent-type: text/event-stream\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n"
        while True:
            yield chunk
# The first request and every 20th are answered as usual: a job whose first row gets no
# answer stops at once, and so does one whose 50 rows in a row fail alike.
count = itertools.count()
server = FakeServer(Faults(raw_answer=lambda request: None if next(count) % 20 == 0 else hostile())).start()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
print("READY", server.base_url.split(":")[2].split("/")[0], flush=True)
done.wait()
json.dump({"requests": len(server.requests)}, open(stats, "w"))
"""


class HostileServer(Server):
    """tests/fakeserver.py answering every request but one in 20 with `kind`: "bomb" or "endless"."""

    def __init__(self, workdir: Path, label: str, kind: str) -> None:
        super().__init__(workdir, label)
        script = workdir / "hostile_server.py"
        script.write_text(HOSTILE)
        self.cmd = [PY, str(script), kind, str(self.stats_path), str(REPO)]


def scenario_bomb(workdir: Path, rows: int | None) -> None:
    """Every answer hostile, 400 in flight: what the process holds is the answers' shared
    budget and aiohttp's buffer per connection, whatever the server sends."""
    rows = rows or 400
    data = make_input(workdir / "bomb.jsonl", rows)
    retry = {"retry": {"max_attempts": 2, "backoff_initial_s": 0.01}}
    runs = []
    for kind in ("bomb", "endless"):
        with HostileServer(workdir, kind, kind) as server:
            run = batchrun(f"batchrun {kind}", workdir, data, rows, 400, server=server, extra=retry)
        run.server = server.stats
        runs.append(run)
    body = table(["answers", "rows", "exit", "wall s", "requests", "peak RSS MB", "said first"],
                 [[r.label, r.rows, r.rc, r.wall_s, r.server.get("requests", 0), r.maxrss_mb, r.log.split("\n")[0][:90]]
                  for r in runs])
    body += ("\n\nbomb: 1 GB of zeros gzipped (1 MB on the wire); endless: 1 MB chunks of keep-alive comments, never "
             "ending; one answer in 20 as usual; api.max_answer_mb 32 (the default), 2 attempts a row. A job may stop "
             "(exit 3) once 50 rows in a row failed alike, 400 in flight by then. The aim: at most 400 MB.")
    report(f"bomb: {rows:,} rows, concurrency 400, every answer but one in 20 hostile", body, runs)


def compile_checkout() -> None:
    """batchrun's bytecode, as `pip install` writes it for the packages beside it: with
    PYTHONDONTWRITEBYTECODE set (as on the CI machines), a checkout would compile every
    module at each start, 0.15 s that no installed package pays (0.52-0.55 s against 0.37 s
    to import the CLI and the engine, measured here)."""
    compileall.compile_dir(REPO / "batchrun", quiet=1)


def source_fingerprint() -> str:
    """A hash of batchrun's source: others may edit it while a benchmark runs, and a
    scenario that straddles an edit measured two different programs."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "batchrun").rglob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_describe() -> str:
    """Commit and uncommitted files, read-only."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "batchrun"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


RUNNERS = {"zero": scenario_zero, "latency": scenario_latency, "ratelimit": scenario_ratelimit,
           "adapt": scenario_adapt, "adapt-blind": scenario_adapt_blind, "memory": scenario_memory,
           "embeddings": scenario_embeddings, "template": scenario_template, "validate": scenario_validate,
           "embed-memory": scenario_embed_memory, "inflight": scenario_inflight, "ray": scenario_ray,
           "ray-inflight": scenario_ray_inflight, "bomb": scenario_bomb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="repeatable; default: " + " ".join(DEFAULT_SCENARIOS))
    parser.add_argument("--rows", type=int, help="override each scenario's row count (memory: N vs 10 N)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (inputs, outputs, logs)")
    args = parser.parse_args()

    print(f"command: {shlex.join([os.path.relpath(PY, REPO) if PY.startswith(str(REPO)) else PY] + sys.argv)}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"batchrun: {git_describe()}; source fingerprint {source_fingerprint()}")
    compile_checkout()
    workroot = Path(tempfile.mkdtemp(prefix="batchrun-bench-"))
    try:
        for name in args.scenario or DEFAULT_SCENARIOS:
            workdir = workroot / name
            workdir.mkdir()
            before = source_fingerprint()
            RUNNERS[name](workdir, args.rows)
            after = source_fingerprint()
            if after != before:
                print(f"\nWARNING: batchrun's source changed during `{name}` ({before} -> {after}): rerun it")
    finally:
        if args.keep:
            print(f"\nkept: {workroot}")
        else:
            import shutil

            shutil.rmtree(workroot, ignore_errors=True)


if __name__ == "__main__":
    main()
