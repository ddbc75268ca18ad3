"""Which rows of a job one run answers, and where its files go: a `Part`.

The engine runs one process's part of a job and knows nothing of how a job is spread
over processes: a backend hands it a Part. `WholeJob` is every row into the job's own
output; a backend that splits a job (backends/shards.py) gives each process a Part of
its own, with its own output (its state and status are named after it), rows and
checks against its siblings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

__all__ = ["Part", "WholeJob"]


class Part(Protocol):
    """What a run needs to know of the part of the job it runs.

    `output`: the part's output file; its state and status are named after it.
    `label`: the part's name in its status and Summary (None: the whole job).
    `outputs`: the outputs `--restart` moves aside (the part's, and any made from it).
    """

    output: Path
    label: str | None
    outputs: tuple[Path, ...]

    def bounds(self, rows: int) -> tuple[int, int]:
        """Of a job of `rows` rows, the rows [start, stop) this part answers."""

    def claim(self, meta: dict[str, Any]) -> None:
        """Add to `meta` (what the state records) what says which part this is, and refuse
        (a UsageError) a part that cannot run beside the others already there."""


class WholeJob:
    """Every row of the job, into its own output."""

    label = None

    def __init__(self, output: Path) -> None:
        self.output = output
        self.outputs = (output,)

    def bounds(self, rows: int) -> tuple[int, int]:
        return 0, rows

    def claim(self, meta: dict[str, Any]) -> None:
        """A whole job has no siblings: nothing to add or to check."""
