"""OpenAI's Files + Batches API (also vLLM's, LiteLLM's, Together's and Groq's).

    input   {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    output  {"custom_id", "response": {"status_code": 200, "body": {answer}}, "error": null}
    errors  {"custom_id", "response": {"status_code": 400, "body": {"error": {...}}}, "error": null}
            {"custom_id", "response": null, "error": {"code": "batch_expired", "message"}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from ...endpoints.base import Endpoint
from .base import Batch, Outcome, Provider, checked

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
        response = checked(http.post("/files", data={"purpose": "batch"},
                                     files={"file": (name, data, "application/jsonl")}), f"uploading {name}")
        return str(response.json()["id"])

    def create(self, http: httpx.Client, file: str, url: str, metadata: Mapping[str, str]) -> Batch:
        body = {"input_file_id": file, "endpoint": url, "completion_window": "24h", "metadata": dict(metadata)}
        return _batch(checked(http.post("/batches", json=body), f"creating a batch of {file}").json())

    def get(self, http: httpx.Client, batch: str) -> Batch:
        return _batch(checked(http.get(f"/batches/{batch}"), f"reading batch {batch}").json())

    def tagged(self, http: httpx.Client, key: str, value: str) -> list[Batch]:
        found, after = [], None
        while True:
            params = {"limit": PAGE, **({"after": after} if after else {})}
            page = checked(http.get("/batches", params=params), "listing the batches").json()
            found += [_batch(b) for b in page.get("data", []) if (b.get("metadata") or {}).get(key) == value]
            if not page.get("has_more") or not page.get("data"):
                return found
            after = page["data"][-1]["id"]

    def download(self, http: httpx.Client, file: str) -> bytes:
        return checked(http.get(f"/files/{file}/content"), f"downloading {file}").content


def _batch(data: Mapping[str, Any]) -> Batch:
    errors = (data.get("errors") or {}).get("data") or []
    return Batch(id=str(data["id"]), state=str(data["status"]), done=data["status"] in DONE,
                 counts=dict(data.get("request_counts") or {}), output_file=data.get("output_file_id"),
                 error_file=data.get("error_file_id"), metadata=dict(data.get("metadata") or {}),
                 errors=tuple(f"line {e.get('line')}: {e.get('message')}" if e.get("line") else str(e.get("message"))
                              for e in errors))
