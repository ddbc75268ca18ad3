"""The `Provider` seam: one provider's batch API, as the batch backend uses it.

A provider says how a row's request is written in its input file and how a line of its
output or error file is read. The files' splitting, the `custom_id` (the job's
fingerprint and the row) and the joining of lines to rows are the same for every
provider (`lines.py`).

To add a provider: a module beside `openai.py` with a `Provider` subclass, and one line
in `PROVIDERS` (backends/batch/__init__.py); its spec-level needs (an account, the
endpoints it batches, its limit on requests) join the `batch_api` checks in
spec/parse.py.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import httpx

from ..._exceptions import ConfigError, JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from ...endpoints.base import Endpoint
from ...endpoints.result import Result
from ...policy.retry import error_message
from ...spec.model import BatchApiSpec

__all__ = ["Batch", "BatchAPI", "Outcome", "Provider", "checked", "stream_into"]


class Outcome:
    """One line's word on its row: `result` when the batch answered it (ok, or failed for
    good as a live 4xx would be), else `unanswered` says why it is still to be answered."""

    __slots__ = ("result", "row_index", "unanswered")

    def __init__(self, row_index: int, result: Result | None = None, unanswered: str | None = None) -> None:
        self.row_index, self.result, self.unanswered = row_index, result, unanswered


@dataclass(frozen=True)
class Batch:
    """A batch as the provider reports it. `done`: it will change no more (completed,
    expired, failed, cancelled); its output and error files then hold what it answered."""

    id: str
    state: str
    done: bool
    counts: Mapping[str, int] = field(default_factory=dict)
    output_file: str | None = None
    error_file: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # why the batch as a whole failed, in the provider's words


def checked(response: httpx.Response, what: str) -> httpx.Response:
    """The response of a call to the batch API, or the error it stands for: a refused key
    stops the job (exit 3), a server error or a 429 is worth another try, any other
    refusal is the spec's or the account's to fix (exit 2)."""
    if response.is_success:
        return response
    words = error_message(response.content, limit=500)
    if response.status_code in (401, 403):
        raise JobFatalAPIError(f"{what}: the batch API refused the key (HTTP {response.status_code}: {words}); "
                               "check batch_api.api_key_env", status=response.status_code)
    if response.status_code in (408, 409, 429) or response.status_code >= 500:
        raise RetryableAPIError(f"{what}: HTTP {response.status_code}: {words}", status=response.status_code)
    raise ConfigError(f"{what}: the batch API refused it (HTTP {response.status_code}: {words})")


class Provider(ABC):
    name: str
    max_rows: int | None  # requests in one batch; None: no limit of its own
    max_bytes: int  # bytes in one input file
    one_model = False  # a batch runs one model, the job's (its lines name none)

    def base_url(self, spec: BatchApiSpec) -> str:
        """Where the batch API's calls go (a client's base URL)."""
        return spec.base_url.rstrip("/")

    @abstractmethod
    def line(self, custom_id: str, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """A row's request (its body as the live path sends it) as a line of the input file."""

    @abstractmethod
    def outcome(self, index: int, data: Mapping[str, Any], endpoint: Endpoint, *, from_errors: bool) -> Outcome:
        """What a line of the output (or error) file, naming row `index`, says of it."""

    # Shared by the providers: a response, read as the live path reads it

    @staticmethod
    def answered(index: int, status: Any, body: Any, endpoint: Endpoint) -> Outcome:
        """An HTTP answer in a batch: 200 is the row's answer, a 4xx refuses it for good,
        anything else leaves it to be answered again."""
        if status == 200:
            return Outcome(index, result=_answer(endpoint, body, index))
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):
            text = error_message(json.dumps(body).encode()) if body is not None else f"HTTP {status}"
            return Outcome(index, result=Result(index, "", "failed",
                                                error=f"the batch refused it: HTTP {status}: {text}"))
        return Outcome(index, unanswered=f"HTTP {status} in the batch")

    @staticmethod
    def why(error: Any) -> str:
        """Why a line holds no answer, in the provider's words."""
        if isinstance(error, Mapping):
            code, message = error.get("code"), error.get("message")
            return ": ".join(str(part) for part in (code, message) if part) or "no answer"
        return "no answer"


class BatchAPI(Protocol):
    """A provider's remote calls, over a client whose base URL is `Provider.base_url`'s and
    whose key is the batch API's."""

    def check(self, http: httpx.Client, model: str | None) -> None:
        """Before anything is uploaded: ConfigError when the account or the model cannot
        take a batch (Fireworks: a wrong account, `batch_inference_supported` false)."""

    def upload(self, http: httpx.Client, name: str, data: bytes) -> str:
        """Upload an input file named `name`; its id."""

    def create(self, http: httpx.Client, file: str, url: str, metadata: Mapping[str, str],
               model: str | None) -> Batch:
        """Start a batch of the uploaded file's requests, to `url` (an endpoint's batch URL),
        tagged with `metadata` (the job's fingerprint and the batch's key); `model`: the
        job's, for a provider whose batch has one model (Fireworks)."""

    def get(self, http: httpx.Client, batch: str) -> Batch: ...

    def cancel(self, http: httpx.Client, batch: str) -> Batch:
        """Ask the provider to stop a batch; what it answered stays in its files."""

    def tagged(self, http: httpx.Client, key: str, value: str) -> list[Batch]:
        """Every batch whose metadata holds `key: value`, newest first: what a rerun finds of
        the batches an earlier run created, whatever it managed to record."""

    def download(self, http: httpx.Client, file: str, into: BinaryIO) -> bool:
        """Write the file's bytes into `into` as they arrive (a batch's answers may be
        larger than memory); a file the provider does not have writes nothing (False)."""


def stream_into(http: httpx.Client, request: httpx.Request, into: BinaryIO, what: str,
                check: Callable[[httpx.Response, str], httpx.Response] = checked) -> bool:
    """Send `request` and write its answer's body into `into` as it arrives; an answer
    that is not a success raises what `check` makes of it, or (one it lets pass) writes
    nothing: False."""
    response = http.send(request, stream=True)
    try:
        if not response.is_success:
            response.read()
            check(response, what)
            return False
        for chunk in response.iter_bytes():
            into.write(chunk)
        return True
    finally:
        response.close()


def _answer(endpoint: Endpoint, body: Any, index: int) -> Result:
    """The answer as the live path reads it; one it cannot read fails the row."""
    try:
        result = endpoint.parse(body)
        if endpoint.grouped:  # one input a line: the answer's one part (an embedding's vector)
            [result] = endpoint.split(result, [1])
    except (RowFatalAPIError, RetryableAPIError) as exc:
        return Result(index, "", "failed", error=f"the batch's answer: {exc}")
    result.row_index = index
    return result
