"""Reading input rows from the input's files (see `files`), always streamed.

Each record becomes a `Row` (see `rows`): its position, its id, the endpoint it goes
to and the request fields it carries itself. Everything else in the record is a
passthrough column, copied to the output beside the answer. With a template
(`template`) every row is rendered from its columns instead, and all of them pass
through.

The input is read more than once (to validate, to run, to write the output), so the
reader is a small object that can start over rather than a one-shot iterator. A small
input (up to KEEP_BYTES of text) keeps the rows validation made for the pass that
follows, which then reads nothing: a few megabytes of rows, not the run's time again.
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from .._exceptions import InputChangedError, InputError, StorageError
from ..endpoints.choices import wants_choices, wants_logprobs
from .files import InputFile, check_all_unchanged, combined_fingerprint
from .passthrough import coerce, column_kind, conform, jsonl_schema, schema_kind, unify, value_kind
from .rows import BATCH_FIELDS, ID_FIELDS, Row, RowReader
from .template import Template

__all__ = ["InputReader", "Row", "OUTPUT_COLUMNS", "fewer_collections"]

KEEP_BYTES = 4 << 20  # an input with at most this much text keeps its validated rows for the next pass

# The answer's columns; an input column of the same name would be ambiguous.
OUTPUT_COLUMNS = (
    "row_index id status output_text reasoning_content tool_calls finish_reason model "
    "response_id prompt_tokens completion_tokens total_tokens cached_tokens "
    "reasoning_tokens cost_usd attempts latency_s error"
).split()


class InputReader:
    """Streams rows from the input's files as one table, from the start each time it is asked.

    Every pass reads the version of each file that was there when the reader was
    made (see `pinned`); `close()` lets them go.
    """

    def __init__(
        self, paths: Path | Sequence[Path], *, endpoint: str | None = None, require_model: bool = False,
        template: Template | None = None, reserved: Sequence[str] = (), priced: Collection[str] | None = None,
        bounded: bool = False, batch_rows: int = 1024,
    ) -> None:
        paths = [paths] if isinstance(paths, Path) else list(paths)
        self.endpoint = endpoint
        self.template = template
        self._rows = RowReader(endpoint=endpoint, require_model=require_model, template=template, priced=priced,
                               bounded=bounded, several_files=len(paths) > 1)
        # The output's columns (the job's optional ones too): an input column must not take a name
        self.reserved = frozenset(OUTPUT_COLUMNS).union(reserved)
        self.batch_rows = batch_rows
        self.files: list[InputFile] = []
        try:
            for path in paths:
                self.files.append(InputFile(path))
        except BaseException:
            self.close()
            raise
        # One file is named by its path; several by the first and their count.
        self.name = str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more input files"
        # validate() checks every row can be carried; later passes over the same bytes need not
        self._checking = False
        self._fingerprinted = False
        # Optional output columns the rows ask for themselves ("choices" for n > 1,
        # "logprobs"), found by validate()
        self.asks: list[str] = []
        self._kept: list[Row] | None = None  # a small input's validated rows, for the next pass

    def close(self) -> None:
        self._kept = None
        for f in self.files:
            f.close()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- whole-input checks ------------------------------------------------------------

    def fingerprint(self) -> str:
        """A digest of every file's bytes, in order: a resume must see the very same input."""
        with self._before_the_run():
            digest = combined_fingerprint(self.files)
        self._fingerprinted = True
        return digest

    def check_unchanged(self) -> None:
        """Raise InputChangedError if a file was changed in place since it was opened."""
        check_all_unchanged(self.files)

    def validate(self) -> tuple[int, dict[str, str]]:
        """Parse every row once before any request; return (row count, passthrough types).

        Ids are checked for duplicates in a temporary on-disk SQLite table so that
        memory does not grow with the input; a small input's, whose rows are kept
        anyway, in memory.
        """
        with self._before_the_run(), fewer_collections():
            count, types = self._validate()
            if len(self.files) > 1:
                self._passthrough_schema(types)  # files whose columns cannot be one table: say so now
            return count, types

    @contextlib.contextmanager
    def _before_the_run(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise InputError(f"{self.name}: cannot read: {exc.strerror or exc}") from exc
        except InputChangedError as exc:
            place = str(exc).split(": the input file was changed")[0]
            raise InputError(f"{place}: the file changed while batchrun checked it; "
                             "rerun once it is written in full") from None

    def _validate(self) -> tuple[int, dict[str, str]]:
        kinds = self._schema_kinds()
        count = 0
        asks: set[str] = set()
        duplicates: list[str] = []
        kept: list[Row] | None = [] if sum(f.text_bytes for f in self.files) <= KEEP_BYTES else None
        ids = _GivenIds(on_disk=kept is None)
        # Most inputs have no ids: a row's id is then its position, unique by itself, and
        # only ids given in the input go to the table. taken[i]: row i's id is "i".
        taken = bytearray()
        self._checking = True
        try:
            for rows, extras in self._batches(collect_extras=True):
                count += len(rows)
                for name, values in extras.items():
                    kinds.setdefault(name, set()).update(value_kind(v) for v in values)
                taken.extend(bytes(len(rows)))
                if kept is not None:
                    kept += rows
                if self.template is None:
                    asks.update(*(_asks(row.body) for row in rows if "n" in row.body or "logprobs" in row.body))
                duplicates += ids.add(rows, taken)
                if len(duplicates) >= 5:
                    break
            else:
                duplicates += ids.at_positions(taken)
        finally:
            self._checking = False
            ids.close()
        if duplicates:
            raise InputError(
                f"{self.name}: duplicate row ids: {'; '.join(duplicates[:5])}; "
                "every id and custom_id must be unique"
            )
        self.asks = sorted(asks)
        self._kept = kept
        return count, {name: column_kind(k) for name, k in kinds.items()}

    def _schema_kinds(self) -> dict[str, set[str]]:
        """The passthrough columns of the Parquet and CSV files, and their types' kinds
        (JSONL's are found row by row)."""
        kinds: dict[str, set[str]] = {}
        for f in self.files:
            if not f.is_arrow:
                continue
            for field in f.arrow_schema():
                if self._passes(field.name):
                    if field.name in self.reserved:
                        raise f.error(f.columns_place(), f"column {field.name!r} clashes with the output "
                                                         "column of that name; rename it in the input")
                    kinds.setdefault(field.name, set()).add(schema_kind(field.type))
        return kinds

    # -- streaming ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _during_the_run(self) -> Iterator[None]:
        """A pass over fingerprinted bytes, which were validated (now, or by the run that
        saved the same fingerprint): a line that no longer reads means the file changed."""
        try:
            yield
        except InputError as exc:
            if not self._fingerprinted:
                raise
            raise InputChangedError(f"{exc}; the input file was changed while the job ran. Rows already "
                                    "answered are saved; restore the file and rerun, or rerun with --restart"
                                    ) from None

    def rows(self, start: int = 0, *, batch_rows: int | None = None) -> Iterator[Row]:
        if self._kept is not None:  # validated just now, and small: the rows are at hand
            kept, self._kept = self._kept, None
            kept.reverse()  # taken from the end: each row is let go once handed out
            while kept:
                row = kept.pop()
                if row.index >= start:
                    yield row
            return
        with self._during_the_run():
            for rows, _ in self._batches(collect_extras=False, batch_rows=batch_rows):
                if rows and rows[-1].index < start:
                    continue
                for row in rows:
                    if row.index >= start:
                        yield row

    def passthrough_batches(self, types: dict[str, str], *, batch_rows: int | None = None) -> Iterator[pa.Table]:
        """The passthrough columns, a table per `batch_rows` rows (fewer at a file's end),
        in the types `validate` chose.

        Only those columns are kept: prompts and messages are parsed and dropped line by
        line, so memory follows the passthrough data, not the request data.
        """
        with self._during_the_run():
            yield from self._passthrough_batches(types, batch_rows or self.batch_rows)

    def _passthrough_batches(self, types: dict[str, str], batch_rows: int) -> Iterator[pa.Table]:
        names = list(types)
        schema = self._passthrough_schema(types)
        for f in self.files:
            if f.is_arrow:
                present = [name for name in names if name in f.arrow_schema().names]
                for batch in f.arrow_batches(present, batch_rows):
                    yield conform(pa.Table.from_batches([batch]), schema)
                continue
            own = jsonl_schema(types)
            columns: dict[str, list[Any]] = {name: [] for name in names}
            count = 0
            for _, record, _ in f.records(checking=False, batch_rows=batch_rows):
                for name in names:
                    columns[name].append(coerce(record.get(name), types[name]))
                count += 1
                if count == batch_rows:
                    yield conform(pa.Table.from_pydict(columns, schema=own), schema)
                    columns, count = {name: [] for name in names}, 0
            if count:
                yield conform(pa.Table.from_pydict(columns, schema=own), schema)

    def _passthrough_schema(self, types: dict[str, str]) -> pa.Schema:
        """One schema for the passthrough columns of every file: a Parquet or CSV file's own
        types, JSONL's inferred ones (see `passthrough.unify`)."""
        names = list(types)
        schemas = []
        for f in self.files:
            if f.is_arrow:
                own = f.arrow_schema()
                schemas.append((str(f.path), pa.schema([own.field(name) for name in names if name in own.names])))
            else:
                schemas.append((str(f.path), jsonl_schema(types)))
        try:
            return unify(schemas, names)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    # -- parsing -------------------------------------------------------------------------

    def _batches(self, *, collect_extras: bool,
                 batch_rows: int | None = None) -> Iterator[tuple[list[Row], dict[str, list[Any]]]]:
        batch_rows = batch_rows or self.batch_rows
        rows: list[Row] = []
        extras: dict[str, list[Any]] = {}
        passes = self._passes
        index = 0
        for f in self.files:
            # A Parquet or CSV file's columns are typed by its schema: `_validate` reads that.
            typed = f.is_arrow
            for where, record, suspect in f.records(checking=self._checking, batch_rows=batch_rows):
                rows.append(self._rows.read(f, index, where, record, checking=self._checking,
                                            check=self._checking and suspect))
                index += 1
                if collect_extras and not typed:
                    for key, value in record.items():
                        if passes(key):
                            column = extras.get(key)
                            if column is None:
                                if key in self.reserved:
                                    raise f.error(where, f"column {key!r} clashes with the output column of that "
                                                         "name; rename it in the input")
                                column = extras[key] = [None] * (len(rows) - 1)
                            column.append(value)
                    for column in extras.values():
                        if len(column) < len(rows):
                            column.append(None)
                if len(rows) >= batch_rows:
                    yield rows, extras
                    rows, extras = [], {}
        if rows:
            yield rows, extras

    def _passes(self, key: str) -> bool:
        """Whether a column passes through to the output. With a template, columns are
        its values, not request fields: all but the id pass through."""
        if key in ID_FIELDS:
            return False
        return self.template is not None or key not in self._rows.request_fields and key not in BATCH_FIELDS

def _asks(body: dict[str, Any]) -> set[str]:
    return {name for name, wanted in (("choices", wants_choices(body)), ("logprobs", wants_logprobs(body)))
            if wanted}


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Validation, and a run's requests, make several small objects per row and drop them
    soon after; Python's collector would otherwise walk the young ones every 700
    allocations: a sixth of a large input's validation time, a tenth of a run's CPU
    (0.88 s of 8.5 in the zero-latency bench). Cycles are still collected, only in
    larger steps."""
    saved = gc.get_threshold()
    gc.set_threshold(50_000, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)




class _GivenIds:
    """The ids the input gives, checked for duplicates as they come (an id that is its
    row's position is only marked in `taken`): `on_disk`, in a table in a private
    temporary database (""), so that memory does not grow with the input; else in a
    dict, for an input whose rows are kept in memory anyway (SQLite's inserts were a
    fifth of its validation)."""

    def __init__(self, *, on_disk: bool) -> None:
        self.places: dict[str, str] = {}  # in memory: where each id was first given
        self.table: sqlite3.Connection | None = None
        if on_disk:
            try:
                self.table = sqlite3.connect("")
                self.table.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, place TEXT)")
            except sqlite3.Error as exc:
                raise _no_room(exc) from exc

    def add(self, rows: list[Row], taken: bytearray) -> list[str]:
        """Marks the rows whose id is their position in `taken`, adds the others' ids;
        returns the duplicates found."""
        given = []
        for row in rows:
            if row.id == str(row.index):
                taken[row.index] = 1
            else:
                given.append(row)
        if self.table is not None:
            return _insert(self.table, given)
        found = []
        places = self.places
        for row in given:
            if (first := places.get(row.id)) is None:
                places[row.id] = row.where
            else:
                found.append(f"{row.id!r} at {first} and {row.where}")
        return found

    def at_positions(self, taken: bytearray) -> list[str]:
        """Given ids that are another row's position, that row having no id of its own."""
        found = []
        pairs = self.places.items() if self.table is None else \
            self.table.execute("SELECT id, place FROM ids WHERE id GLOB '[0-9]*'")
        for row_id, place in pairs:
            if row_id.isascii() and row_id.isdigit() and str(int(row_id)) == row_id \
                    and int(row_id) < len(taken) and taken[int(row_id)]:
                found.append(f"{row_id!r} at {place} and at position {row_id}, a row without "
                             "an id (its id is its position)")
        return found

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


def _no_room(exc: sqlite3.Error) -> StorageError:
    return StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                        "free space in the temporary folder (or point TMPDIR elsewhere) and rerun")


def _insert(table: sqlite3.Connection, rows: list[Row]) -> list[str]:
    """The rows' ids into `table`; returns the duplicates found. A batch goes in at once;
    only a batch with a duplicate is redone row by row."""
    try:
        with table:
            table.executemany("INSERT INTO ids VALUES (?, ?)", [(row.id, row.where) for row in rows])
    except sqlite3.IntegrityError:
        return _duplicates(table, rows)
    except sqlite3.Error as exc:
        raise _no_room(exc) from exc
    return []


def _duplicates(table: sqlite3.Connection, rows: list[Row]) -> list[str]:
    """Insert one by one, naming each id already there (earlier, or in this batch)."""
    found = []
    for row in rows:
        try:
            with table:
                table.execute("INSERT INTO ids VALUES (?, ?)", (row.id, row.where))
        except sqlite3.IntegrityError:
            (first,) = table.execute("SELECT place FROM ids WHERE id = ?", (row.id,)).fetchone()
            found.append(f"{row.id!r} at {first} and {row.where}")
    return found
