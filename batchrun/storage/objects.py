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
are downloaded once per content (size and modification time) into the same folder.

Credentials come from the store's usual environment and configuration
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`,
...), never from the spec. The state is snapshotted with SQLite's backup API through
a connection of its own, so an upload never holds up a commit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

from .._exceptions import ConfigError, InputError, StorageError
from .urls import is_url, work_folder

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ..spec.parse import JobSpec

__all__ = ["Remote", "fetch_inputs", "is_url", "job_inputs", "work_folder"]

_COPY_CHUNK = 8 << 20


def open_store(url: str) -> tuple[pafs.FileSystem, str]:
    """The file system of `url` and the path in it: pyarrow's own (S3, GCS, HDFS...),
    else fsspec's, where fsspec and the scheme's implementation are installed."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(url)
    except OSError as exc:  # the store's library or its account cannot be set up (no JVM for hdfs://, no region)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{url}: cannot open the store: {reason}") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        scheme = url.split("://", 1)[0]
        try:
            import fsspec
            from fsspec.registry import known_implementations
        except ImportError:
            raise ConfigError(f"{url}: pyarrow cannot open {scheme}:// ({arrow_error}), and fsspec, "
                              "which might, is not installed") from None
        if scheme not in known_implementations:
            raise ConfigError(f"{url}: neither pyarrow nor fsspec knows {scheme}://") from None
        try:
            fs = fsspec.filesystem(scheme)
        except Exception as exc:  # an implementation's missing package, its own config error
            raise ConfigError(f"{url}: cannot open {scheme}:// with fsspec: {exc}") from exc
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(url)


def _sibling(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # pyarrow's IO errors (ArrowIOError) are OSErrors
        raise StorageError(f"{what}: {exc}") from exc


class Remote:
    """The job's output folder on a store, mirrored by a local folder."""

    def __init__(self, output_url: str, local_output: Path) -> None:
        self.output_url = output_url
        self.local_root = local_output.parent
        self.fs, self._output_path = open_store(output_url)
        self._root = str(PurePosixPath(self._output_path).parent)

    def path_of(self, local: Path) -> str:
        """Where a file of the local folder lives on the store."""
        return f"{self._root}/{local.relative_to(self.local_root).as_posix()}"

    def url_of(self, local: Path) -> str:
        return _sibling(self.output_url, local.relative_to(self.local_root).as_posix())

    # -- the state -------------------------------------------------------------------

    def pull_state(self, local: Path) -> str:
        """Make the local state the newest there is; say which one it is."""
        from .state import StateStore

        if not self.exists(local):
            return "no state on the store yet"
        local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _store_errors(f"{self.url_of(local)}: cannot download the job's state"):
            # With its -wal: an old log must never replay onto another state
            pulled = _pull_file(self.fs, self.path_of(local), local, before_replace=StateStore.discard)
        return f"resumed from {self.url_of(local)}" if pulled else \
            "the local state is the newest (this machine uploaded it)"

    def push_state(self, local: Path) -> None:
        """Upload a consistent snapshot of the state (and the status beside it)."""
        snapshot = local.with_name(f".{local.name}.{os.getpid()}.upload")
        try:
            source = sqlite3.connect(local)
            try:
                target = sqlite3.connect(snapshot)
                try:
                    source.backup(target)  # a reader's snapshot: the writer goes on meanwhile
                finally:
                    target.close()
            finally:
                source.close()
            remote = self.path_of(local)
            with _store_errors(f"{self.url_of(local)}: cannot upload the job's state"):
                _copy_up(snapshot, self.fs, remote)
                _write_stamp(local, _stamp(self.fs, remote))
        except sqlite3.Error as exc:
            raise StorageError(f"{local}: cannot snapshot the job's state for upload: {exc}") from exc
        finally:
            snapshot.unlink(missing_ok=True)

    def pull_folder(self, local_folder: Path) -> None:
        """Bring a folder of the store here (a sharded job's states and parts, for the
        merge): what this machine does not hold as the store does."""
        import pyarrow.fs as pafs

        from .lock import lock_holder

        with _store_errors(f"{self.url_of(local_folder)}: cannot list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path_of(local_folder), allow_not_found=True))
        for info in infos:
            local = local_folder / info.base_name
            if info.type != pafs.FileType.File or info.base_name.startswith("."):
                continue
            if info.base_name.endswith(".batchrun.sqlite"):
                if not lock_holder(local):  # a shard running here has the newest state
                    self.pull_state(local)
            else:
                local_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                with _store_errors(f"{self.url_of(local)}: cannot download"):
                    _pull_file(self.fs, info.path, local)

    def exists(self, local: Path) -> bool:
        """The store holds the file `local` mirrors."""
        import pyarrow.fs as pafs

        with _store_errors(f"{self.url_of(local)}: cannot read"):
            return self.fs.get_file_info(self.path_of(local)).type == pafs.FileType.File

    def pull(self, local: Path) -> None:
        """Bring one file of the store here, if it is there and differs from the copy here."""
        if self.exists(local):
            local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _store_errors(f"{self.url_of(local)}: cannot download"):
                _pull_file(self.fs, self.path_of(local), local)

    def move(self, local: Path, to: Path) -> bool:
        """Move the store's copy of `local` to where `to` is mirrored; False if there is none."""
        if not self.exists(local):
            return False
        with _store_errors(f"{self.url_of(local)}: cannot move it to {self.url_of(to)}"):
            self.fs.move(self.path_of(local), self.path_of(to))
        return True

    def push_file(self, local: Path) -> None:
        if local.exists():
            with _store_errors(f"{self.url_of(local)}: cannot upload {local.name}"):
                _copy_up(local, self.fs, self.path_of(local))
                _write_stamp(local, _stamp(self.fs, self.path_of(local)))


def job_inputs(spec: JobSpec) -> list[Path]:
    """The job's input files, in the order rows are read: local ones as they are, those
    on a store downloaded first (into a local folder for these URLs)."""
    from ..inputs.files import expand_inputs

    if not spec.input_urls:
        return expand_inputs(spec.input)
    return fetch_inputs(spec.input_urls, work_folder("\n".join(spec.input_urls), os.environ) / "inputs")


def fetch_inputs(urls: Sequence[str], folder: Path) -> list[Path]:
    """Download the input files the URLs (or globs in their last part) name into
    `folder`, in URL order, skipping files whose size and time are those downloaded."""
    import pyarrow.fs as pafs

    from ..inputs.files import INPUT_SUFFIXES

    found: dict[str, tuple[pafs.FileSystem, pafs.FileInfo]] = {}
    for url in urls:
        fs, path = open_store(url)
        scheme = url.split("://", 1)[0]
        with _store_errors(f"{url}: cannot list the input"):
            if any(c in path.rsplit("/", 1)[-1] for c in "*?["):
                folder_path, pattern = path.rsplit("/", 1)
                infos = [i for i in fs.get_file_info(pafs.FileSelector(folder_path, allow_not_found=True))
                         if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern)]
                if not infos:
                    raise InputError(f"{url}: no input file matches this pattern")
            else:
                infos = [fs.get_file_info(path)]
                if infos[0].type != pafs.FileType.File:
                    raise InputError(f"{url}: input file not found")
        for info in infos:
            if not info.base_name.endswith(INPUT_SUFFIXES):
                raise InputError(f"{url}: {info.base_name} is not one of {', '.join(INPUT_SUFFIXES)}")
            found[f"{scheme}://{info.path}"] = (fs, info)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    local_files = []
    for n, (url, (fs, info)) in enumerate(sorted(found.items())):
        # Numbered so that the local names sort as the URLs do: the order rows are read in
        local = folder / f"{n:05d}-{info.base_name}"
        with _store_errors(f"{url}: cannot download the input"):
            _pull_file(fs, info.path, local)
        local_files.append(local)
    return local_files


def _pull_file(fs: pafs.FileSystem, path: str, local: Path,
               before_replace: Callable[[Path], None] | None = None) -> bool:
    """Download unless the local copy is of the object the store holds now; say whether
    it did. `before_replace` runs between the download and the rename over `local`."""
    stamp = _stamp(fs, path)
    if local.exists() and _read_stamp(local) == stamp:
        return False
    tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
    _copy_down(fs, path, tmp)
    if before_replace is not None:
        before_replace(local)
    os.replace(tmp, local)
    _write_stamp(local, stamp)
    return True


def _copy_down(fs: pafs.FileSystem, path: str, local: Path) -> None:
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as source:
        while chunk := source.read(_COPY_CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _copy_up(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """An object appears whole when its upload completes (S3, GCS), never half written."""
    with open(local, "rb") as source, fs.open_output_stream(path) as out:
        while chunk := source.read(_COPY_CHUNK):
            out.write(chunk)


def _stamp(fs: pafs.FileSystem, path: str) -> list[Any]:
    """What identifies the object the store holds now: its ETag where the store gives one
    (S3, GCS: it changes with every upload of other bytes), else its size and time."""
    with fs.open_input_stream(path) as stream:
        etag = stream.metadata().get("ETag")
    if etag:
        return [etag.decode(errors="replace")]
    info = fs.get_file_info(path)
    return [info.size, info.mtime_ns]


def _stamp_path(local: Path) -> Path:
    return local.with_name(f".{local.name}.remote")


def _read_stamp(local: Path) -> list[Any] | None:
    try:
        return json.loads(_stamp_path(local).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(local: Path, stamp: list[Any]) -> None:
    """What the store held when this machine last synced the file: if it still holds
    that, nobody uploaded since, and the local copy is as new or newer."""
    _stamp_path(local).write_text(json.dumps(stamp))
