"""The floor on batchrun's own transport: a bare loop over `batchrun.http.wire.WireTransport`.

    python tests/bench/bare_wire.py INPUT.jsonl BASE_URL CONCURRENCY [--model bench]

`bare_aiohttp.py`'s loop, each request sent through the wire transport instead of an
aiohttp session: CONCURRENCY workers sharing the rows, no retries, no checkpoint, no
output file. What batchrun adds to its transport is the gap between this and batchrun.
"""

from __future__ import annotations

import asyncio
import json
import time

import clientkit
import httpx

from batchrun.http.wire import WireTransport


async def run(path: str, base_url: str, concurrency: int, model: str) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    url = base_url.rstrip("/") + "/completions"
    host = httpx.URL(url).netloc.decode()
    pending = iter(rows)
    answers: dict[str, tuple[str, int]] = {}
    failed: list[str] = []
    transport = WireTransport(max_connections=concurrency, timeout_s=600)

    async def worker() -> None:
        for row in pending:
            body = json.dumps({"model": model, "prompt": row["prompt"], "max_tokens": 16}).encode()
            headers = [("host", host), ("content-type", "application/json"), ("authorization", "Bearer bench"),
                       ("content-length", str(len(body)))]
            try:
                data = json.loads((await transport.exchange(url, headers, body)).content)
                answers[row["id"]] = (data["choices"][0]["text"], data["usage"]["total_tokens"])
            except (httpx.TransportError, KeyError, ValueError) as exc:
                failed.append(f"{row['id']}: {exc!r}")

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await transport.aclose()
    elapsed = time.monotonic() - started
    tokens = sum(t for _, t in answers.values())
    return clientkit.report("bare wire", len(rows), len(answers), failed, tokens, elapsed)


if __name__ == "__main__":
    clientkit.main(run, "bare loop over batchrun's wire transport")
