"""A job whose output is a local path: its files are published where they are written.

So pulling and pushing do nothing, and the store holds what the disk holds.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .base import Store

__all__ = ["LocalStore"]


class LocalStore(Store):
    """The job's files on this disk, nowhere else."""

    def where(self, local: Path) -> Path:
        return local

    def pull_state(self, local: Path) -> None:
        """The local state is the only one (the job's lock keeps a second runner out when it opens)."""

    def push_state(self, local: Path) -> None:
        pass

    def pull_file(self, local: Path) -> None:
        pass

    def push_file(self, local: Path) -> None:
        pass

    def exists(self, local: Path) -> bool:
        return local.is_file()

    def move(self, local: Path, to: Path) -> bool:
        if not local.is_file():
            return False
        os.replace(local, to)
        return True

    def names_in(self, folder: Path) -> set[str]:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            return {path.name for path in folder.iterdir() if path.is_file()}
        return set()

    def pull_folder(self, folder: Path) -> None:
        pass
