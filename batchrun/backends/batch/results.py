"""A batch's output and error files, read line by line into each row's outcome.

    openai     output: {"custom_id", "response": {"status_code": 200, "body": {answer}}, "error": null}
               errors: {"custom_id", "response": {"status_code": 400, "body": {"error": {...}}}}
                       {"custom_id", "response": null, "error": {"code": "batch_expired", "message"}}
    fireworks  {"custom_id", "response": {answer}}  (no status: a line in the results file
               is an answer; one in the error file says what went wrong)

Lines come in any order and are joined to rows by `custom_id`. Each becomes an
`Outcome`: an answered row (a `Result`, ok or failed as the live path would store it),
or a row the batch did not answer (expired, cancelled, a server error) that is still to
be answered, live or by another batch. A line that is not this job's, or not readable,
is skipped and counted: a row without its line stays to be answered, never lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..._exceptions import RetryableAPIError, RowFatalAPIError
from ...endpoints.base import Endpoint
from ...endpoints.result import Result
from ...policy.retry import error_message
from .lines import FIREWORKS, row_of

__all__ = ["Outcome", "read_line"]


@dataclass
class Outcome:
    """One line's word on its row: `result` when the batch answered it (ok, or failed for
    good as a live 4xx would be), else `unanswered` says why it is still to be answered."""

    row_index: int
    result: Result | None = None
    unanswered: str | None = None


def read_line(kind: str, line: bytes, job: str, endpoint_of: Callable[[int], Endpoint], *,
              from_errors: bool = False) -> Outcome | None:
    """The outcome a line of a batch's output or error file (`from_errors`) gives its row;
    None for a line that names no row of this job."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or (index := row_of(data.get("custom_id"), job)) is None:
        return None
    response, error = data.get("response"), data.get("error")
    if kind == FIREWORKS:  # its error file says what went wrong, in no settled shape: ask again
        if from_errors:
            return Outcome(index, unanswered=_why(error if error is not None else response))
        response = {"status_code": 200, "body": response} if response is not None else None
    if not isinstance(response, dict):  # no HTTP answer: expired, cancelled, never run
        return Outcome(index, unanswered=_why(error))
    status, body = response.get("status_code"), response.get("body")
    if status == 200:
        return Outcome(index, result=_answer(endpoint_of(index), body, index))
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):
        text = error_message(json.dumps(body).encode()) if body is not None else f"HTTP {status}"
        return Outcome(index, result=Result(index, "", "failed", error=f"the batch refused it: HTTP {status}: {text}"))
    return Outcome(index, unanswered=f"HTTP {status} in the batch")


def _answer(endpoint: Endpoint, body: Any, index: int) -> Result:
    """The answer as the live path reads it; one it cannot read fails the row."""
    try:
        result = endpoint.parse(body)
    except (RowFatalAPIError, RetryableAPIError) as exc:
        return Result(index, "", "failed", error=f"the batch's answer: {exc}")
    result.row_index = index
    return result


def _why(error: Any) -> str:
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return ": ".join(str(part) for part in (code, message) if part) or "no answer"
    return "no answer"
