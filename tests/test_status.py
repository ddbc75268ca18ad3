"""Status for schedulers: the status file beside the output, and `batchrun status --json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import read_output, run_cli, start_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults


def status_json(spec: Path) -> dict:
    result = run_cli("status", str(spec), "--json")
    assert result.code == 0, result.stderr
    [line] = result.stdout.splitlines()  # one line: what a scheduler's XCom takes
    return json.loads(line)


def test_the_status_file_and_status_json_follow_a_running_job(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(latency_s=0.03)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(2000)])
    spec = write_spec(tmp_path, concurrency=8, pricing={"test-model": {"input": 1.0, "output": 2.0}},
                      api={"base_url": server.base_url})
    path = tmp_path / "out" / "result.status.json"
    assert status_json(spec)["state"] == "not started"

    proc = start_cli("run", str(spec), "--no-progress")
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = json.loads(path.read_text())
    time.sleep(5.5)
    second = json.loads(path.read_text())
    while_running = status_json(spec)
    proc.communicate(timeout=60)

    assert proc.returncode == 0
    assert first["state"] == second["state"] == while_running["state"] == "running"
    assert first["exit_code"] is None and first["pid"] == proc.pid and first["rows"] == 2000
    assert second["ok"] > first["ok"] and second["remaining"] < 2000 and second["rows_per_s"] > 0
    assert second["eta_s"] is not None and second["updated_at"] >= first["updated_at"]
    assert while_running["ok"] >= second["ok"]
    end = json.loads(path.read_text())
    rows = read_output(tmp_path / "out/result.parquet")
    assert (end["state"], end["exit_code"], end["ok"], end["failed"], end["remaining"]) == ("finished", 0, 2000, 0, 0)
    assert end["total_tokens"] == sum(r["total_tokens"] for r in rows)
    assert abs(end["cost_usd"] - sum(r["cost_usd"] for r in rows)) < 1e-9
    after = status_json(spec)  # from the state, with the last run's exit code
    assert (after["state"], after["exit_code"], after["ok"], after["remaining"]) == ("finished", 0, 2000, 0)


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

