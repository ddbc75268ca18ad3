"""What an endpoint is to batchrun: a body out, an answer (whole or streamed) in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .protocol import Result

__all__ = ["Endpoint", "StreamReader"]


class StreamReader:
    """Takes a stream's events one by one (`feed`), then gives the Result (`result`)."""

    def feed(self, event: str, chunk: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self, done: bool) -> Result:
        """The answer; `done`: the stream ended with `[DONE]`. Raises RetryableAPIError
        for a stream that was cut short."""
        raise NotImplementedError


class Endpoint:
    name: str
    path: str  # after the base URL
    grouped = False  # True: several rows go in one request (see `embeddings`)

    def build_body(self, row_body: Mapping[str, Any], model: str | None,
                   params: Mapping[str, Any]) -> dict[str, Any]:
        """Spec params, then the row's own fields on top; streams ask for usage too."""
        body: dict[str, Any] = {"model": model} if model else {}
        body.update(params)
        body.update(row_body)
        if body.get("stream"):
            # Fireworks puts usage in the last chunk anyway; OpenAI only when asked.
            body.setdefault("stream_options", {"include_usage": True})
        return body

    def parse(self, data: Any) -> Result:
        """A whole (non-streamed) answer as a Result, row_index and id left blank."""
        raise NotImplementedError

    def stream(self) -> StreamReader:
        raise NotImplementedError
