"""Reading input rows: JSONL, gzipped JSONL or Parquet, always streamed.

A row becomes a `Row`: its position, its id, the endpoint it goes to and the request
fields it carries itself. Everything else in the row is a passthrough column, copied
to the output beside the answer. Three shapes are understood:

    {"prompt": "..."}                                   -> /completions
    {"messages": [...]}                                 -> /chat/completions
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

The file is read more than once (to validate, to run, to write the output), so the
reader is a small object that can start over rather than a one-shot iterator.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._exceptions import InputChangedError, InputError, StorageError
from ._checks import MAX_DEPTH, SUSPECT, check_body, check_messages, check_record
from ._source import PinnedFile

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
BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
ID_FIELDS = ("id", "custom_id")

# The answer's columns; an input column of the same name would be ambiguous.
OUTPUT_COLUMNS = (
    "row_index id status output_text reasoning_content tool_calls finish_reason model "
    "response_id prompt_tokens completion_tokens total_tokens cached_tokens "
    "reasoning_tokens attempts latency_s error"
).split()

_URL_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completions",
}


@dataclass(slots=True)
class Row:
    index: int
    id: str
    endpoint: str  # "chat" or "completions"
    body: dict[str, Any]  # the row's own request fields; the spec's params fill the rest
    where: str  # "line 12" or "row 11", for messages


class InputReader:
    """Streams rows from one input file, from the start each time it is asked.

    Every pass reads the version of the file that was there when the reader was
    made (see `_source`); `close()` lets it go.
    """

    def __init__(
        self, path: Path, *, endpoint: str | None = None, require_model: bool = False, batch_rows: int = 1024
    ) -> None:
        self.path = path
        self.endpoint = endpoint
        self.require_model = require_model
        self.batch_rows = batch_rows
        self.is_parquet = path.suffix == ".parquet"
        self.is_csv = path.suffix == ".csv"
        # Parquet and CSV are read through Arrow: typed columns, record batches, nulls for
        # absent values; JSONL line by line.
        self.is_arrow = self.is_parquet or self.is_csv
        # validate() checks every row can be carried; later passes over the same bytes need not
        self._checking = False
        if not path.is_file():
            raise InputError(f"{path}: input file not found")
        try:
            self._file = PinnedFile(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- whole-file checks -------------------------------------------------------------

    def fingerprint(self) -> str:
        """A digest of the file's bytes: a resume must see the very same input."""
        with self._before_the_run():
            return self._file.fingerprint()

    def check_unchanged(self) -> None:
        """Raise InputChangedError if the file was changed in place since it was opened."""
        self._file.check()

    def validate(self) -> tuple[int, dict[str, str]]:
        """Parse every row once before any request; return (row count, passthrough types).

        Ids are checked for duplicates in a temporary on-disk SQLite table so that
        memory does not grow with the input.
        """
        with self._before_the_run():
            return self._validate()

    @contextlib.contextmanager
    def _before_the_run(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        except InputChangedError:
            raise InputError(f"{self.path}: the file changed while batchrun checked it; "
                             "rerun once it is written in full") from None

    def _validate(self) -> tuple[int, dict[str, str]]:
        try:
            ids = sqlite3.connect("")  # "" is a private temporary database on disk
            ids.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, place TEXT)")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                               "free space in the temporary folder (or point TMPDIR elsewhere) and rerun") from exc
        kinds: dict[str, set[str]] = {}
        count = 0
        duplicates: list[str] = []
        self._checking = True
        try:
            for rows, extras in self._batches(collect_extras=True):
                count += len(rows)
                for name, values in extras.items():
                    seen = kinds.setdefault(name, set())
                    seen.update(_kind(v) for v in values)
                try:
                    with ids:  # a batch at once; only a batch with a duplicate is redone row by row
                        ids.executemany("INSERT INTO ids VALUES (?, ?)", [(row.id, row.where) for row in rows])
                except sqlite3.IntegrityError:
                    duplicates += _duplicates(ids, rows)
                except sqlite3.Error as exc:
                    raise StorageError(f"cannot check the input's ids for duplicates in a temporary file: {exc}; "
                                       "free space in the temporary folder (or point TMPDIR elsewhere) and rerun"
                                       ) from exc
                if len(duplicates) >= 5:
                    break
        finally:
            self._checking = False
            ids.close()
        if duplicates:
            raise InputError(
                f"{self.path}: duplicate row ids: {'; '.join(duplicates[:5])}; "
                "every id and custom_id must be unique"
            )
        return count, {name: _arrow_kind(k) for name, k in kinds.items()}

    # -- streaming ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _during_the_run(self) -> Iterator[None]:
        """A pass over fingerprinted bytes, which were validated (now, or by the run that
        saved the same fingerprint): a line that no longer reads means the file changed."""
        try:
            yield
        except InputError as exc:
            if self._file.digest is None:
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
        """The passthrough columns, a table per `batch_rows` rows, in the types `validate` chose.

        Only those columns are kept: prompts and messages are parsed and dropped line by
        line, so memory follows the passthrough data, not the request data.
        """
        with self._during_the_run():
            yield from self._passthrough_batches(types, batch_rows or self.batch_rows)

    def _passthrough_batches(self, types: dict[str, str], batch_rows: int) -> Iterator[pa.Table]:
        import pyarrow as pa

        names = list(types)
        if self.is_arrow:
            for batch in self._arrow_batches(names, batch_rows):
                yield pa.Table.from_batches([batch]).select(names)
            return
        schema = pa.schema([(name, _arrow_type(types[name])) for name in names])
        columns: dict[str, list[Any]] = {name: [] for name in names}
        count = 0
        for _, record, _ in self._jsonl_records():
            for name in names:
                columns[name].append(_coerce(record.get(name), types[name]))
            count += 1
            if count == batch_rows:
                yield pa.Table.from_pydict(columns, schema=schema)
                columns, count = {name: [] for name in names}, 0
        if count:
            yield pa.Table.from_pydict(columns, schema=schema)

    # -- parsing -------------------------------------------------------------------------

    def _batches(self, *, collect_extras: bool,
                 batch_rows: int | None = None) -> Iterator[tuple[list[Row], dict[str, list[Any]]]]:
        batch_rows = batch_rows or self.batch_rows
        source = self._arrow_records(batch_rows) if self.is_arrow else self._jsonl_records()
        rows: list[Row] = []
        extras: dict[str, list[Any]] = {}
        for index, (where, record, suspect) in enumerate(source):
            rows.append(self._row(index, where, record, check=self._checking and suspect))
            if collect_extras:
                for key, value in record.items():
                    if key not in REQUEST_FIELDS and key not in BATCH_FIELDS and key not in ID_FIELDS:
                        column = extras.get(key)
                        if column is None:
                            if key in OUTPUT_COLUMNS:
                                raise InputError(
                                    f"{self.path}: {where}: column {key!r} clashes with the output column "
                                    "of that name; rename it in the input"
                                )
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

    def _jsonl_records(self) -> Iterator[tuple[str, dict[str, Any], bool]]:
        """(where, record, suspect): only a suspect record can hold what JSON cannot carry."""
        try:
            with self._file.open() as raw, (gzip.GzipFile(fileobj=raw, mode="rb")
                                            if self.path.name.endswith(".gz") else raw) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"line {number}"
                    try:
                        record = json.loads(line)
                    except RecursionError:
                        raise InputError(f"{self.path}: {where}: nested too deeply to read; "
                                         "no request needs that") from None
                    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
                        raise InputError(f"{self.path}: {where}: not valid JSON ({exc})") from None
                    if not isinstance(record, dict):
                        raise InputError(f"{self.path}: {where}: expected a JSON object, got {type(record).__name__}")
                    # Only these bytes can make a parsed line that no request or output can
                    # carry; looking for them costs far less than walking every record.
                    suspect = self._checking and (
                        (b"\\u" in line or b"NaN" in line or b"Infinity" in line) and bool(SUSPECT.search(line))
                        or line.count(b"[") + line.count(b"{") > MAX_DEPTH)
                    if suspect:
                        check_record(record, lambda m: InputError(f"{self.path}: {where}: {m}"))
                    yield where, record, suspect
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{self.path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc

    def _arrow_batches(self, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        try:
            with self._file.open() as raw:
                yield from (_csv_batches if self.is_csv else _parquet_batches)(raw, columns, batch_rows)
        except (OSError, pa.ArrowException) as exc:
            kind = "CSV with a header row" if self.is_csv else "Parquet"
            raise InputError(f"{self.path}: cannot read as {kind}: {exc}") from exc

    def _arrow_records(self, batch_rows: int) -> Iterator[tuple[str, dict[str, Any], bool]]:
        index = 0
        for batch in self._arrow_batches(None, batch_rows):
            try:
                records = batch.to_pylist()
            except UnicodeDecodeError:
                records = None
            for n in range(batch.num_rows):
                where = f"row {index}"
                if records is None:  # find the row whose text is not UTF-8
                    try:
                        [record] = batch.slice(n, 1).to_pylist()
                    except UnicodeDecodeError as exc:
                        raise InputError(f"{self.path}: {where}: a string column holds bytes that are not "
                                         f"UTF-8 ({exc.reason})") from None
                else:
                    record = records[n]
                # Arrow text is UTF-8 and its nesting is the schema's; but any Arrow type
                # (binary, dates, decimals) may stand where the request needs JSON.
                yield where, record, True
                index += 1

    def _row(self, index: int, where: str, record: dict[str, Any], *, check: bool = False) -> Row:
        """The row's request; `check` looks for what the API cannot be sent (NaN, binary values)."""
        def fail(message: str) -> InputError:
            return InputError(f"{self.path}: {where}: {message}")

        row_id = next((record[k] for k in ID_FIELDS if record.get(k) is not None), index)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise fail(f"id must be a string or an integer, got {row_id!r}")

        if self.is_arrow:
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
                raise fail(f"url {url!r} is not supported; use /v1/chat/completions or /v1/completions")
            body = dict(body)
        else:
            body = {k: v for k, v in record.items() if k in REQUEST_FIELDS and v is not None}
            endpoint = _shape(body)
            if endpoint is None:
                keys = ", ".join(sorted(record)) or "none"
                raise fail(f"a row needs prompt, messages or body (an OpenAI batch line); its keys: {keys}")

        if "messages" in body:
            messages = _json_value(body["messages"], fail, "messages", check=self._checking)
            if self.is_arrow:
                messages = _drop_nulls(messages)
            if self._checking:
                check_messages(messages, fail)
            body["messages"] = messages
        if "prompt" in body and not isinstance(body["prompt"], str):
            got = type(body["prompt"]).__name__
            hint = " (a Parquet binary column? cast it to string)" if got == "bytes" else ""
            raise fail(f"prompt must be a string, got {got}{hint}")
        if check:
            check_body(body, fail)
        if self.require_model and not body.get("model"):
            raise fail("the row names no model and the spec sets none; add model: to the spec")
        wanted = self.endpoint or endpoint
        if wanted != endpoint:
            if wanted == "completions":
                raise fail("the spec sets endpoint: completions, but this row has messages")
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        return Row(index, str(row_id), wanted, body, where)


def _parquet_batches(raw: Any, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(raw).iter_batches(batch_size=batch_rows, columns=columns)


def _csv_batches(raw: Any, columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A CSV file with a header row, streamed in blocks. Column types are inferred from
    the first block and hold for the rest (a later value that does not fit is an error)."""
    import pyarrow.csv as csv

    convert = csv.ConvertOptions(include_columns=columns) if columns is not None else None
    yield from csv.open_csv(raw, read_options=csv.ReadOptions(block_size=1 << 20), convert_options=convert)


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


def _arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a JSONL passthrough column of this kind (see `_arrow_kind`)."""
    import pyarrow as pa

    return {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64()}.get(kind) or pa.string()


def _kind(value: Any) -> str:
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


def _arrow_kind(kinds: set[str]) -> str:
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


def _coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "float":
        return float(value)
    return value
