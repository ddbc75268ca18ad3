"""The output writer: one Parquet file, in input order, written atomically.

The file is assembled from the checkpoint store and the input's passthrough
columns in row groups, so memory stays flat however long the job. It is written
under a temporary name in the same folder, fsynced, then renamed over the target:
a reader sees the old file or the whole new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ._exceptions import StorageError
from ._inputs import InputReader
from ._protocol import RESULT_FIELDS
from ._state import StateStore

__all__ = ["RESULT_SCHEMA", "write_output"]

RESULT_SCHEMA = pa.schema(
    [
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("status", pa.string()),
        ("output_text", pa.string()),
        ("reasoning_content", pa.string()),
        ("tool_calls", pa.string()),
        ("finish_reason", pa.string()),
        ("model", pa.string()),
        ("response_id", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
    ]
)
assert tuple(RESULT_SCHEMA.names) == RESULT_FIELDS

ROW_GROUP_ROWS = 8192


def write_output(
    path: Path, store: StateStore, reader: InputReader, *, rows: int, passthrough: dict[str, str]
) -> None:
    """Write rows [0, rows) of the job to `path`; every one must be settled in `store`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        batches = reader.passthrough_batches(passthrough) if passthrough else None
        writer: pq.ParquetWriter | None = None
        start = 0
        while start < rows or writer is None:
            extra = next(batches, None) if batches is not None else None
            stop = min(rows, start + (extra.num_rows if extra is not None else ROW_GROUP_ROWS))
            if extra is not None and extra.num_rows > stop - start:
                extra = extra.slice(0, stop - start)
            table = _result_table(store, start, stop)
            if extra is not None:
                for name, column in zip(extra.column_names, extra.columns):
                    table = table.append_column(name, column)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            start = stop
        writer.close()
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{path}: cannot write the output: {exc.strerror or exc}; every answer is saved, "
            "so a rerun writes it without sending a request"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _result_table(store: StateStore, start: int, stop: int) -> pa.Table:
    stored = store.results(start, stop)
    if len(stored) != stop - start:
        raise RuntimeError(f"rows {start}..{stop - 1}: {stop - start - len(stored)} are not settled")
    columns = list(zip(*stored)) if stored else [()] * len(RESULT_FIELDS)
    return pa.Table.from_arrays(
        [pa.array(col, type=field.type) for col, field in zip(columns, RESULT_SCHEMA)], schema=RESULT_SCHEMA
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
