"""Datasets out: `batchrun export` as fine-tuning samples and as OpenAI Batch API files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import BatchError, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from openai.types.shared import ErrorObject

from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults, error_body

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Context: {{ context }}\nQuestion: {{ question }}"},
]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
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
        # The Fireworks format: the answer's own weight, 0 (not trained on) or 1
        assert sample == {"messages": [
            {"role": "system", "content": "Answer from the context."},
            {"role": "user", "content": f"Context: context {i}\nQuestion: question {i}?"},
            {"role": "assistant", "content": row["output_text"], "weight": i % 2},
        ]}
    assert "59 lines to" in result.stdout and "(1 rows left out: 1 failed)" in result.stdout
    assert len(server.requests) == before  # export sends nothing


@pytest.mark.slow
@pytest.mark.parametrize("change", ["template", "input", "shards' input"])
def test_answers_are_never_exported_beside_prompts_they_did_not_answer(tmp_path: Path, change: str) -> None:
    """An edited template or input would pair each answer with another prompt: a wrong
    training set, written with exit 0. It is refused as a resume is, naming the change."""
    write_jsonl(tmp_path / "input.jsonl", [{"question": f"q{i}"} for i in range(6)])
    template = {"messages": [{"role": "user", "content": "Question: {{ question }}"}]}
    spec = write_spec(tmp_path, template=template, api={"base_url": "mock://"})
    if change.startswith("shards"):
        for index in range(2):
            assert run_cli("run", str(spec), "--shard", f"{index}/2", "--no-progress").code == 0
    else:
        assert run_cli("run", str(spec), "--no-progress").code == 0
    before = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "before.jsonl"), "--include-truncated")
    assert before.code == 0, before.stderr

    if change == "template":
        spec.write_text(spec.read_text().replace("Question: ", "Answer in French: "))
        named = "request.template.messages"
    else:
        (tmp_path / "input.jsonl").write_text((tmp_path / "input.jsonl").read_text().replace('"q0"', '"CHANGED"'))
        named = "the input file's content changed"
    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl"), "--include-truncated")

    assert result.code == 2, result.stdout
    assert named in result.stderr and "restore the original input and" in result.stderr
    assert not (tmp_path / "train.jsonl").exists()


@pytest.mark.slow
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

    first = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "a.jsonl"))
    assert first.code == 0
    assert len(lines(tmp_path / "a.jsonl")) == 5
    assert "(1 rows left out: 1 cut at max_tokens (--include-truncated keeps them))" in first.stdout
    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "b.jsonl"), "--include-truncated").code == 0
    assert len(lines(tmp_path / "b.jsonl")) == 6
    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "c.jsonl"), "--all-choices").code == 0
    every = lines(tmp_path / "c.jsonl")
    assert len(every) == 10  # two choices of each of the five rows that stopped
    assert every[0]["messages"][-1]["reasoning_content"] == table[0]["choices"][0]["reasoning_content"]
    assert [s["messages"][-1]["content"] for s in every[:2]] == [c["text"] for c in table[0]["choices"]]


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_before_the_job_ran_says_so(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path)
    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "x.jsonl"))
    assert result.code == 2
    assert "no output yet; run the job to the end first" in result.stderr


@pytest.mark.slow
def test_sft_weight_other_than_0_or_1_is_refused(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}", "score": [1, 0, 0.5][i]}
                                           for i in range(3)])
    spec = write_spec(tmp_path, endpoint="chat", api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 0

    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl"), "--weight", "score")

    assert result.code == 2
    assert result.stderr == ("batchrun: error: --weight score: row 2 (r2) holds 0.5, but an answer's weight is 0 "
                             "(not trained on) or 1; give a column of 0s and 1s\n")
    assert not (tmp_path / "train.jsonl").exists()  # whole or not at all


@pytest.mark.slow
def test_sft_export_of_an_embeddings_job_is_refused(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "input": f"p{i}"} for i in range(3)])
    spec = write_spec(tmp_path, endpoint="embeddings", api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 0

    result = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl"))

    assert result.code == 2
    assert result.stderr == ("batchrun: error: --format sft: a job with endpoint: embeddings has no answers to "
                             "train on; export it with --format openai-batch\n")
    assert not (tmp_path / "train.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["sft", "openai-batch"])
def test_export_to_a_folder_names_it(tmp_path: Path, server: FakeServer, fmt: str) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"id": "r0", "prompt": "p0"}])
    spec = write_spec(tmp_path, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 0
    (tmp_path / "exports").mkdir()

    result = run_cli("export", str(spec), "--format", fmt, str(tmp_path / "exports"))

    name = "train.jsonl" if fmt == "sft" else "results.jsonl"
    assert result.code == 2
    assert result.stderr == (f"batchrun: error: {tmp_path / 'exports'}: is a folder; name the .jsonl file to "
                             f"write, such as {tmp_path / 'exports' / name}\n")
    assert list((tmp_path / "exports").iterdir()) == []


def _text_of(body: dict) -> str:
    return json.dumps(body.get("messages") or body.get("prompt") or body.get("input"))


def _refuse_p3(body: dict) -> tuple[int, dict] | None:
    if '"p3"' in _text_of(body):
        return 400, error_body("prompt p3 is not allowed", "invalid_request_error", "bad")
    return None


def _drop_p4(body: dict) -> list[bytes] | None:
    return [] if "p4" in _text_of(body) else None  # the connection closes with no answer, every attempt


TOOLS = [{"type": "function", "name": "lookup", "description": "Look a word up.",
          "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}]
SDK_CASES = {
    "chat": (ChatCompletion, {"endpoint": "chat", "model": "test-reasoner",
                              "params": {"n": 2, "logprobs": True, "top_logprobs": 2}}),
    "completions": (Completion, {"endpoint": "completions", "params": {"logprobs": 2}}),
    "responses": (Response, {"endpoint": "responses", "model": "test-reasoner",
                             "params": {"tools": TOOLS, "tool_choice": "auto"}}),
    "chat streamed without usage": (ChatCompletion, {"endpoint": "chat", "params": {
        "stream": True, "stream_options": {"include_usage": False}}}),
    "completions streamed without usage": (Completion, {"endpoint": "completions", "params": {
        "stream": True, "stream_options": {"include_usage": False}}}),
    "responses streamed": (Response, {"endpoint": "responses", "params": {"stream": True}}),
    "embeddings": (CreateEmbeddingResponse, {"endpoint": "embeddings", "inputs_per_request": 1}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SDK_CASES))
def test_openai_batch_lines_validate_with_the_sdk_types(tmp_path: Path, server: FakeServer, case: str) -> None:
    model_type, spec_keys = SDK_CASES[case]
    server.faults = Faults(status_for=_refuse_p3, raw_answer=_drop_p4, usage_style="openai")
    field = "input" if spec_keys["endpoint"] in ("responses", "embeddings") else "prompt"
    rows = [{"id": f"r{i}", field: f"p{i}"} for i in range(6)]
    if case == "responses":
        rows.append({"id": "cut", field: "p6", "max_output_tokens": 2})
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, api={"base_url": server.base_url}, **spec_keys)
    assert run_cli("run", str(spec), "--no-progress").code == 1

    result = run_cli("export", str(spec), "--format", "openai-batch", str(tmp_path / "results.jsonl"))

    assert result.code == 0, result.stderr
    output = tmp_path / "out/result.parquet"
    rows = {row["id"]: row for row in read_output(output)}
    created = int(output.stat().st_mtime)  # no created is kept: the time the output was written
    out = lines(tmp_path / "results.jsonl")
    assert {line["custom_id"] for line in out} == {i for i, r in rows.items() if r["status"] == "ok"}
    for line in out:
        body = model_type.model_validate(line["response"]["body"]).model_dump(exclude_unset=True)
        row = rows[line["custom_id"]]
        assert body["model"] == row["model"]
        if model_type is CreateEmbeddingResponse:
            continue
        assert body["id"] == row["response_id"]
        assert body["created_at" if model_type is Response else "created"] == created
        if "without usage" in case:
            assert row["prompt_tokens"] is None and "usage" not in body
        else:
            assert body["usage"]["total_tokens"] == row["total_tokens"]
        if model_type is Response:
            assert body["tools"] == spec_keys["params"].get("tools", [])
            assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
            assert body["status"] == ("incomplete" if row["id"] == "cut" else "completed")
            ids = [item["id"] for item in body["output"]]
            assert len(ids) == len(set(ids)) == (2 if "reason" in row["model"] else 1)
    errors = {line["custom_id"]: line for line in lines(tmp_path / "results.errors.jsonl")}
    assert set(errors) == {"r3", "r4"}
    refused = ErrorObject.model_validate(errors["r3"]["response"]["body"]["error"])
    assert (errors["r3"]["response"]["status_code"], refused.message) == (400, "prompt p3 is not allowed")
    assert refused.type == "invalid_request_error" and errors["r3"]["error"] is None
    dropped = BatchError.model_validate(errors["r4"]["error"])
    assert errors["r4"]["response"] is None and dropped.message == rows["r4"]["error"]
