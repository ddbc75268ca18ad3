"""Every fault at once, at scale, with the runner killed again and again."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from tests.conftest import (
    assert_key_nowhere,
    kill_9_mid_run,
    paid_twice,
    read_output,
    run_cli,
    start_cli,
    write_jsonl,
    write_spec,
)
from tests.fakeserver import FakeServer, Faults, request_key
from tests.test_e2e import assert_exact_answers

EVERY_FAULT = dict(
    rate_429=0.02, retry_after="0", error_500_rate=0.02, error_503_rate=0.02, drop_rate=0.02,
    hang_rate=0.01, hang_s=5.0, invalid_json_rate=0.02, truncated_body_rate=0.02, truncated_stream_rate=0.03,
    latency_s=0.01, latency_jitter_s=0.005,
)


def test_every_fault_and_six_kills_lose_nothing_and_repay_only_what_was_in_flight(
    tmp_path: Path, server: FakeServer
) -> None:
    server.faults = Faults(seed=11, **EVERY_FAULT)
    rows = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"fault question {i}"}], "stream": i % 2 == 0}
        for i in range(5000)
    ]
    keys = {row["id"]: request_key(row) for row in rows}
    write_jsonl(tmp_path / "input.jsonl", rows)
    concurrency = 32
    spec = write_spec(tmp_path, concurrency=concurrency, retry={"max_attempts": 10, "backoff_initial_s": 0.01,
                      "backoff_max_s": 0.05}, api={"base_url": server.base_url, "timeout_s": 3})
    rng = random.Random(11)
    kills = []
    in_progress = []  # rows a run had sent and not saved when it was killed, as sets of request keys

    for _ in range(6):
        kill = kill_9_mid_run(spec, server, rng.randint(200, 800), timeout=120)
        kills.append(kill)
        server.wait_for_no_connection()  # what the killed run sent is all recorded: its rows are in this run's
        saved = {keys[row_id] for row_id in _saved_ids(tmp_path / "out/result.batchrun.sqlite")}
        in_progress.append({r.key for r in server.requests[kill.sent_before:]} - saved)

    result = run_cli("run", str(spec), "--no-progress", timeout=300)

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert len(out) == 5000
    assert_exact_answers(out, server, [request_key(r) for r in rows])
    outcomes = {r.outcome for r in server.requests}
    assert set(EVERY_FAULT_OUTCOMES) <= outcomes, outcomes
    # A kill costs at most the rows the workers held: the requests in flight, on the
    # server or on their way back and not yet saved. An answer paid twice is always
    # one of those; a saved answer is never asked for again.
    assert max(map(len, in_progress)) <= concurrency, list(map(len, in_progress))
    twice = {key: len(answers) - 1 for key, answers in server.answers.items() if len(answers) > 1}
    assert set(twice) <= set().union(*in_progress)
    assert paid_twice(server) == sum(twice.values()) <= sum(map(len, in_progress))
    # The server's own count of requests in flight at a kill is no bound: an answer it
    # has finished writing may still be in the socket or in the writer's commit window,
    # in flight for the run and paid again after the kill (99 > 83 on a loaded machine).
    # The rows sent and not saved, above, are the bound; the server's count is reported.
    server_in_flight = [kill.in_flight for kill in kills]
    print(f"at the kills: {server_in_flight} requests in flight on the server, "
          f"{list(map(len, in_progress))} rows sent and not saved; answers paid twice: {paid_twice(server)}")

    assert_key_nowhere(tmp_path, result.stdout, result.stderr, *(text for k in kills for text in (k.stdout, k.stderr)))


def _saved_ids(state: Path) -> list[str]:
    """Ids of the rows the state holds as settled, read as any SQLite reader would."""
    db = sqlite3.connect(state)
    try:
        return [row_id for (row_id,) in db.execute("SELECT id FROM results")]
    finally:
        db.close()


EVERY_FAULT_OUTCOMES = ("429", "500", "503", "drop", "hang", "invalid_json", "truncated_body", "truncated_stream", "ok")


def test_a_state_file_removed_under_a_running_job_stops_it_with_a_clear_message(
    tmp_path: Path, server: FakeServer
) -> None:
    server.faults = Faults(latency_s=0.05)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(2000)])
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(50, timeout=30)
    # The state first: a commit between two removals must find the state gone, whatever
    # the order the folder lists its files in (with the -wal first, it finds the log gone)
    for path in sorted((tmp_path / "out").glob("result.batchrun.sqlite*"), key=lambda p: len(p.name)):
        path.unlink()
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 3, stderr
    assert "result.batchrun.sqlite: the job's state file was removed or replaced while the job ran; " \
           "batchrun wrote every answer saved so far back to it" in stderr
    assert "Traceback" not in stderr
    assert len(server.requests) < 2000
    (state,) = (tmp_path / "out").glob("result.batchrun.sqlite")
    assert state.stat().st_mode & 0o777 == 0o600

    server.faults = Faults()  # slow answers only kept the first run going until the removal
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 2000
    # Only the answers that arrived while the state was gone are paid twice.
    assert paid_twice(server) <= 8, paid_twice(server)
