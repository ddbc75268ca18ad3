"""OpenAI's Files + Batches API (also vLLM's, LiteLLM's, Together's and Groq's).

    input   {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    output  {"custom_id", "response": {"status_code": 200, "body": {answer}}, "error": null}
    errors  {"custom_id", "response": {"status_code": 400, "body": {"error": {...}}}, "error": null}
            {"custom_id", "response": null, "error": {"code": "batch_expired", "message"}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...endpoints.base import Endpoint
from .base import Outcome, Provider

__all__ = ["OpenAIBatches"]


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
