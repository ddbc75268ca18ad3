"""The status file a run writes for schedulers: `<output stem>.status.json` beside the output.

Replaced atomically (written under another name, then renamed) at the start of a run,
every `EVERY_S` seconds while it runs and once at its end, so a scheduler, a sensor or
`batchrun status JOB --json` reads a whole file at any moment:

    {"state": "running" | "finished" | "stopped", "reason": null | "why it stopped",
     "exit_code": null while running, then the CLI's exit code,
     "rows", "ok", "failed", "failed_for_good", "remaining",
     "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
     "lost_requests", "lost_usd", "lost_tokens" (with a budget: requests that may have been paid
     for with no answer kept, a kill's in flight, a timed-out one, a 2xx that could not be read;
     at their worst case),
     "from_batches" (rows answered through a provider's batch API), "batches" (with batch_api),
     "requests", "rows_per_s", "eta_s", "started_at", "updated_at", "pid", "version", ...}

The engine writes it (`StatusFile`); tools/status.py reads it, with the job's states,
into `batchrun status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._version import __version__

__all__ = ["EVERY_S", "StatusFile", "now_iso", "read", "status_path", "write_atomically"]

EVERY_S = 5.0


def status_path(output: Path) -> Path:
    return output.with_name(output.stem + ".status.json")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusFile:
    """The status of one run; `write(...)` replaces the file with the counts given."""

    def __init__(self, path: Path, *, job: str, output: Path, rows: int) -> None:
        self.path = path
        self.fixed = {"job": job, "output": str(output), "rows": rows, "pid": os.getpid(), "version": __version__,
                      "started_at": now_iso()}
        self._last: tuple[float, int] | None = None  # (when, rows settled) at the previous write
        self._started = time.monotonic()
        self._settled_at_start: int | None = None

    def write(self, counts: dict[str, Any], *, requests: int, state: str = "running", reason: str | None = None,
              exit_code: int | None = None) -> dict[str, Any]:
        now = time.monotonic()
        settled = counts["ok"] + counts["failed"]
        if self._settled_at_start is None:
            self._settled_at_start = settled
        # The current rate: since the previous write (the start, at first)
        since, before = self._last or (self._started, self._settled_at_start)
        rate = (settled - before) / (now - since) if now > since else 0.0
        self._last = (now, settled)
        remaining = max(0, self.fixed["rows"] - settled)
        data = {
            "state": state, "reason": reason, "exit_code": exit_code, **self.fixed,
            "ok": counts["ok"], "failed": counts["failed"], "failed_for_good": counts.get("failed_for_good", 0),
            "remaining": remaining, "prompt_tokens": counts["prompt_tokens"],
            "completion_tokens": counts["completion_tokens"], "total_tokens": counts["total_tokens"],
            "cost_usd": counts.get("cost_usd"), "lost_requests": counts.get("lost_requests", 0),
            "lost_usd": counts.get("lost_usd", 0.0), "lost_tokens": counts.get("lost_tokens", 0),
            "from_batches": counts.get("from_batches", 0),
            "requests": requests, "rows_per_s": round(rate, 3),
            "eta_s": round(remaining / rate, 1) if rate > 0 and state == "running" else None,
            "updated_at": now_iso(),
        }
        write_atomically(self.path, data)
        return data


    def stopped(self, reason: str, exit_code: int) -> None:
        """A run that stopped before it could count anything (a bad input, a damaged state)."""
        write_atomically(self.path, {"state": "stopped", "reason": reason, "exit_code": exit_code, **self.fixed,
                                     "updated_at": now_iso()})


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    """Never half a file: a reader sees the previous one or this one. A status that
    cannot be written is not worth stopping the job for: the state holds the truth."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        # the owner's only, like every file beside the output, whatever the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o600)
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
