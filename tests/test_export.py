"""Datasets out: `batchrun export` as fine-tuning samples and as OpenAI Batch API files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults, error_body

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Context: {{ context }}\nQuestion: {{ question }}"},
]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_export_of_a_templated_job(tmp_path: Path, server: FakeServer) -> None:
    def refuse(body: dict) -> tuple[int, dict] | None:
        if "question 7?" in body["messages"][1]["content"]:
            return 400, error_body("this one is refused", "invalid_request_error", "bad")
        return None

    server.faults = Faults(status_for=refuse)
    pq.write_table(pa.table({"question": [f"question {i}?" for i in range(60)],
                             "context": [f"context {i}" for i in range(60)],
                             "score": [i % 2 for i in range(60)]}), tmp_path / "qa.parquet")
    spec = write_spec(tmp_path, input="qa.parquet", template={"messages": MESSAGES}, params={"max_tokens": 50},
                      api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 1
    before = len(server.requests)

    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl"), "--weight", "score")

    assert result.code == 0, result.stderr
    samples = lines(tmp_path / "train.jsonl")
    rows = [r for r in read_output(tmp_path / "out/result.parquet") if r["status"] == "ok"]
    assert len(samples) == len(rows) == 59
    for sample, row in zip(samples, rows):
        i = row["row_index"]
        assert sample["messages"] == [
            {"role": "system", "content": "Answer from the context."},
            {"role": "user", "content": f"Context: context {i}\nQuestion: question {i}?"},
            {"role": "assistant", "content": row["output_text"]},
        ]
        assert sample["weight"] == i % 2
    assert "59 lines to" in result.stdout
    assert len(server.requests) == before  # export sends nothing


def test_sft_leaves_out_truncated_answers_unless_asked_and_keeps_every_choice(
        tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(5)]
                + [{"id": "cut", "prompt": "x", "max_tokens": 1}])
    spec = write_spec(tmp_path, endpoint="chat", params={"n": 2, "model": "test-reasoner"},
                      api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 0
    # the fake server says "stop" always; make one answer look truncated in the output
    table = pq.read_table(tmp_path / "out/result.parquet").to_pylist()
    table[5]["finish_reason"] = "length"
    for choice in table[5]["choices"]:
        choice["finish_reason"] = "length"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tmp_path / "out/result.parquet")),
                   tmp_path / "out/result.parquet")

    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "a.jsonl")).code == 0
    assert len(lines(tmp_path / "a.jsonl")) == 5
    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "b.jsonl"), "--include-truncated").code == 0
    assert len(lines(tmp_path / "b.jsonl")) == 6
    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "c.jsonl"), "--all-choices").code == 0
    every = lines(tmp_path / "c.jsonl")
    assert len(every) == 10  # two choices of each of the five rows that stopped
    assert every[0]["messages"][-1]["reasoning_content"] == table[0]["choices"][0]["reasoning_content"]
    assert [s["messages"][-1]["content"] for s in every[:2]] == [c["text"] for c in table[0]["choices"]]


def test_openai_batch_export_has_every_row_by_custom_id(tmp_path: Path, server: FakeServer) -> None:
    def refuse(body: dict) -> tuple[int, dict] | None:
        return (400, error_body("prompt p3 is not allowed", "invalid_request_error", "bad")) \
            if body["prompt"] == "p3" else None

    server.faults = Faults(status_for=refuse)
    write_jsonl(tmp_path / "input.jsonl",
                [{"custom_id": f"task-{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": f"p{i}", "logprobs": 1}} for i in range(20)])
    spec = write_spec(tmp_path, params={"logprobs": 1}, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 1

    result = run_cli("export", str(spec), "--format", "openai-batch", str(tmp_path / "results.jsonl"))

    assert result.code == 0, result.stderr
    out = {line["custom_id"]: line for line in lines(tmp_path / "results.jsonl")}
    errors = {line["custom_id"]: line for line in lines(tmp_path / "results.errors.jsonl")}
    assert set(out) | set(errors) == {f"task-{i}" for i in range(20)} and set(errors) == {"task-3"}
    assert errors["task-3"]["response"]["status_code"] == 400
    assert errors["task-3"]["response"]["body"]["error"]["message"] == "prompt p3 is not allowed"
    for row in read_output(tmp_path / "out/result.parquet"):
        if row["status"] != "ok":
            continue
        line = out[row["id"]]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        assert body["id"] == row["response_id"]
        assert body["choices"][0]["text"] == row["output_text"]
        assert body["choices"][0]["logprobs"]["tokens"] == [e["token"] for e in row["logprobs"]]
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == row["completion_tokens"]


def test_export_before_the_job_ran_says_so(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path)
    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "x.jsonl"))
    assert result.code == 2
    assert "no output yet; run the job to the end first" in result.stderr
