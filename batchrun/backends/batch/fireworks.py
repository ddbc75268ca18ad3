"""Fireworks' batch inference jobs, on datasets of the account's.

    input    {"custom_id", "body": {...}}           (the model is the job's, set once)
    results  {"custom_id", "response": {answer}}    (no status: a line here is an answer)
    errors   a line of the error file says what went wrong: the row is asked again
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...endpoints.base import Endpoint
from .base import Outcome, Provider

__all__ = ["FireworksBatches"]


class FireworksBatches(Provider):
    name = "fireworks"
    max_rows = None
    max_bytes = 150_000_000  # one upload request; larger files take a signed URL

    def line(self, custom_id: str, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "body": {k: v for k, v in body.items() if k != "model"}}

    def outcome(self, index: int, data: Mapping[str, Any], endpoint: Endpoint, *, from_errors: bool) -> Outcome:
        response = data.get("response")
        if from_errors or response is None:
            return Outcome(index, unanswered=self.why(data.get("error") or response))
        return self.answered(index, 200, response, endpoint)
