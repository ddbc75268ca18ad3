"""A fast fake OpenAI-compatible HTTP/1.1 server for benchmarks (stdlib only).

    python tests/bench/server.py --port 0 --latency-ms 0 --jitter-ms 0 [--rpm-limit N] --stats FILE

Prints `READY <port>` once listening on 127.0.0.1. Answers `POST .../completions` and
`.../chat/completions` with a valid completion / chat.completion (usage included, the
text numbered per request), `.../embeddings` with a vector per input (base64 or floats,
as asked; its body is parsed to count the inputs), anything else with 404. On SIGTERM or SIGINT it writes JSON
stats to FILE and exits.

Unlike tests/fakeserver.py (fault injection, full parsing, a task per request) this one
is built to be cheaper than any client it measures: an `asyncio.Protocol` per
connection, only the request line and Content-Length parsed, responses assembled from
precomputed byte templates, delays via `loop.call_later` (one timer, no task).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import math
import random
import resource
import signal
import struct
import sys
import time

# The answer bodies, split around the per-request parts (request number, prompt tokens).
# `%d` formatting on bytes is the cheapest way to fill them in.
_COMPLETION = (
    b'{"id":"cmpl-%d","object":"text_completion","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"text":"bench answer %d","logprobs":null,"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":%d,"completion_tokens":3,"total_tokens":%d}}'
)
_CHAT = (
    b'{"id":"chatcmpl-%d","object":"chat.completion","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"bench answer %d"},'
    b'"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":%d,"completion_tokens":3,"total_tokens":%d}}'
)
_HEAD_200 = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
_HEAD_404 = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
_HEAD_429 = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
_BODY_404 = b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}'
_BODY_429 = (
    b'{"error":{"message":"Rate limit reached for requests","type":"requests",'
    b'"code":"rate_limit_exceeded"}}'
)
_CLOSE = b"connection: close\r\n"
_MAX_HEAD = 64 * 1024  # a request head longer than this is garbage: drop the connection


class Stats:
    """Counts per second since the first request; written as JSON at exit."""

    def __init__(self) -> None:
        self.t0: float | None = None  # monotonic time of the first request
        self.last: float = 0.0  # monotonic time of the last response sent
        self.requests = 0
        self.throttled = 0  # 429s
        self.received: list[int] = []  # per second: requests received
        self.ok: list[int] = []  # per second: 200s sent

    @staticmethod
    def _bump(series: list[int], second: int) -> None:
        while len(series) <= second:
            series.append(0)
        series[second] += 1

    def on_request(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now
        self.requests += 1
        self._bump(self.received, int(now - self.t0))

    def on_ok(self, now: float) -> None:
        self._bump(self.ok, int(now - self.t0))  # type: ignore[operator]

    def dump(self, path: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        span = (self.last - self.t0) if self.t0 is not None else 0.0
        data = {
            "requests": self.requests,
            "throttled_429": self.throttled,
            "span_s": span,  # first request received -> last response sent
            "first_at": self.t0, "last_at": self.last,  # monotonic: the client's lead and tail
            "cpu_s": usage.ru_utime + usage.ru_stime,  # the server's own CPU, whole life
            "received_per_s": self.received,
            "ok_per_s": self.ok,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)


class TokenBucket:
    """Server-side request limit: a token bucket, not a sliding 60 s window.

    Capacity is `burst_s` seconds' worth of requests (N/60 * burst_s), refilled
    continuously at N/60 per second: this is how OpenAI describes its own limits
    (replenished continuously, no minute boundary), and unlike a sliding window it
    never lets a client spend a whole minute's budget in its first second.
    """

    def __init__(self, rpm: int, burst_s: float = 3.0, silent: bool = False) -> None:
        self.limit = rpm
        self.silent = silent  # no x-ratelimit-* headers: the client must infer the limit from 429s
        self.rate = rpm / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self, now: float) -> tuple[bool, bytes]:
        """Spend a token if there is one; return (allowed, the x-ratelimit/retry headers)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        allowed = self.tokens >= 1.0
        if allowed:
            self.tokens -= 1.0
        # Seconds until the bucket is full again (OpenAI's meaning of reset-requests) and
        # until the next token (what a throttled client must wait).
        reset = (self.capacity - self.tokens) / self.rate
        head = b"" if self.silent else (
            b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
            b"x-ratelimit-reset-requests: %.3fs\r\n" % (self.limit, int(self.tokens), reset)
        )
        if not allowed:
            wait = (1.0 - self.tokens) / self.rate
            head += b"retry-after: %d\r\n" % max(1, math.ceil(wait))
        return allowed, head


class Server:
    """Shared state of all connections."""

    def __init__(self, latency_s: float, jitter_s: float, bucket: TokenBucket | None,
                 max_in_flight: int = 0, retry_after: int = 60) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_in_flight = max_in_flight  # 0: no limit; else one more is refused at once (429)
        self.retry_after = retry_after
        self.in_flight = 0
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.bucket = bucket
        self.stats = Stats()
        self.counter = 0
        self.set_dims(256)

    def set_dims(self, dims: int) -> None:
        values = [math.sin(i) for i in range(dims)]
        self.vector_b64 = b'"%s"' % base64.b64encode(struct.pack(f"<{dims}f", *values))
        self.vector_floats = json.dumps(list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *values)))).encode()

    def embeddings(self, body: bytes) -> bytes:
        """One vector of --embed-dims float32 per input (base64 unless the request asks for
        floats): the request is parsed, as it must be to count its inputs."""
        request = json.loads(body)
        inputs = request["input"] if isinstance(request["input"], list) else [request["input"]]
        b64 = request.get("encoding_format", "float") == "base64"
        vector = self.vector_b64 if b64 else self.vector_floats
        self.counter += 1
        tokens = sum(len(text) for text in inputs) // 4 + len(inputs)
        items = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, vector)
                          for i in range(len(inputs)))
        return (b'{"object":"list","data":[%s],"model":"bench","usage":{"prompt_tokens":%d,"total_tokens":%d}}'
                % (items, tokens, tokens))

    def delay(self) -> float:
        if not self.jitter_s:
            return self.latency_s
        return max(0.0, self.latency_s + random.uniform(-self.jitter_s, self.jitter_s))


class Connection(asyncio.Protocol):
    """One keep-alive connection. Pipelined requests are answered in order: each gets a
    slot in `pending`, and a slot is written only once every slot before it was."""

    __slots__ = ("server", "transport", "buf", "pending", "closing")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: collections.deque[list] = collections.deque()  # [ready, response bytes, ok?]
        self.closing = False  # the client asked for `connection: close`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # timers still pending find it gone and do nothing
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        # Consume every complete request in the buffer; keep the rest for the next read.
        while not self.closing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self.transport.close()  # type: ignore[union-attr]
                return
            head = bytes(buf[:end]).lower()
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 17)
                length = int(head[i + 17 : j if j >= 0 else None])
            total = end + 4 + length
            if len(buf) < total:
                return  # the body is still coming
            body = bytes(buf[end + 4:total]) if b"/embeddings " in head[:200] else b""
            del buf[:total]
            if b"\r\nconnection: close" in head:
                self.closing = True
            self.handle(head, length, body)

    def handle(self, head: bytes, body_len: int, body: bytes = b"") -> None:
        server = self.server
        now = time.monotonic()
        server.stats.on_request(now)
        line = head[: head.find(b"\r\n")]
        close = _CLOSE if self.closing else b""
        if line.startswith(b"post ") and b"/embeddings " in line:
            answer = server.embeddings(body)
            self.queue(server.delay(), _HEAD_200 + b"content-length: %d\r\n%s\r\n" % (len(answer), close) + answer,
                       True)
            return
        if not line.startswith(b"post ") or b"completions " not in line:
            self.queue(0.0, _HEAD_404 + b"content-length: %d\r\n%s\r\n" % (len(_BODY_404), close) + _BODY_404, False)
            return
        limit_head = b""
        if server.bucket is not None:
            allowed, limit_head = server.bucket.take(now)
            if not allowed:  # refused at once: a real API does not make you wait for a 429
                server.stats.throttled += 1
                self.queue(0.0, _HEAD_429 + limit_head + b"content-length: %d\r\n%s\r\n" % (len(_BODY_429), close)
                           + _BODY_429, False)
                return
        if server.max_in_flight:
            if server.in_flight >= server.max_in_flight:  # as LiteLLM's max_parallel_requests does
                server.stats.throttled += 1
                self.queue(0.0, _HEAD_429 + b"retry-after: %d\r\ncontent-length: %d\r\n%s\r\n"
                           % (server.retry_after, len(_BODY_429), close) + _BODY_429, False)
                return
            server.in_flight += 1
        server.counter += 1
        n = server.counter
        prompt_tokens = 1 + body_len // 8  # a cheap stand-in: the body is not parsed
        template = _CHAT if b"/chat/" in line else _COMPLETION
        body = template % (n, n, prompt_tokens, prompt_tokens + 3)
        response = _HEAD_200 + limit_head + b"content-length: %d\r\n%s\r\n" % (len(body), close) + body
        self.queue(server.delay(), response, True)

    def queue(self, delay: float, response: bytes, ok: bool) -> None:
        if delay <= 0 and not self.pending:
            self.send(response, ok)  # the common zero-latency case: no slot, no timer
            return
        slot = [False, response, ok]
        self.pending.append(slot)
        if delay <= 0:
            self.ready(slot)
        else:
            self.server.loop.call_later(delay, self.ready, slot)

    def ready(self, slot: list) -> None:
        slot[0] = True
        pending = self.pending
        while pending and pending[0][0]:
            _, response, ok = pending.popleft()
            self.send(response, ok)

    def send(self, response: bytes, ok: bool) -> None:
        if ok and self.server.max_in_flight:
            self.server.in_flight -= 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        stats = self.server.stats
        stats.last = time.monotonic()
        if ok:
            stats.on_ok(stats.last)
        if self.closing and not self.pending:
            transport.close()


async def serve(args: argparse.Namespace) -> None:
    bucket = TokenBucket(args.rpm_limit, silent=args.no_ratelimit_headers) if args.rpm_limit else None
    server = Server(args.latency_ms / 1000, args.jitter_ms / 1000, bucket, args.max_in_flight, args.retry_after)
    server.set_dims(args.embed_dims)
    # A large backlog: hundreds of clients connect in the same millisecond, and the
    # default (100) would drop SYNs and add 1 s retransmit stalls to the measurement.
    listener = await server.loop.create_server(
        lambda: Connection(server), "127.0.0.1", args.port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        server.loop.add_signal_handler(sig, stop.set)
    port = listener.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await stop.wait()
    listener.close()
    server.stats.dump(args.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-in-flight", type=int, default=0, help="answer 429 beyond this many in flight")
    parser.add_argument("--retry-after", type=int, default=60, help="with --max-in-flight: its 429s' retry-after")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- on the latency")
    parser.add_argument("--rpm-limit", type=int, default=0, help="requests per minute; 0: no limit")
    parser.add_argument("--no-ratelimit-headers", action="store_true",
                        help="with --rpm-limit: answer 429 + retry-after but send no x-ratelimit-* headers")
    parser.add_argument("--stats", required=True, help="JSON stats written here at exit")
    parser.add_argument("--embed-dims", type=int, default=256, help="dimension of the embeddings answered")
    args = parser.parse_args()
    asyncio.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
