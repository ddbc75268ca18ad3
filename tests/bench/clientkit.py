"""What the benchmark's comparison clients share: their command line and summary line.

They run as scripts, so this file beside them is importable as `clientkit`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def main(run: Callable[[str, str, int, str], Coroutine[Any, Any, int]], description: str) -> None:
    """Parse `INPUT.jsonl BASE_URL CONCURRENCY [--model M]`, run, exit with its code."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input", help="JSONL rows {'id': ..., 'prompt': ...}")
    parser.add_argument("base_url", help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--model", default="bench")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.input, args.base_url, args.concurrency, args.model)))


def report(label: str, rows: int, ok: int, failures: list[Any], tokens: int, elapsed_s: float) -> int:
    """Print the one summary line; the exit code is 1 if any row failed."""
    print(f"{label}: {rows} rows: {ok} ok, {len(failures)} failed; {tokens} tokens; {elapsed_s:.1f} s"
          + (f"; first error: {failures[0]!r}" if failures else ""))
    return 1 if failures else 0
