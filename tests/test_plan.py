"""`batchrun plan`: rows, tokens, cost and time before any request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

PRICES = {"test-model": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}


def plan(spec: Path, *options: str) -> dict:
    result = run_cli("plan", str(spec), "--json", *options)
    assert result.code == 0, result.stderr
    [line] = result.stdout.splitlines()
    return json.loads(line)


def test_a_plan_sends_nothing_and_bounds_what_the_run_then_costs(tmp_path: Path, server: FakeServer) -> None:
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"question {i}: " + "tell me more " * (i % 13)}]}
            for i in range(5000)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, concurrency=64,
                      rate_limit={"requests_per_minute": 60000}, api={"base_url": server.base_url})

    before = plan(spec)

    assert server.requests == []
    assert not (tmp_path / "out" / "result.batchrun.sqlite").exists()
    assert (before["rows"], before["rows_total"], before["requests"]) == (5000, 5000, 5000)
    assert before["completion_tokens_max"] == 5000 * 16
    assert before["duration_s"] >= 5.0  # 5,000 requests at 60,000 a minute
    assert before["tokenizer"].startswith("heuristic")
    assert run_cli("run", str(spec), "--no-progress").code == 0
    out = read_output(tmp_path / "out/result.parquet")
    billed_prompt = sum(r["prompt_tokens"] for r in out)
    assert billed_prompt / 2 <= before["prompt_tokens"] <= billed_prompt * 2
    assert before["cost_usd_max"] >= sum(r["cost_usd"] for r in out)
    assert before["cost_usd_expected"] <= before["cost_usd_max"]

    after = plan(spec)  # a finished job: nothing left to do
    assert (after["rows"], after["requests"], after["prompt_tokens"]) == (0, 0, 0)


def test_a_resumed_job_plans_what_remains_with_the_answers_it_has_seen(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p {i}"} for i in range(100)])
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16}, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress", "--limit", "40").code == 0

    left = plan(spec)

    assert (left["rows"], left["rows_total"]) == (60, 100)
    seen = read_output(tmp_path / "out/result.parquet")
    mean = sum(r["completion_tokens"] for r in seen) / len(seen)
    assert left["completion_tokens_expected"] == round(mean * 60)
    assert left["completion_tokens_max"] == 60 * 16
    assert not [note for note in left["notes"] if "answer" in note]
    anew = plan(spec, "--restart")  # what the state saw does not count for a run that discards it
    assert anew["completion_tokens_expected"] == 100 * 16
    assert "duration assumes 2 s a request (--restart: no saved answer counts to measure)" in anew["notes"]

    # Answers without usage (llama.cpp's streams) say how long they took, not how long they were
    server.faults = Faults(status_for=lambda body: (200, {"choices": [{"text": "an answer", "finish_reason": "stop"}]}))
    assert run_cli("run", str(spec), "--no-progress", "--restart", "--limit", "10").code == 0
    unmetered = plan(spec)
    assert "no answer ok with its completion tokens in the state yet to learn the typical answer length from: " \
           "expected completion tokens are the worst case" in unmetered["notes"]
    assert not [note for note in unmetered["notes"] if note.startswith("duration assumes")]


@pytest.mark.slow
def test_a_tokenizer_json_counts_exactly(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "hello big world"}, {"prompt": "hello"}])
    spec = write_spec(tmp_path, tokenizer="tokenizer.json", params={"max_tokens": 5}, endpoint="completions")

    result = plan(spec)

    assert result["prompt_tokens"] == (3 + 4) + (1 + 4)  # words, plus 4 a message
    assert result["tokenizer"].startswith("tokenizer.json")
    assert result["cost_usd_max"] is None  # no prices

    text = run_cli("plan", str(spec))
    assert "2 of 2 rows to do, in 2 requests" in text.stdout and "prompt tokens      12" in text.stdout


@pytest.mark.slow
def test_a_plan_of_a_bad_input_is_exit_2_like_a_run(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "a"}, "not json"])
    spec = write_spec(tmp_path)
    result = run_cli("plan", str(spec))
    assert result.code == 2 and "line 2: not valid JSON" in result.stderr


def test_a_plan_refuses_a_state_of_other_params_as_the_run_does(tmp_path: Path, capsys) -> None:
    from batchrun import run_job
    from batchrun._cli import main

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p {i}"} for i in range(200)])
    spec = write_spec(tmp_path, params={"max_tokens": 16}, api={"base_url": "mock://"})
    assert run_job(spec, limit=50, environ={}).ok == 50
    spec = write_spec(tmp_path, params={"max_tokens": 32}, api={"base_url": "mock://"})

    assert main(["plan", str(spec)]) == 2
    said = capsys.readouterr().err
    assert "params.max_tokens was 16, now 32" in said and "--restart" in said
    assert main(["run", str(spec), "--no-progress"]) == 2
    assert "params.max_tokens was 16, now 32" in capsys.readouterr().err

    assert main(["plan", str(spec), "--json", "--restart"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 200

    (tmp_path / "out/result.batchrun.sqlite").write_bytes(b"not a state")  # damaged: a run refuses it ...
    assert main(["plan", str(spec)]) == 2 and "not a usable batchrun state" in capsys.readouterr().err
    assert main(["plan", str(spec), "--json", "--restart"]) == 0  # ... unless --restart, which discards it
    assert json.loads(capsys.readouterr().out)["rows"] == 200


def test_a_plan_shows_the_cost_through_the_batch_api_beside_the_live_one(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"question {i}"} for i in range(100)])
    prices = {"test-model": {"input": 2.0, "output": 8.0}, "other": {"input": 1.0, "output": 1.0,
                                                                   "batch": {"input": 0.1, "output": 0.3}}}
    spec = write_spec(tmp_path, pricing=prices, params={"max_tokens": 10}, api={"base_url": "mock://"})
    halved = plan(spec)
    assert halved["batch_cost_usd_max"] == pytest.approx(halved["cost_usd_max"] / 2)
    assert halved["cost_usd_max"] == pytest.approx((halved["prompt_tokens"] * 2.0 + 1000 * 8.0) / 1e6)
    spec = write_spec(tmp_path, model="other", pricing=prices, params={"max_tokens": 10}, api={"base_url": "mock://"})
    own = plan(spec)
    assert own["batch_cost_usd_max"] == pytest.approx((own["prompt_tokens"] * 0.1 + 1000 * 0.3) / 1e6)
    text = run_cli("plan", str(spec)).stdout
    assert "cost, batch API" in text and "at most" in text
    spec = write_spec(tmp_path, model="other", pricing=prices, params={"max_tokens": 10}, api={"base_url": "mock://"},
                      batch_api={"base_url": "https://batches.example/v1"})
    assert "answered within batch_api.max_wait_h (24 h)" in run_cli("plan", str(spec)).stdout


def test_a_streamed_jobs_plan_bounds_what_answers_without_usage_are_charged(tmp_path: Path) -> None:
    """llama.cpp streams no usage: each such answer is charged at the request's worst case
    (its bytes as prompt tokens), which the token count's "at most" does not bound. The
    plan says so, with the bound a budget needs, and the run is charged exactly that."""
    import httpx

    from batchrun import job_status, load_spec, run_job

    def stream(request: httpx.Request) -> httpx.Response:  # no usage, as llama.cpp streams
        events = [{"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]},
                  {"id": "s", "model": "test-model", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}]
        content = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"tell me about item {i}"} for i in range(50)])
    spec = write_spec(tmp_path, pricing=PRICES, params={"max_tokens": 16, "stream": True},
                      api={"base_url": "http://127.0.0.1:9/v1"})

    before = plan(spec)
    text = run_cli("plan", str(spec)).stdout
    assert "streamed answers may come without usage" in text and "a budget that must see them through" in text
    assert before["cost_usd_max_without_usage"] > before["cost_usd_max"]

    run_job(spec, transport=httpx.MockTransport(stream), environ={"OPENAI_API_KEY": "k"})
    charged = job_status(load_spec(spec))["cost_usd"]
    assert charged == pytest.approx(before["cost_usd_max_without_usage"])
    assert charged > before["cost_usd_max"]  # what the token count's bound misses


def test_a_plan_counts_the_requests_of_rows_that_go_several_to_one_as_the_run_sends_them(
        tmp_path: Path, server: FakeServer) -> None:
    """Rows whose other request fields differ (a `user`) go apart within a worker's 16 rows."""
    rows = [{"input": f"text {i}", **({"user": "u1"} if i % 16 == 7 else {})} for i in range(320)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, endpoint="embeddings", inputs_per_request=16, concurrency=2,
                      api={"base_url": server.base_url})

    before = plan(spec)

    assert (before["rows"], before["requests"]) == (320, 40)  # each 16: 15 without a user, 1 with
    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert len(server.requests) == before["requests"]
