"""One version of an input file, from a job's start to its end.

A job reads its input several times: to take its fingerprint, to validate every
row, to send the rows, to copy the passthrough columns beside the answers. All of
these must see the very bytes the fingerprint was taken of, or an answer would be
paired with another prompt's columns.

So the file is opened once and every pass reads through that one descriptor: a
file replaced by a new one (an editor's save, `mv`, an atomic writer) keeps
being read as it was, because the old version lives on while it is open. A file
changed in place (truncated, rewritten, appended to) is caught: every read checks
that the size and modification time are those the job started with, and a pass
that reads the whole file checks the bytes it read against the fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from .._exceptions import InputChangedError

__all__ = ["PinnedFile"]


class PinnedFile:
    """An input file held open; `open()` gives a fresh reader of it for each pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1  # until opened: a failed open leaves nothing to close
        self._fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self._fd)
        self._version = (stat.st_size, stat.st_mtime_ns)
        self.digest: str | None = None  # the fingerprint, once a pass has read every byte

    @property
    def size(self) -> int:
        """Its size in bytes, as the job began with it."""
        return self._version[0]

    def open(self, buffer_size: int = 1 << 20) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self), buffer_size)

    def fingerprint(self) -> str:
        with self.open() as f:
            while f.read(1 << 20):
                pass
        assert self.digest is not None
        return self.digest

    def check(self) -> None:
        """Raise InputChangedError unless the file is still the version the job began with."""
        stat = os.fstat(self._fd)
        if (stat.st_size, stat.st_mtime_ns) != self._version:
            raise self._changed("its size or modification time changed")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # a reader dropped unclosed must not keep its descriptor
        self.close()

    def _changed(self, how: str) -> InputChangedError:
        return InputChangedError(
            f"{self.path}: the input file was changed while the job read it ({how}). Rows already "
            "answered are saved. Put the original content back and rerun to resume, or rerun with "
            "--restart to start over on the new content"
        )


class _Reader(io.RawIOBase):
    """One pass over a PinnedFile, with its own position; reads whole passes are hashed."""

    def __init__(self, pinned: PinnedFile) -> None:
        self._pinned = pinned
        self._position = 0
        self._hash: hashlib.blake2b | None = hashlib.blake2b(digest_size=16)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._pinned._version[0]}[whence]
        if base + offset != self._position:
            self._hash = None  # no longer one front-to-back pass
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = os.pread(self._pinned._fd, len(buffer), self._position)
        # Checked after the read: bytes written before it show in the size or mtime.
        self._pinned.check()
        n = len(data)
        buffer[:n] = data
        self._position += n
        if self._hash is not None:
            if n:
                self._hash.update(data)
            else:  # the end of a whole pass: these bytes must be the fingerprinted ones
                digest, self._hash = self._hash.hexdigest(), None
                if self._pinned.digest is None:
                    self._pinned.digest = digest
                elif digest != self._pinned.digest:
                    raise self._pinned._changed("its content differs from when the job began")
        return n
