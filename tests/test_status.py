"""Status for schedulers: the status file beside the output, and `batchrun status --json`."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from batchrun import Shard, job_status, load_spec, run_job
from batchrun.storage.lock import JobLock
from batchrun.storage.state import StateStore
from tests.conftest import read_output, run_cli, start_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults
from tests.test_remote import _bucket, _env, _put_jsonl, s3  # noqa: F401 (s3: the fixture)


def status_json(spec: Path) -> dict:
    result = run_cli("status", str(spec), "--json")
    assert result.code == 0, result.stderr
    [line] = result.stdout.splitlines()  # one line: what a scheduler's XCom takes
    return json.loads(line)


def wait_for(condition: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return None


@pytest.mark.slow
def test_the_status_file_and_status_json_follow_a_running_job(tmp_path: Path, server: FakeServer) -> None:
    released = threading.Event()

    def hold(body: dict) -> None:
        """Rows from 500 on wait for the test (the server with them): the job runs meanwhile."""
        if int(body["prompt"][1:]) >= 500:
            released.wait(60)

    server.faults = Faults(latency_s=0.03, raw_answer=hold)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(1000)])
    spec = write_spec(tmp_path, concurrency=8, pricing={"test-model": {"input": 1.0, "output": 2.0}},
                      api={"base_url": server.base_url})
    path = tmp_path / "out" / "result.status.json"
    assert status_json(spec)["state"] == "not started"

    proc = start_cli("run", str(spec), "--no-progress")
    try:
        wait_for(lambda: read_json(path))
        first = read_json(path)
        wait_for(lambda: read_json(path)["ok"] > first["ok"])  # the next write, EVERY_S later
        second = read_json(path)
        while_running = status_json(spec)
    finally:
        released.set()
    proc.communicate(timeout=60)

    assert proc.returncode == 0
    assert first["state"] == second["state"] == while_running["state"] == "running"
    assert first["exit_code"] is None and first["pid"] == proc.pid and first["rows"] == 1000
    assert second["ok"] > first["ok"] and second["remaining"] < 1000 and second["rows_per_s"] > 0
    assert second["eta_s"] is not None and second["updated_at"] >= first["updated_at"]
    assert while_running["ok"] >= second["ok"] and while_running["pid"] == proc.pid  # an integer, as in the file
    assert while_running["started_at"] == first["started_at"]
    assert while_running["requests"] >= second["requests"] > 0
    assert {"rows_per_s", "eta_s"} <= while_running.keys()
    end = json.loads(path.read_text())
    rows = read_output(tmp_path / "out/result.parquet")
    assert (end["state"], end["exit_code"], end["ok"], end["failed"], end["remaining"]) == ("finished", 0, 1000, 0, 0)
    assert end["total_tokens"] == sum(r["total_tokens"] for r in rows)
    assert abs(end["cost_usd"] - sum(r["cost_usd"] for r in rows)) < 1e-9
    after = status_json(spec)  # from the state, with the last run's exit code
    assert (after["state"], after["exit_code"], after["ok"], after["remaining"]) == ("finished", 0, 1000, 0)
    assert after["pid"] is None


def test_a_running_job_before_its_first_status_write_has_every_running_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = load_spec(write_spec(tmp_path, api={"base_url": "mock://"}))
    run_job(spec, limit=10)
    (tmp_path / "out/result.status.json").unlink()  # as while a rerun validates its input: none of its own yet
    lock = JobLock.acquire(tmp_path / "out/result.batchrun.sqlite")  # the rerun, in this process
    try:
        data = job_status(spec)
    finally:
        lock.release()

    assert (data["state"], data["pid"], data["ok"], data["remaining"]) == ("running", os.getpid(), 10, 20)
    assert datetime.fromisoformat(data["started_at"]).tzinfo is not None  # when it took the lock
    assert (data["requests"], data["rows_per_s"], data["eta_s"]) == (None, None, None)  # not known yet


def test_a_run_that_died_without_a_word_is_stopped_saying_so(tmp_path: Path) -> None:
    """Its status file still says running, and nobody holds the lock (kill -9): a scheduler
    reading `status --json` is told the run is gone, not a bare null reason."""
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = load_spec(write_spec(tmp_path, api={"base_url": "mock://"}))
    run_job(spec, limit=10)
    path = tmp_path / "out/result.status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "state": "running", "exit_code": None,
                                "reason": None, "pid": 4242}))  # as a run killed mid-way leaves it
    data = job_status(spec)
    assert (data["state"], data["exit_code"], data["pid"], data["ok"]) == ("stopped", None, None, 10)
    assert data["reason"].startswith("the last run (pid 4242) ended without a word: killed")


def test_a_sharded_job_counts_the_rows_of_shards_not_started_as_remaining(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = load_spec(write_spec(tmp_path, api={"base_url": "mock://"}))
    run_job(spec, shard=Shard(0, 3), merge=None)

    data = job_status(spec)

    assert (data["rows"], data["ok"], data["remaining"], data["shard_count"]) == (30, 10, 20, 3)
    assert data["reason"] == "shards 1, 2 of 3 not started"
    StateStore.open(tmp_path / "out/result.shards/00002-of-00003.batchrun.sqlite").close()  # made, never claimed
    assert (job_status(spec)["rows"], job_status(spec)["remaining"]) == (30, 20)


@pytest.mark.slow
def test_a_sharded_job_on_object_storage_reports_its_shards(tmp_path: Path, s3: dict[str, str]) -> None:  # noqa: F811
    fs = _bucket(s3, "status")
    _put_jsonl(fs, "status/in.jsonl", [{"prompt": f"row {i}"} for i in range(50)])
    spec = write_spec(tmp_path, input="s3://status/in.jsonl", output="s3://status/out/a.parquet",
                      api={"base_url": "mock://"})
    assert run_cli("run", str(spec), "--shard", "1/2", "--no-progress", env=_env(s3, tmp_path / "one")).code == 0

    half = json.loads(run_cli("status", str(spec), "--json", env=_env(s3, tmp_path / "fresh")).stdout)
    assert run_cli("run", str(spec), "--shard", "0/2", "--no-progress", env=_env(s3, tmp_path / "two")).code == 0
    done = json.loads(run_cli("status", str(spec), "--json", env=_env(s3, tmp_path / "other")).stdout)

    assert (half["state"], half["shard_count"], half["rows"], half["ok"], half["remaining"]) == \
        ("stopped", 2, 50, 25, 25)
    assert half["reason"] == "shard 0 of 2 not started" and half["exit_code"] is None
    assert [(s["shard"], s["state"], s["exit_code"]) for s in half["shards"]] == [("1/2", "finished", 0)]
    assert half["shards"][0]["output"] == "s3://status/out/a.shards/00001-of-00002.parquet"
    assert (done["state"], done["exit_code"], done["ok"], done["remaining"]) == ("finished", 0, 50, 0)
    assert done["output"] == "s3://status/out/a.parquet"
    assert [(s["shard"], s["state"]) for s in done["shards"]] == [("0/2", "finished"), ("1/2", "finished")]


def test_a_finished_job_whose_rerun_was_refused_is_stopped_in_its_status_and_status_json_alike(
        tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, params={"max_tokens": 16}, api={"base_url": "mock://"})
    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert (status_json(spec)["state"], status_json(spec)["exit_code"]) == ("finished", 0)

    spec.write_text(spec.read_text().replace("max_tokens: 16", "max_tokens: 32"))
    assert run_cli("run", str(spec), "--no-progress").code == 2
    file = json.loads((tmp_path / "out" / "result.status.json").read_text())
    data = status_json(spec)
    assert (file["state"], file["exit_code"]) == (data["state"], data["exit_code"]) == ("stopped", 2)
    assert "params.max_tokens was 16, now 32" in data["reason"]


def test_a_finished_job_whose_spec_was_edited_since_is_not_finished_before_any_run(tmp_path: Path) -> None:
    """A scheduler's sensor waiting for "finished" must not take the old configuration's
    output for the new one's: the status says what changed, before any run is refused."""
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, params={"max_tokens": 16}, api={"base_url": "mock://"})
    assert run_cli("run", str(spec), "--no-progress").code == 0

    spec.write_text(spec.read_text().replace("max_tokens: 16", "max_tokens: 32"))
    data = status_json(spec)
    assert (data["state"], data["exit_code"]) == ("stopped", 0)
    assert "params.max_tokens was 16, now 32" in data["reason"] and "--restart" in data["reason"]
    assert "params.max_tokens was 16, now 32" in run_cli("status", str(spec)).stdout

    spec.write_text(spec.read_text().replace("max_tokens: 32", "max_tokens: 16"))
    assert (status_json(spec)["state"], status_json(spec)["reason"]) == ("finished", None)


@pytest.mark.slow
def test_a_stopped_run_says_why_in_its_status(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(300)])
    spec = write_spec(tmp_path, pricing={"test-model": {"input": 1.0, "output": 2.0}}, params={"max_tokens": 16},
                      budget={"max_usd": 0.0005}, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 3
    data = status_json(spec)
    assert (data["state"], data["exit_code"]) == ("stopped", 3)
    assert "the budget is reached" in data["reason"] and 0 < data["ok"] < 300

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(300)] + ["not json"])
    assert run_cli("run", str(spec), "--no-progress").code == 2
    file = json.loads((tmp_path / "out" / "result.status.json").read_text())
    assert (file["state"], file["exit_code"]) == ("stopped", 2) and "line 301: not valid JSON" in file["reason"]

