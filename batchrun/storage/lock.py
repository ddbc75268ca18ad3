"""One runner per job: a lock file beside the state, held with flock.

The kernel releases the lock when its holder dies, so a crash never blocks the
next run. A lock that depends on a path can be undone by deleting the path: the
holder keeps its lock on the deleted file while a newcomer creates and locks a
new one. So the lock is only taken once the path is seen to name the very file
locked, and the holder checks that it still does (`check`) before each commit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .._exceptions import ConfigError, StorageError

__all__ = ["JobLock", "lock_holder", "lock_path"]

PID_WAIT_S = 1.0  # how long a newcomer waits for the holder to write its pid


def lock_path(state: Path) -> Path:
    return state.with_name(state.name + ".lock")


class JobLock:
    """The job's lock, held until `release()`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, state: Path) -> JobLock:
        path = lock_path(state)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise _storage_or_config(exc, f"{path}: cannot create the job's lock file") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd, wait=PID_WAIT_S) or "unknown"
                os.close(fd)
                raise ConfigError(
                    f"this job is already running (pid {holder}, lock {path}); "
                    "wait for it to finish, or stop it first"
                ) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the file was removed or replaced between open and flock: again
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise _storage_or_config(exc, f"{path}: cannot write the job's lock file") from exc
        return cls(path, fd)

    def check(self) -> None:
        """Raise StorageError if the lock file was removed or replaced under the job."""
        if self._fd >= 0 and not _same_file(self._fd, self.path):
            raise StorageError(
                f"{self.path}: the job's lock file was removed or replaced while the job ran, so a second "
                "runner could start beside this one; stopping. Every answer received is saved: rerun to resume"
            )

    def release(self, *, remove: bool = False) -> None:
        """Let go; `remove` deletes the lock file first (a newcomer that opened it
        meanwhile sees it is gone once it has the lock, and makes a new one)."""
        if self._fd >= 0:
            if remove and _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


def lock_holder(state: Path) -> str | None:
    """The pid of the runner holding the job's lock, or None when nobody runs it."""
    path = lock_path(state)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd, wait=PID_WAIT_S) or "unknown"
    finally:
        os.close(fd)
    return None


def _read_pid(fd: int, *, wait: float) -> str | None:
    """The holder writes its pid just after it takes the lock: give it that moment."""
    deadline = time.monotonic() + wait
    while True:
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if pid or time.monotonic() >= deadline:
            return pid or None
        time.sleep(0.01)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _storage_or_config(exc: OSError, what: str) -> Exception:
    """A full disk is a storage failure (exit 3); anything else, the folder's setup (exit 2)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{what}: the disk is full; free space and rerun")
    return ConfigError(f"{what}: {exc.strerror or exc}")
