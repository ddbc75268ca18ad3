"""The batchrun CLI with the time of its stages taken, for tests/bench/batch.py.

    python tests/bench/batchclient.py STAGES_JSON run JOB --no-progress

Runs `batchrun ARGS...` in this process as the command would, with timing wrappers put
around the functions that make each stage (only here: the product has no timers), and
writes to STAGES_JSON each stage's wall time, CPU time and calls. CPU time is the
process's (every thread's): the fakes run in another process, so it is batchrun's own.
Stages nest (an upload is part of sending); a stage entered again inside itself (the
Parquet writer's `finish` calls its `write`) is counted once. Reading the input's rows
(a generator) is timed step by step and counted under the outermost stage under way
("read the input: collect"), so the work its consumer does between rows is not.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports: they are part of what a run costs

import contextlib  # noqa: E402 - after the clock is read
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import batchrun._cli as cli  # noqa: E402
import batchrun.backends.batch.backend as batch_backend  # noqa: E402
import batchrun.backends.batch.collect as batch_collect  # noqa: E402
import batchrun.engine.run as engine_run  # noqa: E402
from batchrun.backends.batch.openai import OpenAIBatches  # noqa: E402
from batchrun.backends.local import LocalBackend  # noqa: E402
from batchrun.inputs.reader import InputReader  # noqa: E402
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
    (batch_collect, "_fetch", "download to a file"),
    (OpenAIBatches, "download", "download (HTTP)"),
    (StateStore, "save", "read, parse and save to the state"),
    (LocalBackend, "run", "live engine"),
    (OutputWriter, "write", "write the Parquet output"),
    (OutputWriter, "finish", "write the Parquet output"),
)
READ = (InputReader, "rows", "read the input")  # a generator: timed a step at a time


_END = object()


class Stages:
    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []  # the stages under way, outermost first

    @contextlib.contextmanager
    def _timing(self, stage: str, record_as: str) -> Iterator[None]:
        """Time what runs inside as `record_as`, unless `stage` is already being timed."""
        if self._depth[stage]:
            yield
            return
        self._depth[stage] += 1
        self._stack.append(stage)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[record_as] += time.perf_counter() - wall
            self.cpu[record_as] += time.process_time() - cpu
            self.calls[record_as] += 1
            self._depth[stage] -= 1
            self._stack.pop()

    def timed(self, stage: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self._timing(stage, stage):
                return fn(*args, **kwargs)
        return wrapper

    def timed_steps(self, stage: str, fn: Callable) -> Callable:
        """A generator function timed while it makes each item, not while its consumer
        works on one; counted under the outermost stage under way when it starts."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            steps = fn(*args, **kwargs)
            record_as = f"{stage}: {self._stack[0]}" if self._stack else stage
            try:
                while True:
                    with self._timing(stage, record_as):
                        item = next(steps, _END)
                    if item is _END:
                        return
                    yield item
            finally:
                steps.close()
        return wrapper

    def install(self) -> None:
        for owner, name, stage in PATCHES:
            setattr(owner, name, self.timed(stage, getattr(owner, name)))
        owner, name, stage = READ
        setattr(owner, name, self.timed_steps(stage, getattr(owner, name)))

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
