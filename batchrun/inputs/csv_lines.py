"""CSV as batchrun reads it: pyarrow for the values, a scan of the bytes for the lines.

pyarrow reads CSV fast, but says nothing of where a row stands in the file, and reads a
quote that never closes as one value holding the rest of the file. So beside each pass
`skipped_lines` scans the same bytes for the lines on which no row starts (inside a
quoted value, or empty), which `row_lines` turns into each row's line, and for a quote
still open at the end. It follows pyarrow's rules: a quote opens a quoted value only at
the start of a field (`12" pizza` is text); in one, `""` is a quote; a line break is
`\\r\\n`, `\\n` or `\\r`. It looks only at quotes and line breaks, with regular expressions
and `bytes.count`: for a million short rows, a fraction of a second (a few percent of
validating them).

A problem pyarrow reports without a place (a row with more values than the header, a
value that does not fit its column's type) is found again by `locate`, with Python's
`csv` module, which is slower but gives lines: it runs only on the way to an error.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import re
from collections.abc import Callable, Iterator
from typing import IO

import pyarrow as pa
import pyarrow.csv as pcsv

from .._exceptions import InputError


__all__ = ["BLOCK", "batches", "header_line", "locate", "row_lines", "schema", "skipped_lines"]

BLOCK = 1 << 20  # pyarrow reads (and types columns from) blocks of this size
# pyarrow's null spellings but NaN's, which read as NaN instead: a request refuses it, as a
# JSONL NaN, and a passthrough column keeps it, rather than silently turning it to null.
NULL_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "1.#IND", "1.#QNAN", "N/A", "NA", "NULL",
               "n/a", "null"]
BOM = b"\xef\xbb\xbf"

_QUOTED = re.compile(rb'[^"]*(?:""[^"]*)*')  # a quoted value's text, up to its closing quote
# Bytes outside quoted values that span lines: all but quotes, quoted values closed on their
# line, quotes inside a field (plain characters). It stops at a quote opening a value that
# goes on past its line (or past the chunk, or to the end). One match covers most chunks.
_PLAIN = re.compile(rb'(?:[^"]+|(?<![^,\r\n])"[^"\r\n]*(?:""[^"\r\n]*)*"(?!")|(?<=[^,\r\n])")*')
_BEFORE_EMPTY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?=[\r\n])")  # a line break with an empty line after it
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to ([^:]+): invalid value '(.*)'$", re.S)
_RAGGED = re.compile(r"Expected (\d+) columns, got (\d+)")

_KINDS = (("int", "a number"), ("uint", "a number"), ("float", "a number"), ("double", "a number"),
          ("decimal", "a number"), ("bool", "a true/false"), ("null", "an empty"), ("timestamp", "a date and time"),
          ("date", "a date"), ("time", "a time"))

Fail = Callable[[int, str], InputError]  # (line, message) -> the error to raise


def batches(raw: IO[bytes], columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """A CSV file with a header row, in blocks: those columns (all for None or none).
    Column types are inferred from the first block and hold for the rest (a later value
    that does not fit is an error)."""
    yield from _open(raw, columns)


def schema(raw: IO[bytes]) -> pa.Schema:
    return _open(raw, None).schema


def _open(raw: IO[bytes], columns: list[str] | None) -> pa.RecordBatchReader:
    # newlines_in_values: without it, a quoted value with a line break that straddles two
    # blocks stops the read ("parser got out of sync with chunker").
    return pcsv.open_csv(raw, read_options=pcsv.ReadOptions(block_size=BLOCK),
                         parse_options=pcsv.ParseOptions(newlines_in_values=True),
                         convert_options=pcsv.ConvertOptions(include_columns=columns or [], null_values=NULL_VALUES))


def header_line(raw: IO[bytes]) -> int:
    """The line the header is on: 1 but after empty lines, which are skipped."""
    head = raw.read(4096).removeprefix(BOM)
    empty = head[:len(head) - len(head.lstrip(b"\r\n"))]
    return 1 + _breaks(empty, 0, len(empty))


def row_lines(skipped: Iterator[tuple[int, int]]) -> Iterator[int]:
    """The line each row starts on, the header's first: every line but the skipped ones."""
    line = 1
    for first, end in skipped:
        yield from range(line, first)
        line = max(line, end)
    yield from itertools.count(line)


def skipped_lines(raw: IO[bytes], fail: Fail, block: int = BLOCK) -> Iterator[tuple[int, int]]:
    """Ranges [first, end) of the lines on which no row starts, in order: those inside a
    quoted value and empty ones. Raises `fail(line, ...)` for bytes that are not UTF-8 and
    for a quote still open at the end of the file."""
    line = 1  # the line of `counted`, the position line breaks are counted up to
    quote = 0  # the line a quoted value opened on, while in one
    for chunk in _chunks(raw, block):
        _check_utf8(chunk, line, fail)
        pos = counted = 0
        end = len(chunk)
        empties = b"\n\n" in chunk or b"\r" in chunk and (b"\n\r" in chunk or b"\r\r" in chunk)
        if not quote and chunk[:1] in (b"\r", b"\n"):  # chunks start at a line's start
            yield line, line + 1
        while pos < end:
            if quote:
                close = _QUOTED.match(chunk, pos).end()  # type: ignore[union-attr]  # it matches "" too
                breaks = _breaks(chunk, pos, close)
                if breaks:
                    yield line + 1, line + 1 + breaks
                    line += breaks
                counted = close
                if close == end:
                    break  # the value goes on in the next chunk
                quote, pos = 0, close + 1
                continue
            stop = _PLAIN.match(chunk, pos).end()  # type: ignore[union-attr]
            if empties:
                for empty in _BEFORE_EMPTY.finditer(chunk, pos, stop):
                    line += _breaks(chunk, counted, empty.end())
                    counted = empty.end()
                    yield line, line + 1
            if stop == end:
                break
            line += _breaks(chunk, counted, stop)
            counted = stop
            quote, pos = line, stop + 1  # a quoted value that goes on past its line
        line += _breaks(chunk, counted, end)
    if quote:
        raise fail(quote, "a quote opens here and never closes, so the rest of the file would be read as one "
                          'value; close it (a quote inside a quoted value is written twice: "")')


def locate(raw: IO[bytes], exc: Exception) -> tuple[int, str] | None:
    """(line, message) for what pyarrow reported without a place, found again in `raw`;
    None for anything else."""
    misfit = _CONVERSION.search(str(exc))
    if misfit is None and not _RAGGED.search(str(exc)):
        return None
    try:
        with contextlib.closing(_records(raw)) as records:
            _, header = next(records)
            if misfit is None:
                return _ragged(records, len(header))
            column, kind, value = int(misfit[1]), misfit[2], misfit[3]
            name = header[column].encode("latin-1").decode(errors="replace").removeprefix("\ufeff")
            for line, fields in records:
                if fields[column:column + 1] == [value.encode().decode("latin-1")]:
                    return line, (f"column {name!r} holds {value!r}, but the file's first megabyte made it "
                                  f"{_kind(kind)} column, as CSV columns are typed from there; fix the value, or "
                                  "give the input as JSONL or Parquet, whose types are their own")
    except (csv.Error, StopIteration, IndexError):  # not what pyarrow read after all
        pass
    return None


def _ragged(records: Iterator[tuple[int, list[str]]], width: int) -> tuple[int, str] | None:
    for line, fields in records:
        if len(fields) != width:
            values = "1 value" if len(fields) == 1 else f"{len(fields)} values"
            return line, f'{values}, but the header names {width} columns; quote a value that holds a comma ("a, b")'
    return None


def _chunks(raw: IO[bytes], block: int) -> Iterator[bytes]:
    """The file's bytes without a leading BOM, cut after line breaks: each chunk starts at
    a line's start, and neither a `\\r\\n` nor a `""` is split across two."""
    rest = raw.read(max(block, len(BOM))).removeprefix(BOM)
    while True:
        data = raw.read(block)
        if not data:
            if rest:
                yield rest
            return
        rest += data
        cut = max(rest.rfind(b"\n"), rest.rfind(b"\r", 0, len(rest) - 1)) + 1
        if cut:
            yield rest[:cut]
            rest = rest[cut:]


def _breaks(data: bytes, start: int, end: int) -> int:
    """The line breaks in data[start:end]; `\\r\\n` is one."""
    newlines = data.count(b"\n", start, end)
    returns = data.count(b"\r", start, end)
    return newlines + returns - (data.count(b"\r\n", start, end) if returns else 0)


def _check_utf8(chunk: bytes, line: int, fail: Fail) -> None:
    if chunk.isascii():
        return
    try:
        chunk.decode()
    except UnicodeDecodeError as exc:
        raise fail(line + _breaks(chunk, 0, exc.start),
                   f"the text is not UTF-8 (byte 0x{chunk[exc.start]:02x}); save the file as UTF-8") from None


def _records(raw: IO[bytes]) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each row, the header's first, as Python's csv reads them (Latin-1
    keeps every byte, and a quote or a comma is the same byte in UTF-8)."""
    limit = csv.field_size_limit(2**31 - 1)  # a field may be as long as pyarrow's block
    try:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="latin-1", newline=""))
        line = 1
        for fields in reader:
            if fields:  # [] is an empty line
                yield line, fields
            line = reader.line_num + 1
    finally:
        csv.field_size_limit(limit)


def _kind(arrow_type: str) -> str:
    """'a number' for int64: what a column of that type holds, in a user's words."""
    return next((kind for prefix, kind in _KINDS if arrow_type.startswith(prefix)), f"a {arrow_type}")
