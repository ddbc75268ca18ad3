"""The output columns only some jobs have, and their values (storage/columns.py)."""

from __future__ import annotations

import struct

import pyarrow as pa
import pytest

from batchrun import parse_spec
from batchrun.storage.columns import ExtraColumn, choices_type, extra_columns, logprobs_type


def spec(**keys: object):
    return parse_spec({"input": "in.jsonl", "output": "out.parquet", "model": "m", **keys}, environ={})


def names(**keys: object) -> list[str]:
    return [column.name for column in extra_columns(spec(**keys))]


def column(name: str, **keys: object) -> ExtraColumn:
    [found] = [c for c in extra_columns(spec(**keys)) if c.name == name]
    return found


def test_a_plain_job_has_no_extra_columns() -> None:
    assert names() == []
    assert names(params={"n": 1, "logprobs": False}) == []


def test_each_option_adds_its_column_in_one_order() -> None:
    assert names(params={"n": 3, "logprobs": True}, keep_request=True, cache="c.sqlite",
                 schema={"type": "object", "properties": {"a": {"type": "integer"}}}) == \
        ["choices", "logprobs", "request", "parsed", "cached"]
    assert names(endpoint="embeddings") == ["embedding"]
    assert names(params={"top_logprobs": 2, "logprobs": 0}) == ["logprobs"]  # 0 asks, as the API reads it


def test_rows_asking_for_choices_or_logprobs_themselves_add_the_columns() -> None:
    assert [c.name for c in extra_columns(spec(), asks=["choices", "logprobs"])] == ["choices", "logprobs"]


def test_choices_hold_every_choice_or_the_one_the_server_gave() -> None:
    choices = column("choices", params={"n": 2})
    given = [{"index": 0, "text": "a", "finish_reason": "stop", "reasoning_content": None, "tool_calls": None,
              "logprobs": None},
             {"index": 1, "text": "b", "finish_reason": "length", "reasoning_content": None, "tool_calls": None,
              "logprobs": None}]
    ok = {"status": "ok", "output_text": "only", "finish_reason": "stop", "reasoning_content": "why",
          "tool_calls": None}

    array = choices.array([{"choices": given}, {}, {}], [ok, ok, {**ok, "status": "failed"}], [None] * 3)

    assert array.type == choices_type()
    assert array.to_pylist() == [given, [{"index": 0, "text": "only", "finish_reason": "stop",
                                          "reasoning_content": "why", "tool_calls": None, "logprobs": None}], None]


def test_logprobs_request_and_cached_read_their_values_from_extra() -> None:
    tokens = [{"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "b", "logprob": -1.0}]}]
    logprobs = column("logprobs", params={"logprobs": True})
    assert logprobs.array([{"logprobs": tokens}, {}], [None, None], [None, None]).to_pylist() == [tokens, None]
    assert logprobs.type() == logprobs_type()
    request = column("request", keep_request=True)
    assert request.array([{"request": '{"prompt": "p"}'}, {}], [None] * 2, [None] * 2).to_pylist() == [
        '{"prompt": "p"}', None]
    cached = column("cached", cache="c.sqlite")
    assert cached.array([{"cached": True}, {}], [None] * 2, [None] * 2).to_pylist() == [True, False]


def test_embeddings_come_straight_from_their_float32_bytes() -> None:
    vectors = [struct.pack("<3f", 0.5, -1.0, 2.0), None, struct.pack("<1f", 3.0)]

    array = column("embedding", endpoint="embeddings").array([{}] * 3, [None] * 3, vectors)

    assert array.type == pa.list_(pa.float32())
    assert array.to_pylist() == [[0.5, -1.0, 2.0], None, [3.0]]


def test_parsed_is_typed_from_the_schema_and_a_value_arrow_cannot_hold_is_null() -> None:
    parsed = column("parsed", schema={"type": "object", "properties": {"n": {"type": "integer"}},
                                      "required": ["n"], "additionalProperties": False})
    array = parsed.array([{"parsed": {"n": 1}}, {"parsed": {"n": 2**70}}, {}], [None] * 3, [None] * 3)

    assert pa.types.is_struct(array.type) and array.to_pylist() == [{"n": 1}, None, None]


@pytest.mark.parametrize("schema", [{"type": "object"}, {"anyOf": [{"type": "string"}, {"type": "integer"}]}])
def test_parsed_of_a_schema_arrow_cannot_type_is_json_text(schema: dict) -> None:
    parsed = column("parsed", schema=schema)
    array = parsed.array([{"parsed": {"a": [1, "é"]}}, {"parsed": None}, {}], [None] * 3, [None] * 3)

    assert array.type == pa.string()
    assert array.to_pylist() == ['{"a": [1, "é"]}', "null", None]  # null answered, nothing answered
