"""A batch's files, the same for every provider: rows as input lines split within the
provider's limits, and the lines that come back joined to their rows.

A `custom_id` holds the job's fingerprint and the row's index: a line that comes back
is joined to its row by it, and a batch of another job (or of this job with another
input or configuration) is known by it and never mistaken for this one's. Lines come
back in any order; one that names no row of this job, or is not readable, is skipped:
its row, without an answer, stays to be answered, never lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ...endpoints import get_endpoint
from ...endpoints.base import Endpoint
from ...inputs.rows import Row
from .base import Outcome, Provider

__all__ = ["batch_line", "chunks", "custom_id", "read_line", "row_of"]

_ID = re.compile(r"([0-9a-f]{16})-(\d+)")


def custom_id(job: str, row_index: int) -> str:
    """`job`: the job's fingerprint, 16 hex digits (its input and request configuration)."""
    return f"{job}-{row_index}"


def row_of(custom: Any, job: str) -> int | None:
    """The row a `custom_id` names, if it is one of this job's; else None."""
    match = _ID.fullmatch(custom) if isinstance(custom, str) else None
    return int(match.group(2)) if match and match.group(1) == job else None


def batch_line(provider: Provider, job: str, row: Row, model: str | None, params: Mapping[str, Any],
               body: dict[str, Any] | None = None) -> bytes:
    """The row's request (as the live path would send it; `body`, if its caller built it
    already) as a line of the input file."""
    endpoint = get_endpoint(row.endpoint)
    if body is None:
        body = endpoint.build_body(row.body, model, params)
    if "stream" in body:  # a batch's answers are files: never streamed (a spec's `stream: true` is the live path's)
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    line = provider.line(custom_id(job, row.index), endpoint, body)
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def chunks(lines: Iterable[tuple[int, bytes]], *, max_rows: int, max_bytes: int) -> Iterator[list[tuple[int, bytes]]]:
    """(row index, line) pairs in files of at most `max_rows` lines and `max_bytes` bytes.
    A line longer than `max_bytes` alone goes in a file of its own (the provider then
    refuses that one request, not the batch)."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for index, line in lines:
        if chunk and (len(chunk) == max_rows or size + len(line) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append((index, line))
        size += len(line)
    if chunk:
        yield chunk


def read_line(provider: Provider, line: bytes, job: str, endpoint_of: Callable[[int], Endpoint], *,
              from_errors: bool = False) -> Outcome | None:
    """The outcome a line of a batch's output or error file (`from_errors`) gives its row;
    None for a line that names no row of this job."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or (index := row_of(data.get("custom_id"), job)) is None:
        return None
    return provider.outcome(index, data, endpoint_of(index), from_errors=from_errors)
