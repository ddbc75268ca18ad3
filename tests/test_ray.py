"""`batchrun run JOB --ray`: a job in shards on a Ray cluster, one rate limit for all.

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
import json
import os
import queue
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

import pytest

from batchrun.backends.ray.driver import limiter_name
from batchrun.spec.parse import load_spec
from tests.conftest import (
    REPO,
    TEST_KEY,
    CLIResult,
    cli_env,
    kill_9,
    paid_twice as answers_paid_twice,
    read_output,
    run_cli_process,
    write_jsonl,
    write_spec,
)
from tests.fakeserver import FakeServer, Faults

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
HANG_S = 300  # a job or a wait that takes longer hangs (on a busy machine, a job takes a minute)
# For the head and every process that connects to it: single-node (so on 127.0.0.1), no
# usage reports, and a token of its own (not one a developer's ~/.ray may hold).
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
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


def test_four_workers_answer_every_row_once_at_the_jobs_rate_together(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows, per_s = 120, 30
    times = record_times(server, Faults(latency_s=0.002))
    spec = job(tmp_path, server, rows, rpm=per_s * 60)

    result = run_ray_cli(spec, cluster)

    assert result.code == 0, result.stderr
    assert f"{rows} rows: {rows} ok, 0 failed" in result.stdout and "4 shards on Ray" in result.stdout
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    # One schedule for the four: 120 requests at 30/s take 4 s (four limiters of 30/s: 1 s,
    # and 120 in one second). A busy machine only slows them, so how slow is not asked;
    # but most seconds see at least half the rate (a quarter: each worker at a quarter of its share)
    span = times[-1] - times[0]
    assert span >= (rows - 16) / per_s, span
    seconds = [sum(t <= u < t + 1 for u in times) for t in times]
    assert max(seconds) <= per_s * 1.5, seconds  # a server stalled a moment sees a few at once
    full = seconds[:sum(t <= times[-1] - 1 for t in times)]
    assert sorted(full)[len(full) // 2] >= per_s / 2, seconds
    shards = sorted((tmp_path / "out/result.shards").glob("*.status.json"))
    assert [json.loads(p.read_text())["state"] for p in shards] == ["finished"] * 4


def test_four_workers_find_the_servers_limit_on_requests_in_flight_together(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    """The server holds 2 in flight: four workers of their own would keep 4 or more there."""
    rows = 400
    server.faults = Faults(max_in_flight=2, retry_after="6", latency_s=0.02)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}", "tag": i} for i in range(rows)])
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})

    result = run_ray_cli(spec, cluster)

    assert result.code == 0, result.stderr
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    busy = sum(r.outcome == "busy" for r in server.requests)
    # The first burst, then a few probes: not a 429 per row. Four workers, each on its own,
    # keep 4 or more in flight, and meet a 429 all along. (How long the job took is not
    # asked: 4 s of answers and a 6 s wait aside or two, but a busy machine slows them.)
    assert busy < rows / 10, busy


def test_a_worker_killed_mid_run_is_replaced_and_its_shard_resumes(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    resumed = threading.Event()
    # Shard 1 of 4 (rows 150 to 299) cannot finish before its worker is killed
    server.faults = Faults(latency_s=0.002, hold=after_first(40, resumed, range(150, 300)))
    spec = job(tmp_path, server, rows, rpm=6000)
    lock = tmp_path / "out/result.shards/00001-of-00004.batchrun.sqlite.lock"
    with started_ray_cli(spec, cluster) as driver:
        wait_for_requests(server, 40, range(150, 300))  # shard 1 is well under way

        victim = int(lock.read_text())
        os.kill(victim, signal.SIGKILL)  # the Ray worker process running shard 1
        resumed.set()
        out, err = driver.communicate(timeout=HANG_S)

    assert driver.returncode == 0, err
    assert f"{rows} rows: {rows} ok" in out
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=2)  # its requests in flight
    status = json.loads((tmp_path / "out/result.shards/00001-of-00004.status.json").read_text())
    assert status["state"] == "finished" and status["pid"] != victim  # run again, by another worker


def test_a_driver_killed_mid_run_then_run_again_finishes_the_job(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    rerun = threading.Event()
    server.faults = Faults(latency_s=0.002, hold=after_first(200, rerun))  # the first run cannot end
    spec = job(tmp_path, server, rows, rpm=6000)
    with started_ray_cli(spec, cluster) as driver:
        wait_for_requests(server, 200)
        kill_9(driver)
    assert not (tmp_path / "out/result.parquet").exists()
    rerun.set()

    result = run_ray_cli(spec, cluster, "--no-progress")

    assert result.code == 0, result.stderr
    assert f"{rows} rows: {rows} ok" in result.stdout
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=8)  # the requests in flight at the kill
    assert len(server.requests) < rows + 8 + 1


KILL_LIMITER = """
import sys, time, ray
ray.init(address=sys.argv[1], namespace="batchrun", log_to_driver=False)
sys.stdin.readline()  # connected before the job is under way, then told to go
limiter = ray.get_actor(sys.argv[2])
assert ray.get(limiter.claim.remote("probe"))  # remembered until the actor is lost
ray.kill(limiter, no_restart=False)
print("killed", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:  # a new actor has no memory of the probe
    try:
        if ray.get(limiter.claim.remote("probe"), timeout=5):
            print("made again", flush=True)
            break
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    time.sleep(0.1)
"""


@contextlib.contextmanager
def limiter_killer(cluster: str, spec: Path, log: Path) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    """A process connected to the cluster that, told to on its stdin, kills the job's
    limiter actor; and the lines it says ("killed", "made again"; "" when it ended)."""
    name = limiter_name(load_spec(spec).output)
    with open(log, "w") as stderr, subprocess.Popen(
            [sys.executable, "-c", KILL_LIMITER, cluster, name, str(HANG_S)], env=env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=stderr, text=True) as killer:
        said: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in killer.stdout:
                said.put(line.strip())
            said.put("")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield killer, said
        finally:
            if killer.poll() is None:
                killer.kill()
            reader.join()


def test_the_limiter_actor_killed_mid_run_is_made_again_and_no_row_is_lost(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows, per_s = 600, 50
    killed, made_again = threading.Event(), threading.Event()
    under_way = after_first(100, killed)

    def hold(body: dict) -> threading.Event | None:
        """The four workers are under way when the actor is killed, and the job cannot
        end before it is made again: its last row waits for that."""
        return made_again if row_of(body) == rows - 1 else under_way(body)

    times = record_times(server, Faults(latency_s=0.002, hold=hold))
    spec = job(tmp_path, server, rows, rpm=per_s * 60)
    log = tmp_path / "killer.log"
    with limiter_killer(cluster, spec, log) as (killer, said), started_ray_cli(spec, cluster) as driver:
        wait_for_requests(server, 100)
        killer.stdin.write("go\n")
        killer.stdin.flush()
        assert said.get(timeout=HANG_S) == "killed", log.read_text()
        went_on = time.monotonic()
        killed.set()
        assert said.get(timeout=HANG_S) == "made again", log.read_text()
        assert driver.poll() is None, "its last row is held: the job cannot have ended"
        made_again.set()
        out, err = driver.communicate(timeout=HANG_S)

    assert driver.returncode == 0, err
    assert f"{rows} rows: {rows} ok" in out
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    # Meanwhile the workers went on alone, each at a quarter of the rate: the job's rate held
    since = [t for t in times if t >= went_on]
    assert since[-1] - since[0] >= (len(since) - 20) / per_s, (len(since), since[-1] - since[0])


WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from batchrun._cli import main; sys.exit(main(sys.argv[1:]))"


def test_without_ray_installed_the_message_says_how_to_get_it(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "hi"}])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})

    # `import ray` fails in it as it does where Ray is not installed
    result = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "run", str(spec), "--ray"], env=env(), cwd=REPO,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stderr
    assert "pip install 'batchrun[ray]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ray_makes_its_own_shards(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "hi"}])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})

    result = run_cli_process("run", str(spec), "--ray", "--shard", "0/2", env=env())

    assert result.code == 2
    assert "drop --shard" in result.stderr


def test_an_address_where_no_cluster_listens_is_said_at_once(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "hi"}])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    result = run_cli_process("run", str(spec), "--ray", f"127.0.0.1:{port}", env=env(), timeout=30)

    assert result.code == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
