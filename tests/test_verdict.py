"""One verdict per answer: pure, no server, no sleeping; the clock and the jitter are passed in."""

from __future__ import annotations

import dataclasses
import json
from email.utils import formatdate

import anyio
import httpx
import pytest

from batchrun import JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from batchrun.backends.ray.quota import Quota, Report
from batchrun.policy.concurrency import STATED_HEADER
from batchrun.policy.rate import Allowance, RateLimiter, ServerLimits
from batchrun.policy.retry import error_for, retrying
from batchrun.policy.verdict import JOB_FATAL, OK, RETRY, ROW_FATAL, Verdict, judge, unanswered
from batchrun.spec.parse import RetrySpec

NOW = 1_700_000_000.0
SPEC = RetrySpec(backoff_initial_s=0.5, backoff_max_s=4.0)


def verdict(status: int, headers: dict[str, str] | None = None, body: bytes = b"", *, attempt: int = 1) -> Verdict:
    return judge(status, headers or {}, body, now=NOW, attempt=attempt, retry=SPEC, rand=lambda: 0.0)


def quota_body(code: str) -> bytes:
    return json.dumps({"error": {"message": "You exceeded your current quota", "code": code}}).encode()


def test_a_good_answer_is_ok_and_says_the_server_admitted_it() -> None:
    v = verdict(200)
    assert (v.kind, v.ok, v.retryable, v.pushed_back, v.load, v.retry_after) == (OK, True, False, False, "ok", None)
    assert v.limits == ServerLimits() and v.in_flight_limit is None


def test_a_429_is_a_retryable_push_back_that_waits_its_retry_after_and_spends_no_attempt() -> None:
    v = verdict(429, {"retry-after": "2"})
    assert (v.kind, v.pushed_back, v.rate_limited, v.load) == (RETRY, True, True, "pushback")
    assert v.wait == v.retry_after == 2.0


def test_a_429_without_a_wait_backs_off_by_its_attempt_number() -> None:
    assert [verdict(429, attempt=n).wait for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert verdict(429).retry_after is None


def test_a_retry_after_given_as_a_date_is_read_against_the_clock_passed_in() -> None:
    v = verdict(429, {"retry-after": formatdate(NOW + 30, usegmt=True)})
    assert v.wait == pytest.approx(30, abs=1)


def test_a_spent_quota_stops_the_job_though_it_is_a_429() -> None:
    v = verdict(429, {"retry-after": "2"}, quota_body("insufficient_quota"))
    assert (v.kind, v.rate_limited, v.retryable) == (JOB_FATAL, False, False)
    assert verdict(429, {}, quota_body("rate_limit_exceeded")).kind == RETRY


@pytest.mark.parametrize(("status", "kind"), [(401, JOB_FATAL), (403, JOB_FATAL), (301, JOB_FATAL), (308, JOB_FATAL),
                                              (400, ROW_FATAL), (404, ROW_FATAL), (422, ROW_FATAL),
                                              (408, RETRY), (409, RETRY), (500, RETRY), (502, RETRY)])
def test_each_status_has_its_kind(status: int, kind: str) -> None:
    v = verdict(status)
    assert v.kind == kind
    assert v.pushed_back is False and v.load is None  # none of them says anything about load


def test_a_503_is_a_push_back_only_when_it_names_a_wait() -> None:
    """One that names a wait is load shed: "not now", like a 429, so no spent attempt."""
    named, bare = verdict(503, {"retry-after-ms": "1500"}), verdict(503, attempt=2)
    assert (named.pushed_back, named.wait, named.rate_limited) == (True, 1.5, True)
    assert bare.rate_limited is False
    assert (bare.pushed_back, bare.wait, bare.kind) == (False, 0.5, RETRY)


def test_an_answer_served_over_the_limit_is_ok_but_pushed_back() -> None:
    v = verdict(200, {"x-ratelimit-over-limit": "yes", STATED_HEADER: "4"})
    assert (v.ok, v.pushed_back, v.load) == (True, True, "pushback")
    assert v.in_flight_limit is None  # a limit stated on a push-back is not taken


@pytest.mark.parametrize(("stated", "limit"), [("3", 3), (" 3 ", 3), ("2.5", None), ("-2", None), ("nan", None),
                                               ("0", None), ("", None)])
def test_a_stated_limit_on_requests_in_flight_is_read_from_good_answers(stated: str, limit: int | None) -> None:
    assert verdict(200, {STATED_HEADER: stated}).in_flight_limit == limit


def test_the_limits_the_server_states_are_read_once_into_the_verdict() -> None:
    v = verdict(200, {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "7",
                      "content-type": "application/json"})
    assert v.limits == ServerLimits(requests=(Allowance(limit=600, remaining=7),))


def test_an_attempt_without_an_answer_backs_off_and_says_nothing_of_load() -> None:
    v = unanswered(3, SPEC, lambda: 1.0)
    assert (v.status, v.kind, v.wait, v.load, v.pushed_back) == (None, RETRY, 2.0, None, False)


def test_a_verdict_is_a_value() -> None:
    v = verdict(429, {"retry-after": "1"})
    assert v == verdict(429, {"retry-after": "1"}) and v != verdict(429, {"retry-after": "2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.wait = 0.0  # type: ignore[misc]


def test_the_error_for_a_verdict_carries_it_and_the_apis_words() -> None:
    body = json.dumps({"error": {"message": "slow down"}}).encode()
    v = verdict(429, {"retry-after": "3"}, body)
    error = error_for(v, {}, body)
    assert isinstance(error, RetryableAPIError) and error.verdict is v and str(error) == "HTTP 429: slow down"
    assert error.retry_after == 3.0
    assert isinstance(error_for(verdict(400), {}, body), RowFatalAPIError)
    quota = error_for(verdict(429, {}, quota_body("insufficient_quota")), {}, quota_body("insufficient_quota"))
    assert isinstance(quota, JobFatalAPIError) and "out of quota" in str(quota)
    moved = error_for(verdict(308), {"location": "https://elsewhere.test/v1"}, b"")
    assert isinstance(moved, JobFatalAPIError) and "redirects to 'https://elsewhere.test/v1'" in str(moved)


def test_retrying_waits_as_each_verdict_says_and_429s_spend_no_attempt() -> None:
    """tenacity's wait and stop read the verdict the error carries: they judge nothing again."""
    spec = RetrySpec(max_attempts=2, backoff_initial_s=0.5, backoff_max_s=4.0)
    failures = [error_for(v, {}, b"") for v in (verdict(429, {"retry-after": "7"}), verdict(429, attempt=2),
                                                verdict(500, attempt=3), verdict(429, attempt=4))]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main() -> None:
        async for attempt in retrying(spec, sleep=sleep, rand=lambda: 1.0):  # (the verdicts' own jitter holds)
            with attempt:
                if failures:
                    raise failures.pop(0)

    anyio.run(main)
    assert waits == [7.0, 0.5, 1.0, 2.0]  # a 500 alone is one failure of max_attempts=2: it goes on


def test_the_rate_limiter_takes_the_verdict_as_it_is() -> None:
    limiter = RateLimiter()
    served_over = Verdict(200, OK, 0.0, pushed_back=True)  # as the client judged it, whatever the headers
    for second in range(60):
        limiter.observe(verdict(200), second * 0.01)
        limiter.observe(served_over, second * 0.01)
    assert limiter.pushbacks == 60


def test_the_ray_quota_hears_the_workers_verdicts_and_reads_no_headers() -> None:
    quota = Quota(requests_per_minute=None, tokens_per_minute=None, workers=1, concurrency=8, now=0.0)
    pushed = Verdict(200, OK, 0.0, pushed_back=True)
    limits = verdict(200, {"x-ratelimit-limit-requests": "600"})
    quota.exchange(Report(observations=[(0.0, pushed), (0.0, limits)]), 0.0)
    assert quota.limiter.pushbacks == 1
    assert quota.limiter.rate == pytest.approx(600 / 60 * 0.95)



@pytest.mark.parametrize("make", [dict, httpx.Headers], ids=["dict", "httpx"])
def test_header_names_are_read_in_any_case(make: type) -> None:
    headers = make({"Retry-After": "2", "X-RateLimit-Limit-Requests": "60", "X-Ratelimit-Over-Limit": "Yes"})
    v = verdict(200, headers)
    assert (v.pushed_back, v.retry_after, v.limits.requests) == (True, 2.0, (Allowance(limit=60),))
