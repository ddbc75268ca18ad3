from __future__ import annotations

import json
import time
from collections.abc import Callable

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun import JobFatalAPIError, parse_spec
from batchrun.endpoints.result import Result
from batchrun.engine.call import Caller
from batchrun.http.client import Client, normalized
from batchrun.inputs.reader import Row
from tests.conftest import examples

KEY = "sk-unit-secret"
ANSWER = {"id": "r", "model": "m", "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def call(responses: list[Callable[[httpx.Request], httpx.Response] | httpx.Response],
         setup: Callable[[Client], None] | None = None, **spec: object):
    """Run one chat row through a Client over MockTransport (`setup` sees the client first);
    return (result, requests seen, sleeps)."""
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = responses.pop(0)
        return answer(request) if callable(answer) else answer

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "api": {"base_url": "http://127.0.0.1:9/v1"},
           "retry": {"backoff_initial_s": 0.1}, **spec}
    client = Client(parse_spec(raw, environ={}), api_key=KEY, transport=httpx.MockTransport(handler), sleep=sleep)
    row = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "q"}]}, "line 1")
    if setup is not None:
        setup(client)

    async def main() -> Result:
        async with client:
            return await Caller(client.spec, client).call(row)

    return anyio.run(main), seen, sleeps


def test_a_request_carries_key_model_params_and_messages() -> None:
    result, seen, _ = call([httpx.Response(200, json=ANSWER)], params={"max_tokens": 9})
    [request] = seen
    assert request.url == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "q"}]}
    assert (result.status, result.output_text, result.total_tokens, result.attempts) == ("ok", "hi", 2, 1)


def test_retries_back_off_and_count_attempts() -> None:
    responses = [
        httpx.Response(500, json={"error": {"message": "oops"}}),
        httpx.Response(503, text="overloaded"),
        httpx.Response(200, content=b'{"choices": [tru'),  # a body cut short
        httpx.Response(200, json=ANSWER),
    ]
    result, seen, sleeps = call(responses)
    assert len(seen) == 4
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and 0.2 <= sleeps[2] <= 0.4
    assert (result.status, result.attempts) == ("ok", 4)


def test_a_429_waits_its_retry_after_and_is_not_a_spent_attempt() -> None:
    responses = [httpx.Response(429, headers={"retry-after": "2"}, json={"error": {"message": "slow down"}}),
                 httpx.Response(200, json=ANSWER)]
    result, seen, sleeps = call(responses, retry={"max_attempts": 1})
    assert (result.status, result.attempts, len(seen)) == ("ok", 2, 2)  # a 429 is not a spent attempt
    assert sleeps == [2.0]


def test_load_shed_with_a_wait_is_no_spent_attempt_and_a_wait_of_nothing_is_the_backoff() -> None:
    """A 503 naming its wait is load shed, as a 429 is a rate limit: a row outlasts a storm
    of them. `retry-after: 0` names no wait: the backoff stands (never hundreds of tries a
    second)."""
    shed = [httpx.Response(503, headers={"retry-after": "1"}, text="shedding load")] * 8
    result, seen, sleeps = call([*shed, httpx.Response(200, json=ANSWER)], retry={"max_attempts": 2})
    assert (result.status, len(seen), sleeps) == ("ok", 9, [1.0] * 8)
    now = [httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow down"}})] * 3
    result, seen, sleeps = call([*now, httpx.Response(200, json=ANSWER)])
    assert result.status == "ok" and 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and 0.2 <= sleeps[2] <= 0.4


def test_a_hold_set_while_a_request_waits_for_its_slot_holds_it_too() -> None:
    """Its slot was booked a second off; meanwhile the server said wait (a spent window, then
    a 429 naming 5 s): the request waits for that too, rather than meet its own 429."""
    def booked_then_held(client: Client) -> None:
        def reserve(tokens: int, now: float) -> float:
            client.limiter.held_until = now + 5.0  # (set while it sleeps, as an answer would)
            return 1.0
        client.limiter.reserve = reserve  # type: ignore[method-assign]

    result, seen, sleeps = call([httpx.Response(200, json=ANSWER)], booked_then_held)
    assert result.status == "ok" and sleeps[0] == 1.0 and 0 < sleeps[1] <= 5.0  # (what is left of the 5 s)


def test_connection_errors_and_timeouts_are_retried() -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    result, seen, _ = call([drop, hang, httpx.Response(200, json=ANSWER)])
    assert (result.status, result.attempts, len(seen)) == ("ok", 3, 3)


def send_with(responses: list, again: Callable[[int], str | None]) -> tuple[Result, list[int], int]:
    """One chat request through Client.send with `Request.again` set: (the result, the lost
    attempts counted at each call of `again`, requests seen)."""
    seen: list[int] = []
    lost_at: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        answer = responses.pop(0)
        return answer(request) if callable(answer) else answer

    async def no_sleep(seconds: float) -> None:
        pass

    raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "api": {"base_url": "http://127.0.0.1:9/v1"}}
    client = Client(parse_spec(raw, environ={}), api_key=KEY, transport=httpx.MockTransport(handler), sleep=no_sleep)

    async def main() -> Result:
        async with client:
            request = client.request("chat", {"model": "m", "messages": [{"role": "user", "content": "q"}]})

            async def hook() -> str | None:
                lost_at.append(request.lost)
                return again(request.lost)

            request.again = hook
            return await client.send(request)

    return anyio.run(main), lost_at, len(seen)


def test_a_timeout_and_an_unreadable_2xx_are_attempts_that_may_have_been_paid() -> None:
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    cut = httpx.Response(200, content=b'{"id": "r", "choices": [')  # a 2xx, billed, not readable
    error = httpx.Response(500, json={"error": {"message": "boom"}})  # an error: no answer to pay for
    result, lost_at, sent = send_with([hang, error, cut, httpx.Response(200, json=ANSWER)], lambda lost: None)
    assert (result.status, sent) == ("ok", 4)
    assert lost_at == [1, 1, 2]  # asked before each attempt after the first lost one


def test_a_2xx_cut_off_mid_body_is_an_attempt_that_may_have_been_paid() -> None:
    class CutOff(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b'{"id": "r", "choices": ['
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def cut(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=CutOff())

    def refused(request: httpx.Request) -> httpx.Response:  # no answer begun: nothing to pay for
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    result, lost_at, sent = send_with([refused, cut, httpx.Response(200, json=ANSWER)], lambda lost: None)
    assert (result.status, sent, lost_at) == ("ok", 3, [1])


def test_a_2xx_read_whole_that_stops_the_job_or_fails_the_row_was_paid_for_all_the_same() -> None:
    per_token = {"object": "list", "data": [{"index": 0, "embedding": [[0.1, 0.2], [0.3, 0.4]]}]}
    empty = {"id": "r", "model": "m", "choices": []}  # a 200 without an answer: the row fails

    async def main(endpoint: str, body: dict, answer: dict) -> int:
        raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "api": {"base_url": "http://127.0.0.1:9/v1"}}
        client = Client(parse_spec(raw, environ={}), api_key=KEY,
                        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer)))
        async with client:
            request = client.request(endpoint, body)
            try:
                await client.send(request)
            except JobFatalAPIError:
                pass
            return request.lost

    assert anyio.run(main, "embeddings", {"model": "m", "input": ["a"]}, per_token) == 1
    assert anyio.run(main, "chat", {"model": "m", "messages": [{"role": "user", "content": "q"}]}, empty) == 1


def test_a_budget_that_holds_no_other_attempt_ends_the_retries_with_a_transient_failure() -> None:
    cut = httpx.Response(200, content=b"not json")
    result, lost_at, sent = send_with([cut, httpx.Response(200, json=ANSWER)],
                                      lambda lost: "the budget holds no other attempt")
    assert (result.status, result.transient, sent, lost_at) == ("failed", True, 1, [1])
    assert result.error == "the response body is not valid JSON; not sent again: the budget holds no other attempt"


def test_a_job_that_stops_sends_no_retry_and_the_row_fails_to_be_asked_again() -> None:
    """A retry is a new request: once the job stops (SIGTERM, a spent budget), the failed
    attempt is the row's last in this run, a transient failure that a rerun asks again."""
    clients: list[Client] = []

    def stopped_then_500(request: httpx.Request) -> httpx.Response:
        clients[0].stopping = True  # the job stops while this request is out
        return httpx.Response(500, json={"error": {"message": "boom"}})

    result, seen, _ = call([stopped_then_500, httpx.Response(200, json=ANSWER)], clients.append)
    assert (result.status, result.transient, len(seen)) == ("failed", True, 1)
    assert result.error == "HTTP 500: boom; not sent again: the job is stopping"


def test_exhausted_retries_give_a_failed_row_with_the_last_error() -> None:
    result, seen, _ = call([httpx.Response(500, json={"error": {"message": "boom"}})] * 3, retry={"max_attempts": 3})
    assert (result.status, result.attempts, result.error, len(seen)) == ("failed", 3, "HTTP 500: boom", 3)
    assert result.output_text is None


def test_a_400_fails_the_row_at_once() -> None:
    result, seen, sleeps = call([httpx.Response(400, json={"error": {"message": "bad max_tokens"}})])
    assert (result.status, result.error, result.attempts, len(seen), sleeps) == (
        "failed", "HTTP 400: bad max_tokens", 1, 1, [])


def test_a_401_stops_the_job_and_the_echoed_key_is_redacted() -> None:
    with pytest.raises(JobFatalAPIError) as info:
        call([httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}})])
    assert KEY not in str(info.value)
    assert "Incorrect API key provided: [redacted]" in str(info.value)
    assert info.value.status == 401


def test_a_server_that_ignores_stream_is_read_as_plain_json() -> None:
    result, seen, _ = call([httpx.Response(200, json=ANSWER)], params={"stream": True})
    assert (result.status, result.output_text, result.attempts) == ("ok", "hi", 1)


def test_timeout_bounds_the_whole_answer_not_each_read() -> None:
    class Drip(httpx.AsyncByteStream):
        async def __aiter__(self):
            for _ in range(100_000):  # keep-alive comments for ~1000 s, each within any read timeout
                yield b": ping\n\n"
                await anyio.sleep(0.01)

    def dripping(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Drip())

    sse_answer = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    fine = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse_answer)
    started = time.monotonic()
    result, seen, _ = call([dripping, fine], params={"stream": True},
                           api={"base_url": "http://127.0.0.1:9/v1", "timeout_s": 0.2})
    assert (result.status, result.output_text, result.attempts) == ("ok", "hi", 2)
    assert time.monotonic() - started < 30  # the drip alone would last ~1000 s


def test_a_request_that_cannot_be_sent_stops_the_job_without_quoting_it() -> None:
    def bad_header(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value b'Bearer {KEY}\\n'")

    with pytest.raises(JobFatalAPIError) as info:
        call([bad_header])
    assert KEY not in str(info.value) and "LocalProtocolError" in str(info.value)


def key_pieces(text: str, n: int = 8) -> list[str]:
    """Every n characters of KEY in a row found in `text`, read with and without its spacing."""
    squeezed = "".join(text.split())
    return [KEY[i:i + n] for i in range(len(KEY) - n + 1) if KEY[i:i + n] in text or KEY[i:i + n] in squeezed]


@pytest.mark.parametrize("answer", [
    # 10 characters of the key before the cut at 500, 4 after it
    httpx.Response(400, json={"error": {"message": "x" * 475 + f" key {KEY} rejected"}}),
    httpx.Response(400, json={"error": {"message": f"your key was {' '.join(KEY)}"}}),
    httpx.Response(400, json={"error": {"message": f"key {KEY[:7]}\n{KEY[7:]} and again {KEY[3:12]}"}}),
    httpx.Response(500, text=f"<html>Internal error for Bearer {KEY}</html>"),
], ids=["across-the-cut", "spaced-out", "split", "plain-text-500"])
def test_no_piece_of_the_key_reaches_a_stored_error(answer: httpx.Response) -> None:
    result, _, _ = call([answer], retry={"max_attempts": 1})
    assert result.status == "failed" and result.error.startswith(f"HTTP {answer.status_code}: ")
    assert key_pieces(result.error) == []
    assert "[redact" in result.error
    assert len(result.error) <= 500


def test_a_redirect_stops_the_job_naming_where_it_points() -> None:
    moved = httpx.Response(308, headers={"location": "https://api.example.test/inference/v1/chat/completions"})
    with pytest.raises(JobFatalAPIError, match="redirects to 'https://api.example.test/inference/v1/chat/"
                                               "completions'.*set api.base_url") as info:
        call([moved])
    assert info.value.status == 308


def test_an_answer_nested_beyond_reason_is_a_failed_attempt_not_a_crash() -> None:
    deep = httpx.Response(200, content=b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          headers={"content-type": "application/json"})
    result, seen, _ = call([deep, httpx.Response(200, json=ANSWER)])
    assert (result.status, result.output_text, len(seen)) == ("ok", "hi", 2)
    result, _, _ = call([deep], retry={"max_attempts": 1})
    assert (result.status, result.error) == ("failed", "the answer is nested too deeply to read")


def test_a_row_that_cannot_be_encoded_fails_alone_without_a_request() -> None:
    seen: list[httpx.Request] = []
    spec = parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m",
                       "api": {"base_url": "http://127.0.0.1:9/v1"}}, environ={})
    client = Client(spec, api_key=KEY, transport=httpx.MockTransport(lambda r: seen.append(r) or
                                                                       httpx.Response(200, json=ANSWER)))
    row = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "half \ud800"}]}, "line 1")

    async def main() -> Result:
        async with client:
            return await Caller(client.spec, client).call(row)

    result = anyio.run(main)
    assert (result.status, seen) == ("failed", [])
    assert result.error.startswith("the request cannot be sent as JSON: ")


@pytest.mark.parametrize("stated", [b"\xb2", b"9" * 5000, b"-2", b"0", b"2.5", b"", b"nan"])
def test_a_stated_parallel_limit_the_server_writes_oddly_is_ignored(stated: bytes) -> None:
    from batchrun.policy.concurrency import STATED_HEADER

    result, _, _ = call([httpx.Response(200, json=ANSWER, headers={STATED_HEADER: stated})])

    assert result.status == "ok"


def test_a_stated_parallel_limit_caps_requests_in_flight() -> None:
    from batchrun.policy.concurrency import STATED_HEADER

    seen = []
    raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "api": {"base_url": "http://127.0.0.1:9/v1"}}
    transport = httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json=ANSWER,
                                                                                headers={STATED_HEADER: " 3 "}))
    client = Client(parse_spec(raw, environ={}), api_key=KEY, transport=transport)
    row = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "q"}]}, "line 1")

    async def main() -> None:
        async with client:
            await Caller(client.spec, client).call(row)

    anyio.run(main)
    assert client.in_flight.maximum == 3 and client.in_flight.limit == 3


def test_a_failed_answer_is_not_kept_while_its_retry_waits() -> None:
    """A kept error keeps the frames it came through: not the answer in them (200 rows
    waiting to retry an 8 MB 500 once took 6 GB)."""
    import tracemalloc

    held: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=b'{"error": {"message": "' + b"x" * (8 << 20) + b'"}}')

    async def sleep(seconds: float) -> None:
        held.append(tracemalloc.get_traced_memory()[0])

    raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "api": {"base_url": "http://127.0.0.1:9/v1"},
           "retry": {"max_attempts": 3}}
    client = Client(parse_spec(raw, environ={}), api_key=KEY, transport=httpx.MockTransport(handler), sleep=sleep)
    row = Row(0, "r0", "chat", {"messages": [{"role": "user", "content": "q"}]}, "line 1")

    async def main() -> Result:
        async with client:
            return await Caller(client.spec, client).call(row)

    tracemalloc.start()
    try:
        result = anyio.run(main)
    finally:
        tracemalloc.stop()
    assert result.status == "failed" and result.attempts == 3
    assert len(held) == 2 and max(held) < 4 << 20, held


urls = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "https", "HTTP", "ftp"]),
    st.sampled_from(["127.0.0.1", "256.1.1.1", "010.0.0.1", "api.fireworks.ai", "Api.Example.COM", "a-b.c", "x",
                     "1.2.3", "xn--bcher-kva.example", "b\u00fccher.example", "a_b.c", "", "a.-b", "a..b", "a.b.",
                     "localhost", "a.1", "a.300"]),
    st.sampled_from(["", ":80", ":443", ":8080", ":08080", ":0", ":65535", ":65536", ":99999", ":x"]),
    st.lists(st.sampled_from(["v1", "inference", ".", "..", "", "~u", "a%20b", "a b", "A.Z", "x-y_z", "?q=1", "#f"]),
             max_size=4).map(lambda parts: "".join("/" + part for part in parts)),
)


@settings(max_examples=examples(400), deadline=None)
@given(urls)
def test_a_base_url_is_written_as_httpx_writes_it(url: str) -> None:
    """The endpoint URLs are the cache's keys: read here without httpx, they must be httpx's."""
    try:
        parsed = httpx.URL(url)
        expected = (str(parsed), parsed.netloc.decode("ascii"))
    except Exception as exc:  # noqa: BLE001 (whichever httpx raises, the same)
        with pytest.raises(type(exc)):
            normalized(url)
        return
    assert normalized(url) == expected
