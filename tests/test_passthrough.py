"""Passthrough columns: each JSONL value's kind, one type per column that keeps every value
exact, the Arrow schema of those types, and one schema for several files."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchrun.inputs.passthrough import (
    coerce,
    column_kind,
    conform,
    jsonl_schema,
    schema_kind,
    unify,
    value_kind,
)

# value_kind


@pytest.mark.parametrize(("value", "kind"), [
    (None, "null"),
    (True, "bool"),
    (False, "bool"),
    (0, "int"),
    (-7, "int"),
    (2**53, "int"),
    (-(2**53), "int"),
    (2**53 + 1, "bigint"),
    (-(2**53) - 1, "bigint"),
    (2**63 - 1, "bigint"),
    (-(2**63), "bigint"),
    (2**63, "json"),
    (-(2**63) - 1, "json"),
    (1.5, "float"),
    (1.0, "float"),
    ("", "string"),
    ("12", "string"),
    ([1, 2], "json"),
    ({"a": 1}, "json"),
    ([], "json"),
])
def test_value_kind(value: object, kind: str) -> None:
    assert value_kind(value) == kind


def test_a_bool_is_never_an_int() -> None:
    assert column_kind({value_kind(True), value_kind(1)}) == "json"


# column_kind


@pytest.mark.parametrize(("kinds", "kind"), [
    (set(), "null"),
    ({"null"}, "null"),
    ({"int"}, "int"),
    ({"int", "null"}, "int"),
    ({"float", "null"}, "float"),
    ({"int", "float"}, "float"),
    ({"int", "float", "null"}, "float"),
    ({"string"}, "string"),
    ({"string", "null"}, "string"),
    ({"bool"}, "bool"),
    ({"bool", "int"}, "json"),
    ({"int", "string"}, "json"),
    ({"float", "string"}, "json"),
    ({"json"}, "json"),
    ({"json", "int"}, "json"),
    ({"bigint"}, "int"),
    ({"bigint", "int"}, "int"),
    ({"bigint", "int", "null"}, "int"),
    ({"bigint", "float"}, "json"),
    ({"bigint", "int", "float"}, "json"),
    ({"bigint", "string"}, "json"),
])
def test_column_kind(kinds: set[str], kind: str) -> None:
    assert column_kind(kinds) == kind


def test_column_kind_leaves_the_callers_set_as_it_was() -> None:
    kinds = {"bigint", "int", "null"}
    column_kind(kinds)
    assert kinds == {"bigint", "int", "null"}


def test_integers_beyond_2_53_stay_exact_in_their_column() -> None:
    values = [1, 2**53 + 1, None, -(2**62) - 3]
    kind = column_kind({value_kind(v) for v in values})
    assert kind == "int"
    column = pa.array([coerce(v, kind) for v in values], type=jsonl_schema({"n": kind}).field("n").type)
    assert column.to_pylist() == values


def test_integers_beyond_2_53_beside_floats_become_json_text_not_rounded_floats() -> None:
    values = [2**53 + 1, 0.5]
    kind = column_kind({value_kind(v) for v in values})
    assert kind == "json"
    assert [coerce(v, kind) for v in values] == ["9007199254740993", "0.5"]


def test_integers_beyond_int64_become_json_text() -> None:
    values = [2**64, 3]
    kind = column_kind({value_kind(v) for v in values})
    assert kind == "json"
    assert [coerce(v, kind) for v in values] == [str(2**64), "3"]


def test_ints_and_floats_share_a_float_column() -> None:
    values = [1, 2.5, None]
    kind = column_kind({value_kind(v) for v in values})
    assert [coerce(v, kind) for v in values] == [1.0, 2.5, None]
    assert isinstance(coerce(1, kind), float)


# jsonl_schema


def test_jsonl_schema_gives_each_kind_its_arrow_type_in_order() -> None:
    schema = jsonl_schema({"b": "bool", "i": "int", "f": "float", "s": "string", "j": "json", "n": "null"})
    assert schema.names == ["b", "i", "f", "s", "j", "n"]
    assert schema.types == [pa.bool_(), pa.int64(), pa.float64(), pa.string(), pa.string(), pa.string()]


def test_jsonl_schema_of_no_columns_is_empty() -> None:
    assert jsonl_schema({}) == pa.schema([])


# coerce


def test_coerce_keeps_nulls_null_in_every_kind() -> None:
    for kind in ("null", "bool", "int", "float", "string", "json"):
        assert coerce(None, kind) is None


def test_coerce_writes_nested_values_as_json_text_keeping_non_ascii() -> None:
    assert coerce({"name": "Zoë", "tags": ["a", 1]}, "json") == '{"name": "Zoë", "tags": ["a", 1]}'
    assert json.loads(coerce([1, {"x": None}], "json")) == [1, {"x": None}]


def test_coerce_into_json_writes_scalars_as_json_and_leaves_strings_as_they_are() -> None:
    assert coerce("plain text", "json") == "plain text"
    assert coerce(True, "json") == "true"
    assert coerce(1.5, "json") == "1.5"


def test_coerce_leaves_values_of_their_own_kind_alone() -> None:
    assert coerce(2**60 + 1, "int") == 2**60 + 1
    assert coerce("x", "string") == "x"
    assert coerce(False, "bool") is False


# schema_kind


@pytest.mark.parametrize(("type_", "kind"), [
    (pa.bool_(), "bool"),
    (pa.int8(), "int"),
    (pa.uint64(), "int"),
    (pa.float32(), "float"),
    (pa.string(), "string"),
    (pa.large_string(), "string"),
    (pa.null(), "null"),
    (pa.list_(pa.int64()), "json"),
    (pa.struct([("a", pa.int64())]), "json"),
    (pa.timestamp("s"), "json"),
])
def test_schema_kind(type_: pa.DataType, kind: str) -> None:
    assert schema_kind(type_) == kind


# unify


def test_unify_of_one_file_is_its_schema_as_it_is() -> None:
    schema = pa.schema([("b", pa.int32()), ("a", pa.string())])
    assert unify([("a.parquet", schema)], ["a", "b"]) is schema


def test_unify_widens_int32_and_int64_and_keeps_the_names_order() -> None:
    one = pa.schema([("id", pa.int64()), ("text", pa.string())])
    two = pa.schema([("text", pa.string()), ("id", pa.int32())])
    assert unify([("1.parquet", one), ("2.parquet", two)], ["text", "id"]) == pa.schema(
        [("text", pa.string()), ("id", pa.int64())])


def test_unify_keeps_a_column_only_one_file_has() -> None:
    one = pa.schema([("id", pa.int64()), ("note", pa.string())])
    two = pa.schema([("id", pa.int64())])
    assert unify([("1.parquet", one), ("2.parquet", two)], ["id", "note"]) == one


def test_unify_takes_the_type_of_a_column_that_is_all_null_in_one_file() -> None:
    one = pa.schema([("id", pa.null())])
    two = pa.schema([("id", pa.int64())])
    assert unify([("1.jsonl", one), ("2.jsonl", two)], ["id"]) == two


def test_unify_names_the_column_and_both_files_when_types_cannot_be_shared() -> None:
    one = pa.schema([("id", pa.int64()), ("text", pa.string())])
    two = pa.schema([("id", pa.int64()), ("text", pa.string())])
    three = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pytest.raises(ValueError) as info:
        unify([("a.parquet", one), ("b.parquet", two), ("c.csv", three)], ["text", "id"])
    assert str(info.value) == (
        "column 'id' is int64 in a.parquet but string in c.csv; the files cannot be read as one table: "
        "make the column one type in every file")


# conform


def test_conform_orders_and_casts_columns_and_fills_absent_ones_with_nulls() -> None:
    table = pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["a", "b"]})
    schema = pa.schema([("text", pa.string()), ("id", pa.int64()), ("note", pa.string())])
    out = conform(table, schema)
    assert out.schema == schema
    assert out.to_pylist() == [{"text": "a", "id": 1, "note": None}, {"text": "b", "id": 2, "note": None}]


def test_conform_returns_a_table_already_in_the_schema_as_it_is() -> None:
    table = pa.table({"id": [1]})
    assert conform(table, table.schema) is table
