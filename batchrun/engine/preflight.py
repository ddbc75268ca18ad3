"""The checks that cost no request: the key, where it may be sent, the output's folder
and the free space there. They come before any state is opened, so a mistake costs
neither a request nor a state."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import ConfigError, StorageError
from ..http.network import check_key_route, proxy_for
from ..spec.parse import JobSpec
from ..spec.urls import MOCK_BASE_URL, MOCK_SCHEME
from ..storage.durable import private_folder

if TYPE_CHECKING:
    import httpx

__all__ = ["MIN_FREE_BYTES", "check_free_space", "check_output", "check_sending", "read_api_key", "read_key"]

MIN_FREE_BYTES = 16 * 2**20  # in the output's folder, before any request


def check_sending(spec: JobSpec, env: Mapping[str, str], api_key: str | None,
                  transport: httpx.AsyncBaseTransport | None) -> tuple[httpx.AsyncBaseTransport | None, str | None]:
    """Refuse a key sent where it should not go, or a proxy batchrun cannot use; the
    transport and base URL to use instead of the spec's (the mock endpoint's), if any."""
    check_key_route(spec.api.base_url, has_key=api_key is not None, allowed=spec.api.allow_insecure_http,
                    spec_name=spec.name)
    proxy_for(spec.api.base_url, env)  # a proxy batchrun cannot use is said now, before any state
    if spec.api.base_url.startswith(MOCK_SCHEME):
        from ..http.mock import mock_transport  # httpx loads only for the mock endpoint: 0.08 s of a start

        return transport or mock_transport(), MOCK_BASE_URL
    return transport, None


def read_api_key(spec: JobSpec, env: Mapping[str, str]) -> str | None:
    """The key from the variable the spec names (None for the mock endpoint); ConfigError
    (exit 2) when it is unset or holds what no key can."""
    if spec.api.base_url.startswith(MOCK_SCHEME):
        return None
    return read_key(spec.api.api_key_env, env, f"api.api_key_env in {spec.name}")


def read_key(name: str, env: Mapping[str, str], setting: str) -> str:
    """The key in the variable `name`, which `setting` (a spec key, in words) names."""
    key = env.get(name, "").strip()  # a key read from a file often ends in a newline
    if not key:
        raise ConfigError(f"{name} is not set; export it or set {setting}")
    if not all("!" <= c <= "~" for c in key):
        # Never echo it: the point is that the key reaches no output.
        raise ConfigError(f"{name} holds characters an API key cannot have (a space, a quote, a line break?)")
    return key


def check_output(output: Path) -> None:
    folder = output.parent
    try:
        private_folder(folder)  # if batchrun makes it, it is private
    except OSError as exc:
        raise ConfigError(f"{output}: cannot create the output folder {folder}: {exc.strerror}") from exc
    if output.is_dir():
        raise ConfigError(f"{output}: is a folder; name a .parquet file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{output}: the folder {folder} is not writable")


def check_free_space(folder: Path) -> None:
    """A rerun on a disk still full would pay for answers it cannot save: refuse first."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return  # no answer from the file system: the first save will say what is wrong
    if stat.f_blocks == 0:
        return  # a file system that reports no sizes (some FUSE mounts): nothing to go by
    free = stat.f_bavail * stat.f_frsize
    if free < MIN_FREE_BYTES:
        raise StorageError(
            f"{folder}: only {free / 2**20:.1f} MB free; batchrun needs at least {MIN_FREE_BYTES >> 20} MB "
            "there to save answers and write the output. Free space and rerun; no request was sent"
        )
