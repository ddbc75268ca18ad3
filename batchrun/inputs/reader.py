"""Reading input rows from the input's files (see `_files`), always streamed.

A row becomes a `Row`: its position, its id, the endpoint it goes to and the request
fields it carries itself. Everything else in the row is a passthrough column, copied
to the output beside the answer. These shapes are understood:

    {"prompt": "..."}                                   -> /completions
    {"messages": [...]}                                 -> /chat/completions
    {"input": ..., "instructions": "..."}               -> /responses or /embeddings (the spec says)
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

With a template (`_template`) every row is rendered from its columns instead, and all
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
from typing import TYPE_CHECKING, Any

from .._exceptions import InputChangedError, InputError, StorageError
from ..endpoints import ENDPOINTS
from .checks import check_body, check_messages, check_record
from .files import InputFile, check_all_unchanged, combined_fingerprint
from .passthrough import coerce, column_kind, conform, jsonl_schema, schema_kind, unify, value_kind
from .template import Template, TemplateRowError

if TYPE_CHECKING:
    import pyarrow as pa  # imported where used: a JSONL job needs it only for its output

__all__ = ["InputReader", "Row", "OUTPUT_COLUMNS"]

# Fields a flat row may carry for the request itself; any other column passes through.
REQUEST_FIELDS = frozenset(
    """prompt messages model max_tokens max_completion_tokens temperature top_p top_k min_p
    n stop seed presence_penalty frequency_penalty repetition_penalty logit_bias logprobs
    top_logprobs echo suffix best_of response_format tools tool_choice parallel_tool_calls
    stream stream_options user reasoning_effort context_length_exceeded_behavior
    prompt_cache_key prediction modalities""".split()
)
# ... and those of the endpoints that take `input` (responses, embeddings), only there:
# a chat job's `input` column passes through as it always did.
INPUT_REQUEST_FIELDS = REQUEST_FIELDS | frozenset(
    """input instructions max_output_tokens text store reasoning truncation include metadata
    previous_response_id dimensions encoding_format""".split()
)
INPUT_ENDPOINTS = ("responses", "embeddings")
BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
ID_FIELDS = ("id", "custom_id")

# The answer's columns; an input column of the same name would be ambiguous.
OUTPUT_COLUMNS = (
    "row_index id status output_text reasoning_content tool_calls finish_reason model "
    "response_id prompt_tokens completion_tokens total_tokens cached_tokens "
    "reasoning_tokens cost_usd attempts latency_s error"
).split()

_URL_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completions",
    "/v1/responses": "responses",
    "/responses": "responses",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}


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
        self.require_model = require_model
        self.template = template
        self.request_fields = INPUT_REQUEST_FIELDS if endpoint in INPUT_ENDPOINTS else REQUEST_FIELDS
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
        try:
            ids = sqlite3.connect("")  # "" is a private temporary database on disk
            ids.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, place TEXT)")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                               "free space in the temporary folder (or point TMPDIR elsewhere) and rerun") from exc
        kinds: dict[str, set[str]] = {}
        passes = self._passes
        for f in self.files:
            if f.is_arrow:
                for field in f.arrow_schema():
                    if passes(field.name):
                        if field.name in self.reserved:
                            raise f.error(f.columns_place(), f"column {field.name!r} clashes with the output "
                                                             "column of that name; rename it in the input")
                        kinds.setdefault(field.name, set()).add(schema_kind(field.type))
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
                    seen = kinds.setdefault(name, set())
                    seen.update(value_kind(v) for v in values)
                taken.extend(bytes(len(rows)))
                given = []
                if self.template is None:
                    for row in rows:
                        if "n" in row.body or "logprobs" in row.body:
                            asks.update(_asks(row.body))
                for row in rows:
                    if row.id == str(row.index):
                        taken[row.index] = 1
                    else:
                        given.append(row)
                try:
                    with ids:  # a batch at once; only a batch with a duplicate is redone row by row
                        ids.executemany("INSERT INTO ids VALUES (?, ?)", [(row.id, row.where) for row in given])
                except sqlite3.IntegrityError:
                    duplicates += _duplicates(ids, given)
                except sqlite3.Error as exc:
                    raise StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                                       "free space in the temporary folder (or point TMPDIR elsewhere) and rerun"
                                       ) from exc
                if len(duplicates) >= 5:
                    break
            else:  # a given id that is another row's position
                for row_id, place in ids.execute("SELECT id, place FROM ids WHERE id GLOB '[0-9]*'"):
                    if row_id.isascii() and row_id.isdigit() and str(int(row_id)) == row_id \
                            and int(row_id) < len(taken) and taken[int(row_id)]:
                        duplicates.append(f"{row_id!r} at {place} and at position {row_id}, a row without "
                                          "an id (its id is its position)")
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
        import pyarrow as pa

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
        types, JSONL's inferred ones (see `_passthrough.unify`)."""
        import pyarrow as pa

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
            return self._request(fail, index, row_id, self.template.endpoint or self.endpoint or "chat", body, place)

        if f.is_arrow:
            # An Arrow table gives every record every field (a Parquet struct, a CSV
            # column); absent ones read as null and must not be sent (a null would
            # override the spec's params).
            record = _drop_nulls(record)
        if record.get("body") is not None:
            body = _json_value(record["body"], fail, "body", check=self._checking)
            if not isinstance(body, dict):
                raise fail("body must be a JSON object")
            method = record.get("method") or "POST"
            if method != "POST":
                raise fail(f"method {method!r} is not supported; batch lines must POST")
            url = record.get("url")
            if not url:
                endpoint = _shape(body)
            else:
                endpoint = _URL_ENDPOINTS.get(url) if isinstance(url, str) else None
            if endpoint is None:
                raise fail(f"url {url!r} is not supported; use /v1/chat/completions, /v1/completions, "
                           "/v1/responses or /v1/embeddings")
            body = dict(body)
        else:
            body = {k: v for k, v in record.items() if k in self.request_fields and v is not None}
            endpoint = _shape(body)
            if endpoint is None:
                keys = ", ".join(sorted(record)) or "none"
                needs = "input" if self.endpoint in INPUT_ENDPOINTS else "prompt, messages or body (an OpenAI batch line)"
                raise fail(f"a row needs {needs}; its keys: {keys}")

        if "messages" in body:
            messages = _json_value(body["messages"], fail, "messages", check=self._checking)
            if f.is_arrow:
                messages = _drop_nulls(messages)
            if self._checking:
                check_messages(messages, fail)
            body["messages"] = messages
        if "input" in body:
            body["input"] = _json_value(body["input"], fail, "input", check=self._checking) \
                if isinstance(body["input"], str) and body["input"].startswith("[") and f.is_arrow else body["input"]
        if "prompt" in body and not isinstance(body["prompt"], str):
            got = type(body["prompt"]).__name__
            hint = " (a Parquet binary column? cast it to string)" if got == "bytes" else ""
            raise fail(f"prompt must be a string, got {got}{hint}")
        if check:
            check_body(body, fail)
        return self._request(fail, index, row_id, endpoint, body, place)

    def _request(self, fail: Callable[[str], InputError], index: int, row_id: str | int, endpoint: str,
                 body: dict[str, Any], place: str) -> Row:
        if self.require_model and not body.get("model"):
            raise fail("the row names no model and the spec sets none; add model: to the spec")
        if self.priced is not None and body.get("model") and body["model"] not in self.priced:
            raise fail(f"the row's model {body['model']!r} has no price in pricing, and the spec sets "
                       "budget.max_usd; add its prices")
        wanted = self.endpoint or endpoint
        if endpoint == "input":  # a row with input, which the spec's endpoint takes
            if wanted not in INPUT_ENDPOINTS:
                raise fail("this row has input: set endpoint: responses or embeddings in the spec" if wanted == "input"
                           else f"this row has input, which is for endpoint: responses or embeddings; "
                                f"the spec sets endpoint: {wanted}")
        elif wanted in INPUT_ENDPOINTS:
            if endpoint in INPUT_ENDPOINTS and endpoint != wanted:
                raise fail(f"the spec sets endpoint: {wanted}, but this row is a batch line for {endpoint}")
            if "input" not in body:  # a prompt is the input; so are messages, for the Responses API (as items)
                if wanted == "embeddings" and "messages" in body:
                    raise fail("the spec sets endpoint: embeddings, but this row has messages; give input or prompt")
                body["input"] = body.pop("prompt") if "prompt" in body else body.pop("messages")
        elif wanted != endpoint:
            if endpoint in INPUT_ENDPOINTS:
                raise fail(f"this row is a batch line for {endpoint}; the spec sets endpoint: {wanted}")
            if wanted == "completions":
                raise fail("the spec sets endpoint: completions, but this row has messages")
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        if wanted not in ENDPOINTS:
            raise fail(f"endpoint {wanted} is not supported; batchrun sends to {', '.join(ENDPOINTS)}")
        if wanted == "embeddings" and not isinstance(body["input"], str):
            raise fail(f"input must be a string to embed, got {type(body['input']).__name__}")
        if wanted == "embeddings" and not self.endpoint:
            raise fail("embeddings go several rows to a request: set endpoint: embeddings in the spec")
        return Row(index, str(row_id), wanted, body, place)


def _asks(body: dict[str, Any]) -> set[str]:
    from ..storage.columns import wants_choices, wants_logprobs

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


def _shape(body: dict[str, Any]) -> str | None:
    if body.get("messages") is not None:
        return "chat"
    if body.get("prompt") is not None:
        return "completions"
    if body.get("input") is not None:
        return "input"  # responses or embeddings: the spec says which
    return None


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
