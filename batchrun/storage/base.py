"""The `Store` seam: what a job's files are published to and read back from.

The engine, the backends and the tools read and write local files only (SQLite needs
a disk, and an answer must be durable in milliseconds, not in an upload's time); a
store is where those files are published, and where another machine finds them. Each
method takes the local path of a file beside the job's output (the output, its state,
its status, a shard's part) and does, for that file, what the kind of store means:

    inputs()          the job's input files, local paths (those named by URL downloaded)
    pull_state(p)     make the local state the newest there is
    push_state(p)     publish the state (a consistent copy: `state.state_copy`)
    pull_file(p)      bring one file here, if the store holds another copy
    push_file(p)      publish one file, if it exists here
    exists(p)         the store holds the file
    move(p, to)       move the store's copy of a file aside (`--restart`); False if none
    names_in(folder)  the names of the files a folder holds on the store
    pull_folder(f)    bring a folder here (a sharded job's states and parts, to merge)
    where(p)          how the file is shown to the user: its path, or its URL

Kinds: `local.LocalStore` (the files are where they are written, so most of these do
nothing) and `objects.ObjectStore` (s3://, gs://, ... through pyarrow.fs or fsspec,
mirrored by a local folder).

To add a kind (say, a shared folder synced by rsync): subclass `Store` in a module of
its own beside these, implement every abstract method (bytes only: a state is a file
like any other here, its consistency is `state.py`'s), and add the one line that
chooses it from the spec in `open_store` (batchrun/storage/__init__.py). Nothing else
asks which kind a job has; tests/test_store.py runs the same checks on each kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from .transfer import input_files

__all__ = ["Store"]


class Store(ABC):
    """A job's files beside `output` (a local path), and where they are published."""

    def __init__(self, output: Path, *, inputs: Sequence[Path] = (), input_urls: Sequence[str] = ()) -> None:
        self.output = output
        self._inputs = tuple(inputs)
        self._input_urls = tuple(input_urls)

    def inputs(self) -> list[Path]:
        """The job's input files, in the order rows are read: local ones as they are, those
        on a store downloaded first (into a local folder for these URLs). An input's place
        is the spec's, whatever the output's store: every kind reads inputs alike."""
        return input_files(self._inputs, self._input_urls)

    @abstractmethod
    def where(self, local: Path) -> Path | str:
        """How the file `local` is shown to the user: its path, or its URL on the store."""

    @abstractmethod
    def pull_state(self, local: Path) -> None:
        """Make the local state the newest there is. Raises ConfigError rather than replace
        a state a runner here holds (callers that only read look at `lock_holder` first)."""

    @abstractmethod
    def push_state(self, local: Path) -> None:
        """Publish a consistent copy of the state (its status is a `push_file` of its own)."""

    @abstractmethod
    def pull_file(self, local: Path) -> None:
        """Bring one file here, if the store holds it and it differs from the copy here."""

    @abstractmethod
    def push_file(self, local: Path) -> None:
        """Publish one file, if it exists here."""

    @abstractmethod
    def exists(self, local: Path) -> bool:
        """The store holds the file `local` is the local copy of."""

    @abstractmethod
    def move(self, local: Path, to: Path) -> bool:
        """Move the store's copy of `local` to where `to` is published; False if there is none."""

    @abstractmethod
    def names_in(self, folder: Path) -> set[str]:
        """The names of the files the store holds in `folder` (none if there is no such folder)."""

    @abstractmethod
    def pull_folder(self, folder: Path) -> None:
        """Bring a folder here: every file this machine does not hold as the store does,
        states as `pull_state` brings them (but never one a runner here holds)."""
