"""The request/response protocol: request bodies out, `Result` rows in.

Pure functions over dicts and lines; nothing here touches a socket, so every shape
the API can answer with is testable from literals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._exceptions import RetryableAPIError

__all__ = ["Result", "StreamAssembler", "build_body", "endpoint_path", "map_texts", "parse_answer", "set_usage",
           "storable", "storable_text", "storable_value", "text_of"]


def endpoint_path(endpoint: str) -> str:
    from . import get_endpoint

    return get_endpoint(endpoint).path


def build_body(row_body: Mapping[str, Any], model: str | None, params: Mapping[str, Any],
               endpoint: str = "chat") -> dict[str, Any]:
    from . import get_endpoint

    return get_endpoint(endpoint).build_body(row_body, model, params)


def parse_answer(endpoint: str, data: Any) -> Result:
    """A non-streaming response body as a Result (row_index and id left blank)."""
    from . import get_endpoint

    return get_endpoint(endpoint).parse(data)


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
    cost_usd: float | None = None  # every answer paid for, at the spec's prices
    attempts: int = 0
    latency_s: float | None = None
    error: str | None = None
    # What only some jobs ask for, stored as JSON text: "choices", "logprobs" (see
    # `endpoints.choices`), "parsed", "request".
    extra: dict[str, Any] | None = None
    embedding: bytes | None = None  # float32, little-endian
    # The row failed only for reasons a later attempt may not meet (timeouts, 5xx,
    # dropped connections) after every retry was spent: a rerun tries it again. A row
    # failed for good (a 400, an answer invalid after its re-asks) waits for --retry-failed.
    transient: bool = False
    # Not stored: a grouped answer's vectors, one per row, until the client shares them out
    vectors: list[bytes] | None = None
    # Not stored: where the response cache keeps this answer, once it is saved (see `_cache`)
    cache_key: str | None = None
    # Not stored: the budget's hold on the request that answered, let go when this is saved
    hold: int | None = None


RESULT_FIELDS = tuple(name for name in Result.__dataclass_fields__ if name not in ("vectors", "cache_key", "hold"))
STORED_ONLY = ("extra", "embedding", "transient")  # stored, but not output columns as they are
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


def storable(result: Result) -> Result:
    """`result` with every text the server filled in made storable (see `storable_text`)."""
    for name in _TEXT_FIELDS:
        value = getattr(result, name)
        if value is not None:
            setattr(result, name, storable_text(value))
    if result.extra is not None:
        result.extra = storable_value(result.extra)
    return result


def storable_value(value: Any) -> Any:
    return map_texts(value, storable_text)


def map_texts(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (JSON-like) with `change` applied to every string in it, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_texts(v, change) for v in value]
    if isinstance(value, dict):
        return {change(k) if isinstance(k, str) else k: map_texts(v, change) for k, v in value.items()}
    return value


def text_of(value: Any) -> str | None:
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


def set_usage(result: Result, usage: Any) -> None:
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
    """Reads a server-sent event stream and hands its events to the endpoint's reader.

    Feed it every line of the stream, then ask for `result()`. Lines are read as the
    event-stream standard says: `data:` lines accumulate and a blank line dispatches
    them as one event, joined by newlines (so one JSON object may span several
    lines, and two copies of a chunk in one event are no chunk at all); `event:`
    names the event; comments (`: keep-alive`), `id:` and `retry:` carry no answer.
    An event left open when the stream ends is dropped, as the standard says.

    An answer is complete when the endpoint's reader says so, `[DONE]` or not:
    llama.cpp's server ends a stream it interrupts with `[DONE]` and no
    finish_reason, and some servers omit `[DONE]`.
    """

    def __init__(self, endpoint: str) -> None:
        from . import get_endpoint

        self.reader = get_endpoint(endpoint).stream()
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
            message = text_of(error.get("message") if isinstance(error, dict) else error) or "unknown error"
            raise RetryableAPIError(f"the stream reported an error: {message}", status=200)
        if not isinstance(chunk, dict):
            raise RetryableAPIError("the event stream has a chunk that is not an object", status=200)
        self.reader.feed(event, chunk)

    def result(self) -> Result:
        return self.reader.result(self.done)
