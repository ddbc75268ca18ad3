"""Durable on disk: a file's bytes, or a folder's entries (a rename is durable only once
the folder holding it is synced)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync", "write_back"]


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
