"""On the cluster: the Ray task that runs one shard of a job, and the thread that
carries its worker's reports to the job's quota actor and the grants back.

The task is batchrun's own shards backend (`ShardBackend`) for its shard, with its
slice of the spec's `concurrency` and budget, and the limits leased from the job's
quota (`LeasedLimiter`, `LeasedControl`) passed in as its `Limits`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..._exceptions import ConfigError
from ...engine.limits import Limits
from ...engine.run import RunOptions
from ...engine.summary import Summary
from ...policy.rate import estimate_tokens
from ...spec.parse import JobSpec
from ...storage.lock import lock_holder
from ...storage.state import state_path
from ..layout import Shard, shard_output, slice_of
from ..shards import ShardBackend
from .quota import REFRESH_S, LeasedLimiter

__all__ = ["CALL_TIMEOUT_S", "LOCK_WAIT_S", "run_shard", "shard_spec"]

LOCK_WAIT_S = 30.0  # for the processes of a killed attempt or driver to be gone
CALL_TIMEOUT_S = 5.0  # a call to the actor; past it, the worker goes on alone and tries again


def run_shard(spec: JobSpec, shard: Shard, actor: Any, forwarded: Mapping[str, str],
              options: Mapping[str, Any]) -> Summary:
    """A Ray task: one shard of the job, run by batchrun's own engine."""
    import ray

    limiter = LeasedLimiter(requests_per_minute=spec.rate_limit.requests_per_minute,
                            tokens_per_minute=spec.rate_limit.tokens_per_minute, workers=shard.count,
                            tokens_each=estimate_tokens({"prompt": "", **spec.params}),
                            concurrency=spec.concurrency, worker=shard.index)
    exchanger = Exchanger(limiter, actor)
    try:
        restart = options["restart"] is not None and ray.get(actor.claim.remote(options["restart"]),
                                                             timeout=LOCK_WAIT_S)
        backend = ShardBackend(shard, merge=None, limits=Limits(limiter, limiter.control))
        run = RunOptions(environ={**os.environ, **forwarded}, restart=restart, retry_failed=options["retry_failed"],
                         max_failed_share=options["max_failed_share"])
        state = state_path(shard_output(spec.output, shard))
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return backend.run(shard_spec(spec, shard), run)
            except ConfigError:
                # The attempt this one replaces may hold the lock a moment longer (its
                # process being killed): wait for it, rather than fail the shard.
                if lock_holder(state) is None or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)
    finally:
        exchanger.close()


def shard_spec(spec: JobSpec, shard: Shard) -> JobSpec:
    """The shard's slice of what the spec allows the job: requests in flight (the most it
    may have; the limiter actor allots fewer while the server is full), and budget."""
    index, count = shard.index, shard.count
    start, stop = slice_of(spec.concurrency, index, count)
    budget = spec.budget
    if budget.is_set:
        budget = dataclasses.replace(
            budget, max_usd=budget.max_usd / count if budget.max_usd is not None else None,
            max_tokens=budget.max_tokens // count if budget.max_tokens is not None else None)
    return dataclasses.replace(spec, concurrency=stop - start, budget=budget)


class Exchanger:
    """Carries a worker's reports to the limiter actor and its grants back, in a thread:
    the event loop never waits on the actor. An actor that cannot be reached (lost, being
    made again) is tried again; meanwhile the worker goes on alone."""

    def __init__(self, limiter: LeasedLimiter, actor: Any) -> None:
        self.limiter, self.actor = limiter, actor
        self._stopping = threading.Event()
        self._send(final=False)  # the first lease, before the first request
        self._thread = threading.Thread(target=self._loop, name="batchrun-lease", daemon=True)
        self._thread.start()

    def _send(self, *, final: bool) -> bool:
        import ray

        made = time.monotonic()
        report = self.limiter.report(made, final=final)
        try:
            grant = ray.get(self.actor.exchange.remote(report), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayError:
            self.limiter.returned(report, made)
            return False
        self.limiter.receive(grant, time.monotonic())
        return True

    def _loop(self) -> None:
        last = float("-inf")
        while not self._stopping.is_set():
            self.limiter.due.wait(REFRESH_S)
            now = time.monotonic()
            if self._stopping.is_set() or not self.limiter.reporting_due(now, last):
                continue
            self.limiter.due.clear()
            last = now
            if not self._send(final=False):
                self._stopping.wait(REFRESH_S)

    def close(self) -> None:
        """Stop, and give back the slots not used (best effort: the actor may be gone)."""
        self._stopping.set()
        self.limiter.due.set()
        self._thread.join(timeout=CALL_TIMEOUT_S + 1)
        self._send(final=True)
