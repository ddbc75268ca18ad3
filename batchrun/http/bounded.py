"""Any httpx transport behind the transport seam (`transport`): MockTransport in tests,
`mock://`, a library caller's own. The one module of the live path that imports httpx,
and only when such a transport is given: its errors become the seam's, by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import anyio
import httpx

from . import transport as seam
from .transport import DEFAULT_MAX_ANSWER_BYTES, Answer, BoundedBody, answers_budget, decoded_headers, forget

__all__ = ["BoundedTransport"]

# httpx's errors as the seam's, the most specific first (a ReadTimeout is a TimeoutException)
_ERRORS = ((httpx.TimeoutException, seam.ReadTimeout), (httpx.ConnectError, seam.ConnectError),
           (httpx.LocalProtocolError, seam.LocalProtocolError), (httpx.UnsupportedProtocol, seam.UnsupportedProtocol),
           (httpx.DecodingError, seam.DecodingError), (httpx.RemoteProtocolError, seam.RemoteProtocolError))


class BoundedTransport:
    """An httpx transport held to the seam's contract: each answer read in full within
    `timeout_s` and the budget all answers share, or ReadTimeout; its errors the seam's."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout_s: float,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES) -> None:
        self._transport = transport
        self._timeout_s = timeout_s
        self._max_answer_bytes = max_answer_bytes
        self._memory = answers_budget(max_answer_bytes)

    async def exchange(self, url: str, headers: Sequence[tuple[str, str]], payload: bytes) -> Answer:
        try:
            request = httpx.Request("POST", url, headers=headers, content=payload)
            with anyio.fail_after(self._timeout_s):
                return await self._exchange(request)
        except TimeoutError as exc:
            raise seam.ReadTimeout(f"no complete answer within {self._timeout_s:g} s") from forget(exc)
        except httpx.RequestError as exc:  # its TransportErrors, and a DecodingError (which is none)
            raise _seams(exc) from forget(exc)
        except BaseException as exc:
            raise forget(exc)

    async def _exchange(self, request: httpx.Request) -> Answer:
        response = await self._transport.handle_async_request(request)
        try:
            consumed = response.is_stream_consumed  # MockTransport reads (and decodes) answers itself
            body = BoundedBody(None if consumed else response.headers.get("content-encoding"), self._max_answer_bytes,
                               self._memory)
            try:
                content = await body.read(partial(anext, response.aiter_bytes() if consumed else response.aiter_raw(),
                                                  b""))
            except httpx.RequestError as exc:  # the answer was begun
                error = _seams(exc)
                error.status = response.status_code
                raise error from forget(exc)
            except seam.TransportError as exc:
                exc.status = response.status_code
                raise
        finally:
            await response.aclose()
        encoded = "content-encoding" in response.headers if consumed else body.encoded  # decoded by httpx
        return Answer(response.status_code, decoded_headers(response.headers.multi_items(), encoded), content)

    async def aclose(self) -> None:
        await self._transport.aclose()


def _seams(exc: httpx.RequestError) -> seam.TransportError:
    """The seam's error for httpx's `exc`: the same name, the same message."""
    for theirs, ours in _ERRORS:
        if isinstance(exc, theirs):
            return ours(str(exc))
    return seam.TransportError(str(exc), kind=type(exc).__name__)  # a ReadError, a ProxyError, ...
