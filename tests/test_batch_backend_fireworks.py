"""The batch backend end to end on Fireworks: a job through the fake of Fireworks' datasets
and batch inference jobs (tests/fakefireworks.py), what it does not answer through the
fake live API (tests/fakeserver.py), every row stored exactly once."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrun import run_job
from tests.conftest import TEST_KEY, cli_env, kill_9, read_output, run_cli, start_cli, write_jsonl, write_spec
from tests.fakefireworks import FakeFireworks, FakeJob, Faults
from tests.fakeserver import FakeServer
from tests.fakeserver import Faults as LiveFaults

pytestmark = pytest.mark.slow  # servers on 127.0.0.1

FW_KEY = "fw-test-key-0123456789"
ENV = {"OPENAI_API_KEY": TEST_KEY, "FIREWORKS_API_KEY": FW_KEY}
MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
LIVE_PRICE = {"input": 1.0, "cached_input": 0.5, "output": 2.0}
BATCH_PRICE = {"input": 0.3, "cached_input": 0.1, "output": 0.7}


class RefusingFireworks(FakeFireworks):
    """The fake, refusing a seeded share of rows with a 4xx error line (a request the model
    cannot take), and handing out download URLs that expire before they are used."""

    refuse_share = 0.0
    expiring_urls = 0  # the next this many signed download URLs are stale on arrival

    def _answer(self, job: FakeJob, row: dict) -> None:
        custom_id = row["custom_id"]
        if random.Random(f"refuse:{custom_id}").random() < self.refuse_share:
            job.errors[custom_id] = {"custom_id": custom_id,
                                     "error": {"code": 400, "message": "prompt is too long (injected)"}}
            return
        super()._answer(job, row)

    def _sign(self, method: str, dataset_id: str, filename: str) -> str:
        url = super()._sign(method, dataset_id, filename)
        if method == "GET" and self.expiring_urls > 0:
            self.expiring_urls -= 1
            token = url.split("/signed/", 1)[1].split("/", 1)[0]
            self._signed[token] = (*self._signed[token][:3], self.clock - 1)
        return url

    def downloads(self) -> tuple[int, int]:
        """(download URLs asked for, signed GETs)."""
        asked = sum(path.endswith(":getDownloadEndpoint") for _, path, _ in self.requests)
        return asked, sum(method == "GET" and path.startswith("/signed/") for method, path, _ in self.requests)


@pytest.fixture
def live() -> Iterator[FakeServer]:
    with FakeServer(LiveFaults()) as s:
        yield s


@pytest.fixture
def fw() -> Iterator[RefusingFireworks]:
    with RefusingFireworks(api_key=FW_KEY, faults=Faults(seed=7), polls_to_finish=4) as f:
        yield f


def job(tmp_path: Path, live: FakeServer, fw: FakeFireworks, rows: int, **spec: Any) -> Path:
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "messages": asked(i)} for i in range(rows)))
    batch = {"kind": "fireworks", "base_url": fw.base_url, "account_id": fw.account_id, "poll_interval_s": 0.01,
             "api_key_env": "FIREWORKS_API_KEY", **spec.pop("batch", {})}
    spec.setdefault("pricing", {MODEL: LIVE_PRICE})
    spec.setdefault("model", MODEL)
    return write_spec(tmp_path, api={"base_url": live.base_url}, batch_api=batch, **spec)


def asked(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


def cost(row: dict, price: dict) -> float:
    cached = row["cached_tokens"] or 0
    return ((row["prompt_tokens"] - cached) * price["input"] + cached * price["cached_input"]
            + row["completion_tokens"] * price["output"]) * 1e-6


def uploads(fw: FakeFireworks) -> list[str]:
    return [path for method, path, _ in fw.requests if method in ("POST", "PUT")
            and (path.endswith(":upload") or path.startswith("/signed/"))]


def in_two_jobs(fw: FakeFireworks) -> dict[str, list[str]]:
    return {custom_id: jobs for custom_id, jobs in fw.sent().items() if len(jobs) > 1}


@pytest.mark.parametrize("batch_prices", [False, True], ids=["half-price", "batch-prices"])
def test_expired_rows_go_live_refused_rows_fail_and_every_row_is_stored_once(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks, batch_prices: bool) -> None:
    fw.faults, fw.refuse_share = Faults(seed=11, expire_at=0.9), 0.02
    pricing = {MODEL: {**LIVE_PRICE, "batch": BATCH_PRICE} if batch_prices else LIVE_PRICE}
    spec = job(tmp_path, live, fw, 2000, batch={"rows_per_batch": 700}, pricing=pricing)
    summary = run_job(spec, environ=ENV)
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(2000)) and [r["id"] for r in out][:3] == ["r0", "r1", "r2"]
    assert sorted(len(j.rows) for j in fw.jobs.values()) == [600, 700, 700] and in_two_jobs(fw) == {}
    assert {j.model for j in fw.jobs.values()} == {MODEL} and {j.state for j in fw.jobs.values()} == {
        "JOB_STATE_EXPIRED"}
    refused = [r for r in out if r["status"] == "failed"]
    assert 20 < len(refused) < 70 and all(r["backend"] == "batch" for r in refused)
    assert all(r["error"] == "the batch refused it: HTTP 400: prompt is too long (injected)" for r in refused)
    answered = {int(c.split("-")[1]) for c in fw.answered()}
    went_live = {r["row_index"] for r in out if r["backend"] == "live"}
    assert went_live == set(range(2000)) - answered - {r["row_index"] for r in refused}
    assert 150 < len(went_live) < 250  # a tenth of each job expired
    live_prompts = Counter(json.dumps(request.body["messages"]) for request in live.requests)
    assert len(live.requests) == len(went_live) and max(live_prompts.values()) == 1  # only those went live, once
    assert live_prompts.keys() == {json.dumps(asked(i)) for i in went_live}
    assert Counter((r["backend"], r["status"]) for r in out) == {
        ("batch", "ok"): len(answered), ("batch", "failed"): len(refused), ("live", "ok"): len(went_live)}
    assert summary.ok == 2000 - len(refused) and summary.failed == len(refused)
    batch_price = BATCH_PRICE if batch_prices else {k: v / 2 for k, v in LIVE_PRICE.items()}
    for row in out:
        if row["status"] == "ok":
            price = batch_price if row["backend"] == "batch" else LIVE_PRICE
            assert row["cost_usd"] == pytest.approx(cost(row, price)), row
    assert any(r["cached_tokens"] for r in out if r["backend"] == "batch")  # the cached price was used too


def test_submit_returns_at_once_status_lists_the_jobs_and_run_collects_them(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    fw.advance_on_poll = False  # nothing moves until the test says so
    spec = job(tmp_path, live, fw, 300, batch={"rows_per_batch": 200})
    submitted = run_cli("submit", str(spec), env=cli_env(**ENV))
    assert submitted.code == 0, submitted.stderr
    assert "300 in the provider's batches" in submitted.stdout
    jobs = list(fw.jobs.values())
    assert [len(fw.datasets[j.input_dataset_id.rsplit("/", 1)[-1]].lines()) for j in jobs] == [200, 100]
    assert not live.requests and {j.state for j in jobs} == {"JOB_STATE_VALIDATING"}
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "submitted" and status["remaining"] == 300
    assert [(b["id"], b["state"]) for b in status["batches"]] == [(j.job_id, "validating") for j in jobs]
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0  # again: nothing new is sent
    assert len(fw.jobs) == 2 and len(uploads(fw)) == 2
    fw.advance(steps=2)
    status = json.loads(run_cli("status", str(spec), "--json").stdout)  # status reads the state, not the provider
    assert [b["state"] for b in status["batches"]] == ["validating"] * 2
    assert run_cli("submit", str(spec), env=cli_env(**ENV)).code == 0  # a submit polls once, and says so
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert [(b["state"], b["counts"]["total"]) for b in status["batches"]] == [("running", 200), ("running", 100)]
    fw.advance(steps=2)
    assert {j.state for j in jobs} == {"JOB_STATE_COMPLETED"}
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["ok"] * 300 and {r["backend"] for r in out} == {"batch"}
    assert [r["id"] for r in out] == [f"r{i}" for i in range(300)]
    assert not live.requests and len(fw.jobs) == 2 and in_two_jobs(fw) == {}
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "finished" and "batches" not in status


def test_a_job_that_fails_whole_is_answered_live(tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    fw.faults = Faults(seed=5, fail_at=0.5)
    spec = job(tmp_path, live, fw, 120, batch={"rows_per_batch": 50})
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert len(fw.jobs) == 3 and {j.state for j in fw.jobs.values()} == {"JOB_STATE_FAILED"}
    out = read_output(tmp_path / "out/result.parquet")
    assert [(r["status"], r["backend"]) for r in out] == [("ok", "live")] * 120
    sent_live = sorted(json.dumps(r.body["messages"]) for r in live.requests)
    assert sent_live == sorted(json.dumps(asked(i)) for i in range(120))
    assert all(r["cost_usd"] == pytest.approx(cost(r, LIVE_PRICE)) for r in out)


@pytest.mark.parametrize(("wrong", "fix"), [
    ({"batch": {"account_id": "someone-else"}}, "set batch_api.account_id"),
    ({"model": "accounts/fireworks/models/no-batch"}, "choose a model that supports batch inference"),
], ids=["account", "model"])
def test_a_wrong_account_or_a_model_without_batch_names_the_fix_and_a_corrected_rerun_runs(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks, wrong: dict, fix: str) -> None:
    spec = job(tmp_path, live, fw, 30, **wrong)
    refused = run_cli("run", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and fix in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert fw.datasets == {} and fw.jobs == {} and uploads(fw) == [] and not live.requests
    job(tmp_path, live, fw, 30)  # the spec fixed
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert [(r["status"], r["backend"]) for r in read_output(tmp_path / "out/result.parquet")] == [("ok", "batch")] * 30
    assert len(fw.jobs) == 1 and not live.requests


def test_prompt_rows_without_an_endpoint_are_refused_before_upload_and_run_with_endpoint_chat(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    spec = job(tmp_path, live, fw, 10)
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(10)))
    refused = run_cli("run", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "set endpoint: chat in the spec" in refused.stderr, refused.stderr
    assert fw.datasets == {} and not live.requests
    spec = job(tmp_path, live, fw, 0, endpoint="chat")
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(10)))
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    assert [r["status"] for r in read_output(tmp_path / "out/result.parquet")] == ["ok"] * 10
    [sent] = fw.jobs.values()
    assert [row["body"]["messages"] for row in sent.rows] == [asked(i) for i in range(10)]


def test_spec_with_embeddings_and_fireworks_batches_is_refused_naming_the_fix(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    spec = job(tmp_path, live, fw, 5, endpoint="embeddings", model="accounts/fireworks/models/nomic-embed-text-v1")
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "input": f"text {i}"} for i in range(5)))
    for command in ("run", "submit"):
        refused = run_cli(command, str(spec), env=cli_env(**ENV))
        assert refused.code == 2 and "does not answer the embeddings endpoint" in refused.stderr, refused.stderr
        assert "drop batch_api" in refused.stderr
    assert fw.requests == [] and not live.requests


def test_an_upload_5xx_is_retried_and_an_expired_download_url_is_asked_for_again(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    fw.faults, fw.expiring_urls = Faults(seed=9, upload_errors=2), 1
    spec = job(tmp_path, live, fw, 100, batch={"rows_per_batch": 50})
    done = run_cli("run", str(spec), env=cli_env(**ENV))
    assert done.code == 0, done.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [(r["status"], r["backend"]) for r in out] == [("ok", "batch")] * 100
    assert len(uploads(fw)) == 4 and len(fw.datasets) == 4  # two refused, then two taken; two inputs, two outputs
    assert sorted(len(j.rows) for j in fw.jobs.values()) == [50, 50] and in_two_jobs(fw) == {}
    asked, fetched = fw.downloads()
    assert (asked, fetched) == (3, 3)  # one URL stale on arrival, asked for again; one per finished job
    assert not live.requests


def test_rows_naming_another_model_are_refused_before_upload(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    spec = job(tmp_path, live, fw, 0)
    write_jsonl(tmp_path / "input.jsonl", [{"id": "a", "messages": asked(0), "model": "accounts/x/models/other"}])
    refused = run_cli("run", str(spec), env=cli_env(**ENV))
    assert refused.code == 2 and "row 1 asks for model 'accounts/x/models/other'" in refused.stderr, refused.stderr
    assert "a fireworks batch runs one model, the spec's" in refused.stderr
    assert fw.datasets == {} and not live.requests


def test_kill_9s_across_submit_poll_and_collect_send_no_row_twice_and_lose_no_answer(
        tmp_path: Path, live: FakeServer, fw: RefusingFireworks) -> None:
    fw.faults = Faults(seed=9, expire_at=0.9)
    fw.polls_to_finish = 10  # (each poll moves a job on: the kills must come before the end)
    spec = job(tmp_path, live, fw, 600, batch={"rows_per_batch": 200})
    rng = random.Random(9)
    jobs_at_kills = []
    for kill in range(10):
        target = len(fw.requests) + rng.randint(2, 8)  # a moment: that many more requests to the batch API
        command = ("submit",) if kill in (0, 3) else ("run", "--no-progress")  # submit while sending
        proc = start_cli(*command, str(spec), env=cli_env(**ENV))
        while not fw.wait_for_requests(target, timeout=0.05) and proc.poll() is None:
            pass
        assert proc.poll() is None, f"the job ended before kill {kill + 1}: {proc.communicate()}"
        kill_9(proc)
        jobs_at_kills.append(len(fw.jobs))
    # The kills fell while sending (some jobs made, not all) and while polling and collecting
    assert any(0 < n < 3 for n in jobs_at_kills) and jobs_at_kills.count(3) >= 3, jobs_at_kills
    done = run_cli("run", "--no-progress", str(spec), env=cli_env(**ENV))
    assert done.code in (0, 1), done.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(600)) and not in_two_jobs(fw)
    answered = {int(custom_id.rsplit("-", 1)[1]) for custom_id in fw.answered()}
    assert all(out[i]["backend"] == "batch" for i in answered)  # no answer a job gave was lost
    sent_live = [int(r.body["messages"][0]["content"].split()[-1]) for r in live.requests]
    assert len(sent_live) == len(set(sent_live)) and not set(sent_live) & answered
    assert {r["row_index"] for r in out if r["backend"] == "live"} == set(sent_live)
