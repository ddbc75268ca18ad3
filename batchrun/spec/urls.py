"""Which texts of a spec are URLs, and the local folder a URL's files are mirrored in.

Kept apart from the stores and imports nothing of batchrun, so that the spec's parser
can tell a URL from a path without importing the stores (which know the spec).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MOCK_BASE_URL", "MOCK_SCHEME", "is_url", "work_folder"]

MOCK_SCHEME = "mock://"  # the in-process endpoint (`http.mock`), for trying batchrun out
MOCK_BASE_URL = "http://mock.batchrun.invalid/v1"  # never resolved: the transport answers in-process

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(text: str) -> bool:
    match = _URL.match(text)
    return bool(match) and match[1].lower() != "file"


def work_folder(url: str, env: Mapping[str, str]) -> Path:
    """The local folder mirroring the folder of output `url`."""
    base = env.get("BATCHRUN_WORK_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "batchrun", "jobs")
    return Path(os.path.abspath(base)) / hashlib.sha256(url.encode()).hexdigest()[:16]
