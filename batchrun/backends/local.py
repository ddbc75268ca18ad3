"""One process runs every row of a job into the job's own output: the default backend."""

from __future__ import annotations

from typing import Any

from ..engine.limits import Limits
from ..engine.part import WholeJob
from ..engine.run import RunOptions, run_part
from ..engine.summary import Summary
from ..spec.parse import JobSpec
from .base import Backend
from .layout import check_unsharded

__all__ = ["LocalBackend", "Unsharded"]


class Unsharded(WholeJob):
    """Every row of the job, into its own output, unless the job was begun in shards."""

    def claim(self, meta: dict[str, Any]) -> None:
        check_unsharded(self.output)


class LocalBackend(Backend):
    """The whole job in this process; `limits`: shared ones, if the caller has them."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits

    def run(self, spec: JobSpec, options: RunOptions) -> Summary:
        return run_part(spec, Unsharded(spec.output), options, self.limits)
