"""One call to a provider's batch API, retried while it is worth retrying (a 429, a
5xx, a connection lost), with exponential backoff; and a stop asked for (SIGTERM)
ends the waiting at once.

A call that fails for good raises what `base.checked` made of it: JobFatalAPIError for
a refused key, ConfigError for a refusal of what was asked; one still failing after
`ATTEMPTS` raises JobAborted (exit 3): what was sent stays with the provider, and
the state knows it, so a rerun goes on from there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from ..._exceptions import Interrupted, JobAborted, RetryableAPIError
from ...spec.model import BatchApiSpec

__all__ = ["ATTEMPTS", "Caller", "Calls", "call", "go_on", "pause"]

ATTEMPTS = 8
T = TypeVar("T")


class Calls(Protocol):
    """What the calls go by: the spec's `batch_api` (its poll interval paces the retries),
    and a way to be asked to stop. A run's `Session`, or a `Caller` before there is one."""

    @property
    def batch(self) -> BatchApiSpec: ...

    stop: threading.Event
    stopped_by: str | None  # the signal's name, when one asked the job to stop


@dataclass
class Caller:
    batch: BatchApiSpec
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None


def call(session: Calls, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, retried; see the module's docstring."""
    first = min(1.0, session.batch.poll_interval_s)
    # httpx's DecodingError (a file whose gzip broke on the way) is no TransportError: retried too
    retrying = Retrying(retry=retry_if_exception_type((RetryableAPIError, httpx.TransportError, httpx.DecodingError)),
                        wait=wait_exponential(multiplier=first, max=max(60.0, first)) + wait_random(0, first),
                        stop=stop_after_attempt(ATTEMPTS), sleep=lambda s: pause(session, s))
    try:
        return retrying(fn, *args)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise JobAborted(f"the batch API still fails after {ATTEMPTS} attempts ({last}); what was sent stays "
                         "with the provider and the state knows it: rerun to go on") from None


def pause(session: Calls, seconds: float) -> None:
    """Wait `seconds`, or less if the job is asked to stop: then Interrupted (exit 3)."""
    if session.stop.wait(seconds):
        raise Interrupted(f"stopped by {session.stopped_by or 'request'}; the batches sent stay with the provider "
                          "and the state knows them: rerun (`batchrun run` or `submit`) to go on")


def go_on(session: Calls) -> None:
    """Before a batch is sent: Interrupted if the job was asked to stop (nothing more goes)."""
    pause(session, 0)
