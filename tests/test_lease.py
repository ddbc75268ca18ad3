"""Leases of a job-wide rate limit and limit on requests in flight: pure bookkeeping, no Ray,
no server, and no sleeping but a gate's."""

from __future__ import annotations

import threading

import anyio
import pytest

from batchrun.backends.ray.quota import EXPECT_S, GONE_S, HORIZON_S, STALE_S, Grant, LeasedLimiter, Quota, Report
from batchrun.policy.concurrency import ConcurrencyLimit
from batchrun.policy.rate import RateLimiter
from batchrun.policy.verdict import Verdict, judge


def judged(status: int, headers: dict[str, str]) -> Verdict:
    """The verdict on an answer, as the client judges it once and hands it on."""
    return judge(status, headers, now=0.0, rand=lambda: 0.5)


def quota(workers: int = 4, rpm: float | None = 2700, tpm: float | None = None, **kw: float) -> Quota:
    return Quota(requests_per_minute=rpm, tokens_per_minute=tpm, workers=workers, concurrency=32,
                 now=kw.pop("now", 0.0), **kw)


def worker(workers: int = 4, rpm: float | None = 2700, tpm: float | None = None) -> LeasedLimiter:
    return LeasedLimiter(requests_per_minute=rpm, tokens_per_minute=tpm, workers=workers, tokens_each=100,
                         concurrency=32)


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
        seen.observe(judged(200, {}), now)
    for _ in range(20):
        seen.observe(judged(429, {"retry-after": "1"}), now)
    assert seen.due.is_set()  # a push-back is reported at once, not at the next refresh
    exchange(q, seen, now)
    exchange(q, other, now)

    assert not other.unlimited and other.rate == pytest.approx(20 * 0.9, rel=0.1)
    assert other.report(now).want
    assert q.limiter.pushbacks == 20


def test_a_stated_server_limit_seen_by_one_worker_caps_the_job() -> None:
    q, w = quota(rpm=None), worker(rpm=None)
    w.observe(judged(200, {"x-ratelimit-limit-requests": "600", "content-type": "application/json"}), 0.0)
    assert w.report(0.0).observations == [(0.0, judged(200, {"x-ratelimit-limit-requests": "600"}))]  # the verdict
    w.observe(judged(200, {"x-ratelimit-limit-requests": "600"}), 0.0)
    exchange(q, w, 0.0)
    assert q.limiter.rate == pytest.approx(600 / 60 * 0.95)
    assert not w.unlimited


def test_a_litellm_keys_limit_seen_by_one_worker_caps_the_job() -> None:
    q, w = quota(rpm=None), worker(rpm=None)
    w.observe(judged(200, {"x-ratelimit-api_key-limit-requests": "5", "x-ratelimit-api_key-remaining-requests": "4"}), 0.0)
    exchange(q, w, 0.0)
    assert q.limiter.rate == pytest.approx(5 / 60 * 0.95)


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
    w.observe(judged(429, {}), 0.0)
    lost = w.report(0.0)
    w.observe(judged(200, {}), 0.1)
    w.returned(lost, 0.0)
    assert w.report(0.2).observations == [(0.2, judged(429, {})), (pytest.approx(0.1), judged(200, {}))]


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


# -- requests in flight ---------------------------------------------------------------------


def in_flight_report(worker: int, in_flight: int, waiting: int, allotment: int, **kw: object) -> Report:
    return Report(worker=worker, in_flight=in_flight, waiting=waiting, allotment=allotment, **kw)


def heard(q: Quota) -> Quota:
    q.heard = True  # as once the job's first request has come back
    return q


def test_the_jobs_first_request_goes_alone_and_a_stated_limit_holds_before_the_others_go() -> None:
    q = quota(workers=4)
    grants = [q.exchange(in_flight_report(i, 0, 8, 0), 0.0).allotment for i in range(4)]
    assert grants == [1, 0, 0, 0]
    assert q.exchange(in_flight_report(1, 0, 8, 0), 0.05).allotment == 0  # worker 0 holds it
    answer = [(0.1, 0.05, 0, 0, 0, "ok", None)]  # with LiteLLM's limit of 2 on it
    grant = q.exchange(in_flight_report(0, 0, 8, 1, answers=answer, stated=2), 0.1)
    assert q.heard and q.control.limit == 2 and grant.allotment <= 2
    grants = [q.exchange(in_flight_report(i, 0, 8, 0), 0.1).allotment for i in range(1, 4)]
    assert grant.allotment + sum(grants) <= 2


def test_the_jobs_requests_in_flight_are_shared_by_demand() -> None:
    q = heard(quota(workers=4))  # concurrency 32 for the job
    grants = [q.exchange(in_flight_report(i, 0, 32, 0), 1.0).allotment for i in range(2)]
    assert grants == [8, 8]  # the first to ask does not take the shares of those still starting
    assert q.exchange(in_flight_report(0, 1, 0, 8), 1.1).allotment == 1  # it wants 1, the other more:
    assert q.exchange(in_flight_report(1, 8, 32, 8), 1.1).allotment == 8  # once the first holds 1 at most ...
    q.exchange(in_flight_report(0, 1, 0, 1), 1.2)
    assert q.exchange(in_flight_report(1, 8, 32, 8), 1.2).allotment == 15  # ... the other gets its 7
    later = 1.0 + EXPECT_S
    for now in (later - 1, later):
        grants = [q.exchange(in_flight_report(i, held, 32, held), now).allotment for i, held in enumerate((1, 15))]
    assert grants == [16, 16]  # the other two never came: theirs go to those there
    # Three want more than their share, one 4: it keeps what it wants, the others share the rest
    wants, held = [32, 32, 32, 4], [16, 16, 0, 0]
    for _ in range(4):
        for i in range(4):
            in_flight = min(wants[i], held[i])
            held[i] = q.exchange(in_flight_report(i, in_flight, wants[i] - in_flight, held[i]), later).allotment
    assert held[3] == 4 and sorted(held[:3]) == [9, 9, 10]
    assert q.exchange(Report(worker=3, final=True), later).allotment == 0
    for _ in range(3):
        held = [q.exchange(in_flight_report(i, held[i], 32, held[i]), later).allotment for i in range(3)]
    assert sorted(held) == [10, 11, 11]  # its 4 freed when it stopped


def test_a_jobs_limit_that_does_not_divide_evenly_goes_round() -> None:
    q = heard(quota(workers=4))
    q.control.stated(2)  # the server holds 2
    held = {i: 0 for i in range(4)}
    turns: list[tuple[int, ...]] = []
    now = 0.0
    while now < 20.0:
        for i in range(4):
            held[i] = q.exchange(in_flight_report(i, held[i], 8, held[i]), now).allotment
            assert sum(held.values()) <= 2
        now += 0.1
        turns.append(tuple(i for i in range(4) if held[i]))
    assert set(turns[5:]) >= {(0, 1), (1, 2), (2, 3), (0, 3)}, set(turns)  # every worker gets its turn


def test_the_jobs_control_counts_every_workers_requests_in_flight() -> None:
    q = quota(workers=2)
    q.exchange(in_flight_report(0, 1, 0, 16, open=[0.0]), 0.0)  # worker 0: one request out since 0.0
    # Worker 1: a request alone in it went through; the next, beside it, was refused at once
    answers = [(0.1, 0.05, 0, 0, 0, "ok", None), (0.09, 0.089, 1, 1, 0, "pushback", 60.0)]
    q.exchange(in_flight_report(1, 0, 32, 16, answers=answers), 0.1)
    assert q.control.limit == 32  # not weighed before worker 0 says what it had out meanwhile ...
    grant = q.exchange(in_flight_report(0, 1, 0, 16, open=[0.1]), 0.1)
    # ... the refused one went beside 2 (one of the other worker's): the limit is cut, and
    # the good one (beside 1) takes it back up a step, below the level that failed
    assert (q.control.limit, q.control.failed_at, q.control.cuts) == (2, 3, 1)
    assert grant.generation == q.control.generation == 2 and grant.limit == 2
    stale = [(0.1, 0.1, 5, 5, 0, "pushback", 60.0)]  # sent before the cut: says nothing about it
    q.exchange(in_flight_report(1, 0, 32, 1, answers=stale), 0.2)
    q.exchange(in_flight_report(0, 1, 0, 1, open=[0.2]), 0.2)
    assert q.control.cuts == 1


def test_a_request_that_held_a_slot_counts_whatever_its_answer() -> None:
    q = quota(workers=2)
    q.exchange(in_flight_report(0, 0, 0, 16, answers=[(0.1, 0.0, 0, 0, 0, None, None)]), 0.1)  # a 500, say
    q.exchange(in_flight_report(1, 0, 32, 16, answers=[(0.05, 0.04, 0, 0, 0, "pushback", None)]), 0.1)
    assert q.control.limit == 1 and q.control.failed_at == 2  # refused beside the other worker's one


def test_a_worker_stopped_or_gone_holds_nothing() -> None:
    q = heard(quota(workers=2))
    q.exchange(in_flight_report(0, 0, 32, 0), 0.0)
    assert q.exchange(in_flight_report(1, 0, 32, 0), 0.0).allotment == 16
    q.exchange(Report(worker=0, final=True), 0.1)
    assert q.exchange(in_flight_report(1, 16, 32, 16), 0.1).allotment == 32  # it stopped: all for the other
    q.exchange(in_flight_report(0, 0, 32, 0), 0.2)  # run again, and lost without a word ...
    assert q.exchange(in_flight_report(1, 32, 32, 32), 0.2).allotment == 16
    assert q.exchange(in_flight_report(1, 16, 32, 16), 0.3).allotment == 16
    assert q.exchange(in_flight_report(1, 16, 32, 16), 0.2 + GONE_S + 0.1).allotment == 32  # ... its share freed


def test_a_worker_sends_no_more_than_its_allotment_and_alone_its_share() -> None:
    w = worker(workers=4)
    assert w.control.limit == 8  # before the first grant: its share of the job's 32
    report = w.report(0.0)
    assert (report.allotment, report.waiting) == (0, 8)  # not running yet: it wants its share at once
    w.receive(Grant(None, allotment=3, cautious=1, generation=5, limit=6), 0.0)
    assert (w.control.ceiling(False), w.control.ceiling(True), w.control.generation) == (3, 1, 5)
    w.control.answered(2, 1, 5, "pushback", 0.5, 60.0, sent=0.4)
    lost = w.report(1.0)
    assert lost.answers == [(0.6, 0.5, 2, 1, 5, "pushback", 60.0)]
    w.returned(lost, 1.0)  # the Quota cannot be reached: alone, at its share of the job's last limit
    assert w.control.limit == 3 and w.report(1.5).answers == [(1.1, 1.0, 2, 1, 5, "pushback", 60.0)]
    w.receive(Grant(None, allotment=0, limit=2), 2.0)
    w.returned(w.report(2.0), 2.0)
    assert w.control.limit == 1  # never none, alone


@pytest.mark.anyio
async def test_a_gate_waiting_on_its_allotment_goes_when_another_thread_raises_it() -> None:
    w = worker(workers=4)
    w.receive(Grant(None, allotment=1, cautious=1, limit=4), 0.0)
    gate = ConcurrencyLimit(32, control=w.control)
    first = await gate.enter()
    report = w.report(first[2] + 0.5)
    assert (report.in_flight, report.waiting, report.open) == (1, 0, [0.5])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.enter)
            await anyio.sleep(0.05)
            assert gate.waiting == 1 and w.report(0.0).waiting == 1
            threading.Thread(target=w.receive, args=(Grant(None, allotment=2, cautious=2, limit=4), 0.0)).start()
    assert gate.in_flight == 2
    gate.leave(first, "ok", first[2] + 0.1)
    report = w.report(first[2] + 0.2)
    assert report.answers == [(pytest.approx(0.2), pytest.approx(0.1), 0, 0, 0, "ok", None)]
    assert len(report.open) == 1  # the second, still out


@pytest.mark.anyio
async def test_a_worker_pushed_back_holds_back_until_the_quota_has_weighed_it() -> None:
    w = worker(workers=2)
    w.receive(Grant(None, allotment=2, cautious=2, limit=4), 0.0)
    gate = ConcurrencyLimit(32, control=w.control)
    first, second = await gate.enter(), await gate.enter()
    gate.leave(second, "pushback", second[2] + 0.01, 6.0)  # the server is full: no more than the 1 still out
    assert w.control.limit == 1 and w.due.is_set()
    pushed = second[2] + 0.01
    w.receive(Grant(None, allotment=2, limit=4, weighed_s=0.05), pushed + 0.01)  # weighed until before it
    assert w.control.limit == 1
    w.receive(Grant(None, allotment=2, limit=4, weighed_s=0.0), pushed + 0.02)  # weighed: a stray, say
    assert w.control.limit == 2
    gate.leave(first, "ok", pushed + 0.03)


def test_a_worker_hears_at_once_that_another_was_answered() -> None:
    q = quota(workers=2, rpm=None)
    assert not q.exchange(in_flight_report(1, 0, 32, 0), 0.0).admitting
    other = worker(workers=2, rpm=None)
    other.observe(judged(200, {}), 0.05)
    q.exchange(other.report(0.06), 0.06)
    assert q.exchange(in_flight_report(1, 0, 32, 0), 0.07).admitting  # not only once the answers are weighed


def test_answers_that_came_back_at_the_same_moment_are_weighed_whatever_their_waits() -> None:
    q = heard(quota(workers=1))
    answers = [(0.1, 0.05, 3, 3, 0, "pushback", None), (0.1, 0.05, 3, 3, 0, "pushback", 60.0)]
    q.exchange(in_flight_report(0, 0, 32, 32, answers=answers), 0.2)  # no TypeError comparing None and 60.0
    assert q.control.cuts == 1 and not q._pending
