"""`python -m batchrun` and the `batchrun` command.

A Ctrl-C while the command loads (pyarrow and the HTTP stack take a second or two)
ends it quietly, as one during a run does: no traceback for a user's key press.
"""

import gc
import sys


def main() -> int:
    try:
        from ._cli import main as cli  # the heavy imports, where a Ctrl-C can be caught
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
