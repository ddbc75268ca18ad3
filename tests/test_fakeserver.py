"""Tests of the fake OpenAI-compatible server itself."""

import json
import threading
import time

import httpx
import pytest

from tests.fakeserver import FakeServer, Faults, request_key


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def sse_chunks(response: httpx.Response) -> list:
    """The decoded `data:` payloads of an event stream; "[DONE]" is kept as the string."""
    payloads = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_completion_answer_and_record(server):
    r = httpx.post(f"{server.base_url}/completions", json={"model": "m", "prompt": "hello world", "max_tokens": 7})

    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "cmpl-1"
    assert body["choices"][0]["text"] == "answer-1 to 'hello world'"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 1}}
    assert body["max_tokens_seen"] == 7
    [rec] = server.requests
    assert (rec.path, rec.key, rec.outcome) == ("/v1/completions", "hello world", "ok")
    assert rec.headers["content-type"] == "application/json"
    assert server.answers == {"hello world": [body]}
    assert server.count("hello world") == 1


def test_chat_reasoning_answer(server):
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": "a-reasoner", "messages": messages})

    body = r.json()
    key = request_key({"messages": messages})
    assert key == '[{"content": "hi", "role": "user"}]'
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": f"answer-1 to {key[:20]!r}",
                                             "reasoning_content": "thinking-1"}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert "max_tokens_seen" not in body
    assert server.answers[key] == [body]


def test_first_attempt_status_then_ok(server):
    server.faults = Faults(first_attempt_status=503)
    with httpx.Client(base_url=server.base_url) as client:
        statuses = [client.post("/completions", json={"model": "m", "prompt": p}).status_code for p in "aab"]

    assert statuses == [503, 200, 503]
    assert [r.outcome for r in server.requests] == ["first_attempt", "ok", "first_attempt"]
    assert server.count("a") == 2
    assert list(server.answers) == ["a"]


def test_stream_fireworks_usage_in_finish_chunk(server):
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=request) as r:
        assert r.headers["content-type"] == "text/event-stream"
        *chunks, done = sse_chunks(r)

    assert done == "[DONE]"
    [answer] = server.answers[request_key(request)]
    assert len(chunks) == 3
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == answer["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert [c["usage"] for c in chunks] == [None, None, answer["usage"]]
    assert {c["id"] for c in chunks} == {answer["id"]}


def test_stream_openai_usage_in_extra_chunk(server):
    server.faults = Faults(usage_style="openai")
    request = {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/completions", json=request) as r:
        *chunks, usage_chunk, done = sse_chunks(r)

    answer = server.answers["p"][0]
    assert done == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks)
    assert (usage_chunk["choices"], usage_chunk["usage"]) == ([], answer["usage"])


def test_require_key(server):
    server.faults = Faults(require_key="sekrit")
    url, request = f"{server.base_url}/completions", {"model": "m", "prompt": "p"}
    denied = httpx.post(url, json=request, headers={"Authorization": "Bearer wrong"})
    allowed = httpx.post(url, json=request, headers={"Authorization": "Bearer sekrit"})

    assert denied.status_code == 401
    assert denied.json() == {"error": {"message": "Invalid API key", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}}
    assert allowed.status_code == 200
    assert [r.outcome for r in server.requests] == ["401", "ok"]


@pytest.mark.parametrize("fault", ["drop", "truncated_body"])
def test_connection_faults_break_the_response(server, fault):
    server.faults = Faults(**{f"{fault}_rate": 1.0})
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{server.base_url}/completions", json={"model": "m", "prompt": "p"})

    assert [r.outcome for r in server.requests] == [fault]
    assert server.answers == {}


def test_invalid_json(server):
    server.faults = Faults(invalid_json_rate=1.0)
    r = httpx.post(f"{server.base_url}/completions", json={"model": "m", "prompt": "p"})

    assert (r.status_code, r.headers["content-type"]) == (200, "application/json")
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert server.answers == {}


def test_max_in_flight_with_slow_requests(server):
    # Held until all five are in: they overlap however slowly five clients start.
    gate = threading.Event()
    server.faults = Faults(hold=lambda body: gate)
    threads = [threading.Thread(target=httpx.post, args=(f"{server.base_url}/completions",),
                                kwargs={"json": {"model": "m", "prompt": str(i)}}) for i in range(5)]
    for t in threads:
        t.start()
    with server._cond:
        assert server._cond.wait_for(lambda: server.in_flight == 5, timeout=60)
    gate.set()
    for t in threads:
        t.join()
    with server._cond:  # a client has its answer a moment before the server is done with it
        assert server._cond.wait_for(lambda: server.in_flight == 0, timeout=10)

    assert (server.in_flight, server.max_in_flight) == (0, 5)
    assert len(server.answers) == 5
    server.reset_stats()
    assert (server.requests, server.answers, server.max_in_flight) == ([], {}, 0)


@pytest.mark.slow
def test_hang_outlasts_client_timeout_and_stop_does_not_wait():
    s = FakeServer(Faults(hang_rate=1.0, hang_s=30)).start()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.base_url}/completions", json={"model": "m", "prompt": "p"}, timeout=0.2)
    # The server notices the client gave up instead of holding the request for 30 s.
    deadline = time.monotonic() + 2
    while s.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.in_flight == 0

    # A request still hanging when the server stops is cut off.
    failures = []

    def hanging_request():
        try:
            httpx.post(f"{s.base_url}/completions", json={"model": "m", "prompt": "q"}, timeout=30)
        except httpx.HTTPError as e:
            failures.append(e)

    client = threading.Thread(target=hanging_request)
    client.start()
    s.wait_for_requests(2)
    started = time.monotonic()
    s.stop()
    client.join(timeout=5)
    assert time.monotonic() - started < 2
    assert [type(e) for e in failures] == [httpx.RemoteProtocolError]
    assert [r.outcome for r in s.requests] == ["hang", "hang"]


@pytest.mark.slow
def test_fireworks_budgets_refuse_what_a_second_of_tokens_cannot_hold_and_state_what_is_left():
    with FakeServer(Faults(fireworks_budgets=(10_000, 10_000, 20))) as fake:
        with httpx.Client(base_url=fake.base_url) as client:
            answers = [client.post("/chat/completions", json={"model": "m", "messages": [
                {"role": "user", "content": f"q{i}"}]}) for i in range(8)]
    codes = [a.status_code for a in answers]
    generated = len(f"answer-0 to {request_key({'messages': [{'role': 'user', 'content': 'q0'}]})[:20]!r}".split())
    assert codes[:20 // generated] == [200] * (20 // generated) and 429 in codes  # the generated budget ran out
    first, refused = answers[0], answers[codes.index(429)]
    assert first.headers["x-ratelimit-limit-tokens-generated"] == "20"
    assert int(first.headers["x-ratelimit-remaining-tokens-generated"]) == 20 - generated
    assert refused.headers["x-ratelimit-over-limit"] == "yes" and refused.headers["retry-after"] == "1"
    assert len(fake.budget_used) == codes.count(200)
