"""The limit on requests in flight, found from the server's push-back."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from batchrun.policy.concurrency import PROBE_FIRST_S, ConcurrencyLimit
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults


def fill(gate: ConcurrencyLimit, n: int) -> list[tuple[int, int]]:
    """n requests ask to enter at once: those the limit lets through, without waiting."""
    sent: list[tuple[int, int]] = []
    for _ in range(n):
        coroutine = gate.enter()
        try:
            coroutine.send(None)
        except StopIteration as done:  # entered on the fast path
            sent.append(done.value)
        else:  # it would wait: withdraw
            coroutine.close()
    return sent


@pytest.mark.anyio
async def test_a_full_server_cuts_the_limit_to_what_it_admitted_once_per_change() -> None:
    gate = ConcurrencyLimit(32)
    sent = fill(gate, 31)
    assert [k for k, _ in sent] == list(range(31))
    for s in sent[2:]:  # the server holds 2: the rest are pushed back at once
        gate.leave(s, "pushback", now=0.01)
    assert gate.limit == 1 and gate.control.cuts == 1  # requests sent before the cut say nothing about it
    gate.leave(sent[0], "ok", now=0.05)
    gate.leave(sent[1], "ok", now=0.05)
    assert gate.limit == 2  # one step a round trip, up to the level below the one that failed


@pytest.mark.anyio
async def test_the_failed_level_is_probed_after_doubling_clean_spells() -> None:
    gate = ConcurrencyLimit(32)
    gate.leave(fill(gate, 1)[0], "ok", now=0.0)
    burst = fill(gate, 3)
    gate.leave(burst[2], "pushback", now=0.0)  # k=2 pushed back: at most 2 in flight
    for s in burst[:2]:
        gate.leave(s, "ok", now=0.0)
    assert gate.limit == 2
    now, probes = 0.0, []
    while now < 70:
        now += 0.05
        pair = fill(gate, 3)  # always wanting more than the limit
        for s in pair:
            gate.leave(s, "pushback" if s[0] >= 2 else "ok", now=now)
            if s[0] >= 2:
                probes.append(round(now, 2))
    assert gate.limit == 2
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(probes) <= 7, probes  # 1, 2, 4, 8, 16, 32 s apart: a handful in 70 s, not one a second
    assert all(later >= earlier * 1.9 for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[0] >= PROBE_FIRST_S


@pytest.mark.anyio
async def test_a_pushback_at_a_level_that_went_through_lately_is_not_about_concurrency() -> None:
    gate = ConcurrencyLimit(16)
    sent = fill(gate, 8)
    for s in sent[3:]:
        gate.leave(s, "ok", now=0.1)
    gate.leave(sent[2], "pushback", now=0.1)  # k=2: but k=7 went through just now...
    assert gate.limit == 16  # ... so this is a rate limit or a stray, for the rate policy
    gate.leave(sent[1], "pushback", now=0.1)
    assert gate.limit == 16 and gate.control.cuts == 0


@pytest.mark.anyio
async def test_the_limit_grows_back_when_the_server_frees_up() -> None:
    gate = ConcurrencyLimit(8)
    sent = fill(gate, 5)
    gate.leave(sent[4], "pushback", now=0.0)
    assert gate.limit == 1
    for s in sent[:4]:
        gate.leave(s, "ok", now=0.0)
    now = 0.0
    while now < 60 and gate.limit < 8:
        now += 0.05
        for s in fill(gate, 8):
            gate.leave(s, "ok", now=now)
    assert gate.limit == 8, now


@pytest.mark.anyio
async def test_a_fixed_limit_never_moves() -> None:
    gate = ConcurrencyLimit(4, fixed=True)
    sent = fill(gate, 6)
    assert len(sent) == 4  # the other two waited
    for s in sent:
        gate.leave(s, "pushback", now=0.0)
    assert gate.limit == 4 and gate.in_flight == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    gate = ConcurrencyLimit(1)
    first = await gate.enter()
    with anyio.move_on_after(0.01):
        await gate.enter()
    gate.leave(first, "ok", now=0.0)
    assert gate.in_flight == 0
    assert await gate.enter() == (0, gate.control.generation)


def test_a_server_that_holds_two_in_flight_gets_few_429s_and_every_row(tmp_path: Path, server: FakeServer) -> None:
    rows = 400
    server.faults = Faults(max_in_flight=2, retry_after="3", latency_s=0.02)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}"} for i in range(rows)])
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["ok"] * rows
    assert all(len(server.answers[f"row {i}"]) == 1 for i in range(rows))
    busy = sum(r.outcome == "busy" for r in server.requests)
    assert busy < rows / 10, busy  # the first burst, then a few probes: not a 429 per row
    # A row back from its retry-after never probes: no row waits twice
    assert max(r["attempts"] for r in out) == 2, sorted(r["attempts"] for r in out)[-5:]


@pytest.mark.anyio
async def test_a_neighbour_refused_at_once_does_not_count_as_held() -> None:
    gate = ConcurrencyLimit(8)
    a, b, c = fill(gate, 3)
    gate.leave(c, "pushback", now=0.0)  # refused in milliseconds: it held no slot
    assert gate.limit == 1
    gate.leave(a, "ok", now=0.05)
    gate.leave(b, "ok", now=0.05)  # left beside 1 other, came back beside none
    assert max(gate.control._ok_k) == 0  # so it proves nothing beyond a request alone
    assert gate.limit == 2


@pytest.mark.anyio
async def test_a_request_back_from_a_429_never_probes() -> None:
    gate = ConcurrencyLimit(8)
    a, b, c = fill(gate, 3)
    gate.leave(c, "pushback", now=0.0)  # k=2 failed
    gate.leave(a, "ok", now=0.0)
    gate.leave(b, "ok", now=0.0)
    gate.control.limit = 3  # as if a probe had raised it
    first, second = fill(gate, 2)
    assert await gate.enter() == (2, gate.control.generation)  # a fresh request may probe
    third = fill(gate, 1)
    assert third == []  # the limit is full
    for s in (first, second):
        gate.leave(s, "ok", now=0.1)
    coroutine = gate.enter(cautious=True)
    try:
        coroutine.send(None)
        entered = None
    except StopIteration as done:
        entered = done.value
    assert entered == (1, gate.control.generation)  # below the level that failed: in
    coroutine = gate.enter(cautious=True)
    assert coroutine.send(None) is not None  # at it: waits, though the limit has room
    coroutine.close()


@pytest.mark.anyio
async def test_a_limit_the_server_states_is_kept() -> None:
    gate = ConcurrencyLimit(32)
    gate.stated(2)
    assert len(fill(gate, 5)) == 2 and gate.maximum == 2


def test_a_row_told_to_wait_waits_aside_while_the_others_go_on(tmp_path: Path, server: FakeServer) -> None:
    """One worker: a row that meets a 429 with retry-after: 3 must not hold up the rest."""
    told: list[float] = []

    def once(body: dict) -> tuple[int, dict] | None:
        if body["prompt"] == "row 2" and not told:
            told.append(time.monotonic())
            return 429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit"}}
        return None

    server.faults = Faults(status_for=once, retry_after="3", latency_s=0.005)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}"} for i in range(40)])
    spec = write_spec(tmp_path, concurrency=1, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(40)) and {r["status"] for r in out} == {"ok"}
    assert [r["attempts"] for r in out] == [1, 1, 2] + [1] * 37  # the request it met the 429 with counts
    ok_times = {r.key: r.at for r in server.requests if r.outcome == "ok"}
    assert all(ok_times[f"row {i}"] < told[0] + 2 for i in range(3, 40))  # the others went on at once
    assert ok_times["row 2"] >= told[0] + 3  # and it waited as it was told
