"""The output columns only some jobs have, built from a result's `extra`.

    choices    with `n` > 1: every choice, [{index, text, finish_reason, reasoning_content,
               tool_calls, logprobs}]; output_text and its neighbours stay choice 0
    logprobs   when log-probabilities are asked for: choice 0's tokens,
               [{token, logprob, top_logprobs: [{token, logprob}]}], for chat and completions alike
    request    with `keep_request: true`: the request body as sent, JSON text
    parsed     with a schema: the answer's JSON, typed from the schema (see `_structured`)
    embedding  with `endpoint: embeddings`: the vector, list<float32>, from its stored bytes
    cached     with `cache`: whether the answer came from the response cache (no request, nothing paid)
    backend    with `batch_api`: the path that answered, "batch" (the provider's batch API) or "live"
               (null for an answer from the response cache)

A job's columns follow from its spec, so that every row group has the same schema;
a row without the value (failed, or answered before the option was set) holds null.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..endpoints import job_endpoint
from ..endpoints.choices import wants_choices, wants_logprobs
from ..spec.schema import Structure

if TYPE_CHECKING:
    from ..spec.parse import JobSpec

__all__ = ["ExtraColumn", "extra_columns"]


@dataclass(frozen=True)
class ExtraColumn:
    name: str
    type: Callable[[], pa.DataType]
    value: Callable[[dict[str, Any], dict[str, Any] | None], Any]  # (extra, the row's other columns)
    needs_row: bool = False
    # A value's own conversion, for a column a value may not fit (then tried one by one)
    fit: Callable[[Any, pa.DataType], Any] | None = None

    def array(self, extras: list[dict[str, Any]], rows: list[dict[str, Any] | None],
              blobs: Sequence[bytes | None]) -> pa.Array:
        if self.name == "embedding":
            return _float32_lists(blobs)
        values = [self.value(e, r) for e, r in zip(extras, rows)]
        typed = self.type()
        try:
            return pa.array(values, type=typed)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            if self.fit is None:
                raise
            fit = self.fit
            return pa.array([fit(v, typed) for v in values], type=typed)


@functools.cache
def logprobs_type() -> pa.DataType:
    alternative = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
    return pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64()),
                               ("top_logprobs", pa.list_(alternative))]))


@functools.cache
def choices_type() -> pa.DataType:
    return pa.list_(pa.struct([
        ("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string()),
        ("reasoning_content", pa.string()), ("tool_calls", pa.string()), ("logprobs", logprobs_type()),
    ]))


def _string() -> pa.DataType:
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


@functools.cache
def _float32_list() -> pa.DataType:
    return pa.list_(pa.float32())


def _float32_lists(blobs: Sequence[bytes | None]) -> pa.Array:
    """Stored float32 vectors as a list<float32> column, straight from their bytes."""
    offsets = [0]
    for blob in blobs:
        offsets.append(offsets[-1] + (len(blob) // 4 if blob is not None else 0))
    values = pa.Array.from_buffers(pa.float32(), offsets[-1],
                                   [None, pa.py_buffer(b"".join(b for b in blobs if b is not None))])
    # Validity as a bitmap of its own: a mask (ListArray.from_arrays) imports
    # pyarrow.compute, 0.1 s, in the middle of the job
    valid = pa.array([b is not None for b in blobs], pa.bool_()).buffers()[1] if None in blobs else None
    return pa.Array.from_buffers(_float32_list(), len(blobs), [valid, pa.array(offsets, pa.int32()).buffers()[1]],
                                 children=[values])


def extra_columns(spec: JobSpec, asks: Sequence[str] = ()) -> list[ExtraColumn]:
    """The job's optional columns: those its spec asks for, and `asks`, those its rows ask
    for themselves (a batch line's `n` or `logprobs`: see `InputReader.asks`)."""
    params = dict(spec.params)
    if "choices" in asks:
        params["n"] = max(2, params.get("n") if type(params.get("n")) is int else 2)
    if "logprobs" in asks and not wants_logprobs(params):
        params["logprobs"] = True
    columns = []
    if "embedding" in job_endpoint(spec.endpoint).output_columns:
        columns.append(ExtraColumn("embedding", _float32_list, lambda extra, row: None))
    if wants_choices(params):
        columns.append(ExtraColumn("choices", choices_type, _choices, needs_row=True))
    if wants_logprobs(params):
        columns.append(ExtraColumn("logprobs", logprobs_type, lambda extra, row: extra.get("logprobs")))
    if spec.keep_request:
        columns.append(ExtraColumn("request", _string, lambda extra, row: extra.get("request")))
    schema = spec.answer_schema()
    if schema is not None:
        columns.append(_parsed_column(schema))
    if spec.cache is not None:
        columns.append(ExtraColumn("cached", _bool, lambda extra, row: bool(extra.get("cached"))))
    if spec.batch_api is not None:
        columns.append(ExtraColumn("backend", _string, _backend))
    return columns


def _backend(extra: dict[str, Any], row: dict[str, Any] | None) -> str | None:
    """The path that answered the row: the batch's answers say so; an answer from the
    response cache took neither (null)."""
    return extra.get("backend") or (None if extra.get("cached") else "live")


def _bool() -> pa.DataType:
    return pa.bool_()


def _parsed_column(schema: Any) -> ExtraColumn:
    typed = Structure(schema).arrow_type()
    if typed is None:
        return ExtraColumn("parsed", _string, lambda extra, row: _json_text(extra.get("parsed", _ABSENT)))
    return ExtraColumn("parsed", lambda: typed, lambda extra, row: extra.get("parsed"), fit=_fitting)


_ABSENT = object()


def _json_text(value: Any) -> str | None:
    return None if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def _fitting(value: Any, typed: pa.DataType) -> Any:
    """The value, if Arrow can hold it in the column's type: an integer past int64, valid
    JSON and valid against the schema, cannot; that row's `parsed` is null (its answer is
    in output_text)."""
    if value is None:
        return None
    try:
        pa.array([value], type=typed)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None
    return value
