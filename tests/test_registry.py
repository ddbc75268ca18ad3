"""The endpoint registry and each kind's rules for rows, schemas and budgets, from values."""

from __future__ import annotations

from typing import Any

import pytest

from batchrun.endpoints import (
    DEFAULT,
    ENDPOINTS,
    endpoint_at,
    field_of,
    get_endpoint,
    implied_by,
    job_endpoint,
    taking,
)
from batchrun.endpoints.base import INPUT_REQUEST_FIELDS, REQUEST_FIELDS

NAMED = {"name": "answer", "schema": {"type": "object"}, "strict": True}


def test_the_registry_names_every_kind_once_in_the_order_messages_list_them() -> None:
    assert list(ENDPOINTS) == ["chat", "completions", "responses", "embeddings"]
    assert all(get_endpoint(name).name == name for name in ENDPOINTS)
    assert job_endpoint(None) is ENDPOINTS[DEFAULT] is ENDPOINTS["chat"]
    assert job_endpoint("embeddings") is ENDPOINTS["embeddings"]


@pytest.mark.parametrize(("url", "name"), [
    ("/v1/chat/completions", "chat"), ("/chat/completions", "chat"), ("/v1/completions", "completions"),
    ("/completions", "completions"), ("/v1/responses", "responses"), ("/embeddings", "embeddings"),
    ("/v1/images/generations", None), ("/v2/chat/completions", None), ("", None),
])
def test_a_batch_lines_url_names_its_endpoint_with_or_without_v1(url: str, name: str | None) -> None:
    found = endpoint_at(url)
    assert (found.name if found else None) == name


@pytest.mark.parametrize(("body", "field", "implied"), [
    ({"messages": [], "prompt": "p", "input": "i"}, "messages", "chat"),
    ({"prompt": "p", "input": "i"}, "prompt", "completions"),
    ({"input": "i"}, "input", None),  # responses and embeddings both take it: the spec says which
    ({"messages": None, "prompt": "p"}, "prompt", "completions"),  # a null is no value
    ({"text": "t"}, None, None),
])
def test_a_row_asks_in_its_first_field_which_may_imply_the_endpoint(body: dict[str, Any], field: str | None,
                                                                     implied: str | None) -> None:
    assert field_of(body) == field
    found = implied_by(field)
    assert (found.name if found else None) == implied


def test_the_endpoints_taking_a_field_are_listed_in_order() -> None:
    assert taking("input") == ["responses", "embeddings"]
    assert taking("messages") == ["chat"]
    assert taking("nothing") == []


def test_chat_sends_a_prompt_as_one_user_message() -> None:
    body = {"prompt": "hi", "max_tokens": 3}
    assert ENDPOINTS["chat"].take(body, "prompt") is None
    assert body == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_completions_cannot_send_messages() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert ENDPOINTS["completions"].take(body, "messages") == \
        "the spec sets endpoint: completions, but this row has messages"
    assert ENDPOINTS["completions"].take({"prompt": "p"}, "prompt") is None


@pytest.mark.parametrize(("body", "taken"), [
    ({"prompt": "p"}, {"input": "p"}),
    ({"messages": [{"role": "user", "content": "m"}]}, {"input": [{"role": "user", "content": "m"}]}),
    ({"input": "i", "prompt": "p"}, {"input": "i", "prompt": "p"}),  # its own field wins; the rest stays
])
def test_responses_takes_a_prompt_or_messages_as_its_input(body: dict[str, Any], taken: dict[str, Any]) -> None:
    assert ENDPOINTS["responses"].take(body, field_of(body)) is None
    assert body == taken


def test_embeddings_take_a_prompt_but_not_messages_and_embed_one_string() -> None:
    embeddings = ENDPOINTS["embeddings"]
    body: dict[str, Any] = {"prompt": "p"}
    assert embeddings.take(body, "prompt") is None and body == {"input": "p"}
    assert embeddings.take({"messages": []}, "messages") == \
        "the spec sets endpoint: embeddings, but this row has messages; give input or prompt"
    assert embeddings.check({"input": "text"}) is None
    assert embeddings.check({"input": ["a", "b"]}) == "input must be a string to embed, got list"
    assert ENDPOINTS["chat"].check({"messages": 5}) is None  # the reader checks fields; chat adds nothing


@pytest.mark.parametrize(("name", "params"), [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": NAMED}}),
    ("completions", {}),  # no structured-output format: answers are validated only
    ("responses", {"text": {"format": {"type": "json_schema", **NAMED}}}),
])
def test_a_schema_goes_where_the_endpoint_reads_it(name: str, params: dict[str, Any]) -> None:
    given: dict[str, Any] = {}
    ENDPOINTS[name].ask_for_schema(given, NAMED)
    assert given == params


def test_a_format_the_params_give_is_kept() -> None:
    mine = {"response_format": {"type": "json_object"}, "text": {"format": {"type": "text"}}}
    for name in ("chat", "responses"):
        params = {key: dict(value) for key, value in mine.items()}
        ENDPOINTS[name].ask_for_schema(params, NAMED)
        assert params == mine


def test_the_kinds_say_what_their_jobs_need() -> None:
    rules = {name: (e.generates, e.answers_with_message, e.grouped, e.output_columns, e.request_fields)
             for name, e in ENDPOINTS.items()}
    assert rules == {
        "chat": (True, True, False, (), REQUEST_FIELDS),
        "completions": (True, True, False, (), REQUEST_FIELDS),
        "responses": (True, True, False, (), INPUT_REQUEST_FIELDS),
        "embeddings": (False, False, True, ("embedding",), INPUT_REQUEST_FIELDS),
    }
    assert "input" not in REQUEST_FIELDS and {"input", "instructions", "dimensions"} <= INPUT_REQUEST_FIELDS


ANSWER = {"row_index": 7, "id": "r7", "status": "ok", "output_text": "hi", "reasoning_content": None,
          "tool_calls": None, "finish_reason": "length", "model": "m", "response_id": None, "prompt_tokens": 3,
          "completion_tokens": 2, "total_tokens": None, "cached_tokens": None, "reasoning_tokens": None}


def test_each_kind_rebuilds_its_own_export_body() -> None:
    chat = ENDPOINTS["chat"].export_body(ANSWER, {}, model="m", created=9)
    assert (chat["object"], chat["id"], chat["choices"][0]["message"], chat["usage"]) == (
        "chat.completion", "chatcmpl_7", {"role": "assistant", "content": "hi"},
        {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    completion = ENDPOINTS["completions"].export_body(ANSWER, {}, model="m", created=9)
    assert (completion["object"], completion["choices"][0]["text"]) == ("text_completion", "hi")
    response = ENDPOINTS["responses"].export_body(ANSWER, {}, model="m", created=9)
    assert (response["status"], response["incomplete_details"], response["usage"]["total_tokens"]) == (
        "incomplete", {"reason": "max_output_tokens"}, 5)
    vector = ENDPOINTS["embeddings"].export_body({**ANSWER, "embedding": [0.5]}, {}, model="m", created=9)
    assert vector == {"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0,
                                                                "embedding": [0.5]}]}  # no total: no usage
