"""CSV input: rows and their problems are named by the line of the file they start on."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import InputError
from batchrun.inputs import csv_lines as _csv
from batchrun.inputs.reader import InputReader
from tests.conftest import examples


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def forty_rows() -> list[str]:
    return ["prompt,tag"] + [f"question {i},t{i}" for i in range(40)]


def test_a_quote_that_never_closes_is_refused_at_the_line_it_opens(tmp_path: Path) -> None:
    lines = forty_rows()
    lines[6] = 'question 5,"t5'  # row 5, on line 7: the quote would take in the 34 lines after it
    path = write_csv(tmp_path / "in.csv", lines)
    with pytest.raises(InputError, match=r"in.csv: line 7: a quote opens here and never closes"):
        InputReader(path).validate()

    lines[6] = '"question 5,t5'  # in the first column, the rest of the file was one short row
    write_csv(path, lines)
    with pytest.raises(InputError, match=r"in.csv: line 7: a quote opens here and never closes"):
        InputReader(path).validate()

    path.write_bytes(b'prompt,tag\nquestion 0,"t0')  # at the very end, no line break after it
    with pytest.raises(InputError, match=r"in.csv: line 2: a quote opens here and never closes"):
        InputReader(path).validate()


def test_quotes_that_close_are_read_as_pyarrow_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'prompt,tag\n12" pizza,"a ""b"" c"\n"x"y"z,""\n"""",last\n')
    reader = InputReader(path)
    assert reader.validate() == (3, {"tag": "string"})
    assert [(row.where, row.body["prompt"]) for row in reader.rows()] == [
        ("line 2", '12" pizza'), ("line 3", 'xy"z'), ("line 4", '"')]


def test_text_that_is_not_utf8_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    rows = [f"question {i},t{i}".encode() for i in range(40)]
    rows[10] = b"caf\xe9 au lait,t10"  # Latin-1, as some spreadsheets save
    path.write_bytes(b"prompt,tag\n" + b"\n".join(rows) + b"\n")
    with pytest.raises(InputError, match=r"in.csv: line 12: .*not UTF-8 \(byte 0xe9\).*save the file as UTF-8"):
        InputReader(path).validate()

    rows = [f"question {i:06d},t{i}".encode() for i in range(80_000)]  # 1.8 MB
    rows[70_000] = b"question,t\xff"  # in a passthrough column, past the first megabyte
    path.write_bytes(b"prompt,tag\n" + b"\n".join(rows) + b"\n")
    with pytest.raises(InputError, match=r"in.csv: line 70002: .*not UTF-8 \(byte 0xff\)"):
        InputReader(path).validate()


def test_a_row_with_more_or_fewer_values_than_the_header_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    head = ["prompt,tag", '"two', 'lines",a', "", "x,b"]  # rows on lines 2 and 5
    write_csv(path, [*head, "y,c,extra", "z,d"])
    with pytest.raises(InputError, match=r"in.csv: line 6: 3 values, but the header names 2 columns"):
        InputReader(path).validate()
    write_csv(path, [*head, "z,d", "y"])
    with pytest.raises(InputError, match=r"in.csv: line 7: 1 value, but the header names 2 columns"):
        InputReader(path).validate()


def test_a_number_column_that_turns_to_text_past_the_first_megabyte_is_named_by_its_line(tmp_path: Path) -> None:
    lines = ["prompt,score"] + [f"question {i:06d},{i}" for i in range(80_000)]  # 1.6 MB
    lines[70_001] = "question,not scored"
    path = write_csv(tmp_path / "in.csv", lines)
    with pytest.raises(InputError, match=r"in.csv: line 70002: column 'score' holds 'not scored', but the file's "
                                         r"first megabyte made it a number column"):
        InputReader(path).validate()


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-inf", "Infinity"])
def test_nan_and_infinity_in_a_number_column_are_refused_as_in_jsonl(tmp_path: Path, value: str) -> None:
    path = write_csv(tmp_path / "in.csv", ["prompt,temperature", "a,0.5", f"b,{value}"])
    with pytest.raises(InputError, match=r"in.csv: line 3: temperature: -?(nan|inf) is not a number JSON can carry"):
        InputReader(path).validate()


def test_nan_in_a_passthrough_column_is_kept_as_in_jsonl(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", ["prompt,score", "a,0.5", "b,nan", "c,NA", "d,"])
    reader = InputReader(path)
    count, types = reader.validate()
    [table] = reader.passthrough_batches(types)
    scores = table.column("score").to_pylist()
    assert scores[0] == 0.5 and math.isnan(scores[1]) and scores[2:] == [None, None]


def test_row_errors_name_the_line_the_row_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,prompt,temperature\r\na,"one\r\ntwo",1\r\n\r\nb,"x\ny\n\nz",0.5\r\nc,w,nan\r\n')
    with pytest.raises(InputError, match=r"in.csv: line 9: temperature: nan is not a number JSON can carry"):
        InputReader(path).validate()

    path.write_bytes(b'id,prompt\na,"one\ntwo"\nb,x\n\na,y\n')
    with pytest.raises(InputError, match=r"duplicate row ids: 'a' at line 2 and line 6"):
        InputReader(path).validate()


def test_multiline_values_across_the_first_megabyte_are_read(tmp_path: Path) -> None:
    pad = "x" * 50
    lines = ["prompt,tag"] + [f'"question {i} {pad}\nin two lines",t{i}' for i in range(30_000)]  # 2.4 MB
    path = write_csv(tmp_path / "in.csv", lines)
    reader = InputReader(path)
    assert reader.validate() == (30_000, {"tag": "string"})
    last = list(reader.rows())[-1]
    assert (last.where, last.body["prompt"]) == ("line 60000", f"question 29999 {pad}\nin two lines")


values = st.text(alphabet='ab ,"\n\ré', max_size=6)


def field(value: str, quoted: bool) -> str:
    if quoted or any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(values, st.booleans(), st.integers(0, 2)), min_size=1, max_size=8),
       st.sampled_from(["\n", "\r\n", "\r"]))
def test_every_row_is_named_by_the_line_it_starts_on(tmp_path: Path, rows: list[tuple[str, bool, int]],
                                                     end: str) -> None:
    text = "prompt,tag" + end
    starts = []
    for i, (value, quoted, empty_lines) in enumerate(rows):
        text += end * empty_lines  # skipped
        starts.append(1 + len(re.findall(r"\r\n|\r|\n", text)))
        text += field("p" + value, quoted) + f",t{i}" + end
    path = tmp_path / "in.csv"
    path.write_bytes(text.encode())

    reader = InputReader(path)
    assert reader.validate() == (len(rows), {"tag": "string"})
    assert [(row.where, row.body["prompt"]) for row in reader.rows()] == [
        (f"line {line}", "p" + value) for line, (value, _, _) in zip(starts, rows)]


def pyarrow_rows(data: bytes) -> tuple[list[int], int | None]:
    """(the line each row starts on, the line of a quote open at the end or None), read a
    byte at a time by pyarrow's rules: the reference the scan must agree with."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    line, starts, quote, state, i = 1, [], None, "line", 0
    while i < len(data):
        c = data[i:i + 1]
        width = 2 if data[i:i + 2] == b"\r\n" else 1
        if c in (b"\r", b"\n") and state != "quoted":
            line, state, i = line + 1, "line", i + width
            continue
        if state == "line":
            starts.append(line)
        if state in ("line", "field start"):
            state, quote = ("quoted", line) if c == b'"' else ("field", None)
            i += c == b'"'
            continue
        if state == "field":
            state = "field start" if c == b"," else "field"
        elif c == b'"':  # in a quoted value
            if data[i + 1:i + 2] == b'"':
                i += 1
            else:
                state, quote = "field", None
        elif c in (b"\r", b"\n"):
            line += 1
            i += width - 1
        i += 1
    return starts, quote if state == "quoted" else None


@settings(max_examples=examples(500), deadline=None)
@given(st.text(alphabet='a,"\n\r ', max_size=40).map(str.encode), st.integers(1, 9), st.booleans())
def test_the_scan_finds_the_rows_pyarrow_reads_in_chunks_of_any_size(data: bytes, block: int, bom: bool) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + data
    starts, quote = pyarrow_rows(data)

    def scan() -> list[int]:
        skipped = _csv.skipped_lines(io.BytesIO(data), lambda line, message: InputError(f"{line}: {message}"), block)
        lines = _csv.row_lines(skipped)
        found = [next(lines) for _ in starts]
        for _ in skipped:  # to the end, where a quote may still be open
            pass
        return found

    if quote is None:
        assert scan() == starts
    else:
        with pytest.raises(InputError, match=f"^{quote}: a quote opens here and never closes"):
            scan()
    try:
        table = pcsv.read_csv(io.BytesIO(data), parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except pa.ArrowInvalid:  # no header, or a ragged row
        return
    assert table.num_rows == len(starts) - 1
