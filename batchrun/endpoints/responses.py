"""POST /responses (the Responses API): `input` (text or input items) and optional
`instructions` in; output items out.

    message         -> output_text (its `output_text` parts, joined)
    reasoning       -> reasoning_content (its summary, else its reasoning text)
    function_call   -> tool_calls (as chat's: [{id, type: function, function: {name, arguments}}])
    usage           input_tokens -> prompt_tokens, output_tokens -> completion_tokens,
                    input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens
    status          completed -> finish_reason "stop"; incomplete -> "length" (max_output_tokens)
                    or the reason given

A row with a prompt or messages instead of `input` sends it as the input (messages as
input items). `schema:` goes to `text.format`.

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
from .base import INPUT_REQUEST_FIELDS, Endpoint, StreamReader
from .result import Result, answer_id, set_usage, storable, text_of, usage_counts

__all__ = ["Responses"]

_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}
_TERMINAL = ("response.completed", "response.incomplete")
_INCOMPLETE = {finish: reason for reason, finish in _FINISH.items()}  # the other way, for export


class Responses(Endpoint):
    name = "responses"
    path = "/responses"
    field = "input"
    template_fields = ("input", "instructions")
    request_fields = INPUT_REQUEST_FIELDS

    def take(self, body: dict[str, Any], field: str | None) -> str | None:
        if "input" not in body and field is not None:
            body["input"] = body.pop("prompt") if "prompt" in body else body.pop("messages")
        return None

    def ask_for_schema(self, params: dict[str, Any], named: Mapping[str, Any]) -> None:
        text = params.setdefault("text", {})
        if isinstance(text, dict):
            text.setdefault("format", {"type": "json_schema", **named})

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

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        return _export_response(answer, request, model, created)


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


def _export_response(answer: Mapping[str, Any], request: Mapping[str, Any], model: str | None,
                     created: int) -> dict[str, Any]:
    # The output keeps no output item ids: each is made from the row's index and the item's place
    at = answer["row_index"]
    output: list[dict[str, Any]] = []
    if answer["reasoning_content"]:
        output.append({"type": "reasoning", "id": f"rs_{at}_{len(output)}",
                       "summary": [{"type": "summary_text", "text": answer["reasoning_content"]}]})
    if answer["output_text"] is not None:
        output.append({"type": "message", "id": f"msg_{at}_{len(output)}", "role": "assistant",
                       "status": "completed",
                       "content": [{"type": "output_text", "text": answer["output_text"], "annotations": []}]})
    for call in json.loads(answer["tool_calls"]) if answer["tool_calls"] else ():
        function = call.get("function") or {}
        output.append({"type": "function_call", "id": f"fc_{at}_{len(output)}",
                       "call_id": call.get("id") or f"call_{at}_{len(output)}", "name": function.get("name") or "",
                       "arguments": function.get("arguments") or "", "status": "completed"})
    finish = answer["finish_reason"]
    body: dict[str, Any] = {
        "id": answer_id(answer, "resp"), "object": "response", "created_at": created, "model": model,
        "status": "completed" if finish == "stop" else "incomplete",
        "incomplete_details": None if finish == "stop" else {"reason": _INCOMPLETE.get(finish)},
        "output": output,
        # As the API does, the response repeats the request's tool settings (with its defaults)
        "tools": request.get("tools") or [], "tool_choice": request.get("tool_choice", "auto"),
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
    }
    counts = usage_counts(answer)
    if counts is not None:  # the API's usage always has its details: 0 where the server gave none
        body["usage"] = {
            "input_tokens": counts[0], "output_tokens": counts[1], "total_tokens": counts[2],
            "input_tokens_details": {"cached_tokens": answer["cached_tokens"] or 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": answer["reasoning_tokens"] or 0}}
    return body
