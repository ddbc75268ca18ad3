"""PinnedFile: every pass of a job reads the version of the input it began with, and a
file changed in place stops the job with a message that says what to do."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchrun._exceptions import InputChangedError, JobAborted
from batchrun.inputs.pinned import PinnedFile

ORIGINAL = b'{"prompt": "one"}\n{"prompt": "two"}\n'


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(ORIGINAL)
    return path


@pytest.fixture
def pinned(path: Path) -> Iterator[PinnedFile]:
    pinned = PinnedFile(path)
    yield pinned
    pinned.close()


def read_all(pinned: PinnedFile) -> bytes:
    with pinned.open() as f:
        return f.read()


def test_each_pass_reads_the_whole_file_from_its_own_start(pinned: PinnedFile) -> None:
    with pinned.open() as one, pinned.open() as two:
        assert one.readline() == b'{"prompt": "one"}\n'
        assert two.read() == ORIGINAL
        assert one.read() == b'{"prompt": "two"}\n'


def test_a_file_replaced_by_another_is_read_as_it_was(pinned: PinnedFile, path: Path, tmp_path: Path) -> None:
    fingerprint = pinned.fingerprint()
    other = tmp_path / "other.jsonl"
    other.write_bytes(b'{"prompt": "something else entirely"}\n')
    os.replace(other, path)
    assert read_all(pinned) == ORIGINAL
    assert pinned.fingerprint() == fingerprint
    pinned.check()


def test_a_file_deleted_while_open_is_still_read_as_it_was(pinned: PinnedFile, path: Path) -> None:
    fingerprint = pinned.fingerprint()
    path.unlink()
    assert read_all(pinned) == ORIGINAL
    assert pinned.fingerprint() == fingerprint


def test_a_file_gone_before_it_is_opened_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PinnedFile(tmp_path / "missing.jsonl")


def test_a_file_rewritten_in_place_stops_the_next_read(pinned: PinnedFile, path: Path) -> None:
    pinned.fingerprint()
    path.write_bytes(b'{"prompt": "changed"}\n')
    with pytest.raises(InputChangedError) as info:
        read_all(pinned)
    assert str(info.value) == (
        f"{path}: the input file was changed while the job read it (its size or modification time "
        "changed). Rows already answered are saved. Put the original content back and rerun to resume, "
        "or rerun with --restart to start over on the new content")


def test_a_file_appended_to_is_caught_by_check(pinned: PinnedFile, path: Path) -> None:
    pinned.check()
    with open(path, "ab") as f:
        f.write(b'{"prompt": "three"}\n')
    with pytest.raises(InputChangedError, match=r"its size or modification time changed"):
        pinned.check()


def test_a_file_truncated_mid_pass_stops_the_pass(pinned: PinnedFile, path: Path) -> None:
    with pinned.open(buffer_size=8) as f:
        assert f.read(8) == ORIGINAL[:8]
        os.truncate(path, 4)
        with pytest.raises(InputChangedError):
            f.read()


def test_a_same_size_rewrite_with_the_old_time_is_caught_by_the_fingerprint(pinned: PinnedFile,
                                                                            path: Path) -> None:
    stat = os.stat(path)
    fingerprint = pinned.fingerprint()
    path.write_bytes(ORIGINAL.replace(b"one", b"uno"))  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    pinned.check()  # size and time cannot tell
    with pytest.raises(InputChangedError) as info:
        read_all(pinned)
    assert "(its content differs from when the job began)" in str(info.value)
    assert pinned.digest == fingerprint


def test_the_first_whole_pass_takes_the_fingerprint(pinned: PinnedFile) -> None:
    assert pinned.digest is None
    read_all(pinned)
    assert pinned.digest is not None and len(pinned.digest) == 32
    assert pinned.fingerprint() == pinned.digest


def test_the_fingerprint_is_of_the_content(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(ORIGINAL)
    other = tmp_path / "other.jsonl"
    other.write_bytes(ORIGINAL + b"\n")
    fingerprints = []
    for p in (path, copy, other):
        pinned = PinnedFile(p)
        fingerprints.append(pinned.fingerprint())
        pinned.close()
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_an_empty_file_has_a_fingerprint(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    pinned = PinnedFile(empty)
    assert read_all(pinned) == b""
    assert pinned.fingerprint() == pinned.digest is not None
    pinned.close()


def test_a_pass_that_seeks_takes_no_fingerprint(pinned: PinnedFile) -> None:
    with pinned.open() as f:
        f.seek(5)
        assert f.read() == ORIGINAL[5:]
    assert pinned.digest is None


def test_seeking_from_the_end_counts_from_the_pinned_size(pinned: PinnedFile, path: Path, tmp_path: Path) -> None:
    other = tmp_path / "longer.jsonl"
    other.write_bytes(ORIGINAL * 3)
    os.replace(other, path)
    with pinned.open() as f:
        assert f.seek(-5, io.SEEK_END) == len(ORIGINAL) - 5
        assert f.read() == ORIGINAL[-5:]


def test_an_input_change_aborts_the_job_and_a_plain_rerun_does_not_resume() -> None:
    assert issubclass(InputChangedError, JobAborted)
    assert InputChangedError.rerun_resumes is False


def test_close_twice_is_harmless(path: Path) -> None:
    pinned = PinnedFile(path)
    pinned.close()
    pinned.close()
