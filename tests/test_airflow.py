"""batchrun.airflow.BatchrunOperator, over a stand-in for the part of Airflow's task SDK
it uses; tests/airflow/dags_test.sh runs it under Airflow 3 itself."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batchrun
from batchrun import ConfigError, Interrupted
from tests.conftest import read_output, write_jsonl, write_spec
from tests.fakebatch import FakeBatchAPI
from tests.fakeserver import FakeServer, Faults, error_body


class AirflowException(Exception):
    pass


class BaseOperator:
    """What BatchrunOperator uses of airflow.sdk.BaseOperator."""

    def __init__(self, *, task_id: str, do_xcom_push: bool = True) -> None:
        self.task_id = task_id
        self.do_xcom_push = do_xcom_push
        self.log = logging.getLogger(f"airflow.task.{task_id}")

    def on_kill(self) -> None:
        pass

    @property
    def output(self) -> Any:  # Airflow's: the task's XCom, for downstream tasks
        return ("XComArg", self.task_id)


class TaskInstance:
    """What execute pushes by itself (Airflow pushes the return value after it)."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)  # XCom stores JSON
        self.pushed[key] = value


@pytest.fixture
def operators(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """batchrun.airflow imported over the stand-in."""
    sdk = types.ModuleType("airflow.sdk")
    sdk.BaseOperator = BaseOperator  # type: ignore[attr-defined]
    exceptions = types.ModuleType("airflow.sdk.exceptions")
    exceptions.AirflowException = AirflowException  # type: ignore[attr-defined]
    for name, module in (("airflow", types.ModuleType("airflow")), ("airflow.sdk", sdk),
                         ("airflow.sdk.exceptions", exceptions)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "batchrun.airflow", raising=False)
    yield importlib.import_module("batchrun.airflow")
    sys.modules.pop("batchrun.airflow", None)
    vars(batchrun).pop("airflow", None)


@contextlib.contextmanager
def airflow_sigterm(task: Any) -> Iterator[None]:
    """SIGTERM handled as Airflow's task runner does: its handler calls the task's on_kill."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: task.on_kill())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def saved_rows(state: Path) -> dict[int, int]:
    """row_index -> attempts, as the state holds them."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT row_index, attempts FROM results"))


def test_the_operator_returns_the_job_status_for_xcom(tmp_path: Path, operators: types.ModuleType,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    # a per-day output, relative: it resolves against the spec's folder, as the spec's own does
    task = operators.BatchrunOperator(task_id="answers", job=str(spec), output_path="daily/2026-11-29.parquet")
    ti = TaskInstance()
    caplog.set_level(logging.INFO)

    status = task.execute({"ti": ti})

    assert (status["state"], status["exit_code"], status["ok"], status["remaining"]) == ("finished", 0, 30, 0)
    assert status["output"] == str(tmp_path / "daily" / "2026-11-29.parquet")
    assert len(read_output(tmp_path / "daily" / "2026-11-29.parquet")) == 30
    assert not (tmp_path / "out").exists()  # the spec's own output is not this run's
    assert ti.pushed == {}  # Airflow pushes what execute returns
    json.dumps(status)
    assert "30 rows: 30 ok, 0 failed" in caplog.text  # the run's summary, in the task's log


def test_mapped_shards_each_return_their_own_status(tmp_path: Path, operators: types.ModuleType) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    output = str(tmp_path / "daily" / "2026-11-29.parquet")

    first = operators.BatchrunOperator(task_id="s", job=str(spec), output_path=output, shard="1/2").execute({})
    second = operators.BatchrunOperator(task_id="s", job=str(spec), output_path=output, shard="0/2").execute({})

    assert (first["shard"], first["state"], first["ok"]) == ("1/2", "finished", 15)
    assert (second["shard"], second["state"], second["ok"]) == ("0/2", "finished", 15)
    assert [r["row_index"] for r in read_output(Path(output))] == list(range(30))  # the last shard merged


def test_a_job_refused_before_any_request_fails_with_its_message_and_pushes_nothing(
        tmp_path: Path, operators: types.ModuleType) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    ti = TaskInstance()

    with pytest.raises(ConfigError, match=r"answers: shard '2/2': I must be 0 to N-1"):
        operators.BatchrunOperator(task_id="answers", job=str(spec), shard="2/2").execute({"ti": ti})

    assert ti.pushed == {} and not (tmp_path / "out").exists()


def test_on_kill_outside_a_run_does_nothing(tmp_path: Path, operators: types.ModuleType) -> None:
    # Airflow calls on_kill after an execution_timeout too, once the job has stopped
    task = operators.BatchrunOperator(task_id="answers", job=str(tmp_path / "job.yaml"))
    task.on_kill()


@pytest.mark.slow
def test_a_task_whose_rows_failed_pushes_its_status_and_fails(tmp_path: Path, server: FakeServer,
                                                              operators: types.ModuleType, monkeypatch) -> None:
    bad = error_body("no such thing (injected)", "invalid_request_error", "invalid")
    server.faults = Faults(status_for=lambda body: (400, bad) if body["prompt"] in ("p3", "p7") else None)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    spec = write_spec(tmp_path, api={"base_url": server.base_url, "api_key_env": "AIRFLOW_TEST_KEY"})
    monkeypatch.setenv("AIRFLOW_TEST_KEY", "k")
    ti = TaskInstance()

    with pytest.raises(AirflowException, match="10 rows: 8 ok, 2 failed.*error column"):
        operators.BatchrunOperator(task_id="answers", job=str(spec)).execute({"ti": ti})

    status = ti.pushed["return_value"]
    assert (status["state"], status["exit_code"], status["ok"], status["failed"]) == ("finished", 1, 8, 2)


@pytest.mark.slow
def test_sigterm_through_on_kill_stops_the_job_as_sigterm_stops_the_cli(
        tmp_path: Path, operators: types.ModuleType, monkeypatch) -> None:
    rows = 60
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(rows)])
    monkeypatch.setenv("AIRFLOW_TEST_KEY", "k")
    with FakeServer(Faults(latency_s=0.2, latency_jitter_s=0.1)) as server:
        spec = write_spec(tmp_path, concurrency=4, api={"base_url": server.base_url, "api_key_env": "AIRFLOW_TEST_KEY"})
        task = operators.BatchrunOperator(task_id="answers", job=str(spec))
        ti = TaskInstance()
        # As Airflow's supervisor does: SIGTERM to the task's process while requests are in flight
        killer = threading.Thread(target=lambda: (server.wait_for_requests(10), os.kill(os.getpid(), signal.SIGTERM)))
        killer.start()
        with airflow_sigterm(task), pytest.raises(Interrupted, match="Airflow stopped the task"):
            task.execute({"ti": ti})
        killer.join()
        stopped = ti.pushed["return_value"]
        answered = {key for key, bodies in server.answers.items() if bodies}
        saved = saved_rows(tmp_path / "out" / "result.batchrun.sqlite")

        rerun = operators.BatchrunOperator(task_id="answers", job=str(spec)).execute({"ti": TaskInstance()})

        assert (stopped["state"], stopped["exit_code"]) == ("stopped", 3)
        assert stopped["reason"] == "interrupted by SIGTERM: Airflow stopped the task"
        assert 0 < stopped["ok"] == len(saved) < rows
        assert answered == {f"p{i}" for i in saved}  # every answer sent back before the stop was saved
        assert (rerun["state"], rerun["exit_code"], rerun["ok"]) == ("finished", 0, rows)
        assert [r["row_index"] for r in read_output(tmp_path / "out" / "result.parquet")] == list(range(rows))
        assert all(server.count(f"p{i}") == 1 for i in range(rows))  # no row was requested (and paid) twice
        assert set(saved_rows(tmp_path / "out" / "result.batchrun.sqlite").values()) == {1}


@pytest.mark.slow
def test_submit_sends_the_rows_to_the_batch_api_and_returns_the_submitted_status(
        tmp_path: Path, operators: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(12)])
    monkeypatch.setenv("BATCH_KEY", "sk-test-batch")
    with FakeBatchAPI() as batches:
        spec = write_spec(tmp_path, api={"base_url": "mock://"},
                          batch_api={"kind": "openai", "base_url": batches.base_url, "api_key_env": "BATCH_KEY"})
        status = operators.BatchrunOperator(task_id="submit", job=str(spec), submit=True).execute({})
        assert (status["state"], status["remaining"], len(status["batches"])) == ("submitted", 12, 1)
        assert len(batches.created) == 1 and len(batches.created[0].custom_ids) == 12
    live = write_spec(tmp_path, name="live.yaml", api={"base_url": "mock://"})
    with pytest.raises(ConfigError, match="submit=True sends a job's rows to the provider's batch API"):
        operators.BatchrunOperator(task_id="submit", job=str(live), submit=True).execute({})
