"""The transports behind the seam: the wire transport (the default) and aiohttp's (for proxies)
against a real server on 127.0.0.1, held to one contract; BoundedTransport for httpx's."""

from __future__ import annotations

import gc
import gzip
import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import httpx
import pytest

from batchrun.http import transport as _transport
from batchrun.http.aio import AiohttpTransport
from batchrun.http.bounded import BoundedTransport
from batchrun.http.transport import Answer, AnswerTooLarge
from batchrun.http.wire import WireTransport
from tests.fakeserver import FakeServer, Faults

TRANSPORTS = {"wire": WireTransport, "aiohttp": AiohttpTransport}


@pytest.fixture(params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> str:
    """A test of the transports runs on each."""
    return request.param


def transport(kind: str, **options: object) -> WireTransport | AiohttpTransport:
    return TRANSPORTS[kind](**{"timeout_s": 60.0, **options})  # type: ignore[arg-type]


def headers_for(url: str, body: bytes, **more: str) -> list[tuple[str, str]]:
    """What the client sends with every request."""
    return [("host", httpx.URL(url).netloc.decode()), ("content-type", "application/json"),
            ("content-length", str(len(body))), *more.items()]


def exchange(kind: str, url: str, body: bytes = b'{"model": "m", "prompt": "hi"}', timeout_s: float = 60.0,
             max_answer_bytes: int = 32 << 20, **headers: str) -> Answer:
    async def main() -> Answer:
        sender = transport(kind, max_connections=4, timeout_s=timeout_s, max_answer_bytes=max_answer_bytes)
        try:
            return await sender.exchange(url, headers_for(url, body, **headers), body)
        finally:
            await sender.aclose()

    return anyio.run(main)


def test_request_and_response_pass_through(kind: str, server: FakeServer) -> None:
    answer = exchange(kind, f"{server.base_url}/completions", authorization="Bearer sk-abcdefgh")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content)["choices"][0]["text"] == "answer-1 to 'hi'"
    [seen] = server.requests
    assert seen.body == {"model": "m", "prompt": "hi"}
    assert seen.headers["authorization"] == "Bearer sk-abcdefgh"
    assert "user-agent" not in seen.headers  # the transport adds none of its own


def test_error_statuses_are_responses_not_exceptions(kind: str, server: FakeServer) -> None:
    server.faults = Faults(rate_429=1.0, retry_after="3")
    answer = exchange(kind, f"{server.base_url}/completions")
    assert (answer.status, answer.headers["retry-after"]) == (429, "3")


@pytest.mark.parametrize(("faults", "error", "begun"), [
    (Faults(drop_rate=1.0), _transport.RemoteProtocolError, None),
    (Faults(truncated_body_rate=1.0), _transport.RemoteProtocolError, 200),
])
def test_broken_answers_become_the_seams_errors(kind: str, server: FakeServer, faults: Faults, error: type,
                                                begun: int | None) -> None:
    server.faults = faults
    with pytest.raises(error) as info:
        exchange(kind, f"{server.base_url}/completions")
    assert info.value.status == begun  # the status of an answer cut short (paid for, for all anyone knows)


def test_a_refused_connection_is_a_connect_error(kind: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(_transport.ConnectError):
        exchange(kind, f"http://127.0.0.1:{port}/v1/completions")


@pytest.mark.slow  # a server of its own, on a socket
def test_timeout_bounds_the_whole_exchange_not_each_read(kind: str) -> None:
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
        with pytest.raises(_transport.ReadTimeout):
            exchange(kind, f"http://127.0.0.1:{port}/v1/completions", timeout_s=0.3)
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
HOSTILE_ANSWERS = pytest.mark.parametrize("answer", [
    raw(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        f"content-length: {len(BOMB)}\r\n\r\n", BOMB),
    endless("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5368709120\r\n\r\n", MB),
    endless("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            b"100000\r\n" + b"data: {}\n\n".ljust(1 << 20, b"x") + b"\r\n"),
], ids=["gzip-bomb", "5-GB-body", "endless-stream"])


@HOSTILE_ANSWERS
def test_an_answer_past_the_limit_fails_without_growing_memory(kind: str, server: FakeServer,
                                                                answer: Callable) -> None:
    server.faults = Faults(raw_answer=answer)
    limit = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(AnswerTooLarge, match="answer too large: more than 4,194,304 bytes"):
            exchange(kind, f"{server.base_url}/completions", max_answer_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit, f"{peak:,} bytes held for an answer refused at {limit:,}"


def test_compressed_answers_are_inflated_and_the_headers_say_so(kind: str, server: FakeServer) -> None:
    text = json.dumps({"choices": [{"text": "é" * 1000, "finish_reason": "stop"}]}).encode()
    packed = gzip.compress(text)
    server.faults = Faults(raw_answer=raw(
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        f"content-length: {len(packed)}\r\n\r\n", packed))
    answer = exchange(kind, f"{server.base_url}/completions")
    assert answer.content == text
    assert "content-encoding" not in answer.headers and "content-length" not in answer.headers
    server.faults = Faults(raw_answer=raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\n",
        b"{}"))
    with pytest.raises(_transport.DecodingError, match="'br', which batchrun never asked for"):
        exchange(kind, f"{server.base_url}/completions")


def test_answers_over_the_shared_budget_take_turns_and_all_arrive(kind: str, server: FakeServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    big = json.dumps({"choices": [{"text": "x" * (3 << 20), "finish_reason": "stop"}]}).encode()
    server.faults = Faults(raw_answer=raw(
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(big)}\r\n\r\n", big))
    monkeypatch.setattr(_transport, "ANSWERS_BUDGET_BYTES", 2 << 20)  # less than one answer: 4 x the limit it is
    held: list[tuple[int, int]] = []
    real_hold = _transport._Memory.hold

    async def hold(self: _transport._Memory, reader: object, total: int) -> None:
        await real_hold(self, reader, total)
        held.append((self.held, self.budget))

    monkeypatch.setattr(_transport._Memory, "hold", hold)

    async def main() -> list[int]:
        sender = transport(kind, max_connections=8, max_answer_bytes=4 << 20)
        sizes: list[int] = []
        url, body = f"{server.base_url}/completions", b'{"model": "m", "prompt": "p"}'

        async def one() -> None:
            sizes.append(len((await sender.exchange(url, headers_for(url, body), body)).content))

        try:
            async with anyio.create_task_group() as tasks:
                for _ in range(8):
                    tasks.start_soon(one)
        finally:
            await sender.aclose()
        return sizes

    assert anyio.run(main) == [len(big)] * 8
    [budget] = {budget for _, budget in held}
    assert budget < 8 * len(big)  # so they took turns
    assert max(total for total, _ in held) <= budget  # never past it, not even by one answer


def test_one_reader_at_a_time_may_take_the_last_answers_worth_of_the_budget() -> None:
    async def main() -> tuple[list[str], int]:
        memory, order = _transport._Memory(budget=8, one_answer=4), []  # shared by all: 4
        await memory.hold(1, 3)
        await memory.hold(2, 1)
        await memory.hold(2, 3)  # past the shared 4: leads, in the last 4
        await memory.hold(1, 4)  # 4 shared again

        async def first_grows() -> None:
            await memory.hold(1, 5)  # past the shared 4, and another leads: waits
            order.append("1 grew")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first_grows)
            await anyio.wait_all_tasks_blocked()
            await memory.hold(2, 4)  # the leader never waits
            order.append("2 grew")
            memory.release(2)
        return order, memory.peak

    assert anyio.run(main) == (["2 grew", "1 grew"], 8)


class Chunks(httpx.AsyncByteStream):
    """An answer's body arriving a chunk at a time, other readers going on in between."""

    def __init__(self, chunks: Iterator[bytes] | list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
            await anyio.sleep(0)


def pieces(data: bytes, size: int = 1 << 16) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def exchange_all(handler: Callable[[httpx.Request], httpx.Response], count: int,
                 max_answer_bytes: int) -> tuple[list[bytes | Exception], _transport._Memory]:
    """`count` requests at once through BoundedTransport: their bodies (or errors) and the memory they shared."""
    async def main() -> tuple[list[bytes | Exception], _transport._Memory]:
        bounded = BoundedTransport(httpx.MockTransport(handler), timeout_s=60, max_answer_bytes=max_answer_bytes)
        answers: list[bytes | Exception] = [b""] * count

        async def one(i: int) -> None:
            url = f"http://api.test/v1/completions?{i}"
            try:
                answers[i] = (await bounded.exchange(url, headers_for(url, b"{}"), b"{}")).content
            except AnswerTooLarge as exc:
                answers[i] = exc

        async with anyio.create_task_group() as tasks:
            for i in range(count):
                tasks.start_soon(one, i)
        return answers, bounded._memory

    return anyio.run(main)


def test_answers_read_together_never_hold_more_than_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain and compressed answers, and bombs, 48 at once against a 4 MB budget."""
    monkeypatch.setattr(_transport, "ANSWERS_BUDGET_BYTES", 4 << 20)
    text = json.dumps({"choices": [{"text": "many words " * 60_000, "finish_reason": "stop"}]}).encode()
    bomb = gzip_bomb(64 << 20)

    def handler(request: httpx.Request) -> httpx.Response:
        kind = int(request.url.query) % 3
        if kind == 0:
            return httpx.Response(200, stream=Chunks(pieces(text)))
        packed = gzip.compress(text) if kind == 1 else bomb
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Chunks(pieces(packed, 1 << 10)))

    answers, memory = exchange_all(handler, 48, max_answer_bytes=1 << 20)

    assert answers[0::3] == answers[1::3] == [text] * 16
    assert {str(a) for a in answers[2::3]} == {"answer too large: more than 1,048,576 bytes (api.max_answer_mb)"}
    assert memory.budget == 4 << 20
    assert memory.budget / 2 < memory.peak <= memory.budget
    assert memory.held == 0  # every answer gave its share back


HOSTILE = {
    "gzip-bomb": ({"content-encoding": "gzip"}, lambda: pieces(BOMB)),
    "5-GB-body": ({"content-length": "5368709120"}, lambda: iter(lambda: bytes(1 << 20), None)),
    "endless-stream": ({"content-type": "text/event-stream"},
                       lambda: iter(lambda: b"data: {}\n\n".ljust(1 << 20, b"x"), None)),
}


def kept_by_errors(exchange_failing: Callable[[], Exception], count: int = 4) -> int:
    """Bytes that `count` errors of refused answers keep alive, for as long as they are kept."""
    tracemalloc.start()
    try:
        kept = [exchange_failing() for _ in range(count)]
        gc.collect()
        with_errors = tracemalloc.get_traced_memory()[0]
        kept.clear()
        gc.collect()
        return with_errors - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("hostile", HOSTILE)
def test_the_error_of_a_refused_answer_keeps_none_of_it(hostile: str) -> None:
    """A retry waiting keeps the last attempt's error: at 400 rows in flight, a megabyte
    each of an answer refused was 400 MB."""
    headers, chunks = HOSTILE[hostile]

    def failing() -> Exception:
        [error] = exchange_all(lambda request: httpx.Response(200, headers=headers, stream=Chunks(chunks())), 1,
                               max_answer_bytes=4 << 20)[0]
        assert isinstance(error, AnswerTooLarge)
        return error

    assert kept_by_errors(failing) < 64 << 10


@pytest.mark.slow
@HOSTILE_ANSWERS
def test_the_error_of_a_refused_answer_keeps_none_of_it_nor_of_the_connections_buffers(
        kind: str, server: FakeServer, answer: Callable) -> None:
    server.faults = Faults(raw_answer=answer)

    def failing() -> Exception:
        with pytest.raises(AnswerTooLarge) as caught:
            exchange(kind, f"{server.base_url}/completions", max_answer_bytes=4 << 20)
        return caught.value

    # Four errors and their tracebacks alone hold about 70 KB through aiohttp; an answer
    # kept with them held 0.5 to 5.9 MB
    assert kept_by_errors(failing) < 256 << 10


@pytest.mark.parametrize(("raised", "seams", "kind"), [
    (httpx.ConnectError("refused"), _transport.ConnectError, "ConnectError"),
    (httpx.ReadTimeout("slow"), _transport.ReadTimeout, "ReadTimeout"),
    (httpx.PoolTimeout("no connection"), _transport.ReadTimeout, "ReadTimeout"),
    (httpx.RemoteProtocolError("cut"), _transport.RemoteProtocolError, "RemoteProtocolError"),
    (httpx.LocalProtocolError("bad header"), _transport.LocalProtocolError, "LocalProtocolError"),
    (httpx.UnsupportedProtocol("ftp"), _transport.UnsupportedProtocol, "UnsupportedProtocol"),
    (httpx.DecodingError("bad gzip"), _transport.DecodingError, "DecodingError"),
    (httpx.ReadError("reset"), _transport.TransportError, "ReadError"),
    (httpx.ProxyError("proxy said no"), _transport.TransportError, "ProxyError"),
])
def test_an_httpx_transports_errors_become_the_seams_by_name(raised: httpx.TransportError, seams: type,
                                                             kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    async def main() -> None:
        bounded = BoundedTransport(httpx.MockTransport(handler), timeout_s=60)
        with pytest.raises(seams) as caught:
            await bounded.exchange("http://127.0.0.1:9/v1/completions", [("host", "127.0.0.1:9")], b"{}")
        assert type(caught.value) is seams and caught.value.kind == kind and str(caught.value) == str(raised)
        assert not isinstance(caught.value, httpx.HTTPError)

    anyio.run(main)
