"""The batch backend end to end: a job through the fake of OpenAI's Files + Batches API
(tests/fakebatch.py), what it does not answer through the fake live API, every row
stored exactly once."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from batchrun import JobAborted, run_job
from batchrun.backends.batch import remote
from batchrun.backends.batch.remote import ATTEMPTS
from tests.batchjob import ENV, job
from tests.conftest import cli_env, read_output, run_cli, write_jsonl, write_spec
from tests.fakebatch import BatchFaults, FakeBatchAPI
from tests.fakeserver import FakeServer, Faults

pytestmark = pytest.mark.slow  # servers on 127.0.0.1


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
    assert f"{100 - len(expired)} answered by the provider's batches" in first.stdout  # not the rows they failed
    batches.faults = BatchFaults(seed=4)
    again = run_cli("run", str(spec), "--retry-failed", env=cli_env(**ENV))
    assert again.code == 0, again.stderr
    assert sorted(int(c.split("-")[1]) for c in batches.created[1].custom_ids) == sorted(r["row_index"] for r in expired)
    assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * 100


def test_the_budget_holds_each_batch_at_its_worst_case_before_its_upload(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """A batch that does not fit beside those out is not even uploaded: `submit` leaves it
    (exit 0, saying why) for a run after they are collected, whose real cost lets go of
    their worst case; that run sends the rest and answers every row."""
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 400, batch={"rows_per_batch": 100}, params={"max_tokens": 10},
               budget={"max_usd": 0.03})
    submitted = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert submitted.code == 0, submitted.stderr
    assert "the budget holds the other rows back until the batches out are collected" in submitted.stdout
    sent = len(batches.created)
    assert 1 <= sent < 4 and len(batches.uploads) == sent  # the one that did not fit was not even uploaded
    # Each sent batch's worst case: its bytes as prompt tokens, 10 completion tokens a row, at half price
    worst = sum((len(line.encode()) + 1 + 10) * 0.5e-6 for upload in batches.uploads for line in upload.lines)
    assert worst <= 0.03 < worst * (sent + 1) / sent  # (the batches are alike)
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and len(status["batches"]) == sent and not status["lost_requests"]
    assert "the budget holds the other rows back" in status["reason"]
    batches.polls_to_finish = 1
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert len(batches.created) == 4 and batches.custom_ids_in_two_batches() == set() and not live.requests
    out = read_output(tmp_path / "out/result.parquet")
    assert [(r["status"], r["backend"]) for r in out] == [("ok", "batch")] * 400
    assert sum(r["cost_usd"] for r in out) < 0.03


def test_a_batch_waits_for_those_out_when_the_budget_cannot_hold_both(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's worst case is most of the budget: `run` sends one, collects it, then
    the next. A budget that cannot hold even one batch with none out stops the job."""
    out_at_create: list[int] = []
    create = batches.create_batch

    def counting(body: dict) -> tuple[int, dict]:
        out_at_create.append(sum(b.obj["status"] not in ("completed", "failed", "expired", "cancelled")
                                 for b in batches.batches.values()))
        return create(body)

    monkeypatch.setattr(batches, "create_batch", counting)
    spec = job(tmp_path, live, batches, 20, batch={"rows_per_batch": 4}, params={"max_tokens": 100_000},
               budget={"max_usd": 0.5})
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert out_at_create == [0] * 5 and not live.requests
    assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * 20

    (tmp_path / "small").mkdir()
    spec = job(tmp_path / "small", live, batches, 20, batch={"rows_per_batch": 4}, params={"max_tokens": 100_000},
               budget={"max_usd": 0.1})
    stopped = run_cli("run", str(spec), env=cli_env(**ENV))
    assert stopped.code == 3 and "the budget is reached" in stopped.stderr and len(batches.created) == 5


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
    saved = json.loads(run_cli("status", str(spec), "--json").stdout)["saved_usd"]
    assert saved == pytest.approx(sum(r["cost_usd"] for r in first))  # what a batch answer costs, not a live one
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


def test_submit_again_collects_what_ended_and_leaves_what_the_batch_did_not_answer_to_run(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """A row the batch refused (a 4xx) is failed for good, as live: `submit` still exits 0,
    since its work is the sending (a scheduler's sensor waits on it); `run` says 1."""
    batches.faults = BatchFaults(seed=5, expire_share=0.2, refuse_share=0.05)
    batches.polls_to_finish = 1
    spec = job(tmp_path, live, batches, 100)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    again = run_cli("submit", str(spec), env=cli_env(**ENV))  # its poll ends the batch: collected
    assert again.code == 0, again.stderr
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    expired, refused = status["remaining"], status["failed"]
    assert 5 < expired < 40 and f"{expired} they did not answer, to answer live" in again.stdout and refused > 0
    assert status["state"] == "stopped" and "`batchrun run` finishes the job" in status["reason"]
    assert status["exit_code"] == 0
    assert len(batches.created) == 1 and not live.requests
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 1
    assert len(live.requests) == expired and len(batches.created) == 1


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
    # With --ray its shards would send live, at full price, what the batch API answers at half
    refused = run_cli("run", str(spec), "--batch-api", "--ray", "127.0.0.1:1", "--restart", env=cli_env(**ENV))
    assert refused.code == 2 and "--batch-api and --ray do not go together" in refused.stderr, refused.stderr
    assert len(batches.created) == 1 and not batches.uploads[1:]


def test_rows_handed_back_for_live_fail_instead_once_the_spec_says_fallback_none(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=5, expire_share=0.2)
    batches.polls_to_finish = 1
    spec = job(tmp_path, live, batches, 60)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0  # collected: some handed back to go live
    spec.write_text(spec.read_text().replace("batch_api:\n", "batch_api:\n  fallback: none\n"))
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 1
    out = read_output(tmp_path / "out/result.parquet")
    failed = [r for r in out if r["status"] == "failed"]
    assert failed and all(r["error"].startswith("the batch did not answer it: batch_expired") for r in failed)
    assert not live.requests  # none went live
    batches.faults = BatchFaults(seed=6)  # nothing expires now
    again = run_cli("run", str(spec), "--retry-failed", env=cli_env(**ENV))  # they go to a batch again
    assert again.code == 0, again.stderr
    assert sorted(int(c.split("-")[1]) for c in batches.created[1].custom_ids) == [r["row_index"] for r in failed]


@pytest.mark.parametrize("error", [httpx.DecodingError("gzip broken on the way"), httpx.ReadError("reset")])
def test_a_batch_api_call_that_gets_no_readable_answer_is_retried_then_stops_the_job(error: Exception) -> None:
    """Never an internal error: an answer that cannot be decoded is retried as a lost
    connection is, then the job stops (exit 3) for a rerun to go on."""
    session = SimpleNamespace(batch=SimpleNamespace(poll_interval_s=0.001), stop=threading.Event(), stopped_by=None)
    calls = []

    def fn() -> None:
        calls.append(1)
        raise error

    with pytest.raises(JobAborted, match=f"still fails after {ATTEMPTS} attempts") as caught:
        remote.call(session, fn)  # type: ignore[arg-type]
    assert caught.value.exit_code == 3
    assert len(calls) == ATTEMPTS


def test_a_batch_answer_without_usage_is_charged_its_worst_case_as_live(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """Never free: the row's worst case at batch prices (its line's bytes as prompt tokens
    at $0.5, max_tokens as completion at $1 a million), counted against the budget."""
    no_usage = {"id": "cmpl-x", "object": "text_completion", "model": "test-model",
                "choices": [{"index": 0, "text": "no usage here", "finish_reason": "stop"}]}
    batches.faults = BatchFaults(seed=1, status_for=lambda row: (200, no_usage))
    spec = job(tmp_path, live, batches, 10, params={"max_tokens": 1000}, budget={"max_usd": 5.0})
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert "10 rows answered without usage, charged at the worst case" in done.stdout
    out = read_output(tmp_path / "out/result.parquet")
    worst = [(len(line.encode()) + 1) * 0.5e-6 + 1000 * 1.0e-6 for line in batches.uploads[0].lines]
    assert [r["cost_usd"] for r in out] == pytest.approx(worst) and all(r["backend"] == "batch" for r in out)
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["cost_usd"] == pytest.approx(sum(worst))


def test_retry_failed_under_a_budget_that_holds_one_batch_at_a_time_asks_every_failed_row_again(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """The failed rows wait for room as the others do: all of them go, one batch at a time;
    none that this run's batches failed again is sent once more."""
    def refuse_even(row: dict) -> tuple[int, dict] | None:
        return (400, {"error": {"message": "refused"}}) if int(row["custom_id"].rsplit("-", 1)[1]) % 2 == 0 else None

    batches.faults = BatchFaults(seed=1, status_for=refuse_even)
    spec = job(tmp_path, live, batches, 20, batch={"fallback": "none"}, params={"max_tokens": 100_000})
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 1  # ten rows refused
    batches.faults = BatchFaults(seed=2, status_for=lambda row: refuse_even(row) if row["custom_id"].endswith("-0")
                                 else None)  # row 0 is refused again
    spec = job(tmp_path, live, batches, 20, batch={"fallback": "none", "rows_per_batch": 4},
               params={"max_tokens": 100_000}, budget={"max_usd": 0.45})
    again = run_cli("run", str(spec), "--retry-failed", env=cli_env(**ENV))
    assert again.code == 1, again.stderr
    assert [len(c.custom_ids) for c in batches.created[1:]] == [4, 4, 2]  # the ten, each once
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out if r["status"] == "failed"] == [0]


def test_a_batch_planned_before_rows_kept_their_worst_case_charges_its_hold_shared(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """A state from before the ledger's worst-case columns (null there): an answer without
    usage is charged its share of the batch's budget hold, never nothing."""
    no_usage = {"id": "cmpl-x", "object": "text_completion", "model": "test-model",
                "choices": [{"index": 0, "text": "no usage here", "finish_reason": "stop"}]}
    batches.faults = BatchFaults(seed=1, status_for=lambda row: (200, no_usage))
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 4, params={"max_tokens": 1000}, budget={"max_usd": 5.0})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "out/result.batchrun.sqlite")) as db, db:
        db.execute("UPDATE batch_rows SET worst_usd = NULL, worst_tokens = NULL")  # as an older version left them
        [(held,)] = db.execute("SELECT usd FROM holds")
    batches.finish()
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert [r["cost_usd"] for r in read_output(tmp_path / "out/result.parquet")] == pytest.approx([held / 4] * 4)
