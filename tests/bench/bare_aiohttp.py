"""The floor: a bare aiohttp loop, the least client work per request in Python here.

    python tests/bench/bare_aiohttp.py INPUT.jsonl BASE_URL CONCURRENCY [--model bench]

One ClientSession, CONCURRENCY workers sharing the rows, no retries, no checkpoint,
no output file, no input validation and no first-row check: what is left is the
interpreter, its imports and the requests. Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


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
    print(f"bare aiohttp: {len(rows)} rows: {len(answers)} ok, {len(failed)} failed; {tokens} tokens; {elapsed:.1f} s"
          + (f"; first error: {failed[0]}" if failed else ""))
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp loop: the floor of client cost")
    parser.add_argument("input", help="JSONL rows {'id': ..., 'prompt': ...}")
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--model", default="bench")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.input, args.base_url, args.concurrency, args.model)))


if __name__ == "__main__":
    main()
