"""Retry policy: what to do with an answer's verdict, as a tenacity controller.

An answer's `Verdict` (`policy.verdict`) says whether it is worth retrying and how
long to wait first; `error_for` makes the error that stands for it, with the API's
own words, and carries the verdict to `retrying`: a tenacity controller whose `wait`
and `stop` read it (they judge nothing again), whose `sleep` is injectable, so the
whole policy is tested without a server and without sleeping.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import tenacity

from .._exceptions import APIError, JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from ..spec.model import RetrySpec
from .verdict import JOB_FATAL, RETRY, Verdict, unanswered

__all__ = ["FailureStreak", "error_for", "error_message", "retrying"]

RATE_LIMITED_MAX = 50  # 429s one row may meet before it fails


def error_for(verdict: Verdict, headers: Mapping[str, str], body: bytes) -> APIError:
    """The error that stands for an unsuccessful answer's `verdict`, in the API's words;
    a retryable one carries the verdict on to `retrying`."""
    status = verdict.status
    if status is not None and 300 <= status < 400:
        # Not followed: the body and the key would go wherever the server says.
        where = headers.get("location")
        return JobFatalAPIError(
            f"HTTP {status}: the API redirects to {where!r}; batchrun does not follow redirects, "
            "so set api.base_url to the address that answers" if where else
            f"HTTP {status}: the API answered with a redirect that names no Location; check api.base_url",
            status=status,
        )
    message = f"HTTP {status}: {error_message(body)}"
    if verdict.kind == JOB_FATAL:
        hint = "check the API key" if status == 401 else "check the key's permissions for this model" \
            if status == 403 else "the account is out of quota; retrying cannot help"
        return JobFatalAPIError(f"{message} ({hint})", status=status)
    if verdict.kind == RETRY:
        return RetryableAPIError(message, status=status, retry_after=verdict.retry_after, verdict=verdict)
    if status in (404, 405):  # no such route, or no such model there
        message += " (no such route or model on this server: check api.base_url, endpoint and model)"
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


def _verdict(retry_state: tenacity.RetryCallState, spec: RetrySpec, rand: Callable[[], float]) -> Verdict:
    """The verdict the failure carries; one raised without (by a caller of `retrying`
    other than the client) is judged as an attempt that got no answer."""
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    if isinstance(exc, RetryableAPIError):
        if exc.verdict is not None:
            return exc.verdict
        return unanswered(retry_state.attempt_number, spec, rand, retry_after=exc.retry_after)
    return unanswered(retry_state.attempt_number, spec, rand)


class _wait(tenacity.wait.wait_base):
    """The verdict's wait: the server's Retry-After when it gave one, else our backoff."""

    def __init__(self, spec: RetrySpec, rand: Callable[[], float]) -> None:
        self.spec = spec
        self.rand = rand

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return _verdict(retry_state, self.spec, self.rand).wait


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
        if isinstance(exc, RetryableAPIError) and (exc.verdict.rate_limited if exc.verdict is not None
                                                   else exc.status == 429):  # (one raised outside the client)
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
