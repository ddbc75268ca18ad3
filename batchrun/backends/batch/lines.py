"""A batch's input file: one line a row, split within the provider's limits.

    openai     {"custom_id": "<job>-<row>", "method": "POST", "url": "/v1/chat/completions",
                "body": {...}}
    fireworks  {"custom_id": "<job>-<row>", "body": {...}}   (the model is the job's)

A `custom_id` holds the job's fingerprint and the row's index: a line that comes back
is joined to its row by it, and a batch of another job (or of this job with another
input or configuration) is known by it and never mistaken for this one's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ...endpoints import get_endpoint
from ...inputs.rows import Row

__all__ = ["FIREWORKS", "MAX_BYTES", "OPENAI", "batch_line", "chunks", "custom_id", "row_of"]

OPENAI, FIREWORKS = "openai", "fireworks"
# The most bytes one input file may hold: OpenAI's 200 MB; Fireworks' one-request
# upload (larger files take a signed URL, not used here)
MAX_BYTES = {OPENAI: 200_000_000, FIREWORKS: 150_000_000}
_ID = re.compile(r"([0-9a-f]{16})-(\d+)")


def custom_id(job: str, row_index: int) -> str:
    """`job`: the job's fingerprint, 16 hex digits (its input and request configuration)."""
    return f"{job}-{row_index}"


def row_of(custom: Any, job: str) -> int | None:
    """The row a `custom_id` names, if it is one of this job's; else None."""
    match = _ID.fullmatch(custom) if isinstance(custom, str) else None
    return int(match.group(2)) if match and match.group(1) == job else None


def batch_line(kind: str, job: str, row: Row, model: str | None, params: Mapping[str, Any]) -> bytes:
    """The row's request as a line of `kind`'s input file, with its newline."""
    endpoint = get_endpoint(row.endpoint)
    body = endpoint.build_body(row.body, model, params)
    line: dict[str, Any] = {"custom_id": custom_id(job, row.index)}
    if kind == OPENAI:
        line.update(method="POST", url=endpoint.urls[0])
    else:  # Fireworks sets the model on the job, once for every line
        body.pop("model", None)
    line["body"] = body
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
