"""The state's vectors file (storage/vectors.py): embeddings beside the SQLite state."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest

from batchrun import ConfigError, StateDamagedError, StorageError
from batchrun.endpoints.result import RESULT_FIELDS, Result
from batchrun.storage import state as state_module
from batchrun.storage import vectors as vectors_module
from batchrun.storage.state import StateStore, state_copy

META = {"input_digest": "abc", "rows": 9, "passthrough": [], "request": {"model": "m", "params": {}}}
EMBEDDING = RESULT_FIELDS.index("embedding")


def vector(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def opened(path: Path, *first: float) -> StateStore:
    """A job's state, with row 0's vector saved if `first` gives its values."""
    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    if first:
        store.save([Result(0, "a", "ok", embedding=vector(*first))])
    return store


def saved_and_closed(path: Path, *values: float) -> None:
    """A state whose run saved row 0's vector, then stopped."""
    opened(path, *values).close()


def stored(path: Path) -> list[tuple[int, str]]:
    """Each row's index and the SQLite type its embedding column holds."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT row_index, typeof(embedding) FROM results ORDER BY row_index").fetchall()
    finally:
        db.close()


def embeddings(store: StateStore, stop: int = 9) -> dict[int, bytes | None]:
    return {row[0]: row[EMBEDDING] for row in store.results(0, stop)}


def test_vectors_go_to_their_file_and_the_state_keeps_references(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path)
    store.save([Result(0, "a", "ok", embedding=vector(0.5, -1.0)), Result(1, "b", "failed", error="HTTP 400: x"),
                Result(2, "c", "ok", embedding=vector(3.0))])
    store.save([Result(3, "d", "ok", embedding=vector(1.0, 2.0, 4.0))])

    assert embeddings(store) == {0: vector(0.5, -1.0), 1: None, 2: vector(3.0), 3: vector(1.0, 2.0, 4.0)}
    assert stored(path) == [(0, "integer"), (1, "null"), (2, "integer"), (3, "integer")]
    kept = tmp_path / "s.sqlite-vectors"
    assert kept.read_bytes() == vector(0.5, -1.0) + vector(3.0) + vector(1.0, 2.0, 4.0)
    assert kept.stat().st_mode & 0o777 == 0o600
    store.close()
    again = StateStore.open(path)  # a rerun reads what the last one wrote
    assert embeddings(again)[3] == vector(1.0, 2.0, 4.0)
    again.close()


def test_a_state_written_before_keeps_its_vectors_inline_beside_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path)
    store.save([Result(0, "a", "ok")])
    store.close()
    db = sqlite3.connect(path)  # as batchrun stored a vector before: in the row
    db.execute("UPDATE results SET embedding = ? WHERE row_index = 0", (vector(7.0),))
    db.commit()
    db.close()

    store = StateStore.open(path)
    store.save([Result(1, "b", "ok", embedding=vector(8.0))])
    assert embeddings(store) == {0: vector(7.0), 1: vector(8.0)}
    assert stored(path) == [(0, "blob"), (1, "integer")]
    store.close()


def test_a_state_whose_references_came_without_crcs_is_read_as_it_was(tmp_path: Path) -> None:
    """Written before rows kept their vector's CRC: the column is added, the vectors read."""
    path = tmp_path / "s.sqlite"
    saved_and_closed(path, 1.0, 2.0)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE results DROP COLUMN vector_crc")
    db.close()

    store = StateStore.open(path)
    store.save([Result(1, "b", "ok", embedding=vector(3.0))])
    assert embeddings(store) == {0: vector(1.0, 2.0), 1: vector(3.0)}
    store.close()


def test_bytes_a_kill_left_before_its_commit_are_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    saved_and_closed(path, 1.0)
    with open(tmp_path / "s.sqlite-vectors", "ab") as f:  # appended and synced, then killed before the commit
        f.write(vector(99.0, 99.0))

    store = StateStore.open(path)
    store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    assert embeddings(store) == {0: vector(1.0), 1: vector(2.0)}
    store.close()


def test_nothing_is_committed_unless_its_vectors_are_on_disk_first(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(vectors_module, "_sync", failing_sync)
    with pytest.raises(StorageError, match="cannot save answers.*Input/output error"):
        store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    assert stored(path) == [(0, "integer")]  # the row whose vector may not be on disk was not committed
    store.close()


def test_a_write_the_disk_cut_short_is_written_over_by_the_next(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    real = os.pwrite

    def half_then_full(fd: int, data: memoryview, offset: int) -> int:
        real(fd, bytes(data[:2]), offset)
        monkeypatch.setattr(vectors_module.os, "pwrite", real)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vectors_module.os, "pwrite", half_then_full)
    with pytest.raises(StorageError, match="the disk is full"):
        store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    store.save([Result(1, "b", "ok", embedding=vector(3.0))])

    assert embeddings(store) == {0: vector(1.0), 1: vector(3.0)}
    assert (tmp_path / "s.sqlite-vectors").read_bytes() == vector(1.0) + vector(3.0)
    store.close()


def test_a_vector_too_long_for_a_reference_stays_in_the_state(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "LONGEST", 8)
    path = tmp_path / "s.sqlite"
    store = opened(path)
    store.save([Result(0, "a", "ok", embedding=vector(1.0, 2.0)),
                Result(1, "b", "ok", embedding=vector(1.0, 2.0, 3.0))])
    assert stored(path) == [(0, "integer"), (1, "blob")]
    assert embeddings(store) == {0: vector(1.0, 2.0), 1: vector(1.0, 2.0, 3.0)}
    store.close()


def test_restart_empties_the_vectors_with_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    saved_and_closed(path, 1.0, 2.0)
    store = StateStore.open(path)
    store.reset()
    assert (tmp_path / "s.sqlite-vectors").stat().st_size == 0
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok", embedding=vector(5.0))])
    assert embeddings(store) == {0: vector(5.0)}
    store.close()


def test_the_copy_for_upload_holds_its_vectors_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors_module, "_INLINE_ROWS", 2)  # taken in a few rows at a time
    path = tmp_path / "s.sqlite"
    store = opened(path)
    store.save([Result(0, "a", "ok", embedding=vector(1.0)), Result(1, "b", "ok", embedding=vector(2.0, 3.0))])
    store.save([Result(i, "x", "ok", embedding=vector(i)) for i in (2, 4, 5, 6)] + [Result(3, "y", "ok")])
    elsewhere = tmp_path / "elsewhere" / "s.sqlite"
    elsewhere.parent.mkdir()
    with state_copy(path) as copy:
        shutil.copy(copy, elsewhere)  # as object storage gets it: one file
    store.close()

    assert not (tmp_path / "elsewhere" / "s.sqlite-vectors").exists()
    pulled = StateStore.open(elsewhere)
    assert embeddings(pulled) == {0: vector(1.0), 1: vector(2.0, 3.0), 2: vector(2), 3: None, 4: vector(4),
                                  5: vector(5), 6: vector(6)}
    assert stored(elsewhere) == [(0, "blob"), (1, "blob"), (2, "blob"), (3, "null"), (4, "blob"), (5, "blob"),
                                 (6, "blob")]
    pulled.close()
    assert stored(path)[:2] == [(0, "integer"), (1, "integer")]  # the job's own state is left as it was


def test_a_vectors_file_removed_mid_run_is_written_back_and_the_job_stops(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    (tmp_path / "s.sqlite-vectors").unlink()

    with pytest.raises(StorageError, match="vectors file was removed while the job ran; batchrun wrote it back"):
        store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    store.close()
    assert (tmp_path / "s.sqlite-vectors").read_bytes() == vector(1.0)
    again = StateStore.open(path)
    again.save([Result(1, "b", "ok", embedding=vector(2.0))])
    assert embeddings(again) == {0: vector(1.0), 1: vector(2.0)}
    again.close()


def test_a_state_whose_folder_went_mid_run_gets_its_vectors_back_too(tmp_path: Path) -> None:
    path = tmp_path / "out" / "s.sqlite"
    path.parent.mkdir()
    store = opened(path, 1.0, 2.0)
    shutil.rmtree(path.parent)

    with pytest.raises(StorageError, match="wrote every answer saved so far back to it"):
        store.save([Result(1, "b", "ok", embedding=vector(3.0))])
    store.close()
    again = StateStore.open(path)
    assert embeddings(again) == {0: vector(1.0, 2.0)}
    again.close()


@pytest.mark.parametrize("left", [None, 0, 6])
def test_a_vectors_file_missing_or_cut_short_between_runs_is_damage_only_restart_moves_past(
        tmp_path: Path, left: int | None) -> None:
    """Taken up as it is, its end would be where the next vectors go: over those the rows
    refer to, and the output would hold other rows' vectors."""
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0, 2.0)
    store.save([Result(1, "b", "ok", embedding=vector(3.0, 4.0))])
    store.close()
    file = tmp_path / "s.sqlite-vectors"
    if left is None:
        file.unlink()
    else:
        os.truncate(file, left)

    what = "which is missing" if left is None else f"which holds {left}: it was cut short"
    with pytest.raises(StateDamagedError, match=rf"rows refer to 16 bytes of vectors kept in s\.sqlite-vectors, {what}"
                                                r".*--restart"):
        StateStore.open(path)
    with pytest.raises(StateDamagedError):
        StateStore.open(path, lock=False)  # `batchrun status` too
    fresh = StateStore.open(path, discard_damaged=True)  # --restart
    fresh.claim(META, spec_name="job.yaml")
    fresh.save([Result(0, "a", "ok", embedding=vector(5.0))])
    assert embeddings(fresh) == {0: vector(5.0)}
    fresh.close()


def test_a_vectors_file_written_over_in_place_never_gives_its_bytes_as_a_rows_vector(tmp_path: Path) -> None:
    """Same file, same length, other bytes (another job's file copied over it, say)."""
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0, 2.0)
    file = tmp_path / "s.sqlite-vectors"
    with open(file, "r+b") as f:  # in place: the job's open file sees it
        f.write(vector(9.0, 2.0))
    with pytest.raises(StorageError, match=r"does not hold the vector the job saved there \(its CRC differs\).*Put "
                                           "this job's file back beside the state, or rerun with --restart") as caught:
        store.results(0, 1)
    assert caught.value.rerun_resumes is False
    store.close()
    with pytest.raises(StateDamagedError, match=r"s\.sqlite-vectors does not hold the last vector its rows refer to "
                                                r"\(its CRC differs\): it was replaced or written over.*--restart"):
        StateStore.open(path)  # the next run: before any request, not at its output


def test_a_vector_written_over_that_is_not_the_last_is_caught_when_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    store.close()
    with open(tmp_path / "s.sqlite-vectors", "r+b") as f:
        f.write(vector(9.0))  # row 0's; the open looks at the last one only

    again = StateStore.open(path)
    with pytest.raises(StorageError, match="its CRC differs"):
        again.results(0, 2)
    again.close()


def test_a_vectors_file_replaced_mid_run_stops_the_job_and_says_how_to_go_on(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    (tmp_path / "s.sqlite-vectors").unlink()
    (tmp_path / "s.sqlite-vectors").write_bytes(b"someone else's bytes")

    with pytest.raises(StorageError, match="replaced while the job ran.*Put this job's file back beside the state, "
                                           "or rerun with --restart") as caught:
        store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    assert caught.value.rerun_resumes is False  # the same command would read the bytes there now
    assert stored(path) == [(0, "integer")]
    store.close()


def test_a_vectors_file_that_cannot_be_written_back_leaves_no_half_of_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    (tmp_path / "s.sqlite-vectors").unlink()

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vectors_module.os, "pwrite", full)
    with pytest.raises(StorageError, match="writing it back failed .*No space left.*are lost.*--restart") as caught:
        store.save([Result(1, "b", "ok", embedding=vector(2.0))])
    assert caught.value.rerun_resumes is False
    assert not (tmp_path / "s.sqlite-vectors").exists()  # a rerun finds it missing, and says so
    store.close()


def test_vectors_past_the_farthest_a_reference_reaches_stay_in_the_state(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors_module, "FARTHEST", 12)  # as if 512 GiB were written
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0, 2.0)
    store.save([Result(1, "b", "ok", embedding=vector(3.0, 4.0))])
    assert stored(path) == [(0, "integer"), (1, "blob")]
    assert embeddings(store) == {0: vector(1.0, 2.0), 1: vector(3.0, 4.0)}
    store.close()


def test_a_vectors_file_removed_under_a_run_that_saves_nothing_is_written_back(tmp_path: Path) -> None:
    """A rerun of a finished job only writes the output: no commit would have noticed."""
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)
    (tmp_path / "s.sqlite-vectors").unlink()
    with pytest.raises(StorageError, match="removed while the job ran; batchrun wrote it back") as caught:
        store.check_files()
    assert caught.value.rerun_resumes is True
    assert (tmp_path / "s.sqlite-vectors").read_bytes() == vector(1.0)
    store.close()


def test_a_vector_that_cannot_be_read_for_the_upload_copy_is_a_storage_error(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an internal error: the run stops as for any store it cannot write."""
    path = tmp_path / "s.sqlite"
    store = opened(path, 1.0)

    def failing_read(fd: int, length: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(vectors_module.os, "pread", failing_read)
    with pytest.raises(StorageError, match=r"cannot snapshot the job's state for upload: .*Input/output error"):
        with state_copy(path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no copy left
    store.close()


def test_a_vectors_file_that_cannot_be_opened_is_a_storage_error_and_a_folder_there_says_so(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    saved_and_closed(path, 1.0)

    real_open = os.open

    def failing(file: object, flags: int, *args: object) -> int:
        if str(file).endswith("-vectors"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(file, flags, *args)

    monkeypatch.setattr(vectors_module.os, "open", failing)
    with pytest.raises(StorageError, match=r"s\.sqlite-vectors: cannot open the state's vectors file: Input/output"):
        StateStore.open(path)
    monkeypatch.undo()
    (tmp_path / "s.sqlite-vectors").unlink()
    (tmp_path / "s.sqlite-vectors").mkdir()  # something in its place that is no file
    with pytest.raises(ConfigError, match=r"s\.sqlite-vectors is a folder where the state keeps its vectors"):
        StateStore.open(path)
    (tmp_path / "s.sqlite-vectors").rmdir()
    (tmp_path / "s.sqlite-vectors").write_bytes(vector(1.0))
    again = StateStore.open(path)  # the failed open held no lock
    assert embeddings(again) == {0: vector(1.0)}
    again.close()


def embedding_job(tmp_path: Path, rows: int = 7):
    """An embeddings job of `rows` (3 a request) whose vector for an input is its length
    and the row's number; its spec, and a transport answering it."""
    import base64

    import httpx

    from tests.conftest import write_jsonl, write_spec

    def answer(request: httpx.Request) -> httpx.Response:
        texts = json.loads(request.content)["input"]
        data = [{"index": i, "embedding": base64.b64encode(vector(len(text), float(text[1:]))).decode()}
                for i, text in enumerate(texts)]
        return httpx.Response(200, json={"data": data, "model": "e", "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    write_jsonl(tmp_path / "input.jsonl", [{"input": f"x{i}"} for i in range(rows)])
    spec = write_spec(tmp_path, endpoint="embeddings", inputs_per_request=3, api={"base_url": "http://127.0.0.1:9/v1"})
    return spec, httpx.MockTransport(answer)


def test_a_job_whose_vectors_file_was_cut_short_stops_before_any_request_and_restart_redoes_it(tmp_path: Path) -> None:
    from batchrun import run_job
    from tests.conftest import read_output

    spec, transport = embedding_job(tmp_path)
    run_job(spec, limit=4, transport=transport, environ={"OPENAI_API_KEY": "k"})
    (file,) = tmp_path.rglob("*.sqlite-vectors")
    os.truncate(file, 8)  # the first row's vector, no more

    with pytest.raises(StateDamagedError, match="cut short.*--restart") as caught:
        run_job(spec, transport=transport, environ={"OPENAI_API_KEY": "k"})
    assert caught.value.exit_code == 2
    summary = run_job(spec, restart=True, transport=transport, environ={"OPENAI_API_KEY": "k"})
    assert (summary.ok, summary.requests) == (7, 3)
    assert [r["embedding"] for r in read_output(summary.output)] == [[2.0, float(i)] for i in range(7)]


@pytest.mark.parametrize("when", ["as it begins", "as it writes its output"])
def test_a_vectors_file_removed_while_a_finished_job_rewrites_its_output_is_written_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    from batchrun import JobAborted, run_job
    from batchrun.engine import run as run_module
    from batchrun.storage import output as output_module
    from tests.conftest import read_output

    spec, transport = embedding_job(tmp_path)
    summary = run_job(spec, transport=transport, environ={"OPENAI_API_KEY": "k"})
    (file,) = tmp_path.rglob("*.sqlite-vectors")
    kept = file.read_bytes()
    owner, name = (run_module._Run, "drive") if when == "as it begins" else (output_module.OutputWriter, "finish")
    step = getattr(owner, name)

    def removing(self: object, *args: object) -> None:
        file.unlink()  # while the rerun holds it open, and has nothing to commit
        step(self, *args)

    monkeypatch.setattr(owner, name, removing)
    with pytest.raises(JobAborted, match="vectors file was removed while the job ran; batchrun wrote it back"):
        run_job(spec, transport=transport, environ={"OPENAI_API_KEY": "k"})
    assert file.read_bytes() == kept
    monkeypatch.undo()
    again = run_job(spec, transport=transport, environ={"OPENAI_API_KEY": "k"})
    assert (again.ok, again.requests) == (7, 0)
    assert [r["embedding"] for r in read_output(summary.output)] == [[2.0, float(i)] for i in range(7)]
