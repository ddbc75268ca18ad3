"""Calling the API for one row: one httpx client, tenacity retries, httpx errors mapped.

This is the one place httpx exceptions become batchrun's: whatever goes wrong on
the wire turns into a RetryableAPIError, a RowFatalAPIError (returned as a failed
Result) or a JobFatalAPIError (raised: the job must stop).
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx

from .._exceptions import APIError, BudgetReached, JobFatalAPIError, RetryableAPIError
from .._version import __version__
from ..endpoints import ENDPOINTS, get_endpoint
from ..endpoints.embeddings import share
from ..endpoints.protocol import Result, StreamAssembler, map_texts, storable_text
from ..engine.cache import ResponseCache, cacheable
from ..engine.structured import Structure
from ..inputs.reader import Row
from ..policy.concurrency import STATED_HEADER, ConcurrencyLimit
from ..policy.pricing import Budget, Hold, Price, completion_bound, cost
from ..policy.pricing import usd as format_usd
from ..policy.rate import RateLimiter, estimate_tokens, header_number, pushed_back
from ..policy.retry import classify, retry_after, retrying
from ..spec.parse import JobSpec
from .network import proxy_for, ssl_context
from .secrets import MIN_RUN, Redactor
from .transport import AiohttpTransport, AnswerTooLarge, BoundedTransport

ERROR_CHARS = 500  # of an error message, kept in the state and the output
PARK_S = 2.0  # a server's retry-after this long sets the row aside (see `Client.call`)

__all__ = ["Client", "Deferred", "HoldLog"]


class HoldLog(Protocol):
    """Where the budget's holds are kept durably (the runner's writer, in the state)."""

    async def record(self, hold: Hold) -> None:
        """Return once `hold` is in the state: only then may its request go."""

    def release(self, hold: Hold) -> None:
        """`hold` ended without an answer to save (set aside, or refused as a whole)."""


class Deferred(Exception):
    """A row the server asked to wait `wait` seconds for, after `attempts` requests; `spent`:
    the (failures, 429s) it met, which count against its retries when it goes again."""

    def __init__(self, wait: float, attempts: int) -> None:
        super().__init__(f"deferred {wait:g} s")
        self.wait, self.attempts = wait, attempts
        self.spent = (0, 0)


@dataclass(frozen=True, slots=True)
class _Worst:
    """The most one answer can cost: None where it has no bound (no price; no max_tokens)."""

    usd: float | None
    tokens: int | None


@dataclass(slots=True)
class _Attempt:
    """One row's request, encoded once and sent as often as it takes."""

    url: httpx.URL
    payload: bytes
    endpoint: str
    stream: bool
    tokens: int
    count: int = 0
    latency: float = 0.0
    pushed_back: bool = False  # a 429 (or a 503 naming a wait) answered it before
    pushed_wait: float | None = None  # the wait the last answer's push-back asked for
    spent: tuple[int, int] = (0, 0)  # (failures, 429s) before the row was set aside

class Client:
    """Sends rows' requests; use as `async with Client(...) as client`.

    Requests go straight to an httpx transport: the AsyncClient layer above it
    (URL merging, cookies, redirects, auth flows) costs more per request than
    everything else batchrun does, and a batch job needs none of it.
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport | None = None,
        base_url: str | None = None,
        sleep: Callable[[float], Any] = anyio.sleep,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self._redact = Redactor(api_key)
        self._key = api_key if api_key and len(api_key) >= MIN_RUN else None  # looked for in every answer
        # Every answer arrives read in full, within timeout_s and max_answer_mb: the
        # bounds are the transport's, so the client adds no clock of its own to each request.
        bounds = {"timeout_s": spec.api.timeout_s, "max_answer_bytes": spec.api.max_answer_bytes}
        url = (base_url or spec.api.base_url).rstrip("/")
        if transport:
            self._transport: httpx.AsyncBaseTransport = BoundedTransport(transport, **bounds)
        else:
            env = os.environ if environ is None else environ
            https = url.startswith("https://")
            self._transport = AiohttpTransport(max_connections=spec.concurrency, proxy=proxy_for(url, env),
                                               ssl_context=ssl_context(env) if https else False, **bounds)
        base = httpx.URL(url)
        self._urls = {name: httpx.URL(str(base) + endpoint.path) for name, endpoint in ENDPOINTS.items()}
        headers = [
            ("host", base.netloc.decode("ascii")),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("user-agent", f"batchrun/{__version__}"),
        ]
        if api_key:
            headers.append(("authorization", f"Bearer {api_key}"))
        self._headers = headers
        self._sleep = sleep
        self.limiter = RateLimiter(
            requests_per_minute=spec.rate_limit.requests_per_minute,
            tokens_per_minute=spec.rate_limit.tokens_per_minute,
        )
        # Requests in flight: at most `concurrency`, fewer while the server says it is full
        self.in_flight = ConcurrencyLimit(spec.concurrency)
        self.requests_sent = 0
        # The job's budget, with what earlier runs spent: the runner sets it (see `_pricing`),
        # and the log in the state where holds are recorded before their request goes
        self.budget: Budget | None = None
        self.hold_log: HoldLog | None = None
        self._settled: anyio.Event | None = None  # set when a hold is let go; made by the first waiter
        self.closing = False
        self.cache: ResponseCache | None = None  # the runner's, when the spec names one
        self.cache_hits = 0
        self.uncacheable = 0  # requests the cache may not answer: not deterministic
        schema = spec.answer_schema()
        self._structure = Structure(schema) if schema is not None else None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._transport.aclose()

    async def call(self, row: Row, *, park: bool = False, pushed_back: bool = False,
                   spent: tuple[int, int] = (0, 0)) -> Result:
        """Answer one row, retrying what is worth retrying; a failure is a failed Result.

        Raises JobFatalAPIError when the API refuses the job as a whole. With `park`,
        raises Deferred rather than wait a server's long retry-after while it answers
        other requests: the caller sets the row aside and goes on with others.
        `pushed_back`: the row met a 429 before (it was set aside), so it never probes;
        `spent`: the failures and 429s it met then, which count against its retries.
        """
        body = get_endpoint(row.endpoint).build_body(row.body, self.spec.model, self.spec.params)
        try:
            payload = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()  # once, for every attempt
        except (ValueError, TypeError, RecursionError) as exc:
            # Validation refuses such rows before any request; should one slip through,
            # it fails alone rather than stopping the job.
            return Result(row.index, row.id, "failed", error=f"the request cannot be sent as JSON: {exc}")
        attempt = _Attempt(
            url=self._urls[row.endpoint],
            payload=payload,
            endpoint=row.endpoint,
            stream=bool(body.get("stream")),
            # Only a tokens-per-minute limit needs the estimate.
            tokens=estimate_tokens(body) if self.limiter.tokens_per_s else 0,
            pushed_back=pushed_back,
            spent=spent,
        )
        price = self.spec.pricing.get(body.get("model")) if self.spec.pricing else None
        key = None
        if self.cache is not None:
            if cacheable(body, everything=self.cache.spec.everything):
                key = self.cache.key(str(attempt.url), body)
                hit = self.cache.get(key)
                if hit is not None:
                    return self._from_cache(row, hit, price, payload)
            else:
                self.uncacheable += 1
        worst = self._worst(price, body, len(payload))
        # Re-asks may follow the first answer: all of them are held against the budget.
        held = await self._hold(worst, 1 + (self.spec.retry.max_reasks if self._structure else 0))
        try:
            result = await self._settle(row, attempt, park=park)  # (nothing is paid before its answer)
        except (Deferred, JobFatalAPIError):  # no answer came: nothing was paid
            self._let_go(held)
            raise
        paid = [result] if result.status == "ok" else []
        if self._structure is not None and result.status == "ok":
            result, paid = await self._validated(row, attempt, result)
        if self._key is not None:
            self._scrub(result)
        if self.spec.keep_request:
            result.extra = {**(result.extra or {}), "request": payload.decode()}
        self._charge(result, paid, price, worst, held)
        if key is not None and result.status == "ok":
            result.cache_key = key  # cached by the writer, once the state has it
        return result

    def _from_cache(self, row: Row, hit: Result, price: Price | None, payload: bytes) -> Result:
        """A row answered from the cache: no request, nothing paid, and what that saved."""
        hit.row_index, hit.id = row.index, row.id
        saved = cost(price, hit.prompt_tokens, hit.completion_tokens, hit.cached_tokens)
        hit.cost_usd = 0.0 if price is not None else None
        hit.extra = {**(hit.extra or {}), "cached": True, **({"saved_usd": saved} if saved is not None else {})}
        if self.spec.keep_request:
            hit.extra["request"] = payload.decode()
        self.cache_hits += 1
        return hit

    def _worst(self, price: Price | None, body: Mapping[str, Any], payload_bytes: int) -> _Worst | None:
        """The most one answer to this request can cost, where a budget or a price asks.

        The worst case of the prompt is the request's size in bytes (no tokenizer makes
        more tokens than bytes, and the JSON around the text covers a chat template's
        own tokens); of the completion, max_tokens (or the spec's bound) times n.
        """
        if self.budget is None and price is None:
            return None
        completion = completion_bound(body, self.spec.budget.assume_max_tokens)
        known = completion is not None
        completion = completion or 0
        usd = price.worst(payload_bytes, completion) if price is not None and known else None
        return _Worst(usd, payload_bytes + completion if known else None)

    async def _hold(self, worst: _Worst | None, times: int) -> Hold | None:
        """Hold `times` answers' worst case against the budget, recorded in the state
        before the request goes. While it does not fit beside the requests in flight,
        wait for them to settle; raise BudgetReached once it would not fit even alone."""
        if self.budget is None or worst is None:
            return None
        usd, tokens = (worst.usd or 0.0) * times, (worst.tokens or 0) * times
        while (hold := self.budget.reserve(usd, tokens)) is None:
            if self.closing or not self.budget.fits(usd, tokens, alone=True):
                most = f"{format_usd(usd)} ({tokens:,} tokens)" if self.budget.max_usd is not None else \
                    f"{tokens:,} tokens"
                raise BudgetReached(f"the budget is reached: {self.budget.describe()}, and the next request could "
                                    f"cost up to {most}. The requests in flight finish and every answer is saved; "
                                    f"raise the budget in {self.spec.name} and rerun to go on (the spend so far "
                                    "is remembered)")
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()  # a request in flight settled: the budget may allow this one now
        if self.hold_log is not None:
            await self.hold_log.record(hold)
        return hold

    def _let_go(self, hold: Hold | None, spent_usd: float = 0.0, spent_tokens: int = 0, *,
                saved: bool = False) -> None:
        """A held request ended; `saved`: its hold goes from the state with its answer."""
        if hold is None or self.budget is None:
            return
        self.budget.settle(hold, spent_usd, spent_tokens)
        if not saved:
            self._forget(hold)
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def _forget(self, hold: Hold | None) -> None:
        """A hold whose request is saved nowhere (nothing was paid) leaves the state."""
        if hold is not None and self.hold_log is not None:
            self.hold_log.release(hold)

    def stop_holding(self) -> None:
        """The job is stopping: requests waiting for the budget give up rather than go."""
        self.closing = True
        if self._settled is not None:
            self._settled.set()

    def _charge(self, result: Result, paid: list[Result], price: Price | None, worst: _Worst | None,
                hold: Hold | None) -> None:
        """The row's cost: every answer paid for at its model's price, one without usage
        at its worst case (never free); the budget lets go of the hold."""
        usd: float | None = None
        tokens = unmetered = unmetered_tokens = 0
        for answer in paid:
            if answer.prompt_tokens is None and answer.completion_tokens is None:
                if worst is None:  # no price and no budget: nothing is charged, nothing to say
                    continue
                unmetered += 1
                unmetered_tokens += worst.tokens or 0
                one = worst.usd
            else:
                tokens += answer.total_tokens or (answer.prompt_tokens or 0) + (answer.completion_tokens or 0)
                one = cost(price, answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)
            if one is not None:
                usd = (usd or 0.0) + one
        _add_usage(result, paid)
        if price is not None:
            result.cost_usd = usd
        if unmetered:
            result.extra = {**(result.extra or {}), "unmetered": unmetered, "unmetered_tokens": unmetered_tokens}
        if hold is not None:
            result.hold = hold.id
        self._let_go(hold, usd or 0.0, tokens + unmetered_tokens, saved=True)

    async def call_group(self, rows: list[Row]) -> list[Result]:
        """Answer rows that go several to a request (embeddings): rows whose other request
        fields agree share one. A request refused (4xx) for its content is split in
        halves until the row it is about fails alone, with the API's message."""
        groups: dict[str, list[Row]] = {}
        for row in rows:
            rest = {k: v for k, v in row.body.items() if k != "input"}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(row)
        results: list[Result] = []
        for group in groups.values():
            results += await self._group(group, 0)
        return results

    async def _group(self, rows: list[Row], before: int) -> list[Result]:
        """`before`: requests these rows were already part of (the halves of a refused one)."""
        endpoint = get_endpoint(rows[0].endpoint)
        rest = {k: v for k, v in rows[0].body.items() if k != "input"}
        body = endpoint.build_group_body([row.body["input"] for row in rows], rest, self.spec.model,
                                         self.spec.params)
        try:
            payload = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError) as exc:
            return [Result(r.index, r.id, "failed", error=f"the request cannot be sent as JSON: {exc}") for r in rows]
        weights = [len(str(row.body["input"])) for row in rows]
        attempt = _Attempt(url=self._urls[endpoint.name], payload=payload, endpoint=endpoint.name, stream=False,
                           tokens=sum(weights) // 4 + len(rows) if self.limiter.tokens_per_s else 0)
        price = self.spec.pricing.get(body.get("model")) if self.spec.pricing else None
        worst = self._worst(price, {}, len(payload))
        hold = await self._hold(worst, 1)
        try:
            answer = await self._settle(rows[0], attempt)
        except JobFatalAPIError:
            self._let_go(hold)
            raise
        paid = [answer] if answer.status == "ok" else []
        self._charge(answer, paid, price, worst, hold)  # the request's cost; its hold goes with the rows
        attempts = before + attempt.count
        vectors = answer.vectors or []
        if answer.status != "ok" and len(rows) > 1 and _REFUSED.match(answer.error or ""):
            # Refused for what it holds (nothing paid): find the row, in halves
            self._forget(hold)
            half = len(rows) // 2
            return await self._group(rows[:half], attempts) + await self._group(rows[half:], attempts)
        if answer.status != "ok" or len(vectors) != len(rows):
            error = answer.error or f"the answer has {len(vectors)} embeddings for {len(rows)} inputs"
            results = [Result(r.index, r.id, "failed", attempts=attempts, latency_s=answer.latency_s,
                              error=error, transient=answer.transient) for r in rows]
        else:
            usage = {name: share(getattr(answer, name), weights) for name in _USAGE}
            results = [Result(r.index, r.id, "ok", model=answer.model, response_id=answer.response_id,
                              attempts=attempts, latency_s=answer.latency_s, embedding=vector,
                              cost_usd=cost(price, usage["prompt_tokens"][i], None, usage["cached_tokens"][i]),
                              **{name: usage[name][i] for name in _USAGE})
                       for i, (r, vector) in enumerate(zip(rows, vectors))]
        unmetered = _unmetered_tokens(answer)
        if paid and (results[0].status != "ok" or unmetered):  # the paid request's cost, shared by its rows
            whole = sum(weights)
            for result, weight in zip(results, weights):
                part = weight / whole if whole else 1 / len(results)
                result.cost_usd = answer.cost_usd * part if answer.cost_usd is not None else None
                if unmetered:
                    result.extra = {"unmetered": 1, "unmetered_tokens": round(unmetered * part)}
        for result in results:
            result.hold = answer.hold
        return results

    async def _validated(self, row: Row, attempt: _Attempt, result: Result) -> tuple[Result, list[Result]]:
        """Ask again while the answer is not JSON valid against the schema, at most
        `retry.max_reasks` times. Every answer was paid for: they come back beside the
        row's result, and its usage columns add them up (see `_charge`)."""
        assert self._structure is not None
        paid = [result]
        while True:
            parsed, problem = self._structure.problem(result.output_text)
            if problem is None:
                result.extra = {**(result.extra or {}), "parsed": parsed}
                break
            if len(paid) > self.spec.retry.max_reasks:
                if result.finish_reason == "length":
                    problem += "; the answer was cut at max_tokens: allow more tokens"
                result = Result(row.index, row.id, "failed", attempts=attempt.count, latency_s=attempt.latency,
                                error=self._error_text(problem), model=result.model, response_id=result.response_id,
                                finish_reason=result.finish_reason, output_text=result.output_text)
                break
            result = await self._settle(row, attempt)
            if result.status != "ok":
                break
            paid.append(result)
        return result, paid

    async def _settle(self, row: Row, attempt: _Attempt, *, park: bool = False) -> Result:
        """One answer, retried as the policy says; a row failure is a failed Result.
        `park`: a long wait the server asks for raises Deferred (see `call`)."""
        try:
            try:
                result = await self._send(attempt)
            except RetryableAPIError as failure:
                # Most rows need one request; only those that fail pay for tenacity.
                # Its first attempt replays the failure just seen, so tenacity counts
                # it and waits as it would have; later ones send again.
                replay: RetryableAPIError | None = _unburdened(failure)
                sleep = self._parking_sleep(attempt) if park else self._sleep
                controller = retrying(self.spec.retry, sleep=sleep, spent=attempt.spent)
                try:
                    async for retry in controller:
                        with retry:
                            if replay is not None:
                                error, replay = replay, None
                                raise error
                            try:
                                result = await self._send(attempt)
                            except RetryableAPIError as again:
                                raise _unburdened(again) from None
                except Deferred as deferred:  # its retries so far go aside with it
                    deferred.spent = controller.stop.spent
                    raise
        except APIError as exc:
            return Result(
                row.index, row.id, "failed", attempts=attempt.count, latency_s=attempt.latency,
                error=self._error_text(str(exc)), transient=isinstance(exc, RetryableAPIError),
            )
        except JobFatalAPIError as exc:  # no APIError: it stops the job, its words redacted
            exc.args = (self._error_text(str(exc)),)
            raise
        result.row_index, result.id = row.index, row.id
        result.attempts, result.latency_s = attempt.count, attempt.latency
        if attempt.tokens and result.total_tokens is not None:
            self.limiter.correct_tokens(result.total_tokens - attempt.tokens)
        return result

    def _parking_sleep(self, attempt: _Attempt) -> Callable[[float], Any]:
        async def sleep(seconds: float) -> None:
            # The server is full, not closed (it answered others lately): the row waits
            # aside while its worker goes on. A server answering no one: the worker waits too.
            # Only a wait the server asked for: a backoff after a 500 is no reason to set aside.
            if seconds >= PARK_S and attempt.pushed_wait is not None and await self.in_flight.admitting_lately():
                raise Deferred(seconds, attempt.count)
            await self._sleep(seconds)

        return sleep

    async def _send(self, attempt: _Attempt) -> Result:
        """One attempt, paced by the rate policy. `timeout_s` bounds the whole answer,
        not each read: a server dripping keep-alive comments must not hold a worker."""
        wait = self.limiter.reserve(attempt.tokens, time.monotonic())
        if wait > 0:
            await self._sleep(wait)
        self.requests_sent += 1
        attempt.count += 1
        headers = [*self._headers, ("content-length", str(len(attempt.payload)))]
        request = httpx.Request("POST", attempt.url, headers=headers, stream=httpx.ByteStream(attempt.payload))
        sent = await self.in_flight.enter(cautious=attempt.pushed_back)
        started = time.monotonic()  # latency_s is the time on the wire, not the wait at the gate
        load, wait = None, None  # what the answer says about the server's load
        attempt.pushed_wait = None
        try:
            response = await self._transport.handle_async_request(request)
            if pushed_back(response.status_code, response.headers):
                load, attempt.pushed_back = "pushback", True
                wait = attempt.pushed_wait = retry_after(response.headers, now=time.time())
            elif response.is_success:
                load = "ok"
                if (stated := header_number(response.headers.get(STATED_HEADER))) and stated.is_integer():
                    self.in_flight.stated(int(stated))
        except httpx.TimeoutException as exc:
            raise RetryableAPIError(f"no complete answer within {self.spec.api.timeout_s:g} s") from exc
        except (AnswerTooLarge, httpx.DecodingError) as exc:
            raise RetryableAPIError(str(exc)) from exc
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            # Our request itself cannot be sent; every other row would fail alike.
            # The message may quote a header, so it is not repeated.
            raise JobFatalAPIError(f"the request cannot be sent ({type(exc).__name__}); check api.base_url") from exc
        except httpx.TransportError as exc:
            raise RetryableAPIError(f"connection failed: {type(exc).__name__}: {exc}") from exc
        finally:
            now = time.monotonic()
            attempt.latency = now - started
            self.in_flight.leave(sent, load, now, wait)
        self.limiter.observe(response.status_code, response.headers, now, pushed=load == "pushback")
        if not response.is_success:
            raise classify(response.status_code, response.headers, response.content, now=time.time())
        try:
            if attempt.stream and _is_event_stream(response):
                assembler = StreamAssembler(attempt.endpoint)
                for line in response.iter_lines():  # the body is in memory: see the transports
                    assembler.feed_line(line)
                return assembler.result()
            try:
                data = json.loads(response.content)
            except ValueError:
                raise RetryableAPIError("the response body is not valid JSON", status=response.status_code) from None
            return get_endpoint(attempt.endpoint).parse(data)
        except RecursionError:
            raise RetryableAPIError("the answer is nested too deeply to read", status=response.status_code) from None

    def _scrub(self, result: Result) -> None:
        """A server that echoes the key inside an answer must not put it in the state or
        the output: an exact look per text (cheap); where it is found, every piece of the
        key goes from every text of the answer."""
        key = self._key
        assert key is not None
        texts = (result.output_text, result.reasoning_content, result.tool_calls)
        if not any(key in text for text in texts if text) and not _holds(result.extra, key):
            return
        for name in ("output_text", "reasoning_content", "tool_calls"):
            if (text := getattr(result, name)) is not None:
                setattr(result, name, self._redact(text))
        if result.extra is not None:
            result.extra = map_texts(result.extra, self._redact)

    def _error_text(self, text: str) -> str:
        """An error as it may be stored: servers echo the key they rejected, and it must
        never reach a file, not even in part; so the key goes before the text is cut."""
        return storable_text(self._redact(text)[:ERROR_CHARS])


_REFUSED = re.compile(r"HTTP 4\d\d: ")  # a request refused for what it holds, not an answer we cannot read
_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _unburdened(error: RetryableAPIError) -> RetryableAPIError:
    """`error`, kept while its retry waits, without the answer: a traceback keeps every
    frame it came through, and the response in their locals (200 rows waiting to retry
    an 8 MB 500 held 6 GB). Its cause goes too: the message says what it needs."""
    traceback.clear_frames(error.__traceback__)
    error.__cause__ = error.__context__ = None
    return error


def _holds(value: Any, key: str) -> bool:
    """Whether any text in `value` (an answer's extra: choices, parsed JSON) holds `key`.
    Log-probabilities are passed over: a token is far shorter than a key, and a long
    answer's are thousands of texts."""
    if isinstance(value, str):
        return key in value
    if isinstance(value, dict):
        return any(k != "logprobs" and _holds(v, key) or isinstance(k, str) and key in k for k, v in value.items())
    if isinstance(value, list):
        return any(_holds(v, key) for v in value)
    return False


def _unmetered_tokens(result: Result) -> int:
    return result.extra.get("unmetered_tokens", 0) if result.extra else 0


def _add_usage(result: Result, paid: list[Result]) -> None:
    """`result`'s usage becomes the sum over every answer paid for (where any reported it)."""
    if not paid or len(paid) == 1 and paid[0] is result:
        return
    for name in _USAGE:
        values = [getattr(r, name) for r in paid if getattr(r, name) is not None]
        setattr(result, name, sum(values) if values else None)


def _is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
