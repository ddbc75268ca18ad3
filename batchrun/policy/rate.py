"""Rate policy: when may the next request go? Pure decisions over a clock the caller passes.

Two mechanisms share one schedule:

- **Pacing** to the limits in the spec (`rate_limit.requests_per_minute`,
  `tokens_per_minute`): each request books the next free slot on a virtual schedule
  (GCRA), so requests leave evenly spaced, never in a burst followed by a stall.
  Tokens are booked by estimate and the booking is corrected by the real usage.
- **Adapting** to the server, with or without a stated limit: when 429s (or 503s
  that say they are a rate limit) become a real share of the answers, the request
  rate drops to what the server was admitting just then, at most once a second; a
  second without any push-back raises it again by a small step (additive increase,
  multiplicative decrease). A stray 429 now and then (servers shed load) does not count: cutting
  the rate for each would starve the job.
- **Following** the limits the server states (`ServerLimits`, read once per answer from
  OpenAI's, LiteLLM's or Fireworks' names): the tightest request limit caps the rate, and
  the requests sent before it was known count against it; a window with nothing left
  pauses the sends, and what is left of one with a stated reset bounds the rate.
- **Token budgets** the server states (Fireworks' three per second: prompt, uncached
  prompt, generated; OpenAI's and LiteLLM's tokens per minute) cap the rate too, as
  requests: each budget over what a request of this job has used of it lately (`used`,
  from every answer's usage). A budget stated anew (Fireworks' grow with use) moves the
  cap with it, up as well as down.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["NOTHING_STATED", "RATE_HEADERS", "Allowance", "Heard", "Limiter", "RateLimiter", "ServerLimits", "Usage",
           "estimate_tokens", "header_number", "parse_duration"]

DECREASE_FACTOR = 0.9  # of the rate the server admitted when it pushed back
MIN_RATE = 0.2  # requests/s: never stall completely
EPOCH_FROM = 1e9  # a reset "in" more seconds than this (31 years) is a Unix time (2001 on)
QUIET_S = 1.0  # how long without push-back before raising the rate a step
STEP = 0.05  # raise by 5 % (at least STEP_MIN requests/s) per quiet spell
STEP_MIN = 0.5
WINDOW_S = 5.0  # sent and admitted rates are measured over this much recent time
PUSHBACK_SHARE = 0.1  # of recent answers: below it, 429s are noise, not a limit
PUSHBACK_MIN = 10  # ... and at least this many in the window
SAMPLE_MIN = 50  # answers in the window before a share means anything
HEADROOM = 0.95  # of a limit the server states
EMPTY_WINDOW_WAIT_S = 1.0  # the longest pause for a window with nothing left
MINUTE_S = 60.0  # the window of OpenAI's limits and of LiteLLM's rpm_limit / tpm_limit
FIREWORKS_WINDOW_S = 1.0  # Fireworks states tokens per second
USAGE_WEIGHT = 0.05  # of the latest answer in a request's mean usage (the last ~20 answers weigh most)


class Heard(Protocol):
    """What the rate policy reads of an answer: its `policy.verdict.Verdict`, judged once
    by whoever received it (the client; a Ray worker, for the job's Quota)."""

    @property
    def ok(self) -> bool: ...
    @property
    def pushed_back(self) -> bool: ...
    @property
    def retry_after(self) -> float | None: ...
    @property
    def limits(self) -> ServerLimits: ...


class Limiter(Protocol):
    """What a client asks of its rate limiter: a `RateLimiter`, or a Ray worker's lease of
    the job's (`backends.ray.quota.LeasedLimiter`)."""

    tokens_per_s: float | None
    wants_usage: bool  # whether `used` is worth calling (a token budget is stated)
    held_until: float  # no send before then, whenever it was booked (a spent window, a wait asked)

    def reserve(self, tokens: int, now: float) -> float: ...
    def observe(self, answer: Heard, now: float) -> None: ...
    def correct_tokens(self, difference: int) -> None: ...
    def used(self, usage: Usage) -> None: ...


class RateLimiter:
    """Books send times; `rate` is requests/s, None while nothing limits it."""

    def __init__(self, *, requests_per_minute: float | None = None, tokens_per_minute: float | None = None) -> None:
        self._spec_ceiling = requests_per_minute / 60 if requests_per_minute else None
        self._request_ceiling: float | None = None  # the tightest request limit the server stated
        self._token_ceiling: float | None = None  # its token budgets, as requests/s (see `_follow_tokens`)
        self.rate = self.ceiling
        self.usage = Usage()  # what a request has used lately
        self.wants_usage = False  # once the server states a token budget
        self._budgets: tuple[ServerLimits, float] | None = None  # the token budgets stated last, and when
        self.tokens_per_s = tokens_per_minute / 60 if tokens_per_minute else None
        self._next_request = 0.0  # the next slot, at the rate it was booked at
        self._last_slot = 0.0  # the last slot booked (from which a higher rate books the next)
        self.held_until = 0.0  # no send before then (monotonic): a window the server says is spent
        self._held_by_ceiling = False  # the rate is where a limit the server stated put it
        self._left: float | None = None  # the fewest requests a window was said to have left, last
        self._next_tokens = 0.0
        self._booked = 0.0  # a request's size as booked (`estimate_tokens`: max_tokens included), lately
        self._sent: deque[float] = deque()  # times of recent requests
        self._admitted: deque[float] = deque()  # times of recent successful answers
        self._pushed: deque[float] = deque()  # times of recent push-backs
        self._last_change = float("-inf")
        self.pushbacks = 0

    @property
    def ceiling(self) -> float | None:
        """The highest rate: the spec's, or the tightest limit the server states."""
        limits = [c for c in (self._spec_ceiling, self._request_ceiling, self._token_ceiling) if c is not None]
        return min(limits) if limits else None

    # -- pacing ------------------------------------------------------------------------------

    def reserve(self, tokens: int, now: float) -> float:
        """Book a send slot for a request of about `tokens` tokens; return the wait."""
        if tokens:  # (estimated only where a token limit asks: most requests skip this)
            self._booked += (tokens - self._booked) * (USAGE_WEIGHT if self._booked else 1.0)
        start = max(now, self.held_until)
        if self.rate is not None:
            start = max(start, self._next_request)
            self._next_request = start + 1 / self.rate
            self._last_slot = start
        if self.tokens_per_s is not None:
            start = max(start, self._next_tokens)
            self._next_tokens = start + tokens / self.tokens_per_s
        _record(self._sent, start, now)
        return start - now

    def release(self, requests: int, tokens: int, now: float) -> None:
        """Give back booked slots that will not be used (a process sharing the schedule
        stopped with some left): the schedule moves back by them, never before `now`."""
        if self.rate is not None and requests:
            self._next_request = max(now, self._next_request - requests / self.rate)
        if self.tokens_per_s is not None and tokens:
            self._next_tokens = max(now, self._next_tokens - tokens / self.tokens_per_s)

    def correct_tokens(self, difference: int) -> None:
        """The answer used `difference` more (or fewer) tokens than booked."""
        if self.tokens_per_s is not None:
            # A server's odd usage (2**62 tokens) must not stall the job for years:
            # no answer counts for more than a minute of the budget.
            difference = min(difference, int(self.tokens_per_s * 60))
            self._next_tokens += difference / self.tokens_per_s

    def used(self, usage: Usage) -> None:
        """An answer's usage (or several answers': see `Usage.add`): what the token budgets
        the server states come to in requests. The budgets stated last apply at once: the
        first answer's usage caps the rate before the rest of the first round goes (then
        each answer's own statement moves the cap: not computed twice an answer)."""
        self.usage.add(usage)
        if self._budgets is not None and self._token_ceiling is None:
            self._follow_tokens(*self._budgets)

    # -- adapting --------------------------------------------------------------------------

    def observe(self, answer: Heard, now: float) -> None:
        """Learn from one HTTP answer's verdict."""
        if answer.ok:
            _record(self._admitted, now, now)
        if answer.pushed_back:
            self.pushbacks += 1
            if answer.retry_after and self._left is not None and self._left < max(1, len(self._sent)):
                # The window said spent (or about to be: fewer left than this job sent lately),
                # and now a wait: the key is shared (another job, another user); the sends pause
                # till then, rather than each meet its 429 (LiteLLM's 60 s). After an answer with
                # more left, a 429 is one row's matter.
                self.held_until = max(self.held_until, now + answer.retry_after)
            _record(self._pushed, now, now)
            _record(self._admitted, None, now)
            pushed, admitted = len(self._pushed), len(self._admitted)
            sample = pushed + admitted
            if sample >= SAMPLE_MIN and pushed >= PUSHBACK_MIN and pushed >= PUSHBACK_SHARE * sample:
                self._decrease(now)
        else:
            if answer.limits is not NOTHING_STATED:  # (most answers state nothing: nothing to follow)
                self._follow(answer.limits, now)
            quiet_since = max(self._last_change, self._pushed[-1] if self._pushed else float("-inf"))
            if self.rate is not None and now - quiet_since >= QUIET_S:
                self._set(self.rate + max(STEP_MIN, self.rate * STEP), now)

    def _decrease(self, now: float) -> None:
        """Down to what the server admitted lately; with no success to go by, half the send rate."""
        if now - self._last_change < 1.0:
            return  # answers to requests sent before the last decrease say nothing new
        admitted = _rate_of(self._admitted, now)
        target = admitted if admitted else _rate_of(self._sent, now) / 2
        current = self.rate if self.rate is not None else float("inf")
        self._set(min(current, target) * DECREASE_FACTOR, now)
        self._held_by_ceiling = False  # the server pushed back below what it states: climb

    def _follow(self, stated: ServerLimits, now: float) -> None:
        """Keep within the request limits and the token budgets the server states."""
        limits = [a for a in stated.requests if a.per_s]
        if limits:
            tightest = min(limits, key=lambda a: a.per_s)
            limit = tightest.per_s * HEADROOM
            if self._request_ceiling is None or limit < self._request_ceiling:
                self._request_ceiling = limit
                self._cap(now, tightest.window_s)
        self._follow_tokens(stated, now)
        left = [allowance.remaining for allowance in stated.requests if allowance.remaining is not None]
        if left:
            self._left = min(left)
        for allowance in stated.requests:
            if allowance.spent and allowance.refill_s:
                # The window is spent (others share the key), whether or not a limit is
                # stated: hold the sends until it refills, at most a second. Slowing the rate
                # to match it instead would book every waiting request seconds apart, long
                # after the window is back.
                self.held_until = max(self.held_until, now + min(allowance.refill_s, EMPTY_WINDOW_WAIT_S))
            elif allowance.remaining is not None and allowance.reset_s and self.rate is not None:
                # A count left says how fast only with the time it must last (LiteLLM gives none)
                self.rate = min(self.rate, max(self._floor(), allowance.remaining / allowance.reset_s))

    def _follow_tokens(self, stated: ServerLimits, now: float) -> None:
        """The token budgets stated, as requests/s: each budget over a request's mean use of
        it (Fireworks: prompt, uncached prompt, generated; OpenAI and LiteLLM: all tokens).
        Stated anew with every answer, a budget moves the cap down and up."""
        usage, booked = self.usage, max(self.usage.total, self._booked)
        budgets = [(budget, each) for budget, each in (
            (stated.prompt_tokens, usage.prompt), (stated.cache_adjusted_prompt_tokens, usage.uncached),
            (stated.generated_tokens, usage.completion),
            *((budget, booked if budget.booked else usage.total) for budget in stated.tokens),
        ) if budget is not None]
        if budgets:
            self.wants_usage = True
            self._budgets = (stated, now)
        rates = [(budget.per_s * HEADROOM / each, budget.window_s) for budget, each in budgets if budget.per_s and each]
        if rates:
            self._token_ceiling, window_s = min(rates)
            self._cap(now, window_s)  # (down at once; up at once too where a statement held it down)

    def _cap(self, now: float, window_s: float) -> None:
        """A rate above the ceiling comes down to it at once, and the requests sent before
        it was known count against it. A rate a lower statement of the limits held down
        (not push-back) goes back up as soon as they state more: one answer that stated a
        budget of 1 token/s must not leave the job crawling (or stalled: no request, no
        answer to climb by)."""
        ceiling = self.ceiling
        if ceiling is None:
            return
        if self.rate is None or self.rate > ceiling:
            self.rate = ceiling
            self._held_by_ceiling = True
            self._count_earlier(now, window_s)
        elif self._held_by_ceiling and self.rate < ceiling:
            self._set(ceiling, now)

    def _count_earlier(self, now: float, window_s: float) -> None:
        """The requests booked lately, before this rate held, count against it (the job's
        first request, which went before any answer stated the limit): the next slot is where
        pacing at it from the first would have put it. A window on, the server has forgotten them."""
        due = float("-inf")
        for sent in self._sent:
            due = max(due, sent) + 1 / self.rate
        self._next_request = max(self._next_request, min(due, now + window_s))

    def _floor(self) -> float:
        """Never stall completely, nor go past a ceiling lower than that (a 5-rpm key)."""
        return MIN_RATE if self.ceiling is None else min(MIN_RATE, self.ceiling)

    def _set(self, rate: float, now: float) -> None:
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        before, self.rate = self.rate, max(self._floor(), rate)
        self._last_change = now
        if before is not None and self.rate > before:
            # The next slot comes at the new rate: one booked at a rate a glitch in one answer
            # set (a budget of 1 token/s, a slot 1,000 s off) must not stall the job
            self._next_request = min(self._next_request, self._last_slot + 1 / self.rate)


def _rate_of(times: deque[float], now: float) -> float:
    """Events per second in the window, over at least a second.

    A rate limiter's burst allowance makes a fraction of a second look fast; a
    second is the shortest span that says what the server admits.
    """
    return len(times) / max(1.0, now - times[0]) if times else 0.0


def _record(times: deque[float], at: float | None, now: float) -> None:
    """Append `at` (if any) and forget what is older than the window."""
    if at is not None:
        times.append(at)
    while times and times[0] < now - WINDOW_S:
        times.popleft()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """`6m0s`, `1.5s`, `250ms` or plain seconds, as OpenAI's reset headers write them; a
    plain number past EPOCH_FROM is a time (Unix seconds, as some servers write a reset):
    the seconds until then."""
    if not text:
        return None
    plain = header_number(text)
    if plain is not None and plain >= EPOCH_FROM:
        left = plain - time.time()
        return left if left > 0 else None
    if plain is not None:
        return plain
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def header_number(text: str | None) -> float | None:
    """A header's number: finite and not negative, or None (`nan` would stall the pacing)."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < float("inf") else None


@dataclass
class Usage:
    """Tokens per request, as running means (`add` the answers' usage as they come):
    `prompt`, `uncached` (the prompt less its cached tokens), `completion`, `total`.
    `count` answers' sums, for a report that carries several (a Ray worker's)."""

    prompt: float = 0.0
    uncached: float = 0.0
    completion: float = 0.0
    total: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, prompt: int | None, cached: int | None, completion: int | None) -> Usage | None:
        """One answer's usage; None for an answer that states none."""
        if prompt is None and completion is None:
            return None
        prompt, completion = prompt or 0, completion or 0
        uncached = max(0, prompt - min(cached or 0, prompt))
        return cls(prompt, uncached, completion, prompt + completion, 1)

    def add(self, more: Usage) -> None:
        """Fold `more` (sums over `more.count` answers) into the means."""
        if more.count <= 0:
            return
        weight = 1.0 if self.count == 0 else 1 - (1 - USAGE_WEIGHT) ** more.count
        for name in ("prompt", "uncached", "completion", "total"):
            mean = getattr(more, name) / more.count
            setattr(self, name, getattr(self, name) + weight * (mean - getattr(self, name)))
        self.count += more.count

    def plus(self, more: Usage) -> Usage:
        """Sums: this and `more` together (to carry in one report)."""
        return Usage(self.prompt + more.prompt, self.uncached + more.uncached, self.completion + more.completion,
                     self.total + more.total, self.count + more.count)


# -- what servers state ----------------------------------------------------------------------

@dataclass(frozen=True)
class Allowance:
    """One limit as a server states it: `limit` per `window_s`, `remaining` of it now (0
    once over it), whole again in `reset_s` (None when the server does not say)."""

    limit: float | None = None
    remaining: float | None = None
    reset_s: float | None = None
    window_s: float = MINUTE_S
    # A token limit that counts a request as it is admitted, by its size as sent (its prompt
    # and its max_tokens: OpenAI's), not by the usage of its answer (LiteLLM's, its keys' and
    # its models', which it states under OpenAI's names)
    booked: bool = False

    @property
    def per_s(self) -> float | None:
        return self.limit / self.window_s if self.limit else None

    @property
    def spent(self) -> bool:
        return self.remaining is not None and self.remaining < 1

    @property
    def refill_s(self) -> float:
        """The longest until the window is whole again: its reset, else the window itself."""
        return self.reset_s if self.reset_s is not None else self.window_s


@dataclass(frozen=True)
class ServerLimits:
    """The rate limits one answer states, whichever names the server gives them:

    - OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, limits per minute,
      resets as durations (`6m0s`, `1s`, `20ms`).
    - LiteLLM's proxy, beside those (which then carry the provider's limits or the key's):
      `x-ratelimit-{scope}-{limit,remaining}-{requests,tokens}` for each limit it keeps: the
      key's rpm_limit / tpm_limit (scope `api_key`), and a user's, team's, team member's,
      end user's, or a model's for the key. Counted per minute, in fixed windows (60 s
      unless the proxy is set otherwise), tokens after each answer; no reset, `remaining`
      may go below 0 once over (seen on a model's `tpm`, which the proxy states but does
      not enforce), and a 429 carries none of them.
    - Fireworks: `x-ratelimit-{limit,remaining}-tokens-{prompt,cache-adjusted-prompt,generated}`,
      tokens per second on three budgets that grow as usage ramps.

    `requests` and `tokens` hold an Allowance for each scope present, OpenAI's names first;
    the tightest binds. Token limits cap the request rate by a request's mean usage (see
    `RateLimiter._follow_tokens`); they are not booked token by token: OpenAI counts a
    request's max_tokens as it is admitted, LiteLLM the prompt and completion (less cached
    tokens) once answered, and Fireworks' budgets grow only when used, so no one booking
    fits them all.
    """

    requests: tuple[Allowance, ...] = ()
    tokens: tuple[Allowance, ...] = ()
    prompt_tokens: Allowance | None = None
    cache_adjusted_prompt_tokens: Allowance | None = None
    generated_tokens: Allowance | None = None

    @classmethod
    def read(cls, headers: Mapping[str, str]) -> ServerLimits:
        found: dict[tuple[str, int], dict[str, float]] = {}  # (kind, scope's place) -> fields
        litellm = False  # the LiteLLM proxy answered: OpenAI's names carry its model's limits, counted by usage
        for name, text in headers.items():
            if (where := _LIMIT_HEADERS.get(lower := name.lower())) is not None:
                kind, place, field = where
                if (value := _READ_FIELD[field](text)) is not None:
                    found.setdefault((kind, place), {})[field] = value
            elif lower in LITELLM_MARKS:
                litellm = True
        if not found:
            return NOTHING_STATED
        scoped: dict[str, list[Allowance]] = {"requests": [], "tokens": []}
        budgets: dict[str, Allowance] = {}  # Fireworks'
        for (kind, place), fields in sorted(found.items()):
            if kind in scoped:
                scoped[kind].append(Allowance(**fields, booked=kind == "tokens" and place == 0 and not litellm))
            else:
                budgets[kind] = Allowance(**fields, window_s=FIREWORKS_WINDOW_S)
        return cls(requests=tuple(scoped["requests"]), tokens=tuple(scoped["tokens"]), **budgets)


def _remaining(text: str) -> float | None:
    """LiteLLM counts past its limit (`-18`): nothing is left."""
    try:
        value = float(text)
    except ValueError:
        return None
    return max(0.0, value) if abs(value) < float("inf") else None


NOTHING_STATED = ServerLimits()
# OpenAI's names (scope ""), then LiteLLM's scopes, in the proxy's words
_SCOPES = ("", "api_key", "user", "team", "team_member", "end_user", "model_per_key")
_READ_FIELD = {"limit": header_number, "remaining": _remaining, "reset_s": parse_duration}
# header name -> (what it counts: a ServerLimits field, the scope's place in _SCOPES, an Allowance field)
_LIMIT_HEADERS: dict[str, tuple[str, int, str]] = {
    f"x-ratelimit-{scope}{'-' if scope else ''}{field}-{kind}": (kind, place, attribute)
    for place, scope in enumerate(_SCOPES)
    for kind in ("requests", "tokens")
    for field, attribute in (("limit", "limit"), ("remaining", "remaining"), ("reset", "reset_s"))
    if field != "reset" or not scope  # LiteLLM states no reset
} | {
    f"x-ratelimit-{field}-tokens-{budget}": (budget.replace("-", "_") + "_tokens", 0, field)
    for budget in ("prompt", "cache-adjusted-prompt", "generated")
    for field in ("limit", "remaining")
}
# On every answer of the LiteLLM proxy (1.108.7): whose limits, under OpenAI's names, count usage
LITELLM_MARKS = frozenset({"x-litellm-call-id", "x-litellm-model-id"})
# Every header the rate policy reads (from an answer's verdict: see `policy.verdict`)
RATE_HEADERS = frozenset(_LIMIT_HEADERS) | LITELLM_MARKS | {"x-ratelimit-over-limit", "retry-after", "retry-after-ms"}


def estimate_tokens(body: Mapping[str, object]) -> int:
    """A request's tokens before it is sent: prompt characters / 4, plus max_tokens × n."""
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        chars = len(prompt)
    else:
        chars = len(body["instructions"]) if isinstance(body.get("instructions"), str) else 0
        messages = body.get("messages") or (prompt if isinstance(prompt, list) else ())
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else message
            chars += len(content) if isinstance(content, str) else len(str(content or ""))
    completion = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens") or 256
    n = body.get("n") or 1
    completion = completion if isinstance(completion, int) else 256
    n = n if isinstance(n, int) else 1
    return chars // 4 + 1 + completion * n
