"""Prices, costs and the job's budget: pure values and arithmetic, no I/O, no clock.

    pricing:                      # USD per million tokens, per model (or a YAML file of this)
      accounts/fireworks/models/llama-v3p1-8b-instruct: {input: 0.20, cached_input: 0.10, output: 0.20}
      gpt-4o-mini: {input: 0.15, output: 0.60, batch: {input: 0.075, output: 0.30}}
    budget: {max_usd: 25.00, max_tokens: 5000000}

A row's cost is its usage at its model's prices: uncached prompt tokens at `input`,
cached ones at `cached_input` (else `input`), completion tokens at `output`. The
batch API's answers (`batch_api:`) cost the `batch:` prices, else half the live ones. The
budget is kept as the runner goes: a request starts only if the spend so far, plus
the worst case of every request in flight, plus its own worst case, stays within it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_TOKENS_KEYS", "Budget", "Hold", "Price", "completion_bound", "cost", "usd"]

PER_TOKEN = 1e-6  # prices are per million tokens
MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # chat, completions, responses


def completion_bound(body: Mapping[str, Any], default: int | None) -> int | None:
    """The most completion tokens a request can be billed: its max_tokens (else `default`) times n.
    Only a whole number bounds (200, or YAML's 200.0); a null asks for no bound at all."""
    most = default
    for key in MAX_TOKENS_KEYS:
        if (value := whole(body.get(key))) is not None:
            most = value
            break
    if most is None:
        return None
    # Answers generated: n (OpenAI's completions bill best_of of them); one that is no whole
    # number (4.0 is 4) bounds nothing, as a server may read "4" as 4
    times = 1
    for key in ("n", "best_of"):
        if key in body and body[key] is not None:
            if (count := whole(body[key])) is None:
                return None
            times = max(times, count)
    return most * times


def whole(value: Any) -> int | None:
    """`value` as a count of tokens, if it is a whole number of them (not a bool)."""
    if type(value) is float and value.is_integer():
        value = int(value)
    return value if type(value) is int and value >= 0 else None


@dataclass(frozen=True)
class Price:
    input: float
    output: float = 0.0  # embeddings: input only
    cached_input: float | None = None
    batch: Price | None = None  # through a provider's batch API; None: half of this

    def batched(self) -> Price:
        """The price of an answer from a provider's batch API: the spec's `batch:` prices,
        else half the live ones (OpenAI's and Fireworks' discount)."""
        if self.batch is not None:
            return self.batch
        return Price(self.input / 2, self.output / 2, None if self.cached_input is None else self.cached_input / 2)

    def worst(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The most a request of these sizes can cost: no prompt token cached."""
        return (prompt_tokens * self.input + completion_tokens * self.output) * PER_TOKEN


def cost(price: Price | None, prompt_tokens: int | None, completion_tokens: int | None,
         cached_tokens: int | None) -> float | None:
    """USD for one answer's usage; None without a price or without any usage."""
    if price is None or prompt_tokens is None and completion_tokens is None:
        return None
    prompt = prompt_tokens or 0
    cached = min(cached_tokens or 0, prompt)
    cached_price = price.input if price.cached_input is None else price.cached_input
    return ((prompt - cached) * price.input + cached * cached_price + (completion_tokens or 0) * price.output) \
        * PER_TOKEN


@dataclass(frozen=True)
class Hold:
    """A request's worst case, held against the budget from before it is sent until its
    answer says what it cost. `id` is unique in the job's state, where it is recorded."""

    id: int
    usd: float
    tokens: int


class Budget:
    """The job's spend against its limits. `reserve` before a request, `settle` after.

    `spent_*` starts from what earlier runs spent (the state remembers it, with the
    holds of requests a kill left unsettled at their worst case). Requests in flight
    are held at their worst case until their answer says what they cost, so the spend
    can never pass a limit, whatever the answers in flight turn out to be.
    """

    def __init__(self, max_usd: float | None, max_tokens: int | None, *, spent_usd: float = 0.0,
                 spent_tokens: int = 0, next_hold: int = 1) -> None:
        self.max_usd = max_usd
        self.max_tokens = max_tokens
        self.spent_usd = spent_usd
        self.spent_tokens = spent_tokens
        self.held_usd = 0.0
        self.held_tokens = 0
        self._ids = itertools.count(next_hold)

    def fits(self, worst_usd: float, worst_tokens: int, *, alone: bool = False) -> bool:
        """Whether a request of this worst case fits beside those held (or, `alone`, once they are settled)."""
        held_usd, held_tokens = (0.0, 0) if alone else (self.held_usd, self.held_tokens)
        # (a float sum may pass a limit it equals by a rounding: that is no passing)
        return (self.max_usd is None or self.spent_usd + held_usd + worst_usd <= self.max_usd + 1e-12) and \
            (self.max_tokens is None or self.spent_tokens + held_tokens + worst_tokens <= self.max_tokens)

    def reserve(self, worst_usd: float, worst_tokens: int) -> Hold | None:
        """Hold a request's worst case if the budget allows it; None if it does not now."""
        if not self.fits(worst_usd, worst_tokens):
            return None
        self.held_usd += worst_usd
        self.held_tokens += worst_tokens
        return Hold(next(self._ids), worst_usd, worst_tokens)

    def spent_unanswered(self, usd: float, tokens: int) -> Hold:
        """A request that may have been paid for and left no answer (it timed out, its
        answer could not be read): counted as spent at its worst case, now. Its Hold is
        kept in the state, as a kill's unsettled ones are (see `StateStore.spend`)."""
        self.spent_usd += usd
        self.spent_tokens += tokens
        return Hold(next(self._ids), usd, tokens)

    def settle(self, hold: Hold | None, spent_usd: float, spent_tokens: int) -> None:
        """A reserved request ended: let go of its worst case (if it is still held), count what it cost."""
        if hold is not None:
            self.held_usd = max(0.0, self.held_usd - hold.usd)
            self.held_tokens = max(0, self.held_tokens - hold.tokens)
        self.spent_usd += spent_usd
        self.spent_tokens += spent_tokens

    def describe(self) -> str:
        """What is spent and what is left, of each limit."""
        parts = []
        if self.max_usd is not None:
            left = self.max_usd - self.spent_usd
            parts.append(f"{usd(self.spent_usd)} of budget.max_usd {usd(self.max_usd)} spent "
                         f"({usd(left if left > 1e-12 else 0.0)} left)")  # (a sum's rounding is no dollar left)
        if self.max_tokens is not None:
            parts.append(f"{self.spent_tokens:,} of budget.max_tokens {self.max_tokens:,} tokens spent "
                         f"({max(0, self.max_tokens - self.spent_tokens):,} left)")
        return " and ".join(parts)


def usd(value: float) -> str:
    """Dollars as people read them: cents from a dollar up, else four significant digits
    ($0.004, $0.0001234), never a $0.00 that is not nothing."""
    if value >= 1 or value <= 0:
        return f"${value:,.2f}"
    digits = max(2, 3 - math.floor(math.log10(value)))
    whole, fraction = f"{value:.{digits}f}".split(".")
    return f"${whole}.{fraction.rstrip('0').ljust(2, '0')}"
