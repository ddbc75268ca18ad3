from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from batchrun import ConfigError, StateDamagedError, StateMismatchError, StorageError
from batchrun.endpoints.result import RESULT_FIELDS, Result
from batchrun.storage.lock import lock_holder
from batchrun.storage.state import StateStore, replace_state, state_copy

META = {"input_digest": "abc", "rows": 3, "passthrough": [], "request": {"model": "m", "params": {"max_tokens": 5}}}


def test_results_upsert_by_row_and_attempts_add_up(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "failed", attempts=6, error="HTTP 500: x"), Result(1, "b", "ok", attempts=1)])
    store.save([Result(0, "a", "ok", output_text="hi", total_tokens=3, attempts=2)])

    rows = store.results(0, 3)
    attempts, error = RESULT_FIELDS.index("attempts"), RESULT_FIELDS.index("error")
    assert [(r[0], r[2], r[3], r[attempts], r[error]) for r in rows] == [(0, "ok", "hi", 8, None),
                                                                          (1, "ok", None, 1, None)]
    assert store.counts() == {"ok": 2, "failed": 0, "failed_for_good": 0, "prompt_tokens": 0,
                              "completion_tokens": 0, "total_tokens": 3, "cost_usd": None, "cache_hits": 0,
                              "saved_usd": None, "lost_requests": 0, "lost_usd": 0.0, "lost_tokens": 0,
                              "from_batches": 0}
    # the cost of a row adds up over runs too: both answers were paid for
    store.save([Result(2, "c", "failed", attempts=3, cost_usd=0.25, error="the answer breaks the schema")])
    store.save([Result(2, "c", "ok", attempts=1, cost_usd=0.5)])
    assert store.counts()["cost_usd"] == 0.75
    assert list(store.ok_rows(4)) == [1, 1, 1, 0]
    store.close()


def test_state_survives_reopening(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(2, "c", "ok")])
    store.close()
    store = StateStore.open(tmp_path / "s.sqlite")
    assert store.meta()["rows"] == 3
    assert list(store.ok_rows(3)) == [0, 0, 1]
    store.close()


def test_a_state_for_other_params_is_refused_with_the_difference(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    changed = {**META, "request": {"model": "m", "params": {"max_tokens": 6}}}
    with pytest.raises(StateMismatchError) as info:
        store.claim(changed, spec_name="job.yaml")
    assert "params.max_tokens was 5, now 6" in str(info.value)
    assert "--restart" in str(info.value)
    store.close()


def test_restart_empties_the_state(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok")])
    store.close()
    store = StateStore.open(tmp_path / "s.sqlite")
    store.reset()
    assert store.meta() == {} and store.counts()["ok"] == 0
    store.close()


def test_one_runner_per_state_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    first = StateStore.open(path)
    assert lock_holder(path) is not None
    with pytest.raises(ConfigError, match="this job is already running"):
        StateStore.open(path)
    first.close()
    assert lock_holder(path) is None
    StateStore.open(path).close()


def test_the_state_and_its_companions_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = StateStore.open(tmp_path / "s.sqlite")
        store.claim(META, spec_name="job.yaml")
        store.save([Result(0, "a", "ok")])
        names = ["s.sqlite", "s.sqlite-wal", "s.sqlite-shm", "s.sqlite.lock"]
        assert {n: (tmp_path / n).stat().st_mode & 0o777 for n in names} == dict.fromkeys(names, 0o600)
        store.close()
    finally:
        os.umask(old)


def test_the_lock_message_names_the_pid_even_while_the_holder_is_writing_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    holder = os.open(tmp_path / "s.sqlite.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # locked, its pid not written yet
    writer = threading.Timer(0.2, lambda: os.pwrite(holder, b"4242", 0))
    writer.start()
    try:
        with pytest.raises(ConfigError, match=r"this job is already running \(pid 4242, lock "):
            StateStore.open(path)
        assert lock_holder(path) == "4242"
    finally:
        writer.join()
        os.close(holder)


def test_a_lock_file_removed_under_its_holder_is_noticed_at_the_next_save(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    (tmp_path / "s.sqlite.lock").unlink()
    second = StateStore.open(tmp_path / "s.sqlite")  # a newcomer can now take a lock of its own...
    with pytest.raises(StorageError, match="lock file was removed or replaced while the job ran"):
        store.save([Result(0, "a", "ok")])  # ...so the first one stops before writing again
    store.close()
    second.close()


def test_a_state_made_but_never_claimed_is_fresh_and_one_with_answers_but_no_job_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    StateStore.open(path).close()  # killed while the input was being checked: nothing sent
    store = StateStore.open(path)
    assert store.meta() == {}
    store.save([Result(0, "a", "ok")])
    store.close()
    with pytest.raises(StateDamagedError, match="holds answers but no record of the job they belong to"):
        StateStore.open(path)
    StateStore.open(path, discard_damaged=True).close()
    store = StateStore.open(path)
    assert store.counts()["ok"] == 0
    store.close()


def test_a_state_from_before_the_extra_column_gets_it_and_resumes(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok", output_text="kept", attempts=1)])
    store.close()
    db = sqlite3.connect(path)  # as batchrun wrote it before `extra` existed
    db.execute("ALTER TABLE results DROP COLUMN embedding")
    db.execute("ALTER TABLE results DROP COLUMN extra")
    db.commit()
    db.close()

    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    store.save([Result(1, "b", "ok", output_text="new", attempts=1, extra={"request": "{}"})])
    rows = store.results(0, 2)
    extra = RESULT_FIELDS.index("extra")
    assert [(r[0], r[3], r[extra]) for r in rows] == [(0, "kept", None), (1, "new", '{"request": "{}"}')]
    assert len(rows[0]) == len(RESULT_FIELDS)
    store.close()


def test_usage_adds_up_over_runs_and_a_sum_past_int64_is_no_count(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.save([Result(0, "a", "failed", prompt_tokens=10, total_tokens=2**62, cost_usd=0.5, attempts=3),
                Result(1, "b", "failed", attempts=1)])
    store.save([Result(0, "a", "ok", prompt_tokens=4, completion_tokens=2, total_tokens=2**62, cost_usd=0.25,
                       attempts=1),
                Result(1, "b", "ok", prompt_tokens=4, total_tokens=6, attempts=1)])
    rows = {r[0]: dict(zip(RESULT_FIELDS, r)) for r in store.results(0, 2)}
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"], rows[0]["total_tokens"]) == (14, 2, None)
    assert rows[0]["cost_usd"] == 0.75 and rows[0]["attempts"] == 4
    assert (rows[1]["prompt_tokens"], rows[1]["total_tokens"]) == (4, 6)
    store.close()


def test_a_state_whose_folder_went_mid_run_is_written_back_and_says_so_once(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "out" / "s.sqlite"
    path.parent.mkdir()
    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok", attempts=1)])
    shutil.rmtree(path.parent)

    with pytest.raises(StorageError, match="wrote every answer saved so far back to it; stopping$") as info:
        store.save([Result(1, "b", "ok", attempts=1)])
    assert info.value.rerun_resumes  # the command adds "rerun the same command to resume", and only that
    store.close()
    again = StateStore.open(path)
    assert [r[0] for r in again.results(0, 10)] == [0]
    again.close()


def test_a_state_replaced_mid_run_is_not_resumed_and_says_how_to_go_on(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    store.save([Result(0, "a", "ok", attempts=1)])
    path.unlink()
    path.write_bytes(b"someone else's file")

    with pytest.raises(StorageError, match="not this job's progress.*--restart") as info:
        store.save([Result(1, "b", "ok", attempts=1)])
    assert not info.value.rerun_resumes and "resume" not in str(info.value)
    store.close()


def test_a_copy_of_the_state_holds_every_commit_while_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok", attempts=1), Result(2, "c", "failed", attempts=3, error="HTTP 500: x")])
    assert path.with_name("s.sqlite-wal").stat().st_size > 0  # the commits are in the log, not the file yet
    with state_copy(path) as copy:
        store.save([Result(1, "b", "ok", attempts=1)])  # the writer is not held up, nor is this in the copy
        db = sqlite3.connect(copy)
        try:
            assert db.execute("SELECT row_index, status FROM results ORDER BY row_index").fetchall() == \
                [(0, "ok"), (2, "failed")]
        finally:
            db.close()
    assert not copy.exists()
    assert [r[0] for r in store.results(0, 3)] == [0, 1, 2]
    store.close()


def test_a_copy_of_a_state_that_is_not_sqlite_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(StorageError, match=r"s\.sqlite: cannot snapshot the job's state for upload"):
        with state_copy(path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]


def test_a_state_put_in_place_leaves_no_log_of_the_old_one(tmp_path: Path) -> None:
    old, new = tmp_path / "s.sqlite", tmp_path / "download"
    store = StateStore.open(new, lock=True)
    store.claim(META, spec_name="job.yaml")
    store.save([Result(1, "b", "ok", attempts=1)])
    store.close()
    old.write_bytes(b"the old state")
    old.with_name("s.sqlite-wal").write_bytes(b"a log that must never replay onto another state")
    replace_state(old, new)
    assert not new.exists() and not old.with_name("s.sqlite-wal").exists()
    again = StateStore.open(old)
    assert again.meta()["input_digest"] == "abc" and list(again.ok_rows(3)) == [0, 1, 0]
    again.close()


def test_a_batch_ledger_from_before_the_rows_worst_case_gains_it_and_keeps_its_rows(tmp_path: Path) -> None:
    """A state whose batches went out before a batch's rows kept their worst case opens with
    the columns added (null for those rows: charged nothing more than before)."""
    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    store.claim(META, spec_name="job.yaml")
    store.ledger.plan("k1", "chat", [(0, "a", None, None, 0.5, 100), (1, "b", "m2", "key", None, None)], 1.0)
    store.close()
    with sqlite3.connect(path) as db:  # as the older version made it
        db.execute("DELETE FROM batch_rows WHERE key = 'k1'")
        db.execute("ALTER TABLE batch_rows DROP COLUMN worst_usd")
        db.execute("ALTER TABLE batch_rows DROP COLUMN worst_tokens")
        db.execute("INSERT INTO batch_rows VALUES (0, 'k1', 'a', NULL, NULL)")
    db.close()
    store = StateStore.open(path)
    assert store.ledger.asked("k1") == {0: (0, "a", None, None, None, None)}
    store.ledger.plan("k2", "chat", [(2, "c", None, None, 0.25, 50)], 2.0)
    assert store.ledger.asked("k2") == {2: (2, "c", None, None, 0.25, 50)}
    store.close()
