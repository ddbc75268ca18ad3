"""What a run did, as the caller and the command see it: counts, cost, where the
output went, and the exit code they add up to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..policy.pricing import usd

__all__ = ["LOST", "Summary"]

# What `lost_requests` counts, as the summary and `batchrun status` say it
LOST = "that may have been paid for with no answer kept (in flight at a kill, timed out, cut short)"


@dataclass(frozen=True)
class Summary:
    """What a run did; `exit_code` is the CLI's."""

    job: str
    output: Path | str  # a URL where the output is on object storage
    state: Path
    rows: int
    ok: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int
    elapsed_s: float
    output_written: bool
    aborted: str | None = None
    cost_usd: float | None = None  # with pricing: every answer paid for, over all runs
    failed_for_good: int = 0  # of `failed`: retried only with --retry-failed
    max_failed_share: float | None = None  # failed rows up to this share of rows still exit 0
    cache_hits: int = 0  # rows answered from the response cache, over all runs
    saved_usd: float | None = None  # what those answers would have cost
    shard: str | None = None  # `I/N` for a shard's run
    merged: str | None = None  # a shard's run: the merge it made, or why it made none
    set_aside: str | None = None  # where --restart moved the previous output
    uncacheable: int = 0  # with a cache: requests of this run it could not answer (not deterministic)
    short_choices: int = 0  # answers of this run with fewer choices than their n asked for
    unmetered: int = 0  # rows with answers that came without usage: charged at their worst case
    lost_requests: int = 0  # paid for, for all anyone knows, with no answer kept (a kill -9's in flight, a
    # timeout, a 2xx that could not be read): counted against the budget at their worst case
    lost_usd: float = 0.0
    lost_tokens: int = 0
    # `batchrun submit`: rows a later run settles, in the provider's batches or handed back
    # by them unanswered, to go live
    in_batches: int = 0
    for_live: int = 0
    from_batches: int = 0  # rows answered through a provider's batch API, over all runs
    submitted: bool = False  # `batchrun submit`: exit 0 unless aborted (the rows are sent, or left for `run`)
    waiting: str | None = None  # why rows no batch holds wait for a later run (the budget)

    @property
    def remaining(self) -> int:
        return self.rows - self.ok - self.failed

    @property
    def tolerated(self) -> bool:
        """The failed rows are within max_failed_share."""
        return self.max_failed_share is not None and self.failed <= self.max_failed_share * self.rows

    @property
    def exit_code(self) -> int:
        if self.aborted:
            return 3
        if self.submitted:
            return 0
        if self.remaining > self.in_batches + self.for_live:
            return 3
        return 1 if self.failed and not self.tolerated else 0

    def line(self) -> str:
        head = f"{self.rows:,} rows: {self.ok:,} ok, {self.failed:,} failed"
        if self.failed:
            again = self.failed - self.failed_for_good
            parts = ([f"{again:,} retried by a rerun"] if again else []) + (
                [f"{self.failed_for_good:,} only with --retry-failed"] if self.failed_for_good else [])
            head += f" ({', '.join(parts)}{'; within max_failed_share' if self.tolerated else ''})"
        if self.remaining:
            head += f", {self.remaining:,} remaining"
        if self.in_batches or self.for_live:
            later = [f"{self.in_batches:,} in the provider's batches"] if self.in_batches else []
            later += [f"{self.for_live:,} they did not answer, to answer live"] if self.for_live else []
            head += f" ({' and '.join(later)}: `batchrun run` finishes the job)"
        if self.waiting:
            head += f" ({self.waiting})"
        tokens = f"{self.total_tokens:,} tokens ({self.prompt_tokens:,} prompt, {self.completion_tokens:,} completion)"
        if self.cost_usd is not None:
            tokens += f", {usd(self.cost_usd)}"
        if self.unmetered:
            tokens += (f"; {self.unmetered:,} row{'s' if self.unmetered > 1 else ''} answered without usage, "
                       "charged at the worst case")
        if self.lost_requests:
            lost = self.lost_requests
            worst = f"{usd(self.lost_usd)}, " if self.lost_usd else ""
            tokens += (f"; {lost:,} request{'s' if lost > 1 else ''} {LOST}, counted at the worst case ({worst}"
                       f"{self.lost_tokens:,} tokens)")
        if self.cache_hits:
            tokens += f"; {self.cache_hits:,} from the cache"
            if self.saved_usd is not None:
                tokens += f" ({usd(self.saved_usd)} saved)"
        if self.uncacheable:
            tokens += (f"; {self.uncacheable:,} request{'s' if self.uncacheable > 1 else ''} not looked up in the "
                       "cache: not deterministic (no temperature: 0 or seed; cache: {everything: true} caches all)")
        if self.short_choices:
            tokens += (f"; {self.short_choices:,} answer{'s' if self.short_choices > 1 else ''} with fewer choices "
                       "than n asked for (the server may not do n)")
        tail = f"output: {self.output}" if self.output_written else f"progress saved in {self.state}"
        sent = f"{self.requests:,} request{'' if self.requests == 1 else 's'}"
        if self.from_batches:
            sent = f"{self.from_batches:,} answered by the provider's batches, {sent}"
        shard = f"shard {self.shard}: " if self.shard else ""
        merged = f"; {self.merged}" if self.merged else ""
        aside = f"; the output before --restart was moved to {self.set_aside}" if self.set_aside else ""
        return f"{shard}{head}; {tokens}; {sent} in {self.elapsed_s:.1f} s; {tail}{merged}{aside}"
