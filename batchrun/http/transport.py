"""The transport seam: a request's bytes out, its whole answer in, within the bounds every answer keeps.

    Transport.exchange(url, headers, payload) ──▶ Answer(status, headers, content)

Three transports stand behind it: `wire.WireTransport` (HTTP/1.1 on asyncio's protocols,
the default), `aio.AiohttpTransport` (aiohttp's pool, for proxies) and
`bounded.BoundedTransport`, which holds any httpx transport (MockTransport in tests,
`mock://`) to the same contract and alone imports httpx. The client above builds no
request or response objects: an answer is three values, and what goes wrong is raised as
one of the seam's errors below (named as httpx names them), so the client maps errors in
one place.

Whatever the server sends, an answer is read within `timeout_s` and holds at most
`max_answer_bytes` once decoded (a gzip bomb is stopped as it inflates, an endless
stream at the limit), or the attempt fails with AnswerTooLarge. All the answers
being read share one budget (`_Memory`), reserved before the bytes are kept or
inflated, so what they hold together stays within it at any concurrency: a reader
over budget waits before reading more, and TCP holds its server back. An answer
refused leaves nothing of itself in its error: a retry waiting keeps that error.
"""

from __future__ import annotations

import asyncio
import re
import traceback
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Answer, Transport and the errors: the seam; BoundedBody, answers_budget, decoded_headers, forget:
# what every transport behind it reads an answer with
__all__ = ["Answer", "AnswerTooLarge", "BoundedBody", "ConnectError", "DECODED_HEADERS", "DEFAULT_MAX_ANSWER_BYTES",
           "DecodingError", "LocalProtocolError", "READ_BUFFER_BYTES", "ReadError", "ReadTimeout",
           "RemoteProtocolError", "Transport", "TransportError", "UnsupportedProtocol", "answers_budget",
           "decoded_headers", "forget"]

DEFAULT_MAX_ANSWER_BYTES = 32 * 2**20
ANSWERS_BUDGET_BYTES = 128 * 2**20  # what all answers being read hold together, at most
READ_BUFFER_BYTES = 2**16
INFLATE_STEP = 2**20  # the most one inflate call makes, whatever the compressed chunk holds


class TransportError(Exception):
    """An attempt that got no answer: what a transport raises, and the client maps.
    `kind`: what went wrong, as messages name it (the class's name, unless told);
    `status`: the answer's, when the failure came once its status line had (the answer
    was begun: a 2xx then was paid for, for all anyone knows), else None."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or type(self).__name__
        self.status: int | None = None


class ConnectError(TransportError):
    """No connection: the host not found, refused, unreachable, or TLS failed."""


class ReadTimeout(TransportError):
    """No complete answer within `timeout_s`."""


class ReadError(TransportError):
    """The connection failed while the answer was read."""


class RemoteProtocolError(TransportError):
    """The server broke HTTP: a bad answer, a closed connection, bytes nobody asked for."""


class LocalProtocolError(TransportError):
    """The request itself cannot be sent (a header that would break the framing)."""


class UnsupportedProtocol(TransportError):
    """A URL that is not http:// or https://."""


class DecodingError(TransportError):
    """An encoded answer that cannot be decoded."""


class AnswerTooLarge(TransportError):
    """The answer grew past the limit; the rest of it was not read."""


@dataclass(slots=True)
class Answer:
    """One answer, read whole: its headers by lower-case name (a repeated header's values
    joined by ", "), its body decoded (the encoding headers gone with the encoding)."""

    status: int
    headers: dict[str, str]
    content: bytes

    def lines(self) -> list[str]:
        """The body as text lines, split where an event stream's lines end: CR, LF or CRLF
        (not at the other breaks str.splitlines knows, which JSON may hold unescaped)."""
        lines = _LINE_END.split(self.content.decode("utf-8", errors="replace"))
        if lines[-1] == "":
            lines.pop()  # what followed the last line's end
        return lines


_LINE_END = re.compile(r"\r\n|\r|\n")


class Transport(Protocol):
    """What the client sends through: one POST, its whole answer."""

    async def exchange(self, url: str, headers: Sequence[tuple[str, str]], payload: bytes) -> Answer:
        """POST `payload` to `url` with `headers` and read the whole answer within the bounds;
        raises the TransportError for what went wrong."""

    async def aclose(self) -> None:
        """Close every connection."""


class _Memory:
    """The bytes held by the answers being read, against one budget never passed.

    A reader reserves bytes before it holds them. Readers share the budget but
    `one_answer` bytes; past their share, one reader at a time (the leader) may use
    that last part, so one reader always goes on (to its end, or to the per-answer
    limit) while the others wait for it, and none waits forever.
    """

    def __init__(self, budget: int, one_answer: int) -> None:
        self.budget = budget
        self.shared = budget - one_answer  # the leader never holds more than one_answer
        self.held = 0
        self.peak = 0  # the most held at once
        self._held_by: dict[object, int] = {}
        self._leader: object | None = None
        self._released = asyncio.Event()

    async def hold(self, reader: object, total: int) -> None:
        """Let `reader` hold `total` bytes, once the budget allows; less than it holds
        gives the rest back at once."""
        while (grow := total - self._held_by.get(reader, 0)) > 0 and reader is not self._leader:
            led = self._held_by.get(self._leader, 0)
            if self.held - led + grow <= self.shared:
                break
            if self._leader is None:
                self._leader = reader
                break
            await self._released.wait()
        self._held_by[reader] = total
        self.held += grow
        self.peak = max(self.peak, self.held)
        if grow < 0:
            self._wake()

    def release(self, reader: object) -> None:
        self.held -= self._held_by.pop(reader, 0)
        if reader is self._leader:
            self._leader = None
        self._wake()

    def _wake(self) -> None:
        self._released.set()
        self._released = asyncio.Event()


def answers_budget(max_answer_bytes: int) -> _Memory:
    """The budget the answers being read share: ANSWERS_BUDGET_BYTES, or more where
    answers may be so large that fewer than two fit beside the leader's."""
    one_answer = 2 * max_answer_bytes  # an answer at its limit, and the copy that joins its parts
    return _Memory(max(ANSWERS_BUDGET_BYTES, 2 * one_answer), one_answer)


class BoundedBody:
    """One answer's body as it arrives: decoded, counted, and refused past `limit` bytes,
    every byte reserved from `memory` before it is kept or inflated.

    batchrun asks for no compression, but a server may send it anyway; gzip and
    deflate are inflated here, a step at a time, never past the limit.
    """

    def __init__(self, encoding: str | None, limit: int, memory: _Memory) -> None:
        self.limit = limit
        self.encoded = (encoding or "identity").strip().lower() not in ("", "identity")
        self._inflate = _decompressor(encoding) if self.encoded else None
        self._memory = memory
        self._parts: list[bytes] = []
        self.received = 0  # bytes off the wire
        self.size = 0  # bytes decoded

    async def read(self, next_chunk: Callable[[], Awaitable[bytes]]) -> bytes:
        """The whole body, read with `next_chunk` (b"" at the end) within the budget; what
        it holds goes back to the budget when it is refused, or handed over: the caller
        parses it before it awaits anything."""
        try:
            while chunk := await next_chunk():
                self.received += len(chunk)
                await (self._keep(chunk) if self._inflate is None else self._inflated(chunk, self._inflate))
            if len(self._parts) > 1:
                await self._memory.hold(self, 2 * self.size)  # the parts and their copy, for a moment
                self._parts[:] = [b"".join(self._parts)]
            return self._parts[0] if self._parts else b""
        finally:
            self._parts = []
            self._memory.release(self)

    async def _inflated(self, chunk: bytes, inflate: zlib._Decompress) -> None:
        if self.received > self.limit:
            raise self._too_large()
        while chunk:  # a step at a time: a kilobyte of gzip may hold a gigabyte of zeros
            step = min(INFLATE_STEP, self.limit + 1 - self.size)  # a byte past the limit says it is passed
            await self._memory.hold(self, self.size + step)
            try:
                data = inflate.decompress(chunk, step)
            except zlib.error as exc:
                raise DecodingError(f"the compressed answer cannot be inflated: {exc}") from None
            chunk = inflate.unconsumed_tail
            await self._keep(data)

    async def _keep(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            raise self._too_large()
        await self._memory.hold(self, self.size + len(data))  # inflated: gives back what the step did not use
        self.size += len(data)
        self._parts.append(data)

    def _too_large(self) -> AnswerTooLarge:
        return AnswerTooLarge(f"answer too large: more than {self.limit:,} bytes (api.max_answer_mb)")


def _decompressor(encoding: str | None) -> zlib._Decompress:
    name = (encoding or "").strip().lower()
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as the standard says
    raise DecodingError(f"the answer is encoded as {encoding!r}, which batchrun never asked for")


def decoded_headers(items: Sequence[tuple[str, str]], encoded: bool) -> dict[str, str]:
    """The answer's headers by lower-case name; once its body is inflated, its length and
    encoding describe what is no longer there, and go."""
    headers: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if encoded and key in DECODED_HEADERS:
            continue
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def forget(exc: BaseException) -> BaseException:
    """`exc`, keeping none of the frames it came through: their locals hold the answer
    read so far (and aiohttp's buffers), and an error is kept while its retry waits."""
    traceback.clear_frames(exc.__traceback__)
    return exc


DECODED_HEADERS = frozenset({"content-encoding", "content-length"})
