"""mock://: the in-process endpoint answers chat and completions, streamed or not, with a
deterministic text and whitespace-word token counts, and says what is wrong otherwise."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from batchrun.http.mock import MOCK_BASE_URL, MOCK_SCHEME, mock_transport


def post(path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    with httpx.Client(transport=mock_transport(), base_url=MOCK_BASE_URL) as client:
        if content is not None:
            return client.post(path, content=content)
        return client.post(path, json=body)


def events(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event, `[DONE]` as the text it is."""
    assert response.headers["content-type"] == "text/event-stream"
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    assert all(block.startswith("data: ") for block in blocks[:-1])
    data = [block.removeprefix("data: ") for block in blocks[:-1]]
    return [json.loads(d) if d != "[DONE]" else d for d in data]


def test_the_scheme_and_the_base_url_it_stands_for() -> None:
    assert MOCK_SCHEME == "mock://"
    assert httpx.URL(MOCK_BASE_URL).host.endswith(".invalid")  # never resolved, were it ever tried


# chat


def test_chat_answers_with_the_last_message_and_counts_words() -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    response = post("/chat/completions", {"model": "m-1", "messages": messages})
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == "m-1"
    assert data["choices"] == [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "(mock answer) You asked: Hello there"}}]
    # prompt: the words of each message as JSON; completion: the answer's words
    prompt_words = len(json.dumps(messages[0]).split())
    assert prompt_words == 5
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_chat_counts_every_message_and_answers_the_last() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two  three\nfour"}]
    data = post("/chat/completions", {"messages": messages}).json()
    assert data["choices"][0]["message"]["content"] == "(mock answer) You asked: one two three four"
    assert data["usage"]["prompt_tokens"] == sum(len(json.dumps(m).split()) for m in messages)
    assert data["usage"]["completion_tokens"] == 8


def test_chat_answers_content_parts_as_their_json() -> None:
    parts = [{"type": "text", "text": "hi"}]
    data = post("/chat/completions", {"messages": [{"role": "user", "content": parts}]}).json()
    assert data["choices"][0]["message"]["content"] == f"(mock answer) You asked: {json.dumps(parts)}"


def test_the_model_defaults_to_mock_model() -> None:
    assert post("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}).json()["model"] == "mock-model"


def test_the_same_request_gets_the_same_answer_and_id() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "same"}]}
    one, two = post("/chat/completions", body).json(), post("/chat/completions", body).json()
    other = post("/chat/completions", {**body, "messages": [{"role": "user", "content": "other"}]}).json()
    assert one["id"] == two["id"] and one["id"].startswith("mock-") and len(one["id"]) == len("mock-") + 16
    assert one["choices"] == two["choices"] and one["usage"] == two["usage"]
    assert other["id"] != one["id"]


def test_max_tokens_cuts_the_answer_to_that_many_words() -> None:
    body = {"messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 3}
    data = post("/chat/completions", body).json()
    assert data["choices"][0]["message"]["content"] == "(mock answer) You"
    assert data["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("max_tokens", [0, -1, "5", 2.0, None])
def test_max_tokens_that_is_not_a_positive_int_cuts_nothing(max_tokens: Any) -> None:
    body = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": max_tokens}
    assert post("/chat/completions", body).json()["usage"]["completion_tokens"] == 6


def test_a_trailing_slash_on_the_path_is_the_same_endpoint() -> None:
    assert post("/chat/completions/", {"messages": [{"role": "user", "content": "x"}]}).status_code == 200


# completions


def test_completions_answer_the_prompt_and_count_its_words() -> None:
    data = post("/completions", {"model": "base", "prompt": "Once upon  a\ttime"}).json()
    assert data["object"] == "text_completion" and data["model"] == "base"
    assert data["choices"] == [{"index": 0, "finish_reason": "stop",
                                "text": "(mock answer) You asked: Once upon a time"}]
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}


def test_an_empty_prompt_is_answered_with_no_prompt_tokens() -> None:
    data = post("/completions", {"prompt": ""}).json()
    assert data["choices"][0]["text"] == "(mock answer) You asked:"
    assert data["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}


# streams


def test_a_streamed_chat_sends_one_chunk_a_word_and_usage_with_the_last() -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi you"}]}
    response = post("/chat/completions", body)
    assert response.status_code == 200
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert len(chunks) == 6
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "(mock answer) You asked: hi you"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["stop"]
    assert [c["usage"] for c in chunks[:-1]] == [None] * 5
    assert chunks[-1]["usage"] == post("/chat/completions", {**body, "stream": False}).json()["usage"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["model"] for c in chunks} == {"m"}


def test_a_streamed_completion_sends_text_pieces() -> None:
    *chunks, done = events(post("/completions", {"prompt": "x", "stream": True, "max_tokens": 2}))
    assert done == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks] == ["(mock", " answer)"]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_the_transport_answers_an_async_client() -> None:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=mock_transport(), base_url=MOCK_BASE_URL) as client:
            return await client.post("/chat/completions", json={"messages": [{"role": "user", "content": "hey"}]})

    response = anyio.run(main)
    assert response.json()["choices"][0]["message"]["content"] == "(mock answer) You asked: hey"


# errors


def error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["error"]["type"] == "invalid_request_error"
    return response.status_code, body["error"]["message"]


def test_an_unknown_path_is_404_naming_it() -> None:
    assert error(post("/embeddings", {"input": "x"})) == (404, "no such endpoint: /v1/embeddings")
    assert error(post("/responses", {"input": "x"})) == (404, "no such endpoint: /v1/responses")


def test_a_body_that_is_not_json_is_400() -> None:
    assert error(post("/chat/completions", content=b"{not json")) == (400, "the request body is not JSON")
    assert error(post("/chat/completions", content=b"")) == (400, "the request body is not JSON")


def test_a_body_that_is_not_an_object_is_400() -> None:
    assert error(post("/completions", ["prompt"])) == (400, "the request body must be a JSON object")


@pytest.mark.parametrize("messages", [None, [], "hello", {"role": "user"}])
def test_chat_without_a_list_of_messages_is_400(messages: Any) -> None:
    body = {} if messages is None else {"messages": messages}
    assert error(post("/chat/completions", body)) == (400, "messages: a non-empty list is required")


@pytest.mark.parametrize("prompt", [None, ["a", "b"], 3])
def test_completions_without_a_string_prompt_is_400(prompt: Any) -> None:
    body = {} if prompt is None else {"prompt": prompt}
    assert error(post("/completions", body)) == (400, "prompt: a string is required")
