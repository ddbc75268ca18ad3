"""The floor: a bare aiohttp loop, the least client work per request in Python here.

    python tests/bench/bare_aiohttp.py INPUT.jsonl BASE_URL CONCURRENCY [--model bench]

One ClientSession, CONCURRENCY workers sharing the rows, no retries, no checkpoint,
no output file, no input validation and no first-row check: what is left is the
interpreter, its imports and the requests. Prints one summary line.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import clientkit


async def run(path: str, base_url: str, concurrency: int, model: str) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    url = base_url.rstrip("/") + "/completions"
    pending = iter(rows)
    answers: dict[str, tuple[str, int]] = {}
    failed: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for row in pending:
            body = {"model": model, "prompt": row["prompt"], "max_tokens": 16}
            try:
                async with session.post(url, json=body, headers={"authorization": "Bearer bench"}) as response:
                    data = await response.json()
                answers[row["id"]] = (data["choices"][0]["text"], data["usage"]["total_tokens"])
            except (aiohttp.ClientError, KeyError, ValueError) as exc:
                failed.append(f"{row['id']}: {exc!r}")

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    tokens = sum(t for _, t in answers.values())
    return clientkit.report("bare aiohttp", len(rows), len(answers), failed, tokens, elapsed)


if __name__ == "__main__":
    clientkit.main(run, "bare aiohttp loop: the floor of client cost")
