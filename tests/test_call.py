"""A row's call (engine/call.py) over MockTransport: the cache, the budget's holds, the
re-ask, the charge, the key kept out; and the client's limits, given through its constructor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batchrun import parse_spec
from batchrun.endpoints.result import Result
from batchrun.engine.cache import ResponseCache
from batchrun.engine.call import Caller
from batchrun.http import client as client_module
from batchrun.http.client import Client
from batchrun.inputs.reader import Row
from batchrun.policy.concurrency import ConcurrencyLimit, Control
from batchrun.policy.pricing import Budget, Hold
from batchrun.policy.rate import RateLimiter
from batchrun.policy.verdict import Verdict
from batchrun.spec.model import CacheSpec

KEY = "sk-call-secret-123"
ROW = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "q"}]}, "line 1")
PRICES = {"m": {"input": 1.0, "output": 2.0}}  # USD per million tokens


def answer(text: str = "hi", tokens: tuple[int, int] = (3, 2)) -> httpx.Response:
    return httpx.Response(200, json={"id": "a", "model": "m", "choices": [
        {"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)}})


def spec(**raw: object) -> Any:
    return parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m",
                       "api": {"base_url": "http://127.0.0.1:9/v1"}, **raw}, environ={})


def transport(answers: list[httpx.Response], seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append("request")
        return answers.pop(0)

    return httpx.MockTransport(handler)


async def no_sleep(seconds: float) -> None:
    pass


def run(caller: Caller, row: Row = ROW) -> Result:
    async def main() -> Result:
        async with caller:
            return await caller.call(row)

    return anyio.run(main)


class Log:
    """A HoldLog that notes when holds are recorded and released, beside the requests."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def record(self, hold: Hold) -> None:
        self.events.append(f"record {hold.id}")

    def release(self, hold: Hold) -> None:
        self.events.append(f"release {hold.id}")


def test_a_cached_answer_is_returned_without_a_request_and_says_what_it_saved(tmp_path: Path) -> None:
    job = spec(params={"temperature": 0}, pricing=PRICES)
    cache = ResponseCache(CacheSpec(tmp_path / "cache.sqlite"))
    seen: list[str] = []
    first = run(Caller(job, Client(job, api_key=KEY, transport=transport([answer()], seen)), cache=cache))
    assert first.status == "ok" and first.cache_key is not None and seen == ["request"]
    cache.put([(first.cache_key, first)])  # (the writer's, once the state has it)

    caller = Caller(job, Client(job, api_key=KEY, transport=transport([], seen)), cache=cache)
    hit = run(caller, Row(7, "r7", "chat", ROW.body, "line 8"))
    assert seen == ["request"]  # no second request
    assert (hit.row_index, hit.id, hit.output_text, hit.cost_usd) == (7, "r7", "hi", 0.0)
    assert hit.extra == {"cached": True, "saved_usd": pytest.approx((3 * 1.0 + 2 * 2.0) * 1e-6)}
    assert caller.cache_hits == 1
    cache.close()


def test_a_request_that_is_not_deterministic_is_not_looked_up(tmp_path: Path) -> None:
    job = spec(params={"temperature": 0.7})
    cache = ResponseCache(CacheSpec(tmp_path / "cache.sqlite"))
    caller = Caller(job, Client(job, api_key=KEY, transport=transport([answer()], [])), cache=cache)
    result = run(caller)
    assert (result.status, result.cache_key, caller.uncacheable) == ("ok", None, 1)
    cache.close()


def test_the_hold_is_recorded_before_the_request_and_charged_with_the_answer() -> None:
    job = spec(pricing=PRICES, budget={"max_usd": 1.0}, params={"max_tokens": 10})
    events: list[str] = []
    budget = Budget(1.0, None)
    caller = Caller(job, Client(job, api_key=KEY, transport=transport([answer()], events)), budget=budget,
                    hold_log=Log(events))
    result = run(caller)
    assert events == ["record 1", "request"]  # the hold is in the state before the request goes
    assert result.hold == 1  # let go of as the answer is saved: no release
    assert result.cost_usd == pytest.approx(7e-6)
    assert (budget.spent_usd, budget.spent_tokens, budget.held_usd) == (pytest.approx(7e-6), 5, 0.0)


def test_a_hold_whose_request_is_refused_as_a_whole_leaves_the_state() -> None:
    job = spec(pricing=PRICES, budget={"max_usd": 1.0}, params={"max_tokens": 10})
    events: list[str] = []
    caller = Caller(job, Client(job, api_key=KEY, transport=transport([httpx.Response(401)], events)),
                    budget=Budget(1.0, None), hold_log=Log(events))
    with pytest.raises(Exception, match="HTTP 401"):
        run(caller)
    assert events == ["record 1", "request", "release 1"]


def test_an_answer_that_breaks_the_schema_is_asked_again_and_both_are_paid_for() -> None:
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    job = spec(schema=schema, pricing=PRICES)
    seen: list[str] = []
    client = Client(job, api_key=KEY, transport=transport([answer("no json"), answer('{"year": 1999}')], seen))
    result = run(Caller(job, client))
    assert (result.status, result.attempts, len(seen)) == ("ok", 2, 2)
    assert result.extra == {"parsed": {"year": 1999}}
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == (6, 4, 10)  # both answers
    assert result.cost_usd == pytest.approx(14e-6)


def test_a_key_echoed_in_an_answer_is_scrubbed_from_it() -> None:
    job = spec()
    client = Client(job, api_key=KEY, transport=transport([answer(f"your key is {KEY}, right?")], []))
    result = run(Caller(job, client))
    assert KEY not in result.output_text and result.output_text == "your key is [redacted], right?"


class Recording(RateLimiter):
    """A rate limiter that keeps the verdicts it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[Verdict] = []

    def observe(self, answer: Verdict, now: float) -> None:  # type: ignore[override]
        self.heard.append(answer)
        super().observe(answer, now)


def test_the_limits_come_in_through_the_constructor_and_each_answer_is_judged_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    judged: list[int] = []
    judge = client_module.judge

    def counting(status: int, *args: Any, **kwargs: Any) -> Verdict:
        judged.append(status)
        return judge(status, *args, **kwargs)

    monkeypatch.setattr(client_module, "judge", counting)
    job = spec()
    limiter, control = Recording(), Control(4)
    gate = ConcurrencyLimit(4, control=control)
    too_many = httpx.Response(429, headers={"retry-after": "1"}, json={"error": {"message": "slow down"}})
    client = Client(job, api_key=KEY, transport=transport([too_many, answer()], []), sleep=no_sleep,
                    limiter=limiter, in_flight=gate)
    assert (client.limiter, client.in_flight) == (limiter, gate)
    result = run(Caller(job, client))
    assert (result.status, result.attempts) == ("ok", 2)
    assert judged == [429, 200]  # one verdict per answer, whoever reads it
    assert [(v.status, v.pushed_back, v.rate_limited, v.wait) for v in limiter.heard] == [
        (429, True, True, 1.0), (200, False, False, limiter.heard[1].wait)]
    assert control.failed_at == 1  # the push-back reached the concurrency control as it was judged


def test_an_unreadable_good_answer_is_retried_as_its_verdict_says() -> None:
    job = spec(retry={"backoff_initial_s": 0.1})
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = Client(job, api_key=KEY, sleep=sleep,
                    transport=transport([httpx.Response(200, content=b'{"choi'), answer()], []))
    result = run(Caller(job, client))
    assert (result.status, result.attempts) == ("ok", 2)
    assert len(sleeps) == 1 and 0.05 <= sleeps[0] <= 0.1  # the first backoff


def group(responses: list[Callable[[dict], httpx.Response]], texts: list[str]) -> tuple[list[Result], list[dict]]:
    job = spec(endpoint="embeddings", pricing={"m": {"input": 1.0}})
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return responses.pop(0)(seen[-1])

    caller = Caller(job, Client(job, api_key=KEY, transport=httpx.MockTransport(handler), sleep=no_sleep))
    rows = [Row(i, f"r{i}", "embeddings", {"input": text}, f"line {i + 1}") for i, text in enumerate(texts)]

    async def main() -> list[Result]:
        async with caller:
            return await caller.call_group(rows)

    return anyio.run(main), seen


def vectors(body: dict) -> httpx.Response:
    data = [{"index": i, "embedding": [float(i)]} for i in range(len(body["input"]))]
    return httpx.Response(200, json={"model": "m", "data": data, "usage": {"prompt_tokens": 10, "total_tokens": 10}})


def test_a_group_is_one_request_whose_answer_the_endpoint_splits_by_input_length() -> None:
    results, seen = group([vectors], ["aaaa", "a"])
    assert [body["input"] for body in seen] == [["aaaa", "a"]]
    assert [(r.row_index, r.status, r.prompt_tokens, r.attempts) for r in results] == [(0, "ok", 8, 1), (1, "ok", 2, 1)]
    assert [r.cost_usd for r in results] == [pytest.approx(8e-6), pytest.approx(2e-6)]


def test_an_answer_that_does_not_hold_a_part_for_each_row_fails_them_all() -> None:
    def short(body: dict) -> httpx.Response:
        return vectors({"input": body["input"][:1]})

    results, _ = group([short], ["x", "y"])
    assert [(r.status, r.error) for r in results] == [("failed", "the answer has 1 embeddings for 2 inputs")] * 2


def test_a_group_refused_for_what_it_holds_is_split_until_the_row_fails_alone() -> None:
    def refuse_bad(body: dict) -> httpx.Response:
        if "bad" in body["input"]:
            return httpx.Response(400, json={"error": {"message": "input too long"}})
        return vectors(body)

    results, seen = group([refuse_bad] * 5, ["a", "bad", "c", "d"])
    assert [body["input"] for body in seen] == [["a", "bad", "c", "d"], ["a", "bad"], ["a"], ["bad"], ["c", "d"]]
    assert [(r.row_index, r.status) for r in sorted(results, key=lambda r: r.row_index)] == [
        (0, "ok"), (1, "failed"), (2, "ok"), (3, "ok")]
    assert next(r for r in results if r.row_index == 1).error == "HTTP 400: input too long"
