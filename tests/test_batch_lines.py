"""The batch backend's files: rows as input lines within the provider's limits, and the
output and error lines read back into each row's outcome."""

from __future__ import annotations

import json

import httpx
import pytest

from batchrun import RetryableAPIError
from batchrun.backends.batch import PROVIDERS
from batchrun.backends.batch.lines import batch_line, chunks, custom_id, read_line, row_of
from batchrun.endpoints import get_endpoint
from batchrun.inputs.rows import Row
from batchrun.spec.parse import _BATCH_KINDS  # the spec's check, which runs below the backends

JOB, OTHER = "0123456789abcdef", "fedcba9876543210"
OPENAI, FIREWORKS = PROVIDERS["openai"], PROVIDERS["fireworks"]
CHAT = Row(index=7, id="r7", endpoint="chat", body={"messages": [{"role": "user", "content": "hi"}]}, where="line 8")


def answer(text: str = "hello") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def read(provider, line: dict, **kw: bool):  # type: ignore[no-untyped-def]
    return read_line(provider, json.dumps(line).encode(), JOB, lambda _: get_endpoint("chat"), **kw)


def test_a_custom_id_names_its_job_and_row_and_no_other_jobs() -> None:
    assert row_of(custom_id(JOB, 12), JOB) == 12
    assert row_of(custom_id(OTHER, 12), JOB) is None
    for wrong in ("12", f"{JOB}-x", f"{JOB}-12-3", None, 12, f"{JOB.upper()}-1"):
        assert row_of(wrong, JOB) is None


def test_an_openai_line_carries_method_url_and_the_body_the_live_path_sends() -> None:
    line = json.loads(batch_line(OPENAI, JOB, CHAT, "m", {"temperature": 0}))
    assert line == {"custom_id": f"{JOB}-7", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}}
    assert line["body"] == get_endpoint("chat").build_body(CHAT.body, "m", {"temperature": 0})


def test_a_fireworks_line_leaves_the_model_to_the_job() -> None:
    line = json.loads(batch_line(FIREWORKS, JOB, CHAT, "m", {}))
    assert line == {"custom_id": f"{JOB}-7", "body": {"messages": [{"role": "user", "content": "hi"}]}}


def test_a_line_is_one_line_of_json_whatever_the_text() -> None:
    row = Row(index=1, id="r", endpoint="chat", body={"messages": [{"role": "user", "content": "a\nb\u2028é"}]},
              where="line 2")
    raw = batch_line(OPENAI, JOB, row, "m", {})
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert json.loads(raw)["body"]["messages"][0]["content"] == "a\nb\u2028é"


@pytest.mark.parametrize("max_rows, max_bytes, sizes", [
    (2, 10**6, [2, 2, 1]),
    (10, 25, [2, 2, 1]),  # lines of 10 bytes: two fit in 25
    (10, 5, [1, 1, 1, 1, 1]),  # a line past the limit goes alone
])
def test_files_stay_within_the_providers_limits_in_row_order(max_rows: int, max_bytes: int, sizes: list[int]) -> None:
    lines = [(i, b"x" * 9 + b"\n") for i in range(5)]
    found = list(chunks(lines, max_rows=max_rows, max_bytes=max_bytes))
    assert [len(c) for c in found] == sizes
    assert [i for c in found for i, _ in c] == list(range(5))


def test_an_answered_line_is_the_row_as_the_live_path_stores_it() -> None:
    outcome = read(OPENAI, {"id": "batch_req_1", "custom_id": f"{JOB}-7", "error": None,
                            "response": {"status_code": 200, "request_id": "q", "body": answer()}})
    assert outcome.row_index == 7 and outcome.unanswered is None
    result = outcome.result
    assert (result.row_index, result.status, result.output_text, result.prompt_tokens, result.completion_tokens) == \
        (7, "ok", "hello", 3, 1)


def test_a_refused_request_is_a_failed_row_with_the_providers_words() -> None:
    outcome = read(OPENAI, {"custom_id": f"{JOB}-3", "response": {"status_code": 400, "body": {
        "error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}}, "error": None})
    assert outcome.result.status == "failed"
    assert outcome.result.error == "the batch refused it: HTTP 400: max_tokens is too large"


@pytest.mark.parametrize("line, why", [
    ({"response": None, "error": {"code": "batch_expired", "message": "not run in 24h"}},
     "batch_expired: not run in 24h"),
    ({"response": None, "error": None}, "no answer"),
    ({"response": {"status_code": 500, "body": {}}, "error": None}, "HTTP 500 in the batch"),
    ({"response": {"status_code": 429, "body": {}}, "error": None}, "HTTP 429 in the batch"),
])
def test_a_row_the_batch_did_not_answer_is_still_to_be_answered(line: dict, why: str) -> None:
    outcome = read(OPENAI, {"custom_id": f"{JOB}-4", **line})
    assert (outcome.row_index, outcome.result, outcome.unanswered) == (4, None, why)


def test_fireworks_lines_are_the_answer_itself_and_its_error_file_asks_again() -> None:
    outcome = read(FIREWORKS, {"custom_id": f"{JOB}-2", "response": answer("yes")})
    assert outcome.result.output_text == "yes" and outcome.result.row_index == 2
    outcome = read(FIREWORKS, {"custom_id": f"{JOB}-2", "error": {"message": "internal"}}, from_errors=True)
    assert (outcome.result, outcome.unanswered) == (None, "internal")


def test_an_answer_the_endpoint_cannot_read_fails_its_row() -> None:
    outcome = read(OPENAI, {"custom_id": f"{JOB}-5", "response": {"status_code": 200, "body": {"choices": []}}})
    assert outcome.result.status == "failed" and outcome.result.error.startswith("the batch's answer: ")


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"custom_id": "fedcba9876543210-1", "response": null}',
                                 b'{"response": null}'])
def test_a_line_of_no_row_of_this_job_is_skipped(raw: bytes) -> None:
    assert read_line(OPENAI, raw, JOB, lambda _: get_endpoint("chat")) is None


def test_the_spec_holds_each_provider_to_the_limit_the_provider_states() -> None:
    assert {name: kind.max_rows for name, kind in _BATCH_KINDS.items()} == \
        {name: provider.max_rows for name, provider in PROVIDERS.items()}


@pytest.mark.parametrize("answer", [b"not json", b"[]", b'{"id": 1}', b'{"status": "completed"}',
                                    b'{"id": "b", "status": "failed", "errors": []}',
                                    b'{"id": "b", "status": "failed", "errors": {"data": [1]}}',
                                    b'{"data": {"id": "b"}}', b'{"data": [{"id": "b", "status": "x", "metadata": []}]}'])
def test_any_answer_the_batch_api_may_send_is_an_error_worth_another_try_never_a_crash(answer: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=answer))
    with httpx.Client(transport=transport, base_url="http://127.0.0.1:9/v1") as http:
        for call in (lambda: OPENAI.upload(http, "f.jsonl", b"{}\n"), lambda: OPENAI.get(http, "b"),
                     lambda: OPENAI.create(http, "f", "/v1/chat/completions", {}),
                     lambda: OPENAI.tagged(http, "batchrun_job", JOB)):
            try:
                call()
            except RetryableAPIError as exc:
                assert "the batch API's answer (HTTP 200) is not what it should be" in str(exc)


def test_a_spec_that_streams_live_sends_its_batch_lines_unstreamed() -> None:
    row = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "q"}]}, "line 1")
    line = json.loads(batch_line(PROVIDERS["openai"], "0123456789abcdef", row, "m", {"stream": True, "max_tokens": 8}))
    assert line["body"] == {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "q"}]}
