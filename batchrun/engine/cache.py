"""A response cache that several jobs share: an answer paid for once is not paid for again.

    cache: ../cache/responses.sqlite           # or {path: ..., everything: true}

A request is looked up by a digest of its endpoint, its API's URL and its exact body
(after templates and params, keys sorted): the same question to the same API. Only
deterministic requests are cached unless `everything` says otherwise: `temperature: 0`,
or a `seed`. Embeddings are not cached (they go several rows to a request).

The cache is one SQLite file in WAL mode: several jobs read and write it at once, each
entry is written in a transaction (a kill -9 leaves it whole or absent, never torn),
and writers wait for each other (busy timeout) rather than fail. Answers are added by
the job's writer thread with the state's commits, off the requests' path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ..endpoints.result import Result
from ..policy.pricing import Price, cost
from ..spec.model import CacheSpec
from ..storage.durable import private_folder

__all__ = ["ResponseCache", "cacheable", "from_cache"]

# What a cached answer keeps: the answer itself, not the row it answered
_KEPT = ("output_text", "reasoning_content", "tool_calls", "finish_reason", "model", "response_id", "prompt_tokens",
         "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
# extra's keys that belong to the row, not the answer
_ROW_ONLY = ("request", "cached", "saved_usd", "unmetered", "unmetered_tokens", "backend")
BUSY_TIMEOUT_S = 60.0


def cacheable(body: Mapping[str, Any], *, everything: bool) -> bool:
    """A request whose answer may be reused: deterministic (temperature 0 or a seed), or any with `everything`."""
    return everything or body.get("temperature") == 0 or body.get("seed") is not None


def from_cache(hit: Result, row_index: int, row_id: str, price: Price | None, request: bytes | None) -> Result:
    """A row answered from the cache: no request, nothing paid, and what that saved;
    `request`: the body it would have sent (`keep_request`)."""
    hit.row_index, hit.id = row_index, row_id
    saved = cost(price, hit.prompt_tokens, hit.completion_tokens, hit.cached_tokens)
    hit.cost_usd = 0.0 if price is not None else None
    hit.extra = {**(hit.extra or {}), "cached": True, **({"saved_usd": saved} if saved is not None else {})}
    if request is not None:
        hit.extra["request"] = request.decode()
    return hit


class ResponseCache:
    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        path = spec.path
        try:
            private_folder(path.parent)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._read = self._connect(path)
            self._write = self._connect(path)
            self._write.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cache: cannot open {path}: {getattr(exc, 'strerror', None) or exc}. The cache only "
                              "saves requests: move or delete the file (a new one is made), name another in the "
                              "spec's cache:, or remove cache: to run without one") from exc

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # an entry lost in a power cut costs a request, never a torn one
        return db

    def close(self) -> None:
        self._read.close()
        self._write.close()

    @staticmethod
    def key(url: str, body: Mapping[str, Any]) -> str:
        text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()

    def get(self, key: str) -> Result | None:
        """The cached answer, as a Result to fill in with its row, or None."""
        try:
            found = self._read.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None  # a cache that cannot be read is a miss, not a failed job
        if found is None:
            return None
        try:
            data = json.loads(found[0])
            result = Result(row_index=-1, id="", status="ok", **{k: data.get(k) for k in _KEPT})
        except (ValueError, TypeError):
            return None
        result.extra = data.get("extra")
        return result

    def put(self, entries: Iterable[tuple[str, Result]]) -> None:
        """Add answers (the writer thread's, with the state's commit); a cache that cannot
        be written costs only the reuse."""
        rows = []
        for key, result in entries:
            data: dict[str, Any] = {k: getattr(result, k) for k in _KEPT}
            if result.extra:
                kept = {k: v for k, v in result.extra.items() if k not in _ROW_ONLY}
                if kept:
                    data["extra"] = kept
            rows.append((key, json.dumps(data, ensure_ascii=False)))
        if not rows:
            return
        try:
            with self._write:
                self._write.execute("BEGIN IMMEDIATE")
                self._write.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?)", rows)
        except sqlite3.Error:
            pass
