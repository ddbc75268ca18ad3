"""The baseline: what most users write instead of batchrun.

    python tests/bench/baseline_openai.py INPUT.jsonl BASE_URL CONCURRENCY [--model bench]

The official SDK's AsyncOpenAI with its default retries, a semaphore for concurrency,
one task per row, answers and usage kept in memory; nothing is written (so no
checkpoint, no output file: batchrun does strictly more work). Prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

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
    print(f"baseline: {len(rows)} rows: {len(results)} ok, {len(failed)} failed; {tokens} tokens; {elapsed:.1f} s"
          + (f"; first error: {failed[0]!r}" if failed else ""))
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="AsyncOpenAI + asyncio.Semaphore baseline")
    parser.add_argument("input", help="JSONL rows {'id': ..., 'prompt': ...}")
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--model", default="bench")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.input, args.base_url, args.concurrency, args.model)))


if __name__ == "__main__":
    main()
