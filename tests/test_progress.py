"""Progress: a line every few seconds in a log, a bar on a terminal, nothing by default."""

from __future__ import annotations

import io
import sys

import pytest

from batchrun.engine.progress import BarProgress, LogProgress, NullProgress, Progress, make_progress


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def log_progress(every_s: float = 5.0) -> tuple[LogProgress, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    return LogProgress(stream, every_s=every_s, clock=clock), stream, clock


def test_log_progress_writes_nothing_before_the_interval_has_passed() -> None:
    progress, stream, clock = log_progress()
    progress.start(total=10, settled=0)
    clock.now += 4.9
    progress.advance(ok=3, failed=0, tokens=30)
    assert stream.getvalue() == ""


def test_log_progress_writes_counts_rate_tokens_and_failures_once_the_interval_passed() -> None:
    progress, stream, clock = log_progress()
    progress.start(total=1000, settled=0)
    clock.now += 2
    progress.advance(ok=3, failed=1, tokens=1500)
    clock.now += 3
    progress.advance(ok=6, failed=0, tokens=1000)
    assert stream.getvalue() == "batchrun: 10/1,000 rows (1.0%), 2.0 rows/s, 2,500 tokens, 1 failed\n"


def test_log_progress_writes_at_most_one_line_per_interval() -> None:
    progress, stream, clock = log_progress(every_s=5)
    progress.start(total=100, settled=0)
    for _ in range(20):  # 20 rows, one a second: lines at 5, 10, 15 and 20 s
        clock.now += 1
        progress.advance(ok=1, failed=0, tokens=10)
    lines = stream.getvalue().splitlines()
    assert [line.split(" rows")[0] for line in lines] == ["batchrun: 5/100", "batchrun: 10/100",
                                                           "batchrun: 15/100", "batchrun: 20/100"]


def test_log_progress_counts_rows_settled_before_this_run_but_not_in_its_rate() -> None:
    progress, stream, clock = log_progress()
    progress.start(total=200, settled=100)
    clock.now += 10
    progress.advance(ok=20, failed=0, tokens=0)
    assert stream.getvalue() == "batchrun: 120/200 rows (60.0%), 2.0 rows/s, 0 tokens, 0 failed\n"


def test_log_progress_adds_the_cost_to_what_earlier_runs_spent() -> None:
    progress, stream, clock = log_progress()
    progress.start(total=4, settled=2, cost_usd=1.25)
    clock.now += 5
    progress.advance(ok=2, failed=0, tokens=200, cost_usd=0.5)
    assert stream.getvalue() == "batchrun: 4/4 rows (100.0%), 0.4 rows/s, 200 tokens, $1.75, 0 failed\n"


def test_log_progress_of_an_empty_job_is_at_100_percent() -> None:
    progress, stream, clock = log_progress(every_s=0)
    progress.start(total=0, settled=0)
    progress.advance(ok=0, failed=0, tokens=0)
    assert stream.getvalue() == "batchrun: 0/0 rows (100.0%), 0.0 rows/s, 0 tokens, 0 failed\n"


def test_log_progress_close_writes_nothing_more() -> None:
    progress, stream, clock = log_progress()
    progress.start(total=1, settled=0)
    progress.advance(ok=1, failed=0, tokens=1)
    progress.close()
    assert stream.getvalue() == ""


def test_log_progress_reads_the_monotonic_clock_by_default() -> None:
    assert LogProgress(io.StringIO()).clock.__name__ == "monotonic"
    assert LogProgress(io.StringIO()).every_s == 5.0


def test_null_progress_shows_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress = NullProgress()
    progress.start(total=10, settled=3, cost_usd=1.0)
    progress.advance(ok=5, failed=2, tokens=100, cost_usd=0.5)
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_bar_progress_shows_rows_tokens_cost_and_failures() -> None:
    stream = io.StringIO()
    progress = BarProgress(stream)
    progress.start(total=10, settled=2, cost_usd=0.5)
    progress.advance(ok=3, failed=1, tokens=1234, cost_usd=0.25)
    progress.close()
    out = stream.getvalue()
    assert "6/10" in out
    assert "1,234 tokens, $0.75, 1 failed" in out


def test_bar_progress_shows_no_cost_without_pricing() -> None:
    stream = io.StringIO()
    progress = BarProgress(stream)
    progress.start(total=2, settled=0)
    progress.advance(ok=2, failed=0, tokens=10)
    progress.close()
    assert "10 tokens, 0 failed" in stream.getvalue() and "$" not in stream.getvalue()


def test_bar_progress_closed_before_start_does_nothing() -> None:
    stream = io.StringIO()
    BarProgress(stream).close()
    assert stream.getvalue() == ""


def test_make_progress_is_silent_unless_asked() -> None:
    progress = make_progress(False, Terminal())
    assert type(progress) is Progress
    assert not isinstance(progress, (BarProgress, LogProgress))


def test_make_progress_draws_a_bar_on_a_terminal() -> None:
    stream = Terminal()
    progress = make_progress(True, stream)
    assert isinstance(progress, BarProgress) and progress.stream is stream


def test_make_progress_writes_log_lines_elsewhere() -> None:
    stream = io.StringIO()
    progress = make_progress(True, stream)
    assert isinstance(progress, LogProgress) and progress.stream is stream


def test_make_progress_writes_to_stderr_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = make_progress(True)
    assert isinstance(progress, LogProgress) and progress.stream is stderr
