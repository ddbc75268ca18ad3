"""The loops that run beside the workers: the status file, the state's upload to
object storage, the stall watch and the signals. Each stops the pool, never a file."""

from __future__ import annotations

import signal
from typing import Protocol

import anyio

from .._exceptions import InputChangedError, Interrupted, JobAborted, Stalled, StorageError
from ..inputs.reader import InputReader
from ..storage import Store
from .call import Caller
from .status import EVERY_S, StatusFile
from .writer import Writer

__all__ = ["Stoppable", "report", "upload", "watch_input", "watch_progress", "watch_signals"]


class Stoppable(Protocol):
    """The pool, as the loops see it."""

    stopping: bool

    def stop(self, reason: JobAborted) -> None:
        """Start no new row; requests in flight get their grace."""

    def hurry(self) -> None:
        """Cancel the requests in flight now (the writer still saves)."""


async def report(status: StatusFile, writer: Writer, client: Caller) -> None:
    """The status file: now, then every EVERY_S seconds until the run ends."""
    while True:
        status.write(writer.counts(), requests=client.requests_sent)
        await anyio.sleep(EVERY_S)


async def upload(storage: Store, writer: Writer, status: StatusFile, interval_s: float, pool: Stoppable) -> None:
    """The state (and status) to the store every checkpoint.interval_s: a lost
    machine costs at most the answers received since (a local output's store has
    nothing to do)."""
    while True:
        await anyio.sleep(interval_s)
        try:
            await anyio.to_thread.run_sync(storage.push_state, writer.store.path)
            await anyio.to_thread.run_sync(storage.push_file, status.path)
        except StorageError as exc:
            pool.stop(exc)
            return


async def watch_progress(stall_s: float, spec_name: str, writer: Writer, client: Caller, pool: Stoppable) -> None:
    """Stop a job that settles no row for retry.max_stall_s (a server that refuses every
    request with a retry-after would hold it forever): exit 3, a rerun resumes."""
    most = stall_s
    writer.progressed = anyio.current_time(), client.requests_sent
    while True:
        since, sent = writer.progressed
        await anyio.sleep(max(0.0, since + most - anyio.current_time()))
        if writer.progressed[0] == since and not pool.stopping:
            requests = client.requests_sent - sent
            pool.stop(Stalled(
                f"no row was settled in {most:g} s, while {requests:,} request{'' if requests == 1 else 's'} "
                "went unanswered or were refused (the server may be holding every request back with a "
                "retry-after). Every answer is saved; rerun to resume once the server answers again, or "
                f"raise retry.max_stall_s in {spec_name} to wait longer"))
            return


async def watch_input(reader: InputReader, pool: Stoppable, every_s: float = EVERY_S) -> None:
    """Stop the job soon after its input is changed in place, not at its end: a small
    input is read once, before the first request, and the rows sent since are its old
    version's, so the answers saved are right, but every further one would be paid for
    a state the next run refuses (another input)."""
    while True:
        await anyio.sleep(every_s)
        try:
            reader.check_unchanged()
        except InputChangedError as exc:
            pool.stop(exc)
            return


async def watch_signals(pool: Stoppable) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if pool.stopping:  # a second signal: stop now; the writer still saves
                pool.hurry()
            else:
                pool.stop(Interrupted(f"interrupted by {signal.Signals(signum).name}"))
