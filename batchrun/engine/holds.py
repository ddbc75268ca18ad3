"""The budget at the moment of a call: hold a request's worst case, charge what it cost.

A request goes only once its worst case fits the budget beside every request in
flight (`Holds.hold`), and its hold is recorded in the state before it goes (the
`HoldLog`: the run's writer), so a kill -9 leaves it counted as spent. Its answer
is charged at its model's price, one without usage at its worst case (never free),
and the hold is let go as the answer is saved (`Holds.charge`).

The arithmetic is `policy.pricing`'s (pure values); this module keeps the holds of
one process's requests and the waiting for the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from .._exceptions import BudgetReached
from ..endpoints.result import Result
from ..policy.pricing import Budget, Hold, Price, completion_bound, cost
from ..policy.pricing import usd as format_usd
from ..spec.model import JobSpec
from ..storage.state import Spend

__all__ = ["Crowded", "HoldLog", "Holds", "Worst", "job_budget", "metered"]

USAGE = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


class Crowded(Exception):
    """The budget does not hold another attempt beside the requests in flight now (see
    `Holds.unanswered`); it may later."""


class HoldLog(Protocol):
    """Where the budget's holds are kept durably (the run's writer, in the state)."""

    async def record(self, hold: Hold, kept: bool = False) -> None:
        """Return once `hold` is in the state: only then may its request go. `kept`: an
        attempt that may have been paid for, with no answer: it stays there."""

    def release(self, hold: Hold) -> None:
        """`hold` ended without an answer to save (set aside, or refused as a whole)."""


def metered(answer: Result, generates: bool) -> bool:
    """Whether the answer's usage says what it cost: its prompt tokens, and (`generates`)
    its completion tokens. One that leaves either out is charged at its worst case: a
    completion it does not count is no free one."""
    return answer.prompt_tokens is not None and (answer.completion_tokens is not None or not generates)


def job_budget(spec: JobSpec, spend: Spend) -> Budget | None:
    """The job's budget (None without one), with what its earlier runs spent: the answers,
    the holds a kill left unsettled, and every provider batch out, at their worst case."""
    if not spec.budget.is_set:
        return None
    return Budget(spec.budget.max_usd, spec.budget.max_tokens, spent_usd=spend.usd, spent_tokens=spend.tokens,
                  next_hold=spend.next_hold)


@dataclass(frozen=True, slots=True)
class Worst:
    """The most one answer can cost: None where it has no bound (no price; no max_tokens)."""

    usd: float | None
    tokens: int | None


class Holds:
    """One process's holds on the job's `budget` (None: no budget), recorded in `log`."""

    def __init__(self, spec: JobSpec, budget: Budget | None, log: HoldLog | None) -> None:
        self.spec = spec
        self.budget = budget
        self.log = log
        self.closing = False
        self._settled: anyio.Event | None = None  # set when a hold is let go; made by the first waiter

    def worst(self, price: Price | None, body: Mapping[str, Any], payload_bytes: int, *,
              generates: bool = True) -> Worst | None:
        """The most one answer to this request can cost, where a budget or a price asks.

        The worst case of the prompt is the request's size in bytes (no tokenizer makes
        more tokens than bytes, and the JSON around the text covers a chat template's
        own tokens); of the completion, max_tokens (or the spec's bound) times n, and
        none for an endpoint that `generates` nothing (embeddings).
        """
        if self.budget is None and price is None:
            return None
        completion = completion_bound(body, self.spec.budget.assume_max_tokens) if generates else 0
        known = completion is not None
        completion = completion or 0
        usd = price.worst(payload_bytes, completion) if price is not None and known else None
        return Worst(usd, payload_bytes + completion if known else None)

    async def hold(self, worst: Worst | None, times: int) -> Hold | None:
        """Hold `times` answers' worst case against the budget, recorded in the state
        before the request goes. While it does not fit beside the requests in flight,
        wait for them to settle; raise BudgetReached once it would not fit even alone."""
        if self.budget is None or worst is None:
            return None
        usd, tokens = (worst.usd or 0.0) * times, (worst.tokens or 0) * times
        while (hold := self.budget.reserve(usd, tokens)) is None:
            if self.closing or not self.budget.fits(usd, tokens, alone=True):
                raise self.reached(usd, tokens)
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()  # a request in flight settled: the budget may allow this one now
        if self.log is not None:
            await self.log.record(hold)
        return hold

    async def unanswered(self, hold: Hold | None, worst: Worst | None, times: int, *, again: bool,
                         paid: bool = False) -> Hold | None:
        """An attempt under `hold` may have been paid for and left no answer (a 2xx that
        could not be read, a timeout): its worst case is spent, kept in the state as a
        kill's unsettled holds are, before anything else goes. Returns the hold the row
        goes on with.

        With `again`, another attempt follows: `hold` is let go and `times` answers held
        anew, as for a new request (waiting for room; BudgetReached when none is left).
        But once answers were `paid` under it (a re-ask's attempt was lost), `hold` stays
        to cover them, and another attempt goes only if the budget holds it beside those
        in flight now: Crowded if not (waiting while holding, such rows could wait for
        each other for good)."""
        if hold is None or worst is None or self.budget is None:
            return hold
        spent = self.budget.spent_unanswered(worst.usd or 0.0, worst.tokens or 0)
        if self.log is not None:
            await self.log.record(spent, kept=True)  # (never released: it stays counted)
        if not again:
            return hold
        if paid:
            if self.budget.fits(0.0, 0):
                return hold
            if self.closing or not self.budget.fits(hold.usd, hold.tokens, alone=True):
                raise self.reached(hold.usd, hold.tokens)
            raise Crowded()
        self.let_go(hold)
        return await self.hold(worst, times)

    def reached(self, usd: float, tokens: int) -> BudgetReached:
        """The stop of a job whose next request, of this worst case, the budget cannot hold."""
        assert self.budget is not None
        most = f"{format_usd(usd)} ({tokens:,} tokens)" if self.budget.max_usd is not None else f"{tokens:,} tokens"
        return BudgetReached(f"the budget is reached: {self.budget.describe()}, and the next request could cost up "
                             f"to {most}. The requests in flight finish and every answer is saved; raise the budget "
                             f"in {self.spec.name} and rerun to go on (the spend so far is remembered)")

    def let_go(self, hold: Hold | None, spent_usd: float = 0.0, spent_tokens: int = 0, *,
               saved: bool = False) -> None:
        """A held request ended; `saved`: its hold goes from the state with its answer.
        (Without a hold, what it spent still counts: re-asks whose hold was let go for a
        lost attempt the budget could not hold again, see `unanswered`.)"""
        if self.budget is None:
            return
        self.budget.settle(hold, spent_usd, spent_tokens)
        if hold is None:
            return
        if not saved:
            self.forget(hold)
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def forget(self, hold: Hold | None) -> None:
        """A hold whose request is saved nowhere (nothing was paid) leaves the state."""
        if hold is not None and self.log is not None:
            self.log.release(hold)

    def stop(self) -> None:
        """The job is stopping: requests waiting for the budget give up rather than go."""
        self.closing = True
        if self._settled is not None:
            self._settled.set()

    def charge(self, result: Result, paid: list[Result], price: Price | None, worst: Worst | None,
               hold: Hold | None, *, generates: bool = True) -> None:
        """The row's cost: every answer paid for at its model's price, one without usage
        (or without its completion count, where the endpoint `generates`) at its worst
        case (never free); the budget lets go of the hold."""
        if price is None and worst is None and hold is None:  # no budget, no price: the usual row
            _add_usage(result, paid)
            return
        usd: float | None = None
        tokens = unmetered = unmetered_tokens = 0
        for answer in paid:
            if not metered(answer, generates):
                if worst is None:  # no price and no budget: nothing is charged, nothing to say
                    continue
                unmetered += 1
                unmetered_tokens += worst.tokens or 0
                one = worst.usd
            else:
                tokens += answer.total_tokens or (answer.prompt_tokens or 0) + (answer.completion_tokens or 0)
                one = cost(price, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)
            if one is not None:
                usd = (usd or 0.0) + one
        _add_usage(result, paid)
        if price is not None:
            result.cost_usd = usd
        if unmetered:
            result.extra = {**(result.extra or {}), "unmetered": unmetered, "unmetered_tokens": unmetered_tokens}
        if hold is not None:
            result.hold = hold.id
        self.let_go(hold, usd or 0.0, tokens + unmetered_tokens, saved=True)

    @staticmethod
    def split_cost(results: list[Result], answer: Result, weights: list[int], *, paid: bool) -> None:
        """One request answered several rows (see `engine.call`): where its rows cannot each be
        priced by their part of its usage (it failed, or reported none), its cost is split
        among them in proportion to `weights`."""
        unmetered = answer.extra.get("unmetered_tokens", 0) if answer.extra else 0
        if not paid or results[0].status == "ok" and not unmetered:
            return
        whole = sum(weights)
        for result, weight in zip(results, weights):
            part = weight / whole if whole else 1 / len(results)
            result.cost_usd = answer.cost_usd * part if answer.cost_usd is not None else None
            if unmetered:
                result.extra = {"unmetered": 1, "unmetered_tokens": round(unmetered * part)}


def _add_usage(result: Result, paid: list[Result]) -> None:
    """`result`'s usage becomes the sum over every answer paid for (where any reported it)."""
    if not paid or len(paid) == 1 and paid[0] is result:
        return
    for name in USAGE:
        values = [getattr(r, name) for r in paid if getattr(r, name) is not None]
        setattr(result, name, sum(values) if values else None)
