"""The fakes a batch benchmark talks to, in a process of their own, so that the CPU they
spend (building 100,000 answers, parsing uploads) is never counted as batchrun's.

    python tests/bench/batchfakes.py --stats FILE [--polls-to-finish N] [--live]

Serves tests/fakebatch.py's FakeBatchAPI (OpenAI's Files + Batches API) and, with
`--live`, tests/fakeserver.py's FakeServer (the live API) on 127.0.0.1; prints
`READY <batch base URL> <live base URL or ->`, and on SIGTERM writes to FILE what they
received (batches, custom ids, any id in two batches, live requests) and their CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.fakebatch import BatchFaults, FakeBatchAPI  # noqa: E402 - after the path is set
from tests.fakeserver import FakeServer, Faults  # noqa: E402

API_KEY = "bench-dummy-key"  # the key run.py's child_env() gives every client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stats", required=True, type=Path)
    parser.add_argument("--polls-to-finish", type=int, default=2, help="0: batches never move on their own")
    parser.add_argument("--live", action="store_true", help="also serve the live fake")
    args = parser.parse_args()

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    batches = FakeBatchAPI(BatchFaults(seed=1), polls_to_finish=args.polls_to_finish or None, api_key=API_KEY)
    with batches, (FakeServer(Faults()) if args.live else contextlib.nullcontext()) as live:
        print("READY", batches.base_url, live.base_url if live is not None else "-", flush=True)
        done.wait()
        with batches.lock:
            stats = {
                "batches": len(batches.created),
                "custom_ids": sum(len(c.custom_ids) for c in batches.created),
                "custom_ids_in_two_batches": len(batches.custom_ids_in_two_batches()),
                "uploads": len(batches.uploads),
                "states": sorted(b.obj["status"] for b in batches.batches.values()),
                "live_requests": len(live.requests) if live is not None else 0,
            }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = usage.ru_utime + usage.ru_stime
    args.stats.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
