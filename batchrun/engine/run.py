"""The runner: spec -> validated input -> worker pool -> checkpoint -> Parquet output.

    input rows ──▶ workers (≤ concurrency in flight) ──answers──▶ writer ──▶ SQLite state
                                                                   ├─▶ progress
                                      state + input passthrough ──▶ output row groups
    at the end: the output's last rows, then fsync and rename (atomic)

Every request-free check comes first (spec, key, input, state), so a mistake costs
no request. The first request goes alone: until one row has been answered, a
wrong key or a dead endpoint costs one request, not `concurrency` of them.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import httpx
from anyio.abc import ObjectReceiveStream, ObjectSendStream

if sys.version_info < (3, 11):  # anyio brings the backport there
    from exceptiongroup import BaseExceptionGroup

from .._exceptions import (
    BatchrunError,
    ConfigError,
    InputChangedError,
    InputError,
    Interrupted,
    JobAborted,
    JobFatalAPIError,
    Stalled,
    StorageError,
)
from ..backends.shards import MergeSummary, Shard, check_siblings, shard_output, try_merge
from ..endpoints import get_endpoint
from ..endpoints.protocol import Result
from ..http.client import Client, Deferred
from ..http.mock import MOCK_BASE_URL, MOCK_SCHEME, mock_transport
from ..http.network import check_key_route, proxy_for
from ..inputs.reader import InputReader, Row
from ..inputs.template import Template
from ..policy.concurrency import ConcurrencyLimit, Control
from ..policy.pricing import Budget, Hold, usd
from ..policy.rate import RateLimiter
from ..policy.retry import FailureStreak
from ..spec.parse import JobSpec, load_spec
from ..storage.columns import extra_columns
from ..storage.lock import lock_holder
from ..storage.objects import Remote, job_inputs
from ..storage.output import ROW_GROUP_ROWS, OutputWriter, load_arrow
from ..storage.state import FAILED, FAILED_FOR_GOOD, OK, StateStore, done_rows, state_path
from ..tools.status import EVERY_S, StatusFile, status_path
from .cache import ResponseCache
from .progress import NullProgress, Progress

__all__ = ["Summary", "read_api_key", "run_job"]

GRACE_S = 10.0  # after SIGTERM/SIGINT, how long requests in flight may finish
MAX_PARKS = 10  # times a row is set aside for a retry-after; then its worker waits with it
_FRESH = (0, 0, (0, 0))  # a row never set aside: no requests, no parks, no failures
PARKED_POLL_S = 0.5  # a worker waiting for rows set aside looks at `stopping` this often
MIN_FREE_BYTES = 16 * 2**20  # in the output's folder, before any request


@dataclass(frozen=True)
class Summary:
    """What a run did; `exit_code` is the CLI's."""

    job: str
    output: Path | str  # a URL where the output is on object storage
    state: Path
    rows: int
    ok: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int
    elapsed_s: float
    output_written: bool
    aborted: str | None = None
    cost_usd: float | None = None  # with pricing: every answer paid for, over all runs
    failed_for_good: int = 0  # of `failed`: retried only with --retry-failed
    max_failed_share: float | None = None  # failed rows up to this share of rows still exit 0
    cache_hits: int = 0  # rows answered from the response cache, over all runs
    saved_usd: float | None = None  # what those answers would have cost
    shard: str | None = None  # `I/N` for a shard's run
    merged: str | None = None  # a shard's run: the merge it made, or why it made none
    set_aside: str | None = None  # where --restart moved the previous output
    uncacheable: int = 0  # with a cache: requests of this run it could not answer (not deterministic)
    unmetered: int = 0  # rows with answers that came without usage: charged at their worst case
    lost_requests: int = 0  # a kill -9 left them unsettled: counted against the budget at their worst case
    lost_usd: float = 0.0

    @property
    def remaining(self) -> int:
        return self.rows - self.ok - self.failed

    @property
    def tolerated(self) -> bool:
        """The failed rows are within max_failed_share."""
        return self.max_failed_share is not None and self.failed <= self.max_failed_share * self.rows

    @property
    def exit_code(self) -> int:
        if self.aborted or self.remaining:
            return 3
        return 1 if self.failed and not self.tolerated else 0

    def line(self) -> str:
        head = f"{self.rows:,} rows: {self.ok:,} ok, {self.failed:,} failed"
        if self.failed:
            again = self.failed - self.failed_for_good
            parts = ([f"{again:,} retried by a rerun"] if again else []) + (
                [f"{self.failed_for_good:,} only with --retry-failed"] if self.failed_for_good else [])
            head += f" ({', '.join(parts)}{'; within max_failed_share' if self.tolerated else ''})"
        if self.remaining:
            head += f", {self.remaining:,} remaining"
        tokens = f"{self.total_tokens:,} tokens ({self.prompt_tokens:,} prompt, {self.completion_tokens:,} completion)"
        if self.cost_usd is not None:
            tokens += f", {usd(self.cost_usd)}"
        if self.unmetered:
            tokens += (f"; {self.unmetered:,} row{'s' if self.unmetered > 1 else ''} answered without usage, "
                       "charged at the worst case")
        if self.lost_requests:
            lost = self.lost_requests
            tokens += (f"; {lost:,} request{'s' if lost > 1 else ''} in flight at a kill, counted at the worst case "
                       f"({usd(self.lost_usd)})")
        if self.cache_hits:
            tokens += f"; {self.cache_hits:,} from the cache"
            if self.saved_usd is not None:
                tokens += f" ({usd(self.saved_usd)} saved)"
        if self.uncacheable:
            tokens += (f"; {self.uncacheable:,} request{'s' if self.uncacheable > 1 else ''} not looked up in the "
                       "cache: not deterministic (no temperature: 0 or seed; cache: {everything: true} caches all)")
        tail = f"output: {self.output}" if self.output_written else f"progress saved in {self.state}"
        sent = f"{self.requests:,} request{'' if self.requests == 1 else 's'}"
        shard = f"shard {self.shard}: " if self.shard else ""
        merged = f"; {self.merged}" if self.merged else ""
        aside = f"; the output before --restart was moved to {self.set_aside}" if self.set_aside else ""
        return f"{shard}{head}; {tokens}; {sent} in {self.elapsed_s:.1f} s; {tail}{merged}{aside}"


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
    (see `_shards`). The shard that finishes last makes the job's output from the
    parts: one file (`merge="file"`), a dataset folder (`"dataset"`), or none (None:
    `merge_job` later).

    `rate_limiter` replaces the run's own rate policy: one that shares a job-wide quota
    with other processes (see `_ray`) has the same methods as `RateLimiter`.
    `concurrency_control` likewise replaces the run's own control of requests in flight.
    `grace_s`: how long requests in flight may finish once the job is asked to stop
    (a scheduler that kills a task some seconds after SIGTERM wants less than that).
    """
    started = time.monotonic()
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    env = os.environ if environ is None else environ
    progress = progress or NullProgress()
    api_key = read_api_key(spec, env)
    check_key_route(spec.api.base_url, has_key=api_key is not None, allowed=spec.api.allow_insecure_http,
                    spec_name=spec.name)
    proxy_for(spec.api.base_url, env)  # a proxy batchrun cannot use is said now, before any state
    base_url = None
    if spec.api.base_url.startswith(MOCK_SCHEME):
        transport, base_url = transport or mock_transport(), MOCK_BASE_URL
    if shard is not None and limit is not None:
        raise ConfigError("--limit and --shard do not go together: a shard's rows are a share of all the rows")
    output_path = spec.output if shard is None else shard_output(spec.output, shard)
    _check_output(output_path)
    _check_free_space(output_path.parent)
    # With the output on object storage: work in its local mirror, from the newest state
    remote = Remote(spec.output_url, spec.output) if spec.output_url else None
    if remote is not None:
        if holder := lock_holder(state_path(output_path)):
            raise ConfigError(f"this job is already running (pid {holder}, in {output_path.parent})")
        remote.pull_state(state_path(output_path))

    # One reader for the whole run: every pass sees the version of the input that
    # was fingerprinted, even if the file is replaced meanwhile.
    template = Template(spec.template) if spec.template is not None else None
    reader = InputReader(job_inputs(spec), endpoint=spec.endpoint, require_model=spec.model is None,
                         template=template, reserved=[column.name for column in extra_columns(spec)],
                         priced=spec.pricing if spec.budget.max_usd is not None else None)
    status = StatusFile(status_path(output_path), job=spec.name, output=output_path, rows=0)
    if shard is not None:
        status.fixed["shard"] = str(shard)
    cache: ResponseCache | None = None
    try:
        store, total, passthrough, asks = _open_state(spec, reader, limit=limit, restart=restart, shard=shard)
    except BaseException as exc:
        reader.close()
        if getattr(exc, "held_lock", False):
            # This run held the lock of a job that had begun: the status is its to write
            # (never a running job's, nor one for a job that never began)
            status.stopped(str(exc), exc.exit_code)  # type: ignore[attr-defined]
        raise
    # The output of the progress just discarded must not pass for this run's (status, export)
    set_aside = _set_aside([output_path, *([spec.output] if shard is not None else [])], remote) if restart else None
    # A shard runs rows [start, total): those before it count as done, and are not its to write
    start, total = (0, total) if shard is None else shard.bounds(total)
    try:
        states = store.row_states(total)
        done = done_rows(states, retry_failed=retry_failed)
        done[:start] = b"\x01" * start
        spent = (store.counts()["cost_usd"] or 0.0) if spec.pricing else 0.0  # the progress shows the job's total
        progress.start(total - start, done.count(1) - start, spent)
        status.fixed["rows"] = total - start
        client = Client(spec, api_key=api_key, transport=transport, base_url=base_url, environ=env)
        if rate_limiter is not None:
            client.limiter = rate_limiter
        if concurrency_control is not None:
            client.in_flight = ConcurrencyLimit(spec.concurrency, control=concurrency_control)
        if spec.cache is not None:
            client.cache = cache = ResponseCache(spec.cache)
        if spec.budget.is_set:  # what earlier runs spent counts against it, holds a kill left unsettled too
            spend = store.spend()
            client.budget = Budget(spec.budget.max_usd, spec.budget.max_tokens, spent_usd=spend.usd,
                                   spent_tokens=spend.tokens, next_hold=spend.next_hold)
        output = OutputWriter(output_path, store, reader, rows=total, passthrough=passthrough,
                              extras=extra_columns(spec, asks), start=start)
        pool = _Pool(spec, client, store, output, reader, progress, done, total, start)
        pool.grace_s = grace_s
        if client.budget is not None:
            client.hold_log = pool
        pool.remote = remote
        pool.status, pool.states, pool.totals = status, states, store.counts(below=total)
        # anyio leaves the default handlers behind; the caller's must be back for the
        # output writing that follows.
        saved_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            if handle_signals:
                anyio.run(pool.run, True)
            else:
                _run_beside(pool)
        except BaseException as exc:  # raised into the caller's thread: every answer is saved
            status.write(pool.counts(), requests=client.requests_sent, state="stopped",
                         reason=str(exc) if isinstance(exc, BatchrunError) and str(exc) else
                         f"stopped by {type(exc).__name__} in the calling thread", exit_code=3)
            if remote is not None:  # a stop like any other: the store gets the state
                with contextlib.suppress(StorageError, OSError):
                    remote.push_state(store.path)
                    remote.push_file(status.path)
            raise
        finally:
            progress.close()
            if handle_signals:
                for signum, handler in saved_handlers.items():
                    signal.signal(signum, handler)
        counts = store.counts(below=total)
        spend = store.spend()
        written = pool.aborted is None and counts["ok"] + counts["failed"] == total - start
        if written:
            try:
                reader.check_unchanged()  # the passthrough just copied is the fingerprinted one
                output.finish()
            except JobAborted as exc:  # StorageError, InputChangedError: every answer is saved
                pool.aborted, written = exc, False
        if not written:
            output.discard()
    finally:
        store.close()
        reader.close()
        if cache is not None:
            cache.close()

    if remote is not None:  # every stop: the output first, then the state that says it is done
        try:
            if written:
                remote.push_file(output_path)
            remote.push_state(store.path)
        except StorageError as exc:  # every answer is saved here; a rerun on this machine uploads them
            written = False
            if pool.aborted is None:
                pool.aborted = exc
    merged = None
    if shard is not None and written and merge is not None:  # the last shard to finish merges
        outcome = try_merge(spec, dataset=merge == "dataset")
        merged = outcome.line() if isinstance(outcome, MergeSummary) else f"not merged: {outcome}"
    summary = Summary(
        job=spec.name,
        output=remote.url_of(output_path) if remote else output_path,
        state=store.path,
        rows=total - start,
        requests=client.requests_sent,
        elapsed_s=time.monotonic() - started,
        output_written=written,
        aborted=str(pool.aborted) if pool.aborted else None,
        max_failed_share=spec.max_failed_share if max_failed_share is None else max_failed_share,
        shard=str(shard) if shard is not None else None,
        merged=merged,
        set_aside=set_aside,
        uncacheable=client.uncacheable,
        unmetered=spend.unmetered,
        **counts,
    )
    status.write(counts, requests=client.requests_sent, state="finished" if written else "stopped",
                 reason=summary.aborted, exit_code=summary.exit_code)
    if remote is not None:
        with contextlib.suppress(StorageError):  # the state on the store holds the truth
            remote.push_file(status.path)
    if pool.aborted is not None:
        pool.aborted.summary = summary  # type: ignore[attr-defined]
        raise pool.aborted
    return summary


def _run_beside(pool: _Pool) -> None:
    """Run the pool's event loop in a thread of its own while the caller's thread waits.

    A library caller may have an exception raised into its thread at any moment: a
    scheduler's timeout (Airflow raises from a SIGALRM handler), a KeyboardInterrupt. In
    the event loop's own thread that could leave answers received but not saved, and the
    loop's worker threads behind. Here it only interrupts the wait: the pool stops as on
    SIGTERM (no new rows, requests in flight get their grace, every answer is saved),
    and then the exception goes on its way. A second one does not wait.
    """
    failure: list[BaseException] = []
    # Waited for with an Event, not Thread.join: a join interrupted by an exception can
    # return at once the next time (CPython 3.11 loses the thread's state lock).
    finished = threading.Event()

    def loop() -> None:
        try:
            anyio.run(pool.run, False)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            finished.set()

    threading.Thread(target=loop, name="batchrun", daemon=True).start()
    try:
        while not finished.wait(0.1):  # short waits: a signal handler in this thread runs between them
            pass
    except BaseException as exc:
        pool.stop_from_outside(exc if isinstance(exc, Interrupted) else
                               Interrupted(f"stopped by {type(exc).__name__} in the calling thread"))
        finished.wait()
        raise
    if failure:
        raise failure[0]


def _leading(group: BaseExceptionGroup) -> BaseException:
    """The one exception of a task group's that the caller should see: a stop asked for
    from outside (KeyboardInterrupt, SystemExit) first, then batchrun's own errors, then
    any other (a bug: shown whole by the CLI, with the group as its cause)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in (KeyboardInterrupt, SystemExit, BatchrunError, BaseException):
        for leaf in leaves:
            if isinstance(leaf, kind) and not isinstance(leaf, anyio.get_cancelled_exc_class()):
                return leaf
    return group.exceptions[0]


def read_api_key(spec: JobSpec, env: Mapping[str, str]) -> str | None:
    """The key from the variable the spec names (None for the mock endpoint); ConfigError
    (exit 2) when it is unset or holds what no key can."""
    if spec.api.base_url.startswith(MOCK_SCHEME):
        return None
    name = spec.api.api_key_env
    key = env.get(name, "").strip()  # a key read from a file often ends in a newline
    if not key:
        raise ConfigError(f"{name} is not set; export it or set api.api_key_env in {spec.name}")
    if not all("!" <= c <= "~" for c in key):
        # Never echo it: the point is that the key reaches no output.
        raise ConfigError(f"{name} holds characters an API key cannot have (a space, a quote, a line break?)")
    return key


def _check_output(output: Path) -> None:
    folder = output.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # if batchrun makes it, it is private
    except OSError as exc:
        raise ConfigError(f"{output}: cannot create the output folder {folder}: {exc.strerror}") from exc
    if output.is_dir():
        raise ConfigError(f"{output}: is a folder; name a .parquet file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{output}: the folder {folder} is not writable")


def _set_aside(outputs: list[Path], remote: Remote | None) -> str | None:
    """Move the outputs of a job's discarded progress out of the way (`--restart`), here
    and on the store: `x.parquet` becomes `x.parquet.before-restart`. Where the first
    one went, if it was there."""
    moved = None
    for output in outputs:
        aside = output.with_name(output.name + ".before-restart")
        try:
            if output.is_file():
                os.replace(output, aside)
                moved = moved or str(aside)
            if remote is not None and remote.move(output, aside):
                moved = moved or remote.url_of(aside)
        except OSError as exc:
            raise StorageError(f"{output}: cannot move the output of the discarded progress aside "
                               f"({exc.strerror}); move or delete it, then rerun with --restart") from exc
    return moved


def _check_free_space(folder: Path) -> None:
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


def _open_state(spec: JobSpec, reader: InputReader, *, limit: int | None, restart: bool,
                shard: Shard | None = None) -> tuple[StateStore, int, dict[str, str], list[str]]:
    """Open (or make) the job's state and check it belongs to this input and spec.

    The input is validated in full the first time; a resume whose input digest
    matches the saved one trusts the saved row count, column types and the optional
    columns its rows ask for (`InputReader.asks`).
    """
    path = state_path(spec.output if shard is None else shard_output(spec.output, shard))
    if restart:  # checked before anything is discarded: a bad input must not cost the progress
        digest = reader.fingerprint()
        rows, passthrough = reader.validate()
        asks = reader.asks
    fresh = not path.exists()
    store = StateStore.open(path, discard_damaged=restart)
    try:
        if restart:
            store.reset()
        else:
            digest = reader.fingerprint()
            saved = store.meta()
            if saved.get("input_digest") == digest:
                rows, passthrough, asks = saved["rows"], dict(saved["passthrough"]), saved.get("asks", [])
            else:
                rows, passthrough = reader.validate()
                asks = reader.asks
        clash = sorted(set(asks) & set(passthrough))
        if clash:
            raise InputError(f"{reader.name}: rows ask for {clash[0]}, an output column, and the input has a "
                             f"column of that name; rename it in the input")
        # passthrough as pairs: their order is the output's column order
        meta = {"input_digest": digest, "rows": rows, "passthrough": list(map(list, passthrough.items())),
                "request": spec.request_config()}
        if asks:  # only when rows ask: states saved before this key still match
            meta["asks"] = asks
        if shard is not None:
            meta["shard"] = [shard.index, shard.count]
            check_siblings(spec.output, shard, meta)
        store.claim(meta, spec_name=spec.name)
    except BatchrunError as exc:
        store.close(remove=fresh)
        # A job that never began leaves nothing behind; one that did gets its status updated
        exc.held_lock = not fresh  # type: ignore[attr-defined]
        raise
    return store, rows if limit is None else min(rows, limit), passthrough, asks


@dataclass(frozen=True)
class _HoldNote:
    """For the writer: a budget's hold to record before its request goes (`sending`), or
    to delete when its request was answered with nothing to save."""

    hold: Hold
    sending: bool


class _Pool:
    """The worker pool of one run: workers, the writer and the output's row groups."""

    def __init__(
        self,
        spec: JobSpec,
        client: Client,
        store: StateStore,
        output: OutputWriter,
        reader: InputReader,
        progress: Progress,
        done: bytearray,
        total: int,
        start: int = 0,
    ) -> None:
        self.spec = spec
        self.client = client
        self.store = store
        self.output = output
        self.reader = reader
        self.progress = progress
        self.done = done
        self.total = total
        # Rows settled so far (ok before this run, or saved in it) and the length of
        # their unbroken run from row 0: the output can be written up to there.
        self.settled = bytearray(done)
        self.prefix = start
        self.published = start  # rows [start, published) are written or being written to the output
        self.fed_all = False
        self.tail_written = False
        self.aborted: JobAborted | None = None
        self.stopping = False
        self.state_failed = False  # nothing more can be saved
        self.output_failed = False  # answers are still saved; the output waits for a rerun
        self.streak = FailureStreak()
        self.token: object | None = None  # the event loop's, for `stop_from_outside`
        self.remote: Remote | None = None  # the store the state is uploaded to
        self.stop_request: JobAborted | None = None
        self.grace_s = GRACE_S
        # Rows a server asked to wait (a long retry-after), by when they may go again; and
        # for rows set aside, (requests sent so far, times set aside, (failures, 429s) met)
        self.parked: list[tuple[float, int, Row]] = []
        self.carried: dict[int, tuple[int, int, tuple[int, int]]] = {}
        # Rows a worker takes at once: embeddings go several to a request (one, if so asked,
        # still as a group: the group's answer is what shares out the vectors)
        self.grouped = spec.endpoint is not None and get_endpoint(spec.endpoint).grouped
        self.group = spec.inputs_per_request if self.grouped else 1

    def stop_from_outside(self, reason: JobAborted) -> None:
        """`_stop`, from another thread (see `_run_beside`)."""
        self.stop_request = reason  # seen by a loop that has not started yet
        token = self.token
        if token is not None:
            with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
                anyio.from_thread.run_sync(self._stop, reason, token=token)

    async def run(self, handle_signals: bool) -> None:
        self.token = anyio.lowlevel.current_token()
        if self.stop_request is not None:
            self.stopping, self.aborted = True, self.stop_request
        # Each worker hands over its answers (and the budget's holds) and waits for them to
        # be saved: room for all, and for the holds let go meanwhile.
        results_send, results_receive = anyio.create_memory_object_stream[Result | _HoldNote](
            self.spec.concurrency * (self.group + 2))
        self.notes = results_send.clone()  # the budget's holds, from the client (see `record`)
        # At most one output write waits while another runs: each writes all that is ready.
        due_send, due_receive = anyio.create_memory_object_stream[None](1)
        self.answered_once = anyio.Event()
        self.saved = anyio.Event()  # set once the answers handed over so far are on disk
        rows = self._rows()
        try:
            async with anyio.create_task_group() as outer:
                if handle_signals:
                    outer.start_soon(self._watch_signals)
                outer.start_soon(self._report)
                outer.start_soon(self._watch_progress)
                if self.remote is not None:
                    outer.start_soon(self._upload)
                async with anyio.create_task_group() as saving:
                    saving.start_soon(self._write, results_receive, due_send)
                    saving.start_soon(self._publish, due_receive)
                    async with self.notes, self.client, anyio.create_task_group() as self.workers:
                        for n in range(self.spec.concurrency):
                            self.workers.start_soon(self._work, n == 0, rows, results_send.clone())
                        results_send.close()
                        # Started after the workers, this runs once the first row's request
                        # is on its way: the loop then idles until its answer.
                        saving.start_soon(anyio.to_thread.run_sync, load_arrow)
                # The workers closed their result streams, the writer made its last
                # commit and the output its last write: stop the signal watcher.
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # anyio's task groups wrap what a task raised: unwrap it
            raise _leading(group)  # (the group stays its context, for a bug's traceback)
        finally:
            rows.close()  # and with it the input file

    def _rows(self) -> Generator[Row, None, None]:
        """The rows still to do, in input order.

        The workers share this one iterator: it never awaits, so no two of them are
        ever inside it at once, and a row goes to exactly one worker.
        """
        # Small batches: the first request waits for its batch to be parsed.
        for row in self.reader.rows(batch_rows=64):
            if row.index >= self.total:
                break
            if not self.done[row.index]:
                yield row
        self.fed_all = True

    async def _work(self, first: bool, rows: Iterator[Row], results: ObjectSendStream[Result]) -> None:
        async with results:
            if not first:
                await self.answered_once.wait()
            try:
                while not self.stopping:
                    try:
                        if not self.grouped:
                            row = await self._next_row(rows)
                            taken = [row] if row is not None else []
                        else:
                            taken = list(itertools.islice(rows, self.group))
                    except StopIteration:
                        return
                    except InputChangedError as exc:
                        self._stop(exc)
                        return
                    if not taken:
                        return
                    try:
                        if not self.grouped:
                            _, parks, spent = self.carried.get(taken[0].index, _FRESH)
                            answers = [await self.client.call(taken[0], park=parks < MAX_PARKS, pushed_back=parks > 0,
                                                              spent=spent)]
                        else:
                            answers = await self.client.call_group(taken)
                    except Deferred as deferred:  # the server asked this row to wait: it waits aside
                        attempts, parks, _ = self.carried.get(taken[0].index, _FRESH)
                        self.carried[taken[0].index] = (attempts + deferred.attempts, parks + 1, deferred.spent)
                        heapq.heappush(self.parked, (anyio.current_time() + deferred.wait, taken[0].index, taken[0]))
                        continue
                    except JobAborted as exc:  # the API refused the job, the budget is spent, ...
                        self._stop(exc)
                        return
                    # An answer received is paid for: hand it to the writer at once, even
                    # if the pool is being cancelled (the writer outlives the workers).
                    try:
                        for result in answers:
                            if self.carried and (carried := self.carried.pop(result.row_index, None)):
                                result.attempts += carried[0]  # the requests before it was set aside
                            self._judge(result)
                            results.send_nowait(result)
                    except anyio.BrokenResourceError:
                        return
                    # The next row waits until this answer is on disk: a kill then costs
                    # at most the rows the workers hold, never answers queued behind them.
                    await self.saved.wait()
            finally:
                if first:  # with nothing left to do, the others must not wait for it
                    self.answered_once.set()

    async def _next_row(self, rows: Iterator[Row]) -> Row | None:
        """A row set aside whose wait is over, else the next new row; with none left but
        rows set aside, wait for theirs. None: nothing more to do (or the pool stops)."""
        while not self.stopping:
            now = anyio.current_time()
            if self.parked and self.parked[0][0] <= now:
                return heapq.heappop(self.parked)[2]
            try:
                return next(rows)
            except StopIteration:
                if not self.parked:
                    return None
            await anyio.sleep(min(PARKED_POLL_S, max(0.0, self.parked[0][0] - now)))
        return None

    def _judge(self, result: Result) -> None:
        """Open the pool after the first answer; stop when answers show a broken job."""
        if not self.answered_once.is_set():
            if result.transient:
                self._stop(JobFatalAPIError(
                    f"the first row got no answer in {result.attempts} attempts ({result.error}); "
                    "check api.base_url and that the API is up, then rerun"
                ))
                return
            self.answered_once.set()
        if self.streak.observe(result.status, result.error):
            self._stop(JobFatalAPIError(
                f"{self.streak.count} rows in a row failed with the same error: {result.error}; "
                "stopping so the rest are not spent the same way. Fix the spec and rerun"
            ))

    def _stop(self, reason: JobAborted) -> None:
        """Start no new row; requests in flight get `grace_s` to bring their answers home."""
        if self.aborted is None:
            self.aborted = reason
        self.stopping = True
        self.client.stop_holding()
        workers = getattr(self, "workers", None)
        if workers is None:  # asked from outside before the workers began: none will
            return
        self.answered_once.set()  # waiting workers wake up, see `stopping` and leave
        scope = workers.cancel_scope
        scope.deadline = min(scope.deadline, anyio.current_time() + self.grace_s)

    # -- the writer: the only owner of the state -----------------------------------------

    async def _write(self, results: ObjectReceiveStream[Result | _HoldNote], due: ObjectSendStream[None]) -> None:
        """Commit answers as they arrive, a group at a time (group commit).

        Each commit takes every answer that arrived while the previous one was
        being written, without waiting for more: an answer is durable one commit
        (well under a millisecond to a few) after it arrives, and under load the
        groups grow rather than the commits multiply. Its worker waits for that
        before taking another row, so a kill -9 costs at most the rows the workers
        hold: `concurrency` answers.
        """
        async with results, due:
            async for first in results:
                group = [first]
                while True:
                    try:
                        group.append(results.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                # Taken with the group, with no await between: answers handed over
                # from here on wait for the next commit.
                saved, self.saved = self.saved, anyio.Event()
                try:
                    await self._commit(group, due)
                finally:
                    saved.set()  # saved, or never to be: the workers go on either way

    def _save(self, group: list[Result], notes: list[_HoldNote]) -> None:
        """In the writer's thread: the state first; then the cache may share the answers."""
        self.store.save(group, holds=[n.hold for n in notes if n.sending],
                        released=[n.hold.id for n in notes if not n.sending])
        cache = self.client.cache
        if cache is not None:
            cache.put((r.cache_key, r) for r in group if r.cache_key is not None)

    async def _commit(self, items: list[Result | _HoldNote], due: ObjectSendStream[None]) -> None:
        if self.state_failed:
            return  # nothing more can be saved; the job is stopping
        group = [item for item in items if isinstance(item, Result)]
        notes = [item for item in items if not isinstance(item, Result)] if len(group) < len(items) else []
        try:
            # Shielded: an answer received is paid for, even during a hard stop.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._save, group, notes)
        except StorageError as exc:
            self.state_failed = True
            self._stop(exc)
            return
        if not group:
            return
        self._count(group)
        self.progressed = anyio.current_time(), self.client.requests_sent
        failed = sum(r.status != "ok" for r in group)
        tokens = sum(r.total_tokens or 0 for r in group)
        self.progress.advance(len(group) - failed, failed, tokens, sum(r.cost_usd or 0.0 for r in group))
        for result in group:
            self.settled[result.row_index] = 1
        while self.prefix < self.total and self.settled[self.prefix]:
            self.prefix += 1
        # A row group's worth of settled rows goes to the output; once every row has
        # been sent, what is settled goes at once (a shorter group), so that the end
        # of the job waits only for the last few rows.
        ready = self.prefix - self.published
        if ready >= ROW_GROUP_ROWS or (self.fed_all and ready > 0 and not self.tail_written):
            self.tail_written = self.fed_all
            with contextlib.suppress(anyio.WouldBlock):  # one is pending: it will take these too
                due.send_nowait(None)

    async def _publish(self, due: ObjectReceiveStream[None]) -> None:
        """Append settled rows to the output in a thread, off the commit path."""
        async with due:
            async for _ in due:
                if self.output_failed:
                    continue
                stop = self.published = self.prefix
                try:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self.output.write, stop)
                except (StorageError, InputChangedError) as exc:
                    self.output_failed = True
                    self._stop(exc)

    # -- the budget's holds (see `_client.HoldLog`) ---------------------------------------

    async def record(self, hold: Hold) -> None:
        """In the state before its request goes, in the writer's next commit: a kill -9
        from here on leaves it there, counted as spent by the next run."""
        self.notes.send_nowait(_HoldNote(hold, sending=True))
        saved = self.saved  # the event of the commit that takes it (see `_write`)
        await saved.wait()
        if self.state_failed:
            raise StorageError("the budget's hold could not be saved; stopping")

    def release(self, hold: Hold) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.notes.send_nowait(_HoldNote(hold, sending=False))

    # -- object storage --------------------------------------------------------------

    async def _upload(self) -> None:
        """The state (and status) to the store every checkpoint.interval_s: a lost
        machine costs at most the answers received since."""
        assert self.remote is not None
        while True:
            await anyio.sleep(self.spec.checkpoint.interval_s)
            try:
                await anyio.to_thread.run_sync(self.remote.push_state, self.store.path)
                await anyio.to_thread.run_sync(self.remote.push_file, self.status.path)
            except StorageError as exc:
                self._stop(exc)
                return

    # -- status ------------------------------------------------------------------------

    async def _report(self) -> None:
        """The status file: now, then every EVERY_S seconds until the run ends."""
        while True:
            self.status.write(self.counts(), requests=self.client.requests_sent)
            await anyio.sleep(EVERY_S)

    def counts(self) -> dict[str, object]:
        """The state's counts as of the last commit, without asking the state."""
        states = self.states
        for_good = states.count(FAILED_FOR_GOOD)
        return {**self.totals, "ok": states.count(OK), "failed": states.count(FAILED) + for_good,
                "failed_for_good": for_good}

    def _count(self, group: list[Result]) -> None:
        totals = self.totals
        for result in group:
            self.states[result.row_index] = OK if result.status == "ok" else (
                FAILED if result.transient else FAILED_FOR_GOOD)
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                totals[name] += getattr(result, name) or 0
            if result.cost_usd is not None:
                totals["cost_usd"] = (totals["cost_usd"] or 0.0) + result.cost_usd

    async def _watch_progress(self) -> None:
        """Stop a job that settles no row for retry.max_stall_s (a server that refuses every
        request with a retry-after would hold it forever): exit 3, a rerun resumes."""
        most = self.spec.stall_s
        self.progressed = anyio.current_time(), self.client.requests_sent
        while True:
            since, sent = self.progressed
            await anyio.sleep(max(0.0, since + most - anyio.current_time()))
            if self.progressed[0] == since and not self.stopping:
                requests = self.client.requests_sent - sent
                self._stop(Stalled(
                    f"no row was settled in {most:g} s, while {requests:,} request{'' if requests == 1 else 's'} "
                    "went unanswered or were refused (the server may be holding every request back with a "
                    "retry-after). Every answer is saved; rerun to resume once the server answers again, or "
                    f"raise retry.max_stall_s in {self.spec.name} to wait longer"))
                return

    # -- signals -----------------------------------------------------------------------

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopping:  # a second signal: stop now; the writer still saves
                    self.workers.cancel_scope.cancel()
                else:
                    self._stop(Interrupted(f"interrupted by {signal.Signals(signum).name}"))
