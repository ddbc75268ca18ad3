"""On the cluster: the job's `Quota` in a named Ray actor, which every shard's worker
exchanges reports and grants with (see `worker.Exchanger`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .quota import HORIZON_S, Grant, Quota, Report

__all__ = ["QuotaActor"]


class QuotaActor:
    """The job's Quota in a Ray actor. Made again by Ray when lost (its process killed,
    its node gone); the new one leases nothing before the old one's leases have run out."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        import ray

        self.config = dict(config)
        remade = ray.get_runtime_context().was_current_actor_reconstructed
        self.quota = Quota(**self.config, now=time.monotonic(), pause_s=HORIZON_S if remade else 0.0)
        self.claimed: set[str] = set()

    def matches(self, config: Mapping[str, Any]) -> bool:
        return dict(config) == self.config

    def exchange(self, report: Report) -> Grant:
        return self.quota.exchange(report, time.monotonic())

    def claim(self, key: str) -> bool:
        """True the first time `key` is asked for: a shard's --restart is done once per run,
        not again when Ray retries its task."""
        first = key not in self.claimed
        self.claimed.add(key)
        return first
