"""The job's status for schedulers: `<output stem>.status.json` beside the output.

Replaced atomically (written under another name, then renamed) at the start of a run,
every `EVERY_S` seconds while it runs and once at its end, so a scheduler, a sensor or
`batchrun status JOB --json` reads a whole file at any moment:

    {"state": "running" | "finished" | "stopped", "reason": null | "why it stopped",
     "exit_code": null while running, then the CLI's exit code,
     "rows", "ok", "failed", "failed_for_good", "remaining",
     "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
     "lost_requests", "lost_usd" (a kill's requests in flight, with a budget: at their worst case),
     "requests", "rows_per_s", "eta_s", "started_at", "updated_at", "pid", "version", ...}
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..backends.shards import (
    Shard,
    dataset_folder,
    dataset_part,
    find_shards,
    input_rows,
    pull_shard_states,
    shard_output,
)
from ..storage.lock import lock_holder, lock_path
from ..storage.objects import Remote
from ..storage.state import StateStore, state_path

if TYPE_CHECKING:
    from ..spec.parse import JobSpec

__all__ = ["EVERY_S", "StatusFile", "job_status", "status_path"]

EVERY_S = 5.0


def status_path(output: Path) -> Path:
    return output.with_name(output.stem + ".status.json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusFile:
    """The status of one run; `write(...)` replaces the file with the counts given."""

    def __init__(self, path: Path, *, job: str, output: Path, rows: int) -> None:
        self.path = path
        self.fixed = {"job": job, "output": str(output), "rows": rows, "pid": os.getpid(), "version": __version__,
                      "started_at": _now()}
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
            "lost_usd": counts.get("lost_usd", 0.0), "requests": requests, "rows_per_s": round(rate, 3),
            "eta_s": round(remaining / rate, 1) if rate > 0 and state == "running" else None,
            "updated_at": _now(),
        }
        write_atomically(self.path, data)
        return data


    def stopped(self, reason: str, exit_code: int) -> None:
        """A run that stopped before it could count anything (a bad input, a damaged state)."""
        write_atomically(self.path, {"state": "stopped", "reason": reason, "exit_code": exit_code, **self.fixed,
                                     "updated_at": _now()})


def job_status(spec: JobSpec) -> dict[str, Any]:
    """The job's status: the running job's own status file, else counted from its state
    (with the last run's exit code and reason from its status file).

    A job run in shards has a `shards` list, each shard's status, and their sums (its
    `rows` and `remaining` count the shards not started too); it is finished once every
    shard is and the merged output exists. On object storage, from the newest states and
    statuses there are (a job running here has them already).
    """
    remote = Remote(spec.output_url, spec.output) if spec.output_url else None
    on_store = pull_shard_states(remote, spec.output) if remote is not None else set()
    shards = find_shards(spec.output)
    if not shards:
        return _remote_status(spec, remote) if remote is not None else _status_of(spec.name, spec.output)
    count = next(iter(shards)).count
    parts = []
    for shard in shards:
        output = shard_output(spec.output, shard)
        if remote is not None and not lock_holder(state_path(output)) and status_path(output).name in on_store:
            remote.pull(status_path(output))  # the last run's exit code and reason, wherever it ran
        part = _status_of(spec.name, output, published=output.name in on_store if remote is not None else None)
        where = remote.url_of(output) if remote is not None else str(output)
        parts.append({"shard": str(shard), **{k: v for k, v in part.items() if k not in ("job", "version")},
                      "output": where})
    states = {part["state"] for part in parts}
    if remote is not None:
        merged = remote.exists(spec.output) or remote.exists(dataset_folder(spec.output) / dataset_part(0, count))
    else:
        merged = spec.output.exists() or dataset_folder(spec.output).is_dir()
    state = ("running" if "running" in states else
             "finished" if states == {"finished"} and len(parts) == count and merged else "stopped")
    total = {name: sum(part.get(name) or 0 for part in parts)
             for name in ("rows", "ok", "failed", "failed_for_good", "remaining", "prompt_tokens",
                          "completion_tokens", "total_tokens", "lost_requests", "lost_usd")}
    rows = input_rows(shards)
    if rows is not None:  # the shards not started (or not begun) have their rows to go too
        total["rows"], total["remaining"] = rows, max(0, rows - total["ok"] - total["failed"])
    costs = [part["cost_usd"] for part in parts if part.get("cost_usd") is not None]
    missing = [str(i) for i in range(count) if Shard(i, count) not in shards]
    reason = (f"shard{'s' * (len(missing) > 1)} {', '.join(missing)} of {count} not started" if missing else
              "every shard finished; not merged yet: batchrun merge" if states == {"finished"} and not merged
              else None)
    # The job's: the worst of its shards', once each has one and the job is over (done, or
    # a shard stopped it); None while it runs or waits for a shard or the merge
    codes = [part.get("exit_code") for part in parts]
    exit_code = None
    if state != "running" and not missing and None not in codes and (state == "finished" or max(codes) > 0):
        exit_code = max(codes)
    return {"job": spec.name, "output": spec.output_url or str(spec.output), "state": state, "reason": reason,
            "exit_code": exit_code, "version": __version__, "shard_count": count, **total,
            "cost_usd": sum(costs) if costs else None, "shards": parts}


def _remote_status(spec: JobSpec, remote: Remote) -> dict[str, Any]:
    state = state_path(spec.output)
    if not lock_holder(state):  # a job running here has the newest state and status already
        remote.pull_state(state)
        remote.pull(status_path(spec.output))
    published = remote.exists(spec.output)
    return {**_status_of(spec.name, spec.output, published=published), "output": spec.output_url}


def _status_of(job: str, output: Path, *, published: bool | None = None) -> dict[str, Any]:
    """`published`: the output is in place (where it is not a local file)."""
    path = state_path(output)
    saved = read(status_path(output)) or {}
    holder = lock_holder(path)
    pid = int(holder) if holder and holder.isdigit() else None  # "unknown": its pid is not written yet
    if holder and saved.get("state") == "running" and saved.get("pid") == pid:
        return saved
    base = {"job": job, "output": str(output), "pid": pid, "version": __version__}
    try:
        store = StateStore.open(path, lock=False)
    except FileNotFoundError:
        return {**base, "state": "not started", "reason": None, "exit_code": None}
    try:
        meta, counts = store.meta(), store.counts()
    finally:
        store.close()
    rows = meta.get("rows", 0)
    if meta.get("shard"):  # a shard's own rows
        start, stop = Shard(*meta["shard"]).bounds(rows)
        rows = stop - start
    remaining = max(0, rows - counts["ok"] - counts["failed"])
    done = output.exists() if published is None else published
    state = "running" if holder else ("finished" if remaining == 0 and done else "stopped")
    last_run = saved if saved.get("state") != "running" else {}
    # A run that has not written its status yet (it is still checking its input): what is known
    running = {"started_at": _lock_taken(path), "requests": None, "rows_per_s": None, "eta_s": None} if holder else {}
    return {**base, "state": state, "reason": last_run.get("reason"), "exit_code": last_run.get("exit_code"),
            "rows": rows, **counts, "remaining": remaining, **running, "updated_at": saved.get("updated_at")}


def _lock_taken(state: Path) -> str | None:
    """When the running job took its lock (and wrote its pid into it): its start, near enough."""
    try:
        taken = lock_path(state).stat().st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(taken, timezone.utc).isoformat(timespec="seconds")


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
