"""Answers made of `choices`, as chat and completions give them: every choice, and
log-probabilities in one shape whichever endpoint sent them.

Choice 0 fills the Result's own columns (`output_text`, ...). When the answer has more
than one choice (`n`), every choice goes to `extra["choices"]`; when choice 0 has
log-probabilities, they go to `extra["logprobs"]`, one entry per token:

    {"token": "Hello", "logprob": -0.1, "top_logprobs": [{"token": "Hello", "logprob": -0.1}, ...]}

Chat sends that shape (`logprobs.content`, less `bytes`); completions sends parallel
lists (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob} maps), turned into it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._exceptions import RetryableAPIError, RowFatalAPIError
from .base import StreamReader
from .result import Result, answer_id, set_usage, storable, text_of, usage_counts

__all__ = ["ChoicesStream", "export_choices", "logprob_entries", "parse_choices", "wants_choices", "wants_logprobs"]


def wants_choices(params: Mapping[str, Any]) -> bool:
    """Every choice is asked for (`n` > 1): the output keeps them all."""
    n = params.get("n")
    return type(n) is int and n > 1


def wants_logprobs(params: Mapping[str, Any]) -> bool:
    """Log-probabilities are asked for (`logprobs` set, and not false)."""
    value = params.get("logprobs")
    return value is not None and value is not False


def parse_choices(data: Any, *, chat: bool) -> Result:
    """A body that is JSON but no answer (no choices; an error object sent with 200)
    fails the row: asking again would likely be paid for again and fail the same way."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        error = data.get("error") if isinstance(data, dict) else None
        detail = error.get("message") if isinstance(error, dict) else None
        snippet = (text_of(detail) or json.dumps(data, ensure_ascii=False))[:4000]  # the client cuts it, redacted
        raise RowFatalAPIError(f"HTTP 200 without an answer: {snippet}", status=200)
    if len(choices) == 1 and not choices[0].get("logprobs"):  # the common answer, read without the list
        text, reasoning, calls = _parts(choices[0], chat)
        result = Result(row_index=-1, id="", status="ok", output_text=text, reasoning_content=reasoning,
                        tool_calls=calls, finish_reason=text_of(choices[0].get("finish_reason")),
                        model=text_of(data.get("model")), response_id=text_of(data.get("id")))
        set_usage(result, data.get("usage"))
        return storable(result)
    read = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index")
        read.append(_choice(index if _is_index(index) else position, *_parts(choice, chat),
                            text_of(choice.get("finish_reason")), logprob_entries(choice.get("logprobs"))))
    result = _result(read, text_of(data.get("model")), text_of(data.get("id")))
    set_usage(result, data.get("usage"))
    return storable(result)


def _parts(choice: dict[str, Any], chat: bool) -> tuple[str | None, str | None, str | None]:
    """(text, reasoning, tool calls as JSON text) of one whole choice."""
    if chat:
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        text, reasoning, calls = message.get("content"), message.get("reasoning_content"), message.get("tool_calls")
    else:
        text, reasoning, calls = choice.get("text"), None, None
    return text_of(text), text_of(reasoning), json.dumps(calls, ensure_ascii=False) if calls else None


def _is_index(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**31


def _choice(index: int, text: str | None, reasoning: str | None, tool_calls: str | None,
            finish_reason: str | None, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "reasoning_content": reasoning,
            "tool_calls": tool_calls, "logprobs": logprobs}


def _result(choices: list[dict[str, Any]], model: str | None, response_id: str | None) -> Result:
    choices.sort(key=lambda c: c["index"])
    first = choices[0]
    extra: dict[str, Any] = {}
    if len(choices) > 1:
        extra["choices"] = choices
    if first["logprobs"] is not None:
        extra["logprobs"] = first["logprobs"]
    return Result(
        row_index=-1, id="", status="ok", output_text=first["text"], reasoning_content=first["reasoning_content"],
        tool_calls=first["tool_calls"], finish_reason=first["finish_reason"], model=model,
        response_id=response_id, extra=extra or None,
    )


def logprob_entries(raw: Any) -> list[dict[str, Any]] | None:
    """Log-probabilities in either shape as [{token, logprob, top_logprobs: [{token, logprob}]}]."""
    if not isinstance(raw, dict):
        return None
    content = raw.get("content")
    if isinstance(content, list):  # chat, and servers that answer completions the same way
        return [{"token": text_of(e.get("token")), "logprob": _number(e.get("logprob")),
                 "top_logprobs": _alternatives(e.get("top_logprobs"))}
                for e in content if isinstance(e, dict)]
    tokens = raw.get("tokens")
    if isinstance(tokens, list):
        values = raw.get("token_logprobs")
        values = values if isinstance(values, list) else []
        tops = raw.get("top_logprobs")
        tops = tops if isinstance(tops, list) else []
        return [{"token": text_of(token), "logprob": _number(values[i] if i < len(values) else None),
                 "top_logprobs": _alternatives(tops[i] if i < len(tops) else None)}
                for i, token in enumerate(tokens)]
    return None


def _alternatives(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, dict):  # completions: {token: logprob}
        return [{"token": str(token), "logprob": _number(value)} for token, value in raw.items()]
    if isinstance(raw, list):  # chat: [{token, logprob, bytes}]
        return [{"token": text_of(a.get("token")), "logprob": _number(a.get("logprob"))}
                for a in raw if isinstance(a, dict)]
    return []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Choice:
    """One choice of a stream, as its pieces arrive."""

    __slots__ = ("finish_reason", "logprobs", "reasoning", "text", "tool_calls")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: list[dict[str, Any]] | None = None

    def tool_call(self, delta: dict[str, Any]) -> None:
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
        call["function"]["arguments"] += text_of(function.get("arguments")) or ""


class ChoicesStream(StreamReader):
    """Chunks of `choices` by index, each choice's pieces joined.

    Usage is taken from whichever chunk carries it: Fireworks puts it in the chunk
    with `finish_reason`, OpenAI in an extra final chunk whose `choices` is empty.
    A choice without a `finish_reason` was cut short: the whole answer is retryable.
    """

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.choices: dict[int, _Choice] = {}
        self.usage: Any = None
        self.model: str | None = None
        self.response_id: str | None = None

    def feed(self, event: str, chunk: dict[str, Any]) -> None:
        self.model = text_of(chunk.get("model")) or self.model
        self.response_id = text_of(chunk.get("id")) or self.response_id
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not _is_index(index):
                continue
            self._feed_choice(self.choices.setdefault(index, _Choice()), choice)

    def _feed_choice(self, into: _Choice, choice: dict[str, Any]) -> None:
        if self.chat:
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            if delta.get("content"):
                into.text.append(text_of(delta["content"]) or "")
            if delta.get("reasoning_content"):
                into.reasoning.append(text_of(delta["reasoning_content"]) or "")
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    into.tool_call(call)
        elif choice.get("text"):
            into.text.append(text_of(choice["text"]) or "")
        entries = logprob_entries(choice.get("logprobs"))
        if entries is not None:
            into.logprobs = (into.logprobs or []) + entries
        if choice.get("finish_reason"):
            into.finish_reason = text_of(choice["finish_reason"])

    def result(self, done: bool) -> Result:
        if not self.choices or any(c.finish_reason is None for c in self.choices.values()):
            ended = "with [DONE] but no finish_reason" if done else "before the answer was complete"
            raise RetryableAPIError(f"the event stream ended {ended}", status=200)
        read = []
        for index, c in self.choices.items():
            calls = [c.tool_calls[i] for i in sorted(c.tool_calls)]
            read.append(_choice(index, "".join(c.text) if c.text or not calls else None, "".join(c.reasoning) or None,
                                json.dumps(calls, ensure_ascii=False) if calls else None, c.finish_reason,
                                c.logprobs))
        result = _result(read, self.model, self.response_id)
        set_usage(result, self.usage)
        # Pieces are joined before they are made storable: a surrogate pair split
        # across two chunks becomes its one character again.
        return storable(result)


def export_choices(answer: Mapping[str, Any], *, model: str | None, created: int, chat: bool) -> dict[str, Any]:
    """A ChatCompletion (`chat`) or a Completion rebuilt from an output row, every choice
    it kept (the `choices` column) or choice 0 from the row's own columns."""
    choices = answer.get("choices") or [{
        "index": 0, "text": answer["output_text"], "finish_reason": answer["finish_reason"],
        "reasoning_content": answer["reasoning_content"], "tool_calls": answer["tool_calls"],
        "logprobs": answer.get("logprobs")}]
    if chat:
        body = {"id": answer_id(answer, "chatcmpl"), "object": "chat.completion", "created": created,
                "model": model, "choices": [_chat_choice(c) for c in choices]}
    else:
        body = {"id": answer_id(answer, "cmpl"), "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                             "logprobs": _legacy_logprobs(c.get("logprobs"))} for c in choices]}
    counts = usage_counts(answer)
    if counts is not None:  # a stream that was not asked for usage has none to give
        usage: dict[str, Any] = dict(zip(("prompt_tokens", "completion_tokens", "total_tokens"), counts))
        if answer["cached_tokens"] is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": answer["cached_tokens"]}
        if answer["reasoning_tokens"] is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": answer["reasoning_tokens"]}
        body["usage"] = usage
    return body


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice["text"]}
    if choice.get("reasoning_content"):
        message["reasoning_content"] = choice["reasoning_content"]
    if choice.get("tool_calls"):
        message["tool_calls"] = json.loads(choice["tool_calls"])
    logprobs = choice.get("logprobs")
    return {"index": choice["index"], "message": message, "finish_reason": choice["finish_reason"],
            "logprobs": None if logprobs is None else {"content": [
                {**entry, "top_logprobs": entry["top_logprobs"] or []} for entry in logprobs]}}


def _legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Completions' parallel lists, from the one shape the output keeps."""
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"] or []} for e in entries]}
