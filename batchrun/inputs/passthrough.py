"""Passthrough columns: the types input columns keep on their way to the output.

A Parquet or CSV file's columns keep their Arrow types; a JSONL column gets the
narrowest type every value fits (`value_kind` per value, `column_kind` per column),
its values exact (integers beyond 2^53 never become floats) and nested values as JSON
text. When the input is several files, their schemas are unified into one (`unify`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.types as t

__all__ = ["coerce", "column_kind", "conform", "jsonl_schema", "schema_kind", "unify", "value_kind"]


def unify(schemas: Sequence[tuple[str, pa.Schema]], names: list[str]) -> pa.Schema:
    """One schema for (file, schema) pairs, widened where they differ (int32 and int64, a
    column one file lacks), in `names` order. Raises ValueError naming the column and the
    two files whose types cannot share it."""
    if len(schemas) == 1:
        return schemas[0][1]
    try:
        unified = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
    except (pa.ArrowException, TypeError):
        for name in names:
            found = [(f, s.field(name).type) for f, s in schemas if name in s.names]
            other = next(((f, t) for f, t in found if t != found[0][1]), None)
            if other is not None:
                raise ValueError(f"column {name!r} is {found[0][1]} in {found[0][0]} but {other[1]} in "
                                 f"{other[0]}; the files cannot be read as one table: make the column one type "
                                 "in every file") from None
        raise
    return pa.schema([unified.field(name) for name in names])


def jsonl_schema(types: dict[str, str]) -> pa.Schema:
    return pa.schema([(name, arrow_type(kind)) for name, kind in types.items()])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: its columns in that order and type, absent ones null."""
    if table.schema.equals(schema):
        return table
    columns = [table.column(field.name).cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a JSONL passthrough column of this kind (see `column_kind`)."""
    return {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64()}.get(kind) or pa.string()


def schema_kind(type_: pa.DataType) -> str:
    if t.is_boolean(type_):
        return "bool"
    if t.is_integer(type_):
        return "int"
    if t.is_floating(type_):
        return "float"
    if t.is_string(type_) or t.is_large_string(type_):
        return "string"
    return "null" if t.is_null(type_) else "json"


def value_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if -(2**53) <= value <= 2**53:
            return "int"
        # exact in int64, not in a float: such a column can never become float64
        return "bigint" if -(2**63) <= value < 2**63 else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "json"


def column_kind(kinds: set[str]) -> str:
    """One column type for every value seen; values keep their exact worth in it."""
    kinds = kinds - {"null"}
    if "bigint" in kinds:
        kinds = (kinds - {"bigint"}) | {"int"} if "float" not in kinds else kinds | {"json"}
    if not kinds:
        return "null"
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {"int", "float"}:
        return "float"
    return "json"


def coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "float":
        return float(value)
    return value
