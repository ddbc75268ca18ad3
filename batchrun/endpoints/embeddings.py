"""POST /embeddings: several rows' `input` in one request, a vector for each out.

Vectors are asked for as base64 (`encoding_format: base64`, unless params say
otherwise): little-endian float32 bytes that are stored and written to Parquet as they
are, never as one Python float per value. A server that answers with float lists is
read too.

One request answers a group of rows, so its parts are split here: `parse` gives a
Result whose `vectors` holds one float32 byte string per input, in input order, and
`split` makes each row's Result from it (see `engine.call.Caller.call_group`). Usage is per
request: it is apportioned among the rows in proportion to their input's length, so
that the rows add up to exactly what the API reported.

A row's input is one string (a prompt is taken as it); the vectors go to the
`embedding` output column. Grouping rows needs the spec to name the endpoint.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from .base import INPUT_REQUEST_FIELDS, Endpoint, StreamReader
from .result import Result, set_usage, text_of

__all__ = ["Embeddings", "apportion"]


class Embeddings(Endpoint):
    name = "embeddings"
    path = "/embeddings"
    field = "input"
    template_fields = ("input",)
    request_fields = INPUT_REQUEST_FIELDS
    grouped = True
    generates = False
    answers_with_message = False
    output_columns = ("embedding",)

    def take(self, body: dict[str, Any], field: str | None) -> str | None:
        if "input" in body or field is None:
            return None
        if "messages" in body:
            return "the spec sets endpoint: embeddings, but this row has messages; give input or prompt"
        body["input"] = body.pop("prompt")
        return None

    def check(self, body: Mapping[str, Any]) -> str | None:
        if not isinstance(body.get("input"), str):
            return f"input must be a string to embed, got {type(body.get('input')).__name__}"
        return None

    def build_group_body(self, inputs: Sequence[Any], row_body: Mapping[str, Any], model: str | None,
                         params: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model} if model else {}
        body["encoding_format"] = "base64"
        body.update(params)
        body.update(row_body)
        body["input"] = list(inputs)
        return body

    def build_body(self, row_body: Mapping[str, Any], model: str | None,
                   params: Mapping[str, Any]) -> dict[str, Any]:
        return self.build_group_body([row_body.get("input")], row_body, model, params)

    def split(self, answer: Result, weights: Sequence[int]) -> list[Result]:
        vectors = answer.vectors or []
        if len(vectors) != len(weights):
            raise RowFatalAPIError(f"the answer has {len(vectors)} embeddings for {len(weights)} inputs")
        model, response_id = answer.model, answer.response_id
        return [Result(-1, "", "ok", model=model, response_id=response_id, embedding=vector, prompt_tokens=prompt,
                       completion_tokens=completion, total_tokens=total, cached_tokens=cached,
                       reasoning_tokens=reasoning)
                for vector, prompt, completion, total, cached, reasoning
                in zip(vectors, *(apportion(getattr(answer, name), weights) for name in _USAGE))]

    def shared_prefix(self, body: Mapping[str, Any], payload: bytes) -> tuple[int, int] | None:
        """Embeddings are not generated from a prompt: no prefix cache to share."""
        return None

    def parse(self, data: Any) -> Result:
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            error = data.get("error") if isinstance(data, dict) else None
            detail = text_of(error.get("message") if isinstance(error, dict) else None)
            raise RowFatalAPIError(f"HTTP 200 without embeddings: {detail or str(data)[:4000]}", status=200)
        vectors: dict[int, bytes] = {}
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise RetryableAPIError("the answer has an embedding that is not an object", status=200)
            index = item.get("index", position)
            if type(index) is not int or index in vectors:
                raise RetryableAPIError(f"the answer has an embedding with a bad or repeated index {index!r}",
                                        status=200)
            vectors[index] = _float32(item.get("embedding"))
        if sorted(vectors) != list(range(len(vectors))):
            raise RetryableAPIError("the answer's embedding indexes have gaps", status=200)
        result = Result(row_index=-1, id="", status="ok", model=text_of(data.get("model")),
                        response_id=text_of(data.get("id")))
        result.vectors = [vectors[i] for i in range(len(vectors))]
        set_usage(result, data.get("usage"))
        return result

    def stream(self) -> StreamReader:
        raise NotImplementedError("embeddings are not streamed")

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        body = {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": answer.get("embedding")}]}
        if answer["prompt_tokens"] is not None and answer["total_tokens"] is not None:
            body["usage"] = {"prompt_tokens": answer["prompt_tokens"], "total_tokens": answer["total_tokens"]}
        return body


def _float32(value: Any) -> bytes:
    if isinstance(value, str):
        try:
            raw = _decode(value)
        except (binascii.Error, ValueError):
            raise RetryableAPIError("the answer has an embedding that is not base64", status=200) from None
        if len(raw) % 4:
            raise RetryableAPIError("the answer has a base64 embedding that is not float32s", status=200)
        return raw if sys.byteorder == "little" else _swapped(raw)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        # llama.cpp's server answers so for a model without pooling: every row would
        raise JobFatalAPIError("the server answered one vector per token, not one per input: the model does not "
                               "pool its embeddings. Serve an embedding model (llama.cpp: one with a pooling "
                               "type), then rerun")
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        packed = array.array("f", value)
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tobytes()
    raise RetryableAPIError("the answer has an embedding that is neither base64 nor a list of numbers", status=200)


def _strict_b64decode(text: str) -> bytes:
    """Strict base64 in the standard library: binascii's strict mode is C, where
    `b64decode(validate=True)` checks with a regex that costs more than the decoding."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(text, strict_mode=True)
    return base64.b64decode(text, validate=True)


try:
    # SIMD base64: 1.6 µs a vector of 1,024 floats where binascii takes 16-18, and these
    # are most of an embeddings job's work in the event loop
    from pybase64 import b64decode as _simd_b64decode
except ImportError:  # a platform without its wheel
    _decode = _strict_b64decode
else:
    def _decode(text: str) -> bytes:
        """Strict base64: a character outside the alphabet is an error, never skipped."""
        return _simd_b64decode(text, validate=True)


def _swapped(raw: bytes) -> bytes:
    packed = array.array("f", raw)
    packed.byteswap()
    return packed.tobytes()


_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def apportion(total: int | None, weights: Sequence[int]) -> list[int | None]:
    """`total` split in proportion to `weights`, as whole numbers that add up to it exactly
    (largest remainders first)."""
    if total is None:
        return [None] * len(weights)
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    parts = [total * w // whole for w in weights]
    left = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in order[:left]:
        parts[i] += 1
    return parts
