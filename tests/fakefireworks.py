"""Fake of Fireworks' datasets and batch inference jobs API, for tests of the providers'
batch backend.

Serves, under /v1/accounts/{account_id}/ on 127.0.0.1 (a thread, port 0), the routes the
official `fireworks-ai` client calls, with its camelCase JSON:

- datasets: create, get, list (filter, orderBy, pageSize/pageToken), delete, `:upload`
  (multipart `file`, up to `upload_limit` bytes), `:getUploadEndpoint` (signed PUT URLs on
  this fake) then `:validateUpload`, `:getDownloadEndpoint` (signed GET URLs that need no
  key, refuse one, and expire on the fake clock: `expire_urls()`);
- models: get, of the account's or the public `fireworks` account's, with
  `batchInferenceSupported` false for those in `models_without_batch`;
- batchInferenceJobs: create (`?batchInferenceJobId=`), get, list, delete, with `state`,
  `status` and `jobProgress`, and `continuedFromJobName` rerunning only the rows a previous
  job has no answer for.

Nothing moves by itself: a job takes `polls_to_finish` steps (VALIDATING, PENDING, RUNNING
..., then a final state), one a GET of the job when `advance_on_poll`, or one a call of
`advance()`. Answers are made by tests.fakeserver's answer maker, so they look like the
live fake's. A job's model in `models_without_batch` stays PENDING, as the documentation
says the real service may leave it. Everything received is recorded (`datasets`, `jobs`,
`requests`) so tests can check, e.g., that no custom_id went to two jobs.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import math
import random
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.fakeserver import FakeServer, request_key

RESULTS_FILE = "BIJOutputSet.jsonl"  # the names a real output dataset's files carry
ERRORS_FILE = "error-data.jsonl"
UPLOAD_LIMIT = 150 * 1024 * 1024  # `:upload` takes up to 150 MB; larger files go by signed URL
URL_TTL_S = 600.0  # signed download URLs live about ten minutes

_ROUTE = re.compile(r"^/v1/accounts/([^/]+)/(datasets|batchInferenceJobs|models)(?:/([^/:]+))?(?::(\w+))?$")
_GRPC_CODES = {400: (3, "INVALID_ARGUMENT"), 401: (16, "UNAUTHENTICATED"), 403: (7, "PERMISSION_DENIED"),
               404: (5, "NOT_FOUND"), 409: (6, "ALREADY_EXISTS"),
               413: (3, "INVALID_ARGUMENT"), 503: (14, "UNAVAILABLE")}
_FINAL = {"JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_EXPIRED", "JOB_STATE_CANCELLED"}


@dataclass
class Faults:
    """What goes wrong; every draw comes from `seed`, so a failing test replays exactly."""

    seed: int = 0
    request_error_rate: float = 0.0  # rows answered with an error line instead of a result
    expire_at: float | None = None  # share of rows done when the job expires (partial output kept)
    fail_at: float | None = None  # share of rows done when the whole job fails (no output)
    shuffle_output: bool = True  # result and error lines in a seeded random order
    upload_errors: int = 0  # the next this many uploads (`:upload` or signed PUT) answer 503
    urls_expired: bool = False  # signed download URLs are already expired when handed out


@dataclass
class FakeDataset:
    name: str
    dataset_id: str
    example_count: str = "0"
    display_name: str = ""
    state: str = "UPLOADING"
    files: dict[str, bytes] = field(default_factory=dict)  # filename -> bytes, once uploaded
    expected_sizes: dict[str, int] = field(default_factory=dict)  # from getUploadEndpoint
    source_job_name: str = ""
    create_time: str = ""

    def lines(self) -> list[str]:
        return [line for data in self.files.values() for line in data.decode().splitlines() if line.strip()]

    def to_json(self) -> dict:
        out = {"name": self.name, "displayName": self.display_name, "createTime": self.create_time,
               "updateTime": self.create_time, "state": self.state, "exampleCount": self.example_count,
               "userUploaded": {}, "format": "FORMAT_UNSPECIFIED", "status": {"code": "OK", "message": ""}}
        if self.source_job_name:
            out["sourceJobName"] = self.source_job_name
        return out


@dataclass
class FakeJob:
    name: str
    job_id: str
    model: str
    input_dataset_id: str
    output_dataset_id: str
    display_name: str
    inference_parameters: dict
    continued_from: str
    create_time: str
    state: str = "JOB_STATE_VALIDATING"
    status: dict = field(default_factory=lambda: {"code": "OK", "message": ""})
    rows: list[dict] = field(default_factory=list)  # {custom_id, body} it runs, set when validated
    failing: set[str] = field(default_factory=set)  # custom_ids drawn to error
    results: dict[str, dict] = field(default_factory=dict)  # custom_id -> result line
    errors: dict[str, dict] = field(default_factory=dict)  # custom_id -> error line
    steps: int = 0
    deleted: bool = False
    faults: Faults = field(default_factory=Faults)  # those in force when it was validated

    @property
    def custom_ids(self) -> list[str]:
        return [row["custom_id"] for row in self.rows]

    def progress(self) -> dict:
        usage = [r["response"]["usage"] for r in self.results.values()]
        done = len(self.results) + len(self.errors)
        total = len(self.rows)
        return {"percent": 100 * done // total if total else 0, "totalInputRequests": total,
                "successfullyProcessedRequests": len(self.results), "failedRequests": len(self.errors),
                "totalProcessedRequests": done, "outputRows": len(self.results),
                "inputTokens": sum(u["prompt_tokens"] for u in usage),
                "outputTokens": sum(u["completion_tokens"] for u in usage),
                "cachedInputTokenCount": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)}

    def to_json(self) -> dict:
        params = {k: v for k, v in self.inference_parameters.items() if v is not None}
        out = {"name": self.name, "displayName": self.display_name, "createTime": self.create_time,
               "updateTime": self.create_time, "state": self.state, "status": self.status, "model": self.model,
               "inputDatasetId": self.input_dataset_id, "outputDatasetId": self.output_dataset_id,
               "inferenceParameters": params, "jobProgress": self.progress(), "createdBy": "tests@example.com"}
        if self.continued_from:
            out["continuedFromJobName"] = self.continued_from
        return out


class ApiError(Exception):
    """An answer other than 200, in the gRPC-gateway shape the control plane uses."""

    def __init__(self, status: int, message: str, precondition: bool = False):
        super().__init__(message)
        self.status = status
        # gRPC-gateway answers FAILED_PRECONDITION with HTTP 400, like INVALID_ARGUMENT
        code, name = (9, "FAILED_PRECONDITION") if precondition else _GRPC_CODES.get(status, (13, "INTERNAL"))
        self.body = {"code": code, "message": message, "details": [], "status": name}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeFireworks:
    """The fake service. `base_url` ends in /v1 (for hand-made requests); `origin` is what
    the fireworks-ai client takes as base_url, since its paths begin with /v1."""

    def __init__(self, account_id: str = "test-account", api_key: str = "fw-test-key",
                 faults: Faults | None = None, polls_to_finish: int = 4, advance_on_poll: bool = True,
                 models_without_batch: frozenset[str] = frozenset({"accounts/fireworks/models/no-batch"}),
                 upload_limit: int = UPLOAD_LIMIT):
        if polls_to_finish < 3:
            raise ValueError("polls_to_finish must be at least 3: validating, pending, then running")
        self.account_id, self.api_key = account_id, api_key
        self.faults = faults or Faults()
        self.polls_to_finish, self.advance_on_poll = polls_to_finish, advance_on_poll
        self.models_without_batch, self.upload_limit = models_without_batch, upload_limit
        self.datasets: dict[str, FakeDataset] = {}
        self.jobs: dict[str, FakeJob] = {}  # deleted jobs stay, marked, so tests see all that ran
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self.clock = 0.0  # the fake time signed URLs expire on
        self._signed: dict[str, tuple[str, str, str, float]] = {}  # token -> method, dataset, file, expiry
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)  # a request arrived: what a test may wait on
        self._maker = FakeServer()  # never started: only its answer-making is used
        self._maker._path = "/v1/chat/completions"
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.origin = self.base_url = ""

    # ---- lifecycle and test controls ----

    def __enter__(self) -> FakeFireworks:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        # a short poll interval: shutdown() waits for it, once per test
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), name="fakefireworks",
                                        daemon=True)
        self._thread.start()
        self.origin = f"http://127.0.0.1:{self._http.server_address[1]}"
        self.base_url = f"{self.origin}/v1"
        return self

    def __exit__(self, *exc_info) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)

    def advance(self, job_id: str | None = None, steps: int = 1) -> None:
        """Move one job (or every job) on by `steps`, as that many polls would."""
        with self._lock:
            for _ in range(steps):
                for job in [self.jobs[job_id]] if job_id else list(self.jobs.values()):
                    self._step(job)

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        """Wait up to `timeout` until `count` requests arrived in all; whether they did."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def expire_urls(self) -> None:
        """Every signed URL handed out so far is now past its expiry."""
        with self._lock:
            self.clock += URL_TTL_S + 1

    def sent(self) -> dict[str, list[str]]:
        """custom_id -> the jobs that were given it to run (continuations included)."""
        out: dict[str, list[str]] = {}
        for job in self.jobs.values():
            for custom_id in job.custom_ids:
                out.setdefault(custom_id, []).append(job.job_id)
        return out

    def answered(self) -> dict[str, list[str]]:
        """custom_id -> the jobs that returned a result line for it."""
        out: dict[str, list[str]] = {}
        for job in self.jobs.values():
            for custom_id in job.results:
                out.setdefault(custom_id, []).append(job.job_id)
        return out

    # ---- requests, on the server's threads ----

    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        with self._lock:
            self.requests.append((method, url.path, headers))
            self._arrived.notify_all()
            try:
                if url.path.startswith("/signed/"):
                    return self._storage(method, url.path.removeprefix("/signed/"), headers, raw)
                if headers.get("authorization") != f"Bearer {self.api_key}":
                    raise ApiError(401, "invalid API key")
                answer = self._route(method, url.path, parse_qs(url.query), headers, raw)
            except ApiError as exc:
                return exc.status, json.dumps(exc.body).encode(), "application/json"
        return 200, json.dumps(answer).encode(), "application/json"

    def _route(self, method: str, path: str, query: dict, headers: dict[str, str], raw: bytes) -> dict:
        match = _ROUTE.match(path)
        if match is None:
            raise ApiError(404, f"no route {path}")
        account, kind, ident, verb = match.groups()
        if kind == "models" and method == "GET" and ident is not None and verb is None:
            return self.get_model(account, ident)
        if account != self.account_id:
            raise ApiError(403, f"permission denied on account {account!r}")
        params = {k: v[-1] for k, v in query.items()}
        handler = _ROUTES.get((method, kind, ident is not None, verb))
        if handler is None:
            raise ApiError(404, f"no route {method} {path}")
        body = json.loads(raw) if raw and not headers.get("content-type", "").startswith("multipart/") else {}
        return handler(self, ident, params, body, headers, raw)

    # ---- models ----

    def get_model(self, account: str, ident: str) -> dict:
        """A model of this account or a public one (account `fireworks`); any name is one,
        since the fake serves every model its answer maker is asked for."""
        name = f"accounts/{account}/models/{ident}"
        if account not in (self.account_id, "fireworks"):
            raise ApiError(404, f"model {name} not found")
        return {"name": name, "displayName": ident, "state": "READY", "kind": "HF_BASE_MODEL",
                "public": account == "fireworks", "supportsServerless": True,
                "batchInferenceSupported": name not in self.models_without_batch, "createTime": _now()}

    # ---- datasets ----

    def _dataset(self, dataset_id: str) -> FakeDataset:
        if dataset_id not in self.datasets:
            raise ApiError(404, f"dataset accounts/{self.account_id}/datasets/{dataset_id} not found")
        return self.datasets[dataset_id]

    def _new_dataset(self, dataset_id: str, **fields) -> FakeDataset:
        if dataset_id in self.datasets:
            raise ApiError(409, f"dataset {dataset_id} already exists")
        dataset = FakeDataset(f"accounts/{self.account_id}/datasets/{dataset_id}", dataset_id,
                              create_time=_now(), **fields)
        self.datasets[dataset_id] = dataset
        return dataset

    def create_dataset(self, _ident, _params, body: dict, _headers, _raw) -> dict:
        spec = body.get("dataset") or {}
        if not body.get("datasetId") or "userUploaded" not in spec:
            raise ApiError(400, "datasetId and dataset.userUploaded are required")
        return self._new_dataset(body["datasetId"], example_count=str(spec.get("exampleCount", "0")),
                                 display_name=spec.get("displayName", "")).to_json()

    def get_dataset(self, ident: str, _params, _body, _headers, _raw) -> dict:
        return self._dataset(ident).to_json()

    def list_datasets(self, _ident, params: dict, _body, _headers, _raw) -> dict:
        items = [d.to_json() for d in self.datasets.values()]
        return _page("datasets", items, params, default_order="name")

    def delete_dataset(self, ident: str, _params, _body, _headers, _raw) -> dict:
        del self.datasets[self._dataset(ident).dataset_id]
        return {}

    def upload(self, ident: str, _params, _body, headers: dict[str, str], raw: bytes) -> dict:
        dataset = self._dataset(ident)
        self._upload_fault()
        filename, data = _multipart_file(headers.get("content-type", ""), raw)
        if len(data) > self.upload_limit:
            raise ApiError(400, f"file is {len(data)} bytes; :upload takes up to {self.upload_limit}, "
                                "use getUploadEndpoint for larger files")
        dataset.files = {filename: data}
        dataset.state = "READY"
        return {"id": ident, "bytes": len(data), "filename": filename, "object": "file", "purpose": "batch"}

    def _upload_fault(self) -> None:
        if self.faults.upload_errors > 0:
            self.faults.upload_errors -= 1
            raise ApiError(503, "upload backend unavailable (injected)")

    def get_upload_endpoint(self, ident: str, _params, body: dict, _headers, _raw) -> dict:
        dataset = self._dataset(ident)
        sizes = body.get("filenameToSize") or {}
        if not sizes:
            raise ApiError(400, "filenameToSize is required")
        dataset.expected_sizes = {name: int(size) for name, size in sizes.items()}  # replaces, as the real one does
        return {"filenameToSignedUrls": {name: self._sign("PUT", ident, name) for name in sizes}}

    def validate_upload(self, ident: str, _params, _body, _headers, _raw) -> dict:
        dataset = self._dataset(ident)
        for name, size in dataset.expected_sizes.items():
            got = len(dataset.files.get(name, b""))
            if got != size:
                raise ApiError(400, f"file {name}: {got} bytes uploaded, {size} announced", precondition=True)
        dataset.state = "READY"
        return {}

    def get_download_endpoint(self, ident: str, _params, _body, _headers, _raw) -> dict:
        dataset = self._dataset(ident)
        return {"filenameToSignedUrls": {name: self._sign("GET", ident, name) for name in dataset.files}}

    def _sign(self, method: str, dataset_id: str, filename: str) -> str:
        token = secrets.token_urlsafe(12)
        expiry = self.clock - 1 if method == "GET" and self.faults.urls_expired else self.clock + URL_TTL_S
        self._signed[token] = (method, dataset_id, filename, expiry)
        query = f"X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Expires={int(URL_TTL_S)}"
        return f"{self.origin}/signed/{token}/{filename}?{query}"

    def _storage(self, method: str, rest: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, str]:
        """The object store behind signed URLs: no API key, and one sent is refused, as a
        second credential is by GCS; an expired signature is a 400 ExpiredToken."""
        token = rest.split("/", 1)[0]
        signed_method, dataset_id, filename, expiry = self._signed.get(token, ("", "", "", 0.0))
        if signed_method != method or "authorization" in headers:
            return 403, _gcs_error("AccessDenied", "signature does not match this request"), "application/xml"
        if self.clock > expiry:
            return 400, _gcs_error("ExpiredToken", "Invalid argument."), "application/xml"
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            return 404, _gcs_error("NoSuchKey", "The specified key does not exist."), "application/xml"
        if method == "GET":
            return 200, dataset.files[filename], "application/octet-stream"
        if self.faults.upload_errors > 0:
            self.faults.upload_errors -= 1
            return 503, _gcs_error("ServiceUnavailable", "injected"), "application/xml"
        announced = headers.get("x-goog-content-length-range")
        if announced is not None and announced != f"{len(raw)},{len(raw)}":
            return 400, _gcs_error("EntityTooLarge", f"body is {len(raw)} bytes, range {announced}"), "application/xml"
        dataset.files[filename] = raw
        return 200, b"", "text/plain"

    # ---- batch inference jobs ----

    def _job(self, job_id: str) -> FakeJob:
        job = self.jobs.get(job_id)
        if job is None or job.deleted:
            raise ApiError(404, f"batch inference job accounts/{self.account_id}/batchInferenceJobs/{job_id} not found")
        return job

    def _dataset_id(self, name: str) -> str:
        prefix = f"accounts/{self.account_id}/datasets/"
        if not name.startswith(prefix):
            raise ApiError(400, f"dataset name {name!r} must be of the form {prefix}<id>")
        return name.removeprefix(prefix)

    def create_job(self, _ident, params: dict, body: dict, _headers, _raw) -> dict:
        job_id = params.get("batchInferenceJobId") or f"bij-{secrets.token_hex(6)}"
        if job_id in self.jobs:
            raise ApiError(409, f"batch inference job {job_id} already exists")
        previous = None
        if body.get("continuedFromJobName"):
            previous = self._job(body["continuedFromJobName"].rsplit("/", 1)[-1])
        model = body.get("model") or (previous.model if previous else "")
        input_name = body.get("inputDatasetId") or (previous.input_dataset_id if previous else "")
        if not model or not input_name:
            raise ApiError(400, "model and inputDatasetId are required unless continuedFromJobName is set")
        if self._dataset(self._dataset_id(input_name)).state != "READY":
            raise ApiError(400, f"input dataset {input_name} is not READY; upload it first", precondition=True)
        output_name = body.get("outputDatasetId") or f"accounts/{self.account_id}/datasets/{job_id}-output"
        output = self._new_dataset(self._dataset_id(output_name))
        job = FakeJob(f"accounts/{self.account_id}/batchInferenceJobs/{job_id}", job_id, model, input_name,
                      output_name, body.get("displayName", ""), dict(body.get("inferenceParameters") or {}),
                      previous.name if previous else "", _now())
        output.source_job_name = job.name
        self.jobs[job_id] = job
        return job.to_json()

    def get_job(self, ident: str, _params, _body, _headers, _raw) -> dict:
        job = self._job(ident)
        if self.advance_on_poll:
            self._step(job)
        return job.to_json()

    def list_jobs(self, _ident, params: dict, _body, _headers, _raw) -> dict:
        items = [j.to_json() for j in self.jobs.values() if not j.deleted]
        return _page("batchInferenceJobs", items, params, default_order="createTime")

    def delete_job(self, ident: str, _params, _body, _headers, _raw) -> dict:
        self._job(ident).deleted = True
        return {}

    # ---- a job's progress, one step at a time ----

    def _step(self, job: FakeJob) -> None:
        if job.state in _FINAL or job.deleted:
            return
        job.steps += 1
        if job.state == "JOB_STATE_VALIDATING":
            self._validate(job)
        elif job.state == "JOB_STATE_PENDING":
            if job.model not in self.models_without_batch:
                job.state = "JOB_STATE_RUNNING"
        else:
            self._run_share(job)

    def _validate(self, job: FakeJob) -> None:
        """Read the input (or, for a continuation, what the previous job has no answer for);
        a bad line fails the whole job, as a bad file does."""
        if job.continued_from:
            previous = self.jobs[job.continued_from.rsplit("/", 1)[-1]]
            job.rows = [row for row in previous.rows if row["custom_id"] not in previous.results]
        else:
            try:
                job.rows = _read_rows(self.datasets[self._dataset_id(job.input_dataset_id)].lines())
            except ValueError as exc:
                job.state, job.status = "JOB_STATE_FAILED", {"code": "INVALID_ARGUMENT", "message": str(exc)}
                return
        job.faults = self.faults
        rng = random.Random(f"{self.faults.seed}:{job.job_id}")
        job.failing = {cid for cid in job.custom_ids if rng.random() < self.faults.request_error_rate}
        job.state = "JOB_STATE_PENDING"

    def _run_share(self, job: FakeJob) -> None:
        """Answer the next share of rows; the step that answers the last one completes the
        job, unless an injected expiry or failure stops it first."""
        faults, total = job.faults, len(job.rows)
        done = len(job.results) + len(job.errors)
        target = min(total, done + math.ceil(total / (self.polls_to_finish - 2)))
        stops = [(math.ceil(share * total), state) for share, state in
                 ((faults.expire_at, "JOB_STATE_EXPIRED"), (faults.fail_at, "JOB_STATE_FAILED")) if share is not None]
        stop = min(stops, default=(total + 1, ""))
        for row in job.rows[done:min(target, stop[0])]:
            self._answer(job, row)
        if len(job.results) + len(job.errors) >= stop[0]:
            job.state = stop[1]
            if stop[1] == "JOB_STATE_FAILED":
                job.status = {"code": "INTERNAL", "message": "batch inference job failed (injected)"}
                return
            job.status = {"code": "DEADLINE_EXCEEDED", "message": "batch inference job expired (injected)"}
            self._write_output(job)
        elif target >= total:
            job.state = "JOB_STATE_COMPLETED"
            self._write_output(job)

    def _answer(self, job: FakeJob, row: dict) -> None:
        custom_id, body = row["custom_id"], _request_body(job, row["body"])
        if custom_id in job.failing:
            job.errors[custom_id] = {"custom_id": custom_id,
                                     "error": {"code": 500, "message": "inference failed (injected)"}}
        elif not isinstance(body.get("messages"), list):
            job.errors[custom_id] = {"custom_id": custom_id,
                                     "error": {"code": 400, "message": "body.messages is required"}}
        else:
            answer = self._maker._build_answer(body, request_key(body))
            job.results[custom_id] = {"custom_id": custom_id, "response": answer}

    def _write_output(self, job: FakeJob) -> None:
        rng = random.Random(f"order:{job.faults.seed}:{job.job_id}")
        files = {}
        for filename, lines in ((RESULTS_FILE, list(job.results.values())), (ERRORS_FILE, list(job.errors.values()))):
            if job.faults.shuffle_output:
                rng.shuffle(lines)
            files[filename] = "".join(json.dumps(line) + "\n" for line in lines).encode()
        output = self.datasets[self._dataset_id(job.output_dataset_id)]
        output.files, output.state, output.example_count = files, "READY", str(len(job.results))


_ROUTES = {("POST", "datasets", False, None): FakeFireworks.create_dataset,
           ("GET", "datasets", True, None): FakeFireworks.get_dataset,
           ("GET", "datasets", False, None): FakeFireworks.list_datasets,
           ("DELETE", "datasets", True, None): FakeFireworks.delete_dataset,
           ("POST", "datasets", True, "upload"): FakeFireworks.upload,
           ("POST", "datasets", True, "getUploadEndpoint"): FakeFireworks.get_upload_endpoint,
           ("POST", "datasets", True, "validateUpload"): FakeFireworks.validate_upload,
           ("GET", "datasets", True, "getDownloadEndpoint"): FakeFireworks.get_download_endpoint,
           ("POST", "batchInferenceJobs", False, None): FakeFireworks.create_job,
           ("GET", "batchInferenceJobs", True, None): FakeFireworks.get_job,
           ("GET", "batchInferenceJobs", False, None): FakeFireworks.list_jobs,
           ("DELETE", "batchInferenceJobs", True, None): FakeFireworks.delete_job}


def _read_rows(lines: list[str]) -> list[dict]:
    rows, seen = [], set()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str) or not row["custom_id"]:
            raise ValueError(f"line {number}: custom_id (a string) is required")
        if not isinstance(row.get("body"), dict):
            raise ValueError(f"line {number}: body (an object) is required")
        if row["custom_id"] in seen:
            raise ValueError(f"line {number}: duplicate custom_id {row['custom_id']!r}")
        seen.add(row["custom_id"])
        rows.append(row)
    return rows


_PARAMETERS = {"maxTokens": "max_tokens", "temperature": "temperature", "topP": "top_p", "topK": "top_k", "n": "n"}


def _request_body(job: FakeJob, body: dict) -> dict:
    """The request a row stands for: its body, the job's model, and the job's inference
    parameters (extraBody is a JSON string) where the row sets none."""
    params = job.inference_parameters
    defaults = {snake: params[camel] for camel, snake in _PARAMETERS.items() if params.get(camel) is not None}
    if params.get("extraBody"):
        defaults.update(json.loads(params["extraBody"]))
    return {**defaults, **body, "model": job.model}


def _multipart_file(content_type: str, raw: bytes) -> tuple[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_filename() or "upload.jsonl", part.get_payload(decode=True)
    raise ApiError(400, "multipart field 'file' is required")


def _gcs_error(code: str, message: str) -> bytes:
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error>").encode()


_TERM = re.compile(r'^\s*([\w.]+)\s*(!=|=)\s*"?([^"]*)"?\s*$')


def _page(kind: str, items: list[dict], params: dict, default_order: str) -> dict:
    """List answers: AIP-160 filters joined by AND (`field=value`, `field!=value`), orderBy
    on top-level fields (" desc" reverses), pageSize up to 200 (50 unless given)."""
    for term in filter(None, re.split(r"\s+AND\s+", params.get("filter", "").strip())):
        match = _TERM.match(term)
        if match is None:
            raise ApiError(400, f"unsupported filter term {term!r}")
        key, op, value = match.groups()
        items = [item for item in items if (str(item.get(key, "")) == value) == (op == "=")]
    for order in reversed((params.get("orderBy") or default_order).split(",")):
        key, _, direction = order.strip().partition(" ")
        items = sorted(items, key=lambda item: str(item.get(key, "")), reverse=direction.strip() == "desc")
    try:
        start = int(base64.urlsafe_b64decode(params["pageToken"]).decode()) if params.get("pageToken") else 0
    except ValueError as exc:
        raise ApiError(400, "invalid page token") from exc
    size = min(int(params.get("pageSize") or 50), 200)
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return {kind: items[start:end], "nextPageToken": token, "totalSize": len(items)}


def _read_chunked(stream) -> bytes:
    """A streamed upload (a PUT of a file object may come without Content-Length)."""
    parts = []
    while size := int(stream.readline().split(b";")[0].strip() or b"0", 16):
        parts.append(stream.read(size))
        stream.readline()
    while stream.readline().strip():  # trailers, up to the blank line
        pass
    return b"".join(parts)


def _handler_for(fake: FakeFireworks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # head and body go out as two writes; no 40 ms wait between

        def _serve(self) -> None:
            raw = _read_chunked(self.rfile) if "chunked" in self.headers.get("Transfer-Encoding", "") \
                else self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body, content_type = fake.handle(self.command, self.path, headers, raw)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:  # the test output stays clean
            pass

    return Handler
