"""Durable on disk: a file's bytes, or a folder's entries (a rename is durable only once
the folder holding it is synced); and private: the folders batchrun makes."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

__all__ = ["fsync", "private_folder", "write_back"]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_back(path: Path) -> None:
    """Start writing the file's bytes to disk, without waiting for them: a later `fsync`
    then waits only for what was written since. Linux starts the writeback when told
    the cached pages are not needed (`POSIX_FADV_DONTNEED`: it drops those already on
    disk); elsewhere this does nothing."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def private_folder(folder: Path) -> None:
    """Make `folder` and every missing folder above it 0700 (a umask only takes away):
    `mkdir(parents=True)` gives the parents the umask's mode, 0755 for most."""
    missing, above = [], folder
    while not above.exists() and above != above.parent:
        missing.append(above)
        above = above.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile (by another shard's run)
            made.mkdir(mode=0o700)
    if not folder.is_dir():  # a file in its place, or above it
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
