"""The worker pool of one run: `concurrency` workers share the rows still to do.

The first request goes alone: until one row has been answered, a wrong key or a dead
endpoint costs one request, not `concurrency` of them. A row the server asks to wait
(a long retry-after) is set aside (parked) and taken again when its wait is over, so
its worker serves other rows meanwhile. Every answer goes to the writer at once; a
worker takes its next row once its answer is on disk.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import re
import sys
from collections.abc import Generator, Iterator

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import ObjectSendStream, TaskGroup

if sys.version_info < (3, 11):  # anyio brings the backport there
    from exceptiongroup import BaseExceptionGroup

from .._exceptions import BatchrunError, InputChangedError, JobAborted, JobFatalAPIError
from ..endpoints.result import Result
from ..http.client import Deferred
from ..inputs.reader import InputReader, Row, fewer_collections
from ..policy.retry import FailureStreak
from ..spec.parse import JobSpec
from ..storage import Store
from ..storage.output import load_arrow
from .call import Caller
from .status import StatusFile
from .watch import report, upload, watch_input, watch_progress, watch_signals
from .writer import HoldNote, Writer

__all__ = ["GRACE_S", "Pool"]

GRACE_S = 10.0  # after SIGTERM/SIGINT, how long requests in flight may finish
MAX_PARKS = 10  # times a row is set aside for a retry-after; then its worker waits with it
_FRESH = (0, 0, (0, 0))  # a row never set aside: no requests, no parks, no failures
PARKED_POLL_S = 0.5  # a worker waiting for rows set aside looks at `stopping` this often
# No such route, or no such model there: a 404 or 405, or a 400 that names the model as
# unknown (LiteLLM's "Invalid model name passed in model=...")
_NO_ROUTE = re.compile(r"HTTP 40[45]: |HTTP 400: .*(?:invalid model|model.{0,80}(?:not found|does not exist|unknown))",
                       re.IGNORECASE)


class Pool:
    """The workers of one run, and the loops beside them (see `watch`)."""

    def __init__(self, spec: JobSpec, client: Caller, writer: Writer, reader: InputReader, *, done: bytearray,
                 total: int, status: StatusFile, storage: Store, grace_s: float = GRACE_S) -> None:
        self.spec = spec
        self.client = client
        self.writer = writer
        self.reader = reader
        self.done = done
        self.total = total
        self.status = status
        self.storage = storage  # where the state is published
        self.grace_s = grace_s
        self.aborted: JobAborted | None = None
        self.stopping = False
        self.streak = FailureStreak()
        self.token: object | None = None  # the event loop's, for `stop_from_outside`
        self.stop_request: JobAborted | None = None
        self.workers: TaskGroup | None = None  # set once `run` starts them
        # Rows a server asked to wait (a long retry-after), by when they may go again; and
        # for rows set aside, (requests sent so far, times set aside, (failures, 429s) met)
        self.parked: list[tuple[float, int, Row]] = []
        self.carried: dict[int, tuple[int, int, tuple[int, int]]] = {}
        # Rows a worker takes at once: embeddings go several to a request (one, if so asked,
        # still as a group: the group's answer is what shares out the vectors)
        self.grouped = spec.grouped
        self.group = spec.rows_per_request

    def stop_from_outside(self, reason: JobAborted) -> None:
        """`stop`, from another thread (see `bridge.run_beside`)."""
        self.stop_request = reason  # seen by a loop that has not started yet
        token = self.token
        if token is not None:
            with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
                anyio.from_thread.run_sync(self.stop, reason, token=token)

    async def run(self, handle_signals: bool) -> None:
        self.token = anyio.lowlevel.current_token()
        if self.stop_request is not None:
            self.stopping, self.aborted = True, self.stop_request
        # Each worker hands over its answers (and the budget's holds) and waits for them to
        # be saved: room for all, and for the holds let go meanwhile.
        results_send, results_receive = anyio.create_memory_object_stream[Result | HoldNote](
            self.spec.concurrency * (self.group + 2))
        notes = results_send.clone()  # the budget's holds, from the client (see `Writer.record`)
        # A commit's group lingers while it holds less than a quarter of what the workers
        # can hand over at once (with fewer than eight workers, never).
        self.writer.begin(notes, stop=self.stop, sent=lambda: self.client.requests_sent,
                          gather=self.spec.concurrency * self.group // 4)
        # At most one output write waits while another runs: each writes all that is ready.
        due_send, due_receive = anyio.create_memory_object_stream[None](1)
        self.answered_once = anyio.Event()
        rows = self._rows()
        try:
            with fewer_collections():  # a request's objects are many, and short-lived
                async with anyio.create_task_group() as outer:
                    self._start_loops(outer, handle_signals)
                    async with anyio.create_task_group() as saving:
                        saving.start_soon(self.writer.write, results_receive, due_send)
                        saving.start_soon(self.writer.publish, due_receive)
                        async with notes, self.client, anyio.create_task_group() as self.workers:
                            for n in range(self.spec.concurrency):
                                self.workers.start_soon(self._work, n == 0, rows, results_send.clone())
                            results_send.close()
                            # Started after the workers, this runs once the first row's request
                            # is on its way: the loop then idles until its answer.
                            saving.start_soon(anyio.to_thread.run_sync, load_arrow)
                    # The workers closed their result streams, the writer made its last
                    # commit and the output its last write: stop the signal watcher.
                    outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # anyio's task groups wrap what a task raised: unwrap it
            raise leading(group)  # (the group stays its context, for a bug's traceback)
        finally:
            rows.close()  # and with it the input file

    def _start_loops(self, outer: TaskGroup, handle_signals: bool) -> None:
        if handle_signals:
            outer.start_soon(watch_signals, self)
        outer.start_soon(report, self.status, self.writer, self.client)
        outer.start_soon(watch_input, self.reader, self)
        outer.start_soon(watch_progress, self.spec.stall_s, self.spec.name, self.writer, self.client, self)
        outer.start_soon(upload, self.storage, self.writer, self.status, self.spec.checkpoint.interval_s, self)

    def _rows(self) -> Generator[Row, None, None]:
        """The rows still to do, in input order.

        The workers share this one iterator: it never awaits, so no two of them are
        ever inside it at once, and a row goes to exactly one worker.
        """
        # Small batches: the first request waits for its batch to be parsed.
        for row in self.reader.rows(batch_rows=64):
            if row.index >= self.total:
                break
            if not self.done[row.index]:
                yield row
        self.writer.fed_all = True

    async def _work(self, first: bool, rows: Iterator[Row], results: ObjectSendStream[Result]) -> None:
        async with results:
            if not first:
                await self.answered_once.wait()
            try:
                while not self.stopping:
                    try:
                        if not self.grouped:
                            row = await self._next_row(rows)
                            taken = [row] if row is not None else []
                        else:
                            taken = list(itertools.islice(rows, self.group))
                    except StopIteration:
                        return
                    except InputChangedError as exc:
                        self.stop(exc)
                        return
                    if not taken:
                        return
                    try:
                        if not self.grouped:
                            _, parks, spent = self.carried.get(taken[0].index, _FRESH)
                            answers = [await self.client.call(taken[0], park=parks < MAX_PARKS, pushed_back=parks > 0,
                                                              spent=spent)]
                        else:
                            answers = await self.client.call_group(taken)
                    except Deferred as deferred:  # the server asked this row to wait: it waits aside
                        attempts, parks, _ = self.carried.get(taken[0].index, _FRESH)
                        self.carried[taken[0].index] = (attempts + deferred.attempts, parks + 1, deferred.spent)
                        heapq.heappush(self.parked, (anyio.current_time() + deferred.wait, taken[0].index, taken[0]))
                        continue
                    except JobAborted as exc:  # the API refused the job, the budget is spent, ...
                        self.stop(exc)
                        return
                    # An answer received is paid for: hand it to the writer at once, even
                    # if the pool is being cancelled (the writer outlives the workers).
                    try:
                        for result in answers:
                            if self.carried and (carried := self.carried.pop(result.row_index, None)):
                                result.attempts += carried[0]  # the requests before it was set aside
                            self._judge(result, taken[0])
                            results.send_nowait(result)
                    except anyio.BrokenResourceError:
                        return
                    if self.client.reached is not None:  # a row's retry the budget could not hold
                        self.stop(self.client.reached)
                    # The next row waits until this answer is on disk: a kill then costs
                    # at most the rows the workers hold, never answers queued behind them.
                    await self.writer.saved.wait()
            finally:
                if first:  # with nothing left to do, the others must not wait for it
                    self.answered_once.set()

    async def _next_row(self, rows: Iterator[Row]) -> Row | None:
        """A row set aside whose wait is over, else the next new row; with none left but
        rows set aside, wait for theirs. None: nothing more to do (or the pool stops)."""
        while not self.stopping:
            # (anyio's clock costs 2 µs a call: read only with rows set aside)
            if self.parked and self.parked[0][0] <= anyio.current_time():
                return heapq.heappop(self.parked)[2]
            try:
                return next(rows)
            except StopIteration:
                if not self.parked:
                    return None
            await anyio.sleep(min(PARKED_POLL_S, max(0.0, self.parked[0][0] - anyio.current_time())))
        return None

    def _judge(self, result: Result, row: Row) -> None:
        """Open the pool after the first answer; stop when answers show a broken job."""
        if not self.answered_once.is_set():
            if result.transient:
                # A proxy may refuse a wrong key with a 500 (LiteLLM's auth hooks do)
                server = (result.error or "").startswith("HTTP 5")
                key = ", the API key" if server else ""
                # (llama.cpp's server answers a response_format it does not take with a 500)
                takes = "; or, if the server's words say it cannot take the request, change the spec " \
                    "(then rerun with --restart)" if server else ""
                self.stop(JobFatalAPIError(
                    f"the first row got no answer in {result.attempts} attempts ({result.error}); "
                    f"check api.base_url{key} and that the API is up, then rerun{takes}"
                ))
                return
            if _NO_ROUTE.match(result.error or "") and self.spec.endpoint is not None and \
                    row.body.get("model", self.spec.model) == self.spec.model:
                # The rows after it go to the same route and model (the spec's): each would be refused alike
                refused = JobFatalAPIError(
                    f"the first row was refused ({result.error}), and the rows after it go to the same route and "
                    "model, so none was sent. Fix api.base_url, the model or the endpoint, then rerun with --restart "
                    "(only that row's refusal is discarded)")
                refused.rerun_resumes = False
                self.stop(refused)
                return
            self.answered_once.set()
        if self.streak.observe(result.status, result.error):
            streak = JobFatalAPIError(
                f"{self.streak.count} rows in a row failed with the same error: {result.error}; "
                "stopping so the rest are not spent the same way. If the spec is wrong (the model, params), fix it "
                "and rerun with --restart: answers of two configurations never mix. If the server was, rerun with "
                "--retry-failed to ask these rows again"
            )
            streak.rerun_resumes = False  # (the same command would leave these rows failed)
            self.stop(streak)

    def stop(self, reason: JobAborted) -> None:
        """Start no new row; requests in flight get `grace_s` to bring their answers home."""
        if self.aborted is None:
            self.aborted = reason
        self.stopping = True
        self.client.stop_holding()
        workers = self.workers
        if workers is None:  # asked from outside before the workers began: none will
            return
        self.answered_once.set()  # waiting workers wake up, see `stopping` and leave
        scope = workers.cancel_scope
        scope.deadline = min(scope.deadline, anyio.current_time() + self.grace_s)

    def hurry(self) -> None:
        """A second signal: the requests in flight are cancelled now; the writer still saves."""
        if self.workers is not None:
            self.workers.cancel_scope.cancel()


def leading(group: BaseExceptionGroup) -> BaseException:
    """The one exception of a task group's that the caller should see: a stop asked for
    from outside (KeyboardInterrupt, SystemExit) first, then batchrun's own errors, then
    any other (a bug: shown whole by the CLI, with the group as its cause)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in (KeyboardInterrupt, SystemExit, BatchrunError, BaseException):
        for leaf in leaves:
            if isinstance(leaf, kind) and not isinstance(leaf, anyio.get_cancelled_exc_class()):
                return leaf
    return group.exceptions[0]
