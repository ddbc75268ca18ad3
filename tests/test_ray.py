"""`batchrun run JOB --ray`: a job in shards on a Ray cluster, one rate limit for all; a
real local Ray cluster on 127.0.0.1 (tests/raykit.py), the jobs against the fake server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli_process, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults
from tests.raykit import (
    assert_every_row_once_as_answered,
    env,
    job,
    ray_cluster,
    record_times,
    run_ray_cli,
)

pytestmark = pytest.mark.slow
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from batchrun._cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with ray_cluster() as address:
        yield address


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
    # No more than one process meets at `concurrency: 32`: its first burst (31 at once, 2
    # held) and a few probes, 32 in all. The four workers' first grants come close together
    # or apart as the machine lets them start, so their first burst is one process's at
    # most (5 to 12 when they start apart, 43 once under load). Four workers, each finding
    # the limit on its own (4 x `--shard I/4`), met 209: a 429 all along. (How long the job
    # took is not asked: 4 s of answers and a 6 s wait aside or two, but a busy machine
    # slows them.)
    assert busy <= 32 + rows / 20, busy


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
