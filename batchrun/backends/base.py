"""The `Backend` seam: how a job's rows are run, in one process or in several.

A backend runs a job's rows in one or more processes and returns the job's `Summary`,
raising as the engine does: UsageError (exit 2) before any request, JobAborted (exit 3,
with `.summary`) when the job stopped early and a rerun resumes it.

Each process's part of the job is run by the engine (`engine.run.run_part`), which
knows no backend. The backend tells it, through arguments, never by changing the
engine's objects after they are made:

    part     an `engine.part.Part`: which rows, into which output (its state and status
             beside it), and what to check against the other parts
    options  an `engine.run.RunOptions`: restart, retry_failed, progress, grace, ...
    limits   an `engine.limits.Limits`: a rate limiter and a control of requests in
             flight shared by the processes of one job (None: each run its own)

Kinds:
    local.LocalBackend     one process, every row, into the job's output
    shards.ShardBackend    one shard: a slice of the rows into its own state and part,
                           then the merge if it is the last to finish
    ray/                   the shards as tasks on a Ray cluster with one quota
                           (`RayBackend`: Ray is imported only when it is chosen)

To add a kind (say, a provider's batch API): a module of its own in backends/ with a
`Backend` subclass; its constructor takes what only it needs (an address, a count),
its `run(spec, options)` runs the rows (through `run_part` for each process that runs
the engine, or by other means) and returns one Summary for the job. Then one line
where it is chosen: `run_job` in backends/__init__.py, or the command's flag in _cli.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..engine.run import RunOptions
from ..engine.summary import Summary
from ..spec.parse import JobSpec

__all__ = ["Backend"]


class Backend(ABC):
    """Runs a job's rows in one or more processes."""

    @abstractmethod
    def run(self, spec: JobSpec, options: RunOptions) -> Summary:
        """Run (or resume) the job; the Summary when every row is settled (its
        `exit_code` says whether some failed). Raises as `engine.run.run_part` does."""
