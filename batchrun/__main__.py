"""`python -m batchrun` and the `batchrun` command.

A Ctrl-C or a SIGTERM while the command loads (pyarrow and the HTTP stack take a
fraction of a second, more on a cold disk) ends it quietly with exit 3, as one during a
run does: no traceback for a user's key press, and no death by the signal for a
scheduler that reads the exit code.
"""

import gc
import signal
import sys


def _stop_starting(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_starting)  # the command sets its own once it has loaded
    try:
        from ._cli import main as cli  # the heavy imports, where a signal can be caught
    except KeyboardInterrupt:
        print("batchrun: interrupted while starting; nothing was sent", file=sys.stderr)
        return 3
    code = cli()
    # The command is done, its files closed and synced. At exit the collector would walk
    # every object left (pyarrow's, the HTTP stack's, the modules') for cycles: 40-60 ms
    # of every run. Frozen, they are let go without that walk; exit handlers still run.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
