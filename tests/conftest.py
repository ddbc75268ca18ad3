"""Shared fixtures: a clean environment, the fake server, job files and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.fakeserver import FakeServer, Faults

REPO = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdef"  # a fake key; tests check it never leaks


# Fixtures that start a server: a test that uses one is slow (`pytest -m "not slow"` is
# the fast subset: no server, no subprocess). Tests that start a process mark themselves.
SERVER_FIXTURES = {"server", "s3", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


def start_cli(*args: str) -> subprocess.Popen[str]:
    """`batchrun ...` started in the background with the test key, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        env=cli_env(OPENAI_API_KEY=TEST_KEY),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_9_during_runs(spec: Path, server: FakeServer, times: int, rng: random.Random, low: int, high: int) -> None:
    """Start the job `times` times and kill -9 each run once it has sent `low`..`high` more requests."""
    for _ in range(times):
        proc = start_cli("run", str(spec), "--no-progress")
        server.wait_for_requests(len(server.requests) + rng.randint(low, high), timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CLIResult:
    """`batchrun ...` in a subprocess, as a user (or cron) runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "batchrun", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else cli_env(OPENAI_API_KEY=TEST_KEY),
        cwd=REPO,
        timeout=timeout,
    )
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)
