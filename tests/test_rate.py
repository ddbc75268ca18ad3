from __future__ import annotations

import pytest

from batchrun._rate import RateLimiter, estimate_tokens, parse_duration


def send_times(limiter: RateLimiter, n: int, *, start: float = 0.0, tokens: int = 1) -> list[float]:
    """When n requests booked at once at `start` would leave."""
    return [start + limiter.reserve(tokens, start) for _ in range(n)]


def test_requests_per_minute_spaces_requests_evenly() -> None:
    limiter = RateLimiter(requests_per_minute=1200)
    assert send_times(limiter, 5) == pytest.approx([0.0, 0.05, 0.10, 0.15, 0.20])
    # idle time is not saved up into a burst
    assert send_times(limiter, 3, start=100.0) == pytest.approx([100.0, 100.05, 100.10])


def test_tokens_per_minute_books_by_estimate_and_corrects_by_usage() -> None:
    limiter = RateLimiter(tokens_per_minute=6000)  # 100 tokens/s
    assert send_times(limiter, 3, tokens=50) == pytest.approx([0.0, 0.5, 1.0])
    limiter.correct_tokens(+100)  # the last answer used 100 more than booked
    assert limiter.reserve(50, 1.0) == pytest.approx(1.5)


def test_no_limit_means_no_wait() -> None:
    limiter = RateLimiter()
    assert send_times(limiter, 100) == [0.0] * 100


def test_a_429_lowers_the_rate_to_what_the_server_admitted() -> None:
    limiter = RateLimiter()
    now = 0.0
    for _ in range(100):  # 20 admitted per second for 5 s, 200 sent
        now += 0.05
        limiter.reserve(1, now)
        limiter.reserve(1, now)
        limiter.observe(200, {}, now)
    for _ in range(15):
        limiter.observe(429, {}, now)
    assert limiter.rate == pytest.approx(20 * 0.9, rel=0.05)
    limiter.observe(429, {}, now + 0.5)  # within a second: answers to older requests
    assert limiter.rate == pytest.approx(20 * 0.9, rel=0.05)
    assert limiter.pushbacks == 16


def test_a_few_429s_among_the_first_answers_are_no_verdict() -> None:
    limiter = RateLimiter()
    for i in range(100):  # 6 % of them, in a cluster at the start
        limiter.reserve(1, i * 0.01)
        limiter.observe(429 if i in (1, 3, 4, 7, 9, 12) else 200, {}, i * 0.01)
    assert limiter.rate is None


def test_a_burst_allowance_is_not_taken_for_the_sustained_rate() -> None:
    limiter = RateLimiter()
    for i in range(60):  # a bucket's 60-request burst answered within 0.06 s ...
        limiter.reserve(1, i / 1000)
        limiter.observe(200, {}, i / 1000)
    for i in range(60):  # ... then nothing but 429s
        limiter.reserve(1, 0.06 + i / 1000)
        limiter.observe(429, {}, 0.06 + i / 1000)
    assert limiter.rate == pytest.approx(60 * 0.9)  # 60 in a second, not 1,000/s


def test_a_429_below_the_verdict_still_holds_the_rate_for_a_second() -> None:
    limiter = RateLimiter(requests_per_minute=6000)
    limiter.rate = 20.0
    limiter.observe(429, {}, 10.0)  # one: no verdict
    limiter.observe(200, {}, 10.5)
    assert limiter.rate == 20.0
    limiter.observe(200, {}, 11.1)
    assert limiter.rate == 21.0


def test_stray_429s_do_not_starve_the_job() -> None:
    limiter = RateLimiter()
    now = 0.0
    for i in range(6000):  # 60 s at 100 answers/s, one 429 in 50
        now += 0.01
        limiter.reserve(1, now)
        limiter.observe(429 if i % 50 == 0 else 200, {}, now)
    assert limiter.rate is None  # never judged to be a limit
    assert limiter.pushbacks == 120


def test_quiet_spells_raise_the_rate_again_but_not_past_the_ceiling() -> None:
    limiter = RateLimiter(requests_per_minute=600)  # 10/s ceiling
    limiter.reserve(1, 0.0)
    for _ in range(50):
        limiter.observe(429, {}, 0.0)
    low = limiter.rate
    assert low < 10
    rates = []
    for second in range(60):
        limiter.observe(200, {}, second + 0.5)
        rates.append(limiter.rate)
    assert rates == sorted(rates) and rates[-1] == pytest.approx(10)
    assert rates[0] == pytest.approx(low)  # not raised before a quiet spell


def test_a_plain_503_is_no_push_back_but_one_with_retry_after_is() -> None:
    limiter = RateLimiter()
    for _ in range(3):
        limiter.observe(503, {}, 1.0)
    assert limiter.rate is None and limiter.pushbacks == 0
    for _ in range(50):
        limiter.observe(503, {"retry-after": "1"}, 2.0)
    assert limiter.rate is not None


def test_the_servers_stated_limit_caps_the_rate_from_the_first_answer() -> None:
    limiter = RateLimiter()
    limiter.observe(200, {"x-ratelimit-limit-requests": "1200"}, 0.0)
    assert limiter.rate == pytest.approx(20 * 0.95)
    limiter.observe(200, {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, 0.1)
    assert limiter.rate == pytest.approx(3.0)


def test_a_spent_window_pauses_the_sends_without_slowing_the_rate() -> None:
    limiter = RateLimiter()
    limiter.observe(200, {"x-ratelimit-limit-requests": "1200"}, 0.0)
    limiter.observe(200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "500ms"}, 1.0)
    assert limiter.rate == pytest.approx(20 * 0.95)  # not 0.2/s: 32 waiting requests would book 160 s ahead
    waits = [limiter.reserve(1, 1.0) for _ in range(32)]
    assert waits[0] == pytest.approx(0.5) and waits[-1] == pytest.approx(0.5 + 31 / 19)


def test_fireworks_over_limit_header_is_push_back() -> None:
    limiter = RateLimiter()
    limiter.reserve(1, 0.0)
    for _ in range(50):
        limiter.observe(200, {"x-ratelimit-over-limit": "yes"}, 2.0)
    assert limiter.pushbacks == 50 and limiter.rate is not None


@pytest.mark.parametrize(("text", "seconds"), [("6m0s", 360), ("1.5s", 1.5), ("250ms", 0.25), ("1h2m", 3720),
                                               ("7", 7), ("soon", None), ("", None), (None, None), ("5x", None)])
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_estimate_tokens() -> None:
    assert estimate_tokens({"prompt": "x" * 400, "max_tokens": 100}) == 201
    assert estimate_tokens({"messages": [{"content": "x" * 40}, {"content": [{"t": 1}]}], "max_tokens": 10, "n": 2}) \
        == (40 + len("[{'t': 1}]")) // 4 + 1 + 20
    assert estimate_tokens({"prompt": "", "max_tokens": "lots"}) == 1 + 256
