"""The aiohttp-backed transport speaks httpx: requests, responses and errors."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest

from batchrun import _transport
from batchrun._transport import AiohttpTransport, AnswerTooLarge
from tests.fakeserver import FakeServer, Faults


def exchange(url: str, body: bytes = b'{"model": "m", "prompt": "hi"}', timeout_s: float | None = None,
             max_answer_bytes: int = 32 << 20, **headers: str) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = AiohttpTransport(max_connections=4, timeout_s=timeout_s, max_answer_bytes=max_answer_bytes)
        try:
            request = httpx.Request("POST", url, content=body, headers={"content-type": "application/json", **headers})
            response = await transport.handle_async_request(request)
            await response.aread()
            await response.aclose()
            return response
        finally:
            await transport.aclose()

    return anyio.run(main)


def test_request_and_response_pass_through(server: FakeServer) -> None:
    response = exchange(f"{server.base_url}/completions", authorization="Bearer sk-abcdefgh")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["choices"][0]["text"] == "answer-1 to 'hi'"
    [seen] = server.requests
    assert seen.body == {"model": "m", "prompt": "hi"}
    assert seen.headers["authorization"] == "Bearer sk-abcdefgh"
    assert "user-agent" not in seen.headers  # aiohttp adds none of its own


def test_error_statuses_are_responses_not_exceptions(server: FakeServer) -> None:
    server.faults = Faults(rate_429=1.0, retry_after="3")
    response = exchange(f"{server.base_url}/completions")
    assert (response.status_code, response.headers["retry-after"]) == (429, "3")


@pytest.mark.parametrize(("faults", "error"), [
    (Faults(drop_rate=1.0), httpx.RemoteProtocolError),
    (Faults(truncated_body_rate=1.0), httpx.RemoteProtocolError),
])
def test_broken_answers_become_httpx_errors(server: FakeServer, faults: Faults, error: type) -> None:
    server.faults = faults
    with pytest.raises(error):
        exchange(f"{server.base_url}/completions")


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        exchange(f"http://127.0.0.1:{port}/v1/completions")


def test_timeout_bounds_the_whole_exchange_not_each_read() -> None:
    """A server dripping keep-alive comments answers every read at once, and never ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                               b"transfer-encoding: chunked\r\n\r\n")
            give_up = time.monotonic() + 5  # then close: a client with no bound fails, not hangs
            while not stop.is_set() and time.monotonic() < give_up:
                try:
                    connection.sendall(b"8\r\n: ping\n\n\r\n")
                except OSError:  # the client gave up and closed
                    return
                time.sleep(0.02)

    server = threading.Thread(target=drip)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(httpx.ReadTimeout):
            exchange(f"http://127.0.0.1:{port}/v1/completions", timeout_s=0.3)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        server.join()
        listener.close()
    assert 0.3 <= elapsed < 3


def gzip_bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(inflated >> 20)) + packer.flush()


def raw(head: str, *chunks: bytes) -> Callable[[dict], Iterator[bytes]]:
    def answer(body: dict) -> Iterator[bytes]:
        yield head.encode()
        yield from chunks
    return answer


def endless(head: str, chunk: bytes) -> Callable[[dict], Iterator[bytes]]:
    def answer(body: dict) -> Iterator[bytes]:
        yield head.encode()
        while True:
            yield chunk
    return answer


BOMB = gzip_bomb(256 << 20)
MB = bytes(1 << 20)


@pytest.mark.parametrize("answer", [
    raw(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        f"content-length: {len(BOMB)}\r\n\r\n", BOMB),
    endless("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5368709120\r\n\r\n", MB),
    endless("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            b"100000\r\n" + b"data: {}\n\n".ljust(1 << 20, b"x") + b"\r\n"),
], ids=["gzip-bomb", "5-GB-body", "endless-stream"])
def test_an_answer_past_the_limit_fails_without_growing_memory(server: FakeServer, answer: Callable) -> None:
    server.faults = Faults(raw_answer=answer)
    limit = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(AnswerTooLarge, match="answer too large: more than 4,194,304 bytes"):
            exchange(f"{server.base_url}/completions", max_answer_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit, f"{peak:,} bytes held for an answer refused at {limit:,}"


def test_compressed_answers_are_inflated_and_the_headers_say_so(server: FakeServer) -> None:
    text = json.dumps({"choices": [{"text": "é" * 1000, "finish_reason": "stop"}]}).encode()
    packed = gzip.compress(text)
    server.faults = Faults(raw_answer=raw(
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        f"content-length: {len(packed)}\r\n\r\n", packed))
    response = exchange(f"{server.base_url}/completions")
    assert response.content == text
    assert "content-encoding" not in response.headers
    server.faults = Faults(raw_answer=raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\n",
        b"{}"))
    with pytest.raises(httpx.DecodingError, match="'br', which batchrun never asked for"):
        exchange(f"{server.base_url}/completions")


def test_answers_over_the_shared_budget_take_turns_and_all_arrive(server: FakeServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    big = json.dumps({"choices": [{"text": "x" * (3 << 20), "finish_reason": "stop"}]}).encode()
    server.faults = Faults(raw_answer=raw(
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(big)}\r\n\r\n", big))
    monkeypatch.setattr(_transport, "ANSWERS_BUDGET_BYTES", 2 << 20)  # less than one answer
    held: list[int] = []
    real_hold = _transport._Memory.hold

    async def hold(self: _transport._Memory, reader: int, total: int) -> None:
        await real_hold(self, reader, total)
        held.append(self.held)

    monkeypatch.setattr(_transport._Memory, "hold", hold)

    async def main() -> list[int]:
        transport = AiohttpTransport(max_connections=8)
        sizes: list[int] = []

        async def one() -> None:
            request = httpx.Request("POST", f"{server.base_url}/completions", content=b'{"model": "m", "prompt": "p"}')
            sizes.append(len((await transport.handle_async_request(request)).content))

        try:
            async with anyio.create_task_group() as tasks:
                for _ in range(8):
                    tasks.start_soon(one)
        finally:
            await transport.aclose()
        return sizes

    assert anyio.run(main) == [len(big)] * 8
    assert max(held) <= (2 << 20) + len(big)  # the budget, and the one answer that holds the most


def test_the_reader_holding_the_most_never_waits_for_the_budget() -> None:
    async def main() -> list[str]:
        memory, order = _transport._Memory(budget=8), []
        await memory.hold(1, 5)
        await memory.hold(2, 3)

        async def second_grows() -> None:
            await memory.hold(2, 5)  # over budget, and not the largest: waits
            order.append("2 grew")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(second_grows)
            await anyio.sleep(0.01)
            await memory.hold(1, 7)  # over budget too, but the largest: goes on
            order.append("1 grew")
            memory.release(1)
        return order

    assert anyio.run(main) == ["1 grew", "2 grew"]
