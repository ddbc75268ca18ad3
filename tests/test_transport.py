"""The aiohttp-backed transport speaks httpx: requests, responses and errors."""

from __future__ import annotations

import socket
import threading
import time

import anyio
import httpx
import pytest

from batchrun._transport import AiohttpTransport
from tests.fakeserver import FakeServer, Faults


def exchange(url: str, body: bytes = b'{"model": "m", "prompt": "hi"}', timeout_s: float | None = None,
             **headers: str) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = AiohttpTransport(max_connections=4, timeout_s=timeout_s)
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
