"""batchrun._json is json, only faster: the same value or the same error, for any text."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import _json
from tests.conftest import examples

SETTINGS = settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
# JSON texts, whole or cut, with stray bytes: what an input line or an answer can be
texts = values.map(json.dumps) | values.map(lambda v: json.dumps(v, ensure_ascii=False)) | \
    st.text(alphabet='{}[]":,. \t\n0123456789eE+-truefalsnNIaiy\\u\ufeff\ud800\udc00', max_size=30)


def outcome(call, argument):
    try:
        return "value", call(argument)
    except (ValueError, RecursionError) as exc:
        return type(exc), str(exc)


def same(a, b) -> bool:
    """Equal, NaN included (it is not equal to itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@SETTINGS
@given(texts, st.sampled_from(["", " ", "\n", "x", " {}"]), st.sampled_from(["", " ", "\ufeff", "\t"]))
def test_loads_gives_what_json_gives(text: str, tail: str, head: str) -> None:
    text = head + text + tail
    mine, theirs = outcome(_json.loads, text), outcome(json.loads, text)
    assert mine[0] == theirs[0] and (same(mine[1], theirs[1]) if mine[0] == "value" else mine[1] == theirs[1])


@SETTINGS
@given(texts, st.sampled_from(["utf-8", "utf-16", "utf-32"]), st.binary(max_size=3))
def test_loads_utf8_gives_what_json_gives(text: str, encoding: str, tail: bytes) -> None:
    data = text.encode(encoding, "surrogatepass") + tail
    mine, theirs = outcome(_json.loads_utf8, data), outcome(json.loads, data)
    assert mine[0] == theirs[0] and (same(mine[1], theirs[1]) if mine[0] == "value" else mine[1] == theirs[1])


@SETTINGS
@given(values)
def test_dumps_writes_what_json_writes(value: object) -> None:
    try:
        expected = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN and the infinities are refused, as json refuses them
        with pytest.raises(ValueError, match=str(exc)):
            _json.dumps(value)
        return
    assert _json.dumps(value) == expected


def test_a_lone_surrogate_and_a_deep_nesting_read_as_json_reads_them() -> None:
    assert _json.loads('{"a": "\\ud800"}') == {"a": "\ud800"}
    assert _json.loads_utf8(b'{"a": "\\ud800x"}') == {"a": "\ud800x"}
    with pytest.raises(RecursionError):
        _json.loads('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(json.JSONDecodeError, match="Extra data: line 1 column 4"):
        _json.loads("{} []")
