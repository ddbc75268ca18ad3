"""The limits a run is given rather than making its own: `Limits`.

A run paces its requests with its own `RateLimiter` and holds its requests in flight
with its own `Control`, both from the spec. A backend that runs one job in several
processes gives each run ones that share the job's quota (backends/ray/quota.py);
they reach the client through its constructor, never by swapping its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.concurrency import InFlightControl
from ..policy.rate import Limiter

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """`rate_limiter`: in place of the run's own rate policy (the same methods as
    `RateLimiter`); `concurrency_control`: in place of its own control of requests in
    flight (the `InFlightControl` methods). None: the run's own, from the spec."""

    rate_limiter: Limiter | None = None
    concurrency_control: InFlightControl | None = None
