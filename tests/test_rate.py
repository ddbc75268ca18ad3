from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from batchrun.policy.rate import (
    RATE_HEADERS,
    Allowance,
    RateLimiter,
    ServerLimits,
    Usage,
    estimate_tokens,
    parse_duration,
)
from batchrun.policy.verdict import Verdict, judge
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults


def heard(status: int, headers: dict[str, str]) -> Verdict:
    """The verdict on an answer, as the client judges it once and hands it on."""
    return judge(status, headers, now=0.0, rand=lambda: 0.5)


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
        limiter.observe(heard(200, {}), now)
    for _ in range(15):
        limiter.observe(heard(429, {}), now)
    assert limiter.rate == pytest.approx(20 * 0.9, rel=0.05)
    limiter.observe(heard(429, {}), now + 0.5)  # within a second: answers to older requests
    assert limiter.rate == pytest.approx(20 * 0.9, rel=0.05)
    assert limiter.pushbacks == 16


def test_a_few_429s_among_the_first_answers_are_no_verdict() -> None:
    limiter = RateLimiter()
    for i in range(100):  # 6 % of them, in a cluster at the start
        limiter.reserve(1, i * 0.01)
        limiter.observe(heard(429 if i in (1, 3, 4, 7, 9, 12) else 200, {}), i * 0.01)
    assert limiter.rate is None


def test_a_burst_allowance_is_not_taken_for_the_sustained_rate() -> None:
    limiter = RateLimiter()
    for i in range(60):  # a bucket's 60-request burst answered within 0.06 s ...
        limiter.reserve(1, i / 1000)
        limiter.observe(heard(200, {}), i / 1000)
    for i in range(60):  # ... then nothing but 429s
        limiter.reserve(1, 0.06 + i / 1000)
        limiter.observe(heard(429, {}), 0.06 + i / 1000)
    assert limiter.rate == pytest.approx(60 * 0.9)  # 60 in a second, not 1,000/s


def test_a_429_below_the_verdict_still_holds_the_rate_for_a_second() -> None:
    limiter = RateLimiter(requests_per_minute=6000)
    limiter.rate = 20.0
    limiter.observe(heard(429, {}), 10.0)  # one: no verdict
    limiter.observe(heard(200, {}), 10.5)
    assert limiter.rate == 20.0
    limiter.observe(heard(200, {}), 11.1)
    assert limiter.rate == 21.0


def test_stray_429s_do_not_starve_the_job() -> None:
    limiter = RateLimiter()
    now = 0.0
    for i in range(6000):  # 60 s at 100 answers/s, one 429 in 50
        now += 0.01
        limiter.reserve(1, now)
        limiter.observe(heard(429 if i % 50 == 0 else 200, {}), now)
    assert limiter.rate is None  # never judged to be a limit
    assert limiter.pushbacks == 120


def test_quiet_spells_raise_the_rate_again_but_not_past_the_ceiling() -> None:
    limiter = RateLimiter(requests_per_minute=600)  # 10/s ceiling
    limiter.reserve(1, 0.0)
    for _ in range(50):
        limiter.observe(heard(429, {}), 0.0)
    low = limiter.rate
    assert low < 10
    rates = []
    for second in range(60):
        limiter.observe(heard(200, {}), second + 0.5)
        rates.append(limiter.rate)
    assert rates == sorted(rates) and rates[-1] == pytest.approx(10)
    assert rates[0] == pytest.approx(low)  # not raised before a quiet spell


def test_a_plain_503_is_no_push_back_but_one_with_retry_after_is() -> None:
    limiter = RateLimiter()
    for _ in range(3):
        limiter.observe(heard(503, {}), 1.0)
    assert limiter.rate is None and limiter.pushbacks == 0
    for _ in range(50):
        limiter.observe(heard(503, {"retry-after": "1"}), 2.0)
    assert limiter.rate is not None


def test_the_servers_stated_limit_caps_the_rate_from_the_first_answer() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-limit-requests": "1200"}), 0.0)
    assert limiter.rate == pytest.approx(20 * 0.95)
    limiter.observe(heard(200, {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}), 0.1)
    assert limiter.rate == pytest.approx(3.0)


def test_a_spent_window_pauses_the_sends_without_slowing_the_rate() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-limit-requests": "1200"}), 0.0)
    limiter.observe(heard(200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "500ms"}), 1.0)
    assert limiter.rate == pytest.approx(20 * 0.95)  # not 0.2/s: 32 waiting requests would book 160 s ahead
    waits = [limiter.reserve(1, 1.0) for _ in range(32)]
    assert waits[0] == pytest.approx(0.5) and waits[-1] == pytest.approx(0.5 + 31 / 19)


def test_fireworks_over_limit_header_is_push_back() -> None:
    limiter = RateLimiter()
    limiter.reserve(1, 0.0)
    for _ in range(50):
        limiter.observe(heard(200, {"x-ratelimit-over-limit": "yes"}), 2.0)
    assert limiter.pushbacks == 50 and limiter.rate is not None


@pytest.mark.parametrize(("text", "seconds"), [("6m0s", 360), ("1.5s", 1.5), ("250ms", 0.25), ("1h2m", 3720),
                                               ("7", 7), ("soon", None), ("", None), (None, None), ("5x", None)])
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_a_reset_given_as_a_unix_time_is_the_seconds_until_then() -> None:
    """Read as a duration, 1.7e9 s pinned the rate to remaining / 54 years (the floor)."""
    assert parse_duration(f"{time.time() + 30:.0f}") == pytest.approx(30, abs=2)
    assert parse_duration(f"{time.time() - 30:.0f}") is None  # past: says nothing


def test_estimate_tokens() -> None:
    assert estimate_tokens({"prompt": "x" * 400, "max_tokens": 100}) == 201
    assert estimate_tokens({"messages": [{"content": "x" * 40}, {"content": [{"t": 1}]}], "max_tokens": 10, "n": 2}) \
        == (40 + len("[{'t': 1}]")) // 4 + 1 + 20
    assert estimate_tokens({"prompt": "", "max_tokens": "lots"}) == 1 + 256


# -- the limits servers state, under every name they use --------------------------------------

OPENAI = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
          "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "200000",
          "x-ratelimit-remaining-tokens": "199000", "x-ratelimit-reset-tokens": "6m0s"}
LITELLM_KEY = {"x-ratelimit-api_key-limit-requests": "5", "x-ratelimit-api_key-remaining-requests": "4",
               "x-ratelimit-api_key-limit-tokens": "1000", "x-ratelimit-api_key-remaining-tokens": "-18"}
FIREWORKS = {"x-ratelimit-limit-tokens-prompt": "2000", "x-ratelimit-remaining-tokens-prompt": "1500",
             "x-ratelimit-limit-tokens-cache-adjusted-prompt": "3000",
             "x-ratelimit-remaining-tokens-cache-adjusted-prompt": "2900",
             "x-ratelimit-limit-tokens-generated": "400", "x-ratelimit-remaining-tokens-generated": "0"}


def test_openai_limits_are_read_per_minute_with_their_reset_durations() -> None:
    stated = ServerLimits.read(OPENAI)
    assert stated.requests == (Allowance(limit=500, remaining=499, reset_s=0.12, window_s=60),)
    # OpenAI counts a request's tokens as it admits it: its prompt and its max_tokens
    assert stated.tokens == (Allowance(limit=200000, remaining=199000, reset_s=360, window_s=60, booked=True),)
    assert ServerLimits.read({"x-ratelimit-reset-requests": "1s"}).requests == (Allowance(reset_s=1.0),)


def test_a_litellm_keys_limits_are_read_per_minute_without_a_reset() -> None:
    stated = ServerLimits.read(LITELLM_KEY)
    assert stated.requests == (Allowance(limit=5, remaining=4, reset_s=None, window_s=60),)
    assert stated.tokens == (Allowance(limit=1000, remaining=0, window_s=60),)  # over by 18: none left


def test_litellm_states_its_limits_beside_the_openai_names_and_each_is_kept() -> None:
    stated = ServerLimits.read({**OPENAI, **LITELLM_KEY, "x-ratelimit-team-limit-requests": "30",
                                "x-ratelimit-model_per_key-remaining-requests": "2"})
    assert [a.limit for a in stated.requests] == [500, 5, 30, None]
    assert stated.requests[-1] == Allowance(remaining=2)


def test_fireworks_token_budgets_are_read_per_second() -> None:
    stated = ServerLimits.read(FIREWORKS)
    assert stated.prompt_tokens == Allowance(limit=2000, remaining=1500, window_s=1)
    assert stated.cache_adjusted_prompt_tokens == Allowance(limit=3000, remaining=2900, window_s=1)
    assert stated.generated_tokens == Allowance(limit=400, remaining=0, window_s=1)
    assert stated.requests == stated.tokens == ()


def test_header_names_are_read_in_any_case_and_odd_values_are_ignored() -> None:
    stated = ServerLimits.read({"X-RateLimit-Limit-Requests": "60", "x-ratelimit-remaining-requests": "nan",
                                "x-ratelimit-reset-requests": "soon", "x-ratelimit-api_key-limit-requests": "-5",
                                "x-ratelimit-limit-tokens": "inf", "x-ratelimit-limit-widgets": "3"})
    assert stated == ServerLimits(requests=(Allowance(limit=60),))
    assert ServerLimits.read({}) == ServerLimits()


def test_the_headers_passed_on_for_the_rate_policy_are_all_it_reads() -> None:
    everything = {**OPENAI, **LITELLM_KEY, **FIREWORKS, "x-ratelimit-user-limit-requests": "9",
                  "x-ratelimit-over-limit": "yes", "retry-after": "1", "content-type": "application/json"}
    kept = {name: value for name, value in everything.items() if name in RATE_HEADERS}
    assert ServerLimits.read(kept) == ServerLimits.read(everything)
    assert "content-type" not in kept and {"x-ratelimit-over-limit", "retry-after"} <= kept.keys()


# -- what the policy does with them --------------------------------------------------------------

def test_a_litellm_keys_requests_per_minute_cap_the_rate() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-limit-requests": "10000", **LITELLM_KEY}), 0.0)
    assert limiter.rate == pytest.approx(5 / 60 * 0.95)  # the tighter of the two
    for second in range(1, 60):  # quiet spells raise the rate, but never past what the key allows
        limiter.observe(heard(200, LITELLM_KEY), float(second))
    assert limiter.rate == pytest.approx(5 / 60 * 0.95)
    assert send_times(limiter, 3, start=60.0) == pytest.approx([60.0, 60 + 60 / 4.75, 60 + 120 / 4.75])


def test_a_spent_litellm_window_pauses_the_sends() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-api_key-limit-requests": "600"}), 0.0)
    limiter.observe(heard(200, {"x-ratelimit-api_key-remaining-requests": "0"}), 5.0)  # no reset: at most a second
    assert limiter.reserve(1, 5.0) == pytest.approx(1.0)
    limiter.observe(heard(200, {"x-ratelimit-api_key-remaining-requests": "7"}), 9.0)  # a count left, no time: no rate
    assert limiter.rate == pytest.approx(600 / 60 * 0.95)


def test_a_spent_window_pauses_the_sends_though_no_limit_is_stated() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "500ms"}), 0.0)
    assert limiter.rate is None and limiter.reserve(1, 0.0) == pytest.approx(0.5)


def test_a_429_naming_a_wait_after_the_window_said_spent_pauses_the_sends_until_then() -> None:
    """Two jobs on one LiteLLM key: the window says nothing is left, then a 429 says 60 s.
    The sends wait those 60 s (not a second, then a 429 a second); a 429 with no spent
    window before it is one row's matter."""
    limiter = RateLimiter()
    limiter.observe(heard(200, {"x-ratelimit-api_key-limit-requests": "60"}), 0.0)
    limiter.observe(heard(429, {"retry-after": "60"}), 1.0)
    assert limiter.reserve(1, 1.0) < 2
    limiter.observe(heard(200, {"x-ratelimit-api_key-remaining-requests": "0"}), 30.0)
    limiter.observe(heard(429, {"retry-after": "30"}), 31.0)
    assert limiter.reserve(1, 31.0) == pytest.approx(30.0)
    # Once an answer says the window has requests again, a 429 is one row's matter again
    limiter.observe(heard(200, {"x-ratelimit-api_key-remaining-requests": "40"}), 62.0)
    limiter.observe(heard(429, {"retry-after": "30"}), 63.0)
    assert limiter.reserve(1, 63.0) < 2
    # ... unless fewer are left than this job sent lately: the other job took the last one
    send_times(limiter, 4, start=64.0)
    limiter.observe(heard(200, {"x-ratelimit-api_key-remaining-requests": "1"}), 65.0)
    limiter.observe(heard(429, {"retry-after": "60"}), 66.0)
    assert limiter.reserve(1, 66.0) == pytest.approx(60.0)


def test_requests_sent_before_the_limit_was_known_count_against_it() -> None:
    limiter = RateLimiter()
    assert send_times(limiter, 4) == [0.0] * 4  # nothing known yet: all four leave
    limiter.observe(heard(200, {"x-ratelimit-api_key-limit-requests": "60"}), 0.01)  # the first answer
    assert limiter.reserve(1, 0.02) == pytest.approx(4 / 0.95 - 0.02)  # the fifth goes as if all had been paced


def test_a_debt_from_before_the_limit_is_forgotten_after_a_window() -> None:
    limiter = RateLimiter()
    send_times(limiter, 30)
    limiter.observe(heard(200, {"x-ratelimit-api_key-limit-requests": "5"}), 0.01)  # 30 sent: six minutes' worth
    assert limiter.reserve(1, 0.01) == pytest.approx(60.0)  # a windowed limit has forgotten them in one


def budgets(prompt: int, uncached: int, generated: int) -> dict[str, str]:
    """Fireworks' three token budgets, per second, as its answers state them."""
    return {"x-ratelimit-limit-tokens-prompt": str(prompt),
            "x-ratelimit-limit-tokens-cache-adjusted-prompt": str(uncached),
            "x-ratelimit-limit-tokens-generated": str(generated)}


def test_token_budgets_cap_the_rate_by_what_a_request_uses_of_each() -> None:
    limiter = RateLimiter()
    limiter.observe(heard(200, budgets(10_000, 6_000, 500)), 0.0)
    assert limiter.rate is None and limiter.wants_usage  # no usage seen yet: nothing to divide by
    limiter.used(Usage.of(prompt=100, cached=20, completion=10))  # type: ignore[arg-type]
    # at once, before the rest of the first round goes: prompt 10,000/100 = 100/s, uncached
    # 6,000/80 = 75/s, generated 500/10 = 50/s: the tightest, less 5 %
    assert limiter.rate == pytest.approx(50 * 0.95)
    limiter.observe(heard(200, budgets(10_000, 6_000, 500)), 0.1)
    assert limiter.rate == pytest.approx(50 * 0.95)
    limiter.observe(heard(200, budgets(10_000, 1_600, 500)), 0.2)  # the uncached budget shrank: 20/s now binds
    assert limiter.rate == pytest.approx(20 * 0.95)


def test_openais_token_limit_counts_a_request_by_its_max_tokens_litellms_key_by_its_usage() -> None:
    """OpenAI books a request's prompt and max_tokens as it admits it; an answer using far
    less (56 of 251) must not pace as if only that were counted: 429s come in waves.
    LiteLLM's key counts what the answer used."""
    limits = {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-api_key-limit-tokens": "120000"}
    limiter = RateLimiter()
    send_times(limiter, 3, tokens=251)  # (estimate_tokens: prompt / 4 + max_tokens)
    limiter.observe(heard(200, limits), 0.0)
    limiter.used(Usage.of(prompt=40, cached=0, completion=16))  # type: ignore[arg-type]
    # OpenAI's 1,000 a second over 251 a request binds (LiteLLM's 2,000 over 56 would allow 35/s)
    assert limiter.rate == pytest.approx(1000 / 251 * 0.95)
    # The LiteLLM proxy states its model's tpm under OpenAI's names, and counts it by usage
    proxied = RateLimiter()
    send_times(proxied, 3, tokens=251)
    proxied.observe(heard(200, {"x-ratelimit-limit-tokens": "60000", "x-litellm-call-id": "c-1"}), 0.0)
    proxied.used(Usage.of(prompt=40, cached=0, completion=16))  # type: ignore[arg-type]
    assert proxied.rate == pytest.approx(1000 / 56 * 0.95)


def test_a_budget_that_grows_lifts_the_ceiling_and_the_rate_climbs_to_it() -> None:
    limiter = RateLimiter()
    limiter.used(Usage.of(prompt=100, cached=0, completion=10))  # type: ignore[arg-type]
    limiter.observe(heard(200, budgets(100_000, 100_000, 200)), 0.0)
    assert limiter.rate == pytest.approx(20 * 0.95)
    now = 0.0
    for _ in range(40):  # Fireworks' budgets grow as they are used: 400 generated tokens/s now
        now += 0.5
        limiter.observe(heard(200, budgets(100_000, 100_000, 400)), now)
    assert limiter.ceiling == pytest.approx(40 * 0.95) and limiter.rate == pytest.approx(40 * 0.95)


def test_one_answer_stating_a_budget_far_too_low_neither_stalls_nor_slows_the_job() -> None:
    """A glitch: one answer of many states 1 generated token a second. The rate comes down
    to it, and the slot booked meanwhile (seconds away); the next answer, stating the
    budget again, puts both back: no waiting out the slot, no climbing from nothing."""
    limiter = RateLimiter()
    limiter.used(Usage.of(prompt=100, cached=0, completion=10))  # type: ignore[arg-type]
    limiter.observe(heard(200, budgets(100_000, 100_000, 1_000)), 0.0)
    assert limiter.rate == pytest.approx(100 * 0.95)
    limiter.observe(heard(200, budgets(100_000, 100_000, 1)), 0.1)
    assert limiter.rate == pytest.approx(0.1 * 0.95)
    assert limiter.reserve(1, 0.1) == 0  # it goes; the next slot is ten seconds on
    limiter.observe(heard(200, budgets(100_000, 100_000, 1_000)), 0.2)
    assert limiter.rate == pytest.approx(100 * 0.95)
    assert limiter.reserve(1, 0.2) == 0  # (a request already waiting for a slot keeps it)


def test_openai_and_litellm_tokens_per_minute_cap_the_rate_by_a_requests_total_tokens() -> None:
    limiter = RateLimiter()
    limiter.used(Usage.of(prompt=80, cached=None, completion=40))  # type: ignore[arg-type]
    limiter.observe(heard(200, {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-api_key-limit-tokens": "36000"}),
                    0.0)
    assert limiter.rate == pytest.approx(36_000 / 60 * 0.95 / 120)  # the key's 600 tokens/s over 120 a request


def test_a_requests_usage_is_a_running_mean_that_follows_the_latest_answers() -> None:
    usage = Usage()
    usage.add(Usage.of(prompt=100, cached=40, completion=10))  # type: ignore[arg-type]
    assert (usage.prompt, usage.uncached, usage.completion, usage.total) == (100, 60, 10, 110)
    for _ in range(200):
        usage.add(Usage.of(prompt=200, cached=0, completion=20))  # type: ignore[arg-type]
    assert usage.prompt == pytest.approx(200, rel=1e-3) and usage.uncached == pytest.approx(200, rel=1e-3)
    several = Usage.of(10, 0, 1).plus(Usage.of(30, 0, 3))  # type: ignore[union-attr, arg-type]
    assert (several.prompt, several.count) == (40, 2)
    assert Usage.of(None, None, None) is None


@pytest.mark.slow
def test_a_job_paced_by_litellm_headers_meets_at_most_one_429(tmp_path: Path) -> None:
    """LiteLLM's rpm_limit, sped up: 60 a minute counted in windows of 3 s (3 in each)."""
    rows, per_window = 9, 3
    with FakeServer(Faults(litellm_rpm=60, litellm_window_s=3)) as server:
        write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}"} for i in range(rows)])
        spec = write_spec(tmp_path, api={"base_url": server.base_url})  # 32 in flight at most

        result = run_cli("run", str(spec), "--no-progress")

        assert result.code == 0, result.stderr
        assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * rows
        limited = [r for r in server.requests if r.outcome == "limited"]
        assert len(limited) <= 1, len(limited)
        assert len(server.requests) == rows + len(limited)
        # About the time the limit allows: no more windows than the rows need, and one to spare
        assert server.litellm_windows <= math.ceil(rows / per_window) + 1, server.litellm_windows


def admitted_with_no_429(tmp_path: Path, faults: Faults, rows: int, **spec: object) -> list[tuple[float, ...]]:
    """A job of `rows` questions against a fake holding token limits (`faults`): every row
    ok with no 429; what the fake admitted (when, and the tokens it counted)."""
    with FakeServer(faults) as server:
        write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"question {i:04d}: " + "tell me more " * 20}
                                               for i in range(rows)])
        spec_path = write_spec(tmp_path, api={"base_url": server.base_url}, endpoint="chat", **spec)
        result = run_cli("run", str(spec_path), "--no-progress")
        assert result.code == 0, result.stderr
        assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * rows
        assert [r for r in server.requests if r.outcome == "limited"] == []  # no 429
        return server.budget_used


@pytest.mark.slow
def test_a_job_keeps_to_openais_tokens_a_minute_counted_by_max_tokens_with_no_429(tmp_path: Path) -> None:
    """OpenAI books a request's max_tokens as it admits it: answers of a few tokens must not
    pace the job as if only those were counted (before: 429s in waves). 100 max_tokens a
    request, 6,000 tokens a second: about 50 requests a second."""
    admitted = admitted_with_no_429(tmp_path, Faults(openai_tpm=360_000, latency_s=0.01), 200, concurrency=64,
                                    params={"max_tokens": 100})
    start, end = admitted[0][0] + 1.0, admitted[-1][0]
    booked = sum(tokens for at, tokens, _, _ in admitted if start <= at <= end)
    print(f"booked tokens a second: {booked / (end - start):.0f}, {booked / (end - start) / 6000:.1%} of the limit")
    assert booked / (end - start) >= 0.85 * 6000, booked / (end - start)


@pytest.mark.slow
def test_a_job_fills_fireworks_tightest_token_budget_with_no_429(tmp_path: Path) -> None:
    """Three budgets a second, the generated one tightest (250 tokens/s, about 50 answers):
    paced by what a request uses of each, the job keeps to it from its first answer on:
    the first round (128 in flight, two seconds of the budget) goes paced too."""
    admitted = admitted_with_no_429(tmp_path, Faults(fireworks_budgets=(40_000, 40_000, 250), latency_s=0.01), 200,
                                    concurrency=128)
    # The generated tokens a second, from the first second on (the first answer goes alone)
    start, end = admitted[0][0] + 1.0, admitted[-1][0]
    generated = sum(tokens for at, _, _, tokens in admitted if start <= at <= end)
    print(f"generated tokens a second: {generated / (end - start):.1f}, {generated / (end - start) / 250:.1%} of "
          "the tightest budget, 0 429s")
    assert generated / (end - start) >= 0.9 * 250, generated / (end - start)
