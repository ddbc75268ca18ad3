"""One runner per job: the lock file beside the state (storage/lock.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchrun import ConfigError, StorageError
from batchrun.storage.lock import JobLock, lock_holder, lock_path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "out.batchrun.sqlite"


def test_the_lock_sits_beside_the_state_holds_the_pid_and_is_private(state: Path) -> None:
    assert lock_path(state) == state.with_name("out.batchrun.sqlite.lock")
    old = os.umask(0)
    try:
        lock = JobLock.acquire(state)
    finally:
        os.umask(old)
    try:
        assert lock.path.read_text() == str(os.getpid())
        assert lock.path.stat().st_mode & 0o777 == 0o600
        assert lock_holder(state) == str(os.getpid())
    finally:
        lock.release()
    assert lock_holder(state) is None  # released: nobody runs the job, the file stays
    assert lock.path.exists()


def test_a_second_runner_is_refused_naming_the_holder(state: Path) -> None:
    lock = JobLock.acquire(state)  # flock: a second open of the file conflicts, even in one process
    try:
        with pytest.raises(ConfigError) as info:
            JobLock.acquire(state)
        assert str(info.value) == (f"this job is already running (pid {os.getpid()}, lock {lock.path}); "
                                   "wait for it to finish, or stop it first")
    finally:
        lock.release()
    JobLock.acquire(state).release()  # free again


def test_a_lock_left_by_a_dead_runner_is_taken_over(state: Path) -> None:
    lock_path(state).write_text("4242")  # the file a killed run left; its lock died with it
    lock = JobLock.acquire(state)
    try:
        assert lock.path.read_text() == str(os.getpid())  # the old pid, longer, is gone whole
    finally:
        lock.release()


def test_nobody_holds_a_job_that_never_ran(state: Path) -> None:
    assert lock_holder(state) is None


@pytest.mark.parametrize("undo", ["remove", "replace"])
def test_a_lock_file_removed_or_replaced_under_the_holder_is_noticed(state: Path, undo: str) -> None:
    lock = JobLock.acquire(state)
    try:
        lock.check()  # as it was
        lock.path.unlink()
        if undo == "replace":
            lock.path.write_text("another runner's")
        with pytest.raises(StorageError, match="the job's lock file was removed or replaced while the job ran"):
            lock.check()
    finally:
        lock.release()


def test_release_with_remove_deletes_only_its_own_file(state: Path) -> None:
    lock = JobLock.acquire(state)
    lock.release(remove=True)
    assert not lock.path.exists()
    lock.check()  # released: nothing to check
    lock.release()  # twice is harmless

    lock = JobLock.acquire(state)
    lock.path.unlink()
    lock.path.write_text("another runner's")  # a newcomer's file, not this lock's
    lock.release(remove=True)
    assert lock.path.read_text() == "another runner's"


def test_a_folder_where_the_lock_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create the job's lock file"):
        JobLock.acquire(tmp_path / "no-such-folder" / "out.batchrun.sqlite")
