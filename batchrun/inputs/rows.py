"""One record of the input made a `Row`: its id, the endpoint it goes to, and the
request fields it carries itself. These shapes are understood:

    {"prompt": "..."}                                   -> /completions
    {"messages": [...]}                                 -> /chat/completions
    {"input": ..., "instructions": "..."}               -> /responses or /embeddings (the spec says)
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

With a template (`template`) the request is rendered from the record's columns instead.

Which endpoint a row goes to, and how a row written for one is sent to another (a
prompt to chat as one user message), are the endpoints' own rules (`endpoints`):
this module asks the registry and the endpoint, never compares their names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .._exceptions import InputError
from ..policy.pricing import MAX_TOKENS_KEYS, whole
from ..endpoints import ENDPOINTS, Endpoint, endpoint_at, implied_by, job_endpoint, taking
from .checks import check_body, check_messages, check_record
from .files import InputFile
from .template import Template, TemplateRowError

__all__ = ["BATCH_FIELDS", "ID_FIELDS", "Row", "RowReader"]

BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
ID_FIELDS = ("id", "custom_id")


@dataclass(slots=True)
class Row:
    index: int
    id: str
    endpoint: str  # a name in `endpoints.ENDPOINTS`
    body: dict[str, Any]  # the row's own request fields; the spec's params fill the rest
    where: str  # "line 12" (JSONL, CSV) or "row 11" (Parquet), for messages


class RowReader:
    """Makes records `Row`s for one job: its spec's endpoint (None: each row's field says),
    template, and what a row must name (a model, a priced model)."""

    def __init__(self, *, endpoint: str | None = None, require_model: bool = False, template: Template | None = None,
                 priced: Collection[str] | None = None, bounded: bool = False, several_files: bool = False) -> None:
        self.endpoint = endpoint
        self.named = ENDPOINTS.get(endpoint) if endpoint else None
        self.require_model = require_model
        self.template = template
        # A template's rows go where its field says, or where the spec says
        self.template_field = template.field if template is not None else None
        self.template_endpoint = implied_by(self.template_field) or self.named if template is not None else None
        # The fields a flat record carries for the request; its other columns pass through
        self.request_fields = (self.named or job_endpoint(None)).request_fields
        self.priced = priced  # with a budget in USD: the models a row may name
        self.bounded = bounded  # with a budget and no assumed bound: a row's own max_tokens must be a whole number
        self.several_files = several_files  # places then name the file too
        # The registry read once: every row asks which field it gives and where it goes
        self._fields = tuple(dict.fromkeys(e.field for e in ENDPOINTS.values()))  # in the order rows are read
        self._implied = {f: implied_by(f) for f in self._fields}
        self._routes: dict[tuple[str | None, Endpoint | None], Endpoint | str] = {}

    def read(self, f: InputFile, index: int, where: str, record: dict[str, Any], *, checking: bool = False,
             check: bool = False) -> Row:
        """The row's request. `checking`: this is the validating pass, which holds decoded
        JSON text to the checks a line meets; `check` looks for what the API cannot be
        sent (NaN, binary values)."""
        def fail(message: str) -> InputError:
            return f.error(where, message)

        row_id = index
        for name in ID_FIELDS:  # (a loop, not a generator: this runs twice a row)
            if (given := record.get(name)) is not None:
                row_id = given
                break
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise fail(f"id must be a string or an integer, got {row_id!r}")
        place = f"{f.path.name} {where}" if self.several_files else where

        if self.template is not None:
            try:
                body = self.template.render(record)
            except TemplateRowError as exc:
                raise fail(str(exc)) from None
            # No body check: the section's structure was checked with the spec, and a
            # row's values enter it only as text (a JSONL line's lone surrogates were
            # refused with the line; Arrow text is UTF-8).
            return self._request(fail, index, row_id, self.template_field, self.template_endpoint, body, place)

        if f.is_arrow:
            # An Arrow table gives every record every field (a Parquet struct, a CSV
            # column); absent ones read as null and must not be sent (a null would
            # override the spec's params).
            record = _drop_nulls(record)
        if record.get("body") is not None:
            body, written_for = self._batch_line(record, fail, checking)
            field = self._field_of(body)
        else:
            body = {k: v for k, v in record.items() if k in self.request_fields and v is not None}
            field = self._field_of(body)
            if field is None:
                keys = ", ".join(sorted(record)) or "none"
                needs = self.named.field if self.named and not self.named.implied \
                    else "prompt, messages or body (an OpenAI batch line)"
                raise fail(f"a row needs {needs}; its keys: {keys}")
            written_for = self._implied[field]
        _read_fields(body, f.is_arrow, fail, checking)
        if check:
            check_body(body, fail)
        return self._request(fail, index, row_id, field, written_for, body, place)

    def _batch_line(self, record: dict[str, Any], fail: Callable[[str], InputError],
                    checking: bool) -> tuple[dict[str, Any], Endpoint | None]:
        """An OpenAI batch line's body, and the endpoint its `url` names (without one: the
        one its body's field implies, None for a field the spec must place)."""
        body = _json_value(record["body"], fail, "body", check=checking)
        if not isinstance(body, dict):
            raise fail("body must be a JSON object")
        method = record.get("method") or "POST"
        if method != "POST":
            raise fail(f"method {method!r} is not supported; batch lines must POST")
        url = record.get("url")
        if url:
            written_for = endpoint_at(url) if isinstance(url, str) else None
            known = written_for is not None
        else:
            field = self._field_of(body)
            written_for, known = self._implied.get(field), field is not None
        if not known:
            urls = [e.urls[0] for e in ENDPOINTS.values()]
            raise fail(f"url {url!r} is not supported; use {', '.join(urls[:-1])} or {urls[-1]}")
        return dict(body), written_for

    def _request(self, fail: Callable[[str], InputError], index: int, row_id: str | int, field: str | None,
                 written_for: Endpoint | None, body: dict[str, Any], place: str) -> Row:
        if self.require_model and not body.get("model"):
            raise fail("the row names no model and the spec sets none; add model: to the spec")
        if self.priced is not None and body.get("model") and body["model"] not in self.priced:
            raise fail(f"the row's model {body['model']!r} has no price in pricing, and the spec sets "
                       "budget.max_usd; add its prices")
        route = self._routes.get((field, written_for))
        if route is None:
            route = self._routes[field, written_for] = self._route(field, written_for)
        if isinstance(route, str):
            raise fail(route)
        endpoint = route
        problem = (endpoint.take(body, field) if field != endpoint.field else None) or endpoint.check(body)
        if problem:
            raise fail(problem)
        if self.bounded and endpoint.generates:
            for key in (*MAX_TOKENS_KEYS, "n", "best_of"):
                if key in body and whole(body[key]) is None:
                    assume = ", or set budget.assume_max_tokens" if key in MAX_TOKENS_KEYS else ""
                    raise fail(f"{key} {body[key]!r} is no whole number, so the budget cannot hold what the "
                               f"answer may cost; give one{assume}")
        if endpoint.grouped and self.named is None:
            raise fail(f"{endpoint.name} go several rows to a request: set endpoint: {endpoint.name} in the spec")
        return Row(index, str(row_id), endpoint.name, body, place)

    def _field_of(self, body: dict[str, Any]) -> str | None:
        """The field the row asks in: the first it gives a value (see `endpoints.field_of`)."""
        for field in self._fields:
            if body.get(field) is not None:
                return field
        return None

    def _route(self, field: str | None, written_for: Endpoint | None) -> Endpoint | str:
        """Where a row asking in `field`, written for `written_for` (a batch line's url, or
        what its field implies), goes: the spec's endpoint, else that one; or why it cannot."""
        if self.endpoint and self.named is None:
            return f"endpoint {self.endpoint} is not supported; batchrun sends to {', '.join(ENDPOINTS)}"
        if written_for is None:  # a field several endpoints take (input): the spec says which
            takers = " or ".join(taking(field or ""))
            if self.named is None:
                return f"this row has {field}: set endpoint: {takers} in the spec"
            if self.named.field != field:
                return f"this row has {field}, which is for endpoint: {takers}; the spec sets endpoint: {self.named.name}"
            return self.named
        endpoint = self.named or written_for
        if written_for is not endpoint and not written_for.implied:
            # a batch line for an endpoint no field implies is written for it alone
            if endpoint.field == written_for.field:
                return f"the spec sets endpoint: {endpoint.name}, but this row is a batch line for {written_for.name}"
            return f"this row is a batch line for {written_for.name}; the spec sets endpoint: {endpoint.name}"
        return endpoint


def _read_fields(body: dict[str, Any], arrow: bool, fail: Callable[[str], InputError], checking: bool) -> None:
    """The request fields as the API takes them: Parquet's and CSV's JSON text decoded."""
    if "messages" in body:
        messages = _json_value(body["messages"], fail, "messages", check=checking)
        if arrow:
            messages = _drop_nulls(messages)
        if checking:
            check_messages(messages, fail)
        body["messages"] = messages
    if "input" in body:
        body["input"] = _json_value(body["input"], fail, "input", check=checking) \
            if isinstance(body["input"], str) and body["input"].startswith("[") and arrow else body["input"]
    if "prompt" in body and not isinstance(body["prompt"], str):
        got = type(body["prompt"]).__name__
        hint = " (a Parquet binary column? cast it to string)" if got == "bytes" else ""
        raise fail(f"prompt must be a string, got {got}{hint}")


def _json_value(value: Any, fail: Callable[[str], InputError], name: str, *, check: bool) -> Any:
    """Parquet and CSV may hold nested data as a JSON string; accept both.

    Text decoded here never met the checks on the line it came in, so `check`
    (validation) holds it to them: what it decodes to must be carriable too.
    """
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(value, parse_constant=_no_constant)
    except RecursionError:
        raise fail(f"{name} is JSON text nested too deeply to read; no request needs that") from None
    except ValueError as exc:  # not JSON, NaN or Infinity, an integer past Python's digit limit
        raise fail(f"{name} is a string but not valid JSON ({exc})") from None
    if check:
        check_record({name: decoded}, fail)
    return decoded


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON can carry")


def _drop_nulls(value: Any) -> Any:
    """Remove null fields from dicts, at any depth."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value
