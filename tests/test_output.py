"""The output writer: one Parquet file, in input order, published whole (storage/output.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import InputChangedError, StorageError
from batchrun.endpoints.result import Result
from batchrun.inputs.reader import InputReader
from batchrun.storage.columns import ExtraColumn
from batchrun.storage.output import ROW_GROUP_ROWS, OutputWriter, result_schema
from batchrun.storage.state import StateStore
from tests.conftest import write_jsonl


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    state = StateStore.open(tmp_path / "out.batchrun.sqlite")
    yield state
    state.close()


def answered(rows: range) -> list[Result]:
    return [Result(i, f"r{i}", "ok", output_text=f"answer {i}", total_tokens=i, attempts=1, extra={"note": i})
            for i in rows]


def writer(tmp_path: Path, store: StateStore, rows: int, *, tags: int | None = None, start: int = 0,
           extras: tuple[ExtraColumn, ...] = ()) -> OutputWriter:
    """A writer of `rows` rows; the input holds `tags` rows (default: as many) with a `tag` column."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "tag": f"t{i}"} for i in range(tags or rows)])
    reader = InputReader(path)
    _, types = reader.validate()
    return OutputWriter(tmp_path / "out.parquet", store, reader, rows=rows, passthrough=types, extras=extras,
                        start=start)


def test_rows_are_written_in_input_order_with_their_passthrough_columns(tmp_path: Path, store: StateStore) -> None:
    store.save(answered(range(5)))
    out = writer(tmp_path, store, 5)
    out.write(3)
    assert not (tmp_path / "out.parquet").exists()  # published whole, at the end
    out.finish()

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.names == [*result_schema().names, "tag"]
    assert table.column("row_index").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("output_text").to_pylist() == [f"answer {i}" for i in range(5)]
    assert table.column("tag").to_pylist() == [f"t{i}" for i in range(5)]
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 2  # rows 0-2, then 3-4
    assert (tmp_path / "out.parquet").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.glob(".out.parquet.*")] == []  # no temporary file left


def test_a_row_not_settled_yet_cannot_be_written(tmp_path: Path, store: StateStore) -> None:
    store.save(answered(range(2)))
    out = writer(tmp_path, store, 5)
    with pytest.raises(RuntimeError, match=r"rows 0\.\.3: 2 are not settled"):
        out.write(4)
    out.discard()


def test_no_rows_is_still_a_valid_file_with_every_column(tmp_path: Path, store: StateStore) -> None:
    OutputWriter(tmp_path / "out.parquet", store, InputReader(write_jsonl(tmp_path / "in.jsonl", [])), rows=0,
                 passthrough={}).finish()

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0 and table.schema == result_schema()


def test_a_shard_writes_its_own_rows_with_their_passthrough_values(tmp_path: Path, store: StateStore) -> None:
    store.save(answered(range(4, 8)))
    out = writer(tmp_path, store, 8, start=4)
    out.finish()

    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["row_index"], r["tag"]) for r in rows] == [(i, f"t{i}") for i in range(4, 8)]


def test_an_input_shorter_than_when_the_job_began_stops_the_writer(tmp_path: Path, store: StateStore) -> None:
    store.save(answered(range(5)))
    out = writer(tmp_path, store, 5, tags=3)
    with pytest.raises(InputChangedError, match="the input has fewer rows than when the job began"):
        out.finish()
    out.discard()


def test_the_job_columns_are_filled_from_each_rows_extra(tmp_path: Path, store: StateStore) -> None:
    note = ExtraColumn("note", pa.int64, lambda extra, row: extra.get("note"))
    store.save(answered(range(3)))
    writer(tmp_path, store, 3, extras=(note,)).finish()

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.names[-2:] == ["note", "tag"]  # the job's columns, then the passthrough ones
    assert table.column("note").to_pylist() == [0, 1, 2]


def test_temporary_files_of_this_jobs_killed_runs_go_and_another_jobs_stay(tmp_path: Path,
                                                                            store: StateStore) -> None:
    mine, theirs = tmp_path / ".out.parquet.4243.tmp", tmp_path / ".out.parquet.parquet.4242.tmp"
    mine.write_bytes(b"a run killed while writing")
    theirs.write_bytes(b"the job writing out.parquet.parquet")
    store.save(answered(range(1)))

    out = writer(tmp_path, store, 1)

    assert not mine.exists() and theirs.read_bytes() == b"the job writing out.parquet.parquet"
    assert out.tmp == tmp_path / f".out.parquet.{os.getpid()}.tmp"
    out.discard()


def test_a_folder_that_cannot_take_the_file_is_a_storage_error_and_nothing_is_left(tmp_path: Path,
                                                                                   store: StateStore) -> None:
    store.save(answered(range(ROW_GROUP_ROWS + 1)))
    out = writer(tmp_path, store, ROW_GROUP_ROWS + 1)
    out.write(ROW_GROUP_ROWS)
    assert out.tmp.exists()
    (tmp_path / "out.parquet").mkdir()  # a folder where the file is to go

    with pytest.raises(StorageError, match="out.parquet: cannot write the output: .*a rerun writes it without "
                                           "sending a request"):
        out.finish()
    assert not out.tmp.exists()


def test_each_write_starts_putting_its_row_groups_on_disk(tmp_path: Path, store: StateStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """So that the fsync at the end waits for the last rows, not the whole file."""
    from batchrun.storage import durable, output

    started: list[tuple[str, int]] = []

    def write_back(path: Path) -> None:
        started.append((path.name, path.stat().st_size))
        durable.write_back(path)

    monkeypatch.setattr(output, "write_back", write_back)
    store.save(answered(range(6)))
    out = writer(tmp_path, store, 6)
    out.write(2)
    out.write(6)
    out.finish()
    assert [name for name, _ in started] == [out.tmp.name] * 2
    assert 0 < started[0][1] < started[1][1]  # after each write, with what it wrote
    assert pq.read_table(tmp_path / "out.parquet").column("row_index").to_pylist() == list(range(6))
    monkeypatch.delattr(os, "posix_fadvise")  # macOS has none: nothing to do, and no error
    durable.write_back(tmp_path / "out.parquet")
