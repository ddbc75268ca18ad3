"""What a row must be for a request to carry it and the store to keep it (inputs/checks.py)."""

from __future__ import annotations

import pytest

from batchrun import InputError
from batchrun._json import loads_line
from batchrun.inputs.checks import MAX_DEPTH, check_body, check_messages, check_record, depth


def fail(message: str) -> InputError:
    return InputError(f"in.jsonl: line 3: {message}")


def message_of(check, value) -> str:
    with pytest.raises(InputError) as info:
        check(value, fail)
    return str(info.value)


def test_depth_counts_levels_of_lists_and_objects_without_recursion() -> None:
    assert depth("text") == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(50_000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert depth(deep) == 50_001


def test_a_record_nested_past_the_limit_is_refused_and_one_at_it_passes() -> None:
    at_limit: dict = {"v": 1}
    for _ in range(MAX_DEPTH - 1):
        at_limit = {"v": at_limit}
    check_record(at_limit, fail)
    assert message_of(check_record, {"v": at_limit}) == (
        f"in.jsonl: line 3: nested more than {MAX_DEPTH} levels deep; no request needs that")


@pytest.mark.parametrize(("record", "named"), [
    ({"prompt": "half \ud800"}, "prompt holds a lone surrogate"),
    ({"note": ["fine", {"deep": "\udc00"}]}, "note[1].deep holds a lone surrogate"),
    ({"\ud83d": "a key"}, "a key holds a lone surrogate"),
])
def test_a_lone_surrogate_is_named_by_its_path(record: dict, named: str) -> None:
    said = message_of(check_record, record)
    assert said.startswith(f"in.jsonl: line 3: {named}") and "fix the text" in said


def test_a_surrogate_pair_and_ordinary_text_pass() -> None:
    check_record({"prompt": "smile \U0001F600", "note": ["é", {"k": "ü"}]}, fail)
    check_body({"prompt": "smile \U0001F600", "max_tokens": 3, "temperature": 0.5, "stop": None}, fail)


@pytest.mark.parametrize(("body", "said"), [
    ({"temperature": float("nan")}, "temperature: nan is not a number JSON can carry; use null or a number"),
    ({"logit_bias": {"7": float("inf")}}, "logit_bias.7: inf is not a number JSON can carry"),
    ({"prompt": b"bytes"}, "prompt: a bytes value cannot be sent as JSON; store it as a string"),
    ({"messages": [{"role": "user", "content": "x\udfff"}]}, "messages[0].content holds a lone surrogate"),
])
def test_a_body_no_request_can_carry_names_the_field(body: dict, said: str) -> None:
    assert said in message_of(check_body, body)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
])
def test_usual_messages_pass(messages: list) -> None:
    check_messages(messages, fail)


@pytest.mark.parametrize(("messages", "said"), [
    ([], "messages must be a non-empty list of {role, content} objects"),
    ("hi", "messages must be a non-empty list of {role, content} objects"),
    (["hi"], "messages[0] must be an object with role and content, got str"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1] has no role"),
    ([{"role": "user"}], "messages[0] has no content"),
    ([{"role": "user", "content": ["text"]}], "messages[0].content must be text or a list of part objects"),
    ([{"role": "user", "content": 7}], "messages[0].content must be text or a list of part objects, got int"),
])
def test_messages_of_another_shape_say_what_is_wrong(messages: object, said: str) -> None:
    assert message_of(check_messages, messages).startswith(f"in.jsonl: line 3: {said}")


@pytest.mark.parametrize(("line", "strict"), [
    (rb'{"p": "\ud800"}', False),  # a high surrogate alone
    (rb'{"p": "\udc00"}', False),  # a low one alone
    (rb'{"p": "\udc00\ud800"}', False),  # a pair the wrong way round
    (rb'{"p": "\ud800\u0041"}', False),
    (b'{"p": "\xed\xa0\x80"}', False),  # a surrogate as bytes (no UTF-8)
    (rb'{"p": "\ud83d\ude00"}', True),  # a pair: one character
    (rb'{"p": "\uD83D\uDE00"}', True),
    (rb'{"t": NaN}', False),
    (rb'{"t": -Infinity}', False),
    (rb'{"t": 1e999}', False),  # read as inf
    (rb'{"p": "plain \u00e9", "n": 12345678901234567890123}', True),
])
def test_only_lines_msgspec_refused_may_hold_what_no_request_carries(line: bytes, strict: bool) -> None:
    """The validating pass looks closer only at lines `loads_line` says json read."""
    record, read_strictly = loads_line(line)
    assert read_strictly == strict
    found: list[str] = []
    try:
        check_body(record, lambda m: InputError(m))
    except InputError as exc:
        found.append(str(exc))
    assert bool(found) == (not strict)  # every line it refused holds something no request can carry
