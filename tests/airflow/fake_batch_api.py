"""The fakes of OpenAI's Batch API and live API as a process of their own, for the Airflow
batch example: its tasks are processes that outlive any one Python test, so the fakes
must be reachable from all of them and remember every batch across the DAG run.

    fake_batch_api.py URLS REPORT [POLLS]

Writes URLS (JSON: `batch_url`, `live_url`, `api_key`) once both listen on 127.0.0.1, then
serves until SIGTERM, when it writes REPORT (JSON: what each batch saw, what went live)
and exits. A batch ends at its POLLS-th retrieval (default 3): `batchrun submit` asks
after the batch it has just made, the sensor's first poke finds it still out, and its
second collects it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fakebatch import BatchFaults, FakeBatchAPI  # noqa: E402
from tests.fakeserver import FakeServer, Faults  # noqa: E402

API_KEY = "sk-airflow-batch-example"  # not a real key: the fakes refuse any other


def main(urls: Path, report: Path, polls: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    with FakeBatchAPI(BatchFaults(seed=20), polls_to_finish=polls, api_key=API_KEY) as batches, \
            FakeServer(Faults(require_key=API_KEY)) as live:
        _write(urls, {"batch_url": batches.base_url, "live_url": live.base_url, "api_key": API_KEY})
        stop.wait()
        with batches.lock:
            made = [batches.batches[c.batch_id] for c in batches.created]
            seen = {"batches": [{"id": b.obj["id"], "rows": len(b.rows), "polls": b.polls, "state": b.obj["status"]}
                                for b in made],
                    "in_two_batches": sorted(batches.custom_ids_in_two_batches()),
                    "live_requests": len(live.requests)}
    _write(report, seen)


def _write(path: Path, data: dict) -> None:
    """Whole or not at all: the script waits for the file to appear, then reads it."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
