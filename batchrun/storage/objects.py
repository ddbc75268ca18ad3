"""A job's files on object storage (s3://, gs://, anything pyarrow.fs or fsspec opens).

The engine reads and writes local files only: SQLite needs a disk, and answers must
be durable in milliseconds, not in an upload's time. A job whose `output` is a URL
works in a local folder (`BATCHRUN_WORK_DIR`, else `~/.cache/batchrun/jobs`, one
subfolder per output URL) that mirrors the output's folder on the store:

    s3://bucket/evals/answers.parquet           <- the output, uploaded once written
    s3://bucket/evals/answers.batchrun.sqlite   <- the state: at least every
                                                   checkpoint.interval_s and at every stop
    s3://bucket/evals/answers.status.json       <- the status, with each state upload

A run on a fresh machine (an Airflow retry in a new pod) downloads the state and
resumes: what it pays again is at most the answers received since the last upload.
A run on the machine that uploaded last keeps its local state, which is as new or
newer; a state on the store that another machine uploaded since wins. Input URLs
are downloaded into a local folder of their own, again only when the store holds
other content (its ETag, else its size and time: see `transfer.py`).

Credentials come from the store's usual environment and configuration
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`,
...), never from the spec. This module moves files (`transfer.py` the bytes); what a
consistent copy of the state is, and how one replaces another, is `state.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from .._exceptions import ConfigError
from . import transfer
from .base import Store
from .durable import private_folder
from .lock import lock_holder
from .state import replace_state, state_copy
from .transfer import store_errors

__all__ = ["ObjectStore"]


def _sibling(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


class ObjectStore(Store):
    """The job's output folder on a store, mirrored by the local folder of `output`."""

    def __init__(self, output_url: str, output: Path, *, inputs: Sequence[Path] = (),
                 input_urls: Sequence[str] = ()) -> None:
        super().__init__(output, inputs=inputs, input_urls=input_urls)
        self.output_url = output_url
        self.local_root = output.parent
        self.fs, output_path = transfer.open_filesystem(output_url)
        self._root = str(PurePosixPath(output_path).parent)

    def path_of(self, local: Path) -> str:
        """Where a file of the local folder lives on the store."""
        return f"{self._root}/{local.relative_to(self.local_root).as_posix()}"

    def url_of(self, local: Path) -> str:
        return _sibling(self.output_url, local.relative_to(self.local_root).as_posix())

    def where(self, local: Path) -> str:
        return self.url_of(local)

    def pull_state(self, local: Path) -> None:
        if holder := lock_holder(local):  # its state is the newest, and in use: never replaced
            raise ConfigError(f"this job is already running (pid {holder}, in {local.parent})")
        if not self.exists(local):
            return  # no state on the store yet
        private_folder(local.parent)
        with store_errors(f"{self.url_of(local)}: cannot download the job's state"):
            # Unless this machine uploaded it last: then the local state is as new or newer
            transfer.pull_file(self.fs, self.path_of(local), local, replace=replace_state)

    def push_state(self, local: Path) -> None:
        with state_copy(local) as copy, store_errors(f"{self.url_of(local)}: cannot upload the job's state"):
            transfer.push_file(copy, self.fs, self.path_of(local), local)

    def pull_folder(self, folder: Path) -> None:
        with store_errors(f"{self.url_of(folder)}: cannot list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path_of(folder), allow_not_found=True))
        for info in infos:
            local = folder / info.base_name
            if info.type != pafs.FileType.File or info.base_name.startswith("."):
                continue
            if info.base_name.endswith(".batchrun.sqlite"):
                if not lock_holder(local):  # a shard running here has the newest state
                    self.pull_state(local)
            else:
                private_folder(folder)
                with store_errors(f"{self.url_of(local)}: cannot download"):
                    transfer.pull_file(self.fs, info.path, local)

    def names_in(self, folder: Path) -> set[str]:
        with store_errors(f"{self.url_of(folder)}: cannot list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path_of(folder), allow_not_found=True))
        return {info.base_name for info in infos if info.type == pafs.FileType.File}

    def exists(self, local: Path) -> bool:
        with store_errors(f"{self.url_of(local)}: cannot read"):
            return self.fs.get_file_info(self.path_of(local)).type == pafs.FileType.File

    def pull_file(self, local: Path) -> None:
        if self.exists(local):
            private_folder(local.parent)
            with store_errors(f"{self.url_of(local)}: cannot download"):
                transfer.pull_file(self.fs, self.path_of(local), local)

    def move(self, local: Path, to: Path) -> bool:
        if not self.exists(local):
            return False
        with store_errors(f"{self.url_of(local)}: cannot move it to {self.url_of(to)}"):
            self.fs.move(self.path_of(local), self.path_of(to))
        return True

    def push_file(self, local: Path) -> None:
        if local.exists():
            with store_errors(f"{self.url_of(local)}: cannot upload {local.name}"):
                transfer.push_file(local, self.fs, self.path_of(local), local)
