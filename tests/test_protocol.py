from __future__ import annotations

import json

import pytest

from batchrun import RetryableAPIError, RowFatalAPIError
from batchrun.endpoints import ENDPOINTS
from batchrun.endpoints.sse import StreamAssembler

CHAT = ENDPOINTS["chat"]


def test_row_fields_override_params_which_override_the_model() -> None:
    body = CHAT.build_body({"prompt": "p", "max_tokens": 5, "model": "row-model"}, "spec-model",
                           {"max_tokens": 100, "temperature": 0.2})
    assert body == {"model": "row-model", "max_tokens": 5, "temperature": 0.2, "prompt": "p"}


def test_streams_ask_for_usage_unless_the_user_said_otherwise() -> None:
    assert CHAT.build_body({"prompt": "p"}, "m", {"stream": True})["stream_options"] == {"include_usage": True}
    mine = {"include_usage": False}
    assert CHAT.build_body({"prompt": "p"}, "m", {"stream": True, "stream_options": mine})["stream_options"] == mine
    assert "stream_options" not in CHAT.build_body({"prompt": "p"}, "m", {})


def test_parse_chat_answer_with_reasoning_tools_and_usage_details() -> None:
    data = {
        "id": "r1", "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "reasoning_content": "think",
            "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                  "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 3}},
    }
    result = ENDPOINTS["chat"].parse(data)
    assert (result.output_text, result.reasoning_content, result.finish_reason) == (None, "think", "tool_calls")
    assert json.loads(result.tool_calls) == data["choices"][0]["message"]["tool_calls"]
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == (10, 4, 14)
    assert (result.cached_tokens, result.reasoning_tokens) == (8, 3)
    assert (result.response_id, result.model) == ("r1", "m")


def test_parse_completion_answer() -> None:
    result = ENDPOINTS["completions"].parse({"id": "c", "choices": [{"text": "hello", "finish_reason": "length"}],
                                          "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert (result.output_text, result.finish_reason, result.total_tokens) == ("hello", "length", 3)


@pytest.mark.parametrize("data", [{}, {"choices": []}, {"choices": ["x"]}, [1], "text"])
def test_json_that_is_no_answer_fails_the_row_rather_than_paying_again(data: object) -> None:
    with pytest.raises(RowFatalAPIError, match="HTTP 200 without an answer"):
        ENDPOINTS["chat"].parse(data)


def test_an_error_object_sent_with_200_keeps_its_message() -> None:
    with pytest.raises(RowFatalAPIError, match="HTTP 200 without an answer: model overloaded"):
        ENDPOINTS["chat"].parse({"error": {"message": "model overloaded"}})


def test_unusual_field_types_become_text() -> None:
    data = {"id": 12345, "model": ["m"], "choices": [{"finish_reason": "stop", "message": {
        "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}}]}
    result = ENDPOINTS["chat"].parse(data)
    assert (result.output_text, result.response_id, result.model) == ("Hello there", "12345", '["m"]')


def sse(*chunks: object, named: bool = False) -> list[str]:
    """Event-stream lines for these chunks (a string goes as it is: "[DONE]"); `named`:
    each event named by its chunk's `type`, as the Responses API sends them."""
    lines = []
    for chunk in chunks:
        if named:
            lines.append(f"event: {chunk['type']}")  # type: ignore[index]
        lines += [f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}", ""]
    return lines


def feed(endpoint: str, lines: list[str]) -> StreamAssembler:
    assembler = StreamAssembler(endpoint)
    for line in lines:
        assembler.feed_line(line)
    return assembler


def test_fireworks_stream_usage_in_the_finish_chunk() -> None:
    lines = sse(
        {"id": "s", "model": "m", "choices": [{"index": 0, "text": "def ", "finish_reason": None}], "usage": None},
        {"id": "s", "model": "m", "choices": [{"index": 0, "text": "f()", "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 7, "total_tokens": 24, "completion_tokens": 17}},
        "[DONE]",
    )
    result = feed("completions", [": keep-alive", *lines]).result()
    assert (result.output_text, result.finish_reason, result.total_tokens, result.response_id) == ("def f()", "stop", 24, "s")


def test_openai_stream_usage_in_an_extra_chunk_and_tool_call_pieces() -> None:
    lines = sse(
        {"id": "s", "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "hm"}}]},
        {"id": "s", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call1", "type": "function", "function": {"name": "add", "arguments": '{"a": '}}]}}]},
        {"id": "s", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                                 "finish_reason": "tool_calls"}]},
        {"id": "s", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        "[DONE]",
    )
    result = feed("chat", lines).result()
    assert result.reasoning_content == "hm" and result.output_text is None
    assert json.loads(result.tool_calls) == [
        {"id": "call1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    assert (result.finish_reason, result.total_tokens) == ("tool_calls", 5)


def test_a_stream_cut_short_is_retryable() -> None:
    lines = sse({"choices": [{"index": 0, "delta": {"content": "hal"}, "finish_reason": None}]})
    with pytest.raises(RetryableAPIError, match="ended before the answer was complete"):
        feed("chat", lines).result()
    with pytest.raises(RetryableAPIError, match="not one JSON object"):
        feed("chat", ['data: {"choices": [{"delta": {"cont', ''])


def test_a_stream_without_done_is_complete_once_it_has_a_finish_reason() -> None:
    lines = sse({"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    result = feed("chat", lines).result()
    assert (result.output_text, result.total_tokens) == ("ok", 2)


def test_answers_with_lone_surrogates_are_stored_with_replacement_characters() -> None:
    data = json.loads('{"id": "r\\ud800", "choices": [{"message": {"content": "a\\ud800b", "tool_calls": '
                      '[{"function": {"arguments": "\\udfff"}}]}, "finish_reason": "stop"}]}')
    result = ENDPOINTS["chat"].parse(data)
    assert (result.output_text, result.response_id) == ("a\ufffdb", "r\ufffd")
    assert json.loads(result.tool_calls) == [{"function": {"arguments": "\ufffd"}}]
    for value in (result.output_text, result.tool_calls, result.response_id):
        value.encode("utf-8")  # what SQLite and Parquet need


def test_a_surrogate_pair_split_across_stream_chunks_is_joined() -> None:
    # An emoji sent as two escapes in two chunks: each chunk alone holds half a character.
    lines = ['data: {"choices": [{"index": 0, "delta": {"content": "smile \\ud83d"}}]}', "",
             'data: {"choices": [{"index": 0, "delta": {"content": "\\ude00!"}, "finish_reason": "stop"}]}', ""]
    assert feed("chat", lines).result().output_text == "smile \U0001F600!"
    lonely = ['data: {"choices": [{"index": 0, "text": "\\ud83d", "finish_reason": "stop"}]}', ""]
    assert feed("completions", lonely).result().output_text == "\ufffd"


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 2**63, "completion_tokens": 1, "total_tokens": 10**30},
    {"prompt_tokens": -1, "completion_tokens": 1.5, "total_tokens": "7"},
])
def test_usage_that_no_count_can_be_is_left_empty(usage: dict) -> None:
    data = {"choices": [{"text": "x", "finish_reason": "stop"}], "usage": usage}
    result = ENDPOINTS["completions"].parse(data)
    assert (result.prompt_tokens, result.total_tokens, result.output_text) == (None, None, "x")
    assert result.completion_tokens in (1, None)
    total = ENDPOINTS["completions"].parse({**data, "usage": {"prompt_tokens": 2**62, "completion_tokens": 2**62}})
    assert total.total_tokens is None  # their sum is beyond int64


def test_one_event_may_span_several_data_lines() -> None:
    lines = ["event: message", 'data: {"choices": [{"index": 0,', 'data: "delta": {"content": "hi"},',
             'data:"finish_reason": "stop"}]}', "id: 7", "retry: 1000", ": a comment", ""]
    result = feed("chat", lines).result()
    assert (result.output_text, result.finish_reason) == ("hi", "stop")


def test_two_copies_of_a_chunk_in_one_event_are_no_answer() -> None:
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    with pytest.raises(RetryableAPIError, match="not one JSON object"):
        feed("chat", [f"data: {chunk}", f"data: {chunk}", ""])


def test_an_error_event_fails_the_attempt_with_its_message() -> None:
    lines = ["event: error", 'data: {"message": "overloaded, try later"}', ""]
    with pytest.raises(RetryableAPIError, match="overloaded, try later"):
        feed("chat", lines)


def test_an_event_the_stream_never_closed_is_dropped() -> None:
    lines = ['data: {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}']
    with pytest.raises(RetryableAPIError, match="ended before the answer was complete"):
        feed("chat", lines).result()


def test_done_without_a_finish_reason_is_a_stream_cut_short() -> None:
    # llama.cpp's server ends a stream it interrupts this way
    lines = sse({"choices": [{"index": 0, "delta": {"content": "hal"}, "finish_reason": None}]}, "[DONE]")
    with pytest.raises(RetryableAPIError, match=r"ended with \[DONE\] but no finish_reason"):
        feed("chat", lines).result()
