"""A fake of OpenAI's Files + Batches API for tests, faithful enough for the official SDK.

Serves, on 127.0.0.1 from a thread: POST/GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content, POST/GET /v1/batches, GET /v1/batches/{id} and
POST /v1/batches/{id}/cancel. Batches move only when a test says so (`advance`,
`finish`, `expire`) or after `polls_to_finish` retrievals, so a client that polls the
real way ends without the test sleeping. The answers in the output files are made by
tests/fakeserver.py, the fake of the live API, so a row answered by a batch looks like
one answered live.

What goes wrong is chosen by `BatchFaults`, drawn from its seed in the order batches are
created: rows that expire, rows refused with a 400, whole batches that fail, output in
random order, uploads answered 500/503. Everything received is recorded (`uploads`,
`created`) so tests can check, say, that no custom_id was ever in two batches.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.fakeserver import FakeServer, Faults, _parse_body, error_body, request_key

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_REQUESTS = 50_000  # OpenAI's limit on requests in one input file
TERMINAL = ("completed", "failed", "expired", "cancelled")
_UPLOAD_STATUSES = (500, 503)  # upload_5xx answers these in turn


@dataclass
class BatchFaults:
    """What goes wrong. Replacing FakeBatchAPI.faults restarts the draws from the new seed."""

    seed: int = 0
    expire_share: float = 0.0  # rows left unanswered; a batch holding one ends `expired`
    refuse_share: float = 0.0  # rows answered 400 in the error file; the batch completes
    fail_batches: int = 0  # the next N batches created fail whole (token_limit_exceeded)
    shuffle: bool = True  # output and error lines in random order, as OpenAI writes them
    upload_5xx: int = 0  # the next N uploads are answered 500, then 503, in turn
    # An input line -> (status, error body) to answer that row with, or None as usual.
    status_for: Callable[[dict], tuple[int, dict] | None] | None = None
    # Rows answered per `advance` while in_progress (None: all in one step), so a test can
    # cancel or expire a batch that has answered some rows and not others.
    rows_per_step: int | None = None
    # A cancelled batch lists the rows it never answered in its error file (code
    # batch_cancelled); OpenAI does not promise to, so by default it does not.
    cancel_error_lines: bool = False


class NotFound(LookupError):
    """An id the fake does not hold: answered 404."""


@dataclass
class Upload:
    file_id: str
    filename: str
    purpose: str
    lines: list[str]  # as received, without line ends


@dataclass
class Created:
    batch_id: str
    input_file_id: str
    endpoint: str
    metadata: dict | None
    custom_ids: list[str]  # of the input file's lines that parse; empty if none does


@dataclass
class _Batch:
    """A batch's public object and what the fake keeps to move it along."""

    obj: dict
    rows: list[dict]  # the input lines, valid or not
    errors: list[dict]  # validation errors: the batch fails when it leaves validating
    fate: dict[str, str]  # custom_id -> "expire" or "refuse" (absent: answered)
    results: list[dict] = field(default_factory=list)  # output lines so far
    failures: list[dict] = field(default_factory=list)  # error-file lines so far
    polls: int = 0

    def unanswered(self) -> list[dict]:
        done = {line["custom_id"] for line in self.results + self.failures}
        return [row for row in self.rows if row["custom_id"] not in done]


class FakeBatchAPI:
    """`with FakeBatchAPI(BatchFaults(...)) as fake:` then point a client at `fake.base_url`."""

    def __init__(self, faults: BatchFaults | None = None, *, polls_to_finish: int | None = None,
                 api_key: str | None = None):
        self.faults = faults or BatchFaults()
        self.polls_to_finish = polls_to_finish  # retrievals of a batch after which it has ended
        self.api_key = api_key  # if set, other keys are answered 401
        self.base_url = ""
        self.uploads: list[Upload] = []
        self.created: list[Created] = []
        self.refused_uploads = 0
        self.files: dict[str, dict] = {}  # id -> {"obj": file object, "data": bytes}
        self.batches: dict[str, _Batch] = {}  # in creation order
        self.lock = threading.RLock()
        self.calls = 0  # requests answered (any route): what a test waits on, say to kill a client mid-job
        self.list_page: Callable[[dict], tuple[int, dict]] | None = None  # query -> answer: the list, otherwise
        self._called = threading.Condition(self.lock)
        self._ids = itertools.count(1)
        self._id_rng = random.Random("ids")  # apart from the fault draws, so ids never shift them
        self._answers = FakeServer(Faults())  # never started: only its answer-making is used
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._use_faults(self.faults)

    # ---- lifecycle ----

    def start(self) -> FakeBatchAPI:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="fakebatch", daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FakeBatchAPI:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- what tests call ----

    def advance(self, batch_id: str | None = None) -> None:
        """Move one batch (or every batch not ended) one state along."""
        with self.lock:
            for batch in self._chosen(batch_id):
                self._step(batch)

    def finish(self, batch_id: str | None = None) -> None:
        """Move one batch (or every batch) until it has ended."""
        with self.lock:
            for batch in self._chosen(batch_id):
                while batch.obj["status"] not in TERMINAL:
                    self._step(batch)

    def expire(self, batch_id: str) -> None:
        """End a batch now as its 24 hours would: what it answered stays, the rest is batch_expired."""
        with self.lock:
            batch = self.batches[batch_id]
            if batch.obj["status"] not in TERMINAL:
                self._end_expired(batch)

    def wait_for_calls(self, count: int, timeout: float) -> bool:
        """Wait up to `timeout` until `count` requests were answered in all; whether they were."""
        with self._called:
            return self._called.wait_for(lambda: self.calls >= count, timeout)

    def custom_ids_in_two_batches(self) -> set[str]:
        """custom_ids that two batches may both have answered, and so both be paid for: a
        client must never send one. A row counts for a batch not yet ended, or for an ended
        one that answered it (200 or 4xx). Rows of a failed batch, and the ones an expired or
        cancelled batch left unanswered, may rightly be sent again."""
        with self.lock:
            seen: set[str] = set()
            twice: set[str] = set()
            for batch in self.batches.values():
                if batch.obj["status"] in TERMINAL:
                    ids = {line["custom_id"] for line in batch.results + batch.failures if line["response"]}
                else:
                    ids = {row["custom_id"] for row in batch.rows}
                twice |= seen & ids
                seen |= ids
            return twice

    def content(self, file_id: str) -> list[dict]:
        """A file's lines as JSON, for assertions."""
        with self.lock:
            return [json.loads(line) for line in self.files[file_id]["data"].decode().splitlines() if line]

    def file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise NotFound(f"No such File object: {file_id}")
        return self.files[file_id]

    def batch(self, batch_id: str) -> _Batch:
        if batch_id not in self.batches:
            raise NotFound(f"No such Batch object: {batch_id}")
        return self.batches[batch_id]

    # ---- the state machine, under self.lock ----

    def _chosen(self, batch_id: str | None) -> list[_Batch]:
        if batch_id is not None:
            return [self.batches[batch_id]]
        return [b for b in self.batches.values() if b.obj["status"] not in TERMINAL]

    def _step(self, batch: _Batch) -> None:
        status, now = batch.obj["status"], int(time.time())
        if status == "validating":
            if batch.errors:
                batch.obj.update(status="failed", failed_at=now, errors={"object": "list", "data": batch.errors})
            else:
                batch.obj.update(status="in_progress", in_progress_at=now)
                batch.obj["request_counts"]["total"] = len(batch.rows)
        elif status == "in_progress":
            self._answer_some(batch)
            left = batch.unanswered()
            if left and all(batch.fate.get(row["custom_id"]) == "expire" for row in left):
                self._end_expired(batch)
            elif not left:
                batch.obj.update(status="finalizing", finalizing_at=now)
        elif status == "finalizing":
            self._write_files(batch, "completed", completed_at=now)
        elif status == "cancelling":
            if self.faults.cancel_error_lines:
                batch.failures += [self._no_answer(row, "batch_cancelled", "This request was cancelled.")
                                   for row in batch.unanswered()]
            self._write_files(batch, "cancelled", cancelled_at=now)

    def _answer_some(self, batch: _Batch) -> None:
        rows = [row for row in batch.unanswered() if batch.fate.get(row["custom_id"]) != "expire"]
        for row in rows[: self.faults.rows_per_step or len(rows)]:
            line = self._result_line(batch, row)
            (batch.results if line["response"]["status_code"] == 200 else batch.failures).append(line)
        counts = batch.obj["request_counts"]
        counts.update(completed=len(batch.results), failed=len(batch.failures))
        batch.obj["usage"] = _usage([line["response"]["body"] for line in batch.results])

    def _result_line(self, batch: _Batch, row: dict) -> dict:
        forced = self.faults.status_for(row) if self.faults.status_for is not None else None
        body = _parse_body(batch.obj["endpoint"], json.dumps(row["body"]).encode())
        if forced is not None:
            status, answer = forced
        elif batch.fate.get(row["custom_id"]) == "refuse":
            status, answer = 400, error_body("request refused (injected)", "invalid_request_error", "invalid_request")
        elif body is None:
            status, answer = 400, error_body("malformed request body", "invalid_request_error", "invalid_body")
        else:
            self._answers._path = batch.obj["endpoint"]  # which endpoint's answer it builds
            status, answer = 200, self._answers._build_answer(body, request_key(body))
        return {"id": self._id("batch_req_"), "custom_id": row["custom_id"],
                "response": {"status_code": status, "request_id": self._id("req_"), "body": answer}, "error": None}

    def _no_answer(self, row: dict, code: str, message: str) -> dict:
        """An error-file line for a row that got no HTTP answer at all."""
        return {"id": self._id("batch_req_"), "custom_id": row["custom_id"], "response": None,
                "error": {"code": code, "message": message}}

    def _end_expired(self, batch: _Batch) -> None:
        batch.failures += [self._no_answer(row, "batch_expired", "This request could not be executed before the "
                                      "completion window expired.") for row in batch.unanswered()]
        self._write_files(batch, "expired", expired_at=int(time.time()))

    def _write_files(self, batch: _Batch, status: str, **stamps: int) -> None:
        """End a batch: its output and error files (none when empty), its final counts."""
        for attribute, lines in (("output_file_id", batch.results), ("error_file_id", batch.failures)):
            if lines:
                lines = list(lines)
                if self.faults.shuffle:
                    self._rng.shuffle(lines)
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                name = f"{batch.obj['id']}_{attribute.split('_')[0]}.jsonl"
                batch.obj[attribute] = self._store_file(name, "batch_output", data)["id"]
        batch.obj["request_counts"].update(completed=len(batch.results), failed=len(batch.failures))
        batch.obj.update(status=status, **stamps)

    # ---- what the routes call, under self.lock ----

    def _use_faults(self, faults: BatchFaults) -> None:
        """A new BatchFaults starts afresh: its own seeded draws and counts of faults to come."""
        self._faults_in_use = faults
        self._rng = random.Random(faults.seed)
        self._fails_left = faults.fail_batches
        self._upload_refusals_left = faults.upload_5xx

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}{self._id_rng.getrandbits(32):08x}"

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict:
        obj = {"id": self._id("file-"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
               "status_details": None}
        self.files[obj["id"]] = {"obj": obj, "data": data}
        return obj

    def upload(self, filename: str, purpose: str, data: bytes) -> tuple[int, dict]:
        if self._faults_in_use is not self.faults:
            self._use_faults(self.faults)
        if self._upload_refusals_left > 0:
            self._upload_refusals_left -= 1
            self.refused_uploads += 1
            status = _UPLOAD_STATUSES[(self.refused_uploads - 1) % len(_UPLOAD_STATUSES)]
            return status, error_body(f"upload failed (injected {status})", "server_error", "server_error")
        if purpose not in ("batch", "fine-tune", "assistants", "user_data", "vision"):
            return 400, _invalid(f"'{purpose}' is not one of the supported purposes", "purpose")
        obj = self._store_file(filename, purpose, data)
        self.uploads.append(Upload(obj["id"], filename, purpose, data.decode(errors="replace").splitlines()))
        return 200, obj

    def create_batch(self, body: dict) -> tuple[int, dict]:
        if self._faults_in_use is not self.faults:
            self._use_faults(self.faults)
        refused = _refuse_create(body, self.files)
        if refused is not None:
            return 400, _invalid(*refused)
        now, endpoint = int(time.time()), body["endpoint"]
        rows, errors = _validate(self.files[body["input_file_id"]]["data"], endpoint)
        if not errors and self._fails_left > 0:
            self._fails_left -= 1
            errors = [{"code": "token_limit_exceeded", "line": None, "param": None,
                       "message": "Enqueued token limit reached for this model (injected)."}]
        fate = {} if errors else self._fates(rows)
        obj = {"id": self._id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
               "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
               "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
               "model": _model(rows), "usage": _usage([])}
        self.batches[obj["id"]] = _Batch(obj, [] if errors else rows, errors, fate)
        self.created.append(Created(obj["id"], body["input_file_id"], endpoint, body.get("metadata"),
                                    [row["custom_id"] for row in rows]))
        return 200, obj

    def _fates(self, rows: list[dict]) -> dict[str, str]:
        """Which rows expire and which are refused, drawn once per row in file order."""
        fate = {}
        for row in rows:
            draw = self._rng.random()
            if draw < self.faults.expire_share:
                fate[row["custom_id"]] = "expire"
            elif draw < self.faults.expire_share + self.faults.refuse_share:
                fate[row["custom_id"]] = "refuse"
        return fate

    def retrieve_batch(self, batch_id: str) -> dict:
        batch = self.batch(batch_id)
        batch.polls += 1
        if self.polls_to_finish is not None and batch.polls >= self.polls_to_finish:
            while batch.obj["status"] not in TERMINAL:
                self._step(batch)
        return batch.obj

    def cancel_batch(self, batch_id: str) -> tuple[int, dict]:
        batch = self.batch(batch_id)
        status = batch.obj["status"]
        if status in TERMINAL:
            return 409, _invalid(f"Cannot cancel a batch with status '{status}'.", None)
        if status != "cancelling":
            batch.obj.update(status="cancelling", cancelling_at=int(time.time()))
        return 200, batch.obj


def _invalid(message: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def _refuse_create(body: dict, files: dict[str, dict]) -> tuple[str, str | None] | None:
    """Why POST /v1/batches is answered 400, as (message, param), or None to accept it."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            return f"Missing required parameter: '{name}'.", name
    if body["endpoint"] not in ENDPOINTS:
        return f"Invalid value: '{body['endpoint']}'. Supported values are: {', '.join(ENDPOINTS)}.", "endpoint"
    if body["completion_window"] != "24h":
        return f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'.", "completion_window"
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
        return "metadata: at most 16 pairs, keys up to 64 and string values up to 512 characters.", "metadata"
    stored = files.get(body["input_file_id"])
    if stored is None:
        return f"No such File object: {body['input_file_id']}", "input_file_id"
    if stored["obj"]["purpose"] != "batch":
        return "The input file must be uploaded with purpose 'batch'.", "input_file_id"
    return None


def _validate(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """(the lines, the validation errors) of an input file, each error naming its 1-based line."""
    lines = data.decode(errors="replace").splitlines()
    if len(lines) > MAX_REQUESTS:
        return [], [{"code": "too_many_requests", "line": None, "param": None,
                     "message": f"The batch input file has {len(lines)} requests; the limit is {MAX_REQUESTS}."}]
    rows, errors, seen = [], [], set()
    for number, text in enumerate(lines, 1):
        problem = _line_problem(text, endpoint, seen)
        if problem is not None:
            errors.append({"code": problem[0], "message": problem[1], "param": problem[2], "line": number})
            continue
        row = json.loads(text)
        seen.add(row["custom_id"])
        rows.append(row)
    if not lines:
        errors.append({"code": "empty_file", "message": "The batch input file is empty.", "param": None,
                       "line": None})
    return rows, errors


def _line_problem(text: str, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """(code, message, param) of what is wrong with one input line, or None."""
    try:
        row = json.loads(text)
    except ValueError:
        return "invalid_json_line", "This line is not parseable as valid JSON.", None
    if not isinstance(row, dict):
        return "invalid_json_line", "This line is not a JSON object.", None
    for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if not isinstance(row.get(name), kind):
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    if row["method"] != "POST":
        return "invalid_value", f"Invalid value: '{row['method']}'. Supported values are: 'POST'.", "method"
    if row["url"] != endpoint:
        return ("mismatched_endpoint", f"The url '{row['url']}' does not match the batch's endpoint "
                f"'{endpoint}'.", "url")
    if row["custom_id"] in seen:
        return ("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. "
                "The custom_id parameter must be unique for each request in a batch.", "custom_id")
    return None


def _model(rows: list[dict]) -> str | None:
    return next((row["body"].get("model") for row in rows if isinstance(row["body"].get("model"), str)), None)


def _usage(answers: list[dict]) -> dict:
    """The batch's token usage, summed over its answers (chat, completions, embeddings, responses)."""
    total = {"input": 0, "cached": 0, "output": 0, "reasoning": 0}
    for answer in answers:
        usage = answer.get("usage") or {}
        total["input"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
        total["output"] += usage.get("completion_tokens", usage.get("output_tokens", 0))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        total["cached"] += details.get("cached_tokens", 0)
        out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        total["reasoning"] += out_details.get("reasoning_tokens", 0)
    return {"input_tokens": total["input"], "input_tokens_details": {"cached_tokens": total["cached"]},
            "output_tokens": total["output"], "output_tokens_details": {"reasoning_tokens": total["reasoning"]},
            "total_tokens": total["input"] + total["output"]}


def _page(items: list[dict], query: dict[str, list[str]], default_limit: int) -> dict:
    """A cursor page as OpenAI lists it: the items after `after`, at most `limit`."""
    after = query.get("after", [None])[0]
    limit = max(1, min(int(query.get("limit", [default_limit])[0]), 10_000))
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field: (filename, bytes)}."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


_ROUTES = [
    ("POST", re.compile(r"/v1/files"), "post_file"),
    ("GET", re.compile(r"/v1/files"), "list_files"),
    ("GET", re.compile(r"/v1/files/([^/]+)"), "get_file"),
    ("DELETE", re.compile(r"/v1/files/([^/]+)"), "delete_file"),
    ("GET", re.compile(r"/v1/files/([^/]+)/content"), "get_content"),
    ("POST", re.compile(r"/v1/batches"), "post_batch"),
    ("GET", re.compile(r"/v1/batches"), "list_batches"),
    ("GET", re.compile(r"/v1/batches/([^/]+)"), "get_batch"),
    ("POST", re.compile(r"/v1/batches/([^/]+)/cancel"), "cancel_batch"),
]


def _handler_for(fake: FakeBatchAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        api = fake
    return Handler


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: the routes above, each answered under the fake's lock."""

    protocol_version = "HTTP/1.1"
    api: FakeBatchAPI

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: pytest shows failures, not every request

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        key = self.api.api_key
        if key is not None and self.headers.get("authorization") != f"Bearer {key}":
            return self._send(401, error_body("Invalid API key", "invalid_request_error", "invalid_api_key"))
        for verb, pattern, name in _ROUTES:
            match = pattern.fullmatch(url.path)
            if verb == method and match:
                with self.api.lock:
                    try:
                        status, payload = getattr(self, name)(*match.groups(), raw=raw, query=parse_qs(url.query))
                    except NotFound as exc:
                        status, payload = 404, _invalid(str(exc), None)
                self._send(status, payload)
                with self.api.lock:
                    self.api.calls += 1
                    self.api._called.notify_all()
                return None
        self._send(404, _invalid(f"Invalid URL ({method} {url.path})", None))

    def _send(self, status: int, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ---- routes: (status, JSON object or raw bytes) ----

    def post_file(self, *, raw: bytes, query: dict) -> tuple[int, dict]:
        fields = _multipart(self.headers.get("content-type", ""), raw)
        if "file" not in fields:
            return 400, _invalid("Missing required parameter: 'file'.", "file")
        filename, data = fields["file"]
        purpose = fields.get("purpose", (None, b""))[1].decode()
        return self.api.upload(filename or "upload.jsonl", purpose, data)

    def list_files(self, *, raw: bytes, query: dict) -> tuple[int, dict]:
        files = [f["obj"] for f in self.api.files.values()]
        if "purpose" in query:
            files = [f for f in files if f["purpose"] == query["purpose"][0]]
        if query.get("order", ["desc"])[0] == "desc":
            files.reverse()
        return 200, _page(files, query, 10_000)

    def get_file(self, file_id: str, *, raw: bytes, query: dict) -> tuple[int, dict]:
        return 200, self.api.file(file_id)["obj"]

    def delete_file(self, file_id: str, *, raw: bytes, query: dict) -> tuple[int, dict]:
        self.api.file(file_id)  # 404 when it is not there
        del self.api.files[file_id]
        return 200, {"id": file_id, "object": "file", "deleted": True}

    def get_content(self, file_id: str, *, raw: bytes, query: dict) -> tuple[int, bytes]:
        return 200, self.api.file(file_id)["data"]

    def post_batch(self, *, raw: bytes, query: dict) -> tuple[int, dict]:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, _invalid("We could not parse the JSON body of your request.", None)
        return self.api.create_batch(body if isinstance(body, dict) else {})

    def list_batches(self, *, raw: bytes, query: dict) -> tuple[int, dict]:
        if self.api.list_page is not None:
            return self.api.list_page(query)
        return 200, _page([b.obj for b in reversed(self.api.batches.values())], query, 20)

    def get_batch(self, batch_id: str, *, raw: bytes, query: dict) -> tuple[int, dict]:
        return 200, self.api.retrieve_batch(batch_id)

    def cancel_batch(self, batch_id: str, *, raw: bytes, query: dict) -> tuple[int, dict]:
        return self.api.cancel_batch(batch_id)
