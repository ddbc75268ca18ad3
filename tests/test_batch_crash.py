"""The batch backend when things go wrong: kill -9 across submit, poll and collect, SIGTERM
while waiting, hostile output files, a create whose answer was lost, a batch made twice,
a file the provider lost, a batch stuck past max_wait_h, a restart with batches out."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.batchjob import ENV, job
from tests.conftest import cli_env, kill_9, read_output, run_cli, start_cli
from tests.fakebatch import BatchFaults, FakeBatchAPI
from tests.fakeserver import FakeServer

pytestmark = pytest.mark.slow  # servers on 127.0.0.1


def test_ten_kill_9s_across_submit_poll_and_collect_send_no_row_twice_and_lose_no_answer(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.faults = BatchFaults(seed=21, expire_share=0.05, refuse_share=0.02)
    batches.polls_to_finish = 3
    spec = job(tmp_path, live, batches, 500, batch={"rows_per_batch": 50})
    rng = random.Random(20)
    kills = 0
    created: list[int] = []  # batches created at each kill
    while kills < 10:
        target = batches.calls + rng.randint(1, 6)  # a moment: after that many more calls of the batch API
        command = ("submit",) if kills % 3 == 0 else ("run", "--no-progress")
        proc = start_cli(*command, str(spec), env=cli_env(**ENV))
        while not batches.wait_for_calls(target, timeout=0.05) and proc.poll() is None:
            pass
        assert proc.poll() is None, f"the job ended before kill {kills + 1}: {proc.communicate()}"
        kill_9(proc)
        kills += 1
        created.append(len(batches.created))
    # The kills fell while sending (some batches created, not all) and while polling and collecting
    assert any(0 < n < 10 for n in created) and created.count(10) >= 3, created
    done = run_cli("run", str(spec), "--no-progress", env=cli_env(**ENV))
    assert done.code == 1, done.stderr  # the refused rows failed
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(500))
    assert batches.custom_ids_in_two_batches() == set()
    # Every answer a batch gave is the row's, and no row it answered was sent live
    answered = {}
    for batch in batches.batches.values():
        if batch.obj.get("output_file_id"):
            for line in batches.content(batch.obj["output_file_id"]):
                answered[int(line["custom_id"].rsplit("-", 1)[1])] = line["response"]["body"]["id"]
    assert len(answered) > 400
    for index, response_id in answered.items():
        assert (out[index]["backend"], out[index]["response_id"]) == ("batch", response_id), out[index]
    sent_live = [int(r.body["prompt"].split()[-1]) for r in live.requests]
    assert len(sent_live) == len(set(sent_live)) and not set(sent_live) & set(answered)
    assert {r["row_index"] for r in out if r["backend"] == "live"} == set(sent_live)
    assert all(r["status"] == "ok" for r in out if r["backend"] == "live")


def test_sigterm_while_waiting_for_the_batches_stops_at_once_and_leaves_them_out(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None  # the batch never ends by itself
    spec = job(tmp_path, live, batches, 50, batch={"poll_interval_s": 30})
    proc = start_cli("run", "--no-progress", str(spec), env=cli_env(**ENV))
    assert batches.wait_for_calls(3, timeout=60)  # upload, create, a first poll: it waits now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)  # not the 30 s of its next poll
    assert proc.returncode == 3 and "stopped by SIGTERM" in stderr, stderr
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and [b["id"] for b in status["batches"]] == [batches.created[0].batch_id]
    batches.finish()
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0 and len(batches.created) == 1


def test_hostile_output_files_cost_no_memory_and_no_double_count(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, api={"max_answer_mb": 1})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    batches.finish()
    [batch] = batches.batches.values()
    stored = batches.files[batch.obj["output_file_id"]]
    lines = stored["data"].splitlines(keepends=True)
    first = json.loads(lines[0])
    giant = dict(first, response={"status_code": 200, "body": {"padding": "x" * (3 << 20)}})
    other_job = dict(first, custom_id="ffffffffffffffff-3")
    # row of lines[0]: a 3 MB line, then its own answer again; lines[1] twice; a line of another job
    stored["data"] = b"".join([json.dumps(giant).encode() + b"\n", *lines, lines[1], lines[0],
                               json.dumps(other_job).encode() + b"\n"])
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    twice = int(json.loads(lines[1])["custom_id"].rsplit("-", 1)[1])
    body = json.loads(lines[1])["response"]["body"]
    assert (out[twice]["response_id"], out[twice]["total_tokens"]) == (body["id"], body["usage"]["total_tokens"])
    assert [r["backend"] for r in out] == ["batch"] * 20 and not live.requests  # the giant line was passed over


def test_a_create_whose_answer_was_lost_is_not_made_twice(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    create = batches.create_batch
    lost = iter([True])

    def made_then_500(body: dict) -> tuple[int, dict]:
        status, made = create(body)
        return (500, {"error": {"message": "upstream timed out"}}) if next(lost, False) else (status, made)

    monkeypatch.setattr(batches, "create_batch", made_then_500)
    spec = job(tmp_path, live, batches, 30)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert len(batches.created) == 1 and batches.custom_ids_in_two_batches() == set()
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 30


def test_a_batch_a_proxy_made_twice_is_cancelled_and_its_rows_answered_once(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    batches.polls_to_finish = None
    create = batches.create_batch
    monkeypatch.setattr(batches, "create_batch", lambda body: (create(body), create(body))[1])  # its own retry
    spec = job(tmp_path, live, batches, 30)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    first, second = batches.created
    recorded = json.loads(run_cli("status", str(spec), "--json").stdout)["batches"]
    assert [b["id"] for b in recorded] == [second.batch_id]
    assert batches.batch(first.batch_id).obj["status"] == "cancelling"  # the one the state does not know
    batches.finish()
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    out = read_output(tmp_path / "out/result.parquet")
    answers = {line["response"]["body"]["id"] for line in batches.content(batches.batch(second.batch_id)
                                                                          .obj["output_file_id"])}
    assert {r["response_id"] for r in out} == answers and not live.requests


def test_a_file_the_provider_no_longer_has_is_uploaded_again(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    create = batches.create_batch
    monkeypatch.setattr(batches, "create_batch", lambda body: (503, {"error": {"message": "overloaded"}}))
    spec = job(tmp_path, live, batches, 30)
    stopped = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert stopped.code == 3 and "still fails after 8 attempts" in stopped.stderr, stopped.stderr
    [upload] = batches.uploads
    del batches.files[upload.file_id]  # expired, or deleted by someone
    monkeypatch.setattr(batches, "create_batch", create)
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 0
    assert len(batches.uploads) == 2 and len(batches.created) == 1
    assert batches.created[0].input_file_id == batches.uploads[1].file_id
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 30


def test_a_batch_stuck_past_max_wait_is_cancelled_and_its_rows_fail_with_the_reason(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    batches.polls_to_finish = None  # stuck in validation, until cancelled: then the next poll ends it
    retrieve = batches.retrieve_batch

    def ends_once_cancelled(batch_id: str) -> dict:
        if batches.batch(batch_id).obj["status"] == "cancelling":
            batches.advance(batch_id)
        return retrieve(batch_id)

    monkeypatch.setattr(batches, "retrieve_batch", ends_once_cancelled)
    spec = job(tmp_path, live, batches, 10, batch={"max_wait_h": 0.001, "poll_interval_s": 0.5, "fallback": "none"})
    assert run_cli("run", str(spec), env=cli_env(**ENV)).code == 1
    out = read_output(tmp_path / "out/result.parquet")
    assert batches.batch(batches.created[0].batch_id).obj["status"] == "cancelled"
    assert all(r["status"] == "failed" and "cancelled by batchrun past batch_api.max_wait_h (0.001 h)" in r["error"]
               for r in out), out[0]["error"]


def test_restart_cancels_the_batches_it_discards_and_a_live_restart_is_refused_while_they_are_out(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    text = spec.read_text()
    spec.write_text(text[:text.index("batch_api:")])  # the section dropped: a live restart
    refused = run_cli("run", "--restart", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "1 batch of" in refused.stderr and "its --restart cancels them" in refused.stderr
    assert not live.requests
    spec.write_text(text)
    assert run_cli("submit", "--restart", str(spec), env=cli_env(**ENV)).code == 0
    old, new = batches.created
    assert batches.batch(old.batch_id).obj["status"] == "cancelling" and old.custom_ids == new.custom_ids
    assert batches.batch(new.batch_id).obj["status"] == "validating"



def forget_batch_id(spec: Path, batch_id: str) -> None:
    """The state as a run leaves it when kill -9 fell while the provider made the batch:
    planned, its file uploaded, the batch's id never recorded."""
    with contextlib.closing(sqlite3.connect(spec.parent / "out/result.batchrun.sqlite")) as db, db:
        db.execute("UPDATE batches SET batch_id = NULL, state = 'planned' WHERE batch_id = ?", (batch_id,))


def test_restart_cancels_an_unrecorded_batch_and_passes_over_one_that_ended(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """A batch that ended is refused a cancel (409) and needs none; one a killed run
    created but never recorded is found under its key and cancelled. Nothing the restart
    discards is left answering (and billing) rows a second time."""
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 30, batch={"rows_per_batch": 10})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    ended, unrecorded, waiting = (c.batch_id for c in batches.created)
    batches.finish(ended)
    forget_batch_id(spec, unrecorded)
    restarted = run_cli("submit", "--restart", str(spec), env=cli_env(**ENV))
    assert restarted.code == 0, restarted.stderr
    assert [batches.batch(b).obj["status"] for b in (ended, unrecorded, waiting)] == \
        ["completed", "cancelling", "cancelling"]
    assert len(batches.created) == 6  # the rows again, in new batches
    batches.finish()
    assert batches.custom_ids_in_two_batches() == {c for c in batches.created[0].custom_ids}  # the ended one's only


def test_a_restart_whose_cancels_fail_discards_nothing(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, batch={"rows_per_batch": 10})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    monkeypatch.setattr(batches, "cancel_batch", lambda batch_id: (503, {"error": {"message": "overloaded"}}))
    failed = run_cli("submit", "--restart", str(spec), env=cli_env(**ENV))
    assert failed.code == 3 and "cancelling batch" in failed.stderr and "overloaded" in failed.stderr, failed.stderr
    assert len(batches.created) == 2  # nothing sent again
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert [b["id"] for b in status["batches"]] == [c.batch_id for c in batches.created]  # still known
    monkeypatch.undo()
    assert run_cli("submit", "--restart", str(spec), env=cli_env(**ENV)).code == 0
    assert [batches.batch(c.batch_id).obj["status"] for c in batches.created[:2]] == ["cancelling"] * 2


def test_sigterm_while_sending_sends_no_more_and_a_second_one_stops_at_once(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten batches to send, the third's upload held at the server: a SIGTERM then lets that
    upload end but creates nothing more (a rerun creates it from its file, never twice); a
    second signal cuts the call under way short."""
    batches.polls_to_finish = None
    arrived, gate = threading.Event(), threading.Event()
    upload = batches.upload

    def held_third(*args: object, **kwargs: object) -> tuple[int, dict]:
        if len(batches.uploads) == 2:
            arrived.set()
            batches.lock.release()  # (the fake answers under its lock)
            try:
                gate.wait(timeout=60)
            finally:
                batches.lock.acquire()
        return upload(*args, **kwargs)

    monkeypatch.setattr(batches, "upload", held_third)
    spec = job(tmp_path, live, batches, 100, batch={"rows_per_batch": 10})
    proc = start_cli("run", "--no-progress", str(spec), env=cli_env(**ENV))
    assert arrived.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    gate.set()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "stopped by SIGTERM" in stderr, stderr
    assert (len(batches.uploads), len(batches.created)) == (3, 2)

    arrived.clear()
    gate.clear()
    monkeypatch.setattr(batches, "upload", held_third)  # the next upload (the fourth batch's) is held
    batches.uploads.pop()  # (so that it is the one held: the third's file is reused, not uploaded again)
    proc = start_cli("run", "--no-progress", str(spec), env=cli_env(**ENV))
    assert arrived.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # (two of one signal at once may arrive as one)
    try:
        _, stderr = proc.communicate(timeout=30)  # the held upload never ends by itself
    finally:
        gate.set()
    assert proc.returncode == 3 and "stopped at once by a second SIG" in stderr, stderr
    assert len(batches.created) == 3  # the third's, from the file already uploaded
    monkeypatch.undo()
    batches.polls_to_finish = 1
    assert run_cli("run", "--no-progress", str(spec), env=cli_env(**ENV)).code == 0
    assert len(batches.created) == 10 and batches.custom_ids_in_two_batches() == set()
    assert [r["backend"] for r in read_output(tmp_path / "out/result.parquet")] == ["batch"] * 100


def test_a_batch_whose_output_file_is_gone_hands_its_rows_on_and_the_others_are_collected(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """Its file deleted before collection (by hand, by the provider's retention): its rows
    have no answer from it, which fallback: none fails with the reason; the job is not stuck."""
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, batch={"rows_per_batch": 10, "fallback": "none"})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    batches.finish()
    gone = batches.batch(batches.created[0].batch_id).obj["output_file_id"]
    del batches.files[gone]
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 1, done.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["failed"] * 10 + ["ok"] * 10 and not live.requests
    assert all("its output file is gone from the provider" in r["error"] for r in out[:10]), out[0]["error"]


def test_a_restart_keeps_the_state_when_a_running_batch_refuses_its_cancel(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4xx to a cancel of a batch that has not ended leaves it answering (and billing):
    discarding the state then would have every row paid twice."""
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, batch={"rows_per_batch": 10})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    monkeypatch.setattr(batches, "cancel_batch", lambda batch_id: (400, {"error": {"message": "not now"}}))
    refused = run_cli("submit", "--restart", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "is still validating at the provider and its cancel was refused" in refused.stderr
    assert "nothing was discarded" in refused.stderr and len(batches.created) == 2
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert [b["id"] for b in status["batches"]] == [c.batch_id for c in batches.created]


def test_a_restart_of_a_damaged_state_cancels_the_batches_the_provider_lists_for_the_job(
        tmp_path: Path, live: FakeServer, batches: FakeBatchAPI) -> None:
    """The damaged state records nothing readable: the provider's list under the job's
    fingerprint says what is out."""
    batches.polls_to_finish = None
    spec = job(tmp_path, live, batches, 20, batch={"rows_per_batch": 10})
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0
    state = tmp_path / "out/result.batchrun.sqlite"
    state.write_bytes(b"not a database" * 100)
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 2  # damaged: says so
    assert run_cli("submit", "--restart", str(spec), env=cli_env(**ENV)).code == 0
    old = [c.batch_id for c in batches.created[:2]]
    assert [batches.batch(b).obj["status"] for b in old] == ["cancelling"] * 2 and len(batches.created) == 4
    batches.finish()
    assert batches.custom_ids_in_two_batches() == set()
