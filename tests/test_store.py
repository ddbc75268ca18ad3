"""The `Store` seam: a local output and one on object storage behave alike.

Each test takes a pair of stores of one kind: `here`, the machine that writes, and
`there`, another machine reading the same job (for a local output, the same disk).
The object store is moto's S3 server (tests/test_remote.py's `s3`): those cases are slow.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from batchrun import ConfigError
from batchrun.spec.parse import parse_spec
from batchrun.storage import LocalStore, ObjectStore, Store, open_store
from batchrun.storage.lock import JobLock
from batchrun.storage.state import StateStore, state_path
from tests.test_remote import _bucket, _put_jsonl, s3  # noqa: F401 (s3: the fixture)

META = {"input_digest": "abc", "rows": 3, "passthrough": [], "request": {"model": "m", "params": {}}}
KINDS = ["local", pytest.param("objects", marks=pytest.mark.slow)]


def _new_bucket(s3: dict[str, str]) -> str:
    name = f"store-{uuid.uuid4().hex[:12]}"
    _bucket(s3, name)
    return name


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, Store]:
    """(here, there): two machines' stores of the same job's output."""
    here, there = tmp_path / "here" / "answers.parquet", tmp_path / "there" / "answers.parquet"
    here.parent.mkdir()
    if request.param == "local":
        store = LocalStore(here)
        return store, store
    url = f"s3://{_new_bucket(request.getfixturevalue('s3'))}/evals/answers.parquet"
    there.parent.mkdir()
    return ObjectStore(url, here), ObjectStore(url, there)


def test_a_pushed_file_is_published_and_pulled_elsewhere(stores: tuple[Store, Store]) -> None:
    here, there = stores
    assert not there.exists(there.output)
    here.output.write_bytes(b"first")
    here.push_file(here.output)
    assert here.exists(here.output) and there.exists(there.output)
    there.pull_file(there.output)
    assert there.output.read_bytes() == b"first"
    # Another upload replaces the copy there at the next pull
    here.output.write_bytes(b"second, longer")
    here.push_file(here.output)
    there.pull_file(there.output)
    assert there.output.read_bytes() == b"second, longer"


def test_a_file_never_written_is_neither_published_nor_pulled(stores: tuple[Store, Store]) -> None:
    here, there = stores
    missing = here.output.with_name("answers.status.json")
    here.push_file(missing)  # nothing to publish: no error
    assert not here.exists(missing)
    there.pull_file(there.output.with_name("answers.status.json"))
    assert not there.output.with_name("answers.status.json").exists()


def test_move_sets_the_published_copy_aside_once(stores: tuple[Store, Store]) -> None:
    here, there = stores
    aside = here.output.with_name("answers.parquet.before-restart")
    assert here.move(here.output, aside) is False  # nothing published yet
    here.output.write_bytes(b"old")
    here.push_file(here.output)
    assert here.move(here.output, aside) is True
    assert not there.exists(there.output)
    assert there.exists(there.output.with_name(aside.name))
    assert here.move(here.output, aside) is False


def test_names_in_lists_the_files_a_folder_holds(stores: tuple[Store, Store]) -> None:
    here, there = stores
    folder = here.output.with_name("answers.shards")
    folder.mkdir()
    for name in ("00000-of-00002.parquet", "00000-of-00002.status.json"):
        (folder / name).write_text(name)
        here.push_file(folder / name)
    elsewhere = there.output.with_name("answers.shards")
    assert there.names_in(elsewhere) == {"00000-of-00002.parquet", "00000-of-00002.status.json"}
    assert there.names_in(there.output.with_name("nothing.shards")) == set()


def test_the_state_pushed_mid_run_is_whole_where_it_is_pulled(stores: tuple[Store, Store]) -> None:
    here, there = stores
    state = StateStore.open(state_path(here.output))
    try:
        state.claim(META, spec_name="job.yaml")  # committed to the -wal, not yet to the file
        here.push_state(state.path)
    finally:
        state.close()
    there.pull_state(state_path(there.output))
    pulled = StateStore.open(state_path(there.output), lock=False)
    try:
        assert pulled.meta() == {**META, "version": "1"}
    finally:
        pulled.close()


def test_where_shows_a_path_here_and_a_url_on_a_store(tmp_path: Path, s3: dict[str, str]) -> None:
    output = tmp_path / "answers.parquet"
    shard = output.with_name("answers.shards") / "00001-of-00002.parquet"
    assert LocalStore(output).where(shard) == shard
    bucket = _new_bucket(s3)
    assert ObjectStore(f"s3://{bucket}/evals/answers.parquet", output).where(shard) == \
        f"s3://{bucket}/evals/answers.shards/00001-of-00002.parquet"


def test_a_state_a_runner_here_holds_is_never_replaced_from_the_store(tmp_path: Path, s3: dict[str, str]) -> None:
    url = f"s3://{_new_bucket(s3)}/evals/answers.parquet"
    there = ObjectStore(url, tmp_path / "there" / "answers.parquet")
    there.output.parent.mkdir()
    state = StateStore.open(state_path(there.output))
    state.claim(META, spec_name="job.yaml")
    there.push_state(state.path)
    state.close()
    here = ObjectStore(url, tmp_path / "here" / "answers.parquet")
    here.output.parent.mkdir()
    lock = JobLock.acquire(state_path(here.output))
    try:
        with pytest.raises(ConfigError, match=rf"this job is already running \(pid {os.getpid()}, in "):
            here.pull_state(state_path(here.output))
    finally:
        lock.release()
    assert not state_path(here.output).exists()


def test_open_store_chooses_the_kind_from_the_output(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    spec = parse_spec({"input": "in.jsonl", "output": "out.parquet", "model": "m"}, base_dir=tmp_path)
    storage = open_store(spec)
    assert isinstance(storage, LocalStore)
    assert storage.where(spec.output) == tmp_path / "out.parquet"
    assert storage.inputs() == [tmp_path / "in.jsonl"]


def test_open_store_opens_object_storage_for_an_output_url(tmp_path: Path, s3: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHRUN_WORK_DIR", str(tmp_path / "work"))  # where the inputs are downloaded
    bucket = _new_bucket(s3)
    fs = _bucket(s3, bucket)
    _put_jsonl(fs, f"{bucket}/in/b.jsonl", [{"prompt": "b"}])
    _put_jsonl(fs, f"{bucket}/in/a.jsonl", [{"prompt": "a"}])
    spec = parse_spec({"input": f"s3://{bucket}/in/*.jsonl", "output": f"s3://{bucket}/out/x.parquet", "model": "m"},
                      base_dir=tmp_path, environ={"BATCHRUN_WORK_DIR": str(tmp_path / "work")})
    storage = open_store(spec)
    assert isinstance(storage, ObjectStore)
    assert storage.where(spec.output) == f"s3://{bucket}/out/x.parquet"
    inputs = storage.inputs()  # downloaded, in the order of their URLs
    assert [path.name for path in inputs] == ["00000-a.jsonl", "00001-b.jsonl"]
    assert inputs[0].read_text() == '{"prompt": "a"}\n'


def test_an_output_url_no_file_system_opens_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    spec = parse_spec({"input": "in.jsonl", "output": "nosuchscheme://b/x.parquet", "model": "m"},
                      base_dir=tmp_path, environ={"BATCHRUN_WORK_DIR": str(tmp_path / "work")})
    with pytest.raises(ConfigError, match=r"nosuchscheme://b/x.parquet: "):
        open_store(spec)
