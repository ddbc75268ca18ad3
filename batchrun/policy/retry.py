"""Retry policy: pure decisions over status codes, headers, attempt numbers and a clock.

`classify` says what an HTTP answer means for the row and the job; `retry_after`
reads the server's requested wait; `backoff` is the wait when the server names none.
`retrying` packs them into a tenacity controller whose `sleep` is injectable, so the
whole policy is tested without a server and without sleeping.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import tenacity

from .._exceptions import APIError, JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from ..spec.parse import RetrySpec

__all__ = ["FailureStreak", "backoff", "classify", "error_message", "retry_after", "retrying"]

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
JOB_FATAL_STATUS = frozenset({401, 403})
RETRY_AFTER_MAX_S = 120.0  # a longer requested wait is capped, not ignored
RATE_LIMITED_MAX = 50  # 429s one row may meet before it fails


def classify(status: int, headers: Mapping[str, str], body: bytes, *, now: float) -> APIError:
    """The error an unsuccessful HTTP answer stands for; `now` is Unix time, for dates."""
    if 300 <= status < 400:
        # Not followed: the body and the key would go wherever the server says.
        where = headers.get("location")
        return JobFatalAPIError(
            f"HTTP {status}: the API redirects to {where!r}; batchrun does not follow redirects, "
            "so set api.base_url to the address that answers" if where else
            f"HTTP {status}: the API answered with a redirect that names no Location; check api.base_url",
            status=status,
        )
    message = f"HTTP {status}: {error_message(body)}"
    if status in JOB_FATAL_STATUS:
        hint = "check the API key" if status == 401 else "check the key's permissions for this model"
        return JobFatalAPIError(f"{message} ({hint})", status=status)
    if status == 429 and _error_code(body) == "insufficient_quota":
        return JobFatalAPIError(f"{message} (the account is out of quota; retrying cannot help)", status=status)
    if status in RETRYABLE_STATUS:
        return RetryableAPIError(message, status=status, retry_after=retry_after(headers, now=now))
    return RowFatalAPIError(message, status=status)


def error_message(body: bytes, limit: int = 4000) -> str:
    """The API's own words: `error.message` when the body is OpenAI-shaped, else its text.

    Cut at `limit` characters only to bound the work: the client redacts the key from
    the message before it cuts it to what is stored.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail")
        if isinstance(error, str) and error:
            return error[:limit]
    text = body.decode("utf-8", "replace").strip()
    return text[:limit] or "(empty body)"


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(error, dict):
        return error.get("code") or error.get("type")
    return None


def retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `retry-after`.

    `retry-after` is seconds or an HTTP date. Negative or unparsable values are
    ignored; long ones are capped at RETRY_AFTER_MAX_S.
    """
    seconds: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _float(raw_ms)
        seconds = None if seconds is None else seconds / 1000
    if seconds is None and (raw := headers.get("retry-after")) is not None:
        seconds = _float(raw)
        if seconds is None:
            try:
                seconds = parsedate_to_datetime(raw).timestamp() - now
            except (TypeError, ValueError, IndexError):
                return None
    if seconds is None or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_MAX_S)


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def backoff(attempt: int, spec: RetrySpec, rand: Callable[[], float] = random.random) -> float:
    """Wait after failed attempt `attempt` (1-based): doubling, capped, half of it jittered.

    Keeping half fixed guarantees a real pause; jittering the other half spreads
    the retries of many rows that failed together.
    """
    ceiling = min(spec.backoff_max_s, spec.backoff_initial_s * 2 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


class _wait(tenacity.wait.wait_base):
    """The server's Retry-After when it gave one, else our backoff."""

    def __init__(self, spec: RetrySpec, rand: Callable[[], float]) -> None:
        self.spec = spec
        self.rand = rand

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        requested = getattr(exc, "retry_after", None)
        if requested is not None:
            return requested
        return backoff(retry_state.attempt_number, self.spec, self.rand)


class _stop(tenacity.stop.stop_base):
    """Stop after `max_attempts` failures, not counting rate limiting.

    A 429 says "not now", not "not this": the rate policy slows the whole job down,
    and the row waits its turn. Only a generous cap keeps a server that never
    admits anything from holding a row forever.
    """

    def __init__(self, spec: RetrySpec, failures: int = 0, rate_limited: int = 0) -> None:
        self.max_attempts = spec.max_attempts
        self.failures = failures
        self.rate_limited = rate_limited

    @property
    def spent(self) -> tuple[int, int]:
        return self.failures, self.rate_limited

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if getattr(exc, "status", None) == 429:
            self.rate_limited += 1
        else:
            self.failures += 1
        return self.failures >= self.max_attempts or self.rate_limited >= RATE_LIMITED_MAX


def retrying(
    spec: RetrySpec,
    *,
    sleep: Callable[[float], Any],
    rand: Callable[[], float] = random.random,
    spent: tuple[int, int] = (0, 0),
) -> tenacity.AsyncRetrying:
    """A tenacity controller for one row: retries RetryableAPIError only. `spent`: the
    (failures, 429s) the row met before it was set aside; its `stop.spent` says them after."""
    return tenacity.AsyncRetrying(
        stop=_stop(spec, *spent),
        wait=_wait(spec, rand),
        retry=tenacity.retry_if_exception_type(RetryableAPIError),
        sleep=sleep,
        reraise=True,
    )


class FailureStreak:
    """Spots a job whose every row fails the same way: a misspelt model, a bad param.

    Such errors are per-row (404, 400) so no single one stops the job, but a million
    identical failures in a row is a misconfiguration, not data. `observe` returns
    True once `limit` settled rows in a row failed with the very same error.
    """

    def __init__(self, limit: int = 50) -> None:
        self.limit = limit
        self.error: str | None = None
        self.count = 0

    def observe(self, status: str, error: str | None) -> bool:
        if status == "ok" or error != self.error:
            self.error, self.count = (None, 0) if status == "ok" else (error, 1)
            return False
        self.count += 1
        return self.count >= self.limit
