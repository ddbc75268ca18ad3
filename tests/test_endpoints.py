"""Each endpoint's answers, whole and streamed, from literals."""

from __future__ import annotations

import json

import pytest

from batchrun import RetryableAPIError, RowFatalAPIError
from batchrun.endpoints import ENDPOINTS
from tests.test_protocol import feed, sse

CHAT_LOGPROBS = {"content": [
    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Hey", "logprob": -1.5, "bytes": None}]},
    {"token": "!", "logprob": -0.25, "bytes": [33], "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]}]},
]}
NORMAL = [
    {"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}, {"token": "Hey", "logprob": -1.5}]},
    {"token": "!", "logprob": -0.25, "top_logprobs": [{"token": "!", "logprob": -0.25}]},
]


def test_every_choice_is_kept_and_choice_0_fills_the_columns() -> None:
    data = {"id": "x", "choices": [
        {"index": 1, "message": {"content": "second", "reasoning_content": "r1"}, "finish_reason": "length"},
        {"index": 0, "message": {"content": "first"}, "finish_reason": "stop", "logprobs": CHAT_LOGPROBS},
    ], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    result = ENDPOINTS["chat"].parse(data)
    assert (result.output_text, result.finish_reason, result.completion_tokens) == ("first", "stop", 9)
    assert result.extra["logprobs"] == NORMAL
    assert [(c["index"], c["text"], c["finish_reason"], c["reasoning_content"]) for c in result.extra["choices"]] == [
        (0, "first", "stop", None), (1, "second", "length", "r1")]
    assert result.extra["choices"][0]["logprobs"] == NORMAL


def test_completions_logprobs_take_the_same_shape_as_chat() -> None:
    data = {"choices": [{"text": "Hi!", "finish_reason": "stop", "logprobs": {
        "tokens": ["Hi", "!"], "token_logprobs": [-0.5, -0.25], "text_offset": [0, 2],
        "top_logprobs": [{"Hi": -0.5, "Hey": -1.5}, {"!": -0.25}]}}]}
    assert ENDPOINTS["completions"].parse(data).extra == {"logprobs": NORMAL}


def test_one_choice_without_logprobs_needs_no_extra() -> None:
    assert ENDPOINTS["chat"].parse({"choices": [{"message": {"content": "a"}, "finish_reason": "stop"}]}).extra is None


def test_a_stream_of_several_choices_joins_each_and_its_logprobs() -> None:
    lines = sse(
        {"id": "s", "choices": [{"index": 0, "delta": {"content": "Hi"},
                                 "logprobs": {"content": CHAT_LOGPROBS["content"][:1]}}]},
        {"id": "s", "choices": [{"index": 1, "delta": {"content": "Yo"}, "finish_reason": "stop"}]},
        {"id": "s", "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop",
                                 "logprobs": {"content": CHAT_LOGPROBS["content"][1:]}}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 3}},
        "[DONE]",
    )
    result = feed("chat", lines).result()
    assert (result.output_text, result.completion_tokens, result.extra["logprobs"]) == ("Hi!", 3, NORMAL)
    assert [c["text"] for c in result.extra["choices"]] == ["Hi!", "Yo"]


def test_a_stream_where_one_choice_never_finished_was_cut_short() -> None:
    lines = sse({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]},
                {"choices": [{"index": 1, "delta": {"content": "b"}}]}, "[DONE]")
    with pytest.raises(RetryableAPIError, match=r"ended with \[DONE\] but no finish_reason"):
        feed("chat", lines).result()


RESPONSE = {
    "id": "resp_1", "object": "response", "model": "m", "status": "completed",
    "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Hello ", "annotations": []},
            {"type": "refusal", "refusal": "no"}, {"type": "output_text", "text": "world"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\": 1}"},
    ],
    "usage": {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7,
              "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 18},
}


def test_a_response_maps_to_the_columns() -> None:
    result = ENDPOINTS["responses"].parse(RESPONSE)
    assert (result.output_text, result.reasoning_content, result.finish_reason) == ("Hello world", "thought", "stop")
    assert json.loads(result.tool_calls) == [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens,
            result.cached_tokens, result.reasoning_tokens) == (11, 7, 18, 4, 2)
    assert (result.response_id, result.model) == ("resp_1", "m")
    cut = ENDPOINTS["responses"].parse({**RESPONSE, "status": "incomplete",
                                     "incomplete_details": {"reason": "max_output_tokens"}})
    assert cut.finish_reason == "length"


def test_a_failed_response_is_retried_and_no_output_fails_the_row() -> None:
    with pytest.raises(RetryableAPIError, match="the response failed: overloaded"):
        ENDPOINTS["responses"].parse({**RESPONSE, "status": "failed", "error": {"message": "overloaded"}})
    with pytest.raises(RowFatalAPIError, match="HTTP 200 without an answer: bad"):
        ENDPOINTS["responses"].parse({"error": {"message": "bad"}})


def test_a_responses_stream_is_read_from_its_terminal_event() -> None:
    events = [{"type": "response.created", "response": {**RESPONSE, "status": "in_progress", "output": []}},
              {"type": "response.output_text.delta", "delta": "Hello "}]
    with pytest.raises(RetryableAPIError, match="ended before response.completed"):
        feed("responses", sse(*events, named=True)).result()
    done = feed("responses", sse(*events, {"type": "response.completed", "response": RESPONSE}, named=True))
    assert done.result().output_text == "Hello world"
    with pytest.raises(RetryableAPIError, match="the response failed: boom"):
        feed("responses", sse({"type": "response.failed", "response": {
            **RESPONSE, "status": "failed", "error": {"message": "boom"}}}, named=True))


def test_responses_bodies_send_store_false_unless_told() -> None:
    assert ENDPOINTS["responses"].build_body({"input": "hi"}, "m", {}) == {"model": "m", "store": False, "input": "hi"}
    assert ENDPOINTS["responses"].build_body({"input": "hi"}, "m", {"store": True, "stream": True}) == {
        "model": "m", "store": True, "stream": True, "input": "hi"}  # no stream_options: usage comes anyway
