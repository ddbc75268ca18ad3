"""How many requests may be in flight: found from the server's push-back, not told.

Servers limit requests in flight as well as requests per minute, and answer the one
too many with a 429. `ConcurrencyLimit` gates every request (`enter` before it is
sent, `leave` with its answer) and moves its limit, between 1 and the spec's
`concurrency`, as the answers say:

- **Decrease to what the server admitted.** A good answer shows the server held it
  beside as many others as were in flight both when it left and when it came back
  (the fewer: a neighbour refused in a few milliseconds never held a slot). A 429 (or a
  503 that names a wait) for a request that left beside `k` others, when no good answer
  lately went with as many, says the server holds at most `k`: the limit drops to one
  more than the most answered well beside each other lately (at most `k`). A 429 at a
  level that recently went through is not about concurrency (a rate limit, a stray):
  the rate policy (`policy.rate`) has it.
- **Increase while answers come back clean**, only while the limit is what holds
  requests back: one step per round trip up to just below the level that failed, then
  a probe of that level after a clean spell that doubles with each failed probe
  (1 s, 2 s, ... 64 s), and is no shorter than the `retry-after` the failed probe cost
  its row: a server that holds 2 sees a few probes, not one per second.
  A probe that holds for its spell forgets the failure.
- **A request that met a 429 never probes.** Rows coming back from a server's
  `retry-after` (LiteLLM says 60 s for a slot that frees in milliseconds) go only below
  the level that failed: a probe they drew would cost them another whole wait.
- **A limit the server states is taken at its word**: LiteLLM's
  `x-ratelimit-api_key-limit-max_parallel_requests` on every answer (see `stated`).

`Control` makes the decisions; `ConcurrencyLimit` is a process's gate. In a Ray job the
decisions are the job's (`backends.ray.quota.Quota`, fed by every worker), and each worker's gate
runs below the allotment it is granted (`backends.ray.quota.LeasedControl`).

Bookkeeping over a clock the caller passes; only `enter` waits (anyio).
"""

from __future__ import annotations

import time
from collections import deque
from typing import ClassVar, Protocol

import anyio

__all__ = ["ConcurrencyLimit", "Control", "InFlightControl", "STATED_HEADER", "answered_lately"]

EPOCH_S = 5.0  # "lately": successes are remembered for one to two of these
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 64.0
STATED_HEADER = "x-ratelimit-api_key-limit-max_parallel_requests"  # LiteLLM's, per key
POLL_S = 0.02  # how often a waiter looks again at a limit moved by another thread
ASK_S = 0.1  # how long a leased control's owner takes to answer a worker's report, at most


def answered_lately(last_ok: float, now: float) -> bool:
    """The server's last good answer (at `last_ok`) came within EPOCH_S of `now`: a 429
    now says the server is full, not closed. The one reading of "lately" for a process's
    Control, a Ray worker's lease of the job's and the job's Quota."""
    return now - last_ok < EPOCH_S


class InFlightControl(Protocol):
    """What a `ConcurrencyLimit` asks of its control: a process's own `Control`, or a Ray
    worker's lease of the job's (`backends.ray.quota.LeasedControl`).

    `leased`: the limit moves in another thread (the worker's lease): the gate's waiters
    look again every POLL_S, it tells the control when each request went (`entered`,
    whose value `answered` gets back as `sent`) and reports every answer, and it hands
    itself to the control as its `gate` (the lease reads what is in flight and waiting).
    """

    leased: ClassVar[bool]
    limit: int
    maximum: int
    generation: int

    def ceiling(self, cautious: bool) -> int: ...
    def answered(self, k: int, held: int, generation: int, outcome: str | None, now: float,
                 wait: float | None = None, sent: float = 0.0) -> None: ...
    def admitting(self, now: float) -> bool: ...
    def stated(self, limit: int) -> None: ...
    def entered(self) -> float: ...
    def attach(self, gate: ConcurrencyLimit) -> None: ...


class Control:
    """The limit's decisions, from what answers said: for one process (inside its
    `ConcurrencyLimit`), or for a whole job (in `backends.ray.quota.Quota`, fed by every worker).

    `k`: how many other requests were in flight when a request left; `held`: how many
    of them were still in flight when it came back (the fewer of the two);
    `generation`: the limit's, when it left.
    """

    leased: ClassVar[bool] = False  # the decisions are made here, in the gate's thread

    def __init__(self, maximum: int, *, fixed: bool = False) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.fixed = fixed
        self.cuts = 0  # times the limit was lowered
        self.generation = 0  # counts the limit's changes
        self.failed_at: int | None = None  # in-flight count that drew the last push-back
        self._ok_k = [-1, -1]  # the most others in flight beside a good answer: this epoch, the last
        self._epoch = 0.0
        self._probe_s = PROBE_FIRST_S
        self._changed = 0.0  # when the limit last moved
        self._credit = 0.0  # fractional steps of the per-round-trip increase
        self._last_ok = float("-inf")  # when the server last answered well

    def answered(self, k: int, held: int, generation: int, outcome: str | None, now: float,
                 wait: float | None = None, sent: float = 0.0) -> None:
        """`outcome`: `ok`, or `pushback` (a 429, a 503 naming a wait: `wait`, its retry-after);
        `sent`: from `entered` (a leased control's)."""
        if outcome == "ok":
            self._last_ok = now
        if self.fixed:
            return
        if now - self._epoch >= EPOCH_S:
            self._ok_k = [-1, self._ok_k[0]] if now - self._epoch < 2 * EPOCH_S else [-1, -1]
            self._epoch = now
        if outcome == "ok":
            if held > self._ok_k[0]:
                self._ok_k[0] = held
            self._grow(k, now)
        elif outcome == "pushback" and generation == self.generation:
            # (a request sent under an earlier limit says nothing about this one)
            admitted = max(self._ok_k)
            if k >= admitted:  # no good answer lately went with as many in flight: the server is full
                if self.failed_at is not None and k + 1 >= self.failed_at:
                    # A probe failed: wait longer next time, and no less than the row it cost
                    # waits (probing more often than that costs more than it can find)
                    self._probe_s = min(PROBE_MAX_S, max(self._probe_s * 2, wait or 0.0))
                self.failed_at = k + 1
                self._set(max(1, min(self.limit, admitted + 1, k)), now)
                self.cuts += 1

    def admitting(self, now: float) -> bool:
        """The server answered well lately: a 429 now says it is full, not closed."""
        return answered_lately(self._last_ok, now)

    def entered(self) -> float:
        """(A leased control's: when a request went. A local one needs no note of it.)"""
        return 0.0

    def attach(self, gate: ConcurrencyLimit) -> None:
        """(A leased control's: the gate it reads. A local one is read by its gate only.)"""

    def stated(self, limit: int) -> None:
        """The server says how many it holds: never more, and no probing past it."""
        if 0 < limit < self.maximum and not self.fixed:
            self.maximum = limit
            if self.limit > limit:
                self._set(limit, self._changed)

    def ceiling(self, cautious: bool) -> int:
        """How many may be in flight for a request that `cautious`ly goes only below the
        level that failed (it met a 429 before), or for any other."""
        if cautious and self.failed_at is not None:
            return min(self.limit, max(1, self.failed_at - 1))  # one at a time, at the least
        return self.limit

    def _grow(self, k: int, now: float) -> None:
        if k + 1 < self.limit or self.limit >= self.maximum:
            return  # the limit held nothing back: no evidence that more would go through
        if self.failed_at is None or self.limit + 1 < self.failed_at:
            self._credit += 1 / self.limit  # a step per round trip of the whole limit
            if self._credit >= 1:
                self._set(self.limit + 1, now)
        elif now - self._changed >= self._probe_s:
            if self.limit >= self.failed_at:  # the level that failed has held for a spell
                self.failed_at, self._probe_s = None, PROBE_FIRST_S
            else:
                self._set(self.limit + 1, now)  # probe the level that failed

    def _set(self, limit: int, now: float) -> None:
        self.limit, self._changed, self._credit = min(limit, self.maximum), now, 0.0
        self.generation += 1


class ConcurrencyLimit:
    """A process's gate on requests in flight, below what its `control` allows: its own
    `Control` (the default), or a worker's lease of the job's (`backends.ray.quota.LeasedControl`),
    whose limit moves in another thread: then waiters look again every `POLL_S`."""

    def __init__(self, maximum: int, *, fixed: bool = False, control: InFlightControl | None = None) -> None:
        self.control: InFlightControl = Control(maximum, fixed=fixed) if control is None else control
        self.in_flight = 0
        self._waiters: deque[list] = deque()  # [event, cautious, (k, generation)] waiting for a slot
        self._leased = self.control.leased
        self._poll_s = None
        if self._leased:
            self._poll_s = POLL_S
            self.control.attach(self)

    @property
    def limit(self) -> int:
        return self.control.limit

    @property
    def maximum(self) -> int:
        return self.control.maximum

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self, *, cautious: bool = False) -> tuple:
        """Wait for a slot; return how many other requests are in flight (`k`) and the
        limit's generation, both for `leave` (with a leased control, when it went too).
        `cautious`: the request met a 429 before, and goes only below the level that failed."""
        if self.in_flight < self.control.ceiling(cautious) and not self._waiters:
            self.in_flight += 1
            if self._leased:
                return self.in_flight - 1, self.control.generation, self.control.entered()
            return self.in_flight - 1, self.control.generation
        waiter = [anyio.Event(), cautious, (0, 0)]
        self._waiters.append(waiter)
        self._wake()  # a slot may be free for it, though not for the waiter before it
        try:
            if self._poll_s is None:
                await waiter[0].wait()
            else:
                while not waiter[0].is_set():
                    with anyio.move_on_after(self._poll_s):
                        await waiter[0].wait()
                    self._wake()
        except BaseException:
            if waiter[0].is_set():  # given a slot, then cancelled: pass it on
                self.leave(waiter[2], None, time.monotonic())
            else:
                self._waiters.remove(waiter)
            raise
        return waiter[2]

    def leave(self, sent: tuple, outcome: str | None, now: float, wait: float | None = None) -> None:
        """A request `enter` let go is answered: `ok`, `pushback` (a 429, a 503 naming a
        wait: `wait`, its retry-after), or None (anything else, which says nothing about load)."""
        if self._leased:  # every request, before a waiter takes its slot: its worker holds back at once
            self.control.answered(sent[0], min(sent[0], self.in_flight - 1), sent[1], outcome, now, wait, sent[2])
            self._release()
            return
        self._release()
        if outcome is None:
            return
        k, generation = sent
        # beside it all along: those in flight at both ends, at most
        limit = self.control.limit
        self.control.answered(k, min(k, self.in_flight), generation, outcome, now, wait)
        if self.control.limit > limit:
            self._wake()

    async def admitting_lately(self) -> bool:
        """The server answered well lately (see `Control.admitting`), as far as anyone
        knows: a leased control's owner hears of every worker's answers, and is asked
        (a push-back has its worker report at once)."""
        if self.control.admitting(time.monotonic()):
            return True
        if self._leased:
            await anyio.sleep(ASK_S)
            return self.control.admitting(time.monotonic())
        return False

    def stated(self, limit: int) -> None:
        """The server says how many it holds (see `Control.stated`)."""
        self.control.stated(limit)

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiters, first come first served, each within its ceiling."""
        limit = self.control.limit
        if not self._waiters or self.in_flight >= limit:
            return
        for waiter in list(self._waiters):
            if self.in_flight >= limit:
                break
            if self.in_flight < self.control.ceiling(waiter[1]):
                self._waiters.remove(waiter)
                waiter[2] = (self.in_flight, self.control.generation)  # as of the hand-over
                if self._leased:
                    waiter[2] += (self.control.entered(),)
                self.in_flight += 1
                waiter[0].set()
