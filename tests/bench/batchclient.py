"""The batchrun CLI with the time of its stages taken, for tests/bench/batch.py.

    python tests/bench/batchclient.py STAGES_JSON run JOB --no-progress

Runs `batchrun ARGS...` in this process as the command would, with timing wrappers put
around the functions that make each stage (only here: the product has no timers), and
writes to STAGES_JSON each stage's wall time, CPU time and calls. CPU time is the
process's (every thread's): the fakes run in another process, so it is batchrun's own.
Stages nest (an upload is part of sending); a stage entered again inside itself (the
Parquet writer's `finish` calls its `write`) is counted once.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports: they are part of what a run costs

import functools  # noqa: E402 - after the clock is read
import json  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import batchrun._cli as cli  # noqa: E402
import batchrun.backends.batch.backend as batch_backend  # noqa: E402
import batchrun.backends.batch.collect as batch_collect  # noqa: E402
import batchrun.engine.run as engine_run  # noqa: E402
from batchrun.backends.batch.openai import OpenAIBatches  # noqa: E402
from batchrun.backends.local import LocalBackend  # noqa: E402
from batchrun.storage.output import OutputWriter  # noqa: E402
from batchrun.storage.state import StateStore  # noqa: E402

IMPORTED = (time.perf_counter(), time.process_time())

# (owner, attribute, stage): the functions whose time makes each stage
PATCHES = (
    (batch_backend, "open_state", "open the state (validate the input)"),
    (engine_run, "open_state", "engine: open the state"),
    (batch_backend, "send", "send"),
    (OpenAIBatches, "upload", "upload (HTTP)"),
    (OpenAIBatches, "create", "create (HTTP)"),
    (OpenAIBatches, "get", "poll (HTTP)"),
    (batch_backend, "pause", "wait between polls"),
    (batch_backend, "collect", "collect"),
    (batch_collect, "_outcomes", "download + parse"),
    (OpenAIBatches, "download", "download (HTTP)"),
    (StateStore, "save", "save to the state"),
    (LocalBackend, "run", "live engine"),
    (OutputWriter, "write", "write the Parquet output"),
    (OutputWriter, "finish", "write the Parquet output"),
)


class Stages:
    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)

    def timed(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth[stage]:
                return fn(*args, **kwargs)
            self._depth[stage] += 1
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[stage] += time.perf_counter() - wall
                self.cpu[stage] += time.process_time() - cpu
                self.calls[stage] += 1
                self._depth[stage] -= 1
        return wrapper

    def install(self) -> None:
        for owner, name, stage in PATCHES:
            setattr(owner, name, self.timed(stage, getattr(owner, name)))

    def report(self) -> dict[str, dict[str, float]]:
        out = {"start-up (Python and imports)": {"wall_s": IMPORTED[0] - STARTED, "cpu_s": IMPORTED[1], "calls": 1}}
        out.update({stage: {"wall_s": self.wall[stage], "cpu_s": self.cpu[stage], "calls": self.calls[stage]}
                    for stage in self.calls})
        out["total"] = {"wall_s": time.perf_counter() - STARTED, "cpu_s": time.process_time(), "calls": 1}
        return out


def main() -> int:
    stages_path, argv = Path(sys.argv[1]), sys.argv[2:]
    stages = Stages()
    stages.install()
    try:
        return cli.main(argv)
    finally:
        stages_path.write_text(json.dumps(stages.report()))


if __name__ == "__main__":
    sys.exit(main())
