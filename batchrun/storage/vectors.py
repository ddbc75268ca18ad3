"""The state's vectors: embeddings kept in a file beside the SQLite state, not in it.

A vector is kilobytes of float32 (4 KB at dimension 1,024). SQLite stores a blob that
size on overflow pages, writes them to its log and then again to the database, and
reading them back copies them once more: 20,000 such rows cost a job's commits ~1.1 s
where appending the same bytes to a file and syncing it cost ~0.4 s.

So a commit's vectors are appended to `<state>-vectors` and synced first, and only then
is the commit that refers to them made: a row in the state refers to bytes already on
disk. A kill between the two leaves bytes that no row refers to, and the next run
appends after them. Nothing a row refers to is ever written over: a reference stays
good for the life of the state, until `--restart` empties both.

A row's `embedding` column holds a BLOB (the vector itself) or an INTEGER (a reference
into this file: `offset << 24 | length`). States written before, rows answered by a
provider's batch API, and the copy of a state that is uploaded (`inline`) hold BLOBs.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path

from .._exceptions import StorageError
from .durable import fsync

__all__ = ["LONGEST", "SUFFIX", "VectorFile", "inline"]

SUFFIX = "-vectors"
_LENGTH_BITS = 24
LONGEST = (1 << _LENGTH_BITS) - 1  # a longer vector (16 MB) is stored in the state itself
_INLINE_ROWS = 4096  # rows a step when a copy takes its vectors in
_sync = os.fdatasync if sys.platform.startswith("linux") else os.fsync  # macOS has no fdatasync


class VectorFile:
    """The vectors of one state, opened with it if it has any, else made by the first
    append. The job's writer appends in its thread while the output's reads in another,
    with `pread`: they never share a file position."""

    def __init__(self, state: Path) -> None:
        self.path = state.with_name(state.name + SUFFIX)
        self.fd: int | None = None
        self.inode: int | None = None
        self.end = 0  # where the next vectors go: the file's size when opened, then past each append
        self._retired: list[int] = []  # the removed file's descriptors: a read may be using one
        try:
            try:
                self._open(os.O_RDWR)
            except PermissionError:
                self._open(os.O_RDONLY)  # a reader that may not write (`batchrun status` on another's state)
        except FileNotFoundError:
            pass  # none yet: a job without vectors, or none saved so far
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the state's vectors file: {exc.strerror or exc}") from exc

    def append(self, vectors: Iterable[bytes]) -> list[int]:
        """Write `vectors` after the last ones and sync them; their references, in order."""
        vectors = list(vectors)
        if self.fd is None:
            self._open(os.O_RDWR | os.O_CREAT)
            fsync(self.path.parent)  # its name, durable before a commit refers to it
        assert self.fd is not None
        data = b"".join(vectors)
        written = 0
        while written < len(data):  # at its tracked end: a failed write's part is written over
            written += os.pwrite(self.fd, memoryview(data)[written:], self.end + written)
        _sync(self.fd)
        refs, at = [], self.end
        for vector in vectors:
            refs.append(at << _LENGTH_BITS | len(vector))
            at += len(vector)
        self.end = at
        return refs

    def read(self, ref: int) -> bytes:
        if self.fd is None:
            raise StorageError(f"{self.path} is missing: the job's state refers to vectors kept there. Put it "
                               "back beside the state, or rerun with --restart to start over")
        offset, length = ref >> _LENGTH_BITS, ref & LONGEST
        vector = os.pread(self.fd, length, offset)
        if len(vector) != length:
            raise StorageError(f"{self.path} ends before a vector the job's state refers to: it was cut short. "
                               "Rerun with --restart to start over")
        return vector

    def clear(self) -> None:
        """Empty the file (`--restart`, once the state's rows are gone)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        _sync(self.fd)
        self.end = 0

    def check(self) -> str | None:
        """What happened to the file, and the way on, if it is no longer the one this job
        writes (one removed is written back from the job's open copy first)."""
        if self.fd is None or _inode(self.path) == self.inode:
            return None
        if self.path.exists():
            return (f"{self.path}: the state's vectors file was replaced while the job ran, so the vectors its rows "
                    "refer to may not be there: stopping. Put this job's file back, or rerun with --restart to start "
                    "over (every answer is then paid again)")
        try:
            self.restore()
        except OSError as exc:
            return (f"{self.path}: the state's vectors file was removed while the job ran, and writing it back "
                    f"failed ({exc}): stopping. Rerun with --restart to start over")
        return (f"{self.path}: the state's vectors file was removed while the job ran; batchrun wrote it back. "
                "Stopping; rerun to resume")

    def restore(self) -> None:
        """Write the file back to its path from the open copy (its folder made again, if
        that went too), if this job holds it open and the path is free."""
        if self.fd is None or self.path.exists():
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            at = 0
            while at < self.end:
                chunk = os.pread(self.fd, min(1 << 20, self.end - at), at)
                if not chunk:
                    break
                os.pwrite(fd, chunk, at)
                at += len(chunk)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._retired.append(self.fd)
        self.fd, self.inode = fd, os.fstat(fd).st_ino
        fsync(self.path.parent)

    def close(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _open(self, flags: int) -> None:
        fd = os.open(self.path, flags, 0o600)
        info = os.fstat(fd)
        if info.st_mode & 0o077 and flags != os.O_RDONLY:
            os.fchmod(fd, 0o600)  # whatever the umask: it holds answers
        self.fd, self.inode, self.end = fd, info.st_ino, info.st_size


def inline(db: sqlite3.Connection, state: Path) -> None:
    """Put the vectors that `db`'s rows refer to (a copy of the state at `state`) in the rows
    themselves, some thousands of rows at a time: the copy goes on its own, to object storage."""
    vectors = VectorFile(state)
    try:
        _inline(db, vectors)
    finally:
        vectors.close()


def _inline(db: sqlite3.Connection, vectors: VectorFile) -> None:
    # A copy being made: nothing to roll back to, nothing to survive a crash (it is made again).
    # So it costs what a copy of a state holding its vectors did (0.5-0.6 s for 20,000 of 1,024)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    last = -1
    while refs := db.execute("SELECT row_index, embedding FROM results WHERE row_index > ? AND typeof(embedding) "
                             "= 'integer' ORDER BY row_index LIMIT ?", (last, _INLINE_ROWS)).fetchall():
        db.executemany("UPDATE results SET embedding = ? WHERE row_index = ?",
                       ((vectors.read(ref), index) for index, ref in refs))
        last = refs[-1][0]
    db.execute("COMMIT")


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
