"""One job-wide rate limit and limit on requests in flight, shared by many processes,
spent in small leases.

A `Quota` (one per job: `actor.QuotaActor` keeps it in a named Ray actor) holds the
job's schedule: a `RateLimiter` booking send slots at the spec's requests/min and tokens/min, and
adapting to what every worker saw of the server, so one worker's 429s slow them all;
and the job's `Control` of requests in flight (see `policy.concurrency`), fed by every
worker's answers, so the server's limit found by one worker holds them all.
Each worker's `LeasedLimiter` stands in for the Client's own RateLimiter: it hands
out slots it leased a few at a time, so no request waits on the Quota; its
`LeasedControl` stands in for the Client's own Control: it lets the worker's gate
hold as many requests in flight as the Quota allots it.

    request ── reserve() ──▶ the next slot of the worker's lease (no call out)
            ── gate ──▶ in flight, while fewer than the worker's allotment
    answer  ── observe(), correct_tokens(), answered() ──▶ queued
    a few times a second, off the event loop:
        Report (observations, token corrections, slots borrowed or given back, want;
                answers, requests in flight and waiting)
            ──▶ Quota.exchange ──▶ Grant (slots, as seconds from now; the job's rate;
                                          the worker's allotment of requests in flight)

A lease is a quarter second's worth of the job's rate divided among the workers (at
least one slot): the workers' slots interleave, and the schedule runs about half a
second ahead of the clock. A worker out of slots waits for the lease on its way (a
few milliseconds; at most LATE_S); one that cannot reach the Quota (being made again,
say) goes on alone at its slice of the last rate it was told, and its next report books
those slots as debt. A worker that stops gives back the slots it did not use.

The job's first request goes alone (as one process's does). Then its limit on
requests in flight is allotted by demand (what a worker has in flight and waiting):
evenly, but no more to one than it wants while others want more; what none wants,
evenly; the odd ones in turn. A worker not heard from yet
keeps its allotment for the Quota's first EXPECT_S. A worker's allotment is changed only
in its own exchange, and what it gives up goes to the others only once it reports
that fewer are in flight: the job holds no more than its limit (but for a moment
while a Quota made again learns what the workers hold).

Pure bookkeeping over a clock the caller passes; `actor.py` and `worker.py` supply the
actor and the thread that carries reports.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, ClassVar

from ...policy.concurrency import Control, answered_lately
from ...policy.rate import RateLimiter, Usage
from ...policy.verdict import Verdict
from ..layout import slice_of

__all__ = ["Grant", "LeasedControl", "LeasedLimiter", "Quota", "Report"]

LEASE_S = 0.25  # a lease is this much of the job's rate, divided among the workers
HORIZON_S = 1.0  # no lease reaches further ahead than this (but one slot, when the schedule is)
REFRESH_S = 0.1  # how often a worker reports at least (a limit may have appeared)
STALE_S = 0.1  # a slot this far past, unused, is dropped: sending on it now would make a burst
LATE_S = 0.25  # how long a worker out of slots waits for its lease before it goes on alone
MAX_OBSERVED = 10_000  # observations (and answers) kept while the Quota cannot be reached
TURN_S = 5.0  # an allotment the workers cannot split evenly goes round this often
GONE_S = 3.0  # a worker not heard from for this long holds nothing (its process is gone)
EXPECT_S = 10.0  # for this long, a Quota keeps their allotment for the workers not heard from yet
WINDOW_S = 2.0  # answers are weighed within this (a worker's report may be late), and kept as long


@dataclass
class Report:
    """What a worker tells the Quota: what it saw and spent since its last report."""

    want: bool = False  # another lease, please
    tokens_each: int = 0  # tokens to book with each slot: the worker's recent estimate per request
    observations: list[tuple[float, Verdict]] = field(default_factory=list)  # (ago, an answer's verdict)
    tokens: int = 0  # token corrections (real usage against estimates)
    usage: Usage = field(default_factory=Usage)  # the answers' usage, summed: what token budgets come to
    borrowed: list[tuple[float, int]] = field(default_factory=list)  # (seconds ago, tokens) of slots taken alone
    unused: tuple[int, int] = (0, 0)  # slots (and their tokens) given back by a worker that stopped
    worker: int = 0  # which worker (its shard's index)
    final: bool = False  # the worker stops: it holds nothing from now on
    # Requests in flight: the worker's, those waiting for a slot, and its allotment as it reported
    in_flight: int = 0
    waiting: int = 0
    allotment: int = 0
    # Each request answered: (seconds ago it was sent, seconds ago it came back, k, held,
    # generation, outcome, wait), as its gate saw them (see Control.answered: k and held
    # count the worker's own requests); and when those still in flight were sent
    answers: list[tuple[float, float, int, int, int, str | None, float | None]] = field(default_factory=list)
    open: list[float] = field(default_factory=list)
    stated: int | None = None  # a limit on requests in flight the server stated


@dataclass(frozen=True)
class Grant:
    """The Quota's answer. `slots`: seconds from now of each leased slot, or None while
    nothing limits the job; `rate` and `tokens_per_s`: the job's, for a worker that must
    go on alone; `chunk`: a lease's size, the worker asks again when fewer are left.
    `allotment`: how many requests the worker may have in flight, `cautious` of them for
    rows that met a 429; `generation` and `limit`: the job's Control's; `admitting`: the
    server answered some worker well lately; `weighed_s`: the answers the Control has
    weighed are those until this many seconds ago."""

    slots: tuple[float, ...] | None
    tokens_each: int = 0
    rate: float | None = None
    tokens_per_s: float | None = None
    chunk: int = 1
    allotment: int = 0
    cautious: int = 0
    generation: int = 0
    limit: int = 0
    admitting: bool = False
    weighed_s: float = 0.0


@dataclass
class _Holder:
    """What the Quota knows of one worker's requests in flight."""

    seen: float
    in_flight: int = 0
    demand: int = 0  # in flight and waiting
    bound: int = 0  # the most it may have in flight until its next report


class _Timeline:
    """When one worker's requests were in flight, as of its last report: those answered
    lately, and those still out. `count(t)`: how many were in flight at `t`."""

    def __init__(self) -> None:
        self.until = float("-inf")  # its requests sent before this are all known
        self.final = False  # it sends no more
        self.closed: list[tuple[float, float]] = []  # (sent, answered)
        self._sent: list[float] = []
        self._answered: list[float] = []

    def update(self, closed: list[tuple[float, float]], open_: list[float], until: float, *, final: bool) -> None:
        self.closed = [c for c in self.closed if c[1] >= until - WINDOW_S] + closed
        self._sent = sorted([sent for sent, _ in self.closed] + open_)
        self._answered = sorted(answered for _, answered in self.closed)  # the open ones: not yet
        self.until, self.final = until, final

    def count(self, t: float) -> int:
        return bisect.bisect_right(self._sent, t) - bisect.bisect_right(self._answered, t)


class Quota:
    """The job's schedule and adaptive state: one for all the workers."""

    def __init__(self, *, requests_per_minute: float | None, tokens_per_minute: float | None, workers: int,
                 concurrency: int, now: float, pause_s: float = 0.0) -> None:
        self.limiter = RateLimiter(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
        self.control = Control(concurrency)
        self.workers = workers
        self.holders: dict[int, _Holder] = {}
        self.timelines: dict[int, _Timeline] = {}
        self._known = now  # the answers until this are weighed
        self._last_ok = float("-inf")  # when a worker was last answered well, as soon as it reports it
        self._pending: list[tuple[float, float, int, int, int, str, float | None, int]] = []  # answers to weigh
        self.finished: set[int] = set()
        self.heard = False  # some worker's request has come back (answered, or failed)
        # The workers start one by one (or, with a Quota made again, hold requests it
        # cannot see): the first to ask does not get the job's whole limit
        self.expect_until = now + EXPECT_S
        # A Quota made again after the last one was lost cannot see the slots it leased:
        # it books none before they have run out.
        self.resume_at = now + pause_s

    def exchange(self, report: Report, now: float) -> Grant:
        allotment, cautious = self._in_flight(report, now)
        control = self.control
        limiter = self.limiter
        for ago, verdict in report.observations:  # (a worker's, some 0.1 s apart, barely out of order)
            limiter.observe(verdict, now - ago)  # as the worker judged it: nothing is read again
            if verdict.ok:
                self._last_ok = max(self._last_ok, now - ago)
        limiter.correct_tokens(report.tokens)
        limiter.used(report.usage)
        for ago, tokens in report.borrowed:  # booked as of when they were spent
            limiter.reserve(tokens, now - ago)
        limiter.release(*report.unused, now)
        lease = {"allotment": allotment, "cautious": cautious, "generation": control.generation,
                 "limit": control.limit, "admitting": answered_lately(self._last_ok, now), "weighed_s": now - self._known}
        if limiter.rate is None and limiter.tokens_per_s is None:
            return Grant(None, **lease)
        tokens_each = max(1, report.tokens_each)
        chunk = self._chunk(tokens_each)
        slots: list[float] = []
        if report.want:
            at = max(now, self.resume_at)
            while len(slots) < chunk:
                slots.append(at - now + limiter.reserve(tokens_each, at))
                if slots[-1] > HORIZON_S:
                    break
        return Grant(tuple(slots), tokens_each, limiter.rate, limiter.tokens_per_s, chunk, **lease)

    def _in_flight(self, report: Report, now: float) -> tuple[int, int]:
        """Learn from the worker's answers; return its allotment (and its cautious part)."""
        holders, control = self.holders, self.control
        for index in [i for i, h in holders.items() if now - h.seen > GONE_S or i == report.worker]:
            del holders[index]
        self._learn(report, now)
        self.heard = self.heard or bool(report.answers) or report.final
        if report.stated:
            control.stated(report.stated)
        if report.final:
            self.finished.add(report.worker)
            return 0, 0
        me = holders[report.worker] = _Holder(now, report.in_flight, report.in_flight + report.waiting)
        if not self.heard:
            # The job's first request goes alone, as one process's does: a wrong key costs
            # one request, and a limit the server states is known before the others go
            first = 0 if any(h.bound for h in holders.values() if h is not me) else min(1, me.demand)
            me.bound = max(first, report.allotment, report.in_flight)
            return first, first
        demands = {i: h.demand for i, h in holders.items()}
        if now < self.expect_until:  # a worker not heard from yet will want its allotment
            demands.update((i, -(-control.limit // self.workers)) for i in range(self.workers)
                           if i not in holders and i not in self.finished)
        allotted = _allot(control.limit, demands, now)
        held = sum(holders[i].bound if i in holders else allotted[i] for i in demands if i != report.worker)
        # Its fair allotment, of what the others do not hold
        allotment = min(allotted[report.worker], max(0, control.limit - held))
        cautious = min(allotment, _allot(control.ceiling(True), demands, now)[report.worker])
        # Until its next report the worker may hold what it was allotted before (it may have
        # sent more since this report), or what it still has in flight
        me.bound = max(allotment, report.allotment, report.in_flight)
        return allotment, cautious

    def _learn(self, report: Report, now: float) -> None:
        """The job's Control hears of each answer once every worker has said what it had in
        flight by then (each reports every REFRESH_S): k and held count every worker's
        requests, as exactly as one process counts its own."""
        timelines = self.timelines
        timeline = timelines.setdefault(report.worker, _Timeline())
        closed = [(now - sent, now - answered) for sent, answered, *_ in report.answers]
        timeline.update(closed, [now - sent for sent in report.open], now, final=report.final)
        self._pending += [(now - answered, now - sent, k, held, generation, outcome, wait, report.worker)
                          for sent, answered, k, held, generation, outcome, wait in report.answers
                          if outcome is not None]
        for index in [i for i, t in timelines.items() if t.until < now - (WINDOW_S if t.final else GONE_S)]:
            del timelines[index]
        # Answers up to `known` can be weighed: every worker has reported since (or they are old)
        live = [t.until for t in timelines.values() if not t.final]
        known = self._known = max(min(live), now - WINDOW_S) if live else now
        # By the time each came back alone: the rest of an entry may not compare (a wait
        # of None beside a number), and one bad sort would stop every exchange to come
        self._pending.sort(key=itemgetter(0))
        ready = bisect.bisect_right(self._pending, known, key=itemgetter(0))
        for answered, sent, k, held, generation, outcome, wait, worker in self._pending[:ready]:
            others_sent = others_answered = 0
            for index, other in timelines.items():
                if index != worker:
                    others_sent += other.count(sent)
                    others_answered += other.count(answered)
            k += others_sent
            self.control.answered(k, min(k, held + others_answered), generation, outcome, answered, wait)
        del self._pending[:ready]

    def _chunk(self, tokens_each: int) -> int:
        limiter = self.limiter
        interval = max(1 / limiter.rate if limiter.rate else 0.0,
                       tokens_each / limiter.tokens_per_s if limiter.tokens_per_s else 0.0)
        return max(1, math.ceil(LEASE_S / interval / self.workers))


def _allot(total: int, demands: Mapping[int, int], now: float) -> dict[int, int]:
    """`total` allotted by demand (requests in flight and waiting): evenly, but no more
    to a worker than it wants while others want more; what none wants, evenly (room
    for the next burst). The odd ones go round every TURN_S."""
    order = sorted(demands)
    if order:
        turn = int(now / TURN_S) % len(order)
        order = order[turn:] + order[:turn]
    allotted = dict.fromkeys(order, 0)
    wanting, left = [i for i in order if demands[i] > 0], total
    while left > 0 and wanting:
        each, odd = divmod(left, len(wanting))
        for place, index in enumerate(wanting):
            given = min(demands[index] - allotted[index], each + (place < odd))
            allotted[index] += given
            left -= given
        wanting = [i for i in wanting if allotted[i] < demands[i]]
    if left > 0 and order:
        each, odd = divmod(left, len(order))
        for place, index in enumerate(order):
            allotted[index] += each + (place < odd)
    return allotted


class LeasedLimiter:
    """A worker's RateLimiter (see `Client.limiter`): slots from leases of the Quota.

    `reserve`, `observe` and `correct_tokens` run in the worker's event loop and do not
    wait, but `reserve` out of slots for the lease on its way (a few milliseconds; at the
    start, mostly); `report` and `receive` run in the thread that talks to the Quota.
    """

    def __init__(self, *, requests_per_minute: float | None, tokens_per_minute: float | None, workers: int,
                 tokens_each: int, concurrency: int, worker: int = 0) -> None:
        self.tokens_per_s = tokens_per_minute / 60 if tokens_per_minute else None  # the Client reads it
        self.rate = requests_per_minute / 60 if requests_per_minute else None  # the job's, last told
        self.workers = workers
        self.unlimited = self.rate is None and self.tokens_per_s is None
        self.due = threading.Event()  # set when a report should go now: slots low, a push-back
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a grant, or a report that did not go
        self._answering = False  # the Quota answered the last report, and in time
        self._slots: deque[tuple[float, int]] = deque()  # (when, tokens booked with it)
        self._chunk = 1
        self._tokens_each = float(tokens_each)
        self._observations: deque[tuple[float, Verdict]] = deque(maxlen=MAX_OBSERVED)  # (when, verdict)
        self._tokens = 0
        self._usage = Usage()  # the answers' usage since the last report, summed
        self.wants_usage = True  # the Quota follows the token budgets the server states
        self.held_until = 0.0  # (the Quota's holds reach the workers in their leases' slots)
        self._borrowed: list[tuple[float, int]] = []  # (when, tokens)
        self._alone_request = self._alone_tokens = 0.0  # the schedule of slots taken without a lease
        self.worker = worker
        self.control = LeasedControl(concurrency, workers, worker, self._lock, self.due)

    # -- in the event loop -------------------------------------------------------------

    def reserve(self, tokens: int, now: float) -> float:
        """The next slot for a request of about `tokens` tokens; return the wait."""
        with self._lock:
            self._tokens_each += (tokens - self._tokens_each) / 16
            if self.unlimited:
                return 0.0
            while self._slots and self._slots[0][0] < now - STALE_S:
                self._slots.popleft()
            if len(self._slots) <= self._chunk:
                self.due.set()
            if not self._slots and self._answering:
                # Out of slots (at the start, the first lease went stale while the job got
                # ready): the next lease is a moment away, so wait for it rather than go on
                # alone beside the others' leases. Not twice if it is late.
                self._answering = self._arrived.wait_for(lambda: self._slots or not self._answering, LATE_S)
                while self._slots and self._slots[0][0] < now - STALE_S:
                    self._slots.popleft()
            if self._slots:
                at, booked = self._slots.popleft()
                if self.tokens_per_s:
                    self._tokens += tokens - booked
                return max(0.0, at - now)
            # No lease yet: alone, at this worker's slice of the job's rate, booked later
            start = now
            if self.rate:
                start = self._alone_request = max(start, self._alone_request)
                self._alone_request += self.workers / self.rate
            if self.tokens_per_s:
                start = max(start, self._alone_tokens)
                self._alone_tokens = start + tokens * self.workers / self.tokens_per_s
            self._borrowed.append((start, tokens))
            return start - now

    def observe(self, answer: Verdict, now: float) -> None:
        # What the Quota learns from: the verdict, as the client judged it
        with self._lock:
            self._observations.append((now, answer))
        if answer.pushed_back:
            self.due.set()  # the other workers should slow down now, not at the next report

    def correct_tokens(self, difference: int) -> None:
        if self.tokens_per_s is not None:
            with self._lock:
                self._tokens += difference

    def used(self, usage: Usage) -> None:
        with self._lock:
            self._usage = self._usage.plus(usage)

    # -- in the thread that talks to the Quota -------------------------------------------

    def report(self, now: float, *, final: bool = False) -> Report:
        """What to send now; taken out of the limiter (see `returned` if it is not delivered).
        `final`: the worker stops, and gives back the slots it holds."""
        with self._lock:
            unused = (0, 0)
            if final:
                left = [tokens for at, tokens in self._slots if at >= now]
                unused = (len(left), sum(left))
                self._slots.clear()
            want = not final and not self.unlimited and len(self._slots) <= self._chunk and (
                not self._slots or self._slots[-1][0] - now < HORIZON_S)
            report = Report(want=want, tokens_each=round(self._tokens_each),
                            observations=[(now - at, verdict) for at, verdict in self._observations],
                            tokens=self._tokens, usage=self._usage,
                            borrowed=[(now - at, tokens) for at, tokens in self._borrowed],
                            unused=unused, worker=self.worker, final=final)
            self._observations.clear()
            self._tokens = 0
            self._usage = Usage()
            self._borrowed.clear()
            self.control.report(report, now)
            return report

    def returned(self, report: Report, made: float) -> None:
        """`report`, made at `made`, could not be delivered: what it carried goes into the next."""
        with self._lock:
            self._observations.extendleft((made - ago, verdict) for ago, verdict in reversed(report.observations))
            self._tokens += report.tokens
            self._usage = self._usage.plus(report.usage)
            self._borrowed[:0] = [(made - ago, tokens) for ago, tokens in report.borrowed]
            self.control.returned(report, made)
            self._answering = False
            self._arrived.notify_all()

    def receive(self, grant: Grant, now: float) -> None:
        with self._lock:
            self.unlimited = grant.slots is None
            self.rate, self.tokens_per_s = grant.rate, grant.tokens_per_s
            self._chunk = grant.chunk
            self._slots.extend((now + offset, grant.tokens_each) for offset in grant.slots or ())
            self.control.receive(grant, now)
            self._answering = True
            self._arrived.notify_all()

    def reporting_due(self, now: float, last: float) -> bool:
        """Whether to report now, the last report having gone at `last`."""
        return self.due.is_set() or now - last >= REFRESH_S


class LeasedControl:
    """A worker's Control (see `ConcurrencyLimit.control`): its gate's limit is the
    allotment the Quota granted; when each request went and came back goes to the
    Quota, whose Control decides.

    `entered`, `answered` and `stated` run in the worker's event loop; the rest, under
    the LeasedLimiter's lock, in the thread that talks to the Quota.
    """

    leased: ClassVar[bool] = True  # the limit moves in another thread: the gate's waiters look again
    fixed = False

    def __init__(self, maximum: int, workers: int, worker: int, lock: threading.Lock,
                 due: threading.Event) -> None:
        self.maximum = maximum
        self.workers = workers
        self.gate: Any = None  # the ConcurrencyLimit this is the control of: it attaches itself
        self._lock, self._due = lock, due
        # Before the first grant, and while the Quota cannot be reached: the worker's slice
        start, stop = slice_of(maximum, worker, workers)
        self.limit = self.alone = stop - start
        self.job_limit = maximum
        self._cautious: int | None = None
        self.generation = 0
        self._open: Counter[float] = Counter()  # when the requests in flight were sent
        self._answers: deque[tuple[float, float, int, int, int, str | None, float | None]] = deque(
            maxlen=MAX_OBSERVED)  # (sent, answered, k, held, generation, outcome, wait)
        self._stated: int | None = None
        self._last_ok = float("-inf")
        self._admitting = False  # as the Quota last said
        self._held_back = float("-inf")  # when it last held back for a push-back the Quota has not weighed

    def ceiling(self, cautious: bool) -> int:
        if cautious and self._cautious is not None:
            return min(self._cautious, self.limit)
        return self.limit

    def attach(self, gate: Any) -> None:
        self.gate = gate

    def entered(self) -> float:
        """A request goes: return when, for `answered`."""
        sent = time.monotonic()
        with self._lock:
            self._open[sent] += 1
        return sent

    def answered(self, k: int, held: int, generation: int, outcome: str | None, now: float,
                 wait: float | None = None, sent: float = 0.0) -> None:
        """As Control.answered, for every request (`outcome` None: neither ok nor a push-back;
        it held a slot all the same); `sent`: from `entered`."""
        if outcome == "ok":
            self._last_ok = now
        elif outcome == "pushback" and generation == self.generation and self.gate is not None:
            # The server is full (or it says so for another reason: the Quota will tell):
            # send no more than the others in flight now until the Quota answers, in a
            # moment, rather than meet a 429 with each row meanwhile
            self.limit = min(self.limit, self.gate.in_flight - 1)
            self._held_back = now
        if outcome == "pushback":
            self._due.set()  # the Quota weighs it for every worker: now
        with self._lock:
            self._open[sent] -= 1
            if not self._open[sent]:
                del self._open[sent]
            self._answers.append((sent, now, k, held, generation, outcome, wait))

    def admitting(self, now: float) -> bool:
        """The server answered this worker or another well lately: a 429 now says it is
        full (and the row waits aside), not closed."""
        return self._admitting or answered_lately(self._last_ok, now)

    def stated(self, limit: int) -> None:
        self._stated = limit

    # -- in the thread that talks to the Quota, under the lock -----------------------------

    def report(self, report: Report, now: float) -> None:
        gate = self.gate
        report.answers = [(now - sent, now - answered, *rest) for sent, answered, *rest in self._answers]
        self._answers.clear()
        report.open = [now - sent for sent in self._open.elements()]
        report.stated = self._stated
        report.allotment = self.limit
        if report.final:
            return
        if gate is None:  # not running yet (nothing sent): it will want its slice at once
            report.allotment, report.waiting = 0, self.alone
        else:
            report.in_flight, report.waiting = gate.in_flight, gate.waiting

    def returned(self, report: Report, made: float) -> None:
        self._answers.extendleft((made - sent, made - answered, *rest)
                                 for sent, answered, *rest in reversed(report.answers))
        # Alone: no less than its slice of the job's limit, as last told (and never nothing)
        self.limit = max(self.limit, self.job_limit // self.workers, 1)
        self._cautious, self._admitting = None, False

    def receive(self, grant: Grant, now: float) -> None:
        if grant.generation == self.generation and now - grant.weighed_s < self._held_back:
            # The Quota has not weighed the push-back yet: no more than it holds back to
            self.limit = min(self.limit, grant.allotment)
        else:
            self.limit = grant.allotment
        self._cautious = grant.cautious
        self.generation, self.job_limit, self._admitting = grant.generation, grant.limit, grant.admitting
