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
into this file: `offset << 24 | length`), and then its `vector_crc` the vector's CRC-32.
States written before, rows answered by a provider's batch API, vectors past 16 MB or
past the first 512 GiB of the file, and the copy of a state that is uploaded (`inline`)
hold BLOBs.

The file is the state's as much as the SQLite file is: the state opens only with every
byte its rows refer to there (`fault`), and a vector read back must have the CRC saved
with its row. A file removed, cut short or written over between runs, or overwritten
while a job runs, stops the job with the way on; it never puts another row's vector,
or garbage, in the output.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path

from .._exceptions import ConfigError, StorageError
from .durable import fsync, private_folder

__all__ = ["LONGEST", "SUFFIX", "VectorFile", "fault", "inline"]

SUFFIX = "-vectors"
_LENGTH_BITS = 24
LONGEST = (1 << _LENGTH_BITS) - 1  # a longer vector (16 MB) is stored in the state itself
FARTHEST = 1 << (63 - _LENGTH_BITS)  # a reference is an int64: vectors past 512 GiB stay in the state
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
        except IsADirectoryError:
            raise ConfigError(f"{self.path} is a folder where the state keeps its vectors: move it away") from None
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the state's vectors file: {exc.strerror or exc}") from exc

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes can be referred to from a row."""
        return self.end + size <= FARTHEST

    def append(self, vectors: Iterable[bytes]) -> list[int]:
        """Write `vectors` after the last ones and sync them; their references, in order
        (each vector's CRC-32 goes in its row beside it)."""
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

    def read(self, ref: int, crc: int | None) -> bytes:
        """The vector `ref` refers to; `crc`, its CRC-32 as saved (None in states written
        before CRCs were kept)."""
        if self.fd is None:
            raise _lost(f"{self.path} is missing: the job's state refers to vectors kept there")
        offset, length = ref >> _LENGTH_BITS, ref & LONGEST
        vector = os.pread(self.fd, length, offset)
        if len(vector) != length:
            raise _lost(f"{self.path} ends before a vector the job's state refers to: it was cut short")
        if crc is not None and zlib.crc32(vector) != crc:
            raise _lost(f"{self.path} does not hold the vector the job saved there (its CRC differs): the file "
                        "was written over or replaced")
        return vector

    def clear(self) -> None:
        """Empty the file (`--restart`, once the state's rows are gone)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        _sync(self.fd)
        self.end = 0

    def check(self) -> None:
        """StorageError, saying what happened to the file and the way on, if it is no
        longer the one this job writes (one removed is written back from the job's open
        copy first)."""
        if self.fd is None or _inode(self.path) == self.inode:
            return
        if self.path.exists():
            raise _lost(f"{self.path}: the state's vectors file was replaced while the job ran, so the vectors its "
                        "rows refer to may not be there")
        try:
            self.restore()
        except OSError as exc:
            error = StorageError(f"{self.path}: the state's vectors file was removed while the job ran, and writing "
                                 f"it back failed ({exc}), so the vectors saved so far are lost: stopping. Rerun with "
                                 "--restart to start over (every answer is then paid again)")
            error.rerun_resumes = False  # type: ignore[misc]
            raise error from exc
        raise StorageError(f"{self.path}: the state's vectors file was removed while the job ran; batchrun wrote it "
                           "back. Stopping; rerun to resume")

    def restore(self) -> None:
        """Write the file back to its path from the open copy (its folder made again, if
        that went too), if this job holds it open and the path is free."""
        if self.fd is None or self.path.exists():
            return
        private_folder(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            at = 0
            while at < self.end:
                chunk = os.pread(self.fd, min(1 << 20, self.end - at), at)
                if not chunk:
                    break
                at += os.pwrite(fd, chunk, at)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)  # not half a file: a missing one says what it is
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


def fault(db: sqlite3.Connection, state: Path) -> str | None:
    """What is wrong with the vectors file of the state `db` (at `state`), if anything:
    missing, shorter than its rows need, or not holding the last vector a row refers to
    (its CRC differs: replaced or written over). References grow with their offset, until
    `--restart` empties both: the last one ends where the file must reach at least."""
    last, crc = db.execute("SELECT MAX(embedding), vector_crc FROM results "  # (the row with the MAX)
                           "WHERE typeof(embedding) = 'integer'").fetchone()
    if last is None:
        return None
    offset, length = last >> _LENGTH_BITS, last & LONGEST
    path = state.with_name(state.name + SUFFIX)
    needed = f"its rows refer to {offset + length:,} bytes of vectors kept in {path.name}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return f"{needed}, which is missing"
    except OSError:
        return None  # opening it for the job says what is wrong
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None  # (a folder there: as above)
        if info.st_size < offset + length:
            return f"{needed}, which holds {info.st_size:,}: it was cut short"
        if crc is not None and zlib.crc32(os.pread(fd, length, offset)) != crc:
            return f"{path.name} does not hold the last vector its rows refer to (its CRC differs): it was replaced " \
                   "or written over"
    finally:
        os.close(fd)
    return None


def _lost(what: str) -> StorageError:
    error = StorageError(f"{what}: stopping. Put this job's file back beside the state, or rerun with --restart to "
                         "start over (every answer is then paid again)")
    error.rerun_resumes = False  # type: ignore[misc]
    return error


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
    while refs := db.execute("SELECT row_index, embedding, vector_crc FROM results WHERE row_index > ? AND "
                             "typeof(embedding) = 'integer' ORDER BY row_index LIMIT ?",
                             (last, _INLINE_ROWS)).fetchall():
        db.executemany("UPDATE results SET embedding = ?, vector_crc = NULL WHERE row_index = ?",
                       ((vectors.read(ref, crc), index) for index, ref, crc in refs))
        last = refs[-1][0]
    db.execute("COMMIT")


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
