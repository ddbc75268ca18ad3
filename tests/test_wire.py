"""The wire transport's own promises: connections kept alive and reused, closed on any doubt,
given back when an exchange is cancelled; headers that would break the framing never sent;
answers framed every way HTTP/1.1 allows; TLS verified against the CA bundle given."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import json
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from batchrun import parse_spec
from batchrun.http import transport as seam
from batchrun.http.client import Client
from batchrun.http.transport import Answer
from batchrun.http.wire import WireTransport
from tests.conftest import TEST_KEY, cli_env, read_output, run_cli, run_cli_process, write_jsonl, write_spec
from tests.fakeserver import FakeServer
from tests.test_e2e import assert_exact_answers

pytestmark = pytest.mark.slow  # every test here starts a server

BODY = b'{"model": "m", "prompt": "hi"}'
ANSWER = json.dumps({"choices": [{"text": "ok", "finish_reason": "stop"}]}).encode()


def headers_for(url: str, body: bytes = BODY, **more: str) -> list[tuple[str, str]]:
    return [("host", httpx.URL(url).netloc.decode()), ("content-type", "application/json"),
            ("content-length", str(len(body))), *more.items()]


def send_all(url: str, count: int, *, parallel: int = 1, **options: object) -> list[Answer | Exception]:
    """`count` exchanges through one transport, `parallel` at a time."""
    async def main() -> list[Answer | Exception]:
        settings = {"max_connections": parallel, "timeout_s": 30.0, **options}
        transport = WireTransport(**settings)  # type: ignore[arg-type]
        answers: list[Answer | Exception] = []

        async def worker(share: range) -> None:
            for _ in share:
                try:
                    answers.append(await transport.exchange(url, headers_for(url), BODY))
                except seam.TransportError as exc:
                    answers.append(exc)

        try:
            async with anyio.create_task_group() as tasks:
                for i in range(parallel):
                    tasks.start_soon(worker, range(i, count, parallel))
        finally:
            await transport.aclose()
        return answers

    return anyio.run(main)


def test_connections_are_kept_alive_and_reused(server: FakeServer) -> None:
    answers = send_all(f"{server.base_url}/completions", 40, parallel=4)
    assert [a.status for a in answers if isinstance(a, Answer)] == [200] * 40
    assert server.connections <= 4  # at most one per request in flight, each carrying many
    assert len(server.requests) == 40


class RawServer:
    """A server on 127.0.0.1 that reads each request whole and answers it with `answer(n)`'s
    bytes (n counts requests); None closes the connection unanswered. It counts connections;
    `answer` may ask `current` which connection the request came on, and its how many'th."""

    def __init__(self, answer: Callable[[int], bytes | None], *, close_after: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.close_after, self.tls = answer, close_after, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = self.requests = 0
        self.received: list[bytes] = []
        self._local = threading.local()
        self._accepted = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting (close alone does not)
        self.listener.close()
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1/completions"

    @property
    def current(self) -> tuple[int, int]:
        """(the connection's number, counted from 1 as accepted; the request's number on it)."""
        return self._local.connection, self._local.sent

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self._accepted:
                self.connections += 1
                self._accepted.notify_all()
            threading.Thread(target=self._talk, args=(connection, self.connections), daemon=True).start()

    def wait_for_connections(self, count: int, timeout: float = 30) -> int:
        """Once `count` connections were accepted (or `timeout` passed): how many were."""
        with self._accepted:
            self._accepted.wait_for(lambda: self.connections >= count, timeout)
            return self.connections

    def _talk(self, connection: socket.socket, number: int) -> None:
        self._local.connection, self._local.sent = number, 0
        try:
            if self.tls is not None:
                connection = self.tls.wrap_socket(connection, server_side=True)
            with connection:
                while (request := _read_request(connection)) is not None:
                    self.received.append(request)
                    self.requests += 1
                    self._local.sent += 1
                    answer = self.answer(self.requests)
                    if answer is None:
                        return
                    connection.sendall(answer)
                    if self.close_after:
                        return
        except (OSError, ssl.SSLError):
            return


def _read_request(connection: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += connection.recv(65536)
    return data


def http_answer(body: bytes = ANSWER, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in ("HTTP/1.1 200 OK", "content-type: application/json", *extra))
    return head.encode() + b"\r\n" + body


def test_connections_opening_together_look_the_host_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost` may name ::1 before 127.0.0.1, where the server listens: each connection
    tries the addresses in turn, and eight opening at once make one lookup."""
    lookups: list[str] = []
    real = asyncio.BaseEventLoop.getaddrinfo

    async def getaddrinfo(self: asyncio.BaseEventLoop, host: str, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        return await real(self, host, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        answers = send_all(server.url.replace("127.0.0.1", "localhost"), 16, parallel=8)
    assert [a.content for a in answers if isinstance(a, Answer)] == [ANSWER] * 16
    assert lookups.count("localhost") == 1
    assert server.connections <= 8


def test_a_server_closing_after_each_answer_gets_a_new_connection_each_time() -> None:
    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}", "connection: close"),
                   close_after=True) as server:
        answers = send_all(server.url, 5)
    assert [a.content for a in answers if isinstance(a, Answer)] == [ANSWER] * 5
    assert server.connections == 5


def test_framing_by_length_by_chunks_and_by_the_connections_end() -> None:
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (ANSWER[:10], ANSWER[10:])) + \
        b"0\r\nx-trailer: 1\r\n\r\n"
    framings = {
        "length": http_answer(ANSWER, f"content-length: {len(ANSWER)}"),
        "chunked": http_answer(chunked, "transfer-encoding: chunked"),
        "to the end": http_answer(ANSWER),  # no length, not chunked: the body ends with the connection
    }
    for name, raw in framings.items():
        with RawServer(lambda n: raw, close_after=name == "to the end") as server:
            answers = send_all(server.url, 3)
        assert [a.content for a in answers if isinstance(a, Answer)] == [ANSWER] * 3, name
        assert server.connections == (3 if name == "to the end" else 1), name


def test_a_long_answer_in_many_chunks_is_read_whole() -> None:
    """2 MB in chunks of 1,000 bytes, a chunk's header often the last bytes of a read: no
    chunk is taken for the last one, whose trailers are bounded."""
    body = bytes(range(256)) * (2 << 12)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                       for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    with RawServer(lambda n: http_answer(chunked, "transfer-encoding: chunked")) as server:
        answers = send_all(server.url, 2)
    assert [a.content for a in answers if isinstance(a, Answer)] == [body] * 2
    assert server.connections == 1


def test_an_informational_answer_is_passed_over() -> None:
    with RawServer(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" + http_answer(ANSWER, f"content-length: {len(ANSWER)}")) \
            as server:
        [answer] = send_all(server.url, 1)
    assert isinstance(answer, Answer) and (answer.status, answer.content) == (200, ANSWER)


@pytest.mark.parametrize(("answer", "words", "begun"), [
    (lambda n: None, "closed the connection before it answered", None),
    (lambda n: http_answer(ANSWER[:20], f"content-length: {len(ANSWER)}"),
     "closed the connection in the middle of its HTTP 200 answer", 200),
    (lambda n: b"HTTP/1.1 banana\r\n\r\n", "not valid HTTP/1.1", None),
    (lambda n: b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * (4 << 20), "headers run past 65,536 bytes", 200),
    (lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" * 20_000, "headers run past 65,536 bytes", None),
    (lambda n: http_answer(b"2\r\n{}\r\n0\r\nx-endless: " + b"a" * (4 << 20), "transfer-encoding: chunked"),
     "headers run past 65,536 bytes", 200),
], ids=["no answer", "cut short", "not http", "endless header", "endless 100s", "endless trailer"])
def test_a_broken_answer_is_a_protocol_error_and_its_connection_goes(answer: Callable, words: str,
                                                                      begun: int | None) -> None:
    def first_broken(n: int) -> bytes | None:
        return answer(n) if n == 1 else http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    with RawServer(first_broken, close_after=True) as server:
        failed, ok = send_all(server.url, 2)
    assert isinstance(failed, seam.RemoteProtocolError) and words in str(failed)
    assert failed.status == begun  # an answer begun (its status): paid for, for all anyone knows
    assert isinstance(ok, Answer) and ok.content == ANSWER  # on a new connection


def test_a_request_meeting_a_kept_alive_connections_close_goes_again_at_once() -> None:
    """The server closes the connection its second request came on (its idle timeout met the
    request in flight): the request goes again on a new connection, and its answer comes.
    A connection that carried nothing before fails as it is (see above): it was no race."""
    with RawServer(lambda n: None if n == 2 else http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        answers = send_all(server.url, 3)
    assert [a.content for a in answers if isinstance(a, Answer)] == [ANSWER] * 3
    assert (server.requests, server.connections) == (4, 2)


def test_an_answer_followed_by_another_is_taken_and_its_connection_goes() -> None:
    """What follows an answer on its connection belongs to no request: the answer stands,
    and the connection, whose next bytes cannot be trusted, is closed."""
    two = http_answer(b"{}", "content-length: 2") + http_answer(b"[]", "content-length: 2")
    with RawServer(lambda n: two) as server:
        answers = send_all(server.url, 2)
    assert [a.content for a in answers if isinstance(a, Answer)] == [b"{}", b"{}"]
    assert server.connections == 2


def test_a_cancelled_exchange_gives_its_connection_back() -> None:
    """At one connection, an exchange given up on once its request arrived (its answer never
    came) leaves the connection closed and the slot free: the next exchange gets a new one."""
    arrived, release = threading.Event(), threading.Event()

    def slow_first(n: int) -> bytes:
        if n == 1:
            arrived.set()
            release.wait(10)
        return http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    async def main(url: str) -> Answer:
        transport = WireTransport(max_connections=1, timeout_s=30)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(transport.exchange, url, headers_for(url), BODY)
                assert await anyio.to_thread.run_sync(arrived.wait, 10)
                tasks.cancel_scope.cancel()
            release.set()
            with anyio.fail_after(10):
                return await transport.exchange(url, headers_for(url), BODY)
        finally:
            await transport.aclose()

    with RawServer(slow_first) as server:
        answer = anyio.run(main, server.url)
        assert answer.content == ANSWER
        assert server.connections == 2


def test_waiting_for_a_connection_counts_against_the_timeout() -> None:
    """At one connection, held elsewhere, an exchange waits for it and runs out of time
    without sending; once the connection is back, the next exchange goes over it."""
    async def main(url: str) -> tuple[Exception, Answer]:
        transport = WireTransport(max_connections=1, timeout_s=0.3)
        try:
            origin, _ = transport._target(url)
            held = await origin.acquire()
            with pytest.raises(seam.ReadTimeout) as waited:
                await transport.exchange(url, headers_for(url), BODY)
            origin.release(held, True)
            return waited.value, await transport.exchange(url, headers_for(url), BODY)
        finally:
            await transport.aclose()

    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        waited, answer = anyio.run(main, server.url)
        assert "within 0.3 s" in str(waited)
        assert answer.content == ANSWER
        assert (server.requests, server.connections) == (1, 1)  # the held connection, reused


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b", "caf\u00e9\u2603"])
def test_a_header_that_would_break_the_framing_is_never_sent(value: str) -> None:
    async def main(url: str) -> None:
        transport = WireTransport(max_connections=1, timeout_s=5)
        try:
            await transport.exchange(url, headers_for(url, authorization=value), BODY)
        finally:
            await transport.aclose()

    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        with pytest.raises(seam.LocalProtocolError):
            anyio.run(main, server.url)
        assert server.requests == 0


def test_only_http_urls_are_sent_to() -> None:
    [failed] = send_all("ftp://127.0.0.1/v1/completions", 1)
    assert isinstance(failed, seam.UnsupportedProtocol) and "only http:// and https://" in str(failed)


def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RawServer, Path]]:
    cert_file, key_file = certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}"), tls=context) as server:
        yield server, cert_file


def test_tls_is_verified_against_the_ca_bundle_given(tls_server: tuple[RawServer, Path]) -> None:
    server, cert_file = tls_server
    trusted = ssl.create_default_context(cafile=str(cert_file))
    answers = send_all(server.url, 3, ssl_context=trusted)
    assert [a.content for a in answers if isinstance(a, Answer)] == [ANSWER] * 3
    assert server.connections == 1


def test_a_certificate_no_ca_vouches_for_is_refused(tls_server: tuple[RawServer, Path]) -> None:
    server, _ = tls_server
    [failed] = send_all(server.url, 1, ssl_context=ssl.create_default_context())  # the system's CAs
    assert isinstance(failed, seam.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(failed)
    assert "SSL_CERT_FILE names the bundle to trust" in str(failed)
    assert server.requests == 0


def test_https_to_a_plain_http_server_says_so() -> None:
    """A server that speaks plain HTTP answers the TLS greeting with a 400 (as uvicorn's and
    aiohttp's do): the failure names the scheme, not only OpenSSL's WRONG_VERSION_NUMBER."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_in_plain_http() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    thread = threading.Thread(target=answer_in_plain_http, daemon=True)
    thread.start()
    try:
        [failed] = send_all(f"https://127.0.0.1:{listener.getsockname()[1]}/v1/completions", 1)
    finally:
        listener.close()
        thread.join(timeout=10)
    assert isinstance(failed, seam.ConnectError)
    assert "the server speaks plain HTTP there: check the scheme of api.base_url" in str(failed)


def test_a_job_trusts_the_ca_bundle_ssl_cert_file_names(tmp_path: Path, tls_server: tuple[RawServer, Path]) -> None:
    """SSL_CERT_FILE reaches the wire transport: with it, the job's rows are answered over
    TLS; without it, the first row's connection is refused and no row is sent."""
    server, cert_file = tls_server
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, endpoint="completions", api={"base_url": server.url.removesuffix("/completions")})

    refused = run_cli("run", str(spec), "--no-progress", env=cli_env(OPENAI_API_KEY=TEST_KEY))
    assert refused.code == 3 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert server.requests == 0

    trusted = run_cli("run", str(spec), "--no-progress",
                      env=cli_env(OPENAI_API_KEY=TEST_KEY, SSL_CERT_FILE=str(cert_file)))
    assert trusted.code == 0, trusted.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [(r["id"], r["status"], r["output_text"]) for r in rows] == [(f"r{i}", "ok", "ok") for i in range(5)]
    assert server.requests == 5


def test_a_job_opens_its_other_connections_while_its_first_request_is_out(tmp_path: Path) -> None:
    """The first row goes alone; the job's other connections open while its answer is
    awaited, so the rows after it find theirs ready and none opens after."""
    open_at_first_answer = []

    def answer(n: int) -> bytes:
        if n == 1:
            open_at_first_answer.append(server.wait_for_connections(8))
        return http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(40)])
    with RawServer(answer) as server:
        spec = write_spec(tmp_path, concurrency=8, api={"base_url": server.url.removesuffix("/completions")})
        result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert open_at_first_answer == [8]
    assert (server.requests, server.connections) == (40, 8)


def test_a_connection_opened_ahead_and_closed_unused_costs_no_attempt(tmp_path: Path) -> None:
    """A server may close a connection that waited idle (its keep-alive timeout) just as a
    request reaches it. One opened ahead waited idle too: its request goes again at once on a
    new connection, as a kept-alive one's does, not as a failed attempt with its backoff."""
    closed: list[int] = []

    def answer(n: int) -> bytes | None:
        if n == 1:
            server.wait_for_connections(4)  # the first's and the three opened ahead
        number, sent = server.current
        if 1 < number <= 4 and sent == 1:
            closed.append(number)
            return None  # closed as the request reached it
        return http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(20)])
    with RawServer(answer) as server:
        spec = write_spec(tmp_path, concurrency=4, api={"base_url": server.url.removesuffix("/completions")},
                          retry={"max_attempts": 6, "backoff_initial_s": 5, "backoff_max_s": 5})
        result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [(r["id"], r["status"], r["attempts"]) for r in rows] == [(f"r{i}", "ok", 1) for i in range(20)]
    # The rows after the first took the connections opened ahead (one may be closed unused to make room
    # for a new one): each request refused on one went again on a new connection
    assert closed and server.requests == 20 + len(closed) and server.connections == 4 + len(closed)


def test_a_wrong_key_stops_the_job_while_connections_open_ahead(tmp_path: Path) -> None:
    """The first answer refuses the key while the other 199 connections are opening: the
    job stops with that message, and what was opening is closed, not left behind."""
    refused = b'{"error": {"message": "invalid api key", "type": "invalid_request_error"}}'
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(400)])
    with RawServer(lambda n: http_answer(refused, f"content-length: {len(refused)}").replace(
            b"200 OK", b"401 Unauthorized")) as server:
        spec = write_spec(tmp_path, concurrency=200, api={"base_url": server.url.removesuffix("/completions")})
        result = run_cli_process("run", str(spec), "--no-progress",
                                 env=cli_env(OPENAI_API_KEY=TEST_KEY, PYTHONWARNINGS="always::ResourceWarning"))
    assert result.code == 3, result.stderr
    assert "401" in result.stderr and server.requests == 1
    for leftover in ("unclosed", "Task was destroyed", "Exception ignored", "Traceback"):
        assert leftover not in result.stderr


def test_closing_the_transport_closes_what_it_was_opening_ahead() -> None:
    """Closed just after its first answer, with connections still opening ahead: every one
    is closed by then, none left for the collector to find open."""
    async def main() -> Answer:
        transport = WireTransport(max_connections=100, timeout_s=30.0, open_ahead=100)
        try:
            return await transport.exchange(server.url, headers_for(server.url), BODY)
        finally:
            await transport.aclose()

    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            answer = anyio.run(main)
            gc.collect()
    assert answer.content == ANSWER
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_connections_opened_ahead_are_those_the_requests_left_can_use() -> None:
    """One a request that may go at once: `concurrency`, or fewer with fewer rows left (64
    embedding rows go in one request); none for requests a rate limit paces one by one."""
    spec = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "concurrency": 8,
            "api": {"base_url": "http://127.0.0.1:9/v1"}}

    def ahead(rows: int | None = None, **more: object) -> int:
        client = Client(parse_spec({**spec, **more}, environ={}), api_key=None, environ={}, rows=rows)
        return client._transport._open_ahead  # type: ignore[attr-defined]

    assert [ahead(), ahead(100), ahead(3), ahead(130, endpoint="embeddings"), ahead(2000, endpoint="embeddings")] \
        == [8, 8, 3, 3, 8]
    assert [ahead(rate_limit={"requests_per_minute": 600}), ahead(rate_limit={"tokens_per_minute": 60_000})] == [0, 0]


def test_the_transport_opens_as_many_ahead_as_it_is_told() -> None:
    async def main() -> tuple[Answer, int, int]:
        transport = WireTransport(max_connections=8, timeout_s=30.0, open_ahead=3)
        try:
            answer = await transport.exchange(server.url, headers_for(server.url), BODY)
            (origin,) = transport._origins.values()  # type: ignore[attr-defined]
            await origin.opening_ahead
            return answer, origin.opened, len(origin.idle)
        finally:
            await transport.aclose()

    with RawServer(lambda n: http_answer(ANSWER, f"content-length: {len(ANSWER)}")) as server:
        answer, opened, idle = anyio.run(main)
    assert (answer.content, opened, idle) == (ANSWER, 3, 3)  # the first's and two more, all idle now


def test_a_few_rows_open_fewer_connections_than_concurrency(tmp_path: Path) -> None:
    """`--limit 3` at `concurrency: 8` (trying a job on its first rows): three connections
    opened ahead (and, at most, one more for each row after the first that came before its
    connection was open), never eight."""
    def answer(n: int) -> bytes:
        if n == 1:
            server.wait_for_connections(3)
        return http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(40)])
    with RawServer(answer) as server:
        spec = write_spec(tmp_path, concurrency=8, api={"base_url": server.url.removesuffix("/completions")})
        result = run_cli("run", str(spec), "--no-progress", "--limit", "3")
    assert result.code == 0, result.stderr
    assert server.requests == 3 and 3 <= server.connections <= 5


def test_a_job_reuses_one_connection_for_each_request_in_flight(tmp_path: Path, server: FakeServer) -> None:
    """The CLI's default transport, end to end: every row answered once, over at most
    `concurrency` connections."""
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(200)])
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert sorted(r.body["prompt"] for r in server.requests) == sorted(f"p{i}" for i in range(200))
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [f"p{i}" for i in range(200)])
    assert server.connections <= 8


@pytest.mark.parametrize(("encoding", "body", "says"), [
    ("br", b"\x0b\x02\x80hello", "the answer is encoded as 'br', which batchrun never asked for"),
    ("gzip", b"\x1f\x8b\x08\x00not gzip at all", "the compressed answer cannot be inflated"),
])
def test_an_answer_that_cannot_be_decoded_fails_its_row_not_the_program(tmp_path: Path, encoding: str, body: bytes,
                                                                     says: str) -> None:
    """An encoding never asked for, or a broken one, is a failed attempt like any answer
    that cannot be read: retried, then the row fails (here the first, which stops the
    job), never an internal error."""
    write_jsonl(tmp_path / "input.jsonl", [{"id": "r0", "prompt": "p0"}])
    answer = http_answer(body, f"content-encoding: {encoding}", f"content-length: {len(body)}")
    with RawServer(lambda n: answer) as server:
        spec = write_spec(tmp_path, endpoint="completions", retry={"max_attempts": 2, "backoff_initial_s": 0.01},
                          api={"base_url": server.url.removesuffix("/completions")})
        result = run_cli("run", str(spec), "--no-progress", env=cli_env(OPENAI_API_KEY=TEST_KEY))
    assert result.code == 3, result.stderr
    assert f"the first row got no answer in 2 attempts ({says}" in result.stderr
    assert "internal error" not in result.stderr
    assert server.requests == 2


@pytest.mark.parametrize(("answer", "begun"), [
    # the head, then a chunk size that is no number, in one packet: the error comes with the head
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5z\r\nhello\r\n", 200),
    (b"HTTP/1.1 200 OK\r\ncontent-type: application/js", 200),  # the status line, then cut in the headers
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 9\r\n\r\nhello", 200),  # lengths at odds
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 40\r\n\r\nshort", 503),  # begun, not a 2xx
])
def test_an_answer_that_fails_once_its_status_line_came_carries_its_status(answer: bytes, begun: int) -> None:
    """A 2xx begun is paid for, for all anyone knows (the client counts it as a lost attempt),
    however its head or body then breaks."""
    def first_broken(n: int) -> bytes | None:
        return answer if n == 1 else http_answer(ANSWER, f"content-length: {len(ANSWER)}")

    with RawServer(first_broken, close_after=True) as server:
        failed, ok = send_all(server.url, 2)
    assert isinstance(failed, seam.TransportError) and failed.status == begun, repr(failed)
    assert isinstance(ok, Answer) and ok.content == ANSWER
