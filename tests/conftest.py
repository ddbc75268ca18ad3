"""Shared fixtures and helpers: a clean environment, the fake server, job files, the CLI,
kill -9 mid-run, and the key that must appear nowhere."""

from __future__ import annotations

import _posixsubprocess
import contextlib
import faulthandler
import gzip
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from batchrun._cli import main
from tests.fakebatch import BatchFaults, FakeBatchAPI
from tests.fakeserver import FakeServer, Faults

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdef"  # a fake key; tests check it never leaks


# Fixtures that start a server: a test that uses one is slow (`pytest -m "not slow"` is
# the fast subset: no server, no subprocess). Tests that start a process mark themselves;
# `no_process_in_a_fast_test` fails those that forget.
SERVER_FIXTURES = {"server", "s3", "cluster"}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: the whole suite mostly waits (on servers, processes, kills), so two
    workers a core; the fast subset is all CPU, so one."""
    cores = os.cpu_count() or 1
    return cores if "not slow" in (config.getoption("markexpr") or "") else 2 * cores


_FAST_SUBSET = False  # `pytest -m "not slow"`: set by pytest_configure, in each worker


def pytest_configure(config: pytest.Config) -> None:
    global _FAST_SUBSET
    _FAST_SUBSET = "not slow" in (config.getoption("markexpr") or "")


def examples(n: int) -> int:
    """A property's Hypothesis examples: all `n` in the whole suite (CI), a tenth in the
    fast subset, which is for seconds."""
    return max(10, n // 10) if _FAST_SUBSET else n


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_process_in_a_fast_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked slow that starts a process or a server fails, naming what it started:
    the fast subset stays fast only if nothing in it waits for an interpreter or a port."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: object, **kwargs: object) -> Any:
            if args and isinstance(args[0], socket.socket):
                args[0].close()  # the refused listener, not left for the next test to warn of
            raise AssertionError(f"{request.node.nodeid} starts {what} but is not marked slow: mark it "
                                 "@pytest.mark.slow, or call batchrun in-process (run_cli, run_job)")
        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a subprocess"))
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse("a process"))  # multiprocessing's spawn too
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"a process (os.{name})"))
    monkeypatch.setattr(socket.socket, "listen", refuse("a server (a listening socket)"))


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's API keys or batchrun settings."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "FIREWORKS_", "BATCHRUN_")):
            monkeypatch.delenv(name)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(Faults()) as s:
        yield s


@pytest.fixture
def live() -> Iterator[FakeServer]:
    """The live API's fake, beside a batch API's (`batches`)."""
    with FakeServer(Faults()) as s:
        yield s


@pytest.fixture
def batches() -> Iterator[FakeBatchAPI]:
    """The fake of OpenAI's Files + Batches API; a batch ends at its second poll."""
    with FakeBatchAPI(BatchFaults(seed=7), polls_to_finish=2, api_key=TEST_KEY) as f:
        yield f


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_spec(folder: Path, name: str = "job.yaml", **spec: Any) -> Path:
    """A job spec with fast retries; keyword arguments override or add keys."""
    base: dict[str, Any] = {
        "input": "input.jsonl",
        "output": "out/result.parquet",
        "model": "test-model",
        "retry": {"max_attempts": 6, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
    }
    base.update(spec)
    path = folder / name
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FIREWORKS_", "BATCHRUN_"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CLIResult:
    """`batchrun ...` as a user (or cron) runs it, in this process: `main(argv)` with the
    command's environment, working folder and streams of its own, and the signal handlers
    it sets put back after. Half a second faster than a new interpreter, and as faithful
    wherever the process itself is not the subject; a test of signals, kill -9, umask or
    memory starts one (`start_cli`, `run_cli_process`). A run past `timeout` is not
    stopped, but every thread's stack is printed, so a hang names where it hangs."""
    out, err = io.StringIO(), io.StringIO()
    with _as_a_command(env if env is not None else cli_env(OPENAI_API_KEY=TEST_KEY)):
        faulthandler.dump_traceback_later(timeout)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        finally:
            faulthandler.cancel_dump_traceback_later()
    return CLIResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _as_a_command(env: dict[str, str]) -> Iterator[None]:
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for number, handler in saved_signals.items():
            signal.signal(number, handler)


def run_cli_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CLIResult:
    """`batchrun ...` in a subprocess: for a test about the process (its start, its
    signals, its exit) rather than about what the command does."""
    proc = subprocess.run(
        [sys.executable, "-m", "batchrun", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else cli_env(OPENAI_API_KEY=TEST_KEY),
        cwd=REPO,
        timeout=timeout,
    )
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`batchrun ...` started in the background (with the test key), output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        env=env if env is not None else cli_env(OPENAI_API_KEY=TEST_KEY),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Killed:
    """A run ended by kill -9: what the server had seen and what the run said."""

    sent_before: int  # requests the server had seen when the run started (0 if unknown)
    in_flight: int  # on the server when the signal left, plus what arrived before the process was gone
    at: float  # time.monotonic() when the signal left
    stdout: str
    stderr: str


def kill_9(proc: subprocess.Popen[str], server: FakeServer | None = None, sent_before: int = 0) -> Killed:
    """kill -9 a running batchrun and reap it; it must have died of the signal, not ended first.

    What the server was working on at the kill is the yardstick of what a resume may pay
    again: the requests in flight when the signal left, and those that arrived before the
    process was gone (on a loaded machine, not nothing)."""
    in_flight = arrived = 0
    if server is not None:
        with server._cond:
            in_flight, arrived = server.in_flight, len(server.requests)
    proc.send_signal(signal.SIGKILL)
    at = time.monotonic()
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr)
    if server is not None:
        in_flight += len(server.requests) - arrived
    return Killed(sent_before, in_flight, at, stdout or "", stderr or "")


def kill_9_mid_run(spec: Path, server: FakeServer, after: int, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 60) -> Killed:
    """`batchrun run SPEC ARGS` killed with kill -9 once the server has seen `after` more requests."""
    sent_before = len(server.requests)
    proc = start_cli("run", str(spec), "--no-progress", *args, env=env)
    server.wait_for_requests(sent_before + after, timeout=timeout)
    return kill_9(proc, server, sent_before)


def kill_9_during_runs(spec: Path, server: FakeServer, times: int, rng: random.Random, low: int,
                       high: int) -> list[Killed]:
    """Start the job `times` times and kill -9 each run once it has sent `low`..`high` more requests."""
    return [kill_9_mid_run(spec, server, rng.randint(low, high)) for _ in range(times)]


def paid_twice(server: FakeServer) -> int:
    """Answers the server sent more than once for the same request: what kills cost."""
    return sum(len(answers) - 1 for answers in server.answers.values())


def assert_key_nowhere(folder: Path, *texts: str, key: str = TEST_KEY, piece: int | None = None) -> None:
    """The API key is in none of `texts` (a command's output) and in no file under `folder`.
    With `piece`, no run of that many of its characters either, even with the whitespace
    squeezed out (a key split over lines or spaced out by an error message)."""
    files = {str(p): p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()}
    pieces = {key[i:i + piece] for i in range(len(key) - piece + 1)} if piece else {key}
    for where, text in [*((f"text {i}", t) for i, t in enumerate(texts)), *files.items()]:
        squeezed = "".join(text.split()) if piece else text
        found = sorted(p for p in pieces if p in text or p in squeezed)
        assert not found, f"{where} holds {found}"
