"""Everything the API answered, end to end: every choice, every logprob, the Responses API,
the request as sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults, request_key


def served(server: FakeServer, key: str, response_id: str) -> dict:
    return {a["id"]: a for a in server.answers[key]}[response_id]


def normal(entries: list[dict]) -> list[dict]:
    """The server's chat-shaped logprobs as batchrun's column holds them (no bytes)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"]} for a in e["top_logprobs"]]}
            for e in entries]


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_and_logprobs_are_the_servers(tmp_path: Path, server: FakeServer, stream: bool) -> None:
    server.faults = Faults(seed=5, error_500_rate=0.05)
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"q{i}", "messages": [{"role": "user", "content": f"q {i}"}]}
                                           for i in range(200)])
    spec = write_spec(tmp_path, params={"n": 3, "logprobs": True, "top_logprobs": 2, "stream": stream},
                      api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 200
    for row in rows:
        key = request_key({"messages": [{"role": "user", "content": f"q {row['row_index']}"}]})
        answer = served(server, key, row["response_id"])
        assert [c["text"] for c in row["choices"]] == [c["message"]["content"] for c in answer["choices"]]
        assert len(row["choices"]) == 3
        assert [c["finish_reason"] for c in row["choices"]] == ["stop"] * 3
        assert row["output_text"] == answer["choices"][0]["message"]["content"]
        assert row["logprobs"] == normal(answer["choices"][0]["logprobs"]["content"])
        assert all(len(e["top_logprobs"]) == 2 for e in row["logprobs"])
        for mine, theirs in zip(row["choices"], answer["choices"]):
            assert mine["logprobs"] == normal(theirs["logprobs"]["content"])
        assert row["completion_tokens"] == answer["usage"]["completion_tokens"]  # all three choices


def test_completions_logprobs_have_the_chat_shape(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p {i}"} for i in range(20)])
    spec = write_spec(tmp_path, params={"logprobs": 2, "n": 2}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    for row in read_output(tmp_path / "out/result.parquet"):
        raw = served(server, f"p {row['row_index']}", row["response_id"])["choices"][0]["logprobs"]
        assert [e["token"] for e in row["logprobs"]] == raw["tokens"]
        assert [e["logprob"] for e in row["logprobs"]] == raw["token_logprobs"]
        assert [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in row["logprobs"]] == raw["top_logprobs"]
        assert [c["text"] for c in row["choices"]] == [
            c["text"] for c in served(server, f"p {row['row_index']}", row["response_id"])["choices"]]


@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_api_plain_and_streamed(tmp_path: Path, server: FakeServer, stream: bool) -> None:
    server.faults = Faults(seed=2, error_503_rate=0.05, truncated_stream_rate=0.05)
    rows = [{"id": f"r{i}", "input": f"tell me {i}" if i % 2 else [{"role": "user", "content": f"tell me {i}"}],
             "instructions": "be brief", **({"max_output_tokens": 2} if i % 10 == 0 else {})} for i in range(400)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, endpoint="responses", params={"stream": stream}, model="test-reasoner",
                      api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert len(out) == 400
    for row, sent in zip(out, rows):
        answer = served(server, request_key(sent), row["response_id"])
        assert row["output_text"] == answer["output"][-1]["content"][0]["text"]
        assert row["reasoning_content"] == answer["output"][0]["summary"][0]["text"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            answer["usage"]["input_tokens"], answer["usage"]["output_tokens"], answer["usage"]["total_tokens"])
        assert (row["cached_tokens"], row["reasoning_tokens"]) == (
            answer["usage"]["input_tokens_details"]["cached_tokens"], 2)
        assert row["finish_reason"] == ("length" if row["row_index"] % 10 == 0 else "stop")
    assert {r.path for r in server.requests} == {"/v1/responses"}
    assert all(r.body["store"] is False and r.body["instructions"] == "be brief" for r in server.requests)


def test_the_request_as_sent_is_kept_when_asked(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p {i}", "max_tokens": i + 1} for i in range(10)])
    spec = write_spec(tmp_path, keep_request=True, params={"temperature": 0}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    received = {r.body["prompt"]: r.body for r in server.requests}
    for row in read_output(tmp_path / "out/result.parquet"):
        assert json.loads(row["request"]) == received[f"p {row['row_index']}"]
        assert json.loads(row["request"])["max_tokens"] == row["row_index"] + 1


def test_kill_9_with_choices_logprobs_and_a_schema_loses_and_repeats_no_row(
        tmp_path: Path, server: FakeServer) -> None:
    import random

    from tests.conftest import kill_9_during_runs

    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    server.faults = Faults(seed=8, latency_s=0.01, invalid_answer_rate=0.2, error_503_rate=0.02)
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"q{i}", "prompt": f"book {i}"} for i in range(3000)])
    spec = write_spec(tmp_path, endpoint="chat", concurrency=16, keep_request=True,
                      params={"n": 2, "logprobs": True, "top_logprobs": 1, "response_format": {
                          "type": "json_schema", "json_schema": {"name": "b", "schema": schema}}},
                      api={"base_url": server.base_url})
    kill_9_during_runs(spec, server, 2, random.Random(8), 100, 400)

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in rows] == list(range(3000))
    for row in rows:
        key = request_key({"messages": [{"role": "user", "content": f"book {row['row_index']}"}]})
        answer = served(server, key, row["response_id"])
        assert row["parsed"] == json.loads(answer["choices"][0]["message"]["content"])
        assert [c["text"] for c in row["choices"]] == [c["message"]["content"] for c in answer["choices"]]
        assert row["logprobs"] == normal(answer["choices"][0]["logprobs"]["content"])
        assert json.loads(row["request"])["messages"][0]["content"] == f"book {row['row_index']}"


def test_batch_lines_asking_for_choices_and_logprobs_get_the_columns(tmp_path: Path, server: FakeServer) -> None:
    lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}],
                       **({"n": 2, "logprobs": True, "top_logprobs": 1} if i % 2 else {})}} for i in range(10)]
    write_jsonl(tmp_path / "input.jsonl", lines)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})  # no params: the lines ask

    assert run_cli("run", str(spec), "--no-progress", "--limit", "4").code == 0
    result = run_cli("run", str(spec), "--no-progress")  # resumed: the columns are remembered

    assert result.code == 0, result.stderr
    for row in read_output(tmp_path / "out/result.parquet"):
        answer = served(server, request_key(lines[row["row_index"]]["body"]), row["response_id"])
        assert [c["text"] for c in row["choices"]] == [c["message"]["content"] for c in answer["choices"]]
        if row["row_index"] % 2:
            assert len(row["choices"]) == 2
            assert row["logprobs"] == normal(answer["choices"][0]["logprobs"]["content"])
        else:
            assert len(row["choices"]) == 1 and row["logprobs"] is None
