"""A finished batch's answers into the state: its files downloaded, each line joined to
its row, every row of the batch settled or handed on, in one transaction.

    answered      the row's Result, as a live answer's: cost at batch prices, `backend`
                  "batch", a schema's `parsed` (an answer that breaks the schema is asked
                  again live, where re-asks happen)
    refused       a line the batch refused with a 4xx: a failed row, like a live 4xx
    unanswered    expired, cancelled, failed with the batch, or no line at all: handed to
                  the live engine (`fallback: live`), or a failed row with the provider's
                  word (`fallback: none`; `--retry-failed` sends it again)

Lines of other jobs, of rows not in this batch, or that do not read are passed over:
their rows, with no answer, are unanswered, never lost. Collection commits with the
ledger's change (`Ledger.collecting`), so a kill before the commit collects the batch
again from the provider's files, and after it never.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from ...endpoints import get_endpoint
from ...endpoints.result import Result
from ...engine.holds import metered
from ...policy.pricing import cost
from ...spec.schema import Structure
from ...storage.ledger import Entry
from ...storage.state import upsert
from .base import Batch
from .cached import remember
from .lines import read_line
from .remote import call
from .session import Session

__all__ = ["BACKEND", "collect"]

BACKEND = "backend"  # the output column, and its key in a result's extra
LINE_OVERHEAD = 64 * 1024  # a line's bytes beside its answer (custom_id, status, JSON around it)
MAX_WHY = 500  # characters kept of a line's word on a row it did not answer
CACHE_EVERY = 1000  # answers added to the response cache at once


def collect(session: Session, entry: Entry, batch: Batch) -> tuple[int, int]:
    """Save what `batch` (entry's, finished) answered; (rows settled, rows handed on).

    The files go to disk as they arrive, and their lines into the state as they are
    read, in the one transaction: a batch's answers never need to fit in memory."""
    reading = _Reading(session, entry, batch)
    with _downloaded(session, batch) as (files, gone):
        reading.gone = gone
        session.store.save((), released=[entry.hold] if entry.hold is not None else [],
                           also=lambda db: reading.commit(db, files))
    remember(session, reading.cached)
    return reading.settled, len(reading.unanswered)


@contextlib.contextmanager
def _downloaded(session: Session, batch: Batch) -> Iterator[tuple[list[tuple[Path, bool]], list[str]]]:
    """The batch's output and error files (path, from_errors) downloaded beside the state
    (private, like it), for as long as the `with` lasts; and which of them the provider
    no longer has ("output", "error": their rows have no answer from them)."""
    files: list[tuple[Path, bool]] = []
    gone: list[str] = []
    try:
        for file, from_errors in ((batch.output_file, False), (batch.error_file, True)):
            if file:
                path = session.store.path.with_name(f".{session.store.path.name}.{len(files)}.download")
                files.append((path, from_errors))
                if not call(session, _fetch, session, file, path):
                    gone.append("error" if from_errors else "output")
        yield files, gone
    finally:
        for path, _ in files:
            path.unlink(missing_ok=True)


def _fetch(session: Session, file: str, path: Path) -> bool:
    """One try at the download: the file starts empty each time. Whether it was there."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as into:
        return session.provider.download(session.http, file, into)


class _Reading:
    """A batch's lines, read into Results in the transaction that collects it."""

    def __init__(self, session: Session, entry: Entry, batch: Batch) -> None:
        self.session, self.entry, self.batch = session, entry, batch
        self.asked = session.store.ledger.asked(entry.key)  # each row's id, model (its price), cache key, worst case
        schema = session.spec.answer_schema()
        self.structure = Structure(schema) if schema is not None else None
        self.live = session.batch.fallback == "live"
        self.generates = get_endpoint(entry.endpoint).generates  # (embeddings count no completion)
        self.unanswered: dict[int, str] = {}  # row -> why: handed on
        # (cache key, answer), with a cache: added to it a thousand at a time as they are
        # read (an answer in the cache and not in the state, should the commit fail, was
        # paid for all the same: a rerun may take it from there)
        self.cached: list[tuple[str | None, Result]] = []
        self.settled = 0
        self.gone: list[str] = []  # its files the provider no longer has
        # A batch planned before its rows kept their worst case (an older state): its hold,
        # shared among them, stands in for it
        hold = session.store.ledger.hold_of(entry.key) if entry.hold is not None else None
        self.share = (hold[0] / len(self.asked), int(hold[1] / len(self.asked))) if hold and self.asked else None

    def commit(self, db: sqlite3.Connection, files: list[tuple[Path, bool]]) -> None:
        upsert(db, self._results(files))
        self.session.store.ledger.collecting(self.entry.key, self.unanswered)(db)

    def _results(self, files: list[tuple[Path, bool]]) -> Iterator[Result]:
        """Each row's Result, as its lines say (an answer beats a line that says none),
        then those of the rows no line answered; the rows to hand on go to `unanswered`."""
        decided: set[int] = set()
        no_answer: dict[int, str] = {}  # what a line said of a row it did not answer
        endpoint = get_endpoint(self.entry.endpoint)
        limit = self.session.spec.api.max_answer_bytes + LINE_OVERHEAD
        for path, from_errors in files:
            for line in _lines_of(path, limit):
                outcome = read_line(self.session.provider, line, self.session.job, lambda _: endpoint,
                                    from_errors=from_errors) if line is not None else None
                if outcome is None or outcome.row_index not in self.asked or outcome.row_index in decided:
                    continue
                if outcome.result is None:
                    no_answer[outcome.row_index] = (outcome.unanswered or "")[:MAX_WHY]
                    continue
                decided.add(outcome.row_index)
                if (result := self._judged(outcome.result)) is not None:
                    yield result
        for index in self.asked.keys() - decided:
            why = no_answer.get(index) or self._why()
            if (result := self._judged(Result(index, "", "failed"), why)) is not None:
                yield result

    def _why(self) -> str:
        """Why a row of the batch has no line at all."""
        batch, waited_h = self.batch, (time.time() - self.entry.since) / 3600
        errors = "; ".join(batch.errors[:3])
        why = f"the batch {batch.state} without an answer for it" + (f" ({errors})" if errors else "")
        if self.gone:
            why += f"; its {' and '.join(self.gone)} file{'s' if len(self.gone) > 1 else ''} " \
                   f"{'are' if len(self.gone) > 1 else 'is'} gone from the provider"
        if batch.state in ("cancelled", "deleted") and waited_h > self.session.batch.max_wait_h:
            why += f", cancelled by batchrun past batch_api.max_wait_h ({self.session.batch.max_wait_h:g} h)"
        return why

    def _judged(self, result: Result, why: str | None = None) -> Result | None:
        """The row's Result as the state keeps it, or None when it goes live (`unanswered`):
        no answer (`why`), or one that breaks the schema (re-asks are the live path's)."""
        index = result.row_index
        if why is None and result.status == "ok" and self.structure is not None:
            parsed, problem = self.structure.problem(result.output_text)
            if problem is None:
                result.extra = {**(result.extra or {}), "parsed": parsed}
            elif self.live:
                why = f"its answer breaks the schema ({problem})"
            else:
                result = Result(index, "", "failed", error=f"the batch's answer breaks the schema: {problem}",
                                output_text=result.output_text, model=result.model)
        if why is not None and self.live:
            self.unanswered[index] = why
            return None
        if why is not None:
            result = Result(index, "", "failed", error=f"the batch did not answer it ({self.batch.state}): {why}")
        _, row_id, model, key, worst_usd, worst_tokens = self.asked[index]
        if worst_usd is None and worst_tokens is None and self.share is not None:
            worst_usd, worst_tokens = self.share
        settled = _settled(self.session, result, row_id, model or self.session.spec.model, worst_usd, worst_tokens,
                           self.generates)
        self.settled += 1
        if self.session.cache is not None and key is not None and settled.status == "ok":
            self.cached.append((key, settled))
            if len(self.cached) >= CACHE_EVERY:
                remember(self.session, self.cached)
                self.cached = []
        return settled


def _lines_of(path: Path, limit: int) -> Iterator[bytes | None]:
    """The file's lines; None for one longer than `limit` (not read into memory: its row
    has no answer from it)."""
    with open(path, "rb") as f:
        while line := f.readline(limit + 1):
            if len(line) > limit:
                while (rest := f.readline(limit)) and not rest.endswith(b"\n"):
                    pass
                yield None
                continue
            yield line


def _settled(session: Session, result: Result, row_id: str, model: str | None, worst_usd: float | None,
             worst_tokens: int | None, generates: bool) -> Result:
    """A row's Result as the state keeps it: its id, one attempt, cost at batch prices (an
    answer without usage at its worst case, as live: never free, and counted against the
    budget), a failure final (a 4xx, an answer that breaks the schema), the path that
    answered."""
    result.id, result.attempts = row_id, 1
    extra = {**(result.extra or {}), BACKEND: "batch"}
    if result.status != "ok":
        result.transient = False
    elif not metered(result, generates):
        if worst_usd is not None or worst_tokens is not None:
            result.cost_usd = worst_usd
            extra.update(unmetered=1, unmetered_tokens=worst_tokens or 0)
    elif (price := session.spec.pricing.get(model or "") if session.spec.pricing else None) is not None:
        result.cost_usd = cost(price.batched(), result.prompt_tokens, result.completion_tokens, result.cached_tokens)
    result.extra = extra
    return result
