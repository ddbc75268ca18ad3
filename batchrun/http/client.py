"""One request to the API, with its retries: body out, verdict, backoff, answer in.

This is the one place the transport's errors become batchrun's: whatever goes wrong on
the wire turns into a RetryableAPIError, a RowFatalAPIError (returned as a failed
Result) or a JobFatalAPIError (raised: the job must stop).

Each answer is judged once (`policy.verdict.judge`) and its Verdict handed on as a
value: to the concurrency limit as the request leaves the gate, to the rate limiter,
and, inside the error that stands for a failure, to the retry policy's tenacity
controller. A row's call around the request (the cache, the budget, the structured
re-ask) is the engine's (`engine.call`).
"""

from __future__ import annotations

import os
import re
import time
import traceback
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .._exceptions import APIError, JobFatalAPIError, RetryableAPIError
from .._json import dumps, loads_utf8
from .._version import __version__
from ..endpoints import ENDPOINTS, get_endpoint
from ..endpoints.result import Result, storable_text
from ..endpoints.sse import StreamAssembler
from ..policy.concurrency import ConcurrencyLimit
from ..policy.rate import Limiter, RateLimiter, Usage, estimate_tokens
from ..policy.retry import error_for, retrying
from ..policy.verdict import Verdict, judge, unanswered
from ..spec.model import JobSpec
from .network import proxy_for, ssl_context
from .secrets import MIN_RUN, Redactor
from .transport import Answer, AnswerTooLarge, DecodingError, LocalProtocolError, ReadTimeout, Transport, \
    TransportError, UnsupportedProtocol
from .wire import WireTransport

if TYPE_CHECKING:
    import httpx

ERROR_CHARS = 500  # of an error message, kept in the state and the output
PARK_S = 2.0  # a server's retry-after this long sets the row aside (see `Client.send`)

__all__ = ["Client", "Deferred", "Request", "Unsendable", "endpoint_url"]

# Failures after which the server may have billed the request: it was sent and not
# answered in time, or an answer came that could not be taken (too large, undecodable);
# and any failure once a 2xx answer was begun (`TransportError.status`): cut off mid-body
_MAYBE_PAID = (ReadTimeout, AnswerTooLarge, DecodingError)


class Deferred(Exception):
    """A row the server asked to wait `wait` seconds for, after `attempts` requests; `spent`:
    the (failures, 429s) it met, which count against its retries when it goes again."""

    def __init__(self, wait: float, attempts: int) -> None:
        super().__init__(f"deferred {wait:g} s")
        self.wait, self.attempts = wait, attempts
        self.spent = (0, 0)


class Unsendable(ValueError):
    """A body that cannot be sent as JSON (validation refuses such rows before any request)."""


@dataclass(slots=True)
class Request:
    """One request, encoded once and sent as often as it takes."""

    url: str
    payload: bytes
    endpoint: str
    stream: bool
    tokens: int  # booked with the rate limiter (0: no tokens-per-minute limit)
    count: int = 0  # requests sent for it, re-asks included
    tries: int = 0  # of these, in the current `send` (the backoff's attempt number)
    latency: float = 0.0
    pushed_back: bool = False  # a 429 (or a 503 naming a wait) answered it before: it never probes
    verdict: Verdict | None = None  # on the last answer
    spent: tuple[int, int] = (0, 0)  # (failures, 429s) before the row was set aside
    affinity: str | None = None  # `x-session-affinity`: requests sharing a prompt prefix share it
    # Attempts that may have been paid for and left no answer: a 2xx that could not be read
    # (a stream cut short, a body that is no JSON or that its connection cut off, one that
    # fails the row or stops the job), a timeout. `again` is awaited before an
    # attempt follows one: None, it may go; else why not (the budget counts the lost one and
    # holds the next: `engine.call`).
    lost: int = 0
    again: Callable[[], Awaitable[str | None]] | None = None


def endpoint_url(base_url: str, endpoint: str) -> str:
    """Where a request to `endpoint` (a name) goes, from the API's base URL: its cache key's URL too."""
    return normalized(normalized(base_url.rstrip("/"))[0] + ENDPOINTS[endpoint].path)[0]


# A URL whose every part httpx.URL writes as it is given, but a default port it drops
_HOST = r"[a-z][a-z0-9-]*(?:\.[a-z0-9-]+)*|(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})"  # a name, or IPv4
_PLAIN_URL = re.compile(rf"(https?)://({_HOST})(?::([1-9][0-9]{{0,4}}))?((?:/[A-Za-z0-9_~.-]*)*)")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalized(url: str) -> tuple[str, str]:
    """`url` as httpx.URL writes it (the cache's keys were made so), and its host[:port]:
    the usual URL read here, any other by httpx, loaded then (0.08 s of a start)."""
    match = _PLAIN_URL.fullmatch(url)
    if match and not _DOT_SEGMENT.search(match[4]) and int(match[3] or 0) <= 65535 \
            and all(int(part) <= 255 for part in match[2].split(".") if part.isdigit()):
        scheme, host, port, path = match.groups()
        netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
        return f"{scheme}://{netloc}{path}", netloc
    import httpx

    parsed = httpx.URL(url)
    return str(parsed), parsed.netloc.decode("ascii")


class Client:
    """Sends requests; use as `async with Client(...) as client`.

    `limiter` and `in_flight`: the rate limiter and the gate on requests in flight, by
    default the process's own (from the spec); a backend that spreads one job over several
    processes passes its own. Requests go through the transport seam (`http.transport`):
    bytes and headers out, status, headers and body back, with no request or response
    objects between; a batch job needs none of what an HTTP client library's layers do.
    """

    def __init__(self, spec: JobSpec, *, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None,
                 base_url: str | None = None, sleep: Callable[[float], Any] = anyio.sleep,
                 environ: Mapping[str, str] | None = None, limiter: Limiter | None = None,
                 in_flight: ConcurrencyLimit | None = None, rows: int | None = None) -> None:
        self.spec = spec
        self.redact = Redactor(api_key)
        # The key as looked for in every answer (see `engine.call`): none shorter than MIN_RUN
        self.echoed_key = api_key if api_key and len(api_key) >= MIN_RUN else None
        url = (base_url or spec.api.base_url).rstrip("/")
        self._transport = _transport(spec, url, transport, os.environ if environ is None else environ, rows)
        self._urls = {name: endpoint_url(url, name) for name in ENDPOINTS}
        headers = [
            ("host", normalized(url)[1]),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("user-agent", f"batchrun/{__version__}"),
        ]
        if api_key:
            headers.append(("authorization", f"Bearer {api_key}"))
        self._headers = headers
        self._sleep = sleep
        self.limiter: Limiter = limiter if limiter is not None else RateLimiter(
            requests_per_minute=spec.rate_limit.requests_per_minute,
            tokens_per_minute=spec.rate_limit.tokens_per_minute)
        # Requests in flight: at most `concurrency`, fewer while the server says it is full
        self.in_flight = in_flight if in_flight is not None else ConcurrencyLimit(spec.concurrency)
        self.requests_sent = 0
        self.stopping = False  # the job stops: a failed attempt is not sent again (see `_retry`)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._transport.aclose()

    def request(self, endpoint: str, body: Mapping[str, Any], *, tokens: int | None = None,
                pushed_back: bool = False, spent: tuple[int, int] = (0, 0)) -> Request:
        """`body` to `endpoint`, encoded once for every attempt; raises Unsendable. `tokens`:
        the request's estimate, for a tokens-per-minute limit or one the server states
        (None: from the body)."""
        try:
            payload = dumps(body).encode()
        except (ValueError, TypeError, RecursionError) as exc:
            raise Unsendable(f"the request cannot be sent as JSON: {exc}") from None
        # A token limit needs the estimate: the spec's, or one the server states (the first
        # request's is kept for its answer, which may state one)
        if not (self.limiter.tokens_per_s or self.limiter.wants_usage or not self.requests_sent):
            tokens = 0
        elif tokens is None:
            tokens = estimate_tokens(body)
        return Request(url=self._urls[endpoint], payload=payload, endpoint=endpoint, stream=bool(body.get("stream")),
                       tokens=tokens, pushed_back=pushed_back, spent=spent,
                       affinity=self._affinity(endpoint, body, payload) if self.spec.api.affinity else None)

    @staticmethod
    def _affinity(endpoint: str, body: Mapping[str, Any], payload: bytes) -> str | None:
        """The key of the replica whose prompt cache may hold this request's prefix: the
        same for every request of the model whose prompt agrees up to there. A checksum,
        not a digest: it only routes, and costs a few µs for 10 KB."""
        span = ENDPOINTS[endpoint].shared_prefix(body, payload)
        if span is None:
            return None
        model = zlib.crc32(str(body.get("model", "")).encode())
        return f"{zlib.crc32(payload[span[0]:span[1]], model):08x}"

    async def send(self, request: Request, *, park: bool = False) -> Result:
        """One answer, retried as the policy says; a failure the row bears is a failed Result.
        Its row_index and id are left for the caller; attempts and latency_s are the request's.

        Raises JobFatalAPIError when the API refuses the job as a whole. With `park`,
        raises Deferred rather than wait a server's long retry-after while it answers
        other requests: the caller sets the row aside and goes on with others.
        """
        request.tries = 0
        try:
            try:
                result = await self._attempt(request)
            except RetryableAPIError as failure:
                # Most rows need one request; only those that fail pay for tenacity.
                result = await self._retry(request, _unburdened(failure), park)
        except APIError as exc:
            return Result(-1, "", "failed", attempts=request.count, latency_s=request.latency,
                          error=self.error_text(str(exc)), transient=isinstance(exc, RetryableAPIError))
        except JobFatalAPIError as exc:  # no APIError: it stops the job, its words redacted
            exc.args = (self.error_text(str(exc)),)
            raise
        result.attempts, result.latency_s = request.count, request.latency
        if request.tokens and result.total_tokens is not None:
            self.limiter.correct_tokens(result.total_tokens - request.tokens)
        if self.limiter.wants_usage and (used := Usage.of(result.prompt_tokens, result.cached_tokens,
                                                          result.completion_tokens)) is not None:
            self.limiter.used(used)
        return result

    async def _retry(self, request: Request, failure: RetryableAPIError, park: bool) -> Result:
        """Tenacity's first attempt replays the failure just seen, so it counts it and waits
        as the failure's verdict says; later ones send again."""
        replay: RetryableAPIError | None = failure
        sleep = self._parking_sleep(request) if park else self._sleep
        controller = retrying(self.spec.retry, sleep=sleep, spent=request.spent)
        result: Result | None = None
        last = failure
        try:
            async for retry in controller:
                if replay is None and self.stopping:  # a retry is a new request: a stop sends none
                    raise RetryableAPIError(f"{last}; not sent again: the job is stopping", status=last.status)
                if replay is None and request.lost and request.again is not None and \
                        (why := await request.again()) is not None:
                    # Still retryable: a later run (a larger budget) asks it again
                    raise RetryableAPIError(f"{last}; not sent again: {why}", status=last.status)
                with retry:
                    if replay is not None:
                        error, replay = replay, None
                        raise error
                    try:
                        result = await self._attempt(request)
                    except RetryableAPIError as again:
                        last = _unburdened(again)
                        raise last from None
        except Deferred as deferred:  # its retries so far go aside with it
            deferred.spent = controller.stop.spent
            raise
        assert result is not None  # tenacity raises the last failure when it stops
        return result

    def _parking_sleep(self, request: Request) -> Callable[[float], Any]:
        async def sleep(seconds: float) -> None:
            # The server is full, not closed (it answered others lately): the row waits
            # aside while its worker goes on. A server answering no one: the worker waits too.
            # Only a wait the server asked for: a backoff after a 500 is no reason to set aside.
            last = request.verdict
            asked = last is not None and last.pushed_back and last.retry_after is not None
            if seconds >= PARK_S and asked and await self.in_flight.admitting_lately():
                raise Deferred(seconds, request.count)
            await self._sleep(seconds)

        return sleep

    async def _attempt(self, request: Request) -> Result:
        """One attempt, paced by the rate policy: the answer, or the error its verdict stands for."""
        wait = self.limiter.reserve(request.tokens, time.monotonic())
        if wait > 0:
            await self._sleep(wait)
            # A hold set meanwhile (a window said spent, then a 429 naming a wait: a key another
            # job shares) reaches this slot too, booked before it
            if (held := self.limiter.held_until - time.monotonic()) > 0:
                await self._sleep(held)
        self.requests_sent += 1
        request.count += 1
        request.tries += 1
        answer, verdict, answered = await self._exchange(request)
        self.limiter.observe(verdict, answered)
        if not verdict.ok:
            raise error_for(verdict, answer.headers, answer.content)
        try:
            return self._read(request, answer)
        except RetryableAPIError as exc:  # an answer that cannot be read: retried as its verdict says
            request.lost += 1  # a 2xx: paid for, for all anyone knows
            if exc.verdict is None:
                exc.verdict = verdict
            raise
        except (APIError, JobFatalAPIError):  # the row fails, or the job stops: the 2xx was paid for all the same
            request.lost += 1
            raise

    async def _exchange(self, request: Request) -> tuple[Answer, Verdict, float]:
        """The request through the gate and over the wire: the answer, its verdict, and when it
        came. `timeout_s` bounds the whole answer, not each read: a server dripping keep-alive
        comments must not hold a worker."""
        headers = [*self._headers, ("content-length", str(len(request.payload)))]
        if request.affinity is not None:
            headers.append(("x-session-affinity", request.affinity))
        sent = await self.in_flight.enter(cautious=request.pushed_back)
        started = time.monotonic()  # latency_s is the time on the wire, not the wait at the gate
        verdict = request.verdict = None
        try:
            answer = await self._transport.exchange(request.url, headers, request.payload)
            verdict = request.verdict = judge(answer.status, answer.headers, answer.content,
                                              now=time.time(), attempt=request.tries, retry=self.spec.retry)
            if verdict.pushed_back:
                request.pushed_back = True
            elif verdict.in_flight_limit:
                self.in_flight.stated(verdict.in_flight_limit)
        except TransportError as exc:
            if isinstance(exc, _MAYBE_PAID) or exc.status is not None and 200 <= exc.status < 300:
                request.lost += 1
            raise self._failure(exc, request.tries) from exc
        finally:
            now = time.monotonic()
            request.latency = now - started
            if verdict is None:  # no answer: it says nothing about the server's load
                self.in_flight.leave(sent, None, now)
            else:
                self.in_flight.leave(sent, verdict.load, now, verdict.retry_after if verdict.pushed_back else None)
        return answer, verdict, now

    def _failure(self, exc: TransportError, tries: int) -> Exception:
        """The error an attempt that got no answer stands for."""
        if isinstance(exc, ReadTimeout):
            message = f"no complete answer within {self.spec.api.timeout_s:g} s"
        elif isinstance(exc, (AnswerTooLarge, DecodingError)):
            message = str(exc)
        elif isinstance(exc, (LocalProtocolError, UnsupportedProtocol)):
            # Our request itself cannot be sent; every other row would fail alike.
            # The message may quote a header, so it is not repeated.
            return JobFatalAPIError(f"the request cannot be sent ({exc.kind}); check api.base_url")
        else:
            message = f"connection failed: {exc.kind}: {exc}"
        return RetryableAPIError(message, verdict=unanswered(tries, self.spec.retry))

    def _read(self, request: Request, answer: Answer) -> Result:
        """A good answer as a Result, whole or streamed."""
        try:
            if request.stream and answer.headers.get("content-type", "").startswith("text/event-stream"):
                assembler = StreamAssembler(request.endpoint)
                for line in answer.lines():
                    assembler.feed_line(line)
                return assembler.result()
            try:
                data = loads_utf8(answer.content)
            except ValueError:
                raise RetryableAPIError("the response body is not valid JSON", status=answer.status) from None
            return get_endpoint(request.endpoint).parse(data)
        except RecursionError:
            raise RetryableAPIError("the answer is nested too deeply to read", status=answer.status) from None

    def error_text(self, text: str) -> str:
        """An error as it may be stored: servers echo the key they rejected, and it must
        never reach a file, not even in part; so the key goes before the text is cut."""
        return storable_text(self.redact(text)[:ERROR_CHARS])


def _transport(spec: JobSpec, url: str, transport: httpx.AsyncBaseTransport | None,
               environ: Mapping[str, str], rows: int | None = None) -> Transport:
    """The httpx transport given (tests, `mock://`), else the wire transport, or aiohttp's pool
    where the user's network sends requests through a proxy. Every answer arrives read in
    full, within timeout_s and max_answer_mb: the bounds are the transport's, so the client
    adds no clock of its own to each request."""
    bounds = {"timeout_s": spec.api.timeout_s, "max_answer_bytes": spec.api.max_answer_bytes}
    if transport:
        from .bounded import BoundedTransport  # httpx loads only for an httpx transport: 0.08 s of a start

        return BoundedTransport(transport, **bounds)
    https = url.startswith("https://")
    context = ssl_context(environ) if https else None
    if (proxy := proxy_for(url, environ)) is not None:
        from .aio import AiohttpTransport  # aiohttp loads only for a proxy: 0.1 s of every start

        return AiohttpTransport(max_connections=spec.concurrency, proxy=proxy, ssl_context=context or False, **bounds)
    return WireTransport(max_connections=spec.concurrency, ssl_context=context,
                         open_ahead=_connections_ahead(spec, rows), **bounds)


def _connections_ahead(spec: JobSpec, rows: int | None) -> int:
    """How many connections to have open once the first is (see `WireTransport`): one for
    each request that may go at once, as many as `rows` (those left to send) make at most.
    0 where a rate limit paces the requests: they go one by one, no crowd to open for."""
    if spec.rate_limit.is_set:
        return 0
    if rows is None:
        return spec.concurrency
    return min(spec.concurrency, -(-rows // spec.rows_per_request))


def _unburdened(error: RetryableAPIError) -> RetryableAPIError:
    """`error`, kept while its retry waits, without the answer: a traceback keeps every
    frame it came through, and the response in their locals (200 rows waiting to retry
    an 8 MB 500 held 6 GB). Its cause goes too: the message says what it needs."""
    traceback.clear_frames(error.__traceback__)
    error.__cause__ = error.__context__ = None
    return error
