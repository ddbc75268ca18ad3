"""aiohttp's connection pool behind the transport seam: the transport for proxies.

`wire.WireTransport` carries every request it can, for a fraction of the CPU; aiohttp
speaks to an http:// or https:// proxy (absolute-form requests, CONNECT tunnels), which
the wire transport does not. Its errors are mapped onto the seam's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import aiohttp

from .transport import DEFAULT_MAX_ANSWER_BYTES, READ_BUFFER_BYTES, Answer, BoundedBody, ConnectError, \
    LocalProtocolError, ReadError, ReadTimeout, RemoteProtocolError, TransportError, UnsupportedProtocol, \
    answers_budget, decoded_headers, forget

__all__ = ["AiohttpTransport"]


class AiohttpTransport:
    """One aiohttp session with at most `max_connections` connections.

    `timeout_s` bounds each exchange as a whole (waiting for a connection, sending,
    and reading the entire body), not each read; running out raises ReadTimeout.
    """

    def __init__(self, *, max_connections: int, timeout_s: float | None = None,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES, proxy: str | None = None,
                 ssl_context: ssl.SSLContext | bool | None = None) -> None:
        self._proxy = proxy  # every request goes through it (see `_network.proxy_for`)
        self._ssl = ssl_context  # None: aiohttp's default; False: plain http only, no CAs to load
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_answer_bytes = max_answer_bytes
        self._memory = answers_budget(max_answer_bytes)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300,
                                         ssl=True if self._ssl is None else self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The bounded reader inflates, a step at a time (`transport.BoundedBody`).
            auto_decompress=False,
            # What aiohttp buffers for an answer nobody reads yet (one waiting for the
            # memory budget): measured here, about 160 KB a connection with this, 700 KB
            # with aiohttp 3.14's default.
            read_bufsize=READ_BUFFER_BYTES,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        return self._session

    async def exchange(self, url: str, headers: Sequence[tuple[str, str]], payload: bytes) -> Answer:
        session = self._session or self._open()
        try:  # the answer is read in a frame of its own, which the error keeps none of
            return await self._exchange(session, url, headers, payload)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _seams_error(exc) from forget(exc)
        except ValueError as exc:  # a header aiohttp will not send
            raise LocalProtocolError(str(exc)) from forget(exc)
        except BaseException as exc:
            raise forget(exc)

    async def _exchange(self, session: aiohttp.ClientSession, url: str, headers: Sequence[tuple[str, str]],
                        payload: bytes) -> Answer:
        async with session.request("POST", url, data=payload, headers=headers, allow_redirects=False,
                                   proxy=self._proxy) as response:
            body = BoundedBody(response.headers.get("content-encoding"), self._max_answer_bytes, self._memory)
            try:
                content = await body.read(response.content.readany)
            except aiohttp.ClientError as exc:  # the answer was begun
                error = _seams_error(exc)
                error.status = response.status
                raise error from forget(exc)
            except TransportError as exc:
                exc.status = response.status
                raise
        items = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]
        return Answer(response.status, decoded_headers(items, body.encoded), content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _seams_error(exc: Exception) -> TransportError:
    """The seam's error for an aiohttp one."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(str(exc))
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return ReadTimeout(str(exc) or "timed out")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return RemoteProtocolError(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.InvalidURL):
        return UnsupportedProtocol(str(exc))
    return ReadError(str(exc) or type(exc).__name__)
