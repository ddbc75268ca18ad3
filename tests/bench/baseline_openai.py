"""The baseline: what most users write instead of batchrun.

    python tests/bench/baseline_openai.py INPUT.jsonl BASE_URL CONCURRENCY [--model bench]

The official SDK's AsyncOpenAI with its default retries, a semaphore for concurrency,
one task per row, answers and usage kept in memory; nothing is written (so no
checkpoint, no output file: batchrun does strictly more work). Prints one summary line.
"""

from __future__ import annotations

import asyncio
import json
import time

import clientkit
from openai import AsyncOpenAI


async def run(path: str, base_url: str, concurrency: int, model: str) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=2)
    semaphore = asyncio.Semaphore(concurrency)
    results: dict[str, tuple[str, int, int]] = {}

    async def one(row: dict) -> None:
        async with semaphore:
            response = await client.completions.create(model=model, prompt=row["prompt"], max_tokens=16)
        usage = response.usage
        results[row["id"]] = (response.choices[0].text, usage.prompt_tokens, usage.completion_tokens)

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(row) for row in rows), return_exceptions=True)
    elapsed = time.monotonic() - started
    await client.close()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    tokens = sum(p + c for _, p, c in results.values())
    return clientkit.report("baseline", len(rows), len(results), failed, tokens, elapsed)


if __name__ == "__main__":
    clientkit.main(run, "AsyncOpenAI + asyncio.Semaphore baseline")
