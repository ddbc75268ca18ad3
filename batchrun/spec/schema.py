"""Structured answers: parsed as JSON, validated against the job's JSON schema, typed.

The schema comes from `schema:` in the spec or from `params.response_format` (a
`json_schema` format). Every answer is parsed and validated with jsonschema; one that
is not JSON, or breaks the schema, is asked again (a bounded number of times, each
answer paid for and counted). The `parsed` column types the value from the schema:

    object with properties -> struct        string  -> string     integer -> int64
    array of a typed item  -> list          number  -> float64    boolean -> bool

A schema that cannot be typed so (oneOf, $ref, free-form objects, mixed types) gives
the column as JSON text instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from .._exceptions import SpecError
from ..endpoints.result import storable_value
from ..inputs.checks import MAX_DEPTH, depth

__all__ = ["Structure", "schema_of"]


def schema_of(schema: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The answer schema the job holds answers to: the spec's own, else its response_format's."""
    if schema is not None:
        return schema
    response_format = params.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema")
        if isinstance(inner, Mapping) and isinstance(inner.get("schema"), Mapping):
            return inner["schema"]
    return None


class Structure:
    """One schema, checked once and compiled; `parse(text)` gives the value or says what is wrong."""

    def __init__(self, schema: Mapping[str, Any], where: str = "schema") -> None:
        import jsonschema  # only a job with a schema pays its 50 ms of import

        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise SpecError(f"{where}: not a valid JSON schema: {exc.message}") from None
        self.schema = schema
        self._validator = cls(schema)

    def problem(self, text: str | None) -> tuple[Any, str | None]:
        """(the parsed value, None) or (None, what is wrong with the answer)."""
        if text is None:
            return None, "the answer has no text to parse as JSON"
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return None, f"the answer is not valid JSON ({exc})"
        # Kept in the state and the output: nothing deeper than a row may be, no lone
        # surrogate (a `"\\ud800"` escape in the answer's JSON decodes to one)
        if depth(value) > MAX_DEPTH:
            return None, f"the answer is JSON nested more than {MAX_DEPTH} levels deep"
        value = storable_value(value)
        try:
            error = next(iter(self._validator.iter_errors(value)), None)
        except RecursionError:  # JSON Python can parse may be too deep to walk again
            return None, "the answer is nested too deeply to validate"
        if error is not None:
            where = "".join(f"[{p!r}]" for p in error.absolute_path) or "the answer"
            return None, f"the answer breaks the schema: {where}: {error.message}"[:1000]
        return value, None

    def arrow_type(self) -> pa.DataType | None:
        """The `parsed` column's type, or None for JSON text."""
        return _arrow_type(self.schema)


def _arrow_type(schema: Any) -> pa.DataType | None:
    if not isinstance(schema, Mapping) or any(k in schema for k in ("oneOf", "anyOf", "allOf", "$ref", "not")):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: nullable, as every column is
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        kind = "string"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping) or not properties:
            return None  # free-form
        fields = []
        for name, sub in properties.items():
            typed = _arrow_type(sub)
            if typed is None:
                return None
            fields.append(pa.field(str(name), typed))
        return pa.struct(fields)
    if kind == "array":
        item = _arrow_type(schema.get("items"))
        return pa.list_(item) if item is not None else None
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}.get(kind) if isinstance(kind, str) else None
