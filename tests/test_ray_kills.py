"""`batchrun run JOB --ray` when a part of it is killed: a worker, the driver, the actor
holding the job's quota; every row answered once all the same. (A file of its own so that
two test workers share the Ray tests.)"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchrun.backends.ray.driver import limiter_name
from batchrun.spec.parse import load_spec
from tests.conftest import kill_9, run_cli
from tests.fakeserver import FakeServer, Faults
from tests.raykit import (
    HANG_S,
    after_first,
    assert_every_row_once_as_answered,
    env,
    job,
    ray_cluster,
    record_times,
    row_of,
    run_ray_cli,
    started_ray_cli,
    wait_for_requests,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with ray_cluster() as address:
        yield address


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


@contextlib.contextmanager
def held_driver(tmp_path: Path, server: FakeServer, cluster: str,
                rows: int) -> Iterator[tuple[Path, subprocess.Popen[str], threading.Event]]:
    """A --ray driver of `rows` once the server has had 200 requests, and holds the answers
    to those after them (the run cannot end): its spec, the driver, and what lets them go."""
    release = threading.Event()
    server.faults = Faults(latency_s=0.002, hold=after_first(200, release))
    spec = job(tmp_path, server, rows, rpm=6000)
    with started_ray_cli(spec, cluster) as driver:
        wait_for_requests(server, 200)
        yield spec, driver, release


def test_a_driver_killed_mid_run_then_run_again_finishes_the_job(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    with held_driver(tmp_path, server, cluster, rows) as (spec, driver, rerun):
        kill_9(driver)
    assert not (tmp_path / "out/result.parquet").exists()
    rerun.set()

    result = run_ray_cli(spec, cluster, "--no-progress")

    assert result.code == 0, result.stderr
    assert f"{rows} rows: {rows} ok" in result.stdout
    assert_every_row_once_as_answered(spec, server, rows, paid_twice=8)  # the requests in flight at the kill
    assert len(server.requests) < rows + 8 + 1


def test_a_driver_stopped_by_sigterm_ends_with_its_shards_counts_as_one_process_does(
        tmp_path: Path, server: FakeServer, cluster: str) -> None:
    rows = 600
    with held_driver(tmp_path, server, cluster, rows) as (spec, driver, answer):
        driver.send_signal(signal.SIGTERM)
        answer.set()  # the requests in flight bring their answers home within the grace
        _, err = driver.communicate(timeout=HANG_S)

    assert driver.returncode == 3, err
    assert "aborted: interrupted by SIGTERM" in err
    saved = json.loads(run_cli("status", str(spec), "--json").stdout)["ok"]
    assert 200 <= saved < rows
    assert f"batchrun: {rows:,} rows: {saved:,} ok, 0 failed, {rows - saved:,} remaining;" in err, err


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

