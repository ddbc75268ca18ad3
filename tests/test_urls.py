"""Which spec texts are URLs, and the local folder that mirrors a URL's files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchrun.spec.urls import is_url, work_folder


@pytest.mark.parametrize("text", [
    "s3://bucket/out/results.parquet",
    "S3://bucket/x",
    "gs://bucket/x.jsonl",
    "gcs://bucket/x",
    "hdfs://namenode:8020/data",
    "abfs://container@account/x",
    "https://example.com/x.jsonl",
    "mock://",
    "my+scheme.v2-beta://thing",
])
def test_scheme_and_double_slash_make_a_url(text: str) -> None:
    assert is_url(text)


@pytest.mark.parametrize("text", [
    "file:///tmp/out.jsonl",  # a local path spelled as a URL: the local store
    "FILE:///tmp/out.jsonl",
    "/tmp/out.jsonl",
    "out/results.jsonl",
    "./s3://bucket/x",  # the scheme must open the text
    "data/s3://x",
    "C:\\data\\in.jsonl",
    "C:/data/in.jsonl",
    "\\\\server\\share\\in.jsonl",
    "s3:/bucket/x",
    "s3:bucket",
    "3s://bucket/x",  # a scheme starts with a letter
    "://bucket",
    "my bucket://x",
    "",
])
def test_paths_are_not_urls(text: str) -> None:
    assert not is_url(text)


def test_work_folder_lies_under_batchrun_work_dir(tmp_path: Path) -> None:
    folder = work_folder("s3://bucket/out/results.parquet", {"BATCHRUN_WORK_DIR": str(tmp_path / "work")})
    assert folder.parent == tmp_path / "work"
    assert re.fullmatch(r"[0-9a-f]{16}", folder.name)


def test_a_relative_work_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = work_folder("s3://b/x", {"BATCHRUN_WORK_DIR": "rel/work"})
    assert folder.is_absolute()
    assert folder.parent == tmp_path / "rel" / "work"


def test_work_folder_defaults_to_the_xdg_cache(tmp_path: Path) -> None:
    folder = work_folder("s3://b/x", {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert folder.parent == tmp_path / "cache" / "batchrun" / "jobs"


def test_work_folder_defaults_to_the_home_cache_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert work_folder("s3://b/x", {}).parent == tmp_path / ".cache" / "batchrun" / "jobs"


def test_an_empty_work_dir_counts_as_unset(tmp_path: Path) -> None:
    env = {"BATCHRUN_WORK_DIR": "", "XDG_CACHE_HOME": str(tmp_path)}
    assert work_folder("s3://b/x", env).parent == tmp_path / "batchrun" / "jobs"


def test_work_folder_reads_the_env_it_is_given_not_the_process_env(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHRUN_WORK_DIR", str(tmp_path / "process"))
    assert work_folder("s3://b/x", {"BATCHRUN_WORK_DIR": str(tmp_path / "given")}).parent == tmp_path / "given"


def test_one_url_has_one_folder_and_two_urls_two(tmp_path: Path) -> None:
    env = {"BATCHRUN_WORK_DIR": str(tmp_path)}
    one = work_folder("s3://bucket/a/results.parquet", env)
    assert work_folder("s3://bucket/a/results.parquet", dict(env)) == one
    assert work_folder("s3://bucket/b/results.parquet", env) != one
    assert work_folder("gs://bucket/a/results.parquet", env) != one


def test_work_folder_does_not_create_the_folder(tmp_path: Path) -> None:
    folder = work_folder("s3://b/x", {"BATCHRUN_WORK_DIR": str(tmp_path / "work")})
    assert not folder.exists() and not folder.parent.exists()
