"""The budget at the moment of a call (engine/holds.py): worst cases, holds, charges. No server."""

from __future__ import annotations

import anyio
import pytest

from batchrun import BudgetReached, parse_spec
from batchrun.endpoints.result import Result
from batchrun.engine.holds import Holds, Worst
from batchrun.policy.pricing import Budget, Hold, Price

PRICE = Price(input=1.0, output=2.0)  # USD per million tokens


def holds(budget: Budget | None, log: object = None, **raw: object) -> Holds:
    spec = parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m", **raw}, environ={})
    return Holds(spec, budget, log)  # type: ignore[arg-type]


def answer(prompt: int | None, completion: int | None) -> Result:
    total = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
    return Result(0, "r", "ok", prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def test_the_worst_case_is_the_requests_bytes_and_its_max_tokens_times_n() -> None:
    h = holds(Budget(1.0, None))
    assert h.worst(PRICE, {"max_tokens": 10, "n": 2}, 100) == Worst(usd=(100 * 1.0 + 20 * 2.0) * 1e-6, tokens=120)
    assert h.worst(PRICE, {}, 100) == Worst(usd=None, tokens=None)  # no max_tokens: no bound
    assert holds(None).worst(None, {"max_tokens": 10}, 100) is None  # nothing asks for it


@pytest.mark.parametrize("max_tokens,bound", [(200, 200), (200.0, 200), (None, None), (200.5, None), ("200", None),
                                              (True, None), (-1, None)])
def test_only_a_whole_max_tokens_bounds_the_answer(max_tokens: object, bound: int | None) -> None:
    """A null asks for no bound (the API's default, or none): never a worst case of 0."""
    h = holds(Budget(1.0, None))
    worst = h.worst(PRICE, {"max_tokens": max_tokens}, 100)
    assert worst == (Worst(usd=(100 + 2 * bound) * 1e-6, tokens=100 + bound) if bound is not None else
                     Worst(usd=None, tokens=None))
    spec = parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m", "pricing": {"m": {"input": 1.0}},
                       "budget": {"max_usd": 1.0, "assume_max_tokens": 50}}, environ={})
    assumed = Holds(spec, Budget(1.0, None), None).worst(PRICE, {"max_tokens": max_tokens}, 100)
    assert assumed is not None and assumed.tokens == 100 + (bound if bound is not None else 50)


def test_n_and_best_of_multiply_the_worst_case_and_bound_only_as_whole_numbers() -> None:
    h = holds(Budget(1.0, None))
    assert h.worst(PRICE, {"max_tokens": 10, "n": 4.0}, 100).tokens == 140
    assert h.worst(PRICE, {"max_tokens": 10, "best_of": 8, "n": 2}, 100).tokens == 180  # best_of are all billed
    assert h.worst(PRICE, {"max_tokens": 10, "n": "4"}, 100) == Worst(usd=None, tokens=None)  # a server may read 4
    assert h.worst(PRICE, {"max_tokens": 10, "n": None}, 100).tokens == 110


def test_an_embeddings_request_is_held_at_its_bytes_with_no_completion() -> None:
    h = holds(Budget(1.0, None))
    assert h.worst(PRICE, {}, 1000, generates=False) == Worst(usd=1000 * 1e-6, tokens=1000)


def test_a_hold_that_would_not_fit_even_alone_stops_the_job_with_what_to_do() -> None:
    h = holds(Budget(1e-5, None, spent_usd=0.9e-5))

    async def main() -> None:
        await h.hold(Worst(usd=5e-6, tokens=10), 1)

    with pytest.raises(BudgetReached, match="raise the budget in .* and rerun"):
        anyio.run(main)


def test_a_hold_waits_for_the_requests_in_flight_to_settle() -> None:
    budget = Budget(None, 100)
    h = holds(budget)
    order: list[str] = []

    async def main() -> None:
        first = await h.hold(Worst(None, 60), 1)
        order.append("first held")

        async def second() -> None:
            await h.hold(Worst(None, 60), 1)  # 60 + 60 > 100: waits for the first
            order.append("second held")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert order == ["first held"]  # the second is waiting, not refused
            order.append("first settles")
            h.let_go(first, 0.0, 10, saved=True)

    anyio.run(main)
    assert order == ["first held", "first settles", "second held"]
    assert (budget.spent_tokens, budget.held_tokens) == (10, 60)


def test_re_asks_are_each_charged_and_their_usage_added_up() -> None:
    budget = Budget(1.0, None)
    h = holds(budget)
    hold = budget.reserve(1e-4, 100)
    first, second = answer(3, 2), answer(4, 1)
    h.charge(second, [first, second], PRICE, Worst(1e-4, 100), hold)
    assert (second.prompt_tokens, second.completion_tokens, second.total_tokens) == (7, 3, 10)
    assert second.cost_usd == pytest.approx((7 * 1.0 + 3 * 2.0) * 1e-6)
    assert second.hold == hold.id  # let go as the answer is saved
    assert (budget.spent_usd, budget.spent_tokens, budget.held_usd) == (pytest.approx(13e-6), 10, 0.0)


def test_an_answer_without_usage_is_charged_at_its_worst_case_never_free() -> None:
    budget = Budget(1.0, None)
    result = answer(None, None)
    holds(budget).charge(result, [result], PRICE, Worst(5e-5, 50), budget.reserve(5e-5, 50))
    assert result.cost_usd == 5e-5
    assert result.extra == {"unmetered": 1, "unmetered_tokens": 50}
    assert budget.spent_tokens == 50


def test_an_answer_whose_usage_leaves_out_its_completion_is_charged_at_its_worst_case() -> None:
    """A completion its usage does not count is no free one; an embedding has none to count."""
    budget = Budget(1.0, None)
    result = answer(100, None)
    holds(budget).charge(result, [result], PRICE, Worst(5e-4, 300), budget.reserve(5e-4, 300))
    assert (result.cost_usd, result.extra) == (5e-4, {"unmetered": 1, "unmetered_tokens": 300})
    embedded = answer(100, None)
    holds(budget).charge(embedded, [embedded], PRICE, Worst(1e-4, 100), budget.reserve(1e-4, 100), generates=False)
    assert (embedded.cost_usd, embedded.extra) == (pytest.approx(1e-4), None)


def test_a_hold_let_go_without_an_answer_to_save_is_released_from_the_state() -> None:
    released: list[int] = []

    class Log:
        async def record(self, hold: Hold) -> None:
            pass

        def release(self, hold: Hold) -> None:
            released.append(hold.id)

    budget = Budget(1.0, None, next_hold=7)
    h = holds(budget, Log())
    h.let_go(budget.reserve(0.1, 1))
    h.let_go(budget.reserve(0.1, 1), 0.1, 1, saved=True)
    assert released == [7]


def test_a_failed_groups_cost_is_split_by_input_length() -> None:
    request = Result(0, "r", "failed", cost_usd=3e-6)
    rows = [Result(i, f"r{i}", "failed") for i in range(2)]
    Holds.split_cost(rows, request, [2, 1], paid=True)
    assert [r.cost_usd for r in rows] == [pytest.approx(2e-6), pytest.approx(1e-6)]
    unpaid = [Result(i, f"r{i}", "failed") for i in range(2)]
    Holds.split_cost(unpaid, request, [2, 1], paid=False)
    assert [r.cost_usd for r in unpaid] == [None, None]


def test_a_lost_attempt_is_spent_and_kept_in_the_state_and_the_next_attempt_held_anew() -> None:
    recorded: list[Hold] = []
    for_good: list[int] = []
    released: list[int] = []

    class Log:
        async def record(self, hold: Hold, kept: bool = False) -> None:
            recorded.append(hold)
            if kept:
                for_good.append(hold.id)

        def release(self, hold: Hold) -> None:
            released.append(hold.id)

    budget = Budget(1.0, None, next_hold=1)
    h = holds(budget, Log())
    worst = Worst(0.3, 30)

    async def main() -> tuple[Hold | None, Hold | None]:
        first = await h.hold(worst, 1)
        again = await h.unanswered(first, worst, 1, again=True)  # 0.3 spent, 0.3 held anew
        last = await h.unanswered(again, worst, 1, again=False)  # the last attempt: nothing follows
        return first, again, last

    first, again, last = anyio.run(main)
    assert [hold.id for hold in recorded] == [1, 2, 3, 4]  # held, lost (kept), held anew, lost (kept)
    assert released == [1]  # only the first hold: the lost attempts stay, as a kill's do
    assert for_good == [2, 4]
    assert again is not None and again.id == 3 and last is again  # (let go with the row's answer)
    assert (budget.spent_usd, budget.held_usd) == (pytest.approx(0.6), pytest.approx(0.3))

    async def no_room() -> None:
        await h.unanswered(last, worst, 1, again=True)  # 0.9 spent: another 0.3 would pass 1.0

    with pytest.raises(BudgetReached):
        anyio.run(no_room)
    assert budget.spent_usd == pytest.approx(0.9) and budget.held_usd == 0.0


def test_a_retry_the_budget_cannot_hold_says_why_it_was_not_sent() -> None:
    from batchrun.engine.call import _Held
    from batchrun.http.client import Request

    async def why(closing: bool) -> str | None:
        # Stopping: 0.6 more fits alone (it would wait for the 0.5 in flight), but the job stops
        budget = Budget(1.5 if closing else 1.0, None)
        h = holds(budget)
        request = Request("http://127.0.0.1:9/v1/completions", b"{}", "completions", False, 0)
        await _Held.take(h, request, Worst(0.6, 60), 1)
        if closing:
            await h.hold(Worst(0.5, 50), 1)  # another request in flight
            h.stop()
        request.lost = 1  # its attempt may have been paid for: 0.6 spent
        return await request.again()  # type: ignore[misc]

    assert anyio.run(why, False) == "the budget holds no other attempt"
    assert anyio.run(why, True) == "the job is stopping"


def test_a_lost_re_ask_keeps_the_hold_that_covers_the_answers_already_paid() -> None:
    """Answers were paid under the hold (a re-ask's attempt was lost): the hold stays, so
    they stay covered, and another attempt goes only if the budget holds it now."""
    from batchrun.engine.holds import Crowded

    budget = Budget(1.0, None)
    h = holds(budget)
    worst = Worst(0.2, 20)

    async def main() -> None:
        held = await h.hold(worst, 3)  # the answer and two re-asks: 0.6
        assert await h.unanswered(held, worst, 3, again=True, paid=True) is held  # 0.2 spent: 0.8 of 1.0
        assert (budget.spent_usd, budget.held_usd) == (pytest.approx(0.2), pytest.approx(0.6))
        other = await h.hold(Worst(0.2, 20), 1)  # a request in flight beside it: 1.0
        assert other is not None
        with pytest.raises(Crowded):  # 0.4 spent + 0.8 held: not now (the other may settle for less)
            await h.unanswered(held, worst, 3, again=True, paid=True)
        assert budget.held_usd == pytest.approx(0.8)  # still held: the paid answers stay covered
        h.let_go(other)
        with pytest.raises(BudgetReached):  # 0.6 spent + 0.6 held: not even alone
            await h.unanswered(held, worst, 3, again=True, paid=True)

    anyio.run(main)
