"""The input's files: which ones a spec names, and the records each gives (inputs/files.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import InputError
from batchrun.inputs.files import InputFile, combined_fingerprint, expand_inputs
from tests.conftest import write_jsonl


def records(path: Path, checking: bool = True) -> list[tuple[str, dict, bool]]:
    f = InputFile(path)
    try:
        return list(f.records(checking=checking, batch_rows=2))
    finally:
        f.close()


def test_globs_and_names_give_each_file_once_in_sorted_path_order(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.parquet", "c.csv", "sub/d.jsonl.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    found = expand_inputs([tmp_path / "b.jsonl", tmp_path / "*.*", tmp_path / "**/*.gz"])

    assert found == [tmp_path / "a.parquet", tmp_path / "b.jsonl", tmp_path / "c.csv", tmp_path / "sub/d.jsonl.gz"]


@pytest.mark.parametrize(("pattern", "said"), [
    ("missing.jsonl", "missing.jsonl: input file not found"),
    ("none-*.jsonl", "none-*.jsonl: no input file matches this pattern"),
    ("*", "notes.txt: matched by input"),
])
def test_a_pattern_that_names_nothing_readable_is_an_input_error(tmp_path: Path, pattern: str, said: str) -> None:
    (tmp_path / "notes.txt").write_text("not rows")
    with pytest.raises(InputError) as info:
        expand_inputs([tmp_path / pattern])
    assert said in str(info.value)
    if pattern == "*":
        assert "only .jsonl, .jsonl.gz, .parquet, .csv files can be read; narrow the pattern" in str(info.value)


def test_jsonl_records_are_named_by_line_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, "", {"prompt": "b", "n": 2}])

    assert records(path) == [("line 1", {"prompt": "a"}, False), ("line 3", {"prompt": "b", "n": 2}, False)]


def test_gzipped_jsonl_reads_as_the_plain_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}"} for i in range(5)]
    assert records(write_jsonl(tmp_path / "in.jsonl.gz", rows)) == records(write_jsonl(tmp_path / "in.jsonl", rows))
    with gzip.open(tmp_path / "in.jsonl.gz", "rb") as f:
        assert f.read().count(b"\n") == 5  # it was compressed


@pytest.mark.parametrize(("line", "said"), [
    ('{"prompt": "p",', "line 2: not valid JSON (Expecting property name enclosed in double quotes at the end of "
                        "the line)"),
    ('{"prompt": "p" "q"}', "line 2: not valid JSON (Expecting ',' delimiter at column 16)"),
    ('{"prompt": "ééé",', "line 2: not valid JSON (Expecting property name enclosed in double quotes at the end of "
                        "the line)"),
    ('["a list"]', "line 2: expected a JSON object, got list"),
    ('{"prompt": "\\ud800"}', "line 2: prompt holds a lone surrogate"),
])
def test_a_line_no_row_can_come_from_names_its_file_and_line(tmp_path: Path, line: str, said: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "fine"}', line])
    with pytest.raises(InputError) as info:
        records(path)
    assert str(info.value).startswith(f"{path}: {said}")


def test_a_line_is_looked_at_closely_only_when_its_bytes_say_it_may_need_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "plain"}', '{"prompt": "\\ud83d\\ude00"}',
                                               '{"t": NaN}'])

    assert [suspect for _, _, suspect in records(path)] == [False, False, True]
    assert [suspect for _, _, suspect in records(path, checking=False)] == [False, False, False]


def test_parquet_records_are_named_by_row_across_batches(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "n": [1, 2, 3]}), tmp_path / "in.parquet")

    assert records(tmp_path / "in.parquet") == [
        ("row 0", {"prompt": "a", "n": 1}, True), ("row 1", {"prompt": "b", "n": 2}, True),
        ("row 2", {"prompt": "c", "n": 3}, True)]


def test_parquet_text_that_is_not_utf8_names_its_row(tmp_path: Path) -> None:
    table = pa.table({"prompt": pa.array([b"fine", b"also fine", b"\xff\xfe"], pa.binary())})
    pq.write_table(table.cast(pa.schema([("prompt", pa.string())]), safe=False), tmp_path / "in.parquet")

    with pytest.raises(InputError, match=r"in.parquet: row 2: a string column holds bytes that are not UTF-8"):
        records(tmp_path / "in.parquet")


def test_csv_records_are_named_by_the_line_they_start_on(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text('prompt,tag\n"two\nlines",a\nplain,b\n')

    assert [(where, record) for where, record, _ in records(tmp_path / "in.csv")] == [
        ("line 2", {"prompt": "two\nlines", "tag": "a"}), ("line 4", {"prompt": "plain", "tag": "b"})]


def test_a_file_that_is_not_its_format_says_so(tmp_path: Path) -> None:
    (tmp_path / "in.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="in.parquet: cannot read as Parquet"):
        records(tmp_path / "in.parquet")
    with pytest.raises(InputError, match="missing.jsonl: input file not found"):
        InputFile(tmp_path / "missing.jsonl")


def test_the_fingerprint_of_several_files_covers_their_content_and_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b"}])

    def fingerprint(*paths: Path) -> str:
        files = [InputFile(p) for p in paths]
        try:
            return combined_fingerprint(files)
        finally:
            for f in files:
                f.close()

    one = fingerprint(a)
    assert one == InputFile(a).fingerprint()  # one file: its own, as states saved before many files hold
    both = fingerprint(a, b)
    assert both.startswith("files:") and both != fingerprint(b, a)
    write_jsonl(b, [{"prompt": "changed"}])
    assert fingerprint(a, b) != both and fingerprint(a) == one
