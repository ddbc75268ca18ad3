"""POST /responses (the Responses API): `input` (text or input items) and optional
`instructions` in; output items out.

    message         -> output_text (its `output_text` parts, joined)
    reasoning       -> reasoning_content (its summary, else its reasoning text)
    function_call   -> tool_calls (as chat's: [{id, type: function, function: {name, arguments}}])
    usage           input_tokens -> prompt_tokens, output_tokens -> completion_tokens,
                    input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens
    status          completed -> finish_reason "stop"; incomplete -> "length" (max_output_tokens)
                    or the reason given

`store: false` is sent unless the spec or row says otherwise: the API keeps every
response by default, and a batch job should not leave a million conversations behind.
A stream's terminal event (`response.completed`, `response.incomplete`) carries the
whole response, which is read like a non-streamed one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._exceptions import RetryableAPIError, RowFatalAPIError
from .base import Endpoint, StreamReader
from .protocol import Result, set_usage, storable, text_of

__all__ = ["Responses"]

_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}
_TERMINAL = ("response.completed", "response.incomplete")


class Responses(Endpoint):
    name = "responses"
    path = "/responses"

    def build_body(self, row_body: Mapping[str, Any], model: str | None,
                   params: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model} if model else {}
        body["store"] = False
        body.update(params)
        body.update(row_body)
        return body

    def parse(self, data: Any) -> Result:
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            error = data.get("error") if isinstance(data, dict) else None
            detail = error.get("message") if isinstance(error, dict) else None
            snippet = (text_of(detail) or json.dumps(data, ensure_ascii=False))[:4000]
            raise RowFatalAPIError(f"HTTP 200 without an answer: {snippet}", status=200)
        return _read_response(data)

    def stream(self) -> StreamReader:
        return _ResponsesStream()


def _read_response(data: dict[str, Any]) -> Result:
    status = data.get("status")
    if status == "failed":
        error = data.get("error")
        message = text_of(error.get("message") if isinstance(error, dict) else error) or "no reason given"
        raise RetryableAPIError(f"the response failed: {message}", status=200)
    texts: list[str] = []
    summaries: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in data["output"]:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            texts += _parts(item.get("content"), "output_text")
        elif kind == "reasoning":
            summaries += _parts(item.get("summary"), "summary_text")
            reasoning += _parts(item.get("content"), "reasoning_text")
        elif kind == "function_call":
            calls.append({"id": text_of(item.get("call_id")), "type": "function",
                          "function": {"name": text_of(item.get("name")),
                                       "arguments": text_of(item.get("arguments")) or ""}})
    if status == "incomplete":
        details = data.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        finish = _FINISH.get(reason, text_of(reason) or "incomplete") if isinstance(reason, str) or reason is None \
            else text_of(reason)
    else:
        finish = "stop" if status in ("completed", None) else text_of(status)
    result = Result(
        row_index=-1, id="", status="ok",
        output_text="".join(texts) if texts or not calls else None,
        reasoning_content="\n".join(summaries or reasoning) or None,
        tool_calls=json.dumps(calls, ensure_ascii=False) if calls else None,
        finish_reason=finish, model=text_of(data.get("model")), response_id=text_of(data.get("id")),
    )
    usage = data.get("usage")
    if isinstance(usage, dict):
        set_usage(result, {
            "prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "prompt_tokens_details": usage.get("input_tokens_details"),
            "completion_tokens_details": usage.get("output_tokens_details"),
        })
    return storable(result)


def _parts(content: Any, kind: str) -> list[str]:
    return [p["text"] for p in content if isinstance(p, dict) and p.get("type") == kind
            and isinstance(p.get("text"), str)] if isinstance(content, list) else []


class _ResponsesStream(StreamReader):
    def __init__(self) -> None:
        self.final: dict[str, Any] | None = None

    def feed(self, event: str, chunk: dict[str, Any]) -> None:
        kind = chunk.get("type") if isinstance(chunk.get("type"), str) else event
        if kind == "response.failed":
            response = chunk.get("response")
            _read_response(response if isinstance(response, dict) and isinstance(response.get("output"), list)
                           else {"status": "failed", "output": [], "error": chunk.get("error")})
        if kind in _TERMINAL:
            response = chunk.get("response")
            if not isinstance(response, dict) or not isinstance(response.get("output"), list):
                raise RetryableAPIError(f"the stream's {kind} event holds no response", status=200)
            self.final = response

    def result(self, done: bool) -> Result:
        if self.final is None:
            raise RetryableAPIError("the event stream ended before response.completed", status=200)
        return _read_response(self.final)
