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

import anyio
import httpx

from .._exceptions import BatchrunError, ConfigError, JobAborted, StorageError
from ..backends.shards import MergeSummary, Shard, shard_output, try_merge
from ..http.client import Client
from ..inputs.reader import InputReader
from ..inputs.template import Template
from ..policy.concurrency import ConcurrencyLimit, Control
from ..policy.pricing import Budget
from ..policy.rate import RateLimiter
from ..spec.parse import JobSpec, load_spec
from ..storage.columns import extra_columns
from ..storage.lock import lock_holder
from ..storage.objects import Remote, job_inputs
from ..storage.output import OutputWriter
from ..storage.state import StateStore, done_rows, state_path
from ..tools.status import StatusFile, status_path
from .bridge import run_beside
from .cache import ResponseCache
from .opening import open_state, set_aside
from .pool import GRACE_S, Pool
from .preflight import check_free_space, check_output, check_sending, read_api_key
from .progress import NullProgress, Progress
from .summary import Summary
from .writer import Writer

__all__ = ["GRACE_S", "Summary", "read_api_key", "run_job"]


def run_job(
    job: str | os.PathLike[str] | JobSpec,
    *,
    limit: int | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    max_failed_share: float | None = None,
    progress: Progress | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
    shard: Shard | None = None,
    merge: str | None = "file",
    rate_limiter: RateLimiter | None = None,
    concurrency_control: Control | None = None,
    grace_s: float = GRACE_S,
) -> Summary:
    """Run (or resume) a job to completion and write its output.

    Returns the Summary when every row is settled (check `summary.failed`); raises
    UsageError (exit 2) before any request for a bad spec, input, key or state, and
    JobAborted (exit 3, with `.summary`) when the job stopped early: its progress
    is saved and the same call resumes it.

    A resumed job redoes rows that failed for transient reasons (retries spent on 5xx,
    timeouts); rows failed for good (a 4xx, an invalid answer) only with `retry_failed`.
    `max_failed_share` (else the spec's) lets that share of failed rows exit 0.

    With `shard`, only that shard's rows are run, into its own state and output part
    (see `backends.shards`). The shard that finishes last makes the job's output from
    the parts: one file (`merge="file"`), a dataset folder (`"dataset"`), or none (None:
    `merge_job` later).

    `rate_limiter` replaces the run's own rate policy: one that shares a job-wide quota
    with other processes (see `backends.ray`) has the same methods as `RateLimiter`.
    `concurrency_control` likewise replaces the run's own control of requests in flight.
    `grace_s`: how long requests in flight may finish once the job is asked to stop
    (a scheduler that kills a task some seconds after SIGTERM wants less than that).
    """
    started = time.monotonic()
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    env = os.environ if environ is None else environ
    api_key = read_api_key(spec, env)
    transport, base_url = check_sending(spec, env, api_key, transport)
    if shard is not None and limit is not None:
        raise ConfigError("--limit and --shard do not go together: a shard's rows are a share of all the rows")
    run = _Run(spec, shard, progress or NullProgress())
    run.open(limit=limit, restart=restart)
    try:
        run.wire(retry_failed=retry_failed, grace_s=grace_s, client=lambda cache: _client(
            spec, run.store, api_key=api_key, transport=transport, base_url=base_url, environ=env,
            rate_limiter=rate_limiter, concurrency_control=concurrency_control, cache=cache))
        run.drive(handle_signals)
        run.finish()
    finally:
        run.close()
    run.push()
    merged = None
    if shard is not None and run.written and merge is not None:  # the last shard to finish merges
        outcome = try_merge(spec, dataset=merge == "dataset")
        merged = outcome.line() if isinstance(outcome, MergeSummary) else f"not merged: {outcome}"
    summary = run.summary(started, merged=merged,
                          max_failed_share=spec.max_failed_share if max_failed_share is None else max_failed_share)
    if run.pool.aborted is not None:
        run.pool.aborted.summary = summary  # type: ignore[attr-defined]
        raise run.pool.aborted
    return summary


def _client(spec: JobSpec, store: StateStore, *, api_key: str | None, transport: httpx.AsyncBaseTransport | None,
            base_url: str | None, environ: Mapping[str, str], rate_limiter: RateLimiter | None,
            concurrency_control: Control | None, cache: ResponseCache | None) -> Client:
    """The run's client, with the limits it was given and the budget earlier runs left."""
    client = Client(spec, api_key=api_key, transport=transport, base_url=base_url, environ=environ)
    if rate_limiter is not None:
        client.limiter = rate_limiter
    if concurrency_control is not None:
        client.in_flight = ConcurrencyLimit(spec.concurrency, control=concurrency_control)
    if cache is not None:
        client.cache = cache
    if spec.budget.is_set:  # what earlier runs spent counts against it, holds a kill left unsettled too
        spend = store.spend()
        client.budget = Budget(spec.budget.max_usd, spec.budget.max_tokens, spent_usd=spend.usd,
                               spent_tokens=spend.tokens, next_hold=spend.next_hold)
    return client


class _Run:
    """One run's parts, from the opened state to the Summary: `open`, `wire`, `drive`,
    `finish`, `close`, `push`, `summary`, in that order."""

    def __init__(self, spec: JobSpec, shard: Shard | None, progress: Progress) -> None:
        self.spec, self.shard, self.progress = spec, shard, progress
        self.output_path = spec.output if shard is None else shard_output(spec.output, shard)
        self.cache: ResponseCache | None = None
        self.written = False

    def open(self, *, limit: int | None, restart: bool) -> None:
        """Check the output's folder, open the state; before any request."""
        spec, shard, output_path = self.spec, self.shard, self.output_path
        check_output(output_path)
        check_free_space(output_path.parent)
        # With the output on object storage: work in its local mirror, from the newest state
        self.remote = remote = Remote(spec.output_url, spec.output) if spec.output_url else None
        if remote is not None:
            if holder := lock_holder(state_path(output_path)):
                raise ConfigError(f"this job is already running (pid {holder}, in {output_path.parent})")
            remote.pull_state(state_path(output_path))
        # One reader for the whole run: every pass sees the version of the input that
        # was fingerprinted, even if the file is replaced meanwhile.
        template = Template(spec.template) if spec.template is not None else None
        self.reader = reader = InputReader(
            job_inputs(spec), endpoint=spec.endpoint, require_model=spec.model is None, template=template,
            reserved=[column.name for column in extra_columns(spec)],
            priced=spec.pricing if spec.budget.max_usd is not None else None)
        self.status = status = StatusFile(status_path(output_path), job=spec.name, output=output_path, rows=0)
        if shard is not None:
            status.fixed["shard"] = str(shard)
        try:
            self.store, total, self.passthrough, self.asks = open_state(spec, reader, limit=limit, restart=restart,
                                                                        shard=shard)
        except BaseException as exc:
            reader.close()
            if getattr(exc, "held_lock", False):
                # This run held the lock of a job that had begun: the status is its to write
                # (never a running job's, nor one for a job that never began)
                status.stopped(str(exc), exc.exit_code)  # type: ignore[attr-defined]
            raise
        # The output of the progress just discarded must not pass for this run's (status, export)
        outputs = [output_path, *([spec.output] if shard is not None else [])]
        self.set_aside = set_aside(outputs, remote) if restart else None
        # A shard runs rows [start, total): those before it count as done, and are not its to write
        self.start, self.total = (0, total) if shard is None else shard.bounds(total)

    def wire(self, *, retry_failed: bool, grace_s: float, client: Callable[[ResponseCache | None], Client]) -> None:
        """The writer, the client and the pool, from the state's rows and counts."""
        spec, store, start, total = self.spec, self.store, self.start, self.total
        states = store.row_states(total)
        done = done_rows(states, retry_failed=retry_failed)
        done[:start] = b"\x01" * start
        spent = (store.counts()["cost_usd"] or 0.0) if spec.pricing else 0.0  # the progress shows the job's total
        self.progress.start(total - start, done.count(1) - start, spent)
        self.status.fixed["rows"] = total - start
        self.cache = ResponseCache(spec.cache) if spec.cache is not None else None
        self.client = made = client(self.cache)
        self.output = OutputWriter(self.output_path, store, self.reader, rows=total, passthrough=self.passthrough,
                                   extras=extra_columns(spec, self.asks), start=start)
        writer = Writer(store, self.output, self.progress, self.cache, done=done, total=total, start=start,
                        states=states, totals=store.counts(below=total))
        if made.budget is not None:
            made.hold_log = writer
        self.pool = Pool(spec, made, writer, self.reader, done=done, total=total, status=self.status,
                         remote=self.remote, grace_s=grace_s)

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
            if self.remote is not None:  # a stop like any other: the store gets the state
                with contextlib.suppress(StorageError, OSError):
                    self.remote.push_state(self.store.path)
                    self.remote.push_file(status.path)
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

    def close(self) -> None:
        self.store.close()
        self.reader.close()
        if self.cache is not None:
            self.cache.close()

    def push(self) -> None:
        """Every stop: the output first, then the state that says it is done."""
        if self.remote is None:
            return
        try:
            if self.written:
                self.remote.push_file(self.output_path)
            self.remote.push_state(self.store.path)
        except StorageError as exc:  # every answer is saved here; a rerun on this machine uploads them
            self.written = False
            if self.pool.aborted is None:
                self.pool.aborted = exc

    def summary(self, started: float, *, merged: str | None, max_failed_share: float | None) -> Summary:
        """The Summary, also written to the status file (and pushed with it)."""
        pool, remote, shard, client = self.pool, self.remote, self.shard, self.client
        summary = Summary(
            job=self.spec.name, output=remote.url_of(self.output_path) if remote else self.output_path,
            state=self.store.path, rows=self.total - self.start, requests=client.requests_sent,
            elapsed_s=time.monotonic() - started, output_written=self.written,
            aborted=str(pool.aborted) if pool.aborted else None, max_failed_share=max_failed_share,
            shard=str(shard) if shard is not None else None, merged=merged, set_aside=self.set_aside,
            uncacheable=client.uncacheable, unmetered=self.spend.unmetered, **self.counts)
        self.status.write(self.counts, requests=client.requests_sent, state="finished" if self.written else "stopped",
                          reason=summary.aborted, exit_code=summary.exit_code)
        if remote is not None:
            with contextlib.suppress(StorageError):  # the state on the store holds the truth
                remote.push_file(self.status.path)
        return summary
