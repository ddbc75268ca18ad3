"""The shards backend: one shard of a job in this process, then the merge if it is the
last to finish (see backends/layout.py for what a shard is, backends/merge.py for the merge).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ..engine.limits import Limits
from ..engine.run import RunOptions, run_part
from ..engine.summary import Summary
from ..spec.parse import JobSpec
from .base import Backend
from .layout import Shard, check_siblings, shard_output
from .merge import MergeSummary, try_merge

__all__ = ["ShardBackend", "ShardPart"]


class ShardPart:
    """A shard as the engine runs it (an `engine.part.Part`): its slice of the rows, into
    its own output part, state and status; its state records `[index, count]`."""

    def __init__(self, output: Path, shard: Shard) -> None:
        self.shard, self.job_output = shard, output
        self.output = shard_output(output, shard)
        self.label = str(shard)
        self.outputs = (self.output, output)  # --restart: the merged output is no longer the job's

    def bounds(self, rows: int) -> tuple[int, int]:
        return self.shard.bounds(rows)

    def claim(self, meta: dict[str, Any]) -> None:
        meta["shard"] = [self.shard.index, self.shard.count]
        check_siblings(self.job_output, self.shard, meta)


class ShardBackend(Backend):
    """One shard of a job in this process; the last shard to finish merges the parts into
    one file (`merge="file"`), a dataset folder (`"dataset"`), or none (None: `merge_job`
    later). `limits`: shared ones, as a Ray worker's are."""

    def __init__(self, shard: Shard, *, merge: str | None = "file", limits: Limits = Limits()) -> None:
        self.shard, self.merge, self.limits = shard, merge, limits

    def run(self, spec: JobSpec, options: RunOptions) -> Summary:
        if options.limit is not None:
            raise ConfigError("--limit and --shard do not go together: a shard's rows are a share of all the rows")
        summary = run_part(spec, ShardPart(spec.output, self.shard), options, self.limits)
        if not summary.output_written or self.merge is None:
            return summary
        began = time.monotonic()  # the last shard to finish merges
        outcome = try_merge(spec, dataset=self.merge == "dataset")
        merged = outcome.line() if isinstance(outcome, MergeSummary) else f"not merged: {outcome}"
        return dataclasses.replace(summary, merged=merged, elapsed_s=summary.elapsed_s + time.monotonic() - began)
