"""The batch backend end to end: a job through the fake of OpenAI's Files + Batches API
(tests/fakebatch.py), what it does not answer through the fake live API, every row
stored exactly once."""

from __future__ import annotations

import json
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchrun import run_job
from tests.conftest import TEST_KEY, cli_env, kill_9, read_output, run_cli, start_cli, write_jsonl, write_spec
from tests.fakebatch import BatchFaults, FakeBatchAPI
from tests.fakeserver import FakeServer, Faults

pytestmark = pytest.mark.slow  # servers on 127.0.0.1

ENV = {"OPENAI_API_KEY": TEST_KEY}
PRICES = {"test-model": {"input": 1.0, "output": 2.0}}


@pytest.fixture
def live() -> Iterator[FakeServer]:
    with FakeServer(Faults()) as s:
        yield s


@pytest.fixture
def batches() -> Iterator[FakeBatchAPI]:
    with FakeBatchAPI(BatchFaults(seed=7), polls_to_finish=2, api_key=TEST_KEY) as f:
        yield f


def job(tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, rows: int, **spec: object) -> Path:
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(rows)))
    batch = {"kind": "openai", "base_url": batches.base_url, "poll_interval_s": 0.01, **spec.pop("batch", {})}
    api = {"base_url": live.base_url, **spec.pop("api", {})}
    return write_spec(tmp_path, api=api, pricing=PRICES, batch_api=batch, **spec)


def test_expired_rows_go_live_refused_rows_fail_and_every_row_is_stored_once(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=11, expire_share=0.10, refuse_share=0.02)
    spec = job(tmp_path, live, batches, 2000, batch={"rows_per_batch": 700})
    summary = run_job(spec, environ=ENV)
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(2000)) and [r["id"] for r in out][:3] == ["r0", "r1", "r2"]
    assert len(batches.created) == 3 and batches.custom_ids_in_two_batches() == set()
    by_path = Counter((r["backend"], r["status"]) for r in out)
    refused = [r for r in out if r["status"] == "failed"]
    assert refused and all("the batch refused it: HTTP 400" in r["error"] for r in refused)
    assert all(r["backend"] == "batch" for r in refused)
    went_live = {r["row_index"] for r in out if r["backend"] == "live"}
    assert by_path[("live", "ok")] == len(went_live) > 100  # about 10 % expired
    assert len(live.requests) == len(went_live)  # nothing paid twice: only those went live
    assert summary.ok == by_path[("batch", "ok")] + len(went_live) and summary.failed == len(refused)
    for row in out:
        if row["status"] == "ok":
            rate = 0.5 if row["backend"] == "batch" else 1.0
            expected = (row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0) * 1e-6 * rate
            assert row["cost_usd"] == pytest.approx(expected), row


def test_submit_returns_at_once_status_lists_the_batches_and_run_collects_them(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None  # nothing moves until the test says so
    spec = job(tmp_path, live, batches, 300, batch={"rows_per_batch": 200})
    submitted = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert submitted.code == 0, submitted.stderr
    assert "300 in the provider's batches" in submitted.stdout
    assert [len(c.custom_ids) for c in batches.created] == [200, 100] and not live.requests
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and status["remaining"] == 300
    assert [(b["id"], b["state"]) for b in status["batches"]] == [(c.batch_id, "validating") for c in batches.created]
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0  # again: nothing new is sent
    assert len(batches.created) == 2
    batches.finish()
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["ok"] * 300 and {r["backend"] for r in out} == {"batch"}
    assert not live.requests and len(batches.created) == 2 and batches.custom_ids_in_two_batches() == set()
    assert "300 answered by the provider's batches, 0 requests" in done.stdout
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "finished" and "batches" not in status and status["from_batches"] == 300


def test_a_live_run_of_a_job_with_rows_out_is_refused_before_any_request(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    text = spec.read_text()
    spec.write_text(text[:text.index("batch_api:")])  # the section dropped
    refused = run_cli("run", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "20 rows of" in refused.stderr and "in the provider's batches" in refused.stderr
    assert not live.requests


def test_fallback_none_leaves_what_the_batch_did_not_answer_failed_and_retry_failed_sends_it_again(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=3, expire_share=0.2)
    spec = job(tmp_path, live, batches, 100, batch={"fallback": "none"})
    first = run_cli("run", str(spec), env=cli_env(**ENV))
    assert first.code == 1, first.stderr
    out = read_output(tmp_path / "out/result.parquet")
    expired = [r for r in out if r["status"] == "failed"]
    assert 5 < len(expired) < 40 and not live.requests
    assert all("the batch did not answer it (expired)" in r["error"] and "batch_expired" in r["error"] for r in expired)
    batches.faults = BatchFaults(seed=4)
    again = run_cli("run", str(spec), "--retry-failed", env=cli_env(**ENV))
    assert again.code == 0, again.stderr
    assert sorted(int(c.split("-")[1]) for c in batches.created[1].custom_ids) == sorted(r["row_index"] for r in expired)
    assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * 100


def test_ten_kill_9s_across_submit_poll_and_collect_send_no_row_twice_and_lose_no_answer(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=21, expire_share=0.05, refuse_share=0.02)
    batches.polls_to_finish = 3
    spec = job(tmp_path, live, batches, 1000, batch={"rows_per_batch": 100})
    rng = random.Random(20)
    kills = 0
    created: list[int] = []  # batches created at each kill
    while kills < 10:
        target = batches.calls + rng.randint(1, 6)  # a moment: after that many more calls of the batch API
        command = ("submit",) if kills % 3 == 0 else ("run", "--no-progress")
        proc = start_cli(*command, str(spec), env=cli_env(**ENV))
        while not batches.wait_for_calls(target, timeout=0.05) and proc.poll() is None:
            pass
        assert proc.poll() is None, f"the job ended before kill {kills + 1}: {proc.communicate()}"
        kill_9(proc)
        kills += 1
        created.append(len(batches.created))
    # The kills fell while sending (some batches created, not all) and while polling and collecting
    assert any(0 < n < 10 for n in created) and created.count(10) >= 3, created
    done = run_cli("run", str(spec), "--no-progress", env=cli_env(**ENV))
    assert done.code == 1, done.stderr  # the refused rows failed
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(1000))
    assert batches.custom_ids_in_two_batches() == set()
    # Every answer a batch gave is the row's, and no row it answered was sent live
    answered = {}
    for batch in batches.batches.values():
        if batch.obj.get("output_file_id"):
            for line in batches.content(batch.obj["output_file_id"]):
                answered[int(line["custom_id"].rsplit("-", 1)[1])] = line["response"]["body"]["id"]
    assert len(answered) > 800
    for index, response_id in answered.items():
        assert (out[index]["backend"], out[index]["response_id"]) == ("batch", response_id), out[index]
    sent_live = [int(r.body["prompt"].split()[-1]) for r in live.requests]
    assert len(sent_live) == len(set(sent_live)) and not set(sent_live) & set(answered)
    assert {r["row_index"] for r in out if r["backend"] == "live"} == set(sent_live)
    assert all(r["status"] == "ok" for r in out if r["backend"] == "live")


def test_the_budget_holds_each_batch_at_its_worst_case_before_its_upload(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 400, batch={"rows_per_batch": 100}, params={"max_tokens": 10},
               budget={"max_usd": 0.03})
    stopped = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert stopped.code == 3 and "the budget is reached" in stopped.stderr, stopped.stderr
    assert "a batch cannot be stopped once sent, so it was not sent" in stopped.stderr
    sent = len(batches.created)
    assert 1 <= sent < 4 and len(batches.uploads) == sent  # the one that did not fit was not even uploaded
    # Each sent batch's worst case: its bytes as prompt tokens, 10 completion tokens a row, at half price
    worst = sum((len(line.encode()) + 1 + 10) * 0.5e-6 for upload in batches.uploads for line in upload.lines)
    assert worst <= 0.03 < worst * (sent + 1) / sent  # (the batches are alike)
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and len(status["batches"]) == sent and not status["lost_requests"]


@pytest.mark.parametrize("endpoint,params,rows,check", [
    ("chat", {"n": 2, "logprobs": True, "top_logprobs": 2}, [{"prompt": "q"}],
     lambda r: len(r["choices"]) == 2 and r["logprobs"] and r["output_text"]),
    ("completions", {"max_tokens": 8}, [{"prompt": "q"}], lambda r: r["output_text"]),
    ("responses", {}, [{"input": "q"}], lambda r: r["output_text"]),
    ("embeddings", {}, [{"input": "q"}], lambda r: len(r["embedding"]) > 2 and r["prompt_tokens"]),
])
def test_each_endpoint_through_the_batch_api_fills_the_same_columns_as_live(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, endpoint: str, params: dict, rows: list,
        check: object) -> None:
    spec = job(tmp_path, live, batches, 0, endpoint=endpoint, params=params)
    write_jsonl(tmp_path / "input.jsonl", [{**rows[0], "id": f"r{i}"} for i in range(30)])
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["backend"] for r in out] == ["batch"] * 30 and not live.requests
    assert all(check(r) for r in out), out[0]  # type: ignore[operator]
    assert {c.endpoint for c in batches.created} == {f"/v1/{endpoint}" if endpoint != "chat" else
                                                     "/v1/chat/completions"}


def test_an_answer_that_breaks_the_schema_is_asked_again_live(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches._answers.faults = Faults(invalid_answer_rate=0.5, seed=2)  # the batch's answers, half broken
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    spec = job(tmp_path, live, batches, 40, schema=schema)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    assert all(r["status"] == "ok" and set(r["parsed"]) == {"answer"} for r in out), out[0]
    went_live = [r["row_index"] for r in out if r["backend"] == "live"]
    assert 5 < len(went_live) < 35 and len(live.requests) == len(went_live)


def test_the_response_cache_answers_rows_before_any_batch_and_keeps_what_the_batches_answer(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    spec = job(tmp_path, live, batches, 30, cache="cache.sqlite", params={"temperature": 0})
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    first = read_output(tmp_path / "out/result.parquet")
    assert {(r["backend"], r["cached"]) for r in first} == {("batch", False)} and len(batches.created) == 1
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(40)))
    assert run_cli("run", str(spec), "--restart", env=cli_env(**ENV)).code == 0
    again = read_output(tmp_path / "out/result.parquet")
    assert [(r["cached"], r["backend"]) for r in again] == [(True, None)] * 30 + [(False, "batch")] * 10
    assert [r["output_text"] for r in again[:30]] == [r["output_text"] for r in first]
    assert all(r["cost_usd"] == 0 for r in again[:30]) and all(r["cost_usd"] > 0 for r in again[30:])
    # only the ten new rows went to a batch
    assert len(batches.created) == 2 and len(batches.created[1].custom_ids) == 10 and not live.requests


def test_an_upload_refused_for_good_names_the_fix_and_leaves_its_rows_free_for_the_rerun(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = batches.upload
    monkeypatch.setattr(batches, "upload", lambda *a: (413, {"error": {"message": "File is too large.",
                                                                      "type": "invalid_request_error"}}))
    spec = job(tmp_path, live, batches, 50)
    refused = run_cli("run", str(spec), env=cli_env(**ENV))
    assert refused.code == 2, refused.stderr
    assert "HTTP 413: File is too large." in refused.stderr and "batch_api.rows_per_batch" in refused.stderr
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "not started" and not live.requests  # nothing began: no state to --restart
    monkeypatch.setattr(batches, "upload", upload)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 50


def test_a_batch_that_fails_whole_is_answered_live_and_a_refused_key_stops_the_job(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=1, fail_batches=1)
    spec = job(tmp_path, live, batches, 60, batch={"rows_per_batch": 40})
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["backend"] for r in out] == ["live"] * 40 + ["batch"] * 20 and len(live.requests) == 40
    wrong = run_cli("submit", str(spec), "--restart", env=cli_env(OPENAI_API_KEY="sk-wrong-0123456789abcdef"))
    assert wrong.code == 3 and "the batch API refused the key (HTTP 401" in wrong.stderr, wrong.stderr
    assert "sk-wrong" not in wrong.stderr + wrong.stdout


def test_sigterm_while_waiting_for_the_batches_stops_at_once_and_leaves_them_out(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None  # the batch never ends by itself
    spec = job(tmp_path, live, batches, 50, batch={"poll_interval_s": 30})
    proc = start_cli("run", "--no-progress", str(spec), env=cli_env(**ENV))
    assert batches.wait_for_calls(3, timeout=60)  # upload, create, a first poll: it waits now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)  # not the 30 s of its next poll
    assert proc.returncode == 3 and "stopped by SIGTERM" in stderr, stderr
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and [b["id"] for b in status["batches"]] == [batches.created[0].batch_id]
    batches.finish()
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0 and len(batches.created) == 1


def test_submit_again_collects_what_ended_and_leaves_what_the_batch_did_not_answer_to_run(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=5, expire_share=0.2)
    batches.polls_to_finish = 1
    spec = job(tmp_path, live, batches, 100)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    again = run_cli("submit", str(spec), env=cli_env(**ENV))  # its poll ends the batch: collected
    assert again.code == 0, again.stderr
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    expired = status["remaining"]
    assert 5 < expired < 40 and f"{expired} they did not answer, to answer live" in again.stdout
    assert status["state"] == "stopped" and "`batchrun run` finishes the job" in status["reason"]
    assert len(batches.created) == 1 and not live.requests
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert len(live.requests) == expired and len(batches.created) == 1


def test_hostile_output_files_cost_no_memory_and_no_double_count(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, api={"max_answer_mb": 1})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    batches.finish()
    [batch] = batches.batches.values()
    stored = batches.files[batch.obj["output_file_id"]]
    lines = stored["data"].splitlines(keepends=True)
    first = json.loads(lines[0])
    giant = dict(first, response={"status_code": 200, "body": {"padding": "x" * (3 << 20)}})
    other_job = dict(first, custom_id="ffffffffffffffff-3")
    # row of lines[0]: a 3 MB line, then its own answer again; lines[1] twice; a line of another job
    stored["data"] = b"".join([json.dumps(giant).encode() + b"\n", *lines, lines[1], lines[0],
                               json.dumps(other_job).encode() + b"\n"])
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    twice = int(json.loads(lines[1])["custom_id"].rsplit("-", 1)[1])
    body = json.loads(lines[1])["response"]["body"]
    assert (out[twice]["response_id"], out[twice]["total_tokens"]) == (body["id"], body["usage"]["total_tokens"])
    assert [r["backend"] for r in out] == ["batch"] * 20 and not live.requests  # the giant line was passed over


def test_a_create_whose_answer_was_lost_is_not_made_twice(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    create = batches.create_batch
    lost = iter([True])

    def made_then_500(body: dict) -> tuple[int, dict]:
        status, made = create(body)
        return (500, {"error": {"message": "upstream timed out"}}) if next(lost, False) else (status, made)

    monkeypatch.setattr(batches, "create_batch", made_then_500)
    spec = job(tmp_path, live, batches, 30)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert len(batches.created) == 1 and batches.custom_ids_in_two_batches() == set()
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 30


def test_a_batch_a_proxy_made_twice_is_cancelled_and_its_rows_answered_once(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    batches.polls_to_finish = None
    create = batches.create_batch
    monkeypatch.setattr(batches, "create_batch", lambda body: (create(body), create(body))[1])  # its own retry
    spec = job(tmp_path, live, batches, 30)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    first, second = batches.created
    recorded = json.loads(run_cli("status", str(spec), "--json").stdout)["batches"]
    assert [b["id"] for b in recorded] == [second.batch_id]
    assert batches.batch(first.batch_id).obj["status"] == "cancelling"  # the one the state does not know
    batches.finish()
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    answers = {line["response"]["body"]["id"] for line in batches.content(batches.batch(second.batch_id)
                                                                          .obj["output_file_id"])}
    assert {r["response_id"] for r in out} == answers and not live.requests


def test_a_file_the_provider_no_longer_has_is_uploaded_again(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    create = batches.create_batch
    monkeypatch.setattr(batches, "create_batch", lambda body: (503, {"error": {"message": "overloaded"}}))
    spec = job(tmp_path, live, batches, 30)
    stopped = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert stopped.code == 3 and "still fails after 8 attempts" in stopped.stderr, stopped.stderr
    [upload] = batches.uploads
    del batches.files[upload.file_id]  # expired, or deleted by someone
    monkeypatch.setattr(batches, "create_batch", create)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert len(batches.uploads) == 2 and len(batches.created) == 1
    assert batches.created[0].input_file_id == batches.uploads[1].file_id
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 30


def test_a_batch_stuck_past_max_wait_is_cancelled_and_its_rows_fail_with_the_reason(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    batches.polls_to_finish = None  # stuck in validation, until cancelled: then the next poll ends it
    retrieve = batches.retrieve_batch

    def ends_once_cancelled(batch_id: str) -> dict:
        if batches.batch(batch_id).obj["status"] == "cancelling":
            batches.advance(batch_id)
        return retrieve(batch_id)

    monkeypatch.setattr(batches, "retrieve_batch", ends_once_cancelled)
    spec = job(tmp_path, live, batches, 10, batch={"max_wait_h": 0.001, "poll_interval_s": 0.5, "fallback": "none"})
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 1
    out = read_output(tmp_path / "out/result.parquet")
    assert batches.batch(batches.created[0].batch_id).obj["status"] == "cancelled"
    assert all(r["status"] == "failed" and "cancelled by batchrun past batch_api.max_wait_h (0.001 h)" in r["error"]
               for r in out), out[0]["error"]


def test_run_with_the_batch_api_flag_sends_a_spec_without_the_section_through_the_batch_api(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = 1  # done at the first poll: no wait of the default poll_interval_s
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(12)))
    spec = write_spec(tmp_path, api={"base_url": batches.base_url})  # batch_api.base_url: api.base_url's
    text = spec.read_text()
    done = run_cli("run", str(spec), "--batch-api", env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 12
    assert len(batches.created) == 1 and spec.read_text() == text


def test_restart_cancels_the_batches_it_discards_and_a_live_restart_is_refused_while_they_are_out(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    text = spec.read_text()
    spec.write_text(text[:text.index("batch_api:")])  # the section dropped: a live restart
    refused = run_cli("run", "--restart", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "1 batch of" in refused.stderr and "its --restart cancels them" in refused.stderr
    assert not live.requests
    spec.write_text(text)
    assert run_cli("submit", "--restart", str(spec), env=cli_env(**ENV)).code == 0
    old, new = batches.created
    assert batches.batch(old.batch_id).obj["status"] == "cancelling" and old.custom_ids == new.custom_ids
    assert batches.batch(new.batch_id).obj["status"] == "validating"
