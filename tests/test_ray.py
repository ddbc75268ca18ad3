"""`batchrun run JOB --ray`: a job in shards on a Ray cluster, one rate limit for all.

A real local Ray cluster (`ray start --head --block`), bound to 127.0.0.1, serves the
module; the jobs talk to the fake server. Ray binds a node to the machine's address
unless it is told the cluster is single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchrun._ray import limiter_name
from batchrun._spec import load_spec
from tests.conftest import REPO, TEST_KEY, cli_env, read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
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
        deadline = time.monotonic() + 60
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


def start_ray_cli(spec: Path, address: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--ray", address, "--no-progress"],
                            env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
    assert sum(len(answers) - 1 for answers in server.answers.values()) <= paid_twice


def wait_for_requests(server: FakeServer, n: int, rows: range | None = None) -> None:
    deadline = time.monotonic() + 60
    while sum(rows is None or int(r.key.split()[1]) in rows for r in list(server.requests)) < n:
        assert time.monotonic() < deadline, f"{len(server.requests)} requests so far"
        time.sleep(0.02)


def test_four_workers_answer_every_row_once_at_the_jobs_rate_together(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows, per_s = 120, 30
    times = record_times(server, Faults(latency_s=0.002))
    spec = job(tmp_path, server, rows, rpm=per_s * 60)

    result = run_cli("run", str(spec), "--ray", cluster, env=env())

    assert result.code == 0, result.stderr
    assert f"{rows} rows: {rows} ok, 0 failed" in result.stdout and "4 shards on Ray" in result.stdout
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    # One schedule for the four: 120 requests at 30/s take 4 s (four limiters of 30/s: 1 s),
    # and no second sees much more than 30 (a late slot goes at once: a few more)
    span = times[-1] - times[0]
    assert (rows - 16) / per_s <= span <= rows / per_s * 1.5 + 1, span
    assert max(sum(t <= u < t + 1 for u in times) for t in times) <= per_s + 10
    shards = sorted((tmp_path / "out/result.shards").glob("*.status.json"))
    assert [json.loads(p.read_text())["state"] for p in shards] == ["finished"] * 4


def test_four_workers_find_the_servers_limit_on_requests_in_flight_together(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    """The server holds 2 in flight: four workers of their own would keep 4 or more there."""
    rows = 400
    server.faults = Faults(max_in_flight=2, retry_after="6", latency_s=0.02)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}", "tag": i} for i in range(rows)])
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--ray", cluster, env=env())

    assert result.code == 0, result.stderr
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    busy = sum(r.outcome == "busy" for r in server.requests)
    assert busy < rows / 10, busy  # the first burst, then a few probes: not a 429 per row
    answered = sorted(r.at for r in server.requests if r.outcome == "ok")
    # At 2 in flight and 20 ms each, 400 rows take 4 s, the first burst's rows waiting their
    # 6 s aside meanwhile, and a probe that fails costs its row 6 s more; four workers, each
    # on its own, keep 4 or more in flight, and meet a 429 all along
    assert answered[-1] - answered[0] < 4 + 6 + 6 + 2, answered[-1] - answered[0]


def test_a_worker_killed_mid_run_is_replaced_and_its_shard_resumes(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    server.faults = Faults(latency_s=0.002)
    spec = job(tmp_path, server, rows, rpm=6000)
    lock = tmp_path / "out/result.shards/00001-of-00004.batchrun.sqlite.lock"
    driver = start_ray_cli(spec, cluster)
    wait_for_requests(server, 40, range(150, 300))  # shard 1 of 4 is well under way

    victim = int(lock.read_text())
    os.kill(victim, signal.SIGKILL)  # the Ray worker process running shard 1
    out, err = driver.communicate(timeout=120)

    assert driver.returncode == 0, err
    assert f"{rows} rows: {rows} ok" in out
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=2)  # its requests in flight
    status = json.loads((tmp_path / "out/result.shards/00001-of-00004.status.json").read_text())
    assert status["state"] == "finished" and status["pid"] != victim  # run again, by another worker


def test_a_driver_killed_mid_run_then_run_again_finishes_the_job(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    server.faults = Faults(latency_s=0.002)
    spec = job(tmp_path, server, rows, rpm=6000)
    driver = start_ray_cli(spec, cluster)
    wait_for_requests(server, 200)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=10)
    assert driver.returncode == -signal.SIGKILL
    assert not (tmp_path / "out/result.parquet").exists()

    result = run_cli("run", str(spec), "--ray", cluster, "--no-progress", env=env())

    assert result.code == 0, result.stderr
    assert f"{rows} rows: {rows} ok" in result.stdout
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=8)  # the requests in flight at the kill
    assert len(server.requests) < rows + 8 + 1


KILL_LIMITER = """
import sys, time, ray
ray.init(address=sys.argv[1], namespace="batchrun", log_to_driver=False)
limiter = ray.get_actor(sys.argv[2])
assert ray.get(limiter.claim.remote("probe"))  # remembered until the actor is lost
ray.kill(limiter, no_restart=False)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # a new actor has no memory of the probe
    try:
        if ray.get(limiter.claim.remote("probe"), timeout=5):
            print("made again")
            break
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    time.sleep(0.1)
"""


def test_the_limiter_actor_killed_mid_run_is_made_again_and_no_row_is_lost(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows, per_s = 600, 50
    times = record_times(server, Faults(latency_s=0.002))
    spec = job(tmp_path, server, rows, rpm=per_s * 60)
    driver = start_ray_cli(spec, cluster)
    wait_for_requests(server, 100)

    killed = subprocess.run([sys.executable, "-c", KILL_LIMITER, cluster, limiter_name(load_spec(spec).output)],
                            env=env(), capture_output=True, text=True, timeout=60)
    sent_by_then = len(server.requests)
    out, err = driver.communicate(timeout=120)

    assert killed.stdout.strip() == "made again", killed.stderr
    assert sent_by_then < rows, "the job ended before the limiter was made again: make it longer"
    assert driver.returncode == 0, err
    assert f"{rows} rows: {rows} ok" in out
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=0)
    # Meanwhile the workers went on alone, each at a quarter of the rate: the job's rate held
    assert times[-1] - times[0] >= (rows - 20) / per_s


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

    result = run_cli("run", str(spec), "--ray", "--shard", "0/2", env=env())

    assert result.code == 2
    assert "drop --shard" in result.stderr


def test_an_address_where_no_cluster_listens_is_said_at_once(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "hi"}])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    result = run_cli("run", str(spec), "--ray", f"127.0.0.1:{port}", env=env(), timeout=30)

    assert result.code == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
