"""Moving files between this disk and a file system pyarrow.fs (or fsspec) opens.

Bytes only: what the files hold is the caller's business. A download replaces the
local copy whole (written under another name, then renamed); an upload appears whole
when it completes (S3, GCS), never half written. Beside each file synced, a small
`.<name>.remote` remembers which object the store held then (its ETag, else its size
and time), so a file the store still holds as synced is not downloaded again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from .._exceptions import ConfigError, InputError, StorageError
from ..inputs.files import INPUT_SUFFIXES, expand_inputs
from ..spec.urls import work_folder
from .durable import private_folder

__all__ = ["fetch_inputs", "input_files", "open_filesystem", "pull_file", "push_file", "store_errors"]

_COPY_CHUNK = 8 << 20


def open_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The file system of `url` and the path in it: pyarrow's own (S3, GCS, HDFS...),
    else fsspec's, where fsspec and the scheme's implementation are installed."""
    try:
        return pafs.FileSystem.from_uri(url)
    except OSError as exc:  # the store's library or its account cannot be set up (no JVM for hdfs://, no region)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{url}: cannot open the store: {reason}") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        return _fsspec_filesystem(url, arrow_error)


def _fsspec_filesystem(url: str, arrow_error: Exception) -> tuple[pafs.FileSystem, str]:
    scheme = url.split("://", 1)[0]
    try:  # optional, and heavy: only for a scheme pyarrow does not know
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


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # pyarrow's IO errors (ArrowIOError) are OSErrors
        raise StorageError(f"{what}: {exc}") from exc


def input_files(paths: Sequence[Path], urls: Sequence[str]) -> list[Path]:
    """A job's input files, in the order rows are read: local ones as they are, those
    on a store downloaded first (into a local folder for these URLs)."""
    if not urls:
        return expand_inputs(paths)
    return fetch_inputs(urls, work_folder("\n".join(urls), os.environ) / "inputs")


def fetch_inputs(urls: Sequence[str], folder: Path) -> list[Path]:
    """Download the input files the URLs (or globs in their last part) name into
    `folder`, in URL order, skipping files whose size and time are those downloaded."""
    found: dict[str, tuple[pafs.FileSystem, pafs.FileInfo]] = {}
    for url in urls:
        fs, path = open_filesystem(url)
        scheme = url.split("://", 1)[0]
        with store_errors(f"{url}: cannot list the input"):
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
    private_folder(folder)
    local_files = []
    for n, (url, (fs, info)) in enumerate(sorted(found.items())):
        # Numbered so that the local names sort as the URLs do: the order rows are read in
        local = folder / f"{n:05d}-{info.base_name}"
        with store_errors(f"{url}: cannot download the input"):
            pull_file(fs, info.path, local)
        local_files.append(local)
    return local_files


def pull_file(fs: pafs.FileSystem, path: str, local: Path,
              replace: Callable[[Path, Path], None] | None = None) -> bool:
    """Download unless the local copy is of the object the store holds now; say whether
    it did. `replace(local, download)` puts the download in the local copy's place."""
    stamp = _stamp(fs, path)
    # A size alone (a store that gives neither ETag nor time: fsspec's memory, http)
    # cannot tell a rewrite of as many bytes: such an object is always downloaded
    if local.exists() and stamp[-1] is not None and _read_stamp(local) == stamp:
        return False
    tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
    _copy_down(fs, path, tmp)
    if replace is None:
        os.replace(tmp, local)
    else:
        replace(local, tmp)
    _write_stamp(local, stamp)
    return True


def push_file(source: Path, fs: pafs.FileSystem, path: str, local: Path) -> None:
    """Upload `source` (the local file `local`, or a copy of it) to `path`, and remember
    that the store holds the object this machine wrote."""
    _copy_up(source, fs, path)
    _write_stamp(local, _stamp(fs, path))


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
