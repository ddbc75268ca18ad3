"""Moving files between this disk and a store: copies up and down, the stamp that remembers
which object was synced, and the download a pull skips because the object is unchanged.

The store is pyarrow's LocalFileSystem on a temporary folder, or fsspec's memory file
system; no server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from batchrun._exceptions import ConfigError, InputError, StorageError
from batchrun.storage import transfer
from batchrun.storage.transfer import fetch_inputs, input_files, open_filesystem, pull_file, push_file, store_errors


@pytest.fixture
def store(tmp_path: Path) -> tuple[pafs.FileSystem, str]:
    """A local folder standing in for a bucket."""
    root = tmp_path / "bucket"
    root.mkdir()
    return pafs.LocalFileSystem(), str(root)


@pytest.fixture
def memory() -> Iterator[tuple[pafs.FileSystem, str]]:
    """fsspec's memory file system, in a folder of this test's own (its store is global)."""
    pytest.importorskip("fsspec")
    fs, root = open_filesystem(f"memory://batchrun-test-{uuid.uuid4().hex}")
    fs.create_dir(root)
    yield fs, root
    fs.delete_dir(root)


def put(fs: pafs.FileSystem, path: str, data: bytes, mtime_ns: int | None = None) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)
    if mtime_ns is not None:  # a local "store" only: a time of the test's choosing
        os.utime(path, ns=(mtime_ns, mtime_ns))


def get(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def stamp_of(local: Path) -> Any:
    return json.loads((local.parent / f".{local.name}.remote").read_text())


# pull_file


def test_pull_downloads_the_object_and_stamps_its_size_and_time(store: tuple[pafs.FileSystem, str],
                                                                 tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/state.sqlite", b"version 1", mtime_ns=1_700_000_000_123_456_789)
    local = tmp_path / "state.sqlite"
    assert pull_file(fs, f"{root}/state.sqlite", local) is True
    assert local.read_bytes() == b"version 1"
    assert stamp_of(local) == [9, 1_700_000_000_123_456_789]


def test_pull_skips_an_object_unchanged_since_the_last_pull(store: tuple[pafs.FileSystem, str],
                                                             tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/out.jsonl", b"rows")
    local = tmp_path / "out.jsonl"
    assert pull_file(fs, f"{root}/out.jsonl", local) is True
    local.write_bytes(b"rows and more written here")  # the local copy is as new or newer
    assert pull_file(fs, f"{root}/out.jsonl", local) is False
    assert local.read_bytes() == b"rows and more written here"


def test_pull_downloads_again_once_the_object_changed(store: tuple[pafs.FileSystem, str], tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/out.jsonl", b"version 1", mtime_ns=1_000_000_000_000_000_000)
    local = tmp_path / "out.jsonl"
    pull_file(fs, f"{root}/out.jsonl", local)
    put(fs, f"{root}/out.jsonl", b"version 2", mtime_ns=2_000_000_000_000_000_000)  # same size, new time
    assert pull_file(fs, f"{root}/out.jsonl", local) is True
    assert local.read_bytes() == b"version 2"
    assert stamp_of(local) == [9, 2_000_000_000_000_000_000]


def test_pull_downloads_again_when_the_stamp_is_missing_or_unreadable(store: tuple[pafs.FileSystem, str],
                                                                      tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/out.jsonl", b"theirs")
    local = tmp_path / "out.jsonl"
    pull_file(fs, f"{root}/out.jsonl", local)
    stamp = tmp_path / ".out.jsonl.remote"
    for damage in (stamp.unlink, lambda: stamp.write_text("{not json")):
        local.write_bytes(b"mine")
        damage()
        assert pull_file(fs, f"{root}/out.jsonl", local) is True
        assert local.read_bytes() == b"theirs"


def test_pull_downloads_when_the_local_copy_is_gone_even_with_its_stamp(store: tuple[pafs.FileSystem, str],
                                                                        tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/out.jsonl", b"theirs")
    local = tmp_path / "out.jsonl"
    pull_file(fs, f"{root}/out.jsonl", local)
    local.unlink()
    assert pull_file(fs, f"{root}/out.jsonl", local) is True
    assert local.read_bytes() == b"theirs"


def test_pull_hands_the_download_to_replace_and_leaves_no_temporary_file(store: tuple[pafs.FileSystem, str],
                                                                         tmp_path: Path) -> None:
    fs, root = store
    put(fs, f"{root}/state.sqlite", b"downloaded")
    local = tmp_path / "state.sqlite"
    local.write_bytes(b"old")
    seen: list[tuple[Path, Path, bytes, bytes]] = []

    def replace(target: Path, download: Path) -> None:
        seen.append((target, download, target.read_bytes(), download.read_bytes()))
        os.replace(download, target)

    assert pull_file(fs, f"{root}/state.sqlite", local, replace=replace) is True
    [(target, download, before, after)] = seen
    assert target == local and (before, after) == (b"old", b"downloaded")
    assert download.parent == tmp_path and download.name.startswith(".state.sqlite.")
    assert download.name.endswith(".download")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.sqlite.remote", "bucket", "state.sqlite"]


def test_pull_copies_a_file_larger_than_one_chunk(store: tuple[pafs.FileSystem, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "_COPY_CHUNK", 7)
    fs, root = store
    data = bytes(range(256)) * 3
    put(fs, f"{root}/big.parquet", data)
    pull_file(fs, f"{root}/big.parquet", tmp_path / "big.parquet")
    assert (tmp_path / "big.parquet").read_bytes() == data


def test_a_pull_of_a_missing_object_raises_and_leaves_the_local_copy(store: tuple[pafs.FileSystem, str],
                                                                      tmp_path: Path) -> None:
    fs, root = store
    local = tmp_path / "out.jsonl"
    local.write_bytes(b"mine")
    with pytest.raises(StorageError, match=r"^s3://b/out.jsonl: cannot download: "):
        with store_errors("s3://b/out.jsonl: cannot download"):
            pull_file(fs, f"{root}/out.jsonl", local)
    assert local.read_bytes() == b"mine"


# push_file


def test_push_uploads_and_stamps_what_the_store_now_holds(store: tuple[pafs.FileSystem, str],
                                                           tmp_path: Path) -> None:
    fs, root = store
    local = tmp_path / "out.jsonl"
    local.write_bytes(b'{"a": 1}\n')
    push_file(local, fs, f"{root}/out.jsonl", local)
    assert get(fs, f"{root}/out.jsonl") == b'{"a": 1}\n'
    info = fs.get_file_info(f"{root}/out.jsonl")
    assert stamp_of(local) == [info.size, info.mtime_ns]


def test_a_pull_after_a_push_downloads_nothing(store: tuple[pafs.FileSystem, str], tmp_path: Path) -> None:
    fs, root = store
    local = tmp_path / "out.jsonl"
    local.write_bytes(b"mine")
    push_file(local, fs, f"{root}/out.jsonl", local)
    assert pull_file(fs, f"{root}/out.jsonl", local) is False


def test_push_of_a_copy_stamps_the_local_file_it_stands_for(store: tuple[pafs.FileSystem, str],
                                                             tmp_path: Path) -> None:
    fs, root = store
    local, snapshot = tmp_path / "state.sqlite", tmp_path / "snapshot.sqlite"
    local.write_bytes(b"live")
    snapshot.write_bytes(b"consistent copy")
    push_file(snapshot, fs, f"{root}/state.sqlite", local)
    assert get(fs, f"{root}/state.sqlite") == b"consistent copy"
    assert stamp_of(local) == [15, fs.get_file_info(f"{root}/state.sqlite").mtime_ns]
    assert not (tmp_path / ".snapshot.sqlite.remote").exists()


# an object store that gives an ETag


class _Stream(io.BytesIO):
    def __init__(self, data: bytes, etag: bytes) -> None:
        super().__init__(data)
        self._etag = etag

    def metadata(self) -> dict[str, bytes]:  # as pyarrow's: names as text, values as bytes
        return {"ETag": self._etag}


class ETagStore:
    """The little of pyarrow.fs a pull uses, from a store that tags each upload (S3, GCS)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, bytes]] = {}

    def open_input_stream(self, path: str) -> contextlib.AbstractContextManager[_Stream]:
        data, etag = self.objects[path]
        return _Stream(data, etag)

    def get_file_info(self, path: str) -> pafs.FileInfo:
        raise AssertionError("a store with ETags is not asked for size and time")


def test_the_stamp_is_the_etag_where_the_store_gives_one(tmp_path: Path) -> None:
    fs = ETagStore()
    fs.objects["b/out.jsonl"] = (b"v1", b'"etag-1"')
    local = tmp_path / "out.jsonl"
    assert pull_file(fs, "b/out.jsonl", local) is True  # type: ignore[arg-type]
    assert stamp_of(local) == ['"etag-1"']
    assert pull_file(fs, "b/out.jsonl", local) is False  # type: ignore[arg-type]
    fs.objects["b/out.jsonl"] = (b"v2", b'"etag-2"')  # same size: only the tag tells
    assert pull_file(fs, "b/out.jsonl", local) is True  # type: ignore[arg-type]
    assert local.read_bytes() == b"v2" and stamp_of(local) == ['"etag-2"']


# fsspec's memory file system, through pyarrow


def test_copy_up_and_down_through_fsspec(memory: tuple[pafs.FileSystem, str], tmp_path: Path) -> None:
    fs, root = memory
    source = tmp_path / "up.jsonl"
    source.write_bytes(b'{"prompt": "hi"}\n')
    push_file(source, fs, f"{root}/up.jsonl", source)
    assert get(fs, f"{root}/up.jsonl") == b'{"prompt": "hi"}\n'
    down = tmp_path / "down" / "up.jsonl"
    down.parent.mkdir()
    assert pull_file(fs, f"{root}/up.jsonl", down) is True
    assert down.read_bytes() == source.read_bytes()
    # The memory store gives neither ETag nor time: nothing proves the copy current
    assert pull_file(fs, f"{root}/up.jsonl", down) is True


def test_a_same_size_rewrite_on_a_store_without_times_is_pulled_again(memory: tuple[pafs.FileSystem, str],
                                                                      tmp_path: Path) -> None:
    fs, root = memory
    put(fs, f"{root}/state.sqlite", b"version 1")
    local = tmp_path / "state.sqlite"
    pull_file(fs, f"{root}/state.sqlite", local)
    put(fs, f"{root}/state.sqlite", b"version 2")
    pull_file(fs, f"{root}/state.sqlite", local)
    assert local.read_bytes() == b"version 2"


# open_filesystem, store_errors


def test_open_filesystem_of_a_file_url_is_the_local_one(tmp_path: Path) -> None:
    fs, path = open_filesystem(f"file://{tmp_path}/x.jsonl")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/x.jsonl"


def test_open_filesystem_hands_a_scheme_pyarrow_does_not_know_to_fsspec() -> None:
    pytest.importorskip("fsspec")
    fs, path = open_filesystem("memory://bucket/in.jsonl")
    assert isinstance(fs, pafs.PyFileSystem)
    assert path == "/bucket/in.jsonl"


def test_open_filesystem_of_an_unknown_scheme_says_so() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(ConfigError) as info:
        open_filesystem("nosuchstore://bucket/x.jsonl")
    assert str(info.value) == "nosuchstore://bucket/x.jsonl: neither pyarrow nor fsspec knows nosuchstore://"


def test_store_errors_turns_io_errors_into_a_storage_error_naming_what_failed() -> None:
    with pytest.raises(StorageError) as info:
        with store_errors("s3://b/state.sqlite: cannot upload the state"):
            raise OSError("When uploading: AccessDenied")
    assert str(info.value) == "s3://b/state.sqlite: cannot upload the state: When uploading: AccessDenied"
    assert isinstance(info.value.__cause__, OSError)


def test_store_errors_lets_other_errors_through() -> None:
    with pytest.raises(ValueError, match="not an IO error"):
        with store_errors("anything"):
            raise ValueError("not an IO error")


# fetch_inputs, input_files


def bucket_with_inputs(root: Path) -> Path:
    (root / "in").mkdir(parents=True)
    for name, data in [("b.jsonl", b'{"p": "b"}\n'), ("a.jsonl", b'{"p": "a"}\n'), ("c.csv", b"p\nc\n"),
                       ("notes.txt", b"not an input")]:
        (root / "in" / name).write_bytes(data)
    return root / "in"


def test_fetch_inputs_downloads_a_glob_in_url_order_with_sortable_names(tmp_path: Path) -> None:
    folder = bucket_with_inputs(tmp_path / "bucket")
    got = fetch_inputs([f"file://{folder}/*.jsonl", f"file://{folder}/c.csv"], tmp_path / "work")
    assert [p.name for p in got] == ["00000-a.jsonl", "00001-b.jsonl", "00002-c.csv"]
    assert [p.read_bytes() for p in got] == [b'{"p": "a"}\n', b'{"p": "b"}\n', b"p\nc\n"]
    assert (tmp_path / "work").stat().st_mode & 0o777 == 0o700


def test_fetch_inputs_downloads_a_file_named_twice_once(tmp_path: Path) -> None:
    folder = bucket_with_inputs(tmp_path / "bucket")
    got = fetch_inputs([f"file://{folder}/a.jsonl", f"file://{folder}/a*.jsonl"], tmp_path / "work")
    assert [p.name for p in got] == ["00000-a.jsonl"]


def test_fetch_inputs_skips_files_unchanged_since_the_last_fetch(tmp_path: Path) -> None:
    folder = bucket_with_inputs(tmp_path / "bucket")
    [first] = fetch_inputs([f"file://{folder}/a.jsonl"], tmp_path / "work")
    first.write_bytes(b"marked")  # a second download would overwrite this
    [again] = fetch_inputs([f"file://{folder}/a.jsonl"], tmp_path / "work")
    assert again == first and again.read_bytes() == b"marked"


@pytest.mark.parametrize(("name", "message"), [
    ("missing.jsonl", "input file not found"),
    ("*.parquet", "no input file matches this pattern"),
    ("notes.txt", "notes.txt is not one of .jsonl, .jsonl.gz, .parquet, .csv"),
])
def test_fetch_inputs_names_the_url_it_cannot_use(tmp_path: Path, name: str, message: str) -> None:
    folder = bucket_with_inputs(tmp_path / "bucket")
    with pytest.raises(InputError) as info:
        fetch_inputs([f"file://{folder}/{name}"], tmp_path / "work")
    assert str(info.value) == f"file://{folder}/{name}: {message}"


def test_input_files_without_urls_are_the_local_files_sorted(tmp_path: Path) -> None:
    folder = bucket_with_inputs(tmp_path / "local")
    assert input_files([folder / "b.jsonl", folder / "a.jsonl"], []) == [folder / "a.jsonl", folder / "b.jsonl"]


def test_input_files_from_urls_land_in_the_work_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = bucket_with_inputs(tmp_path / "bucket")
    monkeypatch.setenv("BATCHRUN_WORK_DIR", str(tmp_path / "work"))
    [got] = input_files([], [f"file://{folder}/a.jsonl"])
    assert got.parent.parent.parent == tmp_path / "work" and got.parent.name == "inputs"
    assert got.read_bytes() == b'{"p": "a"}\n'
