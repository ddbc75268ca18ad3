"""Leases of a job-wide rate limit: pure bookkeeping, no Ray, no server, no sleeping."""

from __future__ import annotations

import threading

import pytest

from batchrun._lease import HORIZON_S, STALE_S, LeasedLimiter, Quota, Report
from batchrun._rate import RateLimiter


def quota(workers: int = 4, rpm: float | None = 2700, tpm: float | None = None, **kw: float) -> Quota:
    return Quota(requests_per_minute=rpm, tokens_per_minute=tpm, workers=workers, now=kw.pop("now", 0.0), **kw)


def worker(workers: int = 4, rpm: float | None = 2700, tpm: float | None = None) -> LeasedLimiter:
    return LeasedLimiter(requests_per_minute=rpm, tokens_per_minute=tpm, workers=workers, tokens_each=100)


def exchange(q: Quota, w: LeasedLimiter, now: float) -> None:
    w.receive(q.exchange(w.report(now), now), now)


def sends(w: LeasedLimiter, n: int, now: float) -> list[float]:
    """When n requests ready at `now` would leave."""
    return [now + w.reserve(100, now) for _ in range(n)]


def test_workers_leasing_in_turn_send_at_the_job_rate_together() -> None:
    q, workers = quota(), [worker() for _ in range(4)]
    for w in workers:  # the first lease comes before the first request
        exchange(q, w, 0.0)
    times: list[float] = []
    now = 0.0
    while now < 10.0:  # each worker keeps asking as it runs low, as its thread does
        for w in workers:
            if w.reporting_due(now, now):
                exchange(q, w, now)
                w.due.clear()
            times += [t for t in sends(w, 1, now) if t < 10.0]
        now += 0.005
    times.sort()
    assert len(times) == pytest.approx(45 * 10, abs=3)  # 2700/min is 45/s, whoever asks
    assert min(b - a for a, b in zip(times, times[1:])) == pytest.approx(1 / 45, rel=0.25)


def test_a_lease_is_a_quarter_second_of_the_job_rate_shared_by_the_workers() -> None:
    grant = quota(workers=4).exchange(Report(want=True), 0.0)
    assert grant.chunk == 3  # 45/s * 0.25 s / 4, rounded up
    assert grant.slots == pytest.approx([0.0, 1 / 45, 2 / 45])
    assert quota(workers=4, rpm=60).exchange(Report(want=True), 0.0).chunk == 1  # at least one slot


def test_without_any_limit_workers_never_wait_and_ask_for_no_lease() -> None:
    q, w = quota(rpm=None), worker(rpm=None)
    exchange(q, w, 0.0)
    assert w.unlimited and sends(w, 1000, 0.0) == [0.0] * 1000
    assert not w.report(0.0).want


def test_one_workers_429s_slow_every_worker() -> None:
    q, seen, other = quota(workers=2, rpm=None), worker(2, rpm=None), worker(2, rpm=None)
    now = 0.0
    for _ in range(100):  # 20/s admitted for 5 s, then the server pushes back
        now += 0.05
        seen.observe(200, {}, now)
    for _ in range(20):
        seen.observe(429, {"retry-after": "1"}, now)
    assert seen.due.is_set()  # a push-back is reported at once, not at the next refresh
    exchange(q, seen, now)
    exchange(q, other, now)

    assert not other.unlimited and other.rate == pytest.approx(20 * 0.9, rel=0.1)
    assert other.report(now).want
    assert q.limiter.pushbacks == 20


def test_a_stated_server_limit_seen_by_one_worker_caps_the_job() -> None:
    q, w = quota(rpm=None), worker(rpm=None)
    w.observe(200, {"x-ratelimit-limit-requests": "600", "content-type": "application/json"}, 0.0)
    assert w.report(0.0).observations == [(0.0, 200, {"x-ratelimit-limit-requests": "600"})]  # rate headers only
    w.observe(200, {"x-ratelimit-limit-requests": "600"}, 0.0)
    exchange(q, w, 0.0)
    assert q.limiter.rate == pytest.approx(600 / 60 * 0.95)
    assert not w.unlimited


def test_a_worker_without_a_lease_goes_on_alone_at_its_share_and_the_debt_is_booked() -> None:
    q, w = quota(workers=4, rpm=600), worker(workers=4, rpm=600)  # 10/s for the job: 2.5/s each
    assert sends(w, 3, 0.0) == pytest.approx([0.0, 0.4, 0.8])
    report = w.report(1.0)
    assert report.borrowed == [(pytest.approx(1.0), 100), (pytest.approx(0.6), 100), (pytest.approx(0.2), 100)]
    grant = q.exchange(report, 1.0)
    assert grant.slots[0] == pytest.approx(0.0)  # the debt, booked as of when it was spent, is behind us
    assert q.exchange(Report(want=True), 1.0).slots[0] == pytest.approx(0.1 * len(grant.slots))


def test_a_worker_out_of_slots_waits_for_the_lease_on_its_way_rather_than_go_alone() -> None:
    q, w = quota(workers=1, rpm=600), worker(1, rpm=600)
    exchange(q, w, 0.0)
    assert sends(w, 3, 0.0) == pytest.approx([0.0, 0.1, 0.2])  # the first lease, spent
    thread = threading.Thread(target=lambda: (w.due.wait(), exchange(q, w, 0.0)))  # as the exchanger does
    thread.start()
    assert w.reserve(100, 0.0) == pytest.approx(0.3)  # the job's next slot
    thread.join()
    assert not w.report(0.0).borrowed


def test_a_report_the_actor_never_got_goes_with_the_next() -> None:
    w = worker(rpm=None)
    w.observe(429, {}, 0.0)
    lost = w.report(0.0)
    w.observe(200, {}, 0.1)
    w.returned(lost, 0.0)
    assert w.report(0.2).observations == [(0.2, 429, {}), (pytest.approx(0.1), 200, {})]


def test_slots_given_back_by_a_stopping_worker_go_to_the_others() -> None:
    q, leaving, staying = quota(workers=2, rpm=600), worker(2, rpm=600), worker(2, rpm=600)
    exchange(q, leaving, 0.0)  # slots at 0 and 0.1 (a lease for 2 workers at 10/s: 2 slots)
    last = leaving.report(0.0, final=True)
    assert last.unused == (2, 200) and not last.want
    q.exchange(last, 0.0)
    exchange(q, staying, 0.0)
    assert staying.reserve(100, 0.0) == 0.0


def test_a_slot_long_past_is_not_sent_on() -> None:
    q, w = quota(workers=1, rpm=600), worker(1, rpm=600)
    exchange(q, w, 0.0)  # 3 slots: 0, 0.1, 0.2
    assert w.reserve(100, 0.1 + STALE_S / 2) == 0.0  # a little late: sent at once
    w.returned(w.report(0.5), 0.5)  # the Quota could not be reached
    assert w.reserve(100, 0.2 + 2 * STALE_S) == 0.0 and w.report(1.0).borrowed  # the rest dropped: alone


def test_leases_reach_no_further_than_the_horizon() -> None:
    q = quota(workers=1, rpm=600)
    q.exchange(Report(borrowed=[(-5.0, 1)] * 20), 0.0)  # debt booked 5 s ahead: the schedule is far off
    grant = q.exchange(Report(want=True), 0.0)
    assert len(grant.slots) == 1 and grant.slots[0] > HORIZON_S  # one slot, the next due


def test_a_quota_made_again_leases_nothing_before_the_old_leases_ran_out() -> None:
    grant = quota(now=10.0, pause_s=HORIZON_S).exchange(Report(want=True), 10.0)
    assert grant.slots[0] == pytest.approx(HORIZON_S)


def test_tokens_are_booked_by_the_workers_estimate_and_corrected_by_usage() -> None:
    q, w = quota(workers=1, rpm=None, tpm=6000), worker(1, rpm=None, tpm=6000)  # 100 tokens/s
    grant = q.exchange(Report(want=True, tokens_each=50), 0.0)
    assert grant.slots == (0.0,) and grant.chunk == 1  # a quarter second's worth: half a request
    assert q.exchange(Report(want=True, tokens_each=50), 0.0).slots == (0.5,)
    w.receive(grant, 0.0)
    assert w.reserve(80, 0.0) == 0.0  # 30 more than booked ...
    w.correct_tokens(20)  # ... and the answer used 20 more than estimated
    assert w.report(0.0).tokens == 50


def test_release_gives_back_booked_slots_but_never_time_already_past() -> None:
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=6000)
    for _ in range(5):
        limiter.reserve(100, 0.0)  # booked to 0.5 s (requests) and 5 s (tokens)
    limiter.release(2, 200, 0.0)
    assert limiter.reserve(0, 0.0) == pytest.approx(3.0)  # tokens: 500 - 200 booked
    limiter.release(100, 10_000, 1.0)
    assert limiter.reserve(0, 1.0) == 0.0
