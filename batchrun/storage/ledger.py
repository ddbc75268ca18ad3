"""The state's record of the rows sent to a provider's batch API: the batch ledger.

    batches     key, endpoint, file_id, batch_id, state, counts, hold, since, collected
    batch_rows  row_index (PRIMARY KEY: no row is ever in two batches), key, and what its
                answer needs of the row (its id, the model it asked for, its cache key, its
                worst case in USD and tokens: an answer without usage is charged that), so
                that collecting a batch reads no input
    unbatched   row_index, reason: rows a batch gave back unanswered (expired, cancelled,
                failed as a whole), to go live (`fallback: live`)

It lives in the job's state, in the state's own transactions, because a provider's
batch is a request like any other, only slower: a kill -9 at any moment must leave
the record of what was sent and what came back consistent.

Intent is recorded before each remote call: a batch's rows (and its budget hold) before
its file is uploaded, the file's id before the batch is created, the batch's id as soon
as the provider gives it. A row joins `batch_rows` in the transaction that plans its
batch, so a row already in one can never be planned into another (the primary key
refuses it). A batch is collected in one transaction with its answers (see
`StateStore.save(also=)`): its rows leave `batch_rows`, those it did not answer join
`unbatched`, its hold goes, and the answers are saved, all or nothing. A kill before
that commit collects the batch again, from the provider's files; after it, never.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["BATCH_ROW_ADDED", "LEDGER_SCHEMA", "BatchRow", "Entry", "Ledger"]

LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS batches (key TEXT PRIMARY KEY, endpoint TEXT NOT NULL, file_id TEXT, batch_id TEXT, "
    "state TEXT NOT NULL, counts TEXT, hold INTEGER, since REAL NOT NULL, collected INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS batch_rows (row_index INTEGER PRIMARY KEY, key TEXT NOT NULL, row_id TEXT NOT NULL, "
    "model TEXT, cache_key TEXT, worst_usd REAL, worst_tokens INTEGER)",
    "CREATE TABLE IF NOT EXISTS unbatched (row_index INTEGER PRIMARY KEY, reason TEXT NOT NULL)",
)
LEDGER_TABLES = ("batches", "batch_rows", "unbatched")

PLANNED = "planned"  # rows recorded; the file may or may not be uploaded (file_id says)

class BatchRow(NamedTuple):
    """A row of a batch, as `plan` records it."""

    row_index: int
    row_id: str
    model: str | None  # None where the spec names it
    cache_key: str | None
    worst_usd: float | None  # None where it has no bound (no price)
    worst_tokens: int | None  # (no max_tokens)


BATCH_ROW_ADDED = ("worst_usd REAL", "worst_tokens INTEGER")  # columns a state from before them lacks


@dataclass(frozen=True)
class Entry:
    """One batch as the ledger knows it. `since`: when it was planned (seconds since the
    epoch), from which its wait is counted."""

    key: str
    endpoint: str  # the endpoint's name: every row of a batch goes to one
    state: str
    since: float
    file_id: str | None = None
    batch_id: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    hold: int | None = None
    collected: bool = False

    def status(self) -> dict[str, Any]:
        """As `batchrun status --json` lists it: {id, state, counts} (id None until created)."""
        return {"id": self.batch_id, "state": self.state, "counts": dict(self.counts)}


class Ledger:
    """The batch ledger in a state's connection; writes go through `transaction`, the
    state's own (so they are as durable as its answers)."""

    def __init__(self, db: sqlite3.Connection, transaction: Callable[[], Any]) -> None:
        self._db = db
        self._transaction = transaction

    def plan(self, key: str, endpoint: str, rows: Iterable[BatchRow], since: float,
             hold: tuple[int, float, int] | None = None) -> None:
        """Record a batch's rows (and its budget hold: id, usd, tokens) before anything is
        sent. Raises sqlite3.IntegrityError, recording nothing, if a row is in a batch."""
        with self._transaction():
            self._db.execute("INSERT INTO batches (key, endpoint, state, hold, since) VALUES (?, ?, ?, ?, ?)",
                             (key, endpoint, PLANNED, hold[0] if hold else None, since))
            self._db.executemany(
                "INSERT INTO batch_rows (row_index, key, row_id, model, cache_key, worst_usd, worst_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((index, key, row_id, model, cache_key, usd, tokens)
                 for index, row_id, model, cache_key, usd, tokens in rows))
            self._db.execute("DELETE FROM unbatched WHERE row_index IN (SELECT row_index FROM batch_rows WHERE key = ?)",
                             (key,))
            if hold is not None:
                self._db.execute("INSERT INTO holds VALUES (?, ?, ?)", hold)

    def uploaded(self, key: str, file_id: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE batches SET file_id = ? WHERE key = ?", (file_id, key))

    def seen(self, key: str, state: str, counts: Mapping[str, int], batch_id: str | None = None) -> None:
        """The provider's word on a batch: its state and counts (and its id, once created)."""
        with self._transaction():
            self._db.execute("UPDATE batches SET state = ?, counts = ?, batch_id = COALESCE(?, batch_id) "
                             "WHERE key = ?", (state, json.dumps(dict(counts)), batch_id, key))

    def forget(self, key: str) -> None:
        """A batch that never reached the provider (its upload or creation refused for
        good): its rows are free again, its hold let go."""
        with self._transaction():
            self._db.execute("DELETE FROM holds WHERE id = (SELECT hold FROM batches WHERE key = ?)", (key,))
            self._db.execute("DELETE FROM batch_rows WHERE key = ?", (key,))
            self._db.execute("DELETE FROM batches WHERE key = ?", (key,))

    def collecting(self, key: str, unanswered: Mapping[int, str]) -> Callable[[sqlite3.Connection], None]:
        """What collecting a batch changes in the ledger, to run in the transaction that
        saves its answers: `unanswered` rows (row -> why) are to be answered elsewhere."""

        def collect(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM holds WHERE id = (SELECT hold FROM batches WHERE key = ?)", (key,))
            db.execute("DELETE FROM batch_rows WHERE key = ?", (key,))
            db.executemany("INSERT OR REPLACE INTO unbatched VALUES (?, ?)", unanswered.items())
            db.execute("UPDATE batches SET collected = 1 WHERE key = ?", (key,))

        return collect

    def answered_elsewhere(self, rows: Iterable[int]) -> Callable[[sqlite3.Connection], None]:
        """Rows handed back by a batch that are settled now (failed, with `fallback: none`),
        to run in the transaction that saves them: they are no batch's any more."""
        rows = [(row,) for row in rows]

        def forget(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM unbatched WHERE row_index = ?", rows)

        return forget

    def entries(self, *, outstanding: bool = False) -> list[Entry]:
        """The batches, oldest first; `outstanding`: only those not yet collected."""
        where = " WHERE collected = 0" if outstanding else ""
        return [Entry(key, endpoint, state, since, file_id, batch_id, json.loads(counts) if counts else {}, hold,
                      bool(collected))
                for key, endpoint, file_id, batch_id, state, counts, hold, since, collected in self._db.execute(
                    "SELECT key, endpoint, file_id, batch_id, state, counts, hold, since, collected FROM batches"
                    f"{where} ORDER BY since, rowid")]

    def rows(self, key: str) -> list[int]:
        return [row for (row,) in self._db.execute(
            "SELECT row_index FROM batch_rows WHERE key = ? ORDER BY row_index", (key,))]

    def asked(self, key: str) -> dict[int, BatchRow]:
        """A batch's rows, as `plan` recorded them, by row index."""
        return {row[0]: BatchRow(*row) for row in self._db.execute(
            "SELECT row_index, row_id, model, cache_key, worst_usd, worst_tokens FROM batch_rows WHERE key = ?",
            (key,))}

    def hold_of(self, key: str) -> tuple[float, int] | None:
        """The budget's hold on a batch (its worst case: usd, tokens), if it has one."""
        return self._db.execute("SELECT usd, tokens FROM holds WHERE id = (SELECT hold FROM batches WHERE key = ?)",
                                (key,)).fetchone()

    def rows_out(self) -> int:
        """Rows in batches not yet collected: a live run must not send them."""
        return self._db.execute("SELECT COUNT(*) FROM batch_rows").fetchone()[0]

    def unbatched(self) -> dict[int, str]:
        return dict(self._db.execute("SELECT row_index, reason FROM unbatched"))

    def taken(self, size: int) -> bytearray:
        """A byte per row: 1 where the row is in a batch, or came back from one unanswered."""
        marks = bytearray(size)
        for (row,) in self._db.execute("SELECT row_index FROM batch_rows UNION ALL SELECT row_index FROM unbatched"):
            if row < size:
                marks[row] = 1
        return marks
