"""The pool's event loop in a thread of its own, for a library caller's thread."""

from __future__ import annotations

import threading

import anyio

from .._exceptions import Interrupted
from .pool import Pool

__all__ = ["run_beside"]


def run_beside(pool: Pool) -> None:
    """Run the pool's event loop in a thread of its own while the caller's thread waits.

    A library caller may have an exception raised into its thread at any moment: a
    scheduler's timeout (Airflow raises from a SIGALRM handler), a KeyboardInterrupt. In
    the event loop's own thread that could leave answers received but not saved, and the
    loop's worker threads behind. Here it only interrupts the wait: the pool stops as on
    SIGTERM (no new rows, requests in flight get their grace, every answer is saved),
    and then the exception goes on its way. A second one does not wait.
    """
    failure: list[BaseException] = []
    # Waited for with an Event, not Thread.join: a join interrupted by an exception can
    # return at once the next time (CPython 3.11 loses the thread's state lock).
    finished = threading.Event()

    def loop() -> None:
        try:
            anyio.run(pool.run, False)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            finished.set()

    threading.Thread(target=loop, name="batchrun", daemon=True).start()
    try:
        while not finished.wait(0.1):  # short waits: a signal handler in this thread runs between them
            pass
    except BaseException as exc:
        pool.stop_from_outside(exc if isinstance(exc, Interrupted) else
                               Interrupted(f"stopped by {type(exc).__name__} in the calling thread"))
        finished.wait()
        raise
    if failure:
        raise failure[0]
