"""How a job's rows are run: in this process, as one shard of several, or on a Ray cluster.

    base.py       the `Backend` seam: what a kind must provide, and how to add one
    local.py      one process, every row (the default)
    shards.py     one shard: a contiguous slice of the rows, its own state and part
    layout.py     what a shard is: its slice of the rows, where its files lie, its siblings
    merge.py      the parts made one output, by the last shard or `batchrun merge`
    ray/          the shards as Ray tasks sharing one quota (Ray imported only when chosen)
    batch/        the provider's batch API (about half price), then live what it did not answer

Each kind runs the engine (`engine.run.run_part`) for each process's part of the job,
handing it that part (`engine.part.Part`) and any limits shared between processes
(`engine.limits.Limits`); the engine knows no kind by name. `run_job`, the library's
entry, picks the kind from its arguments: the one line a new kind adds (or a flag of
its own in _cli.py, as --ray has).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .._exceptions import ConfigError
from ..engine.limits import Limits
from ..engine.pool import GRACE_S
from ..engine.progress import Progress
from ..engine.run import RunOptions
from ..engine.summary import Summary
from ..policy.concurrency import InFlightControl
from ..policy.rate import Limiter
from ..spec.parse import JobSpec, load_spec
from .base import Backend
from .layout import Shard
from .local import LocalBackend
from .shards import ShardBackend

if TYPE_CHECKING:
    import httpx

__all__ = ["Backend", "LocalBackend", "ShardBackend", "run_job"]


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
    rate_limiter: Limiter | None = None,
    concurrency_control: InFlightControl | None = None,
    grace_s: float = GRACE_S,
    submit: bool = False,
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

    A spec with `batch_api:` sends the rows through the provider's batch API (see
    `backends.batch`); `submit` then returns once they are sent, the Summary counting
    them `in_batches` (exit 0), and a later call without it collects them.
    """
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    options = RunOptions(limit=limit, restart=restart, retry_failed=retry_failed, max_failed_share=max_failed_share,
                         progress=progress, transport=transport, environ=environ, handle_signals=handle_signals,
                         grace_s=grace_s)
    limits = Limits(rate_limiter, concurrency_control)
    if spec.batch_api is not None:
        if shard is not None:
            raise ConfigError(f"{spec.name}: batch_api and --shard do not go together: a provider's batch API "
                              "takes the whole job at once; drop one of them")
        from .batch.backend import BatchBackend  # its HTTP client (httpx) loads only for a batch job

        backend: Backend = BatchBackend(limits, wait=not submit)
    else:
        backend = LocalBackend(limits) if shard is None else ShardBackend(shard, merge=merge, limits=limits)
    return backend.run(spec, options)
