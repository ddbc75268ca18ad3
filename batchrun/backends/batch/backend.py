"""The batch backend: a job's rows through the provider's batch API, then live what it
did not answer.

    run     check the account and model ─▶ see through what an earlier run began
            ─▶ send the rows no batch holds ─▶ collect the batches that finished
            ─▶ poll with backoff, collecting each batch as it finishes (cancelling one
               past max_wait_h) ─▶ the rows handed on, live (`fallback: live`), and the
               output, by the engine (`LocalBackend`)
    submit  the same up to the sending, then exit 0: a scheduler does not hold a worker
            for a day; a later `run` (or `submit`) picks the same batches up

Every answer goes into the same state and output as a live run's, marked `backend`
"batch" (cost at batch prices); the live engine runs only when no row is in a batch
(it refuses to, otherwise), so no row is ever paid for twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import httpx

from ..._exceptions import BatchrunError, BudgetReached, ConfigError, Interrupted, JobAborted
from ...endpoints.result import Result
from ...engine.cache import ResponseCache
from ...engine.holds import job_budget
from ...engine.limits import Limits
from ...engine.opening import open_reader, open_state
from ...engine.preflight import check_free_space, check_output, read_key
from ...engine.run import RunOptions
from ...engine.status import StatusFile, status_path
from ...engine.summary import Summary
from ...http.network import check_key_route
from ...spec.model import JobSpec
from ...storage import Store, open_store
from ...storage.state import StateStore, done_rows, state_path
from ..base import Backend
from ..local import LocalBackend, Unsharded
from . import PROVIDERS
from .base import Provider
from .cached import answer_from_cache
from .collect import BACKEND, collect
from .remote import Caller, call, pause
from .send import cancel_duplicates, send, send_planned
from .session import KEY_TAG, TAG, Session, fingerprint

__all__ = ["BatchBackend"]


class BatchBackend(Backend):
    """`wait`: poll until every batch is collected and finish the job (`run`), or return
    once the rows are sent (`submit`); `limits`: for the live part, as `LocalBackend`'s."""

    def __init__(self, limits: Limits = Limits(), *, wait: bool = True) -> None:
        self.limits, self.wait = limits, wait

    def run(self, spec: JobSpec, options: RunOptions) -> Summary:
        started = time.monotonic()
        with _opened(spec, options) as (session, status, storage):
            try:
                with _stoppable(session, options.handle_signals):
                    waiting = _batches(session, status, wait=self.wait, retry_failed=options.retry_failed)
            except JobAborted as exc:
                exc.summary = _summary(session, storage, started, str(exc))  # type: ignore[attr-defined]
                _write(session, status, state="stopped", reason=str(exc), exit_code=3)
                raise
            out = session.store.ledger.rows_out()
            summary = dataclasses.replace(_summary(session, storage, started, None), submitted=not self.wait,
                                          waiting=waiting)
            if out or not self.wait:
                done = waiting if out else "no rows are in the provider's batches: `batchrun run` finishes the job"
                _write(session, status, state="submitted" if out else "stopped", reason=done,
                       exit_code=summary.exit_code)
                return summary
        # Every batch is collected: what they did not answer goes live, and the output is written
        summary = LocalBackend(self.limits).run(spec, dataclasses.replace(options, restart=False, retry_failed=False))
        return dataclasses.replace(summary, elapsed_s=time.monotonic() - started)


@contextlib.contextmanager
def _opened(spec: JobSpec, options: RunOptions) -> Iterator[tuple[Session, StatusFile, Store]]:
    """The job's state and input opened as a run opens them, and a client of the batch
    API; the state goes back to the store on every way out."""
    batch = spec.batch_api
    assert batch is not None
    env = os.environ if options.environ is None else options.environ
    key = read_key(batch.api_key_env, env, f"batch_api.api_key_env in {spec.name}")
    provider = PROVIDERS[batch.kind]
    base_url = provider.base_url(batch)
    check_key_route(base_url, has_key=True, allowed=spec.api.allow_insecure_http, spec_name=spec.name)
    check_output(spec.output)
    check_free_space(spec.output.parent)
    storage = open_store(spec)
    storage.pull_state(state_path(spec.output))
    fresh = not state_path(spec.output).exists()
    reader = open_reader(spec, storage)
    status = StatusFile(status_path(spec.output), job=spec.name, output=spec.output, rows=0)
    http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"},
                        timeout=httpx.Timeout(spec.api.timeout_s, connect=30.0))
    try:
        store, total, _, _ = open_state(
            spec, reader, Unsharded(spec.output), status, limit=options.limit, restart=options.restart,
            before_reset=lambda old, meta: _cancel_discarded(Caller(batch), provider, http, old, meta))
    except BaseException:
        http.close()
        reader.close()
        raise
    status.fixed["rows"] = total
    cache = ResponseCache(spec.cache) if spec.cache is not None else None
    unbegun = False
    try:
        session = Session(spec, store, reader, provider, http, fingerprint(store.meta()), total, cache)
        yield session, status, storage
    except ConfigError:
        # Refused before a row was sent or answered (a wrong account, a model that cannot
        # batch): the job never began, so it leaves no state, which would hold the
        # corrected spec (another model) to --restart
        counts = store.counts()
        unbegun = fresh and not store.ledger.entries() and counts["ok"] + counts["failed"] == 0
        raise
    finally:
        http.close()
        if cache is not None:
            cache.close()
        store.close(remove=unbegun)
        reader.close()
        with contextlib.suppress(BatchrunError):
            if not unbegun:
                storage.push_state(state_path(spec.output))
                storage.push_file(status.path)


def _cancel_discarded(caller: Caller, provider: Provider, http: httpx.Client, old: StateStore, meta: dict) -> None:
    """Cancel the batches a `--restart` is about to discard (nobody would collect what
    they answer), before it does, so that a cancel that fails leaves them known: those the
    state records, and those the provider lists under their keys (created by a run that
    died before it could record them). A damaged state (discarded as it opened) records
    none: then every batch the provider lists under this job's fingerprint that has not
    ended. One that ended needs nothing; one the provider does not know neither; one still
    running whose cancel is refused stops the restart, nothing discarded."""
    entries = old.ledger.entries(outstanding=True)
    known = old.meta()
    if known and not entries:
        return
    keys = {entry.key for entry in entries}
    ids = {entry.batch_id for entry in entries if entry.batch_id is not None}
    ids |= {batch.id for batch in call(caller, provider.tagged, http, TAG, fingerprint(known or meta))
            if (batch.metadata.get(KEY_TAG) in keys or not known) and not batch.done}
    for batch_id in sorted(ids):
        try:
            call(caller, provider.cancel, http, batch_id)
        except ConfigError as refused:
            try:
                batch = call(caller, provider.get, http, batch_id)
            except ConfigError:  # the provider does not know it: nothing to cancel
                continue
            if not batch.done:
                raise ConfigError(f"--restart: batch {batch_id} is still {batch.state} at the provider and its "
                                  f"cancel was refused ({refused}); nothing was discarded. Cancel it at the provider "
                                  "(or let it end), then rerun") from None


@contextlib.contextmanager
def _stoppable(session: Session, handle_signals: bool) -> Iterator[None]:
    """SIGINT and SIGTERM (with `handle_signals`: the CLI) ask the job to stop: the call
    under way ends, nothing more is sent, and the batches stay with the provider. A second
    one stops at once, the call under way cut short: the state records each step's intent
    before its call (a batch cut short in its upload is uploaded again by a rerun, one cut
    short in its creation is found under its key) and a collection commits whole or not."""
    if not handle_signals:
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if session.stop.is_set():
            raise Interrupted(f"stopped at once by a second {name}; the batches sent stay with the provider and "
                              "the state knows them: rerun (`batchrun run` or `submit`) to go on")
        session.stopped_by = name
        session.stop.set()

    saved = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _batches(session: Session, status: StatusFile, *, wait: bool, retry_failed: bool) -> str | None:
    """The batch part of the job: see through what an earlier run began, send the rows no
    batch holds, then collect what finished and (`wait`) poll to the end. Sending comes
    before polling: a row's batch never waits on another's, and `submit` returns sooner.

    A batch the budget cannot hold beside those out waits for them to be collected (their
    answers' real cost lets go of their worst case), then goes if it fits; BudgetReached
    once nothing is out and it still does not. Returns why rows are left unsent (`submit`,
    with batches still out), or None."""
    store, provider = session.store, session.provider
    call(session, provider.check, session.http, session.spec.model)
    made = send_planned(session, store.ledger.entries(outstanding=True)) > 0
    if session.batch.fallback == "none":
        _fail_handed_back(session)
    tried: set[int] = set()  # rows this run sent: one its batch failed again stays failed
    while True:
        blocked = None
        try:
            made = _send_wanted(session, retry_failed, tried) > 0 or made
        except BudgetReached as exc:
            if not store.ledger.rows_out():  # nothing out whose collection could make room
                raise
            blocked, made = exc, True
        if made:  # a batch made twice (a retry whose first answer was lost) would answer its rows twice
            cancel_duplicates(session)
            made = False
        _write(session, status, state="submitted")
        _poll(session, status, wait=wait)
        if blocked is None:
            return None
        if store.ledger.rows_out():  # `submit`: a later run collects them, then sends the rest
            return "the budget holds the other rows back until the batches out are collected and cost what they cost"


def _send_wanted(session: Session, retry_failed: bool, tried: set[int]) -> int:
    """Send the rows that are neither done nor in a batch (nor answered by the cache, nor
    `tried` already by this run) within the budget; the rows sent, added to `tried`."""
    store = session.store
    done = done_rows(store.row_states(session.total), retry_failed=retry_failed)
    taken = store.ledger.taken(session.total)
    wanted = [index for index in range(session.total) if not done[index] and not taken[index] and index not in tried]
    wanted = answer_from_cache(session, wanted)
    if not wanted:
        return 0
    budget = job_budget(session.spec, store.spend()) if session.spec.budget.is_set else None
    try:
        return send(session, wanted, budget)
    finally:
        taken = store.ledger.taken(session.total)
        tried.update(index for index in wanted if taken[index])


def _fail_handed_back(session: Session) -> None:
    """Rows an earlier run's batches handed back to go live (`fallback: live` then) fail
    with the batch's word now that the spec says `fallback: none`: never sent live."""
    settled = session.store.ok_rows(session.total)
    back = {index: why for index, why in session.store.ledger.unbatched().items()
            if index < session.total and not settled[index]}
    if back:
        failed = [Result(row.index, row.id, "failed", error=f"the batch did not answer it: {back[row.index]}",
                         extra={BACKEND: "batch"}) for row in session.rows(set(back))]
        session.store.save(failed, also=session.store.ledger.answered_elsewhere(back))


def _poll(session: Session, status: StatusFile, *, wait: bool) -> None:
    """Ask after every batch out, collecting those that finished and cancelling those past
    max_wait_h; with `wait`, again and again (every poll_interval_s, sooner at first)
    until none is out."""
    ledger, provider, http = session.store.ledger, session.provider, session.http
    delay = session.batch.poll_interval_s / 8
    while True:
        for entry in ledger.entries(outstanding=True):
            if entry.batch_id is None:
                continue
            batch = call(session, provider.get, http, entry.batch_id)
            ledger.seen(entry.key, batch.state, batch.counts)
            if batch.done:
                collect(session, entry, batch)
            elif time.time() - entry.since > session.batch.max_wait_h * 3600 and batch.state != "cancelling":
                batch = call(session, provider.cancel, http, entry.batch_id)  # what it answered stays
                ledger.seen(entry.key, batch.state, batch.counts)
        if not wait or not ledger.rows_out():
            return
        _write(session, status, state="submitted")
        pause(session, delay)
        delay = min(delay * 2, session.batch.poll_interval_s)


def _write(session: Session, status: StatusFile, *, state: str, reason: str | None = None,
           exit_code: int | None = None) -> None:
    status.fixed["batches"] = [e.status() for e in session.store.ledger.entries(outstanding=True)]
    status.write(session.store.counts(below=session.total), requests=0, state=state, reason=reason,
                 exit_code=exit_code)


def _summary(session: Session, storage: Store, started: float, aborted: str | None) -> Summary:
    """What the batch part did, the rows it leaves to a later run counted apart."""
    store, spec = session.store, session.spec
    counts = store.counts(below=session.total)
    settled = store.ok_rows(session.total)
    for_live = sum(1 for index in store.ledger.unbatched() if index < session.total and not settled[index])
    return Summary(job=spec.name, output=storage.where(spec.output), state=store.path, rows=session.total,
                   requests=0, elapsed_s=time.monotonic() - started, output_written=False, aborted=aborted,
                   max_failed_share=spec.max_failed_share, in_batches=store.ledger.rows_out(),
                   for_live=for_live if spec.batch_api and spec.batch_api.fallback == "live" else 0, **counts)
