"""The writer: the only owner of the state and the output.

Workers hand it their answers over a stream; it commits them a group at a time,
appends the settled rows to the output in row groups, and records the budget's holds
(the `HoldLog` of a row's call, engine/holds.py) in the same commits. No lock guards a file: one task owns them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .._exceptions import InputChangedError, JobAborted, StorageError
from ..endpoints.result import Result
from ..policy.pricing import Hold
from ..storage.output import OutputWriter, group_rows
from ..storage.state import FAILED, FAILED_FOR_GOOD, OK, StateStore
from .cache import ResponseCache
from .progress import Progress

__all__ = ["HoldNote", "LINGER_S", "Writer"]

# How long a small group waits for more answers before its commit. A commit costs
# ~0.15 ms of CPU whatever its size (its fsync's share among it): with answers arriving
# evenly (400 in flight at 200 ms) each found one or two waiting. A millisecond's wait
# took a quarter off a request's CPU there (stages.py --scenario latency: 430 -> 306 µs)
# at the same throughput; 5 ms took more (261 µs), and 2 % off the throughput.
LINGER_S = 0.001


@dataclass(frozen=True)
class HoldNote:
    """For the writer: a budget's hold to record before its request goes (`sending`), or
    to delete when its request was answered with nothing to save. `kept`: an attempt that
    may have been paid for with no answer, recorded for good (the counts' lost requests)."""

    hold: Hold
    sending: bool
    kept: bool = False


class Writer:
    """Group commit of the answers, the output's row groups, the budget's holds.

    `states` and `totals`: the rows' states and the state's counts below `total` when the
    run began; the writer keeps them up to date (`counts`) without asking the state.
    """

    def __init__(self, store: StateStore, output: OutputWriter, progress: Progress, cache: ResponseCache | None,
                 *, done: bytearray, total: int, start: int, states: bytearray, totals: dict[str, object]) -> None:
        self.store = store
        self.output = output
        self.progress = progress
        self.cache = cache
        self.total = total
        self.states, self.totals = states, totals
        # Rows settled so far (ok before this run, or saved in it) and the length of
        # their unbroken run from row 0: the output can be written up to there.
        self.settled = bytearray(done)
        self.prefix = start
        self.published = start  # rows [start, published) are written or being written to the output
        self.fed_all = False  # every row has gone to a worker (the pool says so)
        self.tail_written = False
        self.state_failed = False  # nothing more can be saved
        self.output_failed = False  # answers are still saved; the output waits for a rerun
        self.progressed = (0.0, 0)  # when a row was last settled, and the requests sent by then
        self.sized = (0, 0)  # rows saved in this run, and about the bytes they hold (see `_row_bytes`)

    def begin(self, notes: ObjectSendStream[Result | HoldNote], *, stop: Callable[[JobAborted], None],
              sent: Callable[[], int], gather: int = 1) -> None:
        """In the event loop, before the workers start: the stream the holds go by; `stop`
        stops the run when nothing more can be saved; `sent` counts the requests sent so
        far, for the stall watch (`progressed`); a group smaller than `gather` waits
        `LINGER_S` for more before its commit."""
        self.gather = gather
        self.notes = notes
        self.stop = stop
        self.sent = sent
        self.saved = anyio.Event()  # set once the answers handed over so far are on disk

    async def write(self, results: ObjectReceiveStream[Result | HoldNote], due: ObjectSendStream[None]) -> None:
        """Commit answers as they arrive, a group at a time (group commit).

        Each commit takes every answer that arrived while the previous one was
        being written; a group smaller than `gather` waits `LINGER_S` for more. An
        answer is durable one commit (a few milliseconds) after it arrives, and under
        load the groups grow rather than the commits multiply. Its worker waits for
        that before taking another row, so a kill -9 costs at most the rows the
        workers hold: `concurrency` answers.
        """
        async with results, due:
            async for first in results:
                group = [first]
                _take_waiting(results, group)
                if len(group) < self.gather:
                    # Shielded: what it took is paid for, and is saved even in a hard stop
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(LINGER_S)
                    _take_waiting(results, group)
                # Taken with the group, with no await between: answers handed over
                # from here on wait for the next commit.
                saved, self.saved = self.saved, anyio.Event()
                try:
                    await self._commit(group, due)
                finally:
                    saved.set()  # saved, or never to be: the workers go on either way

    def _save(self, group: list[Result], notes: list[HoldNote]) -> None:
        """In the writer's thread: the state first; then the cache may share the answers."""
        self.store.save(group, holds=[n.hold for n in notes if n.sending],
                        released=[n.hold.id for n in notes if not n.sending])
        cache = self.cache
        if cache is not None:
            cache.put((r.cache_key, r) for r in group if r.cache_key is not None)

    async def _commit(self, items: list[Result | HoldNote], due: ObjectSendStream[None]) -> None:
        if self.state_failed:
            return  # nothing more can be saved; the job is stopping
        group = [item for item in items if isinstance(item, Result)]
        notes = [item for item in items if not isinstance(item, Result)] if len(group) < len(items) else []
        try:
            # Shielded: an answer received is paid for, even during a hard stop.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._save, group, notes)
        except StorageError as exc:
            self.state_failed = True
            self.stop(exc)
            return
        for note in notes:
            if note.kept:  # in the state for good: the counts show it at once (`batchrun status`)
                self.totals["lost_requests"] += 1  # type: ignore[operator]
                self.totals["lost_usd"] += note.hold.usd  # type: ignore[operator]
                self.totals["lost_tokens"] += note.hold.tokens  # type: ignore[operator]
        if not group:
            return
        failed, tokens, usd = self._count(group)
        rows, size = self.sized
        self.sized = rows, size = rows + len(group), size + sum(map(_row_bytes, group))
        self.output.group_rows = group_rows(size / rows)
        self.progressed = anyio.current_time(), self.sent()
        self.progress.advance(len(group) - failed, failed, tokens, usd)
        while self.prefix < self.total and self.settled[self.prefix]:
            self.prefix += 1
        # A row group's worth of settled rows goes to the output; once every row has
        # been sent, what is settled goes at once (a shorter group), so that the end
        # of the job waits only for the last few rows.
        ready = self.prefix - self.published
        if ready >= self.output.group_rows or (self.fed_all and ready > 0 and not self.tail_written):
            self.tail_written = self.fed_all
            with contextlib.suppress(anyio.WouldBlock):  # one is pending: it will take these too
                due.send_nowait(None)

    async def publish(self, due: ObjectReceiveStream[None]) -> None:
        """Append settled rows to the output in a thread, off the commit path."""
        async with due:
            async for _ in due:
                if self.output_failed:
                    continue
                stop = self.published = self.prefix
                try:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self.output.write, stop)
                except (StorageError, InputChangedError) as exc:
                    self.output_failed = True
                    self.stop(exc)

    # -- the budget's holds (see `engine.holds.HoldLog`) --------------------------------

    async def record(self, hold: Hold, kept: bool = False) -> None:
        """In the state before its request goes, in the writer's next commit: a kill -9
        from here on leaves it there, counted as spent by the next run."""
        self.notes.send_nowait(HoldNote(hold, sending=True, kept=kept))
        saved = self.saved  # the event of the commit that takes it (see `write`)
        await saved.wait()
        if self.state_failed:
            raise StorageError("the budget's hold could not be saved; stopping")

    def release(self, hold: Hold) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.notes.send_nowait(HoldNote(hold, sending=False))

    # -- counts --------------------------------------------------------------------------

    def counts(self) -> dict[str, object]:
        """The state's counts as of the last commit, without asking the state."""
        states = self.states
        for_good = states.count(FAILED_FOR_GOOD)
        return {**self.totals, "ok": states.count(OK), "failed": states.count(FAILED) + for_good,
                "failed_for_good": for_good}

    def _count(self, group: list[Result]) -> tuple[int, int, float]:
        """The saved rows settled, in the counts; the group's failed rows, tokens and cost,
        for the progress. (One pass: it runs for every row.)"""
        totals, states, settled = self.totals, self.states, self.settled
        failed = prompt = completion = total = 0
        usd = 0.0
        for result in group:
            index = result.row_index
            settled[index] = 1
            if result.status == "ok":
                states[index] = OK
            else:
                failed += 1
                states[index] = FAILED if result.transient else FAILED_FOR_GOOD
            prompt += result.prompt_tokens or 0
            completion += result.completion_tokens or 0
            total += result.total_tokens or 0
            if result.cost_usd is not None:
                usd += result.cost_usd
                totals["cost_usd"] = (totals["cost_usd"] or 0.0) + result.cost_usd  # type: ignore[operator]
        totals["prompt_tokens"] += prompt  # type: ignore[operator]
        totals["completion_tokens"] += completion  # type: ignore[operator]
        totals["total_tokens"] += total  # type: ignore[operator]
        return failed, total, usd


def _row_bytes(result: Result) -> int:
    """About what a result holds in the output: its vector and its texts, the rest a few
    numbers and short strings (the columns a job asks for are not counted)."""
    return 200 + len(result.embedding or b"") + len(result.output_text or "") + \
        len(result.reasoning_content or "") + len(result.tool_calls or "")


def _take_waiting(results: ObjectReceiveStream[Result | HoldNote], group: list[Result | HoldNote]) -> None:
    """Add to `group` what `results` holds now, without waiting."""
    while True:
        try:
            group.append(results.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return
