"""Validated structured answers: the schema, the re-asks, the typed `parsed` column."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import SpecError, parse_spec
from batchrun.spec.schema import Structure
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults, request_key

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "good": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "year", "good", "tags"],
}


def test_the_schema_types_the_column() -> None:
    assert Structure(SCHEMA).arrow_type() == pa.struct([
        ("title", pa.string()), ("year", pa.int64()), ("good", pa.bool_()), ("tags", pa.list_(pa.string()))])
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "number"}}},
                                               "b": {"type": ["string", "null"]}, "c": {"enum": ["p", "q"]}}}
    assert Structure(nested).arrow_type() == pa.struct([
        ("a", pa.struct([("x", pa.float64())])), ("b", pa.string()), ("c", pa.string())])
    for untyped in ({"type": "object"}, {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                    {"type": "object", "properties": {"x": {"type": ["string", "integer"]}}}):
        assert Structure(untyped).arrow_type() is None


def test_what_is_wrong_with_an_answer_is_said() -> None:
    structure = Structure(SCHEMA)
    good = {"title": "t", "year": 1, "good": True, "tags": []}
    assert structure.problem(json.dumps(good)) == (good, None)
    assert "not valid JSON" in structure.problem('{"title": ')[1]
    assert structure.problem(json.dumps({**good, "year": "1999"}))[1] == \
        "the answer breaks the schema: ['year']: '1999' is not of type 'integer'"


def test_a_bad_schema_stops_at_the_spec() -> None:
    with pytest.raises(SpecError, match="schema: not a valid JSON schema"):
        parse_spec({"input": "a.jsonl", "output": "o.parquet", "schema": {"type": "strnig"}}, environ={})
    with pytest.raises(SpecError, match="retry.max_reasks: expected a whole number >= 0"):
        parse_spec({"input": "a.jsonl", "output": "o.parquet", "retry": {"max_reasks": -1}}, environ={})


def test_a_schema_in_the_spec_is_sent_as_the_response_format() -> None:
    spec = parse_spec({"input": "a.jsonl", "output": "o.parquet", "endpoint": "chat", "schema": SCHEMA}, environ={})
    assert spec.params["response_format"] == {"type": "json_schema",
                                              "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    spec = parse_spec({"input": "a.jsonl", "output": "o.parquet", "endpoint": "responses", "schema": SCHEMA},
                      environ={})
    assert spec.params["text"] == {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA,
                                              "strict": True}}


def test_invalid_first_answers_are_asked_again_and_every_answer_counts(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=4, invalid_answer_rate=0.2, error_500_rate=0.03)
    rows = [{"id": f"b{i}", "prompt": f"describe book {i}"} for i in range(300)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, endpoint="chat", params={"response_format": {
        "type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA, "strict": True}}},
        api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    assert pq.read_schema(tmp_path / "out/result.parquet").field("parsed").type == Structure(SCHEMA).arrow_type()
    reasked = 0
    for row in read_output(tmp_path / "out/result.parquet"):
        key = request_key({"messages": [{"role": "user", "content": f"describe book {row['row_index']}"}]})
        answers = server.answers[key]
        assert row["status"] == "ok"
        assert row["parsed"] == json.loads(answers[-1]["choices"][0]["message"]["content"])
        assert row["output_text"] == answers[-1]["choices"][0]["message"]["content"]
        # every answer the server sent for this row was paid for, and counted
        assert row["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in answers)
        assert row["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in answers)
        if len(answers) > 1:
            reasked += 1
            assert row["attempts"] >= 2
        assert row["attempts"] == server.count(key)
    assert 30 <= reasked <= 90  # about a fifth of 300


def test_an_answer_invalid_every_time_fails_the_row_with_what_was_wrong(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(invalid_answer_rate=1.0, invalid_answer_always=True)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, endpoint="chat", schema=SCHEMA, retry={"max_reasks": 1, "backoff_initial_s": 0.01},
                      api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1, result.stderr
    [row] = read_output(tmp_path / "out/result.parquet")
    assert row["status"] == "failed" and row["attempts"] == 2 and row["parsed"] is None
    assert row["error"].startswith("the answer breaks the schema: the answer: 'title' is a required property") \
        or row["error"].startswith("the answer is not valid JSON")
    assert row["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in server.answers[
        request_key({"messages": [{"role": "user", "content": "p"}]})])


def test_answers_no_output_can_hold_are_refused_or_made_storable() -> None:
    structure = Structure({"type": "object"})
    value, problem = structure.problem('{"a": "x\\ud800y"}')  # a lone surrogate escape in valid JSON
    assert problem is None and value == {"a": "x\ufffdy"}
    value, problem = structure.problem('{"a": ' + "[" * 500 + "]" * 500 + "}")
    assert value is None and problem == "the answer is JSON nested more than 100 levels deep"
