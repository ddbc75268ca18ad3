"""What an endpoint is to batchrun: the seam every endpoint kind fills in.

A kind is a subclass of `Endpoint`, one module each, with one instance in the
registry (`endpoints.ENDPOINTS`). It says, as attributes:

    name             the spec's `endpoint:` value, also the row's `Row.endpoint`
    path             the URL path after the base URL; a batch line's `url` may give it
                     with or without /v1 (`urls`)
    field            the request field a row asks in: "messages", "prompt" or "input"
    implied          True: a row with `field` goes here when the spec names no endpoint
                     (messages -> chat, prompt -> completions); False where several
                     kinds share the field (input: the spec must say which)
    template_fields  the fields a `template:` may give for it
    request_fields   the fields a flat row carries for the request (the rest pass through)
    grouped          True: several rows go in one request (`build_group_body`)
    generates        True: the answer is generated tokens, so a budget needs max_tokens
    answers_with_message  True: its answer is a message a fine-tuning set can hold
    output_columns   the optional output columns (`storage.columns`) every row of it has

and, as methods, how it takes a row (`take`, `check`), where a schema goes in the
request (`ask_for_schema`), its request body (`build_body`), its answer whole
(`parse`) and streamed (`stream`), and the OpenAI Batch API body an exported answer
is rebuilt as (`export_body`). A `grouped` kind also builds one request for several
rows (`build_group_body`) and splits its answer into one Result per row (`split`).

`name`, `path`, `field`, `parse` and `export_body` have no default; `stream` may
raise NotImplementedError for a kind that is never streamed. The other defaults are
a chat-like endpoint's.

To add one: a module with the subclass, and its line in `ENDPOINTS`. Nothing
outside `endpoints/` asks which endpoint it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .result import Result

__all__ = ["INPUT_REQUEST_FIELDS", "REQUEST_FIELDS", "Endpoint", "StreamReader"]

# Fields a flat row may carry for the request itself; any other column passes through.
REQUEST_FIELDS = frozenset(
    """prompt messages model max_tokens max_completion_tokens temperature top_p top_k min_p
    n stop seed presence_penalty frequency_penalty repetition_penalty logit_bias logprobs
    top_logprobs echo suffix best_of response_format tools tool_choice parallel_tool_calls
    stream stream_options user reasoning_effort context_length_exceeded_behavior
    prompt_cache_key prediction modalities""".split()
)
# ... and those of the endpoints that take `input` (responses, embeddings), only there:
# a chat job's `input` column passes through as it always did.
INPUT_REQUEST_FIELDS = REQUEST_FIELDS | frozenset(
    """input instructions max_output_tokens text store reasoning truncation include metadata
    previous_response_id dimensions encoding_format""".split()
)


PREFIX_CHARS = 512  # of a one-message prompt: rows whose first characters agree share a replica


class StreamReader:
    """Takes a stream's events one by one (`feed`), then gives the Result (`result`)."""

    def feed(self, event: str, chunk: dict[str, Any]) -> None:
        raise NotImplementedError

    def result(self, done: bool) -> Result:
        """The answer; `done`: the stream ended with `[DONE]`. Raises RetryableAPIError
        for a stream that was cut short."""
        raise NotImplementedError


class Endpoint:
    """One endpoint kind (see the module's notes for what a kind provides)."""

    name: str
    path: str  # after the base URL
    field: str
    implied = False
    template_fields: tuple[str, ...] = ()
    request_fields: frozenset[str] = REQUEST_FIELDS
    grouped = False  # True: several rows go in one request (see `embeddings`)
    generates = True
    answers_with_message = True
    output_columns: tuple[str, ...] = ()

    @property
    def urls(self) -> tuple[str, str]:
        """The `url`s a batch line may send to it: the OpenAI Batch API's, and without /v1."""
        return f"/v1{self.path}", self.path

    # -- rows ------------------------------------------------------------------------

    def take(self, body: dict[str, Any], field: str | None) -> str | None:
        """Make a row's request fields ones this endpoint takes, in place; or say why it
        cannot. Asked only of a row whose `field` (the one it asks in; None: it gives none
        of them) is not this endpoint's own. By default such a row cannot be sent here."""
        if field is None or field == self.field:
            return None
        return f"the spec sets endpoint: {self.name}, but this row has {field}"

    def check(self, body: Mapping[str, Any]) -> str | None:
        """What makes a row's request one this endpoint cannot answer, or None."""
        return None

    # -- requests and answers ----------------------------------------------------------

    def ask_for_schema(self, params: dict[str, Any], named: Mapping[str, Any]) -> None:
        """Put the spec's `schema:` (`named`: {name, schema, strict}) into `params` as the
        structured-output format, unless params give one. Answers are validated either way."""
        params.setdefault("response_format", {"type": "json_schema", "json_schema": dict(named)})

    def build_body(self, row_body: Mapping[str, Any], model: str | None,
                   params: Mapping[str, Any]) -> dict[str, Any]:
        """Spec params, then the row's own fields on top; streams ask for usage too."""
        body: dict[str, Any] = {"model": model} if model else {}
        body.update(params)
        body.update(row_body)
        if body.get("stream"):
            # Fireworks puts usage in the last chunk anyway; OpenAI only when asked.
            body.setdefault("stream_options", {"include_usage": True})
        return body

    def shared_prefix(self, body: Mapping[str, Any], payload: bytes) -> tuple[int, int] | None:
        """The span of the request's JSON (`payload`, `body` encoded as the client sends it)
        it may share with other rows' requests (a template's system message, a few-shot
        block), for the prompt cache's affinity (`api.affinity`): its messages up to the
        last one, else the first PREFIX_CHARS of a long prompt; None when there is nothing
        worth sharing. Only the prompt: a row's own fields beside it (`user`, `seed`) change
        no prompt token, whichever side of it they are encoded. Found in the bytes already
        encoded, not encoded again."""
        name = "messages" if "messages" in body else "input"
        messages = body.get(name)
        if isinstance(messages, list) and len(messages) > 1:
            last = json.dumps(messages[-1], ensure_ascii=False, allow_nan=False, default=str).encode()
            end = payload.rfind(last)
            start = payload.find(b'"%s":' % name.encode())
            return (start, end) if 0 <= start < end else None
        text = messages[0].get("content") if isinstance(messages, list) and messages and \
            isinstance(messages[0], Mapping) else body.get("prompt", body.get("input"))
        if not isinstance(text, str) or len(text) < PREFIX_CHARS:
            return None
        start = json.dumps(text[:PREFIX_CHARS], ensure_ascii=False)[:-1].encode()  # (without its closing quote)
        found = payload.find(start)
        return (found, found + len(start)) if found >= 0 else None

    def parse(self, data: Any) -> Result:
        """A whole (non-streamed) answer as a Result, row_index and id left blank."""
        raise NotImplementedError

    def stream(self) -> StreamReader:
        raise NotImplementedError

    # -- several rows to a request (`grouped` kinds; see `engine.call`) ----------------------

    def group_key(self, body: Mapping[str, Any]) -> str:
        """Rows whose request fields other than `field` agree go in one request: what they
        share. A row with nothing but its field (most) needs no JSON made: json.dumps with
        sort_keys builds an encoder each call, 15 % of an embeddings job's event loop."""
        if len(body) == 1 and self.field in body:
            return ""
        return json.dumps({k: v for k, v in body.items() if k != self.field}, sort_keys=True)

    def build_group_body(self, inputs: Sequence[Any], row_body: Mapping[str, Any], model: str | None,
                         params: Mapping[str, Any]) -> dict[str, Any]:
        """One request for rows that differ only in their `field`: `inputs`, in row order."""
        raise NotImplementedError

    def split(self, answer: Result, weights: Sequence[int]) -> list[Result]:
        """The answer to one request for several rows, as one ok Result per row (row_index
        and id left blank), its usage shared in proportion to `weights`; raises
        RowFatalAPIError when the answer does not hold a part for each row."""
        raise NotImplementedError

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        """The response body the OpenAI Batch API's output file holds for an answer, rebuilt
        from its output row (`answer`); `request` is the body as sent (the spec's params,
        then the row's fields)."""
        raise NotImplementedError
