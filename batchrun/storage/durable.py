"""Durable on disk: a file's bytes, or a folder's entries (a rename is durable only once
the folder holding it is synced)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync"]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
