"""POST /embeddings: several rows' `input` in one request, a vector for each out.

Vectors are asked for as base64 (`encoding_format: base64`, unless params say
otherwise): little-endian float32 bytes that are stored and written to Parquet as they
are, never as one Python float per value. A server that answers with float lists is
read too.

One request answers a group of rows, so its parts are split here: `parse` gives a
Result whose `vectors` holds one float32 byte string per input, in input order, and
the client makes each row's Result from it (see `Client.call_group`). Usage is per
request: it is shared out among the rows in proportion to their input's length, so
that the rows add up to exactly what the API reported.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import JobFatalAPIError, RetryableAPIError, RowFatalAPIError
from .base import Endpoint, StreamReader
from .protocol import Result, set_usage, text_of

__all__ = ["Embeddings", "share"]


class Embeddings(Endpoint):
    name = "embeddings"
    path = "/embeddings"
    grouped = True

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
                               "pool its embeddings. Use an embedding model (llama.cpp: one with a pooling type)")
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        packed = array.array("f", value)
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tobytes()
    raise RetryableAPIError("the answer has an embedding that is neither base64 nor a list of numbers", status=200)


def _decode(text: str) -> bytes:
    """Strict base64: a character outside the alphabet is an error, never skipped.
    (binascii's strict mode is C; `b64decode(validate=True)` checks with a regex that
    costs more than the decoding.)"""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(text, strict_mode=True)
    return base64.b64decode(text, validate=True)


def _swapped(raw: bytes) -> bytes:
    packed = array.array("f", raw)
    packed.byteswap()
    return packed.tobytes()


def share(total: int | None, weights: Sequence[int]) -> list[int | None]:
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
