"""Fault-injecting fake OpenAI-compatible HTTP/1.1 server for tests.

Serves POST /v1/completions, /v1/chat/completions, /v1/responses and /v1/embeddings on
127.0.0.1 only (with `n`, log-probabilities in both shapes, Responses streaming events
and base64 embeddings), from a
daemon thread running its own asyncio loop, so both sync and async tests can use
it.  Requests are recorded, and every 200 body sent completely is kept in
`answers`, so tests can check what a client wrote against what was served.

Per request, in this order: require_key, status_for, first_attempt_status, one
random draw choosing at most one fault, then hold, then latency, then the answer.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings")

# Outcome -> Faults attribute holding its rate, in the order their slices of [0, 1) are laid out.
_DRAWN_FAULTS = {"drop": "drop_rate", "500": "error_500_rate", "503": "error_503_rate", "429": "rate_429",
                 "hang": "hang_rate", "invalid_json": "invalid_json_rate", "truncated_body": "truncated_body_rate",
                 "truncated_stream": "truncated_stream_rate"}

_ERRORS = {
    429: ("rate limit exceeded (injected)", "rate_limit_error", "rate_limit_exceeded"),
    500: ("internal error (injected)", "server_error", "internal_error"),
    503: ("service overloaded (injected)", "server_error", "service_unavailable"),
}


@dataclass
class Faults:
    """What goes wrong.  Replacing FakeServer.faults restarts the draws from the new seed."""

    seed: int = 0
    drop_rate: float = 0.0  # close the connection without any answer
    error_500_rate: float = 0.0
    error_503_rate: float = 0.0
    rate_429: float = 0.0  # 429 with Retry-After: retry_after
    retry_after: str = "0"
    shed_503: bool = False  # a 503 names Retry-After: retry_after too (load shed)
    first_attempt_status: int | None = None  # status of the first request for each key (per Faults object)
    hang_rate: float = 0.0  # wait hang_s, then answer normally if the client is still there
    hang_s: float = 30.0
    invalid_json_rate: float = 0.0  # 200 application/json whose body is not JSON
    truncated_body_rate: float = 0.0  # full Content-Length announced, half written, then close
    truncated_stream_rate: float = 0.0  # streams end cleanly before the finish chunk and [DONE]
    latency_s: float = 0.0  # delay before every answer
    latency_jitter_s: float = 0.0  # uniform +- on latency_s
    require_key: str | None = None  # else 401 unless "Authorization: Bearer <require_key>"
    status_for: Callable[[dict], tuple[int, dict] | None] | None = None  # body -> (status, error body) to force
    usage_style: str = "fireworks"  # "fireworks": usage in the finish chunk; "openai": extra chunk if asked for
    # body -> the raw HTTP response, head included, as chunks written one by one (it may
    # never end), or None to answer as usual; the connection is closed after it.
    # Checked after require_key.
    raw_answer: Callable[[dict], Iterable[bytes] | None] | None = None
    # With a json_schema response_format the answer is an object made from the schema; the
    # first answer for a key is invalid (not JSON, or a required field missing) at this rate,
    # or every answer when invalid_answer_always.
    invalid_answer_rate: float = 0.0
    invalid_answer_always: bool = False
    # At most this many requests in flight: one more is answered 429 with Retry-After:
    # retry_after at once (and not counted in flight), as LiteLLM's max_parallel_requests does.
    max_in_flight: int | None = None
    # LiteLLM's per-key rpm_limit, counted as LiteLLM counts it: in fixed windows that start
    # with the first request after the last window ended, refused requests included. Its
    # window is 60 s; a test shortens litellm_window_s and the fake then admits
    # litellm_rpm * litellm_window_s / 60 in each, so the rate stated holds at any scale. One
    # over is answered 429 with Retry-After: the window. Other answers carry
    # x-ratelimit-api_key-limit-requests (litellm_rpm) and -remaining-requests (what the
    # window has left, per minute), and no reset.
    litellm_rpm: int | None = None
    litellm_window_s: float = 60.0
    # Fireworks' serverless limits: tokens per second on three budgets (prompt, uncached
    # prompt, generated), each a bucket of a second's tokens taken from as requests are
    # admitted; one that would take more than is left is answered 429. Every answer states
    # the budgets (x-ratelimit-limit-tokens-*) and what is left (x-ratelimit-remaining-tokens-*).
    fireworks_budgets: tuple[float, float, float] | None = None
    # OpenAI's tokens a minute, counted as OpenAI counts them: a request's prompt / 4 plus its
    # max_tokens × n, taken as it is admitted from a bucket of a second's tokens (whatever
    # its answer then uses); one over is answered 429. Every answer states
    # x-ratelimit-limit-tokens and -remaining-tokens.
    openai_tpm: int | None = None
    # Replicas with prompt caches of their own: a chat request goes to the replica its
    # x-session-affinity header names (else one drawn at random), and its messages before
    # the last are cached tokens there if that replica served them lately (its last
    # `replica_cache` prefixes); then its usage says so.
    replicas: int | None = None
    replica_cache: int = 16
    # body -> an event its answer waits for (None: answered as usual), so a test decides when
    # a job may go on, whatever the load. The request is recorded, and in flight, meanwhile;
    # a client that gives up is let go.
    hold: Callable[[dict], threading.Event | None] | None = None

    def __post_init__(self) -> None:
        if self.usage_style not in ("fireworks", "openai"):
            raise ValueError(f"usage_style must be 'fireworks' or 'openai', not {self.usage_style!r}")


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict
    key: str
    outcome: str
    at: float = field(default_factory=time.monotonic)  # when it arrived


def request_key(body: dict) -> str:
    """Identity of a row's request: the prompt itself, or the chat messages as canonical JSON."""
    if "messages" in body:
        return json.dumps(body["messages"], sort_keys=True, ensure_ascii=False)
    if "input" in body:
        return json.dumps([body.get("instructions"), body["input"]], sort_keys=True, ensure_ascii=False)
    return body["prompt"]


def error_body(message: str, type_: str, code: str) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def _status_error(status: int) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_body(*_ERRORS.get(status, (f"status {status} (injected)", kind, str(status))))


class FakeServer:
    def __init__(self, faults: Faults | None = None):
        self.faults = faults or Faults()
        self.base_url = ""
        self.requests: list[Recorded] = []
        self.answers: dict[str, list[dict]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0  # accepted, over the server's life
        self.open_connections = 0  # being read or answered now
        self.litellm_windows = 0  # windows of litellm_rpm begun
        # fireworks_budgets: what is left of each, and every request admitted: (when, prompt, uncached, generated)
        self.budget_levels: list[float] | None = None
        self._budget_at = 0.0
        self.budget_used: list[tuple[float, int, int, int]] = []
        self.replica_caches: dict[int, list[str]] = {}  # replicas: each one's prompt prefixes, the newest last
        # replicas: (replica, x-session-affinity, prompt prefix) of each request answered
        self.replica_served: list[tuple[int, str | None, str]] = []
        self._cond = threading.Condition()  # guards the recorded state above, shared with test threads
        self._n = 0  # normal answers built so far, over the server's life
        self._path = ""  # of the request being answered
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._use_faults(self.faults)

    # ---- lifecycle, called from the test thread ----

    def start(self) -> FakeServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fakeserver", daemon=True)
        self._thread.start()
        ready.wait()
        if self._server is None:
            raise RuntimeError("fake server failed to start (see the thread's traceback)")
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def reset_stats(self) -> None:
        with self._cond:
            self.requests.clear()
            self.answers.clear()
            self.max_in_flight = 0
            self.litellm_windows = 0

    def count(self, key: str) -> int:
        with self._cond:
            return sum(1 for r in self.requests if r.key == key)

    def wait_for_requests(self, n: int, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(f"{len(self.requests)} requests arrived, expected {n}")

    def wait_for_no_connection(self, timeout: float = 30) -> None:
        """Until every connection has closed: a client killed mid-run may have left requests
        in its sockets that the server reads (and records) only after it has died."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.open_connections == 0, timeout):
                raise TimeoutError(f"{self.open_connections} connections still open")

    # ---- server loop thread ----

    def _run(self, ready: threading.Event) -> None:
        try:
            # A large backlog so hundreds of clients connecting at once are not refused.
            start = asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=2048)
            self._server = self._loop.run_until_complete(start)
        finally:
            ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        # Cancelling also ends handlers sleeping in hang/latency.  Loop because a
        # connection accepted just before close() registers its task only once it runs.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the closed transports run their connection_lost callbacks

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        with self._cond:
            self.open_connections += 1
        try:
            while (request := await _read_request(reader)) is not None:
                if not await self._respond(reader, writer, *request):
                    break
        except (ConnectionError, EOFError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent something unparsable: drop the connection
        finally:
            self._tasks.discard(task)
            writer.close()
            with self._cond:
                self.open_connections -= 1
                self._cond.notify_all()

    async def _respond(self, reader, writer, method: str, path: str, headers: dict[str, str], raw: bytes) -> bool:
        """Answer one request; return whether the connection stays open."""
        close = headers.get("connection", "").lower() == "close"
        # Requests rejected here are not recorded: they never reach the fault logic.
        if method != "POST" or path not in _ENDPOINTS:
            error = error_body(f"no route for {method} {path}", "invalid_request_error", "not_found")
            await _send(writer, 404, error, close=close)
            return not close
        body = _parse_body(path, raw)
        if body is None:
            await _send(writer, 400, error_body("malformed request body", "invalid_request_error", "invalid_body"),
                        close=close)
            return not close

        faults = self.faults
        key = request_key(body)
        # Decided before any await, so the random draws follow the arrival order.
        outcome, status, error = self._decide(faults, headers, body, key)
        gate = faults.hold(body) if faults.hold is not None else None
        stated: dict[str, str] = {}  # rate-limit headers for the answer
        with self._cond:
            if faults.max_in_flight is not None and self.in_flight >= faults.max_in_flight and error is None:
                outcome, status, error = "busy", 429, error_body(
                    "too many requests in flight (injected)", "rate_limit_error", "rate_limit_exceeded")
            elif faults.litellm_rpm is not None and error is None:
                stated = self._litellm_window(faults)
                if not stated:
                    outcome, status, error = "limited", 429, error_body(
                        "rate limit exceeded for api_key (injected)", "rate_limit_error", "rate_limit_exceeded")
            elif faults.openai_tpm is not None and error is None:
                stated = self._openai_tokens(faults.openai_tpm, body)
                if stated.pop("over", None):
                    outcome, status, error = "limited", 429, error_body(
                        "Rate limit reached for tokens per min (TPM) (injected)", "tokens", "rate_limit_exceeded")
            elif faults.fireworks_budgets is not None and error is None:
                stated = self._fireworks_budgets(faults.fireworks_budgets, key)
                if "x-ratelimit-over-limit" in stated:
                    outcome, status, error = "limited", 429, error_body(
                        "token budget exceeded (injected)", "rate_limit_error", "rate_limit_exceeded")
            self.requests.append(Recorded(path, headers, body, key, outcome))
            if outcome in ("busy", "limited"):
                self._cond.notify_all()
        if outcome in ("busy", "limited"):
            wait = faults.retry_after if outcome == "busy" else "1" if faults.fireworks_budgets or faults.openai_tpm else \
                f"{faults.litellm_window_s:g}"
            await _send(writer, 429, error, headers={"Retry-After": wait, **stated}, close=close)
            return not close
        with self._cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()
        try:
            if gate is not None and not await _wait_while_connected(reader, gate):
                return False
            delay = faults.latency_s + self._jitter.uniform(-faults.latency_jitter_s, faults.latency_jitter_s)
            if outcome == "hang":
                delay += faults.hang_s
            if not await _sleep_while_connected(reader, delay):
                return False
            if outcome == "raw":
                for chunk in error:
                    writer.write(chunk)
                    await writer.drain()
                return False
            if error is not None:
                retry = {"Retry-After": faults.retry_after} if status == 429 or status == 503 and faults.shed_503 else {}
                await _send(writer, status, error, headers=retry, close=close)
                return not close
            if outcome == "drop":
                return False
            if outcome == "invalid_json":
                await _send(writer, 200, b'{"id": "broken", "choices": [', close=close)
                return not close
            self._path = path
            answer = self._build_answer(body, key)
            if faults.replicas is not None and "messages" in body:
                answer["usage"]["prompt_tokens_details"]["cached_tokens"] = self._prefix_cached(faults, headers, body)
            stream = body.get("stream") is True
            sent_completely = outcome not in ("truncated_body", "truncated_stream")
            if sent_completely:
                # Recorded before writing, so a client that has read the whole answer
                # always finds it here: the answer is paid for once the server sends it.
                with self._cond:
                    self.answers.setdefault(key, []).append(answer)
            if stream:
                await _send_stream(writer, body, answer, outcome, faults.usage_style, close)
            else:
                await _send(writer, 200, answer, headers=stated, close=close, truncate=not sent_completely)
            return sent_completely and not close
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()  # a test may wait for the last one to end

    def _use_faults(self, faults: Faults) -> None:
        """A new Faults object starts afresh: its own seeded draws, no key seen yet."""
        self._faults_in_use = faults
        self._rng = random.Random(faults.seed)
        self._jitter = random.Random(f"jitter-{faults.seed}")  # separate, so jitter never shifts the draws
        self._seen_keys: set[str] = set()
        self._answered_keys: set[str] = set()
        self._invalid_rng = random.Random(f"invalid-{faults.seed}")
        self._replica_rng = random.Random(f"replica-{faults.seed}")
        self._window_began, self._window_count = float("-inf"), 0

    def _prefix_cached(self, faults: Faults, headers: dict[str, str], body: dict) -> int:
        """The request's cached prompt tokens on the replica it reaches (see Faults.replicas)."""
        affinity = headers.get("x-session-affinity")
        with self._cond:
            replica = int(affinity, 16) % faults.replicas if affinity else self._replica_rng.randrange(faults.replicas)
            prefix = json.dumps(body["messages"][:-1], sort_keys=True)
            cache = self.replica_caches.setdefault(replica, [])
            hit = prefix in cache
            if hit:
                cache.remove(prefix)
            cache.append(prefix)
            del cache[:-faults.replica_cache]
            self.replica_served.append((replica, affinity, prefix))
        return len(prefix) // 4 if hit and len(body["messages"]) > 1 else 0

    def _fireworks_budgets(self, limits: tuple[float, float, float], key: str) -> dict[str, str]:
        """Take a request's tokens from the three budgets as it is admitted: its answer's
        headers; with x-ratelimit-over-limit when one has not enough left (refused). Each
        budget is a bucket of a second's tokens, refilled at its rate: what a second of no
        use saves may be spent at once, and no more."""
        now = time.monotonic()
        if self.budget_levels is None:
            self.budget_levels, self._budget_at = list(limits), now
        elapsed, self._budget_at = now - self._budget_at, now
        levels = [min(limit, level + elapsed * limit) for level, limit in zip(self.budget_levels, limits)]
        prompt = len(key) // 4 + 1
        asked = (prompt, prompt, len(f"answer-0 to {key[:20]!r}".split()))  # (the cached tokens are few)
        over = any(a > level for a, level in zip(asked, levels))
        if not over:
            levels = [level - a for level, a in zip(levels, asked)]
            self.budget_used.append((now, *asked))
        self.budget_levels = levels
        names = ("prompt", "cache-adjusted-prompt", "generated")
        stated = {f"x-ratelimit-limit-tokens-{n}": f"{limit:g}" for n, limit in zip(names, limits)}
        stated |= {f"x-ratelimit-remaining-tokens-{n}": f"{level:.0f}" for n, level in zip(names, levels)}
        return {**stated, "x-ratelimit-over-limit": "yes"} if over else stated

    def _openai_tokens(self, tpm: int, body: dict) -> dict[str, str]:
        """Take a request's tokens as OpenAI books them on admission (its prompt / 4 plus its
        max_tokens × n) from a bucket of a second's tokens: its answer's headers, with "over"
        when it has not enough left (refused). The admitted go in `budget_used` (when, tokens)."""
        now, per_s = time.monotonic(), tpm / 60
        if self.budget_levels is None:
            self.budget_levels, self._budget_at = [per_s], now
        level = min(per_s, self.budget_levels[0] + (now - self._budget_at) * per_s)
        self._budget_at = now
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", ())) or len(str(body.get("prompt")))
        asked = prompt // 4 + int(body.get("max_tokens") or 16) * int(body.get("n") or 1)
        over = asked > level
        if not over:
            level -= asked
            self.budget_used.append((now, asked, 0, 0))
        self.budget_levels = [level]
        stated = {"x-ratelimit-limit-tokens": str(tpm), "x-ratelimit-remaining-tokens": f"{level * 60:.0f}"}
        return {**stated, "over": "yes"} if over else stated

    def _litellm_window(self, faults: Faults) -> dict[str, str]:
        """Count a request in litellm_rpm's window: its answer's headers, or {} when it is one over."""
        now = time.monotonic()
        if now - self._window_began >= faults.litellm_window_s:
            self._window_began, self._window_count = now, 0
            self.litellm_windows += 1
        self._window_count += 1
        admitted = faults.litellm_rpm * faults.litellm_window_s / 60
        if self._window_count > admitted:
            return {}
        left = (admitted - self._window_count) * 60 / faults.litellm_window_s
        return {"x-ratelimit-api_key-limit-requests": str(faults.litellm_rpm),
                "x-ratelimit-api_key-remaining-requests": f"{left:.0f}"}

    def _decide(self, faults: Faults, headers: dict[str, str], body: dict,
                key: str) -> tuple[str, int | None, dict | None]:
        """(outcome, status, error body); status and error body are None unless an error is to be answered."""
        if self._faults_in_use is not faults:
            self._use_faults(faults)
        if faults.require_key is not None and headers.get("authorization") != f"Bearer {faults.require_key}":
            return "401", 401, error_body("Invalid API key", "invalid_request_error", "invalid_api_key")
        if faults.raw_answer is not None and (chunks := faults.raw_answer(body)) is not None:
            return "raw", None, chunks  # the chunks stand where an error body would
        if faults.status_for is not None and (forced := faults.status_for(body)) is not None:
            return "status_for", *forced
        first = key not in self._seen_keys
        self._seen_keys.add(key)
        if first and faults.first_attempt_status is not None:
            return "first_attempt", faults.first_attempt_status, _status_error(faults.first_attempt_status)
        draw, edge = self._rng.random(), 0.0
        for outcome, rate_name in _DRAWN_FAULTS.items():
            edge += getattr(faults, rate_name)
            if draw < edge:
                if outcome.isdigit():
                    return outcome, int(outcome), _status_error(int(outcome))
                if outcome == "truncated_stream" and body.get("stream") is not True:
                    break  # only a stream can end early cleanly: a plain request is answered normally
                return outcome, None, None
        return "ok", None, None

    def _build_answer(self, body: dict, key: str) -> dict:
        """The non-stream response body; streams are cut from it, and it is what `answers` keeps."""
        self._n += 1
        n = self._n
        text = f"answer-{n} to {key[:20]!r}"
        prompt_tokens, completion_tokens = len(key) // 4 + 1, len(text.split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": n % 3}}
        common = {"created": int(time.time()), "model": body["model"]}
        if self._path == "/v1/embeddings":
            return _embeddings_answer(body, n)
        schema = _answer_schema(body)
        if schema is not None:
            faults = self.faults
            first = key not in self._answered_keys
            self._answered_keys.add(key)
            invalid = faults.invalid_answer_always or first and self._invalid_rng.random() < faults.invalid_answer_rate
            text = _schema_answer(schema, n, invalid)
        if "input" in body:
            return _response_answer(body, n, text, prompt_tokens)
        count = body["n"] if type(body.get("n")) is int and 1 <= body["n"] <= 16 else 1
        texts = [text] + [f"answer-{n}.{i} to {key[:20]!r}" for i in range(1, count)]
        usage["completion_tokens"] = sum(len(t.split()) for t in texts)
        usage["total_tokens"] = prompt_tokens + usage["completion_tokens"]
        if "messages" not in body:
            top = body.get("logprobs")
            choices = [{"index": i, "text": t, "finish_reason": "stop",
                        "logprobs": _legacy_logprobs(t, top) if type(top) is int else None}
                       for i, t in enumerate(texts)]
            answer = {"id": f"cmpl-{n}", "object": "text_completion", **common, "choices": choices, "usage": usage}
        else:
            choices = []
            for i, t in enumerate(texts):
                message = {"role": "assistant", "content": t}
                if "reason" in body["model"]:
                    message["reasoning_content"] = f"thinking-{n}" + (f".{i}" if i else "")
                    usage["completion_tokens_details"] = {"reasoning_tokens": 2}
                choice = {"index": i, "message": message, "finish_reason": "stop"}
                if body.get("logprobs") is True:
                    choice["logprobs"] = {"content": _chat_logprobs(t, body.get("top_logprobs") or 0)}
                choices.append(choice)
            answer = {"id": f"chatcmpl-{n}", "object": "chat.completion", **common, "choices": choices, "usage": usage}
        if type(body.get("max_tokens")) is int:
            answer["max_tokens_seen"] = body["max_tokens"]
        return answer


async def _send_stream(writer, body: dict, answer: dict, outcome: str, usage_style: str, close: bool) -> None:
    """SSE events over chunked transfer encoding; the truncating faults cut them short."""
    leading, final = _stream_chunks(answer, body, usage_style)
    def event(chunk: dict) -> str:  # Responses events are named; chat and completions chunks are not
        name = f"event: {chunk['type']}\n" if "type" in chunk else ""
        return f"{name}data: {json.dumps(chunk)}\n\n"

    events = [event(chunk) for chunk in leading]
    if outcome not in ("truncated_body", "truncated_stream"):
        events += [event(chunk) for chunk in final]
        if answer["object"] != "response":  # the Responses API sends no [DONE]
            events.append("data: [DONE]\n\n")
    close = close or outcome in ("truncated_body", "truncated_stream")
    writer.write(_head(200, "text/event-stream", {"Transfer-Encoding": "chunked"}, close))
    for event in events:
        data = event.encode()
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    if outcome != "truncated_body":  # truncated_body breaks the framing too: no terminating chunk
        writer.write(b"0\r\n\r\n")
    await writer.drain()


def _thirds(items: list) -> list[list]:
    cuts = [0, len(items) // 3, 2 * len(items) // 3, len(items)]
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


def _choice_payloads(choice: dict, chat: bool) -> list[dict]:
    """One choice's stream payloads; its log-probabilities are spread over them."""
    text = choice["message"]["content"] if chat else choice["text"]
    pieces = ["".join(p) for p in _thirds(list(text))]
    logprobs = choice.get("logprobs")
    if chat:
        deltas = [{"content": piece} for piece in pieces]
        if "reasoning_content" in choice["message"]:
            deltas.insert(0, {"reasoning_content": choice["message"]["reasoning_content"]})
        deltas[0] = {"role": "assistant", **deltas[0]}
        payloads = [{"index": choice["index"], "delta": delta} for delta in deltas]
        if logprobs:
            for payload, part in zip(payloads[-3:], _thirds(logprobs["content"])):
                payload["logprobs"] = {"content": part}
    else:
        payloads = [{"index": choice["index"], "text": piece, "logprobs": None} for piece in pieces]
        if logprobs:
            for payload, a, b, c in zip(payloads, *(_thirds(logprobs[k]) for k in
                                                    ("tokens", "token_logprobs", "top_logprobs"))):
                payload["logprobs"] = {"tokens": a, "token_logprobs": b, "top_logprobs": c}
    return payloads


def _stream_chunks(answer: dict, body: dict, usage_style: str) -> tuple[list[dict], list[dict]]:
    """SSE chunks equivalent to `answer`, split into (before the finish chunk, the finish chunk and after)."""
    if answer["object"] == "response":
        return _response_events(answer)
    chat = answer["object"] == "chat.completion"
    # Choices after the first are sent whole before choice 0's last chunk (servers interleave them)
    others = [_choice_payloads(c, chat) for c in answer["choices"][1:]]
    for payloads in others:
        payloads[-1]["finish_reason"] = "stop"
    later = [p for payloads in others for p in payloads]
    first = _choice_payloads(answer["choices"][0], chat)
    payloads = first[:-1] + later + first[-1:]
    base = {"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer["created"], "model": answer["model"]}
    if "max_tokens_seen" in answer:
        base["max_tokens_seen"] = answer["max_tokens_seen"]
    # OpenAI sends "usage": null on every chunk only when usage was asked for; Fireworks always does.
    openai_usage = usage_style == "openai" and bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = []
    for i, payload in enumerate(payloads):
        last = i == len(payloads) - 1
        chunk = {**base, "choices": [{"finish_reason": "stop" if last else None, **payload}]}
        if usage_style == "fireworks":
            chunk["usage"] = answer["usage"] if last else None
        elif openai_usage:
            chunk["usage"] = None
        chunks.append(chunk)
    if openai_usage:
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    finish = len(payloads) - 1
    return chunks[:finish], chunks[finish:]


def fake_vector(text: str, dims: int = 8) -> list[float]:
    """The fake server's embedding of `text`: float32 values, the same in every answer."""
    import hashlib
    import struct

    digest = hashlib.sha256(text.encode()).digest() * (dims // 32 + 1)
    raw = [(digest[j] - 128) / 37.0 for j in range(dims)]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *raw)))


def _embeddings_answer(body: dict, n: int) -> dict:
    import base64
    import struct

    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    dims = body["dimensions"] if type(body.get("dimensions")) is int else 8
    data = []
    for i, text in enumerate(inputs):
        vector = fake_vector(text, dims)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(len(text) // 4 + 1 for text in inputs)
    return {"object": "list", "id": f"emb-{n}", "model": body["model"], "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _answer_schema(body: dict) -> dict | None:
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return response_format["json_schema"]["schema"]
    return None


def _schema_answer(schema: dict, n: int, invalid: bool) -> str:
    """An object valid against `schema` (strings, integers, booleans, arrays, objects), or,
    when `invalid`, text that is not JSON (odd n) or misses its first required field."""
    def value(sub: dict) -> object:
        kind = sub.get("type")
        if kind == "object":
            return {name: value(prop) for name, prop in sub.get("properties", {}).items()}
        if kind == "array":
            return [value(sub.get("items", {})) for _ in range(n % 3 + 1)]
        return {"string": f"s-{n}", "integer": n, "number": n / 4, "boolean": n % 2 == 0}.get(kind, None)

    answer = value(schema)
    if invalid:
        if n % 2:
            return json.dumps(answer)[:-3]
        answer.pop(schema.get("required", [next(iter(answer))])[0], None)
    return json.dumps(answer)


def _chat_logprobs(text: str, top: int) -> list[dict]:
    tokens = text.split(" ")
    tokens = [t + " " for t in tokens[:-1]] + tokens[-1:]
    return [{"token": t, "logprob": -0.1 * (k + 1), "bytes": list(t.encode()),
             "top_logprobs": [{"token": t if j == 0 else f"alt{j}", "logprob": -0.1 * (k + 1) - j, "bytes": None}
                              for j in range(top)]} for k, t in enumerate(tokens)]


def _legacy_logprobs(text: str, top: int) -> dict:
    entries = _chat_logprobs(text, max(top, 0))
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": list(range(len(entries)))}


def _response_answer(body: dict, n: int, text: str, prompt_tokens: int) -> dict:
    """A Responses API answer: cut to max_output_tokens words (status incomplete) when asked."""
    words = text.split(" ")
    limit = body.get("max_output_tokens")
    incomplete = type(limit) is int and limit < len(words)
    if incomplete:
        words = words[:limit]
    output = []
    reasoning = 0
    if "reason" in body["model"]:
        reasoning = 2
        output.append({"type": "reasoning", "id": f"rs-{n}", "summary": [{"type": "summary_text",
                                                                          "text": f"thinking-{n}"}]})
    output.append({"type": "message", "id": f"msg-{n}", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": " ".join(words), "annotations": []}]})
    completion = len(words) + reasoning
    return {"id": f"resp-{n}", "object": "response", "created_at": int(time.time()), "model": body["model"],
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output, "store": body.get("store", True),
            "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": n % 3},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                      "total_tokens": prompt_tokens + completion}}


def _response_events(answer: dict) -> tuple[list[dict], list[dict]]:
    """Responses streaming: created, text deltas, then the terminal event with the whole response."""
    text = answer["output"][-1]["content"][0]["text"]
    created = {**answer, "status": "in_progress", "output": [], "usage": None}
    leading = [{"type": "response.created", "response": created}]
    leading += [{"type": "response.output_text.delta", "item_id": answer["output"][-1]["id"], "output_index": 0,
                 "content_index": 0, "delta": "".join(piece)} for piece in _thirds(list(text))]
    final = {"type": "response.completed" if answer["status"] == "completed" else "response.incomplete",
             "response": answer}
    return leading, [final]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """Read one request as (method, path, headers, body), or None on a clean EOF between requests."""
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    request_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    for line in filter(None, header_lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target.partition("?")[0], headers, body


def _parse_body(path: str, raw: bytes) -> dict | None:
    """The JSON request body if it is well-formed for the endpoint, else None."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    if path == "/v1/completions":
        return body if isinstance(body.get("prompt"), str) else None
    if path == "/v1/responses":
        return body if isinstance(body.get("input"), (str, list)) else None
    if path == "/v1/embeddings":
        inputs = body.get("input")
        ok = isinstance(inputs, str) or isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)
        return body if ok else None
    return body if isinstance(body.get("messages"), list) else None


def _head(status: int, content_type: str, headers: dict[str, str], close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Unknown')}", f"Content-Type: {content_type}",
             *(f"{name}: {value}" for name, value in headers.items()),
             f"Connection: {'close' if close else 'keep-alive'}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _send(writer, status: int, payload: dict | bytes, *, headers: dict[str, str] | None = None,
               close: bool = False, truncate: bool = False) -> None:
    """Send a JSON response; with truncate, announce the full length but write only the first half."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    writer.write(_head(status, "application/json", {**(headers or {}), "Content-Length": str(len(data))}, close))
    writer.write(data[: len(data) // 2] if truncate else data)
    await writer.drain()


async def _sleep_while_connected(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Sleep; return False early if the client closes its end (e.g. after its own timeout)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.05))
        if reader.at_eof():
            return False
    return True


async def _wait_while_connected(reader: asyncio.StreamReader, gate: threading.Event) -> bool:
    """Wait for `gate`; return False early if the client closes its end."""
    while not gate.is_set():
        await asyncio.sleep(0.02)
        if reader.at_eof():
            return False
    return True
