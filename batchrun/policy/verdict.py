"""One verdict per answer: what an HTTP answer means, read once and handed on as a value.

    answer ── judge(status, headers, body, now, attempt, retry) ──▶ Verdict
        retry (tenacity)      kind: ok, retry, row-fatal, job-fatal; the wait; rate-limited?
        rate (RateLimiter)    ok?, pushed back?, the limits the server states
        concurrency (gate)    load (ok / pushback / neither), the server's retry-after,
                              the limit on requests in flight it states
        the Ray quota         the same Verdict, in the worker's report: never read again

`judge` is a pure function of the answer's status and headers (and, for a 429 only,
its body's error code: a quota that is spent stops the job), the wall clock (a
`retry-after` may be an HTTP date), the attempt number and the spec's retry settings
(the backoff when the server names no wait). An attempt that got no answer (the
connection failed, it timed out) gets its verdict from `unanswered`.

Push-back is "the server is over a limit": a 429, a 503 naming a wait, or Fireworks'
`x-ratelimit-over-limit: yes` on an answer it still served. Whether a push-back was
about requests in flight or about the rate is not in one answer: the concurrency
`Control` tells them apart by how many were in flight (see `policy.concurrency`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..spec.model import RetrySpec
from .concurrency import STATED_HEADER
from .rate import NOTHING_STATED, RATE_HEADERS, ServerLimits, header_number

__all__ = ["JOB_FATAL", "OK", "RETRY", "ROW_FATAL", "Verdict", "backoff", "judge", "pushed_back", "retry_after",
           "unanswered"]

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
JOB_FATAL_STATUS = frozenset({401, 403})
RETRY_AFTER_MAX_S = 120.0  # a longer requested wait is capped, not ignored

# What an answer means for its row and the job
OK = "ok"  # a 2xx: the server answered (its body may still be unreadable: then it is retried)
RETRY = "retry"  # worth another attempt
ROW_FATAL = "row-fatal"  # this row's request is refused; retrying it unchanged cannot help
JOB_FATAL = "job-fatal"  # every row would be refused alike (a bad key, a redirect, no quota left)

_DEFAULT_RETRY = RetrySpec()


@dataclass(frozen=True)
class Verdict:
    """What one answer (or one attempt without an answer: `status` None) means.

    `wait`: seconds before the next attempt, should there be one: the server's
    `retry_after` where it names one, else the backoff for this attempt number.
    `in_flight_limit`: how many requests in flight the server says it holds (LiteLLM).
    """

    status: int | None
    kind: str
    wait: float
    retry_after: float | None = None
    pushed_back: bool = False
    limits: ServerLimits = NOTHING_STATED
    in_flight_limit: int | None = None

    @property
    def ok(self) -> bool:
        return self.kind == OK

    @property
    def retryable(self) -> bool:
        return self.kind == RETRY

    @property
    def rate_limited(self) -> bool:
        """A push-back to retry (a 429, or a 503 naming a wait: load shed): "not now", not
        "not this"; it is no spent attempt (see `retry`)."""
        return self.pushed_back and self.kind == RETRY

    @property
    def load(self) -> str | None:
        """What the answer says of the server's load, for the concurrency limit: `pushback`,
        `ok`, or None (a failure that says nothing about load)."""
        return "pushback" if self.pushed_back else OK if self.kind == OK else None


def judge(status: int, headers: Mapping[str, str], body: bytes = b"", *, now: float, attempt: int = 1,
          retry: RetrySpec = _DEFAULT_RETRY, rand: Callable[[], float] = random.random) -> Verdict:
    """The verdict on one HTTP answer. `now`: Unix time (for a retry-after given as a date);
    `attempt`: 1-based, among the attempts of this request, for the backoff."""
    # One pass over the answer's headers, for the few the verdict reads (httpx's lookups
    # by name scan them all, each time)
    named = {lower: value for name, value in headers.items() if (lower := name.lower()) in _READ}
    pushed = pushed_back(status, named)
    asked = retry_after(named, now=now) if pushed or status in RETRYABLE_STATUS else None
    wait = asked if asked is not None else backoff(attempt, retry, rand)
    stated = None
    if 200 <= status < 300:
        kind = OK
        if not pushed and (number := header_number(named.get(STATED_HEADER))) and number.is_integer():
            stated = int(number)
    elif 300 <= status < 400 or status in JOB_FATAL_STATUS or status == 429 and _error_code(body) == QUOTA_SPENT:
        kind = JOB_FATAL
    elif status in RETRYABLE_STATUS:
        kind = RETRY
    else:
        kind = ROW_FATAL
    return Verdict(status, kind, wait, asked, pushed, ServerLimits.read(named) if named else NOTHING_STATED, stated)


def unanswered(attempt: int, retry: RetrySpec = _DEFAULT_RETRY, rand: Callable[[], float] = random.random,
               *, retry_after: float | None = None) -> Verdict:
    """The verdict on an attempt that got no answer to judge (the connection failed, it timed
    out, the answer could not be read): retry after the backoff, or the wait it names."""
    return Verdict(None, RETRY, retry_after if retry_after is not None else backoff(attempt, retry, rand), retry_after)


QUOTA_SPENT = "insufficient_quota"  # OpenAI's code on a 429 that no wait will help
_READ = RATE_HEADERS | {STATED_HEADER}  # every header a verdict reads, by lower-case name


def pushed_back(status: int, headers: Mapping[str, str]) -> bool:
    """The server says it is over a limit: a 429, a 503 naming a wait, or Fireworks'
    `x-ratelimit-over-limit: yes` on an answer it still served."""
    return status == 429 or (status == 503 and ("retry-after" in headers or "retry-after-ms" in headers)) or \
        headers.get("x-ratelimit-over-limit", "").lower() == "yes"


def retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `retry-after`.

    `retry-after` is seconds or an HTTP date. A wait of nothing (0, a date past, a
    negative value) or an unparsable one names none: the backoff stands, so a server
    answering `retry-after: 0` to everything is not asked again at once, hundreds of
    times a second (the openai SDK ignores such values too). Long ones are capped at
    RETRY_AFTER_MAX_S.
    """
    for name in ("retry-after-ms", "retry-after"):
        if (raw := headers.get(name)) is None:
            continue
        seconds = _float(raw)
        if seconds is not None and name == "retry-after-ms":
            seconds /= 1000
        elif seconds is None and name == "retry-after":
            try:
                seconds = parsedate_to_datetime(raw).timestamp() - now
            except (TypeError, ValueError, IndexError):
                seconds = None
        if seconds is not None and seconds > 0:
            return min(seconds, RETRY_AFTER_MAX_S)
    return None


def backoff(attempt: int, spec: RetrySpec, rand: Callable[[], float] = random.random) -> float:
    """Wait after failed attempt `attempt` (1-based): doubling, capped, half of it jittered.

    Keeping half fixed guarantees a real pause; jittering the other half spreads
    the retries of many rows that failed together.
    """
    ceiling = min(spec.backoff_max_s, spec.backoff_initial_s * 2 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(error, dict):
        return error.get("code") or error.get("type")
    return None
