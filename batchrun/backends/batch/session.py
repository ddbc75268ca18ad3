"""What one run of the batch backend works with: the job's state and input, the provider
and a client of its batch API, the job's fingerprint, and a way to be asked to stop."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import httpx

from ...engine.cache import ResponseCache
from ...inputs.reader import InputReader
from ...inputs.rows import Row
from ...spec.model import BatchApiSpec, JobSpec
from ...storage.state import StateStore
from .base import Provider

__all__ = ["Session", "fingerprint"]

TAG = "batchrun_job"  # the metadata key that carries the job's fingerprint
KEY_TAG = "batchrun_batch"  # and the batch's key in the ledger


def fingerprint(meta: dict) -> str:
    """The job's fingerprint, 16 hex digits: its input and request configuration, as its
    state records them. A batch of another job, or of this one with another input or
    configuration, carries another."""
    what = json.dumps({"input": meta["input_digest"], "request": meta["request"]}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


@dataclass
class Session:
    """`total`: the rows this run answers (with --limit, fewer than the input's)."""

    spec: JobSpec
    store: StateStore
    reader: InputReader
    provider: Provider
    http: httpx.Client
    job: str
    total: int
    cache: ResponseCache | None = None  # the spec's response cache, if it names one
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None  # the signal's name, when one asked the job to stop

    @property
    def batch(self) -> BatchApiSpec:
        assert self.spec.batch_api is not None
        return self.spec.batch_api

    def rows(self, wanted: Collection[int]) -> Iterator[Row]:
        """The input rows whose index is in `wanted`, in input order (one pass)."""
        if not wanted:
            return
        last = max(wanted)
        for row in self.reader.rows(min(wanted)):
            if row.index > last or row.index >= self.total:
                return
            if row.index in wanted:
                yield row
