"""The checkpoint store: one SQLite file next to the output.

It holds a `meta` table (what the state was written for: the input's digest, the
request configuration, the row count) and a `results` table with one row per
settled input row, keyed by row_index, so a row can never be stored twice.
SQLite in WAL mode with synchronous=FULL makes each commit atomic and durable:
a kill -9 loses only what was not yet committed, never a committed row, never
half a row.

Only the runner's writer task writes here; nobody else holds a write connection.
The output writer reads committed rows through a second connection, so reading a
row group never holds up a commit.
A lock file beside it (flock, released by the kernel when the process dies) keeps
a second runner of the same job out.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError, StateMismatchError, StorageError
from ._protocol import RESULT_FIELDS, Result

__all__ = ["StateStore", "lock_holder", "state_path"]

SCHEMA_VERSION = "1"

_COLUMNS = ", ".join(RESULT_FIELDS)
_UPSERT = (
    f"INSERT INTO results ({_COLUMNS}) VALUES ({', '.join('?' * len(RESULT_FIELDS))}) "
    "ON CONFLICT(row_index) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in RESULT_FIELDS if f not in ("row_index", "attempts"))
    # attempts add up over runs: a row that failed before and succeeds now cost both
    + ", attempts = results.attempts + excluded.attempts"
)


def state_path(output: Path) -> Path:
    return output.with_name(output.stem + ".batchrun.sqlite")


class StateStore:
    """Open with `StateStore.open(path)`; `close()` when done."""

    def __init__(self, path: Path, db: sqlite3.Connection, read_db: sqlite3.Connection, lock_fd: int | None) -> None:
        self.path = path
        self._db = db
        self._read_db = read_db
        self._lock_fd = lock_fd
        self._inode = os.stat(path).st_ino

    @classmethod
    def open(cls, path: Path, *, lock: bool = True) -> StateStore:
        """Open or create the state; `lock` keeps other runners out.

        Without `lock` (for `batchrun status`) the state must exist already.
        """
        if not lock and not path.exists():
            raise FileNotFoundError(path)
        lock_fd = _acquire_lock(path) if lock else None
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            columns = ", ".join(
                "row_index INTEGER PRIMARY KEY" if f == "row_index" else f for f in RESULT_FIELDS
            )
            db.execute(f"CREATE TABLE IF NOT EXISTS results ({columns})")
            read_db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            if db is not None:  # the reading connection is the last step: never half open
                db.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise ConfigError(f"{path}: cannot open the job's state: {exc}") from exc
        return cls(path, db, read_db, lock_fd)

    def close(self, *, remove: bool = False) -> None:
        """Close; `remove` deletes the state too (while still holding the lock)."""
        self._read_db.close()
        self._db.close()
        if remove:
            _remove(self.path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what the state belongs to -------------------------------------------------------

    def reset(self) -> None:
        """Forget every result and what the state was for (`--restart`), in one transaction."""
        with self._transaction():
            self._db.execute("DELETE FROM results")
            self._db.execute("DELETE FROM meta")

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def claim(self, meta: dict[str, Any], *, spec_name: str) -> None:
        """Record what this state is for, or check that it is for this very job."""
        saved = self.meta()
        if not saved:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v, sort_keys=True)) for k, v in {"version": SCHEMA_VERSION, **meta}.items()],
                )
            return
        changes = _differences(saved, {"version": SCHEMA_VERSION, **meta})
        if changes:
            raise StateMismatchError(
                f"{self.path} holds the progress of a different job ({'; '.join(changes)}). "
                f"Rerun with --restart to discard it and start over, or restore the original "
                f"input and {spec_name}."
            )

    # -- results ---------------------------------------------------------------------------

    def save(self, results: Iterable[Result]) -> None:
        """Store results in one atomic, durable transaction.

        Raises StorageError when that is impossible: a full disk, or a state file
        removed or replaced under the running job (SQLite would go on writing to
        the unlinked file, and every answer from then on would be lost).
        """
        rows = [tuple(getattr(r, f) for f in RESULT_FIELDS) for r in results]
        if not rows:
            return
        try:
            if os.stat(self.path).st_ino != self._inode:
                raise FileNotFoundError(f"{self.path} was replaced")
            with self._transaction():
                self._db.executemany(_UPSERT, rows)
        except (OSError, sqlite3.Error) as exc:
            reason = "it was removed or replaced" if isinstance(exc, OSError) else str(exc)
            raise StorageError(
                f"cannot save answers to {self.path}: {reason}; what was saved before is intact. "
                "Fix the cause (free disk space, restore the folder) and rerun to resume"
            ) from exc

    def ok_rows(self, size: int) -> bytearray:
        """A byte per row index, 1 where the row is settled ok: small even for millions."""
        done = bytearray(size)
        for (index,) in self._db.execute("SELECT row_index FROM results WHERE status = 'ok'"):
            if index < size:
                done[index] = 1
        return done

    def results(self, start: int, stop: int) -> list[tuple[Any, ...]]:
        """Committed result tuples (in RESULT_FIELDS order) for row_index in [start, stop).

        Safe to call from another thread while `save` runs: it reads through its
        own connection, which sees whole commits only (WAL readers never block the
        writer).
        """
        return self._read_db.execute(
            f"SELECT {_COLUMNS} FROM results WHERE row_index >= ? AND row_index < ? ORDER BY row_index",
            (start, stop),
        ).fetchall()

    def counts(self, below: int | None = None) -> dict[str, int]:
        """ok, failed, and token sums over rows with row_index < below (all by default)."""
        limit = below if below is not None else 2**62
        # TOTAL, not SUM: a server's absurd usage must not overflow the count (SUM raises).
        ok, failed, prompt, completion, total = self._db.execute(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'failed'), 0), "
            "TOTAL(prompt_tokens), TOTAL(completion_tokens), TOTAL(total_tokens) "
            "FROM results WHERE row_index < ?",
            (limit,),
        ).fetchone()
        return {"ok": ok, "failed": failed, "prompt_tokens": int(prompt), "completion_tokens": int(completion),
                "total_tokens": int(total)}

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def lock_holder(path: Path) -> str | None:
    """The pid of the runner holding the job's lock, or None when nobody runs it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def _acquire_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"{lock_path}: cannot create the job's lock file: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"this job is already running (pid {holder}, lock {lock_path}); "
            "wait for it to finish, or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences: 'params.max_tokens was 64, now 128'."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            if path == "input_digest":
                out.append("the input file's content changed")
            else:
                out.append(f"{path} was {json.dumps(a)}, now {json.dumps(b)}")

    walk(saved, json.loads(json.dumps(wanted)), "")
    return out

