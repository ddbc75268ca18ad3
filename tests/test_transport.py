"""The aiohttp-backed transport speaks httpx: requests, responses and errors."""

from __future__ import annotations

import socket

import anyio
import httpx
import pytest

from batchrun._transport import AiohttpTransport
from tests.fakeserver import FakeServer, Faults


def exchange(url: str, body: bytes = b'{"model": "m", "prompt": "hi"}', **headers: str) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = AiohttpTransport(max_connections=4)
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
