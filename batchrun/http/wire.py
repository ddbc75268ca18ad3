"""HTTP/1.1 straight on asyncio's protocols, parsed by httptools: the default transport.

A batch job sends one kind of request, a POST with a JSON body, to one origin, over
connections it keeps alive, and reads each answer whole. aiohttp's client spends about
170 µs of Python on each such request (its request and response objects, streams,
tracing, cookies); this transport writes the request's bytes to a kept-alive
connection and hands what arrives to llhttp (Node's parser, through httptools), which
calls back with the status, the headers and the body. Measured on these 2-core
machines, a bare loop over it costs 59 µs of CPU a request where the same loop over
aiohttp costs 228 (tests/bench/stages.py: see the README's performance section).

It keeps every promise the aiohttp transport keeps: `timeout_s` bounds each exchange as
a whole (waiting for a connection, connecting, sending, reading the whole body); the
body is read within `max_answer_bytes` and the budget all answers share (`transport.BoundedBody`),
the connection paused, so TCP holds the server back, while an answer waits for it; TLS
verifies against the user's CA bundle. An error is raised as the seam's (`transport`) for
it, so the client maps errors in one place. A connection is reused only after an answer read
whole that the server let keep it alive; any failure closes it. Proxies are aiohttp's
(see `client._transport`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

import httptools

from .transport import DECODED_HEADERS, DEFAULT_MAX_ANSWER_BYTES, READ_BUFFER_BYTES, Answer, BoundedBody, \
    ConnectError, LocalProtocolError, ReadTimeout, RemoteProtocolError, TransportError, UnsupportedProtocol, \
    answers_budget, forget

__all__ = ["WireTransport"]

MAX_HEAD_BYTES = 64 * 2**10  # an answer's status line and headers; aiohttp's limits are 8 KB a line
DNS_TTL_S = 300.0  # a host's addresses are looked up again after this long, as aiohttp does
_UNCANCEL = sys.version_info >= (3, 11)  # Task.uncancel: a timeout's own cancel is taken back


class _Connection(asyncio.Protocol):
    """One connection to the origin, one exchange at a time: what the parser reads is
    kept here, at most READ_BUFFER_BYTES of body before reading pauses, until the
    exchange takes it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.begun = 0  # the status line's code of the current answer, once it came (its head may not)
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.buffered = 0
        self.head = False  # the headers of the current answer are in
        self.complete = False  # the whole answer is in
        self.to_eof = False  # the body ends when the connection does (no length, not chunked)
        self.keep_alive = False  # the server lets the connection carry another request
        self.error: Exception | None = None
        self.busy = False  # an exchange is using it
        self.sent = 0  # requests sent over it
        self.ahead = False  # opened before a request needed it, so it waited idle before its first
        self.received = False  # a byte of the current answer came
        self.head_bytes = 0  # of the current answer, read before its headers ended or among its trailers
        self.trailers = False  # a chunk began and no byte of it came: the last one's, whose trailers follow
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def stale(self) -> bool:
        """Closed by the server after waiting idle (having carried other answers, or opened
        ahead), before a byte of this one."""
        return (self.sent > 1 or self.ahead) and not self.received and self.error is not None

    @property
    def usable(self) -> bool:
        return self.error is None and self.transport is not None and not self.transport.is_closing()

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's: asyncio's, or uvloop's

    def data_received(self, data: bytes) -> None:
        self.received = True
        if not self.busy:  # nothing was asked: a server talking out of turn is not to be trusted
            self._fail(RemoteProtocolError("the server sent data no request asked for"))
            return
        try:
            trailing = self.trailers
            self.parser.feed_data(data)
            # httptools keeps a header's parts until the header ends: endless headers, or
            # trailers after a chunked body, would grow without bound
            if not self.head or trailing and self.trailers:
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    raise RemoteProtocolError(f"the answer's headers run past {MAX_HEAD_BYTES:,} bytes")
        except RemoteProtocolError as exc:
            self._fail(exc)
        except httptools.HttpParserUpgrade:
            self._fail(RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            ours = exc.__context__  # raised by a callback below: it says what was wrong
            self._fail(ours if isinstance(ours, TransportError) else
                       RemoteProtocolError(f"the answer is not valid HTTP/1.1: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed connection has nothing more to give

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head and self.to_eof and not self.complete and exc is None:
            self.complete = True  # a body that ends with the connection ended
        elif not self.complete and self.error is None:
            detail = f": {exc}" if exc else ""
            when = f"in the middle of its HTTP {self.begun} answer" if self.begun >= 200 else "before it answered"
            self.error = RemoteProtocolError(f"the server closed the connection {when}{detail}")
        if self.error is None:
            self.error = RemoteProtocolError("the connection is closed")
        self._wake()

    # the parser's side

    def on_status(self, reason: bytes) -> None:
        self.begun = self.parser.get_status_code()  # (a 1xx's, until the answer's own comes)

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if self.complete:  # a second answer to one request: what else it sends cannot be trusted
            raise RemoteProtocolError("the server sent more than one answer")
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational: the answer follows
            self.headers = {}
            return
        self.status = status
        self.head = True
        self.to_eof = ("content-length" not in self.headers and "chunked" not in
                       self.headers.get("transfer-encoding", "").lower() and status not in (204, 304))
        self._wake()

    def on_chunk_header(self) -> None:
        self.trailers = True

    def on_chunk_complete(self) -> None:
        self.trailers = False

    def on_body(self, body: bytes) -> None:
        if not self.head:
            return  # an informational answer's
        self.trailers = False
        self.parts.append(body)
        self.buffered += len(body)
        if self.buffered > READ_BUFFER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # TCP holds the server back until the body is taken
            self._wake()

    def on_message_complete(self) -> None:
        if self.head:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is over
            self._wake()

    # the exchange's side

    def start(self, data: bytes) -> None:
        """Send one request; what came of the last one is gone."""
        assert self.transport is not None
        self.status, self.begun, self.headers = 0, 0, {}
        self.head = self.complete = self.to_eof = self.keep_alive = False
        self.busy = True
        self.sent += 1
        self.received = False
        self.head_bytes, self.trailers = 0, False
        self.transport.write(data)

    async def wait_head(self) -> None:
        while not self.head:
            await self._wait()

    async def next_chunk(self) -> bytes:
        """The body as it arrives, b"" at its end."""
        while not self.parts:
            if self.complete:
                return b""
            await self._wait()
        chunk = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts, self.buffered = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def finish(self) -> bool:
        """The exchange is over: whether the connection may carry another."""
        self.busy = False
        return self.complete and self.keep_alive and not self.parts and self.usable

    def close(self) -> None:
        self.busy = False
        self.parts, self.buffered = [], 0
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None and not self.complete:
            raise self.error

    def _fail(self, error: Exception) -> None:
        self.error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Origin:
    """The connections to one scheme://host:port: at most `limit`, the idle ones reused
    last-in first-out (the warmest), the rest opened as needed; `open_ahead` of them
    (at most `limit`) opened once the first is."""

    def __init__(self, scheme: str, host: str, port: int, limit: int, ssl_context: ssl.SSLContext | None,
                 open_ahead: int = 0, timeout_s: float = 60.0) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.ssl = ssl_context if scheme == "https" else None
        self.open_ahead = min(open_ahead, limit)
        self.timeout_s = timeout_s  # to open those ahead: a request's own opening is within its exchange's
        self.opening_ahead: asyncio.Task[None] | None = None
        self.idle: list[_Connection] = []
        self.opened = 0  # connections open or opening
        self._lookup: asyncio.Future[list] | None = None  # of the host's addresses
        self._looked_up = 0.0
        self._turn = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def acquire(self, new: bool = False) -> _Connection:
        """An idle connection, else a new one once fewer than `limit` are open. `new`: a new
        one in any case (an idle one closes to make room if need be)."""
        while self.idle and not (new and self.opened < self.limit):
            connection = self.idle.pop()
            if connection.usable and not new:
                return connection
            connection.close()
            self.opened -= 1
        while self.opened >= self.limit:
            handed = await self._wait_turn()
            if handed is not None:
                return handed
        self.opened += 1
        try:
            connection = await self._connect()
        except BaseException:
            self.opened -= 1
            self._hand_over(None)
            raise
        if self.open_ahead > 1:  # the origin takes connections: the others open while this one's request is out
            self.opening_ahead = asyncio.get_running_loop().create_task(self._open_the_rest(self.open_ahead))
            self.open_ahead = 0
        return connection

    def release(self, connection: _Connection, reuse: bool) -> None:
        if reuse:
            self._hand_over(connection)
        else:
            connection.close()
            self.opened -= 1
            self._hand_over(None)

    def close(self) -> None:
        if self.opening_ahead is not None:
            self.opening_ahead.cancel()  # a connection it was opening closes as it is cancelled
        for connection in self.idle:
            connection.close()
        self.idle.clear()

    async def _open_the_rest(self, total: int) -> None:
        """Up to `total` connections, opened at once and kept idle for the requests to come;
        those not open within `timeout_s` are given up, as at `close`."""
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(self.timeout_s, task.cancel)
        try:
            await asyncio.gather(*(self._open_one_ahead() for _ in range(total - self.opened)))
        finally:
            timer.cancel()

    async def _open_one_ahead(self) -> None:
        if self.opened >= self.limit:  # the requests opened their own meanwhile
            return
        self.opened += 1
        try:
            connection = await self._connect()
        except BaseException as exc:
            self.opened -= 1
            self._hand_over(None)
            if isinstance(exc, Exception):  # refused, TLS failed: a request that needs one says so itself
                return
            raise
        connection.ahead = True
        self._hand_over(connection)

    async def _wait_turn(self) -> _Connection | None:
        """A connection released to this waiter, or None: one closed, so a new one may open."""
        turn: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._hand_over(turn.result())  # handed over as this waiter gave up: to the next one
            raise

    def _hand_over(self, connection: _Connection | None) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(connection)
                return
        if connection is not None:
            self.idle.append(connection)

    async def _connect(self) -> _Connection:
        """A new connection, to the host's addresses in turn: the first that takes it."""
        loop = asyncio.get_running_loop()
        addresses = await self._addresses()
        self._turn += 1
        failure: Exception | None = None
        for i in range(len(addresses)):  # each new connection starts at the next address
            family, address = addresses[(self._turn + i) % len(addresses)]
            try:
                _, connection = await loop.create_connection(
                    _Connection, address[0], address[1], family=family, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
                return connection
            except ssl.SSLError as exc:
                raise ConnectError(f"TLS with {self.host}:{self.port} failed: {exc}{_tls_hint(exc)}") from None
            except OSError as exc:
                failure = exc
        raise ConnectError(f"cannot connect to {self.host}:{self.port}: {failure}") from None

    async def _addresses(self) -> list[tuple[int, tuple]]:
        """The host's addresses, looked up once for every connection opening within
        DNS_TTL_S: hundreds of connections opening at once make one lookup, not hundreds."""
        loop = asyncio.get_running_loop()
        if self._lookup is None or loop.time() - self._looked_up > DNS_TTL_S or self._lookup.done() and (
                self._lookup.cancelled() or self._lookup.exception() is not None):
            self._looked_up = loop.time()
            self._lookup = asyncio.ensure_future(loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM))
        try:
            found = await asyncio.shield(self._lookup)
        except OSError as exc:
            raise ConnectError(f"cannot find {self.host}: {exc}") from None
        return [(family, address) for family, _, _, _, address in found]


class WireTransport:
    """POST requests over HTTP/1.1 and kept-alive connections, at most `max_connections`
    to each origin. `ssl_context` verifies https:// origins (None: the system's CAs).

    `open_ahead`: once the first connection to an origin is open, others open beside it
    until that many are, idle until requests take them. A job's first request goes
    alone (`engine.pool`), and `concurrency` requests follow its answer at once: at 400
    in flight, opening their connections then kept the server waiting 0.09-0.12 s more
    than the first answer's own latency; opened while it is awaited, they are ready
    when it comes.
    """

    def __init__(self, *, max_connections: int, timeout_s: float, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
                 ssl_context: ssl.SSLContext | None = None, open_ahead: int = 0) -> None:
        self._max_connections = max_connections
        self._open_ahead = open_ahead
        self._timeout_s = timeout_s
        self._max_answer_bytes = max_answer_bytes
        self._ssl = ssl_context
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._targets: dict[str, tuple[_Origin, bytes]] = {}
        self._memory = answers_budget(max_answer_bytes)

    async def exchange(self, url: str, headers: Sequence[tuple[str, str]], payload: bytes) -> Answer:
        """POST `payload` to `url` with `headers` (the host's among them) and read the whole
        answer, within `timeout_s` from now; raises the TransportError for what went wrong."""
        origin, start_line = self._targets.get(url) or self._target(url)
        head = _head(start_line, headers)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []
        timer = loop.call_at(loop.time() + self._timeout_s, _expire, task, expired)
        try:
            return await self._exchange(origin, head + payload)
        except asyncio.CancelledError as exc:
            if not expired or (_UNCANCEL and task.uncancel() > 0):  # not (only) the timeout's
                raise
            raise ReadTimeout(f"no complete answer within {self._timeout_s:g} s") from forget(exc)
        except BaseException as exc:
            raise forget(exc)
        finally:
            timer.cancel()

    async def _exchange(self, origin: _Origin, data: bytes) -> Answer:
        connection = await origin.acquire()
        try:
            return await self._over(origin, connection, data)
        except RemoteProtocolError:
            if not connection.stale:
                raise
        # The server closed a kept-alive connection as the request reached it (its idle
        # timeout met the request in flight), before a byte of answer: measured against
        # uvicorn's 5 s timeout, about one request in a hundred sent at that moment. It
        # goes again at once, on a new connection, rather than as a failed attempt.
        return await self._over(origin, await origin.acquire(new=True), data)

    async def _over(self, origin: _Origin, connection: _Connection, data: bytes) -> Answer:
        """One exchange over `connection`, which goes back to `origin` after it."""
        reuse = False
        try:
            try:
                connection.start(data)
                await connection.wait_head()
                body = BoundedBody(connection.headers.get("content-encoding"), self._max_answer_bytes, self._memory)
                content = await body.read(connection.next_chunk)
            except TransportError as exc:  # an answer begun (its status line came) was paid for, for all anyone knows
                exc.status = connection.begun if connection.begun >= 200 else None
                raise
            headers = connection.headers
            if body.encoded:  # inflated: its length and encoding describe what is no longer there
                headers = {k: v for k, v in headers.items() if k not in DECODED_HEADERS}
            answer = Answer(connection.status, headers, content)
            reuse = connection.finish()
            return answer
        finally:
            origin.release(connection, reuse)

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise UnsupportedProtocol(f"cannot send to {url!r}: only http:// and https:// URLs")
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        if key not in self._origins:
            context = self._ssl if self._ssl is not None or scheme == "http" else ssl.create_default_context()
            self._origins[key] = _Origin(scheme, parts.hostname, port, self._max_connections, context,
                                         self._open_ahead, self._timeout_s)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._targets[url] = found = (self._origins[key], f"POST {path} HTTP/1.1\r\n".encode("ascii"))
        return found

    async def aclose(self) -> None:
        for origin in self._origins.values():
            origin.close()
        opening = [task for origin in self._origins.values() if (task := origin.opening_ahead) is not None]
        self._origins.clear()
        self._targets.clear()
        if opening:  # cancelled above: let them close what they were opening
            await asyncio.wait(opening)


def _head(start_line: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """The request's start line and headers, as sent; a header that would break the framing
    (a line break in a value, a name or value outside Latin-1) is refused, never sent."""
    text = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if text.count("\n") != len(headers) or text.count("\r") != len(headers) or "\0" in text:
        raise LocalProtocolError("a header holds a line break or a NUL")
    try:
        return start_line + text.encode("latin-1") + b"\r\n"
    except UnicodeEncodeError:
        raise LocalProtocolError("a header holds a character outside Latin-1") from None


def _expire(task: asyncio.Task, expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def _tls_hint(exc: ssl.SSLError) -> str:
    """What a TLS failure that no retry mends most likely means, and where to mend it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return " (no CA in the bundle vouches for the server's certificate: SSL_CERT_FILE names the bundle to trust)"
    if exc.reason == "WRONG_VERSION_NUMBER":  # the server's plain-HTTP answer read as a TLS record
        return " (the server speaks plain HTTP there: check the scheme of api.base_url)"
    return ""
