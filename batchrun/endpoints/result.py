"""A settled row, `Result`, and the helpers every endpoint reads answers with.

Pure functions over dicts; nothing here touches a socket, and nothing here knows an
endpoint by name, so the endpoint kinds, the client, the state and the output all
import it without importing one another.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RESULT_FIELDS", "STORED_ONLY", "Result", "answer_id", "map_texts", "set_usage", "storable",
           "storable_text", "storable_value", "text_of", "usage_counts"]


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
    # Not stored: where the response cache keeps this answer, once it is saved (see `engine.cache`)
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
        if value is not None and not value.isascii():  # (ASCII is storable: see `storable_text`)
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
    if result.cached_tokens is None:  # where other servers put it: top-level (some proxies), DeepSeek's name
        result.cached_tokens = _int(usage.get("cached_tokens", usage.get("prompt_cache_hit_tokens")))
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        result.reasoning_tokens = _int(details.get("reasoning_tokens"))


def _int(value: Any) -> int | None:
    """A token count as the API reported it; None for what no count can be (negative,
    fractional, beyond int64: the store and the output hold int64)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX:
        return value
    return None


def usage_counts(answer: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, total) tokens of an output row, or None where the server did
    not count them."""
    prompt, completion, total = answer["prompt_tokens"], answer["completion_tokens"], answer["total_tokens"]
    if prompt is None or completion is None:
        return None
    return prompt, completion, prompt + completion if total is None else total


def answer_id(answer: Mapping[str, Any], prefix: str) -> str:
    """The server's id for an output row's answer; one made from the row's index where it gave none."""
    return answer["response_id"] or f"{prefix}_{answer['row_index']}"
