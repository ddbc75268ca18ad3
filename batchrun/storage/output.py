"""The output writer: one Parquet file, in input order, written atomically.

The file is assembled from the checkpoint store and the input's passthrough
columns in row groups, so memory stays flat however long the job.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .._exceptions import InputChangedError, StorageError
from ..endpoints.result import RESULT_FIELDS, STORED_ONLY
from ..inputs.reader import InputReader
from .columns import ExtraColumn
from .durable import fsync, write_back
from .state import StateStore

__all__ = ["OutputWriter", "load_arrow", "parquet_writer", "result_schema"]

ROW_GROUP_ROWS = 8192  # the most rows a row group holds
ROW_GROUP_BYTES = 8 << 20  # about the most: rows of vectors or long answers go fewer to a group
MIN_GROUP_ROWS = 64


def group_rows(row_bytes: float) -> int:
    """Rows to a row group when a row holds about `row_bytes`: ROW_GROUP_ROWS, or fewer
    so that the group holds about ROW_GROUP_BYTES. A group is one table in memory, and
    the last is written after the last answer: vectors of 1,024 and 1,536 floats went
    some 2,000 and 1,300 to a group rather than 8,192, for a quarter to a half less peak
    memory and about half the wait after the last answer (`tests/bench/run.py --scenario
    embeddings`)."""
    return min(ROW_GROUP_ROWS, max(MIN_GROUP_ROWS, int(ROW_GROUP_BYTES // max(row_bytes, 1.0))))


def load_arrow() -> None:
    """Build the output's schema ahead of the first row group, while the loop is idle."""
    result_schema()


@functools.cache
def result_schema() -> pa.Schema:
    """The answer's columns, in RESULT_FIELDS order (less `extra`, which becomes the
    columns a job asks for: see `_columns`); the passthrough columns follow."""
    string, int64 = pa.string(), pa.int64()
    schema = pa.schema(
        [
            ("row_index", int64),
            ("id", string),
            ("status", string),
            ("output_text", string),
            ("reasoning_content", string),
            ("tool_calls", string),
            ("finish_reason", string),
            ("model", string),
            ("response_id", string),
            ("prompt_tokens", int64),
            ("completion_tokens", int64),
            ("total_tokens", int64),
            ("cached_tokens", int64),
            ("reasoning_tokens", int64),
            ("cost_usd", pa.float64()),
            ("attempts", pa.int32()),
            ("latency_s", pa.float64()),
            ("error", string),
        ]
    )
    assert tuple(schema.names) == RESULT_FIELDS[:-len(STORED_ONLY)] and RESULT_FIELDS[-len(STORED_ONLY):] == STORED_ONLY
    return schema


class OutputWriter:
    """Writes the output as rows settle, in input order, and publishes it atomically.

    Row groups are appended to a temporary file in the output's folder while the
    job runs, so finishing a long job costs the last few rows, not a rewrite of
    millions. `finish` fsyncs it and renames it over the target: a reader sees the
    old file or the whole new one, never half of one.
    """

    def __init__(self, path: Path, store: StateStore, reader: InputReader, *, rows: int,
                 passthrough: dict[str, str], extras: Sequence[ExtraColumn] = (), start: int = 0) -> None:
        """Rows [start, rows) go to the file: a shard's part begins at its first row."""
        self.path = path
        self.extras = tuple(extras)
        self.store = store
        self.rows = rows
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Left by runs of this job killed while writing; the job's lock, held now, says
        # they are dead. Only this job's names: `.x.parquet.parquet.7.tmp` is another job's.
        own = re.compile(rf"\.{re.escape(path.name)}\.\d+\.tmp")
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if own.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        self._extras = reader.passthrough_batches(passthrough, batch_rows=ROW_GROUP_ROWS) if passthrough else None
        self.reader_name = reader.name
        self._pending: pa.Table | None = None  # passthrough rows read, not yet written
        self._writer: pq.ParquetWriter | None = None
        self.written = start  # rows [start, written) are in the file
        self.group_rows = ROW_GROUP_ROWS  # rows to a row group (see `group_rows`)
        self._to_skip = start  # passthrough rows before the first: read over at the first write

    def write(self, stop: int) -> None:
        """Append rows [written, stop) in row groups of at most `group_rows`; each must be settled."""
        if stop <= self.written:
            return
        with self._storage_errors():
            table = _result_table(self.store, self.written, stop, self.extras)
            if self._extras is not None:
                extra = self._take(stop - self.written)
                for name, column in zip(extra.column_names, extra.columns):
                    table = table.append_column(name, column)
            if self._writer is None:
                self._writer = parquet_writer(self.tmp, table.schema)
            # Groups of equal size, none past `group_rows`: a few rows past a group's worth
            # (settled while the last write ran) make two halves, not a group of one
            groups = -(-table.num_rows // self.group_rows)
            self._writer.write_table(table, row_group_size=max(1, -(-table.num_rows // max(groups, 1))))
            self.written = stop
            # On disk as the job goes: the fsync at the end waits for the last groups, not
            # the whole file (120 MB of vectors: 0.18-0.20 s after the last answer, now 13-70 ms)
            write_back(self.tmp)

    def finish(self) -> None:
        """Write what is left and put the file in place."""
        self.write(self.rows)
        with self._storage_errors():
            if self._writer is None:  # no rows at all: still a valid, empty file
                self._writer = parquet_writer(self.tmp, _result_table(self.store, 0, 0, self.extras).schema)
            self._writer.close()
            fsync(self.tmp)
            os.replace(self.tmp, self.path)
            fsync(self.path.parent)

    def discard(self) -> None:
        """Drop the unfinished file; what cannot be removed now, the next run sweeps."""
        with contextlib.suppress(OSError):
            if self._writer is not None:
                self._writer, writer = None, self._writer
                writer.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def _skip(self, n: int) -> None:
        """Pass over the first n passthrough rows (those of the shards before this one)."""
        while n > 0:
            batch = self._next_batch()
            self._pending = batch.slice(n)
            n -= min(n, batch.num_rows)

    def _next_batch(self) -> pa.Table:
        if self._pending is None or self._pending.num_rows == 0:
            assert self._extras is not None
            self._pending = next(self._extras, None)
            if self._pending is None:
                raise InputChangedError(f"{self.reader_name}: the input has fewer rows than when the "
                                        "job began; it was changed while the job ran")
        return self._pending

    def _take(self, n: int) -> pa.Table:
        """The next n passthrough rows, across the reader's batches."""
        assert self._extras is not None
        if self._to_skip:
            self._skip(self._to_skip)
            self._to_skip = 0
        parts = []
        while n > 0:
            part = self._next_batch().slice(0, n)
            self._pending = self._pending.slice(part.num_rows)
            parts.append(part)
            n -= part.num_rows
        return pa.concat_tables(parts)

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        try:
            yield
        except (OSError, sqlite3.Error) as exc:  # ArrowIOError is an OSError
            self.discard()
            raise StorageError(
                f"{self.path}: cannot write the output: {getattr(exc, 'strerror', None) or exc}; every answer "
                "is saved, so a rerun writes it without sending a request"
            ) from exc


def _result_table(store: StateStore, start: int, stop: int, extras: Sequence[ExtraColumn] = ()) -> pa.Table:
    stored = store.results(start, stop)
    if len(stored) != stop - start:
        raise RuntimeError(f"rows {start}..{stop - 1}: {stop - start - len(stored)} are not settled")
    columns = list(zip(*stored)) if stored else [()] * len(RESULT_FIELDS)
    schema = result_schema()
    table = pa.Table.from_arrays([pa.array(col, type=field.type) for col, field in zip(columns, schema)],
                                 schema=schema)
    if extras:
        rows = table.to_pylist() if any(extra.needs_row for extra in extras) else [None] * len(stored)
        found = [json.loads(text) if text else {} for text in columns[_EXTRA]]
        for extra in extras:
            table = table.append_column(extra.name, extra.array(found, rows, columns[_EMBEDDING]))
    return table


_EXTRA, _EMBEDDING = RESULT_FIELDS.index("extra"), RESULT_FIELDS.index("embedding")


def parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Made first, readable by its owner only whatever the umask: it holds the answers.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    # Dictionary encoding helps text that repeats (status, model, finish_reason); on vectors
    # of floats it never does, and it costs more than the rest of writing them. Nor does
    # compression do much for them: zstd saves 7 % of a float32 embedding for half the time.
    dictionary = [name for name in schema.names if name not in ("embedding", "logprobs")]
    compression = {name: "none" if name == "embedding" else "zstd" for name in schema.names}
    if "embedding" not in schema.names:
        return pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dictionary)
    # Nor does a vector's minimum and maximum help a reader; without them, and with the
    # values written 64 Ki at a time rather than 1 Ki, 20,000 vectors of 1,024 floats
    # went to the file in 290 ms against 370 (the median of seven, twice)
    return pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dictionary,
                            write_statistics=[name for name in schema.names if name != "embedding"],
                            write_batch_size=64 << 10)

