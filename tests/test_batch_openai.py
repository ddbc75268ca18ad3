"""OpenAI's Files + Batches API as the batch backend calls it, against the fake in
tests/fakebatch.py: a whole batch's cycle, its lines joined back to their rows."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest

from batchrun import ConfigError, JobFatalAPIError, RetryableAPIError
from batchrun.backends.batch import PROVIDERS
from batchrun.backends.batch.lines import batch_line, read_line
from batchrun.endpoints import get_endpoint
from batchrun.inputs.rows import Row
from tests.fakebatch import BatchFaults, FakeBatchAPI

pytestmark = pytest.mark.slow  # a server on 127.0.0.1
OPENAI = PROVIDERS["openai"]
JOB = "0123456789abcdef"
KEY = "sk-test-0123456789abcdef"


def fetched(http: httpx.Client, file: str) -> bytes:
    """A file's bytes, as the backend downloads them (into a file)."""
    into = io.BytesIO()
    OPENAI.download(http, file, into)
    return into.getvalue()


@pytest.fixture
def fake() -> Iterator[FakeBatchAPI]:
    with FakeBatchAPI(BatchFaults(seed=3), polls_to_finish=3, api_key=KEY) as f:
        yield f


def client(fake: FakeBatchAPI, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=fake.base_url, headers={"Authorization": f"Bearer {key}"})


def rows(n: int) -> list[Row]:
    return [Row(i, f"r{i}", "chat", {"messages": [{"role": "user", "content": f"question {i}"}]}, f"line {i + 1}")
            for i in range(n)]


def run_batch(fake: FakeBatchAPI, http: httpx.Client, n: int) -> dict[int, object]:
    """Upload n rows, create their batch, poll it to its end, read both files."""
    data = b"".join(batch_line(OPENAI, JOB, row, "m", {"max_tokens": 8}) for row in rows(n))
    file = OPENAI.upload(http, f"batchrun-{JOB}-0.jsonl", data)
    batch = OPENAI.create(http, file, get_endpoint("chat").urls[0], {"batchrun_job": JOB, "batchrun_batch": "0"})
    while not batch.done:
        batch = OPENAI.get(http, batch.id)
    outcomes = {}
    for name, from_errors in ((batch.output_file, False), (batch.error_file, True)):
        if name is not None:
            for line in fetched(http, name).splitlines():
                outcome = read_line(OPENAI, line, JOB, lambda _: get_endpoint("chat"), from_errors=from_errors)
                assert outcome is not None
                outcomes[outcome.row_index] = outcome
    return outcomes


def test_every_row_of_a_completed_batch_comes_back_answered_whatever_the_order(fake: FakeBatchAPI) -> None:
    with client(fake) as http:
        outcomes = run_batch(fake, http, 50)
    assert sorted(outcomes) == list(range(50))
    assert all(o.result.status == "ok" and o.result.output_text and o.result.prompt_tokens  # type: ignore[union-attr]
               for o in outcomes.values())
    [upload], [created] = fake.uploads, fake.created
    assert (upload.filename, upload.purpose, len(upload.lines)) == (f"batchrun-{JOB}-0.jsonl", "batch", 50)
    assert created.metadata == {"batchrun_job": JOB, "batchrun_batch": "0"}
    assert created.custom_ids == [f"{JOB}-{i}" for i in range(50)] and created.endpoint == "/v1/chat/completions"
    assert fake.custom_ids_in_two_batches() == set()


def test_an_expired_batch_keeps_its_answers_and_leaves_the_rest_to_answer(fake: FakeBatchAPI) -> None:
    fake.faults = BatchFaults(seed=5, expire_share=0.2, refuse_share=0.1)
    with client(fake) as http:
        outcomes = run_batch(fake, http, 200)
        assert OPENAI.get(http, fake.created[0].batch_id).state == "expired"
    assert sorted(outcomes) == list(range(200))  # every row has its word: none is lost
    expired = [o for o in outcomes.values() if o.unanswered]
    refused = [o for o in outcomes.values() if o.result is not None and o.result.status == "failed"]
    answered = [o for o in outcomes.values() if o.result is not None and o.result.status == "ok"]
    assert expired and refused and answered
    assert all(o.unanswered.startswith("batch_expired") for o in expired)  # type: ignore[union-attr]
    assert all("the batch refused it: HTTP 400" in o.result.error for o in refused)  # type: ignore[union-attr,operator]


def test_a_rerun_finds_the_batches_an_earlier_run_created_by_their_tag(fake: FakeBatchAPI) -> None:
    with client(fake) as http:
        run_batch(fake, http, 3)
        file = OPENAI.upload(http, "other.jsonl", batch_line(OPENAI, JOB, rows(1)[0], "m", {}))
        OPENAI.create(http, file, "/v1/chat/completions", {"batchrun_job": "another"})
        for _ in range(120):  # more than a page of batches of other jobs
            OPENAI.create(http, file, "/v1/chat/completions", {"batchrun_job": "another"})
        found = OPENAI.tagged(http, "batchrun_job", JOB)
    assert [b.metadata["batchrun_batch"] for b in found] == ["0"]


def test_a_list_that_does_not_move_on_ends(fake: FakeBatchAPI) -> None:
    """A server answering the same page with has_more whatever `after` says: the listing
    (a rerun's, a restart's, under the job's lock) must end, not page for ever."""
    with client(fake) as http:
        run_batch(fake, http, 3)
        page = {"object": "list", "data": [b.obj for b in fake.batches.values()], "has_more": True}
        fake.list_page = lambda query: (200, page)
        calls = fake.calls
        found = OPENAI.tagged(http, "batchrun_job", JOB)
    assert [b.metadata["batchrun_batch"] for b in found] == ["0"] and fake.calls - calls <= 2


def test_a_failed_validation_says_which_line(fake: FakeBatchAPI) -> None:
    line = batch_line(OPENAI, JOB, rows(1)[0], "m", {})
    with client(fake) as http:
        file = OPENAI.upload(http, "twice.jsonl", line + line)  # one custom_id twice
        batch = OPENAI.create(http, file, "/v1/chat/completions", {})
        while not batch.done:
            batch = OPENAI.get(http, batch.id)
    assert batch.state == "failed" and batch.output_file is None
    assert any("line 2" in e for e in batch.errors), batch.errors


def test_a_refused_key_stops_the_job_and_a_5xx_is_worth_another_try(fake: FakeBatchAPI) -> None:
    with client(fake, key="sk-wrong-key-000000000000") as http, pytest.raises(JobFatalAPIError, match="HTTP 401"):
        OPENAI.upload(http, "x.jsonl", b"{}\n")
    fake.faults = BatchFaults(upload_5xx=1)
    with client(fake) as http:
        with pytest.raises(RetryableAPIError, match="HTTP 500"):
            OPENAI.upload(http, "x.jsonl", b"{}\n")
        with pytest.raises(ConfigError, match="HTTP 404"):
            OPENAI.get(http, "batch_nope")
