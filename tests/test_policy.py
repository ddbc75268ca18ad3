from __future__ import annotations

import json
from email.utils import formatdate

import anyio
import pytest

from batchrun import APIError, JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from batchrun.policy.retry import FailureStreak, error_for, error_message, retrying
from batchrun.policy.verdict import backoff, judge, retry_after
from batchrun.spec.parse import RetrySpec

NOW = 1_700_000_000.0



def classify(status: int, headers: dict[str, str], body: bytes, *, now: float) -> APIError:
    """The error an unsuccessful answer stands for, as the client makes it: judged, then raised."""
    return error_for(judge(status, headers, body, now=now), headers, body)

def body(message: str = "nope", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "x", "code": code}}).encode()


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(status: int) -> None:
    error = classify(status, {}, body("busy"), now=NOW)
    assert isinstance(error, RetryableAPIError)
    assert str(error) == f"HTTP {status}: busy"


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_other_client_errors_fail_the_row_with_the_api_message(status: int) -> None:
    error = classify(status, {}, body("max_tokens is too large"), now=NOW)
    assert isinstance(error, RowFatalAPIError)
    hint = " (no such route or model on this server: check api.base_url, endpoint and model)" if status == 404 else ""
    assert str(error) == f"HTTP {status}: max_tokens is too large{hint}"


def test_auth_and_quota_errors_stop_the_job() -> None:
    assert isinstance(classify(401, {}, body(), now=NOW), JobFatalAPIError)
    assert isinstance(classify(403, {}, body(), now=NOW), JobFatalAPIError)
    quota = classify(429, {}, body("You exceeded your current quota", "insufficient_quota"), now=NOW)
    assert isinstance(quota, JobFatalAPIError)
    assert "out of quota" in str(quota)


def test_error_message_falls_back_to_the_text() -> None:
    assert error_message(b'{"detail": "gone"}') == "gone"
    assert error_message(b'{"error": "plain string"}') == "plain string"
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert error_message(b"") == "(empty body)"


def test_retry_after_header_sets_the_wait() -> None:
    assert retry_after({"retry-after": "7"}, now=NOW) == 7.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "7"}, now=NOW) == 0.25
    assert retry_after({"retry-after": formatdate(NOW + 30, usegmt=True)}, now=NOW) == pytest.approx(30, abs=1)
    assert retry_after({"retry-after": "3600"}, now=NOW) == 120.0  # capped, not ignored
    assert retry_after({"retry-after": "-1"}, now=NOW) is None
    # A wait of nothing names none (the backoff stands), and does not hide the other header
    assert retry_after({"retry-after": "0"}, now=NOW) is None
    assert retry_after({"retry-after": formatdate(NOW - 30, usegmt=True)}, now=NOW) is None
    assert retry_after({"retry-after-ms": "-5", "retry-after": "7"}, now=NOW) == 7.0
    assert retry_after({"retry-after-ms": "0", "retry-after": "2"}, now=NOW) == 2.0
    assert retry_after({"retry-after": "soon"}, now=NOW) is None
    assert retry_after({}, now=NOW) is None
    error = classify(429, {"retry-after": "3"}, body(), now=NOW)
    assert isinstance(error, RetryableAPIError) and error.retry_after == 3.0


def test_backoff_doubles_up_to_the_cap_with_half_jittered() -> None:
    spec = RetrySpec(backoff_initial_s=0.5, backoff_max_s=4.0)
    assert [backoff(n, spec, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [backoff(n, spec, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def run_with_retries(failures: list[Exception], spec: RetrySpec) -> tuple[int, list[float], BaseException | None]:
    """Drive `retrying` over a call that raises `failures` in turn, then succeeds."""
    waits: list[float] = []
    calls = 0

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main() -> BaseException | None:
        nonlocal calls
        try:
            async for attempt in retrying(spec, sleep=sleep, rand=lambda: 0.0):
                with attempt:
                    calls += 1
                    if failures:
                        raise failures.pop(0)
        except Exception as exc:
            return exc
        return None

    error = anyio.run(main)
    return calls, waits, error


def test_retrying_honours_retry_after_then_backs_off() -> None:
    spec = RetrySpec(max_attempts=5, backoff_initial_s=1.0, backoff_max_s=10.0)
    failures = [RetryableAPIError("429", retry_after=7.0), RetryableAPIError("503"), RetryableAPIError("503")]
    calls, waits, error = run_with_retries(failures, spec)
    assert (calls, waits, error) == (4, [7.0, 1.0, 2.0], None)


def test_retrying_stops_after_max_attempts_with_the_last_error() -> None:
    spec = RetrySpec(max_attempts=3, backoff_initial_s=0.1)
    last = RetryableAPIError("third")
    calls, waits, error = run_with_retries([RetryableAPIError("1"), RetryableAPIError("2"), last], spec)
    assert calls == 3 and len(waits) == 2 and error is last


def test_row_fatal_errors_are_not_retried() -> None:
    fatal = RowFatalAPIError("HTTP 400: bad")
    calls, waits, error = run_with_retries([fatal], RetrySpec())
    assert (calls, waits, error) == (1, [], fatal)


def test_a_streak_of_identical_failures_is_spotted_and_any_success_resets_it() -> None:
    streak = FailureStreak(limit=3)
    assert [streak.observe("failed", "HTTP 404: no such model") for _ in range(2)] == [False, False]
    assert streak.observe("ok", None) is False
    assert [streak.observe("failed", "HTTP 404: no such model") for _ in range(2)] == [False, False]
    assert streak.observe("failed", "HTTP 400: other") is False  # a different error starts over
    assert [streak.observe("failed", "HTTP 400: other") for _ in range(2)] == [False, True]
