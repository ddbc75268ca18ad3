"""Server-sent events: a streamed answer's lines, read as the standard says, handed as
events to the endpoint's own `StreamReader`.

The framing is the same for every endpoint; what the events mean is the endpoint's
(`Endpoint.stream()`).
"""

from __future__ import annotations

import json

from .._exceptions import RetryableAPIError
from . import get_endpoint
from .result import Result, text_of

__all__ = ["StreamAssembler"]


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
