"""JSON on the hot path: msgspec's decoder, the standard library where they differ; the
standard library's own C encoder, called without the layers `json.dumps` puts around it.

An embeddings answer is 350 KB of base64 strings (64 vectors of 1,024 floats): json's
scanner reads it in 0.55 ms, msgspec in 0.10 (a tenth off the embeddings benchmark's
time); a chat answer takes 2.2 µs against 0.8. Where msgspec refuses what json reads
(NaN, a lone surrogate, a BOM) or the text is no JSON, json decides, so the values and
errors are json's own: `loads` is `json.loads` (tests/test_json.py holds them to it), but
for a few levels of nesting near Python's recursion limit, where msgspec reads on (json's
own depth there depends on the caller's stack).
`json.loads(bytes)` guesses the encoding, then goes through three Python frames before
its C scanner; `json.dumps` with any option makes a new encoder each call: here the
scanner and one encoder are made once. `dumps` is
`json.dumps(value, ensure_ascii=False, allow_nan=False)`.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from typing import Any

import msgspec

__all__ = ["dumps", "loads", "loads_line", "loads_utf8"]

_scan = json.scanner.make_scanner(json.decoder.JSONDecoder())
_space = json.decoder.WHITESPACE.match
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


_fast = msgspec.json.Decoder().decode
_Refused = (msgspec.DecodeError, UnicodeEncodeError)  # (a str holding a lone surrogate)


def loads(text: str) -> Any:
    """`json.loads(text)`: the same value, or the same JSONDecodeError."""
    try:
        return _fast(text)
    except _Refused:  # not JSON, or JSON msgspec will not read (NaN, a lone surrogate): `json` decides
        pass
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # leading white space, a BOM, or not JSON: json says which
        return json.loads(text)
    if end != len(text) and _space(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, _space(text, end).end())
    return value


def loads_utf8(data: bytes) -> Any:
    """`json.loads(data)` for bytes, without its guess at the encoding (a fifth of its
    time on a short text): data that opens an object, `{` then no zero byte, is UTF-8
    to it, decoded just so (`surrogatepass`); any other goes to it as it is."""
    try:
        return _fast(data)
    except _Refused:
        return _json_utf8(data)


def loads_line(data: bytes) -> tuple[Any, bool]:
    """`loads_utf8(data)`, and whether msgspec read it. What msgspec reads holds no NaN or
    Infinity, no number past a float's range and no lone surrogate, escaped or as bytes
    (it refuses them all, and json reads them): only text it refused needs looking at."""
    try:
        return _fast(data), True
    except _Refused:
        return _json_utf8(data), False


def _json_utf8(data: bytes) -> Any:
    if data[:1] == b"{" and data[1:2] != b"\x00":
        return loads(data.decode("utf-8", "surrogatepass"))
    return json.loads(data)


def dumps(value: Any) -> str:
    """`json.dumps(value, ensure_ascii=False, allow_nan=False)`."""
    return _encode(value)
