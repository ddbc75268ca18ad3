"""The request/response protocol: request bodies out, `Result` rows in.

Pure functions over dicts and lines; nothing here touches a socket, so every shape
the API can answer with is testable from literals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._exceptions import RetryableAPIError, RowFatalAPIError

__all__ = ["Result", "StreamAssembler", "build_body", "endpoint_path", "parse_answer", "storable_text"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


def endpoint_path(endpoint: str) -> str:
    return _PATHS[endpoint]


def build_body(row_body: Mapping[str, Any], model: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """Spec params, then the row's own fields on top; streams ask for usage too."""
    body: dict[str, Any] = {"model": model} if model else {}
    body.update(params)
    body.update(row_body)
    if body.get("stream"):
        # Fireworks puts usage in the last chunk anyway; OpenAI only when asked.
        body.setdefault("stream_options", {"include_usage": True})
    return body


@dataclass(slots=True)
class Result:
    """One settled row: what is checkpointed and, in the end, one output row."""

    row_index: int
    id: str
    status: str  # "ok" | "failed"
    output_text: str | None = None
    reasoning_content: str | None = None
    tool_calls: str | None = None  # JSON text of the assistant's tool calls
    finish_reason: str | None = None
    model: str | None = None
    response_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    attempts: int = 0
    latency_s: float | None = None
    error: str | None = None
    # Not stored: the row failed only for reasons a later attempt may not meet
    # (timeouts, 5xx, dropped connections), after every retry was spent.
    transient: bool = False


RESULT_FIELDS = tuple(name for name in Result.__dataclass_fields__ if name != "transient")
# Every text a server (or its error) fills in; `id` comes from the validated input.
_TEXT_FIELDS = ("output_text", "reasoning_content", "tool_calls", "finish_reason", "model", "response_id", "error")
INT64_MAX = 2**63 - 1


def storable_text(text: str) -> str:
    """`text` as valid Unicode: a surrogate pair split in two (across stream chunks)
    is joined, and a lone surrogate (`"\\ud800"` is valid JSON) becomes U+FFFD.

    Python strings may hold lone surrogates; UTF-8, SQLite and Parquet cannot.
    """
    if text.isascii():  # a flag on the string: no scan
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _storable(result: Result) -> Result:
    for name in _TEXT_FIELDS:
        value = getattr(result, name)
        if value is not None:
            setattr(result, name, storable_text(value))
    return result


def parse_answer(endpoint: str, data: Any) -> Result:
    """Turn a non-streaming response body into a Result (row_index and id left blank).

    A body that is JSON but no answer (no choices; an error object sent with 200)
    fails the row: asking again would likely be paid for again and fail the same way.
    """
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        error = data.get("error") if isinstance(data, dict) else None
        detail = error.get("message") if isinstance(error, dict) else None
        snippet = (_text(detail) or json.dumps(data, ensure_ascii=False))[:4000]  # the client cuts it, redacted
        raise RowFatalAPIError(f"HTTP 200 without an answer: {snippet}", status=200)
    choice = choices[0]
    if endpoint == "chat":
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        text, reasoning, tool_calls = (
            message.get("content"),
            message.get("reasoning_content"),
            message.get("tool_calls"),
        )
    else:
        text, reasoning, tool_calls = choice.get("text"), None, None
    result = Result(
        row_index=-1,
        id="",
        status="ok",
        output_text=_text(text),
        reasoning_content=_text(reasoning),
        tool_calls=json.dumps(tool_calls, ensure_ascii=False) if tool_calls else None,
        finish_reason=_text(choice.get("finish_reason")),
        model=_text(data.get("model")),
        response_id=_text(data.get("id")),
    )
    _set_usage(result, data.get("usage"))
    return _storable(result)


def _text(value: Any) -> str | None:
    """Whatever the server sent, as text: content parts joined, anything else as JSON.

    Results are stored in typed columns, so a server's unusual shape must never reach
    the store as a list or a number.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _set_usage(result: Result, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    result.prompt_tokens = _int(usage.get("prompt_tokens"))
    result.completion_tokens = _int(usage.get("completion_tokens"))
    result.total_tokens = _int(usage.get("total_tokens"))
    if result.total_tokens is None and result.prompt_tokens is not None and result.completion_tokens is not None:
        result.total_tokens = _int(result.prompt_tokens + result.completion_tokens)
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        result.cached_tokens = _int(details.get("cached_tokens"))
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        result.reasoning_tokens = _int(details.get("reasoning_tokens"))


def _int(value: Any) -> int | None:
    """A token count as the API reported it; None for what no count can be (negative,
    fractional, beyond int64: the store and the output hold int64)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX:
        return value
    return None


class StreamAssembler:
    """Joins a server-sent event stream into one Result.

    Feed it every line of the stream, then ask for `result()`. Lines are read as the
    event-stream standard says: `data:` lines accumulate and a blank line dispatches
    them as one event, joined by newlines (so one JSON object may span several
    lines, and two copies of a chunk in one event are no chunk at all); `event:`
    names the event; comments (`: keep-alive`), `id:` and `retry:` carry no answer.
    An event left open when the stream ends is dropped, as the standard says.

    Usage is taken from whichever chunk carries it: Fireworks puts it in the chunk
    with `finish_reason`, OpenAI in an extra final chunk whose `choices` is empty.
    A stream without a `finish_reason` was cut short and is retryable, `[DONE]` or
    not: llama.cpp's server ends a stream it interrupts with `[DONE]` and no
    finish_reason. Some servers omit `[DONE]`, so a finish_reason is enough.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.done = False
        self._data: list[str] = []  # the open event's data lines
        self._event = ""  # and its name
        self._first_line = True

    def feed_line(self, line: str) -> None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            self._dispatch()
            return
        field, colon, value = line.partition(":")
        if not field and colon:
            return  # a comment
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        # `id:`, `retry:` and unknown fields say nothing about the answer

    def _dispatch(self) -> None:
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if data:
            self._feed_event(event, "\n".join(data))

    def _feed_event(self, event: str, payload: str) -> None:
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except (ValueError, RecursionError):
            raise RetryableAPIError("the event stream has an event whose data is not one JSON object",
                                    status=200) from None
        if event == "error" or isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
            error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
            message = _text(error.get("message") if isinstance(error, dict) else error) or "unknown error"
            raise RetryableAPIError(f"the stream reported an error: {message}", status=200)
        if not isinstance(chunk, dict):
            raise RetryableAPIError("the event stream has a chunk that is not an object", status=200)
        self.model = _text(chunk.get("model")) or self.model
        self.response_id = _text(chunk.get("id")) or self.response_id
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self._feed_choice(choice)

    def _feed_choice(self, choice: dict[str, Any]) -> None:
        if self.endpoint == "chat":
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            if delta.get("content"):
                self.text.append(_text(delta["content"]))
            if delta.get("reasoning_content"):
                self.reasoning.append(_text(delta["reasoning_content"]))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._feed_tool_call(call)
        elif choice.get("text"):
            self.text.append(_text(choice["text"]))
        if choice.get("finish_reason"):
            self.finish_reason = _text(choice["finish_reason"])

    def _feed_tool_call(self, delta: dict[str, Any]) -> None:
        """Tool calls arrive in pieces keyed by index; arguments are concatenated."""
        index = delta.get("index", 0)
        call = self.tool_calls.setdefault(index if isinstance(index, int) else 0, {"function": {"arguments": ""}})
        for key in ("id", "type"):
            if delta.get(key):
                call[key] = delta[key]
        function = delta.get("function")
        function = function if isinstance(function, dict) else {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += _text(function.get("arguments")) or ""

    def result(self) -> Result:
        if self.finish_reason is None:
            ended = "with [DONE] but no finish_reason" if self.done else "before the answer was complete"
            raise RetryableAPIError(f"the event stream ended {ended}", status=200)
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        result = Result(
            row_index=-1,
            id="",
            status="ok",
            output_text="".join(self.text) if self.text or not calls else None,
            reasoning_content="".join(self.reasoning) or None,
            tool_calls=json.dumps(calls, ensure_ascii=False) if calls else None,
            finish_reason=self.finish_reason,
            model=self.model,
            response_id=self.response_id,
        )
        _set_usage(result, self.usage)
        # Pieces are joined before they are made storable: a surrogate pair split
        # across two chunks becomes its one character again.
        return _storable(result)
