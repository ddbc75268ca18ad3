"""What a row must be for a request to carry it and the store to keep it.

Python parses more than a request can hold: lone surrogates (`"\\ud800"` is valid
JSON, yet no UTF-8 text), NaN and Infinity, nesting deep enough to break the
encoder later, and from Parquet or CSV any Arrow type (bytes, dates). These checks
run once, while the input is validated, so that such a row stops the job before
any request, named by its file and line. The costly ones run only on JSON lines
that msgspec refused (see `_json.loads_line`) or that hold brackets enough to nest
past MAX_DEPTH.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .._exceptions import InputError

__all__ = ["MAX_DEPTH", "check_body", "check_messages", "check_record", "depth"]

MAX_DEPTH = 100  # levels of nesting in a line; far past any real request, far below Python's limit


def check_record(record: dict[str, Any], fail: Callable[[str], InputError]) -> None:
    """Every value of a row must be storable text: no lone surrogates, no absurd nesting."""
    if depth(record) > MAX_DEPTH:
        raise fail(f"nested more than {MAX_DEPTH} levels deep; no request needs that")
    found = _find(record, lambda v: isinstance(v, str) and not _is_unicode(v))
    if found is not None:
        raise fail(f"{found[0] or 'a key'} holds a lone surrogate (an unpaired \\ud800-\\udfff, escaped or as "
                   "bytes), which is not text and cannot be sent or stored; fix the text")


def check_body(body: dict[str, Any], fail: Callable[[str], InputError]) -> None:
    """The request as it will be sent: UTF-8 JSON, with no NaN or Infinity, no binary values
    and no lone surrogates (the client encodes it just so)."""
    try:
        json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        check_record(body, fail)  # names the field
        raise fail("holds a lone surrogate, which cannot be sent as UTF-8") from None
    except ValueError:
        path, value = _find(body, lambda v: isinstance(v, float) and not math.isfinite(v)) or ("", None)
        raise fail(f"{path}: {value!r} is not a number JSON can carry; use null or a number") from None
    except TypeError:
        path, value = _find(body, lambda v: not isinstance(v, (str, int, float, bool, list, dict, type(None)))) \
            or ("", None)
        raise fail(f"{path}: a {type(value).__name__} value cannot be sent as JSON; store it as a string") from None


def check_messages(messages: Any, fail: Callable[[str], InputError]) -> None:
    if type(messages) is list and messages and all(
        type(m) is dict and type(m.get("role")) is str and type(m.get("content")) is str and m["role"]
        for m in messages
    ):
        return  # the usual shape, seen at a glance; anything else is looked at closely
    if not isinstance(messages, list) or not messages:
        raise fail("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(f"messages[{i}] must be an object with role and content, got {type(message).__name__}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise fail(f"messages[{i}] has no role (a string such as user, system or assistant)")
        content = message.get("content")
        if content is None:
            if not (message.get("tool_calls") or message.get("function_call")):
                raise fail(f"messages[{i}] has no content")
        elif isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                raise fail(f"messages[{i}].content must be text or a list of part objects")
        elif not isinstance(content, str):
            raise fail(f"messages[{i}].content must be text or a list of part objects, got {type(content).__name__}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def depth(value: Any) -> int:
    """How deeply `value` nests, without recursion (a record may nest beyond the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _find(value: Any, bad: Callable[[Any], bool], path: str = "") -> tuple[str, Any] | None:
    """(path, value) of the first value or key that is `bad` (`messages[0].content`), else None."""
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict) and bad(key):
                return path, key
            found = _find(item, bad, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return (path, value) if bad(value) else None
