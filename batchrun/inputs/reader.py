"""Reading input rows from the input's files (see `_files`), always streamed.

A row becomes a `Row`: its position, its id, the endpoint it goes to and the request
fields it carries itself. Everything else in the row is a passthrough column, copied
to the output beside the answer. These shapes are understood:

    {"prompt": "..."}                                   -> /completions
    {"messages": [...]}                                 -> /chat/completions
    {"input": ..., "instructions": "..."}               -> /responses or /embeddings (the spec says)
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Which endpoint a row goes to, and how a row written for one is sent to another (a
prompt to chat as one user message), are the endpoints' own rules (`endpoints`):
this module asks the registry and the endpoint, never compares their names.

With a template (`template`) every row is rendered from its columns instead, and all
of them pass through.

The input is read more than once (to validate, to run, to write the output), so the
reader is a small object that can start over rather than a one-shot iterator.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .._exceptions import InputChangedError, InputError, StorageError
from ..endpoints import ENDPOINTS, Endpoint, endpoint_at, field_of, implied_by, job_endpoint, taking
from ..storage.columns import wants_choices, wants_logprobs
from .checks import check_body, check_messages, check_record
from .files import InputFile, check_all_unchanged, combined_fingerprint
from .passthrough import coerce, column_kind, conform, jsonl_schema, schema_kind, unify, value_kind
from .template import Template, TemplateRowError

__all__ = ["InputReader", "Row", "OUTPUT_COLUMNS"]

BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
ID_FIELDS = ("id", "custom_id")

# The answer's columns; an input column of the same name would be ambiguous.
OUTPUT_COLUMNS = (
    "row_index id status output_text reasoning_content tool_calls finish_reason model "
    "response_id prompt_tokens completion_tokens total_tokens cached_tokens "
    "reasoning_tokens cost_usd attempts latency_s error"
).split()


@dataclass(slots=True)
class Row:
    index: int
    id: str
    endpoint: str  # a name in `endpoints.ENDPOINTS`
    body: dict[str, Any]  # the row's own request fields; the spec's params fill the rest
    where: str  # "line 12" (JSONL, CSV) or "row 11" (Parquet), for messages


class InputReader:
    """Streams rows from the input's files as one table, from the start each time it is asked.

    Every pass reads the version of each file that was there when the reader was
    made (see `_source`); `close()` lets them go.
    """

    def __init__(
        self, paths: Path | Sequence[Path], *, endpoint: str | None = None, require_model: bool = False,
        template: Template | None = None, reserved: Sequence[str] = (), priced: Collection[str] | None = None,
        batch_rows: int = 1024,
    ) -> None:
        paths = [paths] if isinstance(paths, Path) else list(paths)
        self.endpoint = endpoint
        self.named = ENDPOINTS.get(endpoint) if endpoint else None  # None: each row's field says
        self.require_model = require_model
        self.template = template
        # A template's rows go where its field says, or where the spec says
        self.template_field = template.field if template is not None else None
        self.template_endpoint = implied_by(self.template_field) or self.named if template is not None else None
        self.request_fields = (self.named or job_endpoint(None)).request_fields
        self.priced = priced  # with a budget in USD: the models a row may name
        # The output's columns (the job's optional ones too): an input column must not take a name
        self.reserved = frozenset(OUTPUT_COLUMNS).union(reserved)
        self.batch_rows = batch_rows
        self.files: list[InputFile] = []
        try:
            for path in paths:
                self.files.append(InputFile(path))
        except BaseException:
            self.close()
            raise
        # One file is named by its path; several by the first and their count.
        self.name = str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more input files"
        # validate() checks every row can be carried; later passes over the same bytes need not
        self._checking = False
        self._fingerprinted = False
        # Optional output columns the rows ask for themselves ("choices" for n > 1,
        # "logprobs"), found by validate()
        self.asks: list[str] = []

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- whole-input checks ------------------------------------------------------------

    def fingerprint(self) -> str:
        """A digest of every file's bytes, in order: a resume must see the very same input."""
        with self._before_the_run():
            digest = combined_fingerprint(self.files)
        self._fingerprinted = True
        return digest

    def check_unchanged(self) -> None:
        """Raise InputChangedError if a file was changed in place since it was opened."""
        check_all_unchanged(self.files)

    def validate(self) -> tuple[int, dict[str, str]]:
        """Parse every row once before any request; return (row count, passthrough types).

        Ids are checked for duplicates in a temporary on-disk SQLite table so that
        memory does not grow with the input.
        """
        with self._before_the_run(), _fewer_collections():
            count, types = self._validate()
            if len(self.files) > 1:
                self._passthrough_schema(types)  # files whose columns cannot be one table: say so now
            return count, types

    @contextlib.contextmanager
    def _before_the_run(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise InputError(f"{self.name}: cannot read: {exc.strerror or exc}") from exc
        except InputChangedError as exc:
            place = str(exc).split(": the input file was changed")[0]
            raise InputError(f"{place}: the file changed while batchrun checked it; "
                             "rerun once it is written in full") from None

    def _validate(self) -> tuple[int, dict[str, str]]:
        ids = _id_table()
        kinds = self._schema_kinds()
        count = 0
        asks: set[str] = set()
        duplicates: list[str] = []
        # Most inputs have no ids: a row's id is then its position, unique by itself, and
        # only ids given in the input go to the table. taken[i]: row i's id is "i".
        taken = bytearray()
        self._checking = True
        try:
            for rows, extras in self._batches(collect_extras=True):
                count += len(rows)
                for name, values in extras.items():
                    kinds.setdefault(name, set()).update(value_kind(v) for v in values)
                taken.extend(bytes(len(rows)))
                if self.template is None:
                    asks.update(*(_asks(row.body) for row in rows if "n" in row.body or "logprobs" in row.body))
                duplicates += _insert_ids(ids, rows, taken)
                if len(duplicates) >= 5:
                    break
            else:
                duplicates += _ids_at_positions(ids, taken)
        finally:
            self._checking = False
            ids.close()
        if duplicates:
            raise InputError(
                f"{self.name}: duplicate row ids: {'; '.join(duplicates[:5])}; "
                "every id and custom_id must be unique"
            )
        self.asks = sorted(asks)
        return count, {name: column_kind(k) for name, k in kinds.items()}

    def _schema_kinds(self) -> dict[str, set[str]]:
        """The passthrough columns of the Parquet and CSV files, and their types' kinds
        (JSONL's are found row by row)."""
        kinds: dict[str, set[str]] = {}
        for f in self.files:
            if not f.is_arrow:
                continue
            for field in f.arrow_schema():
                if self._passes(field.name):
                    if field.name in self.reserved:
                        raise f.error(f.columns_place(), f"column {field.name!r} clashes with the output "
                                                         "column of that name; rename it in the input")
                    kinds.setdefault(field.name, set()).add(schema_kind(field.type))
        return kinds

    # -- streaming ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _during_the_run(self) -> Iterator[None]:
        """A pass over fingerprinted bytes, which were validated (now, or by the run that
        saved the same fingerprint): a line that no longer reads means the file changed."""
        try:
            yield
        except InputError as exc:
            if not self._fingerprinted:
                raise
            raise InputChangedError(f"{exc}; the input file was changed while the job ran. Rows already "
                                    "answered are saved; restore the file and rerun, or rerun with --restart"
                                    ) from None

    def rows(self, start: int = 0, *, batch_rows: int | None = None) -> Iterator[Row]:
        with self._during_the_run():
            for rows, _ in self._batches(collect_extras=False, batch_rows=batch_rows):
                if rows and rows[-1].index < start:
                    continue
                for row in rows:
                    if row.index >= start:
                        yield row

    def passthrough_batches(self, types: dict[str, str], *, batch_rows: int | None = None) -> Iterator[pa.Table]:
        """The passthrough columns, a table per `batch_rows` rows (fewer at a file's end),
        in the types `validate` chose.

        Only those columns are kept: prompts and messages are parsed and dropped line by
        line, so memory follows the passthrough data, not the request data.
        """
        with self._during_the_run():
            yield from self._passthrough_batches(types, batch_rows or self.batch_rows)

    def _passthrough_batches(self, types: dict[str, str], batch_rows: int) -> Iterator[pa.Table]:
        names = list(types)
        schema = self._passthrough_schema(types)
        for f in self.files:
            if f.is_arrow:
                present = [name for name in names if name in f.arrow_schema().names]
                for batch in f.arrow_batches(present, batch_rows):
                    yield conform(pa.Table.from_batches([batch]), schema)
                continue
            own = jsonl_schema(types)
            columns: dict[str, list[Any]] = {name: [] for name in names}
            count = 0
            for _, record, _ in f.records(checking=False, batch_rows=batch_rows):
                for name in names:
                    columns[name].append(coerce(record.get(name), types[name]))
                count += 1
                if count == batch_rows:
                    yield conform(pa.Table.from_pydict(columns, schema=own), schema)
                    columns, count = {name: [] for name in names}, 0
            if count:
                yield conform(pa.Table.from_pydict(columns, schema=own), schema)

    def _passthrough_schema(self, types: dict[str, str]) -> pa.Schema:
        """One schema for the passthrough columns of every file: a Parquet or CSV file's own
        types, JSONL's inferred ones (see `passthrough.unify`)."""
        names = list(types)
        schemas = []
        for f in self.files:
            if f.is_arrow:
                own = f.arrow_schema()
                schemas.append((str(f.path), pa.schema([own.field(name) for name in names if name in own.names])))
            else:
                schemas.append((str(f.path), jsonl_schema(types)))
        try:
            return unify(schemas, names)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    # -- parsing -------------------------------------------------------------------------

    def _batches(self, *, collect_extras: bool,
                 batch_rows: int | None = None) -> Iterator[tuple[list[Row], dict[str, list[Any]]]]:
        batch_rows = batch_rows or self.batch_rows
        rows: list[Row] = []
        extras: dict[str, list[Any]] = {}
        passes = self._passes
        index = 0
        for f in self.files:
            # A Parquet or CSV file's columns are typed by its schema: `_validate` reads that.
            typed = f.is_arrow
            for where, record, suspect in f.records(checking=self._checking, batch_rows=batch_rows):
                rows.append(self._row(f, index, where, record, check=self._checking and suspect))
                index += 1
                if collect_extras and not typed:
                    for key, value in record.items():
                        if passes(key):
                            column = extras.get(key)
                            if column is None:
                                if key in self.reserved:
                                    raise f.error(where, f"column {key!r} clashes with the output column of that "
                                                         "name; rename it in the input")
                                column = extras[key] = [None] * (len(rows) - 1)
                            column.append(value)
                    for column in extras.values():
                        if len(column) < len(rows):
                            column.append(None)
                if len(rows) >= batch_rows:
                    yield rows, extras
                    rows, extras = [], {}
        if rows:
            yield rows, extras

    def _passes(self, key: str) -> bool:
        """Whether a column passes through to the output. With a template, columns are
        its values, not request fields: all but the id pass through."""
        if key in ID_FIELDS:
            return False
        return self.template is not None or key not in self.request_fields and key not in BATCH_FIELDS

    def _row(self, f: InputFile, index: int, where: str, record: dict[str, Any], *, check: bool = False) -> Row:
        """The row's request; `check` looks for what the API cannot be sent (NaN, binary values)."""
        def fail(message: str) -> InputError:
            return f.error(where, message)

        row_id = next((record[k] for k in ID_FIELDS if record.get(k) is not None), index)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise fail(f"id must be a string or an integer, got {row_id!r}")
        place = where if len(self.files) == 1 else f"{f.path.name} {where}"

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
            body, written_for = self._batch_line(record, fail)
            field = field_of(body)
        else:
            body = {k: v for k, v in record.items() if k in self.request_fields and v is not None}
            field = field_of(body)
            if field is None:
                keys = ", ".join(sorted(record)) or "none"
                needs = self.named.field if self.named and not self.named.implied \
                    else "prompt, messages or body (an OpenAI batch line)"
                raise fail(f"a row needs {needs}; its keys: {keys}")
            written_for = implied_by(field)
        self._read_fields(body, f.is_arrow, fail)
        if check:
            check_body(body, fail)
        return self._request(fail, index, row_id, field, written_for, body, place)

    def _batch_line(self, record: dict[str, Any], fail: Callable[[str], InputError]) -> tuple[dict[str, Any],
                                                                                              Endpoint | None]:
        """An OpenAI batch line's body, and the endpoint its `url` names (without one: the
        one its body's field implies, None for a field the spec must place)."""
        body = _json_value(record["body"], fail, "body", check=self._checking)
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
            written_for = implied_by(field_of(body))
            known = field_of(body) is not None
        if not known:
            urls = [e.urls[0] for e in ENDPOINTS.values()]
            raise fail(f"url {url!r} is not supported; use {', '.join(urls[:-1])} or {urls[-1]}")
        return dict(body), written_for

    def _read_fields(self, body: dict[str, Any], arrow: bool, fail: Callable[[str], InputError]) -> None:
        """The request fields as the API takes them: Parquet's and CSV's JSON text decoded."""
        if "messages" in body:
            messages = _json_value(body["messages"], fail, "messages", check=self._checking)
            if arrow:
                messages = _drop_nulls(messages)
            if self._checking:
                check_messages(messages, fail)
            body["messages"] = messages
        if "input" in body:
            body["input"] = _json_value(body["input"], fail, "input", check=self._checking) \
                if isinstance(body["input"], str) and body["input"].startswith("[") and arrow else body["input"]
        if "prompt" in body and not isinstance(body["prompt"], str):
            got = type(body["prompt"]).__name__
            hint = " (a Parquet binary column? cast it to string)" if got == "bytes" else ""
            raise fail(f"prompt must be a string, got {got}{hint}")

    def _request(self, fail: Callable[[str], InputError], index: int, row_id: str | int, field: str | None,
                 written_for: Endpoint | None, body: dict[str, Any], place: str) -> Row:
        if self.require_model and not body.get("model"):
            raise fail("the row names no model and the spec sets none; add model: to the spec")
        if self.priced is not None and body.get("model") and body["model"] not in self.priced:
            raise fail(f"the row's model {body['model']!r} has no price in pricing, and the spec sets "
                       "budget.max_usd; add its prices")
        endpoint = self._endpoint(field, written_for, fail)
        problem = endpoint.take(body, field) or endpoint.check(body)
        if problem:
            raise fail(problem)
        if endpoint.grouped and self.named is None:
            raise fail(f"{endpoint.name} go several rows to a request: set endpoint: {endpoint.name} in the spec")
        return Row(index, str(row_id), endpoint.name, body, place)

    def _endpoint(self, field: str | None, written_for: Endpoint | None,
                  fail: Callable[[str], InputError]) -> Endpoint:
        """Where the row goes: the spec's endpoint, else the one it is written for (a batch
        line's url, or what its field implies)."""
        if self.endpoint and self.named is None:
            raise fail(f"endpoint {self.endpoint} is not supported; batchrun sends to {', '.join(ENDPOINTS)}")
        if written_for is None:  # a field several endpoints take (input): the spec says which
            takers = " or ".join(taking(field or ""))
            if self.named is None:
                raise fail(f"this row has {field}: set endpoint: {takers} in the spec")
            if self.named.field != field:
                raise fail(f"this row has {field}, which is for endpoint: {takers}; "
                           f"the spec sets endpoint: {self.named.name}")
            return self.named
        endpoint = self.named or written_for
        if written_for is not endpoint and not written_for.implied:
            # a batch line for an endpoint no field implies is written for it alone
            raise fail(f"the spec sets endpoint: {endpoint.name}, but this row is a batch line for {written_for.name}"
                       if endpoint.field == written_for.field else
                       f"this row is a batch line for {written_for.name}; the spec sets endpoint: {endpoint.name}")
        return endpoint


def _asks(body: dict[str, Any]) -> set[str]:
    return {name for name, wanted in (("choices", wants_choices(body)), ("logprobs", wants_logprobs(body)))
            if wanted}


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Validation makes several small objects per row and drops them at once; Python's
    collector would otherwise walk the young ones every 700 allocations, a sixth of a
    large input's validation time. Cycles are still collected, only in larger steps."""
    saved = gc.get_threshold()
    gc.set_threshold(50_000, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)




def _id_table() -> sqlite3.Connection:
    """A table of the ids given in the input, in a private temporary database on disk
    (""): memory does not grow with the input."""
    try:
        ids = sqlite3.connect("")
        ids.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, place TEXT)")
    except sqlite3.Error as exc:
        raise _no_room(exc) from exc
    return ids


def _no_room(exc: sqlite3.Error) -> StorageError:
    return StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                        "free space in the temporary folder (or point TMPDIR elsewhere) and rerun")


def _insert_ids(ids: sqlite3.Connection, rows: list[Row], taken: bytearray) -> list[str]:
    """Marks the rows whose id is their position in `taken`, inserts the others' ids;
    returns the duplicates found. A batch goes in at once; only a batch with a
    duplicate is redone row by row."""
    given = []
    for row in rows:
        if row.id == str(row.index):
            taken[row.index] = 1
        else:
            given.append(row)
    try:
        with ids:
            ids.executemany("INSERT INTO ids VALUES (?, ?)", [(row.id, row.where) for row in given])
    except sqlite3.IntegrityError:
        return _duplicates(ids, given)
    except sqlite3.Error as exc:
        raise _no_room(exc) from exc
    return []


def _ids_at_positions(ids: sqlite3.Connection, taken: bytearray) -> list[str]:
    """Given ids that are another row's position, that row having no id of its own."""
    found = []
    for row_id, place in ids.execute("SELECT id, place FROM ids WHERE id GLOB '[0-9]*'"):
        if row_id.isascii() and row_id.isdigit() and str(int(row_id)) == row_id \
                and int(row_id) < len(taken) and taken[int(row_id)]:
            found.append(f"{row_id!r} at {place} and at position {row_id}, a row without "
                         "an id (its id is its position)")
    return found


def _duplicates(ids: sqlite3.Connection, rows: list[Row]) -> list[str]:
    """Insert one by one, naming each id already there (earlier, or in this batch)."""
    found = []
    for row in rows:
        try:
            with ids:
                ids.execute("INSERT INTO ids VALUES (?, ?)", (row.id, row.where))
        except sqlite3.IntegrityError:
            (first,) = ids.execute("SELECT place FROM ids WHERE id = ?", (row.id,)).fetchone()
            found.append(f"{row.id!r} at {first} and {row.where}")
    return found


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
