"""The output columns only some jobs have, built from a result's `extra`.

    choices    with `n` > 1: every choice, [{index, text, finish_reason, reasoning_content,
               tool_calls, logprobs}]; output_text and its neighbours stay choice 0
    logprobs   when log-probabilities are asked for: choice 0's tokens,
               [{token, logprob, top_logprobs: [{token, logprob}]}], for chat and completions alike
    request    with `keep_request: true`: the request body as sent, JSON text

A job's columns follow from its spec, so that every row group has the same schema;
a row without the value (failed, or answered before the option was set) holds null.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from ._spec import JobSpec

__all__ = ["ExtraColumn", "extra_columns"]


@dataclass(frozen=True)
class ExtraColumn:
    name: str
    type: Callable[[], pa.DataType]
    value: Callable[[dict[str, Any], dict[str, Any] | None], Any]  # (extra, the row's other columns)
    needs_row: bool = False

    def array(self, extras: list[dict[str, Any]], rows: list[dict[str, Any] | None]) -> pa.Array:
        import pyarrow as pa

        return pa.array([self.value(e, r) for e, r in zip(extras, rows)], type=self.type())


@functools.cache
def logprobs_type() -> pa.DataType:
    import pyarrow as pa

    alternative = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
    return pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64()),
                               ("top_logprobs", pa.list_(alternative))]))


@functools.cache
def choices_type() -> pa.DataType:
    import pyarrow as pa

    return pa.list_(pa.struct([
        ("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string()),
        ("reasoning_content", pa.string()), ("tool_calls", pa.string()), ("logprobs", logprobs_type()),
    ]))


def _string() -> pa.DataType:
    import pyarrow as pa

    return pa.string()


def _choices(extra: dict[str, Any], row: dict[str, Any] | None) -> Any:
    if "choices" in extra:
        return extra["choices"]
    if row is None or row["status"] != "ok":
        return None
    # The server gave one choice (n: 1 on this row, or a server that ignores n)
    return [{"index": 0, "text": row["output_text"], "finish_reason": row["finish_reason"],
             "reasoning_content": row["reasoning_content"], "tool_calls": row["tool_calls"],
             "logprobs": extra.get("logprobs")}]


def wants_choices(params: dict[str, Any]) -> bool:
    n = params.get("n")
    return type(n) is int and n > 1


def wants_logprobs(params: dict[str, Any]) -> bool:
    value = params.get("logprobs")
    return value is not None and value is not False


def extra_columns(spec: JobSpec) -> list[ExtraColumn]:
    params = dict(spec.params)
    columns = []
    if wants_choices(params):
        columns.append(ExtraColumn("choices", choices_type, _choices, needs_row=True))
    if wants_logprobs(params):
        columns.append(ExtraColumn("logprobs", logprobs_type, lambda extra, row: extra.get("logprobs")))
    if spec.keep_request:
        columns.append(ExtraColumn("request", _string, lambda extra, row: extra.get("request")))
    return columns
