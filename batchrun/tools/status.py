"""`batchrun status`: a job's status, from the status file each run writes beside its
output (its fields: `engine.status`) and, where none is running, from its state; for a
sharded job, the shards' own statuses and their sums."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import UsageError
from .._version import __version__
from ..backends.layout import (
    Shard,
    dataset_folder,
    dataset_part,
    find_shards,
    input_rows,
    pull_shard_states,
    shard_output,
    shard_sums,
)
from ..engine.status import read, status_path
from ..storage import Store, open_store
from ..storage.lock import lock_holder, lock_path
from ..storage.state import StateStore, differences, state_path

if TYPE_CHECKING:
    from ..spec.parse import JobSpec

__all__ = ["job_status"]


def job_status(spec: JobSpec) -> dict[str, Any]:
    """The job's status: the running job's own status file, else counted from its state
    (with the last run's exit code and reason from its status file).

    A job run in shards has a `shards` list, each shard's status, and their sums (its
    `rows` and `remaining` count the shards not started too); it is finished once every
    shard is and the merged output exists. On object storage, from the newest states and
    statuses there are (a job running here has them already).
    """
    storage = open_store(spec)
    published = pull_shard_states(storage, spec.output)
    shards = find_shards(spec.output)
    if not shards:
        return _whole_status(spec, storage)
    count = next(iter(shards)).count
    parts = []
    for shard in shards:
        output = shard_output(spec.output, shard)
        if status_path(output).name in published and not lock_holder(state_path(output)):
            storage.pull_file(status_path(output))  # the last run's exit code and reason, wherever it ran
        part = _status_of(spec, output, published=output.name in published)
        parts.append({"shard": str(shard), **{k: v for k, v in part.items() if k not in ("job", "version")},
                      "output": str(storage.where(output))})
    states = {part["state"] for part in parts}
    merged = storage.exists(spec.output) or storage.exists(dataset_folder(spec.output) / dataset_part(0, count))
    state = ("running" if "running" in states else
             "finished" if states == {"finished"} and len(parts) == count and merged else "stopped")
    total = shard_sums(parts, ("rows", "ok", "failed", "failed_for_good", "remaining", "prompt_tokens",
                               "completion_tokens", "total_tokens", "lost_requests", "lost_usd", "lost_tokens"),
                       optional=("cost_usd",))
    rows = input_rows(shards)
    if rows is not None:  # the shards not started (or not begun) have their rows to go too
        total["rows"], total["remaining"] = rows, max(0, rows - total["ok"] - total["failed"])
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
    return {"job": spec.name, "output": str(storage.where(spec.output)), "state": state, "reason": reason,
            "exit_code": exit_code, "version": __version__, "shard_count": count, **total,
            "shards": parts}


def _whole_status(spec: JobSpec, storage: Store) -> dict[str, Any]:
    """The status of a job not run in shards, from the newest state and status there are."""
    state = state_path(spec.output)
    if not lock_holder(state):  # a job running here has the newest state and status already
        storage.pull_state(state)
        storage.pull_file(status_path(spec.output))
    return {**_status_of(spec, spec.output, published=storage.exists(spec.output)),
            "output": str(storage.where(spec.output))}


def _status_of(spec: JobSpec, output: Path, *, published: bool) -> dict[str, Any]:
    """`published`: the output is in place where the job publishes it (its store). A state
    made for another request than the spec's now (its model, params, ...: a run would refuse
    it) is no finished job of this spec: stopped, saying what changed."""
    job = spec.name
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
        out = store.ledger.entries(outstanding=True)
    finally:
        store.close()
    rows = meta.get("rows", 0)
    if meta.get("shard"):  # a shard's own rows
        start, stop = Shard(*meta["shard"]).bounds(rows)
        rows = stop - start
    remaining = max(0, rows - counts["ok"] - counts["failed"])
    # Batches out at the provider: submitted, whether or not a run is waiting for them
    last_run = saved if saved.get("state") != "running" else {}
    if saved.get("state") == "running" and not holder:  # its runner is gone, and wrote no end
        last_run = {"reason": f"the last run (pid {saved.get('pid')}) ended without a word: killed (kill -9, out "
                              "of memory) or its machine stopped; rerun to resume", "exit_code": None}
    # A last run refused (exit 2: the spec or input changed since, say) leaves the job
    # stopped, as its status file says: its output is of the configuration before
    changed = differences(meta["request"], spec.request_config()) if meta.get("request") and not holder else []
    if changed:
        last_run = {**last_run, "reason": f"the spec changed since this state was made ({'; '.join(changed)}): a run "
                                          "refuses it; rerun with --restart to start over, or restore the spec"}
    state = "submitted" if out else "running" if holder else (
        "finished" if remaining == 0 and published and last_run.get("exit_code") != UsageError.exit_code
        and not changed else "stopped")
    # A run that has not written its status yet (it is still checking its input): what is known
    running = {"started_at": _lock_taken(path), "requests": None, "rows_per_s": None, "eta_s": None} if holder else {}
    return {**base, "state": state, "reason": last_run.get("reason"), "exit_code": last_run.get("exit_code"),
            "rows": rows, **counts, "remaining": remaining, **running, "updated_at": saved.get("updated_at"),
            **({"batches": [e.status() for e in out]}
               if out else {})}


def _lock_taken(state: Path) -> str | None:
    """When the running job took its lock (and wrote its pid into it): its start, near enough."""
    try:
        taken = lock_path(state).stat().st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(taken, timezone.utc).isoformat(timespec="seconds")
