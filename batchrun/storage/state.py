"""The checkpoint store: one SQLite file next to the output.

It holds a `meta` table (what the state was written for: the input's digest, the
request configuration, the row count) and a `results` table with one row per
settled input row, keyed by row_index, so a row can never be stored twice. An
embedding's vector is kept in a file beside it, referred to from its row
(storage/vectors.py).
SQLite in WAL mode with synchronous=FULL makes each commit atomic and durable:
a kill -9 loses only what was not yet committed, never a committed row, never
half a row.

Only the runner's writer task writes here; nobody else holds a write connection.
The output writer reads committed rows through a second connection, so reading a
row group never holds up a commit. The job's lock (`_lock`) keeps a second runner
out.

A state is made whole or not at all (built under a temporary name, then renamed),
so a state file that is empty, unreadable, someone else's, or whose metadata does
not parse is damage, never a fresh start: opening it raises StateDamagedError
(exit 2), and `--restart` is the way to discard it. The files hold answers, so
they are readable by their owner only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import operator
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, StateDamagedError, StateMismatchError, StorageError
from ..endpoints.result import RESULT_FIELDS, Result
from ..policy.pricing import Hold
from .durable import fsync, private_folder
from .ledger import BATCH_ROW_ADDED, LEDGER_SCHEMA, LEDGER_TABLES, Entry, Ledger
from .lock import JobLock
from .vectors import SUFFIX as VECTORS
from .vectors import LONGEST, VectorFile, fault, inline

__all__ = ["Spend", "StateStore", "batches_out", "differences", "replace_state", "state_copy", "state_path", "upsert"]

SCHEMA_VERSION = "1"
PRIVATE = 0o600
_COMPANIONS = ("-wal", "-shm", "-journal", VECTORS)

# A row as stored: the Result's fields, then the CRC-32 of a vector kept in the vectors file
# (set with the vector only: other rows pay nothing for it, written or read)
_STORED = (*RESULT_FIELDS, "vector_crc")
_COLUMNS = ", ".join(RESULT_FIELDS)
# What adds up over runs: a row that failed before (an answer that broke the schema,
# say) and succeeds now paid for both, in tokens as in money. A null is no count, and
# so is a sum of tokens past int64 (SQLite would make it a float).
_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _added(name: str, whole: bool) -> str:
    both = f"results.{name} + excluded.{name}"
    if whole:
        both = f"CASE WHEN typeof({both}) = 'integer' THEN {both} END"
    return (f"{name} = CASE WHEN results.{name} IS NULL THEN excluded.{name} WHEN excluded.{name} IS NULL "
            f"THEN results.{name} ELSE {both} END")


def _upsert(columns: tuple[str, ...]) -> str:
    """Store a row of `columns` (a vector's CRC among them, or none: then the row has none)."""
    return (
        f"INSERT INTO results ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        "ON CONFLICT(row_index) DO UPDATE SET "
        + ", ".join(f"{f} = excluded.{f}" for f in columns if f not in ("row_index", "attempts", "cost_usd", *_TOKENS))
        + ("" if "vector_crc" in columns else ", vector_crc = NULL")
        + ", attempts = results.attempts + excluded.attempts, "
        + ", ".join([*(_added(f, True) for f in _TOKENS), _added("cost_usd", False)])
    )


_UPSERT, _UPSERT_VECTOR = _upsert(RESULT_FIELDS), _upsert(_STORED)
# A budget's holds: a request's worst case, recorded before it is sent and deleted with
# its answer. One left by a kill -9 was paid for all anyone knows: it counts as spent.
_HOLDS = "CREATE TABLE IF NOT EXISTS holds (id INTEGER PRIMARY KEY, usd REAL NOT NULL, tokens INTEGER NOT NULL)"
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE results ({})".format(
        ", ".join("row_index INTEGER PRIMARY KEY" if f == "row_index" else f for f in _STORED)),
    _HOLDS,
    *LEDGER_SCHEMA,
)


# Columns added since states were first written: a state without them gets them when
# a runner opens it (SQLite adds a column without rewriting the table).
_ADDED = ("extra", "embedding", "cost_usd", "transient", "vector_crc")


_EXTRA, _EMBEDDING = RESULT_FIELDS.index("extra"), RESULT_FIELDS.index("embedding")


_FIELDS_OF = operator.attrgetter(*RESULT_FIELDS)  # a Result's stored values, as a tuple


def _stored(result: Result) -> tuple[Any, ...]:
    """The row to store (RESULT_FIELDS), its vector in it, if any."""
    row = _FIELDS_OF(result)
    if result.extra is None:
        return row
    # allow_nan: a logprob may be -inf; batchrun reads it back, and Parquet holds it
    return (*row[:_EXTRA], json.dumps(result.extra, ensure_ascii=False), *row[_EXTRA + 1:])


def upsert(db: sqlite3.Connection, results: Iterable[Result]) -> None:
    """Store results (an iterator is stored as it goes) in the transaction open on `db`:
    `StateStore.save(also=)` runs this inside its own."""
    db.executemany(_UPSERT, (_stored(result) for result in results))


@dataclass(frozen=True)
class Spend:
    usd: float
    tokens: int
    unmetered: int  # rows with answers that came without usage, counted at their worst case
    next_hold: int  # the id of the next hold: unique in the state


OK, FAILED, FAILED_FOR_GOOD = 1, 2, 3  # a row's state, as `row_states` gives it


def done_rows(states: bytearray, *, retry_failed: bool = False) -> bytearray:
    """1 for every row a run leaves alone (see `StateStore.ok_rows`)."""
    table = bytearray(256)
    table[OK] = 1
    if not retry_failed:
        table[FAILED_FOR_GOOD] = 1
    return states.translate(table)


def state_path(output: Path) -> Path:
    return output.with_name(output.stem + ".batchrun.sqlite")


@contextlib.contextmanager
def state_copy(path: Path) -> Iterator[Path]:
    """A consistent copy of the state beside it, for as long as the `with` lasts (to upload
    it): SQLite's backup API through connections of its own takes a reader's snapshot, so
    the writer goes on meanwhile, and the copy holds every commit without a -wal."""
    copy = path.with_name(f".{path.name}.{os.getpid()}.upload")
    try:
        try:
            with contextlib.closing(sqlite3.connect(path)) as source, \
                    contextlib.closing(sqlite3.connect(copy)) as target:
                source.backup(target)
                inline(target, path)  # the vectors its rows refer to, into the copy: it goes alone
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{path}: cannot snapshot the job's state for upload: {exc}") from exc
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def batches_out(path: Path) -> list[Entry]:
    """The batches a state records as out at the provider, or on their way there (planned:
    one may have been created by a run that died before it could record it), read without
    the job's lock; none for a state that is absent or not whole."""
    try:
        store = StateStore.open(path, lock=False)
    except (FileNotFoundError, StateMismatchError, StorageError, ConfigError):
        return []
    try:
        return store.ledger.entries(outstanding=True)
    finally:
        store.close()


def replace_state(path: Path, new: Path) -> None:
    """Put the state file `new` (a download) in the place of the state at `path`, whose
    -wal goes first: an old log must never replay onto another state."""
    StateStore.discard(path)
    os.replace(new, path)


class StateStore:
    """Open with `StateStore.open(path)`; `close()` when done."""

    def __init__(self, path: Path, db: sqlite3.Connection, read_db: sqlite3.Connection,
                 lock: JobLock | None) -> None:
        self.path = path
        self._db = db
        self._read_db = read_db
        self._lock = lock
        self._inode = os.stat(path).st_ino
        self._wal_inode: int | None = None  # known after the first commit made the -wal
        self._vectors = VectorFile(path)  # the rows' embeddings (storage/vectors.py)
        self.ledger = Ledger(db, self._transaction)  # the rows sent to a provider's batch API

    @classmethod
    def open(cls, path: Path, *, lock: bool = True, discard_damaged: bool = False) -> StateStore:
        """Open or create the state; `lock` keeps other runners out.

        Without `lock` (for `batchrun status`) the state must exist already.
        Raises StateDamagedError for a state that is not whole, unless
        `discard_damaged` (`--restart`): then a new one takes its place.
        """
        if not lock and not path.exists():
            raise FileNotFoundError(path)
        job_lock = JobLock.acquire(path) if lock else None
        db: sqlite3.Connection | None = None
        try:
            if not path.exists():
                _create(path)
            try:
                db = _connect_whole(path)
            except StateDamagedError:
                if not discard_damaged:
                    raise
                cls.discard(path)
                _create(path)
                db = _connect_whole(path)
            for suffix in ("", *_COMPANIONS):
                _make_private(path.with_name(path.name + suffix))
            read_db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except BaseException as exc:
            if db is not None:  # the reading connection is the last step: never half open
                db.close()
            if job_lock is not None:
                job_lock.release()
            if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(f"{path}: cannot open the job's state: {exc.strerror}") from exc
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise _storage_error(exc, f"{path}: cannot open the job's state") from exc
            raise
        try:
            return cls(path, db, read_db, job_lock)
        except BaseException:  # its vectors file would not open: nothing is left held
            read_db.close()
            db.close()
            if job_lock is not None:
                job_lock.release()
            raise

    @staticmethod
    def discard(path: Path) -> None:
        """Remove a state and its companion files (`--restart` of a damaged state; hold the lock)."""
        for suffix in ("", *_COMPANIONS):
            path.with_name(path.name + suffix).unlink(missing_ok=True)

    def close(self, *, remove: bool = False) -> None:
        """Close; `remove` deletes the state too (while still holding the lock)."""
        self._read_db.close()
        self._db.close()
        self._vectors.close()
        if remove:
            self.discard(self.path)
        if self._lock is not None:
            self._lock.release(remove=remove)
            self._lock = None

    # -- what the state belongs to -------------------------------------------------------

    def reset(self) -> None:
        """Forget every result and what the state was for (`--restart`), in one transaction."""
        with self._transaction():
            self._db.execute("DELETE FROM results")
            self._db.execute("DELETE FROM meta")
            self._db.execute("DELETE FROM holds")
            for table in LEDGER_TABLES:
                self._db.execute(f"DELETE FROM {table}")
        self._vectors.clear()  # after the commit: a kill between the two leaves unused bytes, never a lost vector

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def claim(self, meta: dict[str, Any], *, spec_name: str) -> None:
        """Record what this state is for, or check that it is for this very job."""
        saved = self.meta()
        if not saved:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v, sort_keys=True)) for k, v in {"version": SCHEMA_VERSION, **meta}.items()],
                )
            return
        self.check(saved, {"version": SCHEMA_VERSION, **meta}, spec_name=spec_name)

    def check_made_by(self, digest: str, request: dict[str, Any], *, spec_name: str) -> None:
        """StateMismatchError unless the state's answers were made from the input of this
        digest and this request configuration (`plan` and `export`, before they read them)."""
        saved, wanted = self.meta(), {"input_digest": digest, "request": request}
        self.check({key: saved.get(key) for key in wanted}, wanted, spec_name=spec_name)

    def check(self, saved: dict[str, Any], wanted: dict[str, Any], *, spec_name: str) -> None:
        """StateMismatchError, naming what changed and the way out, unless `saved` (the
        state's meta, or the part of it that `wanted` names) is `wanted`."""
        changes = differences(saved, wanted)
        if changes:
            raise StateMismatchError(
                f"{self.path} holds the progress of a different job ({'; '.join(changes)}). "
                f"Rerun with --restart to discard it and start over, or restore the original "
                f"input and {spec_name}."
            )

    # -- results ---------------------------------------------------------------------------

    def save(self, results: Iterable[Result], holds: Iterable[Hold] = (), released: Iterable[int] = (),
             also: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Store results in one atomic, durable transaction, with the budget's new
        `holds`; a result's own hold, and the `released` ones, go in the same one, and so
        does `also` (a batch's collection: `Ledger.collecting`).

        Raises StorageError when that is impossible: a full disk, or the state's
        files removed or replaced under the running job (SQLite would go on
        writing to the unlinked files, and a crash would lose every answer since).
        """
        results = list(results)
        new = [(h.id, h.usd, h.tokens) for h in holds]
        gone = [(i,) for i in (*released, *(r.hold for r in results if r.hold is not None))]
        if not (results or new or gone or also):
            return
        self.check_files()
        try:
            rows, referring = self._rows_of(results)
            with self._transaction():
                if rows:
                    self._db.executemany(_UPSERT, rows)
                if referring:
                    self._db.executemany(_UPSERT_VECTOR, referring)
                if new:  # only with a budget
                    self._db.executemany("INSERT INTO holds VALUES (?, ?, ?)", new)
                if gone:
                    self._db.executemany("DELETE FROM holds WHERE id = ?", gone)
                if also is not None:
                    also(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise _storage_error(exc, f"cannot save answers to {self.path}",
                                 "what was saved before is intact. Fix the cause (free disk space, restore the "
                                 "folder) and rerun to resume") from exc
        if self._wal_inode is None:
            self._wal_inode = _inode(self.path.with_name(self.path.name + "-wal"))

    def _rows_of(self, results: list[Result]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows to store (RESULT_FIELDS), and those referring to vectors appended to the
        vectors file and synced before the commit that refers to them (`_STORED`: a
        reference in place of each vector, its CRC-32 last)."""
        placed = [i for i, r in enumerate(results) if r.embedding is not None and len(r.embedding) <= LONGEST]
        vectors: list[bytes] = [results[i].embedding for i in placed]  # type: ignore[misc]
        if not placed or not self._vectors.fits(sum(map(len, vectors))):
            return [_stored(r) for r in results], []
        referring = []
        for i, ref, vector in zip(placed, self._vectors.append(vectors), vectors):
            row = _stored(results[i])
            referring.append((*row[:_EMBEDDING], ref, *row[_EMBEDDING + 1:], zlib.crc32(vector)))
        rest = set(range(len(results))).difference(placed)
        return [_stored(results[i]) for i in sorted(rest)], referring

    def check_files(self) -> None:
        """StorageError unless the state, its -wal, the lock and the vectors file are the
        files this job opened (one removed is written back first, if it can be)."""
        if _inode(self.path) != self._inode:
            what, restored = self._restore()
            error = StorageError(f"{self.path}: the job's state file was removed or replaced while the job ran; "
                                 f"{what}")
            error.rerun_resumes = restored  # type: ignore[misc]
            raise error
        wal = self.path.with_name(self.path.name + "-wal")
        if self._wal_inode is not None and _inode(wal) != self._wal_inode:
            try:  # SQLite still holds the removed -wal open: copy what it holds into the state
                self._db.execute("PRAGMA wal_checkpoint(FULL)")
                kept = "every answer saved so far was copied from it into the state"
            except sqlite3.Error as exc:
                kept = f"the answers it held could not be copied into the state ({exc})"
            raise StorageError(f"{wal}: the state's write-ahead log was removed while the job ran; {kept}. "
                               "Stopping; rerun to resume")
        if self._lock is not None:
            self._lock.check()
        self._vectors.check()

    def _restore(self) -> tuple[str, bool]:
        """Write what this job still holds open back to the state's path, if it is free
        (its folder made again, if that went too); what happened, and whether it did."""
        if self.path.exists():
            return ("the file there now is not this job's progress: stopping. Put this job's state back, or "
                    "rerun with --restart to start over (every answer is then paid again)"), False
        try:
            self._vectors.restore()  # first: the state written back refers to them
            private_folder(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
            os.close(fd)
            self._db.execute("VACUUM INTO ?", (str(self.path),))
        except (OSError, sqlite3.Error) as exc:
            return (f"restoring it failed ({exc}), so the progress it held is lost: stopping. A rerun starts "
                    "over"), False
        return "batchrun wrote every answer saved so far back to it; stopping", True

    def row_states(self, size: int) -> bytearray:
        """A byte per row index (small even for millions): 0 not settled, then OK, FAILED
        (for a reason a later attempt may not meet, or saved before batchrun told them
        apart) or FAILED_FOR_GOOD (a 4xx, an answer invalid after its re-asks)."""
        states = bytearray(size)
        for index, status, transient in self._db.execute("SELECT row_index, status, transient FROM results"):
            if index < size:
                states[index] = OK if status == "ok" else FAILED_FOR_GOOD if transient == 0 else FAILED
        return states

    def ok_rows(self, size: int, *, retry_failed: bool = False) -> bytearray:
        """A byte per row index, 1 where the row is settled and stays so: ok, or failed for
        good (unless `retry_failed`). A row failed for a transient reason is redone."""
        return done_rows(self.row_states(size), retry_failed=retry_failed)

    def results(self, start: int, stop: int) -> list[tuple[Any, ...]]:
        """Committed result tuples (in RESULT_FIELDS order) for row_index in [start, stop).

        Safe to call from another thread while `save` runs: it reads through its
        own connection, which sees whole commits only (WAL readers never block the
        writer).
        """
        rows = self._read_db.execute(
            f"SELECT {_COLUMNS} FROM results WHERE row_index >= ? AND row_index < ? ORDER BY row_index",
            (start, stop),
        ).fetchall()
        read, crcs = self._vectors.read, None
        for i, row in enumerate(rows):
            if type(row[_EMBEDDING]) is int:
                if crcs is None:  # a job of vectors: theirs, once for the rows asked for
                    crcs = dict(self._read_db.execute(
                        "SELECT row_index, vector_crc FROM results WHERE row_index >= ? AND row_index < ? AND "
                        "typeof(embedding) = 'integer'", (start, stop)))
                rows[i] = (*row[:_EMBEDDING], read(row[_EMBEDDING], crcs.get(row[0])), *row[_EMBEDDING + 1:])
        return rows

    def counts(self, below: int | None = None) -> dict[str, int]:
        """ok, failed, and token sums over rows with row_index < below (all by default)."""
        limit = below if below is not None else 2**62
        # TOTAL, not SUM: a server's absurd usage must not overflow the count (SUM raises).
        ok, failed, for_good, prompt, completion, total, cost, hits, saved, batched = self._db.execute(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'failed'), 0), "
            "COALESCE(SUM(status = 'failed' AND transient = 0), 0), "
            "TOTAL(prompt_tokens), TOTAL(completion_tokens), TOTAL(total_tokens), SUM(cost_usd), "
            "COALESCE(SUM(json_extract(extra, '$.cached') = 1), 0), SUM(json_extract(extra, '$.saved_usd')), "
            "COALESCE(SUM(status = 'ok' AND json_extract(extra, '$.backend') = 'batch'), 0) "
            "FROM results WHERE row_index < ?",
            (limit,),
        ).fetchone()
        # Requests a kill left unsettled (with a budget), at their worst case: not in any row
        # (a batch's hold is not one: the batch is out, not lost)
        lost, lost_usd, lost_tokens = self._db.execute(
            "SELECT COUNT(*), TOTAL(usd), TOTAL(tokens) FROM holds "
            "WHERE id NOT IN (SELECT hold FROM batches WHERE hold IS NOT NULL)").fetchone()
        return {"ok": ok, "failed": failed, "failed_for_good": for_good, "prompt_tokens": int(prompt),
                "completion_tokens": int(completion), "total_tokens": int(total), "cost_usd": cost,
                "cache_hits": hits, "saved_usd": saved, "lost_requests": lost, "lost_usd": lost_usd,
                "lost_tokens": int(lost_tokens),
                "from_batches": batched}

    def spend(self) -> Spend:
        """What the job has spent over all its runs, as its budget counts it: the answers'
        cost and tokens (an answer without usage at its worst case), and the holds that
        a kill left unsettled, at theirs."""
        usd, tokens, unmetered_tokens, unmetered = self._db.execute(
            "SELECT TOTAL(cost_usd), TOTAL(total_tokens), TOTAL(json_extract(extra, '$.unmetered_tokens')), "
            "COALESCE(SUM(json_extract(extra, '$.unmetered') > 0), 0) FROM results").fetchone()
        lost_usd, lost_tokens, last = self._db.execute(
            "SELECT TOTAL(usd), TOTAL(tokens), COALESCE(MAX(id), 0) FROM holds").fetchone()
        return Spend(usd=usd + lost_usd, tokens=int(tokens + unmetered_tokens + lost_tokens), unmetered=unmetered,
                     next_hold=last + 1)

    def means(self) -> tuple[float | None, float | None]:
        """Mean completion tokens and mean latency of the rows answered ok so far."""
        completion, latency = self._db.execute(
            "SELECT AVG(completion_tokens), AVG(latency_s) FROM results WHERE status = 'ok'").fetchone()
        return completion, latency

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _create(path: Path) -> None:
    """A new, empty state, made under another name and renamed: whole or absent."""
    building = path.with_name(path.name + ".new")
    StateStore.discard(building)
    try:
        fd = os.open(building, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
        os.fchmod(fd, PRIVATE)  # whatever the umask
        os.close(fd)
        db = sqlite3.connect(building, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with _Transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
        finally:
            db.close()
        fsync(building)
        os.replace(building, path)
        fsync(path.parent)
    except BaseException:
        StateStore.discard(building)
        raise


def _connect_whole(path: Path) -> sqlite3.Connection:
    """The write connection to a state that `_inspect` found whole."""
    if path.stat().st_size == 0:
        raise _damaged(path, "it is empty (0 bytes): it was truncated, or something other than batchrun made it")
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        _inspect(db, path)
        _vectors_whole(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise
        raise _damaged(path, f"SQLite cannot read it ({exc})") from exc
    except BaseException:
        db.close()
        raise
    return db


def _inspect(db: sqlite3.Connection, path: Path) -> None:
    """Raise StateDamagedError unless `db` is a whole batchrun state."""
    tables = {name: [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
              for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # Columns are read by name, so their order in the table does not matter: a column
    # added to an older state (ALTER TABLE) comes last there.
    found = set(tables.get("results") or ())
    missing = set(_STORED) - found
    if tables.get("meta") == ["key", "value"] and missing and found and missing <= set(_ADDED) \
            and found <= set(_STORED):
        with _Transaction(db):
            for name in sorted(missing, key=_STORED.index):
                db.execute(f"ALTER TABLE results ADD COLUMN {name}")
        found = set(_STORED)
    if tables.get("meta") != ["key", "value"] or found != set(_STORED):
        raise _damaged(path, f"it is a SQLite database, but not a batchrun state (tables: "
                             f"{', '.join(sorted(tables)) or 'none'})")
    if "holds" not in tables:  # a state from before budgets' holds were recorded
        db.execute(_HOLDS)
    for statement in LEDGER_SCHEMA:  # a state from before the batch ledger
        db.execute(statement)
    batch_rows = {c[1] for c in db.execute("PRAGMA table_info(batch_rows)")}
    for column in BATCH_ROW_ADDED:  # one from before a batch's rows kept their worst case
        if column.split()[0] not in batch_rows:
            db.execute(f"ALTER TABLE batch_rows ADD COLUMN {column}")
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)") if row[0] != "ok"]
    if problems:
        raise _damaged(path, f"SQLite finds it damaged ({'; '.join(problems)})")
    raw = dict(db.execute("SELECT key, value FROM meta"))
    if not raw:
        if db.execute("SELECT 1 FROM results LIMIT 1").fetchone():
            raise _damaged(path, "it holds answers but no record of the job they belong to")
        return  # made, then stopped before the input was checked: nothing was sent
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except ValueError:
        raise _damaged(path, "its metadata was edited: a value is not JSON") from None
    wrong = [key for key, ok in (
        ("version", meta.get("version") == SCHEMA_VERSION),
        ("input_digest", isinstance(meta.get("input_digest"), str)),
        ("rows", type(meta.get("rows")) is int and meta["rows"] >= 0),
        ("passthrough", isinstance(meta.get("passthrough"), list)
         and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                 for p in meta["passthrough"])),
        ("request", isinstance(meta.get("request"), dict)),
    ) if not ok]
    if wrong:
        raise _damaged(path, f"its metadata was edited or damaged ({', '.join(wrong)})")


def _vectors_whole(db: sqlite3.Connection, path: Path) -> None:
    """Raise StateDamagedError unless the state's vectors file holds the vectors its rows
    refer to (and reaches their end, where the next go: none is written over)."""
    if what := fault(db, path):
        raise _damaged(path, what)


def _damaged(path: Path, what: str) -> StateDamagedError:
    return StateDamagedError(
        f"{path} is not a usable batchrun state: {what}. batchrun will not guess what was done; "
        "rerun with --restart to discard it and start over (or put back a copy of the state)"
    )


def _storage_error(exc: BaseException, what: str, then: str = "") -> StorageError:
    reason = "the disk is full" if _disk_full(exc) else (getattr(exc, "strerror", None) or str(exc))
    return StorageError(f"{what}: {reason}; {then or 'free space or fix the folder, then rerun'}")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and "full" in str(exc)


def _make_private(path: Path) -> None:
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, PRIVATE)
    except FileNotFoundError:
        pass


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None



def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences: 'params.max_tokens was 64, now 128'."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            if path == "input_digest":
                out.append("the input file's content changed")
            else:
                out.append(f"{path} was {json.dumps(a)}, now {json.dumps(b)}")

    walk(saved, json.loads(json.dumps(wanted)), "")
    return out

