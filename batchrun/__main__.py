"""`python -m batchrun` and the `batchrun` command.

A Ctrl-C while the command loads (pyarrow and the HTTP stack take a second or two)
ends it quietly, as one during a run does: no traceback for a user's key press.
"""

import sys


def main() -> int:
    try:
        from ._cli import main as cli  # the heavy imports, where a Ctrl-C can be caught
    except KeyboardInterrupt:
        print("batchrun: interrupted while starting; nothing was sent", file=sys.stderr)
        return 3
    return cli()


if __name__ == "__main__":
    sys.exit(main())
