"""Money: prices, each row's cost, and a budget the job never goes past."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun import SpecError, parse_spec
from batchrun.policy.pricing import Budget, Price, cost, usd
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

PRICES = {"test-model": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}


def test_cost_counts_cached_tokens_at_their_price() -> None:
    price = Price(input=2.0, output=8.0, cached_input=1.0)
    assert cost(price, 1000, 100, 400) == pytest.approx((600 * 2 + 400 * 1 + 100 * 8) / 1e6)
    assert cost(Price(input=2.0), 1000, None, None) == pytest.approx(2000 / 1e6)  # embeddings
    assert cost(None, 1000, 100, 0) is None and cost(price, None, None, None) is None


def test_a_budget_holds_requests_in_flight_at_their_worst_case() -> None:
    budget = Budget(1.0, None, spent_usd=0.5)
    hold = budget.reserve(0.3, 10)
    assert hold is not None and budget.reserve(0.3, 10) is None  # 0.5 + 0.3 + 0.3 > 1
    assert budget.fits(0.3, 10, alone=True) and not budget.fits(0.6, 10, alone=True)  # wait, or stop
    budget.settle(hold, 0.1, 5)  # it cost less than its worst case
    again = budget.reserve(0.3, 10)
    assert again is not None and again.id != hold.id and budget.spent_usd == pytest.approx(0.6)
    tokens = Budget(None, 100)
    assert tokens.reserve(0.0, 60) and not tokens.reserve(0.0, 41)
    assert "$0.004 of budget.max_usd $0.01 spent ($0.006 left)" in Budget(0.01, None, spent_usd=0.004).describe()


@pytest.mark.parametrize(("extra", "message"), [
    ({"budget": {"max_usd": 1}, "model": "other"}, "model 'other' has no price in pricing (priced: test-model)"),
    ({"budget": {"max_usd": 1}, "params": {}}, "set params.max_tokens, or budget.assume_max_tokens"),
    ({"pricing": {"m": {"output": 1}}}, "pricing.m.input: required"),
    ({"pricing": {"m": {"input": 1, "ouput": 1}}}, "pricing.m.ouput: unknown key; did you mean output?"),
    ({"pricing": "missing.yaml"}, "pricing: cannot read"),
    ({"budget": {"max_dollars": 1}}, "budget.max_dollars: unknown key"),
])
def test_money_mistakes_stop_at_the_spec(extra: dict, message: str) -> None:
    raw = {"input": "a.jsonl", "output": "o.parquet", "model": "test-model", "pricing": PRICES,
           "params": {"max_tokens": 16}, **extra}
    with pytest.raises(SpecError) as info:
        parse_spec(raw, environ={})
    assert message in str(info.value)


def test_pricing_from_a_shared_file(tmp_path: Path) -> None:
    (tmp_path / "prices.yaml").write_text("test-model: {input: 0.2, output: 0.4}\n")
    spec = parse_spec({"input": "a.jsonl", "output": "o.parquet", "pricing": "prices.yaml"}, base_dir=tmp_path,
                      environ={})
    assert spec.pricing == {"test-model": Price(input=0.2, output=0.4)}


def billed(server: FakeServer) -> float:
    """What the server billed, at PRICES: every answer it sent in full."""
    price = Price(**PRICES["test-model"])
    return sum(cost(price, a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"],
                    a["usage"]["prompt_tokens_details"]["cached_tokens"])
               for answers in server.answers.values() for a in answers)


def test_each_rows_cost_is_its_tokens_at_the_prices(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"prompt number {i}"} for i in range(200)])
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    for row in rows:
        assert row["cost_usd"] == pytest.approx(((row["prompt_tokens"] - row["cached_tokens"]) * 2.0
                                                + row["cached_tokens"] * 1.0 + row["completion_tokens"] * 8.0) / 1e6)
    total = sum(r["cost_usd"] for r in rows)
    assert total == pytest.approx(billed(server))
    assert usd(total) in result.stdout and usd(total) == f"${total:.6f}".rstrip("0")  # four significant digits


def test_a_budget_stops_the_job_before_it_is_passed_and_a_larger_one_finishes_it(
        tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=2, error_503_rate=0.05, latency_s=0.005)
    rows = [{"id": f"r{i}", "prompt": f"prompt number {i}: " + "word " * (i % 9)} for i in range(600)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    full = write_spec(tmp_path, name="full.yaml", output="full/result.parquet", pricing=PRICES,
                      params={"max_tokens": 16}, api={"base_url": server.base_url})
    assert run_cli("run", str(full), "--no-progress").code == 0
    job_cost = billed(server)
    server.reset_stats()

    budget = job_cost / 3
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, concurrency=16,
                      budget={"max_usd": budget}, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 3, result.stderr
    assert "the budget is reached" in result.stderr and "raise the budget" in result.stderr
    assert billed(server) <= budget
    saved = billed(server)
    assert saved > budget / 2  # it stopped near the budget, not at the first request

    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, concurrency=16,
                      budget={"max_usd": job_cost * 2}, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert all(len(answers) == 1 for answers in server.answers.values())  # every row paid for once
    assert sum(r["cost_usd"] for r in out) == pytest.approx(billed(server))
    assert billed(server) > saved


def test_rows_failed_for_good_wait_for_retry_failed_and_transient_ones_do_not(
        tmp_path: Path, server: FakeServer) -> None:
    from tests.fakeserver import error_body

    def refuse(body: dict) -> tuple[int, dict] | None:
        number = int(body["prompt"].split()[-1])
        if number % 10 == 3:
            return 400, error_body("not allowed", "invalid_request_error", "bad")
        if number == 5 and server.faults.seed == 1:
            return 503, error_body("busy", "server_error", "busy")
        return None

    server.faults = Faults(seed=1, status_for=refuse)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"prompt {i}"} for i in range(100)])
    spec = write_spec(tmp_path, retry={"max_attempts": 2, "backoff_initial_s": 0.01},
                      api={"base_url": server.base_url})
    first = run_cli("run", str(spec), "--no-progress")
    assert first.code == 1
    assert "11 failed (1 retried by a rerun, 10 only with --retry-failed)" in first.stdout

    server.faults = Faults(seed=2, status_for=refuse)  # the 503 is gone; the 400s stay
    server.reset_stats()
    nightly = run_cli("run", str(spec), "--no-progress")
    assert nightly.code == 1
    assert [r.body["prompt"] for r in server.requests] == ["prompt 5"]  # only the transient one
    assert "10 failed (10 only with --retry-failed)" in nightly.stdout

    server.reset_stats()
    again = run_cli("run", str(spec), "--no-progress")
    assert again.code == 1 and server.requests == []  # nothing to send
    assert run_cli("run", str(spec), "--no-progress", "--max-failed-share", "0.1").code == 0
    assert run_cli("run", str(spec), "--no-progress", "--max-failed-share", "0.05").code == 1

    retried = run_cli("run", str(spec), "--no-progress", "--retry-failed")
    assert retried.code == 1
    assert sorted(r.body["prompt"] for r in server.requests) == sorted(f"prompt {i}" for i in range(3, 100, 10))
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["attempts"] for r in rows if r["status"] == "failed"] == [2] * 10  # one per run that sent it


def test_the_progress_line_shows_the_jobs_cost_so_far() -> None:
    import io

    from batchrun import LogProgress

    ticks = iter([0.0, 10.0])
    stream = io.StringIO()
    progress = LogProgress(stream, every_s=5.0, clock=lambda: next(ticks))
    progress.start(10, 2, 1.5)  # what earlier runs spent
    progress.advance(1, 0, 5, 0.25)
    assert "3/10 rows" in stream.getvalue() and "$1.75," in stream.getvalue()


def _json_answers(valid: list[bool]):
    """A MockTransport handler: a JSON answer (valid for {"a": int} while valid[0]), usage 10 + 5."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        content = '{"a": 1}' if valid[0] else '{"a": "one"}'
        return httpx.Response(200, json={
            "id": "r", "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    return handler


def test_usage_columns_count_every_paid_answer_across_reasks_and_runs(tmp_path: Path) -> None:
    import httpx

    from batchrun import run_job

    write_jsonl(tmp_path / "input.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, api={"base_url": "http://127.0.0.1:9/v1"},
                      schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    valid = [False]
    env = {"OPENAI_API_KEY": "k"}

    first = run_job(spec, transport=httpx.MockTransport(_json_answers(valid)), environ=env)
    assert (first.failed, first.requests, first.total_tokens) == (1, 3, 45)  # the answer and its 2 re-asks

    valid[0] = True
    again = run_job(spec, retry_failed=True, transport=httpx.MockTransport(_json_answers(valid)), environ=env)

    [row] = read_output(again.output)
    assert row["status"] == "ok" and row["attempts"] == 4
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (40, 20, 60)
    assert row["cost_usd"] == pytest.approx(cost(Price(**PRICES["test-model"]), 40, 20, 0))
    assert (again.prompt_tokens, again.completion_tokens, again.total_tokens) == (40, 20, 60)
    assert again.cost_usd == pytest.approx(row["cost_usd"])


def _sse(*chunks: dict) -> bytes:
    import json

    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_a_budget_is_spent_up_to_its_limit_at_any_concurrency(tmp_path: Path) -> None:
    import json

    import httpx

    from batchrun import BudgetReached, run_job

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={
            "id": "r", "model": body["model"], "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"prompt number {i}"} for i in range(2000)])
    spec = write_spec(tmp_path, concurrency=32, params={"max_tokens": 16}, budget={"max_tokens": 3000},
                      api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(BudgetReached) as info:
        run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})

    summary = info.value.summary
    # Each request is held at 100 bytes + 16 tokens: 32 of them would not fit, one does until the end
    assert 0.8 * 3000 <= summary.total_tokens <= 3000, summary
    assert summary.requests == summary.ok == summary.total_tokens // 10
    assert "of budget.max_tokens 3,000 tokens spent (" in str(info.value) and " left)" in str(info.value)


def test_an_answer_without_usage_costs_its_worst_case_never_nothing(tmp_path: Path) -> None:
    import httpx

    from batchrun import BudgetReached, run_job

    def stream(request: httpx.Request) -> httpx.Response:  # as llama.cpp's server streams: no usage
        chunk = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        end = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(chunk, end))

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i:03}"} for i in range(100)])
    worst = Price(**PRICES["test-model"]).worst  # a request's bytes as prompt tokens, max_tokens as completion
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16, "stream": True}, concurrency=4,
                      budget={"max_usd": 0.01}, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(BudgetReached) as info:
        run_job(spec, transport=httpx.MockTransport(stream), environ={"OPENAI_API_KEY": "k"})

    summary = info.value.summary
    size = len(b'{"model": "test-model", "prompt": "p000", "max_tokens": 16, "stream": true, '
               b'"stream_options": {"include_usage": true}}')
    each = summary.cost_usd / summary.ok
    assert 0.5 * worst(size, 16) <= each <= worst(size + 20, 16)  # the worst case, give or take the JSON's spacing
    assert 0.01 - each <= summary.cost_usd <= 0.01
    assert summary.prompt_tokens == 0 and summary.unmetered == summary.ok > 0
    assert "answered without usage, charged at the worst case" in summary.line()


@pytest.mark.slow
def test_requests_in_flight_at_a_kill_9_count_against_the_budget(tmp_path: Path, server: FakeServer) -> None:
    import threading

    from tests.conftest import kill_9, start_cli

    gate, holding = threading.Event(), [False]
    server.faults = Faults(hold=lambda body: gate if holding[0] else None)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"prompt number {i}"} for i in range(400)])

    def spec(max_usd: float) -> Path:
        return write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, concurrency=8,
                          budget={"max_usd": max_usd}, api={"base_url": server.base_url})

    spec(1.0)
    cut_off = []
    for _ in range(3):  # each run answers some rows, then is killed with 8 requests in flight
        gate.clear()
        holding[0] = False
        proc = start_cli("run", str(tmp_path / "job.yaml"), "--no-progress")
        server.wait_for_requests(len(server.requests) + 30, timeout=60)
        with server._cond:
            holding[0], mark = True, len(server.requests)
        server.wait_for_requests(mark + 8, timeout=60)  # every worker's request is held
        kill_9(proc)
        cut_off += server.requests[mark:]
        gate.set()  # the server lets go of them: their client is gone
    holding[0] = False
    assert len(cut_off) == 24

    def bill() -> float:
        """What the server charges: every answer sent, and every request it took that was cut
        off (paid for all anyone knows, here at the most the fake could have answered)."""
        price = Price(**PRICES["test-model"])
        return billed(server) + sum(cost(price, len(r.key) // 4 + 1, 16, 0) for r in cut_off)

    budget = bill() + 0.003  # about 70 more rows' worth: the budget stops the job
    result = run_cli("run", str(spec(budget)), "--no-progress")

    assert result.code == 3 and "the budget is reached" in result.stderr, result.stderr
    assert bill() <= budget
    assert "24 requests that may have been paid for with no answer kept (in flight at a kill, timed out, cut short), " \
        "counted at the worst case" in result.stderr
    from batchrun import job_status, load_spec

    status = job_status(load_spec(tmp_path / "job.yaml"))  # the lost requests, as the summary said
    assert status["lost_requests"] == 24 and usd(status["lost_usd"]) in result.stderr
    shown = run_cli("status", str(tmp_path / "job.yaml")).stdout  # and as a person reads the status
    assert "  lost       24 requests that may have been paid for with no answer kept (in flight at a kill, timed out, " \
        f"cut short), counted against the budget at {usd(status['lost_usd'])}" in shown


def test_a_budget_refuses_a_max_tokens_that_bounds_nothing_before_any_request(
        tmp_path: Path, server: FakeServer) -> None:
    """A null (or 200.5, or text) max_tokens asks for no bound: the budget could not hold a
    request's worst case. The spec's is refused with the spec, a row's with the input;
    YAML's 200.0 is 200 and bounds."""
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(5)])
    for bad in (None, 200.5):
        spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": bad}, budget={"max_usd": 1.0},
                          api={"base_url": server.base_url})
        refused = run_cli("run", str(spec), "--no-progress")
        assert refused.code == 2 and f"params.max_tokens is {json.dumps(bad)}, which bounds no answer" in refused.stderr
    write_jsonl(tmp_path / "input.jsonl", [{"id": "r0", "prompt": "p0"}, {"id": "r1", "prompt": "p1", "max_tokens": "x"}])
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 200.0}, budget={"max_usd": 1.0},
                      api={"base_url": server.base_url})
    refused = run_cli("run", str(spec), "--no-progress")
    assert refused.code == 2 and "line 2: max_tokens 'x' is no whole number" in refused.stderr, refused.stderr
    assert not server.requests
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(5)])
    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert [r.body["max_tokens"] for r in server.requests] == [200.0] * 5
    # n, answers each up to max_tokens, must be a whole number too (even with an assumed bound)
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16, "n": "4"},
                      budget={"max_usd": 1.0, "assume_max_tokens": 16}, api={"base_url": server.base_url})
    refused = run_cli("run", str(spec), "--no-progress")
    assert refused.code == 2 and 'budget: params.n is "4", no whole number' in refused.stderr, refused.stderr


def test_attempts_that_may_have_been_paid_with_no_answer_count_against_the_budget(tmp_path: Path) -> None:
    """A 2xx that cannot be read (here a stream cut short) was billed, for all anyone knows:
    each such attempt is spent at its worst case before the next goes, so the job stays
    within its budget whatever the server bills for it."""
    import threading

    import httpx

    from batchrun import BudgetReached, job_status, load_spec, run_job

    price = Price(**PRICES["test-model"])
    seen: dict[str, int] = {}
    billed_usd = [0.0]
    lock = threading.Lock()

    def stream(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with lock:
            seen[body["prompt"]] = attempt = seen.get(body["prompt"], 0) + 1
            # The server bills every stream it sends: a whole one by its usage, one it cut
            # short here at the most it could have cost
            billed_usd[0] += price.worst(len(request.content), body["max_tokens"]) if attempt == 1 else \
                cost(price, 5, 5, 0)
        chunk = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        if attempt == 1:  # cut short: no finish_reason
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(chunk))
        end = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(chunk, end))

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i:03}"} for i in range(200)])
    size = len(b'{"model": "test-model", "prompt": "p000", "max_tokens": 16, "stream": true, '
               b'"stream_options": {"include_usage": true}}')
    budget = 20 * price.worst(size, 16)  # about ten rows: each is a lost attempt, then an answer
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16, "stream": True}, concurrency=4,
                      budget={"max_usd": budget}, api={"base_url": "http://127.0.0.1:9/v1"},
                      retry={"backoff_initial_s": 0.001, "backoff_max_s": 0.002})

    with pytest.raises(BudgetReached) as info:
        run_job(spec, transport=httpx.MockTransport(stream), environ={"OPENAI_API_KEY": "k"})

    summary = info.value.summary
    assert budget - 4 * price.worst(size, 16) <= billed_usd[0] <= budget, (billed_usd[0], budget)
    assert summary.ok > 5, summary
    cut = sum(1 for n in seen.values() if n >= 1)
    status = job_status(load_spec(spec))
    assert status["lost_requests"] == cut, (status, seen)
    assert f"{cut} requests that may have been paid for with no answer kept" in summary.line(), summary.line()


@pytest.mark.parametrize("cut", ["content-length", "chunked"])
def test_a_2xx_the_connection_cut_short_counts_against_the_budget(tmp_path: Path, server: FakeServer,
                                                                   cut: str) -> None:
    """The server began a 200 and closed the connection mid-body: that answer was billed,
    for all anyone knows. Each row's first attempt is cut so; the job stays in its budget."""
    import threading

    price = Price(**PRICES["test-model"])
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def first_cut(body: dict) -> list[bytes] | None:
        with lock:
            seen[body["prompt"]] = seen.get(body["prompt"], 0) + 1
            if seen[body["prompt"]] > 1:
                return None  # answered whole
        if cut == "content-length":
            return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n",
                    b'{"id": "r", "choices": [{"index": 0, "text": "half']
        event = b'data: {"id": "s", "choices": [{"index": 0, "text": "hi", "finish_reason": null}]}\n\n'
        return [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                b"%x\r\n%s\r\n" % (len(event), event)]  # and no last chunk

    server.faults = Faults(raw_answer=first_cut)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i:03}"} for i in range(200)])
    params = {"max_tokens": 16, **({"stream": True} if cut == "chunked" else {})}
    size = len(json.dumps({"model": "test-model", "prompt": "p000", **params,
                           **({"stream_options": {"include_usage": True}} if cut == "chunked" else {})}))
    worst = price.worst(size, 16)
    budget = 20 * worst
    spec = write_spec(tmp_path, pricing=PRICES, params=params, concurrency=4, budget={"max_usd": budget},
                      api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 3 and "the budget is reached" in result.stderr, result.stderr
    cut_answers = sum(1 for n in seen.values() if n >= 1)
    assert billed(server) + cut_answers * worst <= budget + 1e-12, (billed(server), cut_answers)
    from batchrun import job_status, load_spec

    assert job_status(load_spec(spec))["lost_requests"] == cut_answers


def test_a_running_jobs_counts_show_each_lost_attempt_as_it_is_recorded(tmp_path: Path) -> None:
    """`batchrun status` of a running job reads the writer's counts: a lost attempt kept in
    the state shows there at once, not from the next run on."""
    import anyio

    from batchrun.engine.progress import NullProgress
    from batchrun.engine.writer import Writer
    from batchrun.policy.pricing import Hold
    from batchrun.storage.state import StateStore

    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim({"input_digest": "abc", "rows": 3, "passthrough": [], "request": {"model": "m", "params": {}}},
                spec_name="job.yaml")
    writer = Writer(store, None, NullProgress(), None, done=bytearray(3), total=3, start=0,  # type: ignore[arg-type]
                    states=bytearray(3), totals=store.counts(below=3))

    async def main() -> dict:
        send, receive = anyio.create_memory_object_stream(10)
        due_send, due_receive = anyio.create_memory_object_stream(1)
        writer.begin(send, stop=lambda exc: None, sent=lambda: 0)
        async with due_receive, anyio.create_task_group() as tasks:
            tasks.start_soon(writer.write, receive, due_send)
            await writer.record(Hold(1, 0.25, 30), kept=True)  # a lost attempt: in the state for good
            await writer.record(Hold(2, 0.5, 60))  # a request in flight: not lost
            counts = writer.counts()
            send.close()
        return counts

    counts = anyio.run(main)
    assert (counts["lost_requests"], counts["lost_usd"], counts["lost_tokens"]) == (1, 0.25, 30)
    store.close()


def test_a_budget_spent_on_the_last_rows_retries_stops_the_job_with_its_reason(tmp_path: Path) -> None:
    """The last row's retry is one the budget cannot hold: no later row meets the budget,
    yet the job stops as at any spent budget (exit 3, its reason), not as a failed row."""
    import httpx

    from batchrun import BudgetReached, run_job

    seen: dict[str, int] = {}

    def first_cut(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        seen[prompt] = seen.get(prompt, 0) + 1
        chunk = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        end = {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}
        events = _sse(chunk) if seen[prompt] == 1 else _sse(chunk, end)  # each row's first stream is cut short
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p000"}, {"prompt": "p001"}])
    size = len(b'{"model": "test-model", "prompt": "p000", "max_tokens": 16, "stream": true, '
               b'"stream_options": {"include_usage": true}}')
    worst = Price(**PRICES["test-model"]).worst(size, 16)
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16, "stream": True}, concurrency=1,
                      budget={"max_usd": 2.5 * worst}, api={"base_url": "http://127.0.0.1:9/v1"})

    with pytest.raises(BudgetReached, match="the budget is reached"):
        run_job(spec, transport=httpx.MockTransport(first_cut), environ={"OPENAI_API_KEY": "k"})
    assert seen == {"p000": 2, "p001": 1}  # the first row's retry fit; the second's did not


def test_a_budget_spent_but_for_a_sums_rounding_says_nothing_is_left() -> None:
    # 0.1 + 0.2 spent of 0.3: a float's rounding is no dollar left (it said $0.0000000000000000555)
    assert Budget(0.3, None, spent_usd=0.1 + 0.2 - 5.55e-17).describe() == \
        "$0.30 of budget.max_usd $0.30 spent ($0.00 left)"
    assert "($0.20 left)" in Budget(0.3, None, spent_usd=0.1).describe()
