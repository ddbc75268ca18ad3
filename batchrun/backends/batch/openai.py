"""OpenAI's Files + Batches API (also the LiteLLM proxy's, Together's and Groq's; vLLM's server has none).

    input   {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    output  {"custom_id", "response": {"status_code": 200, "body": {answer}}, "error": null}
    errors  {"custom_id", "response": {"status_code": 400, "body": {"error": {...}}}, "error": null}
            {"custom_id", "response": null, "error": {"code": "batch_expired", "message"}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar

import httpx

from ..._exceptions import RetryableAPIError
from ...endpoints.base import Endpoint
from .base import Batch, Outcome, Provider, checked, stream_into

__all__ = ["OpenAIBatches"]

DONE = frozenset({"completed", "expired", "failed", "cancelled"})
PAGE = 100  # batches a page, listing


class OpenAIBatches(Provider):
    name = "openai"
    max_rows = 50_000
    max_bytes = 200_000_000

    def line(self, custom_id: str, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": endpoint.urls[0], "body": body}

    def outcome(self, index: int, data: Mapping[str, Any], endpoint: Endpoint, *, from_errors: bool) -> Outcome:
        response = data.get("response")
        if not isinstance(response, Mapping):  # no HTTP answer: expired, cancelled, never run
            return Outcome(index, unanswered=self.why(data.get("error")))
        return self.answered(index, response.get("status_code"), response.get("body"), endpoint)

    def upload(self, http: httpx.Client, name: str, data: bytes) -> str:
        what = f"uploading {name}"
        response = checked(http.post("/files", data={"purpose": "batch"},
                                     files={"file": (name, data, "application/jsonl")}), what)
        return _read(response, what, lambda data: str(data["id"]))

    def check(self, http: httpx.Client, model: str | None) -> None:
        """Any model the server serves live, it batches (or refuses its lines one by one)."""

    def create(self, http: httpx.Client, file: str, url: str, metadata: Mapping[str, str],
               model: str | None = None) -> Batch:
        what = f"creating a batch of {file}"
        body = {"input_file_id": file, "endpoint": url, "completion_window": "24h", "metadata": dict(metadata)}
        return _read(checked(http.post("/batches", json=body), what), what, _batch)

    def get(self, http: httpx.Client, batch: str) -> Batch:
        what = f"reading batch {batch}"
        return _read(checked(http.get(f"/batches/{batch}"), what), what, _batch)

    def cancel(self, http: httpx.Client, batch: str) -> Batch:
        """A batch that ended is refused a cancel with 409 ("Cannot cancel a batch with
        status 'completed'"): then it is as the provider reads it."""
        what = f"cancelling batch {batch}"
        response = http.post(f"/batches/{batch}/cancel")
        if response.status_code == 409:
            return self.get(http, batch)
        return _read(checked(response, what), what, _batch)

    def tagged(self, http: httpx.Client, key: str, value: str) -> list[Batch]:
        """A list that does not move on (the same page again) ends: it holds nothing more."""
        found: list[Batch] = []
        after = None
        seen: set[str] = set()
        while True:
            params = {"limit": PAGE, **({"after": after} if after else {})}
            page = checked(http.get("/batches", params=params), "listing the batches")
            batches, more = _read(page, "listing the batches", _page)
            found += [b for b in batches if b.metadata.get(key) == value and b.id not in seen]
            seen.update(b.id for b in batches)
            if not more or not batches or batches[-1].id == after:
                return found
            after = batches[-1].id

    def download(self, http: httpx.Client, file: str, into: BinaryIO) -> bool:
        """A file the provider no longer has (a 404: deleted by hand or by its retention)
        holds nothing: its batch's rows have no answer from it."""
        return stream_into(http, http.build_request("GET", f"/files/{file}/content"), into, f"downloading {file}",
                           check=_present)


T = TypeVar("T")


def _present(response: httpx.Response, what: str) -> httpx.Response:
    """A download's refusal as `checked` reads it, but for a 404: the file is gone."""
    return response if response.status_code == 404 else checked(response, what)


def _read(response: httpx.Response, what: str, read: Callable[[Any], T]) -> T:
    """What an answer holds; one that does not hold it (any bytes a server may send) is
    worth asking again, never a crash."""
    try:
        return read(response.json())
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise RetryableAPIError(f"{what}: the batch API's answer (HTTP {response.status_code}) is not what it "
                                f"should be ({type(exc).__name__}: {exc})", status=response.status_code) from None


def _page(data: Mapping[str, Any]) -> tuple[list[Batch], bool]:
    return [_batch(b) for b in data["data"]], bool(data.get("has_more"))


def _batch(data: Mapping[str, Any]) -> Batch:
    errors = (data.get("errors") or {}).get("data") or []
    return Batch(id=str(data["id"]), state=str(data["status"]), done=data["status"] in DONE,
                 counts=dict(data.get("request_counts") or {}), output_file=data.get("output_file_id"),
                 error_file=data.get("error_file_id"), metadata=dict(data.get("metadata") or {}),
                 errors=tuple(f"line {e.get('line')}: {e.get('message')}" if e.get("line") else str(e.get("message"))
                              for e in errors))
