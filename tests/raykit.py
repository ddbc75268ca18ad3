"""What the Ray tests share (tests/test_ray.py, tests/test_ray_kills.py): a real local Ray
cluster, the CLI run against it, and the jobs and checks of a sharded run.

A real local Ray cluster (`ray start --head --block`), bound to 127.0.0.1, serves the
module; the jobs talk to the fake server. Ray binds a node to the machine's address
unless it is told the cluster is single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).

The machine may be busy (two cores, other suites beside): where a test acts on a job
mid-run, the fake server holds the job's answers until the test has acted (`Faults.hold`),
so the job cannot end first, and the timeouts only stop a job that hangs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import (
    REPO,
    TEST_KEY,
    CLIResult,
    cli_env,
)
from tests.conftest import paid_twice as answers_paid_twice
from tests.conftest import read_output, run_cli_process, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

RAY = str(Path(sys.executable).with_name("ray"))
HANG_S = 300  # a job or a wait that takes longer hangs (on a busy machine, a job takes a minute)
# For the head and every process that connects to it: single-node (so on 127.0.0.1), no
# usage reports, and a token of its own (not one a developer's ~/.ray may hold).
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@contextlib.contextmanager
def ray_cluster() -> Iterator[str]:
    """The address of a 4-CPU Ray head on 127.0.0.1; stopped (its own processes only) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="br-ray-")  # short: Ray's socket paths live under it
    log = open(Path(temp) / "head.log", "w+")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env={**os.environ, **CLUSTER_ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_S
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def env() -> dict[str, str]:
    return cli_env(OPENAI_API_KEY=TEST_KEY, **CLUSTER_ENV)


def run_ray_cli(spec: Path, address: str, *args: str) -> CLIResult:
    # A process of its own, as a user runs it: Ray keeps a driver's state for the life of its process
    return run_cli_process("run", str(spec), "--ray", address, *args, env=env(), timeout=HANG_S)


@contextlib.contextmanager
def started_ray_cli(spec: Path, address: str) -> Iterator[subprocess.Popen[str]]:
    """The job's driver in the background; killed at the end if it still runs (a test that failed)."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(spec), "--ray", address, "--no-progress"],
        env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate()


def job(tmp_path: Path, server: FakeServer, rows: int, rpm: int, concurrency: int = 8) -> Path:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}", "tag": i} for i in range(rows)])
    return write_spec(tmp_path, concurrency=concurrency, rate_limit={"requests_per_minute": rpm},
                      api={"base_url": server.base_url})


def record_times(server: FakeServer, faults: Faults) -> list[float]:
    """When each request reached the server."""
    times: list[float] = []
    faults.status_for = lambda body: times.append(time.monotonic())  # returns None: answered as usual
    server.faults = faults
    return times


def assert_every_row_once_as_answered(spec: Path, server: FakeServer, rows: int, *, paid_twice: int) -> None:
    out = read_output(spec.parent / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(rows))
    assert [r["tag"] for r in out] == list(range(rows))
    for row in out:
        assert row["status"] == "ok"
        assert row["output_text"] in {a["choices"][0]["text"] for a in server.answers[f"row {row['row_index']}"]}
    assert len(server.answers) == rows
    assert answers_paid_twice(server) <= paid_twice


def row_of(body: dict) -> int:
    return int(body["prompt"].split()[1])


def after_first(n: int, gate: threading.Event,
                rows: range = range(sys.maxsize)) -> Callable[[dict], threading.Event | None]:
    """A `Faults.hold`: the requests for `rows` after the first `n` of them wait for `gate`."""
    seen = itertools.count()
    return lambda body: gate if row_of(body) in rows and next(seen) >= n else None


def wait_for_requests(server: FakeServer, n: int, rows: range | None = None) -> None:
    deadline = time.monotonic() + HANG_S
    while sum(rows is None or row_of(r.body) in rows for r in list(server.requests)) < n:
        assert time.monotonic() < deadline, f"{len(server.requests)} requests so far"
        time.sleep(0.02)
