"""The library entry point, in-process, over httpx.MockTransport and mock://."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sqlite3
from pathlib import Path

import anyio
import httpx
import pyarrow.parquet as pq
import pytest

from batchrun import (
    ConfigError,
    InputError,
    JobFatalAPIError,
    LogProgress,
    StateMismatchError,
    StorageError,
    Summary,
    run_job,
)
from batchrun.storage.output import OutputWriter
from batchrun.storage.state import StateStore, state_path
from tests.conftest import assert_key_nowhere, read_output, write_jsonl, write_spec


def answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={
        "id": "r-" + body["prompt"], "model": body["model"],
        "choices": [{"index": 0, "text": body["prompt"].upper(), "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    })


def test_run_job_returns_the_summary(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})

    assert isinstance(summary, Summary)
    assert (summary.rows, summary.ok, summary.failed, summary.remaining, summary.exit_code) == (5, 5, 0, 0, 0)
    assert (summary.total_tokens, summary.requests, summary.output_written) == (25, 5, True)
    assert [r["output_text"] for r in read_output(summary.output)] == ["P0", "P1", "P2", "P3", "P4"]

    again = run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})
    assert (again.requests, again.ok) == (0, 5)


def test_the_embedded_mock_endpoint_needs_no_key(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"messages": [{"role": "user", "content": "hello there"}]},
                                           {"prompt": "one two three", "max_tokens": 2}])
    spec = write_spec(tmp_path, params={"stream": True}, api={"base_url": "mock://"})

    summary = run_job(spec, environ={})

    assert summary.exit_code == 0
    rows = read_output(summary.output)
    assert rows[0]["output_text"] == "(mock answer) You asked: hello there"
    assert rows[1]["output_text"] == "(mock answer)"
    assert rows[1]["completion_tokens"] == 2 and rows[1]["total_tokens"] == 5


def test_a_job_fatal_error_raises_with_the_summary_and_sends_one_request(tmp_path: Path) -> None:
    seen = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(403, json={"error": {"message": "model not allowed"}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(100)])
    spec = write_spec(tmp_path, concurrency=50, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(JobFatalAPIError) as info:
        run_job(spec, transport=httpx.MockTransport(refuse), environ={"OPENAI_API_KEY": "k"})

    assert len(seen) == 1  # the first request goes alone
    summary = info.value.summary
    assert (summary.ok, summary.remaining, summary.exit_code, summary.output_written) == (0, 100, 3, False)
    assert "; 1 request in " in summary.line()
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_missing_key_is_named_before_any_state_exists(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "FIREWORKS_API_KEY"})
    with pytest.raises(ConfigError, match="FIREWORKS_API_KEY is not set"):
        run_job(spec, environ={})
    assert not state_path(tmp_path / "out" / "result.parquet").exists()


def test_an_unwritable_output_folder_is_a_config_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    (tmp_path / "blocker").write_text("a file, not a folder")
    spec = write_spec(tmp_path, output="blocker/out.parquet", api={"base_url": "mock://"})
    with pytest.raises(ConfigError, match="cannot create the output folder"):
        run_job(spec)


def test_log_progress_prints_a_line_every_few_seconds() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = LogProgress(stream, every_s=5, clock=lambda: now[0])
    progress.start(total=100, settled=10)
    progress.advance(20, 0, 500)
    now[0] = 6.0
    progress.advance(9, 1, 100)
    assert stream.getvalue() == "batchrun: 40/100 rows (40.0%), 5.0 rows/s, 600 tokens, 1 failed\n"


def test_every_row_failing_alike_stops_the_job(tmp_path: Path) -> None:
    seen = []

    def bad_param(request: httpx.Request) -> httpx.Response:  # (a 404 would stop it at the first row)
        seen.append(request)
        return httpx.Response(400, json={"error": {"message": "Unrecognized request argument: tempreature"}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(1000)])
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(JobFatalAPIError, match="50 rows in a row failed with the same error: HTTP 400: "
                                               "Unrecognized request argument") as caught:
        run_job(spec, transport=httpx.MockTransport(bad_param), environ={"OPENAI_API_KEY": "k"})

    assert 50 <= len(seen) <= 50 + 8
    # The way on: fixed params are another configuration (the same command would be refused)
    assert "fix it and rerun with --restart" in str(caught.value) and caught.value.rerun_resumes is False


def test_answers_in_flight_when_the_job_stops_are_saved(tmp_path: Path) -> None:
    seen = []

    async def slow_then_forbidden(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if json.loads(request.content)["prompt"] == "p20":
            return httpx.Response(403, json={"error": {"message": "model not allowed"}})
        await anyio.sleep(0.05)
        return answer(request)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(200)])
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(JobFatalAPIError) as info:
        run_job(spec, transport=httpx.MockTransport(slow_then_forbidden), environ={"OPENAI_API_KEY": "k"})

    assert info.value.summary.ok == len(seen) - 1  # every 200 received was kept


def test_a_first_row_without_any_answer_stops_the_job_after_its_retries(tmp_path: Path) -> None:
    seen = []

    def down(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(JobFatalAPIError, match="the first row got no answer in 6 attempts .*check api.base_url and"):
        run_job(spec, transport=httpx.MockTransport(down), environ={"OPENAI_API_KEY": "k"})
    assert len(seen) == 6


def test_a_first_row_refused_with_500s_names_the_key_among_the_suspects(tmp_path: Path) -> None:
    """A proxy's auth hook that raises answers a wrong key with a 500 (LiteLLM, measured)."""
    def refusing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="Internal Server Error")

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})

    advice = r"\(HTTP 500: Internal Server Error\); check api.base_url, the API key and"
    with pytest.raises(JobFatalAPIError, match=advice) as caught:
        run_job(spec, transport=httpx.MockTransport(refusing), environ={"OPENAI_API_KEY": "k"})
    # A server may answer a request it cannot take with a 500 (llama.cpp's, for a response_format)
    assert "if the server's words say it cannot take the request, change the spec" in str(caught.value)


def test_a_key_read_from_a_file_is_stripped_and_a_mangled_one_refused(tmp_path: Path) -> None:
    keys = []

    def record(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["authorization"])
        return answer(request)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})
    run_job(spec, transport=httpx.MockTransport(record), environ={"OPENAI_API_KEY": "fw_abcdefgh\n"})
    assert keys == ["Bearer fw_abcdefgh"]

    with pytest.raises(ConfigError) as info:
        run_job(spec, restart=True, environ={"OPENAI_API_KEY": '"fw_abc defgh"'})
    assert "OPENAI_API_KEY holds characters an API key cannot have" in str(info.value)
    assert "abc" not in str(info.value)


def test_passthrough_columns_keep_input_order_after_a_resume(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}", "zeta": i, "alpha": "a"} for i in range(4)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    run_job(spec, limit=2)
    summary = run_job(spec)
    assert pq.read_schema(summary.output).names[-2:] == ["zeta", "alpha"]
    assert [r["zeta"] for r in read_output(summary.output)] == [0, 1, 2, 3]


def test_answers_from_another_server_are_never_mixed_in(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    run_job(write_spec(tmp_path, api={"base_url": "mock://"}), limit=2)
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})
    with pytest.raises(StateMismatchError, match='base_url was "mock://", now "http://127.0.0.1:9/v1"'):
        run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})


def test_signal_handlers_are_given_back_after_the_pool(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run_job(write_spec(tmp_path, api={"base_url": "mock://"}), handle_signals=True)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


class _FullDisk:
    """A SQLite connection whose writes fail once `after` groups were saved."""

    def __init__(self, db, after: int) -> None:
        self.db, self.after = db, after

    def executemany(self, *args):
        if self.after == 0:
            raise sqlite3.OperationalError("database or disk is full")
        self.after -= 1
        return self.db.executemany(*args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_full_disk_stops_the_job_and_a_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(300)])
    spec = write_spec(tmp_path, concurrency=4, api={"base_url": "http://127.0.0.1:9/v1"})
    real_open = StateStore.open

    def failing_open(*args, **kwargs):
        store = real_open(*args, **kwargs)
        store._db = _FullDisk(store._db, after=3)
        return store

    monkeypatch.setattr(StateStore, "open", failing_open)
    with pytest.raises(StorageError, match="the disk is full.*rerun to resume") as info:
        run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})
    saved = info.value.summary.ok
    assert 0 < saved < 300 and info.value.summary.exit_code == 3

    monkeypatch.setattr(StateStore, "open", real_open)
    seen = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    summary = run_job(spec, transport=httpx.MockTransport(record), environ={"OPENAI_API_KEY": "k"})
    assert summary.ok == 300 and len(seen) == 300 - saved


def test_the_key_reaches_no_log_even_at_debug_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-live-abcdefghijklmnop"

    def echo_key(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": f"bad key {request.headers['authorization']}"}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})
    with caplog.at_level(logging.DEBUG), pytest.raises(JobFatalAPIError) as info:
        run_job(spec, transport=httpx.MockTransport(echo_key), environ={"OPENAI_API_KEY": key})
    assert "bad key Bearer [redacted]" in str(info.value)
    assert_key_nowhere(tmp_path, caplog.text, str(info.value), info.value.summary.line(), key=key)


def test_restart_with_a_bad_input_keeps_the_progress_it_would_discard(tmp_path: Path) -> None:
    good = [{"prompt": f"p{i}"} for i in range(4)]
    write_jsonl(tmp_path / "input.jsonl", good)
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    run_job(spec, limit=2)
    write_jsonl(tmp_path / "input.jsonl", ['{"prompt": "p0"}', "{broken"])

    with pytest.raises(InputError, match="line 2"):
        run_job(spec, restart=True)

    write_jsonl(tmp_path / "input.jsonl", good)
    summary = run_job(spec)
    assert (summary.ok, summary.requests) == (4, 2)  # the first two were kept


def test_the_output_is_written_as_rows_settle_and_published_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchrun.storage.output.ROW_GROUP_ROWS", 10)
    rows = [{"prompt": f"p{i}", "tag": f"t{i}", "n_words": i} for i in range(95)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".result.parquet.99999.tmp"
    stale.write_bytes(b"left by a run killed while writing")
    spec = write_spec(tmp_path, concurrency=3, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})

    out = read_output(summary.output)
    assert [(r["row_index"], r["output_text"], r["tag"], r["n_words"]) for r in out] == [
        (i, f"P{i}", f"t{i}", i) for i in range(95)
    ]
    assert pq.ParquetFile(summary.output).num_row_groups > 2  # appended during the run
    assert not stale.exists() and list((tmp_path / "out").glob(".*.tmp")) == []


def test_an_output_folder_that_refuses_the_final_rename_is_exit_3_and_a_rerun_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})
    real_replace = os.replace

    def read_only(source: object, target: object) -> None:  # the output's folder, made read-only
        if str(target).endswith("result.parquet"):
            raise PermissionError(13, "Permission denied", str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(StorageError, match="result.parquet: cannot write the output: Permission denied; every "
                                           "answer is saved") as info:
        run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})
    assert (info.value.summary.ok, info.value.summary.exit_code, info.value.summary.output_written) == (30, 3, False)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".tmp"] == []

    monkeypatch.setattr(os, "replace", real_replace)
    summary = run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})
    assert (summary.requests, summary.ok, summary.output_written) == (0, 30, True)


@pytest.mark.slow
def test_answers_arriving_after_an_output_failure_are_still_saved(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    async def slow(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await anyio.sleep(0.02)
        return answer(request)

    def full(self: OutputWriter, stop: int) -> None:
        raise StorageError("out of space for the output (injected)")

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(20_000)])
    spec = write_spec(tmp_path, concurrency=64, api={"base_url": "http://127.0.0.1:9/v1"})
    monkeypatch.setattr(OutputWriter, "write", full)  # the first row group (8,192 rows) fails

    with pytest.raises(StorageError, match="injected") as info:
        run_job(spec, transport=httpx.MockTransport(slow), environ={"OPENAI_API_KEY": "k"})

    assert 8192 <= info.value.summary.ok == len(seen) < 20_000  # every answer received was saved


@pytest.mark.slow
def test_an_exception_raised_into_the_caller_saves_every_answer_received_first(tmp_path: Path) -> None:
    """As Airflow's execution_timeout does: a SIGALRM handler raises inside run_job."""
    import signal

    from batchrun.engine.call import Caller
    from tests.fakeserver import FakeServer, Faults

    class TaskTimeout(Exception):
        pass

    def timeout(signum: int, frame: object) -> None:
        raise TaskTimeout("execution_timeout")

    received: list[int] = []
    call = Caller.call

    async def counting(self, row, **options):  # type: ignore[no-untyped-def]
        result = await call(self, row, **options)
        received.append(result.row_index)
        return result

    with FakeServer(Faults(latency_s=0.05, latency_jitter_s=0.04)) as server, \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(Caller, "call", counting)
        write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(3000)])
        spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})
        previous = signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            with pytest.raises(TaskTimeout):
                run_job(spec, environ={"OPENAI_API_KEY": "k"})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

        store = StateStore.open(tmp_path / "out" / "result.batchrun.sqlite", lock=False)
        saved = {row[0] for row in store.results(0, 3000)}
        store.close()
        assert 0 < len(received) < 3000
        assert set(received) <= saved  # every answer received was saved before the exception left
        status = json.loads((tmp_path / "out" / "result.status.json").read_text())
        assert (status["state"], status["exit_code"]) == ("stopped", 3)  # not left "running"
        assert status["reason"] == "stopped by TaskTimeout in the calling thread"
        assert status["ok"] == len(saved)
        summary = run_job(spec, environ={"OPENAI_API_KEY": "k"})  # and the job resumes
        assert summary.ok == 3000
    assert sum(len(a) for a in server.answers.values()) <= 3000 + 32


def test_latency_is_the_time_on_the_wire_not_the_wait_at_the_gate(tmp_path: Path) -> None:
    # The server holds one request at a time and says so: the others wait at batchrun's
    # gate. Their wire times never overlap, so they add up to no more than the run took.
    async def one_at_a_time(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.05)
        body = json.loads(request.content)
        return httpx.Response(200, headers={"x-ratelimit-api_key-limit-max_parallel_requests": "1"}, json={
            "id": "r", "model": "m", "choices": [{"index": 0, "text": body["prompt"], "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(one_at_a_time), environ={"OPENAI_API_KEY": "k"})

    latencies = [r["latency_s"] for r in read_output(summary.output)]
    assert all(latency >= 0.05 for latency in latencies)
    assert sum(latencies) <= summary.elapsed_s


def test_a_key_echoed_inside_an_answer_reaches_no_file(tmp_path: Path) -> None:
    key = "sk-live-abcdefghijklmnop"

    def echo_key(request: httpx.Request) -> httpx.Response:
        said = request.headers["authorization"].removeprefix("Bearer ")
        choices = [{"index": i, "finish_reason": "stop", "message": {
            "role": "assistant", "content": f"choice {i}: your key is {said}.", "reasoning_content": f"it is {said}",
            "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": f'{{"k": "{said}"}}'}}],
        }} for i in range(2)]
        return httpx.Response(200, json={"id": "r", "model": "m", "choices": choices,
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    write_jsonl(tmp_path / "input.jsonl", [{"messages": [{"role": "user", "content": "what is my key?"}]}])
    spec = write_spec(tmp_path, params={"n": 2}, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(echo_key), environ={"OPENAI_API_KEY": key})

    [row] = read_output(summary.output)
    assert row["output_text"] == "choice 0: your key is [redacted]."
    assert row["choices"][1]["text"] == "choice 1: your key is [redacted]."
    assert "[redacted]" in row["reasoning_content"] and "[redacted]" in row["tool_calls"]
    assert_key_nowhere(tmp_path, key=key)


def test_a_state_sqlite_cannot_read_mid_run_stops_the_job_without_an_exception_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(50)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})

    def malformed(self, start: int, stop: int):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(StateStore, "results", malformed)  # as a state with garbage appended may read
    with pytest.raises(StorageError, match="database disk image is malformed"):
        run_job(spec, environ={})


def test_a_bug_in_a_task_of_the_pool_reaches_the_caller_as_itself(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(OutputWriter, "write", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):  # not an ExceptionGroup around it
        run_job(spec, environ={})


def test_a_server_that_refuses_every_request_after_the_first_stops_the_job_and_a_rerun_resumes(
        tmp_path: Path) -> None:
    from batchrun import Stalled

    def refuse_after_the_first(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["prompt"] == "p0":
            return answer(request)
        return httpx.Response(429, headers={"retry-after": "5"}, json={"error": {"message": "slow down"}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    spec = write_spec(tmp_path, concurrency=4, retry={"max_stall_s": 3, "backoff_initial_s": 0.01},
                      api={"base_url": "http://127.0.0.1:9/v1"})
    env = {"OPENAI_API_KEY": "k"}

    with pytest.raises(Stalled, match="no row was settled in 3 s.*raise retry.max_stall_s") as info:
        run_job(spec, transport=httpx.MockTransport(refuse_after_the_first), environ=env)
    assert info.value.exit_code == 3 and info.value.summary.ok == 1

    again = run_job(spec, transport=httpx.MockTransport(answer), environ=env)
    assert (again.ok, again.requests) == (20, 19)


def test_a_restart_moves_the_previous_output_aside_at_once(tmp_path: Path) -> None:
    from batchrun import job_status, load_spec
    from batchrun.tools.export import export_job

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(60)])
    spec = write_spec(tmp_path, api={"base_url": "http://127.0.0.1:9/v1"})
    env = {"OPENAI_API_KEY": "k"}
    first = run_job(spec, transport=httpx.MockTransport(answer), environ=env)
    assert first.output_written and len(read_output(first.output)) == 60
    sent = []

    def refused_after_five(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer(request) if len(sent) <= 5 else httpx.Response(401, json={"error": {"message": "no"}})

    with pytest.raises(JobFatalAPIError) as info:
        run_job(spec, restart=True, transport=httpx.MockTransport(refused_after_five), environ=env)

    aside = tmp_path / "out/result.parquet.before-restart"
    assert not first.output.exists() and len(read_output(aside)) == 60
    assert f"the output before --restart was moved to {aside}" in info.value.summary.line()
    status = job_status(load_spec(spec))
    assert (status["state"], status["ok"]) == ("stopped", 5)
    with pytest.raises(ConfigError, match="no output yet"):
        export_job(spec, "openai-batch", tmp_path / "export.jsonl")


def test_grace_s_bounds_how_long_requests_in_flight_may_finish_after_a_stop(tmp_path: Path) -> None:
    """A scheduler that kills 5 s after its SIGTERM (Airflow) asks for less than the 10 s grace."""
    import time

    class Stop(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stop

    async def first_then_hang(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["prompt"] != "p0":
            await anyio.sleep(3600)
        return answer(request)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    spec = write_spec(tmp_path, concurrency=4, api={"base_url": "http://127.0.0.1:9/v1"})
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    began = time.monotonic()
    try:
        with pytest.raises(Stop):
            run_job(spec, transport=httpx.MockTransport(first_then_hang), environ={"OPENAI_API_KEY": "k"},
                    grace_s=0.2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - began < 5  # 0.5 s, then 0.2 s of grace; the default would wait 10 s
    store = StateStore.open(state_path(tmp_path / "out/result.parquet"))
    assert store.row_states(20).count(1) == 1  # the one answer received is saved
    store.close()


def test_a_row_never_gets_more_than_max_attempts_failures_however_often_it_is_set_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchrun.http import client as _client

    monkeypatch.setattr(_client, "PARK_S", 0.01)  # every wait is long enough to set a row aside
    seen: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        seen[prompt] = seen.get(prompt, 0) + 1
        if prompt == "p1":  # always a 500: retried after a backoff, never set aside for it
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if prompt == "p2":  # two 429s naming a wait (set aside), then only 500s
            if seen[prompt] <= 2:
                return httpx.Response(429, headers={"retry-after": "0.05"}, json={"error": {"message": "wait"}})
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return answer(request)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(30)])
    spec = write_spec(tmp_path, concurrency=4, retry={"max_attempts": 6, "backoff_initial_s": 0.02,
                                                      "backoff_max_s": 0.05}, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(handler), environ={"OPENAI_API_KEY": "k"})

    assert summary.failed == 2
    assert seen["p1"] == 6  # max_attempts
    assert seen["p2"] == 2 + 6  # the 429s are no spent attempt; six failures are
    rows = read_output(summary.output)
    assert (rows[1]["attempts"], rows[2]["attempts"]) == (6, 8)
