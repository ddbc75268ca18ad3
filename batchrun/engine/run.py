"""The runner: spec -> validated input -> worker pool -> checkpoint -> Parquet output.

    input rows ──▶ workers (≤ concurrency in flight) ──answers──▶ writer ──▶ SQLite state
                                                                   ├─▶ progress
                                      state + input passthrough ──▶ output row groups
    at the end: the output's last rows, then fsync and rename (atomic)

Every request-free check comes first (spec, key, input, state: `preflight`, `opening`),
so a mistake costs no request. This module wires the parts of one run (`pool`, `writer`,
`watch`, `bridge`) and turns what they did into a `Summary`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .._exceptions import BatchrunError, ConfigError, JobAborted, StorageError
from ..http.client import Client
from ..policy.concurrency import ConcurrencyLimit
from ..spec.parse import JobSpec
from ..storage import open_store
from ..storage.columns import extra_columns
from ..storage.output import OutputWriter
from ..storage.state import StateStore, batches_out, done_rows, state_path
from .bridge import run_beside
from .cache import ResponseCache
from .call import Caller, HoldLog
from .holds import job_budget
from .limits import Limits
from .opening import open_reader, open_state, set_aside
from .part import Part
from .pool import GRACE_S, Pool
from .preflight import check_free_space, check_output, check_sending, read_api_key
from .progress import NullProgress, Progress
from .status import StatusFile, status_path
from .summary import Summary
from .writer import Writer

if TYPE_CHECKING:
    import httpx

__all__ = ["GRACE_S", "RunOptions", "Summary", "read_api_key", "run_part"]


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, whatever part of the job it runs.

    `limit`: only the first rows; `restart`: discard the saved progress first;
    `retry_failed`: redo rows failed for good (a 4xx, an invalid answer) too, not only
    those failed for transient reasons; `max_failed_share` (else the spec's): that share
    of failed rows still exits 0; `progress`: shown as it goes (none by default);
    `transport`: the HTTP transport (tests); `environ`: where the key is read (else
    os.environ); `handle_signals`: SIGINT and SIGTERM stop the run gracefully (the CLI),
    else it runs beside the caller's thread (`bridge`); `grace_s`: how long requests in
    flight may finish once the run is asked to stop.
    """

    limit: int | None = None
    restart: bool = False
    retry_failed: bool = False
    max_failed_share: float | None = None
    progress: Progress | None = None
    transport: httpx.AsyncBaseTransport | None = None
    environ: Mapping[str, str] | None = None
    handle_signals: bool = False
    grace_s: float = GRACE_S


def run_part(spec: JobSpec, part: Part, options: RunOptions = RunOptions(), limits: Limits = Limits()) -> Summary:
    """Run (or resume) one part of a job to completion and write its output.

    Returns the Summary when every row of the part is settled (check `summary.failed`);
    raises UsageError (exit 2) before any request for a bad spec, input, key or state, and
    JobAborted (exit 3, with `.summary`) when the run stopped early: its progress is saved
    and the same call resumes it. `limits`: the rate limiter and control of requests in
    flight to use instead of the run's own (a backend's, shared with other processes).
    """
    started = time.monotonic()
    env = os.environ if options.environ is None else options.environ
    api_key = read_api_key(spec, env)
    transport, base_url = check_sending(spec, env, api_key, options.transport)
    run = _Run(spec, part, options.progress or NullProgress())
    run.open(limit=options.limit, restart=options.restart)
    try:
        run.wire(retry_failed=options.retry_failed, grace_s=options.grace_s,
                 client=lambda cache, hold_log, rows: _caller(
                     spec, run.store, api_key=api_key, transport=transport, base_url=base_url, environ=env,
                     limits=limits, cache=cache, hold_log=hold_log, rows=rows))
        run.drive(options.handle_signals)
        run.finish()
    finally:
        run.close()
    run.push()
    max_failed_share = spec.max_failed_share if options.max_failed_share is None else options.max_failed_share
    summary = run.summary(started, max_failed_share=max_failed_share)
    if run.pool.aborted is not None:
        run.pool.aborted.summary = summary  # type: ignore[attr-defined]
        raise run.pool.aborted
    return summary


def _caller(spec: JobSpec, store: StateStore, *, api_key: str | None, transport: httpx.AsyncBaseTransport | None,
            base_url: str | None, environ: Mapping[str, str], limits: Limits, cache: ResponseCache | None,
            hold_log: HoldLog, rows: int | None = None) -> Caller:
    """The run's calls: its client with the limits it was given, the cache, and the budget
    earlier runs left, its holds recorded by `hold_log`; `rows`: those it has to do."""
    control = limits.concurrency_control
    in_flight = ConcurrencyLimit(spec.concurrency, control=control) if control is not None else None
    client = Client(spec, api_key=api_key, transport=transport, base_url=base_url, environ=environ,
                    limiter=limits.rate_limiter, in_flight=in_flight, rows=rows)
    budget = job_budget(spec, store.spend()) if spec.budget.is_set else None
    return Caller(spec, client, cache=cache, budget=budget, hold_log=hold_log)


class _Run:
    """One run's parts, from the opened state to the Summary: `open`, `wire`, `drive`,
    `finish`, `close`, `push`, `summary`, in that order."""

    def __init__(self, spec: JobSpec, part: Part, progress: Progress) -> None:
        self.spec, self.part, self.progress = spec, part, progress
        self.output_path = part.output
        self.cache: ResponseCache | None = None
        self.written = False

    def open(self, *, limit: int | None, restart: bool) -> None:
        """Check the output's folder, open the state; before any request."""
        spec, part, output_path = self.spec, self.part, self.output_path
        check_output(output_path)
        check_free_space(output_path.parent)
        # Work on local files, from the newest state there is (an object store's, say)
        self.storage = storage = open_store(spec)
        storage.pull_state(state_path(output_path))
        if restart and (out := batches_out(state_path(output_path))):
            raise ConfigError(
                f"{len(out):,} batch{'es' if len(out) > 1 else ''} of {spec.name} {'are' if len(out) > 1 else 'is'} "
                "out at the provider: --restart would leave them answering "
                "(and billing) rows nobody collects. Run it with batch_api (--batch-api): its --restart cancels them")
        self.reader = reader = open_reader(spec, storage)
        self.status = status = StatusFile(status_path(output_path), job=spec.name, output=output_path, rows=0)
        if part.label is not None:
            status.fixed["shard"] = part.label
        try:
            self.store, total, self.passthrough, self.asks = open_state(spec, reader, part, status, limit=limit,
                                                                        restart=restart)
            if out := self.store.ledger.rows_out():
                raise ConfigError(
                    f"{out:,} rows of {spec.name} are in the provider's batches (`batchrun status` lists them): "
                    "sending them live too would pay for them twice. Keep batch_api in the spec and run it "
                    "to collect them (or submit, to leave them there)")
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            reader.close()
            raise
        # The output of the progress just discarded must not pass for this run's (status, export)
        self.set_aside = set_aside(list(part.outputs), storage) if restart else None
        # A part runs rows [start, total): those before it count as done, and are not its to write
        self.start, self.total = part.bounds(total)

    def wire(self, *, retry_failed: bool, grace_s: float,
             client: Callable[[ResponseCache | None, HoldLog, int], Caller]) -> None:
        """The writer, the client and the pool, from the state's rows and counts."""
        spec, store, start, total = self.spec, self.store, self.start, self.total
        states = store.row_states(total)
        done = done_rows(states, retry_failed=retry_failed)
        done[:start] = b"\x01" * start
        spent = (store.counts()["cost_usd"] or 0.0) if spec.pricing else 0.0  # the progress shows the job's total
        self.progress.start(total - start, done.count(1) - start, spent)
        self.status.fixed["rows"] = total - start
        self.cache = ResponseCache(spec.cache) if spec.cache is not None else None
        self.output = OutputWriter(self.output_path, store, self.reader, rows=total, passthrough=self.passthrough,
                                   extras=extra_columns(spec, self.asks), start=start)
        writer = Writer(store, self.output, self.progress, self.cache, done=done, total=total, start=start,
                        states=states, totals=store.counts(below=total))
        self.client = made = client(self.cache, writer, done.count(0))  # (and the rows it has to do)
        self.pool = Pool(spec, made, writer, self.reader, done=done, total=total, status=self.status,
                         storage=self.storage, grace_s=grace_s)

    def drive(self, handle_signals: bool) -> None:
        """Run the pool; an exception raised into the caller's thread leaves every answer saved."""
        pool, status = self.pool, self.status
        # anyio leaves the default handlers behind; the caller's must be back for the
        # output writing that follows.
        saved_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            if handle_signals:
                anyio.run(pool.run, True)
            else:
                run_beside(pool)
        except BaseException as exc:  # raised into the caller's thread: every answer is saved
            status.write(pool.writer.counts(), requests=self.client.requests_sent, state="stopped",
                         reason=str(exc) if isinstance(exc, BatchrunError) and str(exc) else
                         f"stopped by {type(exc).__name__} in the calling thread", exit_code=3)
            with contextlib.suppress(StorageError, OSError):  # a stop like any other: the store gets the state
                self.storage.push_state(self.store.path)
                self.storage.push_file(status.path)
            raise
        finally:
            self.progress.close()
            if handle_signals:
                for signum, handler in saved_handlers.items():
                    signal.signal(signum, handler)

    def finish(self) -> None:
        """The output's last rows, fsync and rename, when every row of the run is settled."""
        pool, store = self.pool, self.store
        self.counts = counts = store.counts(below=self.total)
        self.spend = store.spend()
        self.written = pool.aborted is None and counts["ok"] + counts["failed"] == self.total - self.start
        if self.written:
            try:
                self.reader.check_unchanged()  # the passthrough just copied is the fingerprinted one
                self.output.finish()
            except JobAborted as exc:  # StorageError, InputChangedError: every answer is saved
                pool.aborted, self.written = exc, False
        if not self.written:
            self.output.discard()
        try:  # a file removed since the last commit (a run that saved nothing, the output's writing): put back
            store.check_files()
        except StorageError as exc:  # (the output, if written, is right: it read the files this run opened)
            pool.aborted = pool.aborted or exc

    def close(self) -> None:
        self.store.close()
        self.reader.close()
        if self.cache is not None:
            self.cache.close()

    def push(self) -> None:
        """Every stop: the output first, then the state that says it is done."""
        try:
            if self.written:
                self.storage.push_file(self.output_path)
            self.storage.push_state(self.store.path)
        except StorageError as exc:  # every answer is saved here; a rerun on this machine uploads them
            self.written = False
            if self.pool.aborted is None:
                self.pool.aborted = exc

    def summary(self, started: float, *, max_failed_share: float | None) -> Summary:
        """The Summary, also written to the status file (and pushed with it)."""
        pool, storage, client = self.pool, self.storage, self.client
        summary = Summary(
            job=self.spec.name, output=storage.where(self.output_path),
            state=self.store.path, rows=self.total - self.start, requests=client.requests_sent,
            elapsed_s=time.monotonic() - started, output_written=self.written,
            aborted=str(pool.aborted) if pool.aborted else None, max_failed_share=max_failed_share,
            shard=self.part.label, set_aside=self.set_aside,
            uncacheable=client.uncacheable, short_choices=client.short_choices, unmetered=self.spend.unmetered,
            **self.counts)
        self.status.write(self.counts, requests=client.requests_sent, state="finished" if self.written else "stopped",
                          reason=summary.aborted, exit_code=summary.exit_code)
        with contextlib.suppress(StorageError):  # the state on the store holds the truth
            storage.push_file(self.status.path)
        return summary
