"""How many requests may be in flight: found from the server's push-back, not told.

Servers limit requests in flight as well as requests per minute, and answer the one
too many with a 429. `ConcurrencyLimit` gates every request (`enter` before it is
sent, `leave` with its answer) and moves its limit, between 1 and the spec's
`concurrency`, as the answers say:

- **Decrease to what the server admitted.** Each request remembers how many others
  were in flight when it left (`k`). A 429 (or a 503 that names a wait) for a request
  sent with `k` others, when no request answered well lately went with as many, says
  the server holds at most `k`: the limit drops to one more than the most that were
  answered well beside each other lately. A 429 at a `k` that recently went through is
  not about concurrency (a rate limit, a stray): the rate policy (`_rate`) has it.
- **Increase while answers come back clean**, only while the limit is what holds
  requests back: one step per round trip up to just below the level that failed, then
  a probe of that level after a clean spell that doubles with each failed probe
  (1 s, 2 s, ... 64 s), so a server that holds 2 sees a few probes, not one per second.
  A probe that holds for its spell forgets the failure.

Pure bookkeeping over a clock the caller passes, but `enter`, which waits (anyio).
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["ConcurrencyLimit"]

EPOCH_S = 5.0  # "lately": successes are remembered for one to two of these
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 64.0


class ConcurrencyLimit:
    """The job's gate on requests in flight; `limit` adapts unless `fixed`."""

    def __init__(self, maximum: int, *, fixed: bool = False) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.fixed = fixed
        self.in_flight = 0
        self.cuts = 0  # times the limit was lowered
        self._waiters: deque[list] = deque()  # [event, k] of requests waiting for a slot
        self._ok_k = [-1, -1]  # the most others in flight beside a good answer: this epoch, the last
        self._epoch = 0.0
        self._failed_at: int | None = None  # in-flight count that drew the last push-back
        self._probe_s = PROBE_FIRST_S
        self._changed = 0.0  # when the limit last moved
        self._credit = 0.0  # fractional steps of the per-round-trip increase
        self._generation = 0  # counts the limit's changes

    async def enter(self) -> tuple[int, int]:
        """Wait for a slot; return how many other requests are in flight (`k`) and the
        limit's generation, both for `leave`."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return self.in_flight - 1, self._generation
        waiter = [anyio.Event(), 0]
        self._waiters.append(waiter)
        try:
            await waiter[0].wait()
        except BaseException:
            if waiter[0].is_set():  # given a slot, then cancelled: pass it on
                self._release()
            else:
                self._waiters.remove(waiter)
            raise
        return waiter[1], self._generation

    def leave(self, sent: tuple[int, int], outcome: str | None, now: float) -> None:
        """A request `enter` let go is answered: `ok`, `pushback` (a 429, a 503 naming a
        wait), or None (anything else, which says nothing about load)."""
        self._release()
        if self.fixed or outcome is None:
            return
        k, generation = sent
        if now - self._epoch >= EPOCH_S:
            self._ok_k = [-1, self._ok_k[0]] if now - self._epoch < 2 * EPOCH_S else [-1, -1]
            self._epoch = now
        if outcome == "ok":
            if k > self._ok_k[0]:
                self._ok_k[0] = k
            self._grow(k, now)
        elif outcome == "pushback" and generation == self._generation:
            # (a request sent under an earlier limit says nothing about this one)
            admitted = max(self._ok_k)
            if k >= admitted:  # no good answer lately went with as many in flight: the server is full
                if self._failed_at is not None and self.limit >= self._failed_at:
                    self._probe_s = min(PROBE_MAX_S, self._probe_s * 2)  # a probe failed: wait longer next time
                self._set(max(1, min(self.limit, admitted + 1)), now)
                self._failed_at = k + 1
                self.cuts += 1

    def _grow(self, k: int, now: float) -> None:
        if k + 1 < self.limit or self.limit >= self.maximum:
            return  # the limit held nothing back: no evidence that more would go through
        if self._failed_at is None or self.limit + 1 < self._failed_at:
            self._credit += 1 / self.limit  # a step per round trip of the whole limit
            if self._credit >= 1:
                self._set(self.limit + 1, now)
        elif now - self._changed >= self._probe_s:
            if self.limit >= self._failed_at:  # the level that failed has held for a spell
                self._failed_at, self._probe_s = None, PROBE_FIRST_S
            else:
                self._set(self.limit + 1, now)  # probe the level that failed

    def _set(self, limit: int, now: float) -> None:
        self.limit, self._changed, self._credit = min(limit, self.maximum), now, 0.0
        self._generation += 1
        self._wake()

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            waiter[1] = self.in_flight
            self.in_flight += 1
            waiter[0].set()
