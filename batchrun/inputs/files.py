"""The input's files: which ones a spec names, and reading records from each.

`input:` may name one file, a glob or a list of either; `expand_inputs` turns that into
the files themselves, in sorted order, and `InputFile` reads one of them, whatever its
format: JSONL (gzipped or not) line by line, Parquet and CSV through Arrow as typed
record batches (CSV's own rules are in `csv_lines`). Each file is pinned (`pinned`) for the
whole job.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .._exceptions import InputError
from .._json import loads_line
from . import csv_lines
from .checks import MAX_DEPTH, check_record
from .pinned import PinnedFile


__all__ = ["INPUT_SUFFIXES", "InputFile", "check_all_unchanged", "combined_fingerprint", "expand_inputs"]

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".csv")
COMPRESSION = 10  # what a compressed input's size is multiplied by, to bound the text it holds
Record = tuple[str, dict[str, Any], bool]  # (where, record, suspect)


def expand_inputs(patterns: Sequence[Path]) -> list[Path]:
    """Every file the patterns name, once each, sorted by path: the order rows are read in.

    A pattern without glob characters must be a file; a glob must match at least one.
    """
    found: set[Path] = set()
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise InputError(f"{text}: no input file matches this pattern")
        else:
            if not pattern.is_file():
                raise InputError(f"{pattern}: input file not found")
            matches = [pattern]
        for path in matches:
            if not path.name.endswith(INPUT_SUFFIXES):
                raise InputError(f"{path}: matched by input {text!r}, but only {', '.join(INPUT_SUFFIXES)} files "
                                 "can be read; narrow the pattern")
        found.update(matches)
    return sorted(found, key=str)


class InputFile:
    """One input file, held open for the job; each `records()` call is a fresh pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_parquet = path.suffix == ".parquet"
        self.is_csv = path.suffix == ".csv"
        # Parquet and CSV are read through Arrow: typed columns, record batches, nulls
        # for absent values; JSONL line by line.
        self.is_arrow = self.is_parquet or self.is_csv
        self._schema: pa.Schema | None = None
        try:
            self._pinned = PinnedFile(path)
        except FileNotFoundError:
            raise InputError(f"{path}: input file not found") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._pinned.close()

    def error(self, where: str, message: str) -> InputError:
        return InputError(f"{self.path}: {where}: {message}")

    def columns_place(self) -> str:
        """Where a problem with the file's columns is named: a CSV's header line."""
        if not self.is_csv:
            return "row 0"
        with self._pinned.open() as raw:
            return f"line {csv_lines.header_line(raw)}"

    @property
    def digest(self) -> str | None:
        return self._pinned.digest

    @property
    def text_bytes(self) -> int:
        """About how many bytes of text its rows hold, at most: a compressed file's (gzip,
        Parquet) counted as COMPRESSION times its size on disk."""
        compressed = self.is_parquet or self.path.name.endswith(".gz")
        return self._pinned.size * (COMPRESSION if compressed else 1)

    def fingerprint(self) -> str:
        return self._pinned.fingerprint()

    def check_unchanged(self) -> None:
        self._pinned.check()

    def records(self, *, checking: bool, batch_rows: int) -> Iterator[Record]:
        if self.is_csv:
            return self._csv_records()
        return self._parquet_records(batch_rows) if self.is_parquet else self._jsonl_records(checking)

    def _jsonl_records(self, checking: bool) -> Iterator[Record]:
        """Only a suspect record can hold what JSON cannot carry; `checking` looks for them."""
        try:
            with self._pinned.open() as raw, (gzip.GzipFile(fileobj=raw, mode="rb")
                                              if self.path.name.endswith(".gz") else raw) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"line {number}"
                    try:
                        record, strict = loads_line(line)
                    except RecursionError:
                        raise self.error(where, "nested too deeply to read; no request needs that") from None
                    except json.JSONDecodeError as exc:  # where in this line, not at the parser's "line 2"
                        end = len(line.rstrip().decode("utf-8", "replace"))  # (the parser counts characters)
                        at = "the end of the line" if exc.pos >= end else f"column {exc.pos + 1}"
                        raise self.error(where, f"not valid JSON ({exc.msg} at {at})") from None
                    except ValueError as exc:  # UnicodeDecodeError, huge integers
                        raise self.error(where, f"not valid JSON ({exc})") from None
                    if not isinstance(record, dict):
                        raise self.error(where, f"expected a JSON object, got {type(record).__name__}")
                    # Only a line msgspec refused (json read it) or one with brackets enough
                    # to nest past MAX_DEPTH can hold what no request or output can carry.
                    # (Searching every line for NaN and surrogate escapes cost five times
                    # its decoding: 5 µs a line of 2 KB.)
                    suspect = checking and (not strict or line.count(b"[") + line.count(b"{") > MAX_DEPTH)
                    if suspect:
                        check_record(record, lambda m: self.error(where, m))
                    yield where, record, suspect
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{self.path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc

    def arrow_batches(self, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        try:
            with self._pinned.open() as raw:
                yield from csv_lines.batches(raw, columns) if self.is_csv else _parquet_batches(raw, columns, batch_rows)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self.path}: cannot read as {self._kind()}: {exc}") from exc

    def arrow_schema(self) -> pa.Schema:
        """The file's column types (a CSV's as inferred from its first block)."""
        if self._schema is None:
            self._schema = self._read_schema()
        return self._schema

    def _read_schema(self) -> pa.Schema:
        try:
            with self._pinned.open() as raw:
                if self.is_csv:
                    schema = csv_lines.schema(raw)
                else:
                    schema = pq.ParquetFile(raw).schema_arrow
            schema.names  # noqa: B018 (decodes every name)
        except (OSError, pa.ArrowException) as exc:
            found = self._csv_error(exc) if self.is_csv and isinstance(exc, pa.ArrowInvalid) else None
            raise found or InputError(f"{self.path}: cannot read as {self._kind()}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: a column name is not UTF-8 ({exc.reason})") from None
        return schema

    def _kind(self) -> str:
        return "CSV with a header row" if self.is_csv else "Parquet"

    def _csv_records(self) -> Iterator[Record]:
        """A CSV file's rows, each named by the line it starts on, which a scan of the same
        bytes finds beside pyarrow's read (see `csv_lines`)."""
        if any(pa.types.is_binary(field.type) for field in self.arrow_schema()):
            self._scan_csv()  # text that is not UTF-8, in the first block: the scan names its line
        with self._pinned.open() as raw, self._pinned.open() as scan:
            skipped = csv_lines.skipped_lines(scan, self._at_line)
            lines = csv_lines.row_lines(skipped)
            next(lines)  # the header's
            try:
                for batch in csv_lines.batches(raw, None):
                    for record in batch.to_pylist():
                        yield f"line {next(lines)}", record, True
            except pa.ArrowInvalid as exc:
                raise self._csv_error(exc) or self.error(f"from line {next(lines)}",
                                                         f"cannot read as {self._kind()}: {exc}") from exc
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{self.path}: cannot read as {self._kind()}: {exc}") from exc
            for _ in skipped:  # to the end: a quote still open there took in the rest of the file
                pass

    def _csv_error(self, exc: Exception) -> InputError | None:
        """What pyarrow found wrong, named by its line, or None if the bytes do not show it.
        A quote open to the end of the file, or bytes that are not UTF-8, come first: they
        explain any error pyarrow gives about the rows after them."""
        self._scan_csv()
        with self._pinned.open() as raw:
            found = csv_lines.locate(raw, exc)
        return None if found is None else self._at_line(*found)

    def _scan_csv(self) -> None:
        with self._pinned.open() as scan:
            for _ in csv_lines.skipped_lines(scan, self._at_line):
                pass

    def _at_line(self, line: int, message: str) -> InputError:
        return self.error(f"line {line}", message)

    def _parquet_records(self, batch_rows: int) -> Iterator[Record]:
        index = 0
        for batch in self.arrow_batches(None, batch_rows):
            try:
                records = batch.to_pylist()
            except UnicodeDecodeError:
                records = None
            for n in range(batch.num_rows):
                where = f"row {index}"
                if records is None:  # find the row whose text is not UTF-8
                    try:
                        [record] = batch.slice(n, 1).to_pylist()
                    except UnicodeDecodeError as exc:
                        raise self.error(where, "a string column holds bytes that are not "
                                                f"UTF-8 ({exc.reason})") from None
                else:
                    record = records[n]
                # Arrow text is UTF-8 and its nesting is the schema's; but any Arrow type
                # (binary, dates, decimals) may stand where the request needs JSON.
                yield where, record, True
                index += 1


def combined_fingerprint(files: Sequence[InputFile]) -> str:
    """One file's digest as it is (states saved before inputs could be many still
    resume); several files' digests hashed in order, so that order counts too."""
    digests = [f.fingerprint() for f in files]
    if len(digests) == 1:
        return digests[0]
    return "files:" + hashlib.blake2b("\n".join(digests).encode(), digest_size=16).hexdigest()


def check_all_unchanged(files: Sequence[InputFile]) -> None:
    for f in files:
        f.check_unchanged()


def _parquet_batches(raw: Any, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(raw).iter_batches(batch_size=batch_rows, columns=columns)
