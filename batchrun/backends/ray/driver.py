"""`batchrun run JOB --ray`: one job across a Ray cluster, in shards.

    driver ─┬─▶ limiter actor (named after the job, detached, made again if lost: actor.py)
            │        ▲  a worker's reports and leases, a few times a second (quota.py)
            ├─▶ task: shard 0/N, LeasedLimiter (worker.py) ─────────────┐
            ├─▶ task: ...                                             ├─▶ <stem>.shards/
            └─▶ once every task is done: merge_job(spec) ◀────────────┘

Each task is batchrun's own engine on one shard (see `backends.shards`), with its slice of
the budget and of `concurrency` (the most it may have in flight); the rate limits and
the limit on requests in flight are the job's, held by the actor, which finds the
server's limit from every worker's answers and allots it by demand. A task whose
worker is lost is run again by Ray, and resumes from the shard's state: no row is
lost or stored twice. A driver killed and run again finds the same shards and the
same actor. An actor that is lost is made again by Ray (its pacing and the limit it
found start over, the rows are in the shards' states): meanwhile the workers go on
alone, each at its share of the job's last rate and limit.

This module is the driver; worker.py and actor.py run on the cluster. Ray is imported
only inside functions, and only when `--ray` is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from ..._exceptions import ConfigError, Interrupted, JobAborted, UsageError
from ...engine.pool import GRACE_S
from ...engine.preflight import read_api_key
from ...engine.progress import Progress
from ...engine.run import RunOptions
from ...engine.summary import Summary
from ...spec.parse import JobSpec, load_spec
from ...storage.lock import lock_holder
from ...tools.status import job_status
from ..base import Backend
from ..layout import Shard, find_shards, shard_folder, shard_sums
from ..merge import merge_job
from .actor import QuotaActor
from .worker import CALL_TIMEOUT_S, LOCK_WAIT_S, run_shard

__all__ = ["RayBackend", "run_on_ray"]

NAMESPACE = "batchrun"  # named actors are found across drivers only within a namespace
MAX_RETRIES = 5  # runs of a shard whose worker was lost, after the first
POLL_S = 0.25  # the driver's look at its tasks and signals (the shards' progress: every second)
SUMMED = ("rows", "ok", "failed", "prompt_tokens", "completion_tokens", "total_tokens", "requests", "failed_for_good",
          "cache_hits", "short_choices")  # the job's Summary: its shards' added up


def run_on_ray(
    job: str | os.PathLike[str] | JobSpec,
    *,
    address: str | None = None,
    workers: int = 4,
    restart: bool = False,
    retry_failed: bool = False,
    max_failed_share: float | None = None,
    merge: str | None = "file",
    progress: Progress | None = None,
) -> Summary:
    """Run (or resume) a job on a Ray cluster as `workers` shards; merge their parts.

    `address` is Ray's (`auto`, `host:port`, `ray://...`); None means `RAY_ADDRESS`,
    else a new cluster on this machine, bound to 127.0.0.1 and stopped at the end.
    Returns the job's Summary; raises as `run_job` does (UsageError, JobAborted with
    `.summary`). The output folder must be one every node (and the driver) sees.
    """
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    options = RunOptions(restart=restart, retry_failed=retry_failed, max_failed_share=max_failed_share,
                         progress=progress)
    return RayBackend(address=address, workers=workers, merge=merge).run(spec, options)


class RayBackend(Backend):
    """The job as `workers` shards, each a Ray task (`worker.run_shard`), sharing one
    quota held by a named actor (`actor.QuotaActor`); the driver merges the parts."""

    def __init__(self, *, address: str | None = None, workers: int = 4, merge: str | None = "file") -> None:
        self.address, self.workers, self.merge = address, workers, merge

    def run(self, spec: JobSpec, options: RunOptions) -> Summary:
        started = time.monotonic()
        if spec.batch_api is not None:  # its shards would send live what the batch API would answer at half price
            raise ConfigError(f"{spec.name}: batch_api and --ray do not go together: a provider's batch API takes "
                              "the whole job at once; drop one of them")
        workers = max(1, min(self.workers, spec.concurrency))  # each holds at least one request in flight
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":  # its workers have this environment: a missing key is said before Ray starts
            read_api_key(spec, os.environ)
        ray = _import_ray(local=address == "local")
        progress = options.progress or Progress()
        _wait_for_earlier_runs(spec)
        with _Signals() as signals:
            owned = _connect(ray, address, workers)
            signals.install()
            actor = None
            try:
                actor = _limiter(ray, spec, workers)
                refs = _start(ray, spec, workers, actor, options)
                try:
                    outcomes = _wait(ray, refs, spec, progress, signals)
                except BaseException as exc:  # Ctrl-C, SIGTERM: each shard stops as on SIGTERM, its answers saved
                    _cancel(ray, refs, signals)
                    if isinstance(exc, JobAborted):  # the summary line a stop ends with, as one process's does
                        summary = _stopped(spec, str(exc), workers, time.monotonic() - started)
                        exc.summary = summary  # type: ignore[attr-defined]
                    raise
                finally:
                    progress.close()
                return _finish(ray, spec, outcomes, self.merge, time.monotonic() - started, options.max_failed_share)
            finally:
                if actor is not None:  # left only by a driver that was killed: its rerun finds it
                    with contextlib.suppress(Exception):  # nothing more to do about it here
                        ray.kill(actor, no_restart=True)
                if owned:
                    ray.shutdown()  # a local cluster stops with it


def _start(ray: ModuleType, spec: JobSpec, workers: int, actor: Any, options: RunOptions) -> list[Any]:
    """One task per shard, each with the key's variable forwarded (a cluster's workers may not have it)."""
    run_id = uuid.uuid4().hex  # --restart: each shard starts over once in this run, not on a retry
    key_env = spec.api.api_key_env
    forwarded = {key_env: os.environ[key_env]} if os.environ.get(key_env) else {}
    task = ray.remote(run_shard).options(max_retries=MAX_RETRIES, name=f"batchrun {spec.output.name}")
    return [task.remote(spec, Shard(i, workers), actor, forwarded,
                        {"restart": f"{run_id}/{i}" if options.restart else None,
                         "retry_failed": options.retry_failed, "max_failed_share": options.max_failed_share})
            for i in range(workers)]


# -- the driver ----------------------------------------------------------------------------


def _import_ray(*, local: bool) -> ModuleType:
    if local:
        # A cluster started here serves this job only: on 127.0.0.1 (Ray binds a node to the
        # machine's address unless told it is single-node), and without Ray's usage reports.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, an optional part of batchrun: pip install 'batchrun[ray]'") from None
    return ray


def _connect(ray: ModuleType, address: str, workers: int) -> bool:
    """Connect to the cluster (or start one here); False if the caller already had."""
    if ray.is_initialized():  # a library caller inside a Ray job: its connection is ours
        return False
    _check_reachable(address)
    options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    if address == "local":  # room for every shard at once (they wait on the network, not the CPU)
        options.update(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                       logging_level=logging.ERROR)  # its start-up notes concern no one but us
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    return True


def _check_reachable(address: str) -> None:
    """Ray retries an address where nothing listens for minutes: a typo is said at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # `auto`, `local`: Ray finds the cluster, or says at once that there is none
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CALL_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one "
                          "(ray start --head) or check the address") from None


def _wait_for_earlier_runs(spec: JobSpec) -> None:
    """The workers of a driver that was killed are stopped by Ray, but not at once: wait for
    their shards' locks. A job another driver is running still is said, not joined."""
    deadline = time.monotonic() + LOCK_WAIT_S
    for shard, state in find_shards(spec.output).items():
        while (holder := lock_holder(state)) is not None:
            if time.monotonic() > deadline:
                raise ConfigError(f"this job is already running (shard {shard}, pid {holder}, lock beside "
                                  f"{state}); wait for it to finish, or stop it first")
            time.sleep(0.5)


def _limiter(ray: ModuleType, spec: JobSpec, workers: int) -> Any:
    """The job's limiter actor: the one a killed driver left (its pacing is still good), or
    a new one when there is none or it was made for other limits."""
    config = {"requests_per_minute": spec.rate_limit.requests_per_minute,
              "tokens_per_minute": spec.rate_limit.tokens_per_minute, "workers": workers,
              "concurrency": spec.concurrency}
    actor_class = ray.remote(QuotaActor).options(
        name=limiter_name(spec.output), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=-1, num_cpus=0)  # no CPU: made again at once, even while the shards hold them all
    actor = actor_class.remote(config)
    if ray.get(actor.matches.remote(config)):
        return actor
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return actor_class.options(get_if_exists=False).remote(config)
        except ValueError:  # its name is taken until the old one is gone
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def limiter_name(output: Path) -> str:
    """The job's limiter actor is named after its output: one per job, found again by a rerun."""
    return "batchrun-limiter-" + hashlib.sha256(str(output).encode()).hexdigest()[:16]


class _Signals:
    """SIGINT and SIGTERM, counted for the driver's loops to look at (in the main thread).

    The CLI's handlers raise; raised from within Ray's own code, the exception would come
    out as a SystemError. So while Ray waits, a signal only says so.
    """

    def __init__(self) -> None:
        self.received: list[int] = []

    def __enter__(self) -> _Signals:
        self._saved = {}
        if threading.current_thread() is threading.main_thread():
            self._saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
            self.install()
        return self

    def install(self) -> None:
        """Again after ray.init, whose own SIGTERM handler (it dies at once) replaces this one."""
        for signum in self._saved:
            signal.signal(signum, lambda signum, frame: self.received.append(signum))

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def check(self) -> None:
        if self.received:
            raise Interrupted(f"interrupted by {signal.Signals(self.received[0]).name}")


def _cancel(ray: ModuleType, refs: list[Any], signals: _Signals) -> None:
    """Stop every shard as SIGTERM would: requests in flight get their grace, every answer
    received is saved. A second signal does not wait."""
    for ref in refs:
        ray.cancel(ref)
    pending, deadline = list(refs), time.monotonic() + GRACE_S + 5
    while pending and time.monotonic() < deadline and len(signals.received) < 2:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
    for ref in pending:
        ray.cancel(ref, force=True)


def _wait(ray: ModuleType, refs: list[Any], spec: JobSpec, progress: Progress, signals: _Signals) -> list[Any]:
    """Every task's Summary or exception, in shard order; the progress meanwhile."""
    outcomes: dict[Any, Any] = {}
    pending = list(refs)
    watch = _ProgressWatch(spec, len(refs), progress)
    while pending:
        signals.check()
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        for ref in done:
            try:
                outcomes[ref] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                outcomes[ref] = exc.cause  # the task's own exception, as run_job raised it
            except ray.exceptions.RayError as exc:  # lost more times than it is retried
                outcomes[ref] = exc
        watch.update()
    return [outcomes[ref] for ref in refs]


class _ProgressWatch:
    """The shards' progress, from their status files (written every few seconds)."""

    def __init__(self, spec: JobSpec, count: int, progress: Progress) -> None:
        self.spec, self.count, self.progress = spec, count, progress
        self.seen: tuple[int, int, int, float] | None = None  # ok, failed, tokens, cost
        self.looked = float("-inf")

    def update(self) -> None:
        if type(self.progress) is Progress or time.monotonic() - self.looked < 1.0:
            return  # it shows nothing, or it was just done
        self.looked = time.monotonic()
        try:
            data = job_status(self.spec)
        except Exception:  # noqa: BLE001 - a status being replaced: the next look will do
            return
        shards = data.get("shards", [])
        if self.seen is None and (len(shards) < self.count or any(s["state"] != "running" for s in shards)):
            return  # until every shard runs, some statuses are an earlier run's (--restart: its counts)
        now = (data["ok"], data["failed"], data["total_tokens"], data.get("cost_usd") or 0.0)
        if self.seen is None:
            self.progress.start(data["rows"], now[0] + now[1], now[3])
        else:
            ok, failed, tokens, cost = (a - b for a, b in zip(now, self.seen))
            if ok > 0 or failed > 0:
                self.progress.advance(ok, failed, int(tokens), cost)
        self.seen = now


def _stopped(spec: JobSpec, reason: str, workers: int, elapsed_s: float) -> Summary | None:
    """The job's Summary when the driver was stopped: its shards' states, as they saved them."""
    try:
        data = job_status(spec)
    except Exception:  # noqa: BLE001 - a state being replaced: the stop is said without its counts
        return None
    return Summary(
        job=spec.name, output=spec.output, state=shard_folder(spec.output), elapsed_s=elapsed_s, output_written=False,
        aborted=reason, shard=None, merged=f"{workers} shards on Ray", cost_usd=data.get("cost_usd"),
        requests=sum(part.get("requests") or 0 for part in data.get("shards", ())),
        **{name: data.get(name) or 0 for name in SUMMED if name != "requests"})


def _finish(ray: ModuleType, spec: JobSpec, outcomes: list[Any], merge: str | None, elapsed_s: float,
            max_failed_share: float | None) -> Summary:
    """The job's Summary from its shards'; the merge once every shard is done."""
    workers = len(outcomes)
    for outcome in outcomes:  # a spec, input or key error is the same for every shard: said once
        if isinstance(outcome, UsageError):
            raise outcome
    summaries = [o if isinstance(o, Summary) else getattr(o, "summary", None) for o in outcomes]
    for index, (outcome, summary) in enumerate(zip(outcomes, summaries)):
        if summary is not None:
            continue
        if isinstance(outcome, ray.exceptions.RayError):  # its worker lost, again and again
            raise JobAborted(f"shard {Shard(index, workers)}: {type(outcome).__name__} after {MAX_RETRIES} "
                             "retries; every answer it received is saved, rerun to resume") from outcome
        raise outcome  # as it came: a JobAborted before any row, a bug (exit 4), a KeyboardInterrupt
    aborted = next((o for o in outcomes if isinstance(o, JobAborted)), None)
    merged, output, written = None, spec.output, False
    if aborted is None and merge is not None:
        result = merge_job(spec, dataset=merge == "dataset")
        output, written = result.output, True
    elif aborted is None:
        merged = "not merged: `batchrun merge` makes the output"
    total = Summary(
        job=spec.name, output=output, state=shard_folder(spec.output), elapsed_s=elapsed_s,
        output_written=written, aborted=str(aborted) if aborted else None,
        max_failed_share=spec.max_failed_share if max_failed_share is None else max_failed_share,
        shard=None, merged=merged or f"{workers} shards on Ray",
        **shard_sums((vars(s) for s in summaries if s is not None), SUMMED, optional=("cost_usd", "saved_usd")),
    )
    if aborted is not None:
        aborted.summary = total  # type: ignore[attr-defined]
        raise aborted
    return total
