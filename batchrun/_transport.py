"""An httpx transport over aiohttp's connection pool, and the bounds every answer keeps.

httpx stays the client API (requests, responses, MockTransport in tests), but its
default pool slows as concurrency grows: measured on these 2-core machines at 256
requests in flight it managed about a seventh of what aiohttp's pool does (see
tests/bench). This transport hands each request to one aiohttp session and maps
aiohttp's errors onto httpx's, so the client maps errors in one place as before.

Whatever the server sends, an answer is read within `timeout_s` and holds at most
`max_answer_bytes` once decoded (a gzip bomb is stopped as it inflates, an endless
stream at the limit), or the attempt fails with AnswerTooLarge. All the answers
being read share one budget (`_Memory`), so what they hold together stays bounded
at any concurrency: a reader over budget waits before reading more, and TCP holds
its server back.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Iterable

import aiohttp
import anyio
import httpx

__all__ = ["AiohttpTransport", "AnswerTooLarge", "BoundedTransport", "DEFAULT_MAX_ANSWER_BYTES"]

DEFAULT_MAX_ANSWER_BYTES = 32 * 2**20
ANSWERS_BUDGET_BYTES = 128 * 2**20  # what all answers being read hold together, give or take one
READ_BUFFER_BYTES = 2**16
INFLATE_STEP = 2**20


class AnswerTooLarge(httpx.TransportError):
    """The answer grew past the limit; the rest of it was not read."""


class _Body:
    """One answer's body as it arrives: decoded, counted, and refused past `limit` bytes.

    batchrun asks for no compression, but a server may send it anyway; gzip and
    deflate are inflated here, a chunk at a time, never past the limit.
    """

    def __init__(self, encoding: str | None, limit: int, request: httpx.Request) -> None:
        self.limit = limit
        self.request = request
        self.encoded = (encoding or "identity").strip().lower() not in ("", "identity")
        self._inflate = _decompressor(encoding, request) if self.encoded else None
        self._parts: list[bytes] = []
        self.received = 0  # bytes off the wire
        self.size = 0  # bytes decoded

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self._inflate is None:
            self._add(chunk)
            return
        if self.received > self.limit:
            raise self._too_large()
        while chunk:  # a step at a time: a kilobyte of gzip may hold a gigabyte of zeros
            try:
                self._add(self._inflate.decompress(chunk, INFLATE_STEP))
            except zlib.error as exc:
                raise httpx.DecodingError(f"the compressed answer cannot be inflated: {exc}",
                                          request=self.request) from None
            chunk = self._inflate.unconsumed_tail

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise self._too_large()
        self._parts.append(data)

    def content(self) -> bytes:
        return b"".join(self._parts)

    def _too_large(self) -> AnswerTooLarge:
        self._parts.clear()
        return AnswerTooLarge(f"answer too large: more than {self.limit:,} bytes (api.max_answer_mb)",
                              request=self.request)


class _Memory:
    """The bytes held by the answers being read, against one budget.

    A reader charges what it holds after each chunk; past the budget it waits for
    others to finish, unless it holds the most, so one reader always goes on (to its
    end, or to the per-answer limit) and none waits forever. A compressed answer
    charges the whole per-answer limit before it reads anything: one small chunk of
    gzip may inflate to the limit. Held at most: the budget plus one answer.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._held_by: dict[int, int] = {}
        self._released = asyncio.Event()

    async def hold(self, reader: int, total: int) -> None:
        """Let `reader` hold `total` bytes, once the budget allows."""
        grow = total - self._held_by.get(reader, 0)
        if grow <= 0:
            return
        while self.held + grow > self.budget and self._held_by.get(reader, 0) < max(self._held_by.values(),
                                                                                   default=0):
            await self._released.wait()
        self._held_by[reader] = total
        self.held += grow

    def release(self, reader: int) -> None:
        self.held -= self._held_by.pop(reader, 0)
        self._released.set()
        self._released = asyncio.Event()


def _decompressor(encoding: str | None, request: httpx.Request) -> zlib._Decompress:
    name = (encoding or "").strip().lower()
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as the standard says
    raise httpx.DecodingError(f"the answer is encoded as {encoding!r}, which batchrun never asked for",
                              request=request)


def _response(status: int, headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]],
              body: _Body, request: httpx.Request) -> httpx.Response:
    """The answer as read; once inflated, its length and encoding headers describe what is
    no longer there, and go."""
    if body.encoded:
        headers = [(k, v) for k, v in headers
                   if (k.lower() if isinstance(k, str) else k.lower().decode("latin-1")) not in _DECODED]
    response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body.content()), request=request)
    response.read()  # in memory already: the plain read costs half of `aread`'s async iteration
    return response


_DECODED = frozenset({"content-encoding", "content-length"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session with at most `max_connections` connections.

    `timeout_s` bounds each exchange as a whole (waiting for a connection, sending,
    and reading the entire body), not each read; running out raises httpx.ReadTimeout.
    """

    def __init__(self, *, max_connections: int, timeout_s: float | None = None,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, proxy: str | None = None,
                 ssl_context: ssl.SSLContext | bool | None = None) -> None:
        self._proxy = proxy  # every request goes through it (see `_network.proxy_for`)
        self._ssl = ssl_context  # None: aiohttp's default; False: plain http only, no CAs to load
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_answer_bytes = max_answer_bytes
        self._memory: _Memory | None = None
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300,
                                         ssl=True if self._ssl is None else self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # httpx decodes content-encoding itself; decoding twice would corrupt bodies.
            auto_decompress=False,
            # What aiohttp buffers for an answer nobody reads yet (one waiting for the
            # memory budget): measured here, about 160 KB a connection with this, 700 KB
            # with aiohttp 3.14's default.
            read_bufsize=READ_BUFFER_BYTES,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self._memory = _Memory(ANSWERS_BUDGET_BYTES)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request and read the whole answer before returning it.

        Reading here rather than lazily costs nothing a batch job needs (answers
        are small, and the caller bounds each attempt as a whole) and saves httpx's
        per-chunk stream machinery on every request.
        """
        session = self._session or self._open()
        try:
            async with session.request(
                request.method,
                str(request.url),
                data=request.read(),
                headers=request.headers.multi_items(),
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                body = _Body(response.headers.get("content-encoding"), self._max_answer_bytes, request)
                await self._read(response, body)
                status, headers = response.status, response.raw_headers
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _httpx_error(exc, request) from exc
        return _response(status, headers, body, request)

    async def _read(self, response: aiohttp.ClientResponse, body: _Body) -> None:
        """Read the body into `body`, within the budget all answers share."""
        memory, reader = self._memory, id(body)
        assert memory is not None
        try:
            if body.encoded:
                await memory.hold(reader, body.limit)
            while chunk := await response.content.readany():
                body.feed(chunk)
                await memory.hold(reader, body.size)
        finally:
            memory.release(reader)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class BoundedTransport(httpx.AsyncBaseTransport):
    """Any other transport (MockTransport, mock://) held to AiohttpTransport's contract:
    each answer read in full within `timeout_s`, or httpx.ReadTimeout."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout_s: float,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self._transport = transport
        self._timeout_s = timeout_s
        self._max_answer_bytes = max_answer_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            with anyio.fail_after(self._timeout_s):
                response = await self._transport.handle_async_request(request)
                try:
                    if response.is_stream_consumed:  # MockTransport reads (and decodes) answers itself
                        body = _Body(None, self._max_answer_bytes, request)
                        body.feed(response.content)
                        body.encoded = "content-encoding" in response.headers  # decoded by httpx
                    else:
                        body = _Body(response.headers.get("content-encoding"), self._max_answer_bytes, request)
                        async for chunk in response.aiter_raw():
                            body.feed(chunk)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no complete answer within {self._timeout_s:g} s", request=request) from exc
        return _response(response.status_code, response.headers.raw, body, request)  # bytes: as they came

    async def aclose(self) -> None:
        await self._transport.aclose()


def _httpx_error(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for an aiohttp one."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(str(exc) or "timed out", request=request)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(str(exc), request=request)
    return httpx.ReadError(str(exc) or type(exc).__name__, request=request)
