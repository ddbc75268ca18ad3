"""Fireworks' batch inference jobs, on datasets of the account's.

    input    {"custom_id", "body": {...}}           (the model is the job's, set once)
    results  {"custom_id", "response": {answer}}    (no status: a line here is an answer)
    errors   {"custom_id", "error": {"code", "message"}}: a 4xx code fails the row as a
             live 4xx would; any other, the row is asked again

The calls, under https://api.fireworks.ai/v1/accounts/{account}:

    upload    POST datasets, then POST datasets/{id}:upload (multipart), or for a file
              over `upload_limit` :getUploadEndpoint, PUT to the signed URL, :validateUpload
    create    POST batchInferenceJobs?batchInferenceJobId=  (its output: dataset {job}-out)
    get       GET batchInferenceJobs/{id}
    tagged    GET batchInferenceJobs (pageSize, pageToken)
    cancel    DELETE batchInferenceJobs/{id}: Fireworks has no cancel of its own
    download  GET datasets/{id}:getDownloadEndpoint, then GET the signed URL (no key)

A job has no metadata: its display name carries it, URL-encoded (`batchrun_job=...&
batchrun_batch=...`), which reads back exactly. States are Fireworks' words without their
`JOB_STATE_` prefix, in lower case ("running", "completed", "expired"), so a status
reads the same for both providers; counts keep OpenAI's names (total, completed, failed).
A row an expired, failed or cancelled job never reached has no line in either file.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qsl, urlencode

import httpx

from ..._exceptions import ConfigError, RetryableAPIError
from ...endpoints.base import Endpoint
from ...endpoints.chat import Chat
from ...spec.model import BatchApiSpec
from .base import Batch, Outcome, Provider, checked, stream_into

__all__ = ["FireworksBatches"]

RESULTS_FILE = "BIJOutputSet.jsonl"  # the files of a job's output dataset
ERRORS_FILE = "error-data.jsonl"
UPLOAD_LIMIT = 150 * 1024 * 1024  # bytes `:upload` takes; a larger file goes by signed URL
MAX_ID = 63  # a Fireworks resource id: lowercase letters, digits and dashes, a letter first
DONE = frozenset({"completed", "failed", "expired", "cancelled", "early_stopped", "deleting",
                  "deleting_cleaning_up", "deleted"})
PAGE = 200  # jobs a page, listing (Fireworks' largest)
SIGNED_TRIES = 3  # signed URLs asked for, one download, before the refusal is reported

T = TypeVar("T")


class FireworksBatches(Provider):
    name = "fireworks"
    max_rows = None
    max_bytes = 150_000_000  # one upload request; larger files take a signed URL
    one_model = True  # a batch inference job's model is the job's, its lines name none

    def __init__(self, upload_limit: int = UPLOAD_LIMIT) -> None:
        self.upload_limit = upload_limit

    def base_url(self, spec: BatchApiSpec) -> str:
        return f"{spec.base_url.rstrip('/')}/accounts/{spec.account_id}"

    def line(self, custom_id: str, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """The spec's checks hold the job's endpoint to chat, but a spec that names none
        sends a row with only a prompt to completions, which a job would refuse row by row:
        refused here, before anything of the job is uploaded."""
        if not isinstance(endpoint, Chat):
            raise ConfigError(f"batch_api: rows asking in {endpoint.field} go to the {endpoint.name} endpoint, and "
                              "Fireworks' batch inference jobs answer chat completions only; set endpoint: chat in "
                              "the spec (a prompt is then the user's message), or drop batch_api to send these "
                              "rows live")
        return {"custom_id": custom_id, "body": {k: v for k, v in body.items() if k != "model"}}

    def outcome(self, index: int, data: Mapping[str, Any], endpoint: Endpoint, *, from_errors: bool) -> Outcome:
        response, error = data.get("response"), data.get("error")
        if from_errors or response is None:
            code = error.get("code") if isinstance(error, Mapping) else None
            if isinstance(code, int) and 400 <= code < 500:  # refused, as a live 4xx would be
                return self.answered(index, code, {"error": error}, endpoint)
            return Outcome(index, unanswered=self.why(error or response))
        return self.answered(index, 200, response, endpoint)

    # ---- the remote calls (the `BatchAPI` protocol) ----

    def check(self, http: httpx.Client, model: str | None) -> None:
        """The account is the key's, and the model is one Fireworks batches: both are the
        spec's to fix, before anything is uploaded."""
        account = _account(http)
        probe = http.get("/batchInferenceJobs", params={"pageSize": 1})
        if probe.status_code in (403, 404):
            raise ConfigError(f"batch_api.account_id {account!r}: Fireworks does not let this key use that account "
                              f"(HTTP {probe.status_code}); set batch_api.account_id (or FIREWORKS_ACCOUNT_ID) to "
                              "the id of the account the key belongs to (`firectl account list` shows it)")
        checked(probe, f"reading the batch inference jobs of account {account}")
        if model is None or not re.fullmatch(r"accounts/[^/]+/models/[^/]+", model):
            raise ConfigError(f"model {model!r}: a Fireworks batch inference job needs a model named "
                              "accounts/<account>/models/<model>, e.g. accounts/fireworks/models/llama-v3p1-8b-instruct;"
                              " set model: in the spec")
        found = http.get(f"{_root(http)}/{model}")
        if found.status_code in (403, 404):
            raise ConfigError(f"model {model!r}: Fireworks has no such model this key can use (HTTP "
                              f"{found.status_code}); check model: in the spec")
        what = f"reading model {model}"
        if _read(checked(found, what), what, _batchable) is False:
            raise ConfigError(f"model {model!r}: Fireworks cannot run it in a batch inference job "
                              "(batchInferenceSupported is false); choose a model that supports batch inference, "
                              "or remove batch_api: from the spec to run it live")

    def upload(self, http: httpx.Client, name: str, data: bytes) -> str:
        """A dataset named after the file; one already there (a run stopped between creating
        and filling it) is filled again if it holds nothing, else taken as it is, since the
        file's name names its content."""
        dataset = dataset_id(name)
        what = f"uploading {name} to dataset {dataset}"
        examples = data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
        body = {"datasetId": dataset, "dataset": {"userUploaded": {}, "exampleCount": str(examples)}}
        created = http.post("/datasets", json=body)
        if created.status_code == 409:
            found = checked(http.get(f"/datasets/{dataset}"), what)
            if _read(found, what, lambda data: data.get("state")) == "READY":
                return dataset
        else:
            checked(created, what)
        if len(data) <= self.upload_limit:
            checked(http.post(f"/datasets/{dataset}:upload", files={"file": (name, data, "application/jsonl")}), what)
        else:
            self._upload_signed(http, dataset, name, data)
        return dataset

    def _upload_signed(self, http: httpx.Client, dataset: str, name: str, data: bytes) -> None:
        what = f"uploading {name} to dataset {dataset} by signed URL"
        asked = checked(http.post(f"/datasets/{dataset}:getUploadEndpoint",
                                  json={"filenameToSize": {name: str(len(data))}}), what)
        url = _read(asked, what, lambda data: str(data["filenameToSignedUrls"][name]))
        headers = {"Content-Type": "application/octet-stream",
                   "X-Goog-Content-Length-Range": f"{len(data)},{len(data)}"}
        _stored(http.send(_unsigned(http, "PUT", url, content=data, headers=headers)), what)
        checked(http.post(f"/datasets/{dataset}:validateUpload", json={}), what)

    def create(self, http: httpx.Client, file: str, url: str, metadata: Mapping[str, str],
               model: str | None = None) -> Batch:
        """A job over dataset `file`, its id the dataset's and a few random digits (a file
        may be run again), its output the dataset `{job}-out`. `url` needs no place here:
        Fireworks' jobs do chat completions only, which the spec's checks hold to."""
        if model is None:
            raise ConfigError(f"a Fireworks batch inference job needs a model; set model: in the spec ({file})")
        job = f"{file[:MAX_ID - 11].rstrip('-')}-{secrets.token_hex(3)}"
        names = f"accounts/{_account(http)}/datasets"
        body = {"model": model, "inputDatasetId": f"{names}/{file}", "outputDatasetId": f"{names}/{job}-out",
                "displayName": display_name(metadata)}
        what = f"creating a batch inference job of dataset {file}"
        return _read(checked(http.post("/batchInferenceJobs", params={"batchInferenceJobId": job}, json=body),
                             what), what, _batch)

    def get(self, http: httpx.Client, batch: str) -> Batch:
        """A job that is gone (deleted, by `cancel` or by hand) is done, with whatever its
        output dataset holds: a run that died after cancelling finds it so."""
        what = f"reading batch inference job {batch}"
        response = http.get(f"/batchInferenceJobs/{batch}")
        if response.status_code == 404:
            return Batch(id=batch, state="deleted", done=True, output_file=_file(batch, RESULTS_FILE),
                         error_file=_file(batch, ERRORS_FILE), errors=("the batch inference job is gone",))
        return _read(checked(response, what), what, _batch)

    def cancel(self, http: httpx.Client, batch: str) -> Batch:
        """Fireworks cannot stop a job but by deleting it. Its output dataset is a resource
        of its own and stays; the rows the job did not answer are in neither file."""
        job = self.get(http, batch)
        if job.done:
            return job
        checked(http.delete(f"/batchInferenceJobs/{batch}"), f"deleting batch inference job {batch}")
        return Batch(id=job.id, state="cancelled", done=True, counts=job.counts, metadata=job.metadata,
                     output_file=_file(job.id, RESULTS_FILE), error_file=_file(job.id, ERRORS_FILE))

    def tagged(self, http: httpx.Client, key: str, value: str) -> list[Batch]:
        """A list that does not move on (a page token again) ends: it holds nothing more."""
        found: list[Batch] = []
        token = ""
        tokens: set[str] = set()
        while True:
            params = {"pageSize": PAGE, "orderBy": "createTime desc", **({"pageToken": token} if token else {})}
            page = checked(http.get("/batchInferenceJobs", params=params), "listing the batch inference jobs")
            jobs, token = _read(page, "listing the batch inference jobs", _page)
            found += [job for job in jobs if job.metadata.get(key) == value]
            if not token or not jobs or token in tokens:
                return found
            tokens.add(token)

    def download(self, http: httpx.Client, file: str, into: BinaryIO) -> bool:
        """`file`: "{dataset}/{file name}"; a file (or dataset) that is not there holds
        nothing. A signed URL refused (expired) is asked for again."""
        dataset, _, name = file.partition("/")
        what = f"downloading {file}"
        for tries in range(1, SIGNED_TRIES + 1):
            asked = http.get(f"/datasets/{dataset}:getDownloadEndpoint")
            if asked.status_code == 404:
                return False
            urls = _read(checked(asked, what), what, lambda data: dict(data.get("filenameToSignedUrls") or {}))
            if name not in urls:
                return False
            try:
                return stream_into(http, _unsigned(http, "GET", str(urls[name])), into, what,
                                   check=_stored if tries == SIGNED_TRIES else _signed)
            except _Expired:
                continue
        return False  # (not reached: the last try's refusal is retried by the caller)


def dataset_id(name: str) -> str:
    """A Fireworks id for a file's dataset: its name without `.jsonl`, in lowercase letters,
    digits and dashes, a letter first; a long name keeps its start and a digest of it all."""
    stem = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower().removesuffix(".jsonl"))).strip("-")
    if not stem[:1].isalpha():
        stem = f"b-{stem}".rstrip("-")
    if len(stem) > MAX_ID:
        stem = f"{stem[:MAX_ID - 13].rstrip('-')}-{_digest(name)}"
    return stem


def display_name(metadata: Mapping[str, str]) -> str:
    return urlencode(list(metadata.items()))


def metadata_of(name: str) -> dict[str, str]:
    """The metadata a display name carries; a name batchrun did not write carries none."""
    try:
        return dict(parse_qsl(name, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        return {}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _batchable(model: Mapping[str, Any]) -> Any:
    """The model's word on batch inference; a model that says nothing is taken at its
    word-less best, as the service then decides (the documented model has no such field)."""
    return model.get("batchInferenceSupported", model.get("batch_inference_supported", True))


def _account(http: httpx.Client) -> str:
    """The account of the client's base URL (`base_url`'s, ending in /accounts/{id})."""
    match = re.search(r"/accounts/([^/]+)/?$", http.base_url.path)
    if match is None:
        raise ConfigError(f"the Fireworks batch API's base URL {http.base_url} does not end in /accounts/<account>")
    return match.group(1)


def _root(http: httpx.Client) -> str:
    """The API's root, above the account: models belong to other accounts too."""
    url = str(http.base_url).rstrip("/")
    return url[:url.rindex("/accounts/")]


def _file(job: str, name: str) -> str:
    return f"{job}-out/{name}"


def _read(response: httpx.Response, what: str, read: Callable[[Any], T]) -> T:
    """What an answer holds; one that does not hold it (any bytes a server may send) is
    worth asking again, never a crash (as openai.py's)."""
    try:
        return read(response.json())
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise RetryableAPIError(f"{what}: the batch API's answer (HTTP {response.status_code}) is not what it "
                                f"should be ({type(exc).__name__}: {exc})", status=response.status_code) from None


def _unsigned(http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Request:
    """A request to a signed URL, through the client's transport but without its key: the
    signature is the credential, and the store refuses a second one."""
    request = http.build_request(method, url, **kwargs)
    request.headers.pop("Authorization", None)
    return request


class _Expired(Exception):
    """A signed URL refused: another is asked for."""


def _signed(response: httpx.Response, what: str) -> httpx.Response:
    """A signed URL's refusal (400/403: expired, most likely) is worth a fresh URL at once."""
    if response.status_code in (400, 403):
        raise _Expired
    return _stored(response, what)


def _stored(response: httpx.Response, what: str) -> httpx.Response:
    """The object store's answer to a signed URL: a refused signature (expired, most
    likely) is worth another try with a fresh URL, not the key's fault nor the spec's."""
    if response.status_code in (400, 403):
        raise RetryableAPIError(f"{what}: the store refused the signed URL (HTTP {response.status_code}: "
                                f"{response.text[:200]}); a fresh one is asked for on the next try",
                                status=response.status_code)
    return checked(response, what)


def _page(data: Mapping[str, Any]) -> tuple[list[Batch], str]:
    return [_batch(job) for job in data.get("batchInferenceJobs") or []], str(data.get("nextPageToken") or "")


_COUNTS = (("total", "totalInputRequests"), ("completed", "successfullyProcessedRequests"),
           ("failed", "failedRequests"))


def _batch(data: Mapping[str, Any]) -> Batch:
    """A job as a `Batch`. Its files, once it is done, unless its progress says it wrote
    no line there (a failed job, most often)."""
    state = str(data["state"]).removeprefix("JOB_STATE_").lower()
    progress = data.get("jobProgress") or {}
    counts = {ours: int(progress[theirs]) for ours, theirs in _COUNTS if progress.get(theirs) is not None}
    output = str(data.get("outputDatasetId") or "").rsplit("/", 1)[-1]
    done = state in DONE
    status = data.get("status") or {}
    why = ": ".join(str(part) for part in (status.get("code"), status.get("message")) if part) or "the job failed"
    return Batch(id=str(data["name"]).rsplit("/", 1)[-1], state=state, done=done, counts=counts,
                 output_file=f"{output}/{RESULTS_FILE}" if done and output and counts.get("completed", 1) else None,
                 error_file=f"{output}/{ERRORS_FILE}" if done and output and counts.get("failed", 1) else None,
                 metadata=metadata_of(str(data.get("displayName") or "")),
                 errors=(why,) if state == "failed" else ())
