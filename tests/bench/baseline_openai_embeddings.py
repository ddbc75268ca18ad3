"""The embeddings baseline: what most users write instead of batchrun.

    python tests/bench/baseline_openai_embeddings.py INPUT.jsonl BASE_URL CONCURRENCY [--batch 64]

The official SDK's AsyncOpenAI `embeddings.create` (base64 on the wire, as the SDK asks
by default), BATCH rows a request, a semaphore for concurrency; vectors and usage kept in
memory, nothing written. Prints one summary line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import clientkit
from openai import AsyncOpenAI

BATCH = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 64
if "--batch" in sys.argv:
    del sys.argv[sys.argv.index("--batch"):sys.argv.index("--batch") + 2]


async def run(path: str, base_url: str, concurrency: int, model: str) -> int:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=2)
    semaphore = asyncio.Semaphore(concurrency)
    vectors: dict[str, list[float]] = {}
    tokens = 0

    async def one(group: list[dict]) -> None:
        nonlocal tokens
        async with semaphore:
            response = await client.embeddings.create(model=model, input=[row["input"] for row in group])
        for row, item in zip(group, response.data):
            vectors[row["id"]] = item.embedding
        tokens += response.usage.total_tokens

    groups = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(group) for group in groups), return_exceptions=True)
    elapsed = time.monotonic() - started
    await client.close()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    return clientkit.report("baseline embeddings", len(rows), len(vectors), failed, tokens, elapsed)


if __name__ == "__main__":
    clientkit.main(run, "AsyncOpenAI embeddings.create + asyncio.Semaphore baseline")
