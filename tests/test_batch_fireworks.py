"""Fireworks' datasets and batch inference jobs as the batch backend calls them, against the
fake in tests/fakefireworks.py: a whole job's cycle, its lines joined back to their rows."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import fireworks
import httpx
import pytest

from batchrun import ConfigError, JobFatalAPIError, RetryableAPIError
from batchrun.backends.batch import PROVIDERS
from batchrun.backends.batch.base import Batch, Outcome
from batchrun.backends.batch.fireworks import FireworksBatches, dataset_id, display_name, metadata_of
from batchrun.backends.batch.lines import batch_line, read_line
from batchrun.endpoints import get_endpoint
from batchrun.inputs.rows import Row
from batchrun.spec.model import BatchApiSpec
from tests.fakefireworks import ERRORS_FILE, RESULTS_FILE, FakeFireworks, Faults

pytestmark = pytest.mark.slow  # a server on 127.0.0.1
FIREWORKS = PROVIDERS["fireworks"]
assert isinstance(FIREWORKS, FireworksBatches)  # its remote calls, not only its lines
JOB = "0123456789abcdef"
MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
TAG = {"batchrun_job": JOB, "batchrun_batch": "0"}


def fetched(http: httpx.Client, file: str) -> bytes:
    """A file's bytes, as the backend downloads them (into a file)."""
    into = io.BytesIO()
    FIREWORKS.download(http, file, into)
    return into.getvalue()


@pytest.fixture
def fake() -> Iterator[FakeFireworks]:
    with FakeFireworks(faults=Faults(seed=3), polls_to_finish=4) as f:
        yield f


def client(fake: FakeFireworks, account: str | None = None, **kwargs: object) -> httpx.Client:
    spec = BatchApiSpec(kind="fireworks", base_url=fake.base_url, api_key_env="FIREWORKS_API_KEY",
                        account_id=account or fake.account_id)
    return httpx.Client(base_url=FIREWORKS.base_url(spec), headers={"Authorization": f"Bearer {fake.api_key}"},
                        **kwargs)  # type: ignore[arg-type]


def rows(n: int) -> list[Row]:
    return [Row(i, f"r{i}", "chat", {"messages": [{"role": "user", "content": f"question {i}"}]}, f"line {i + 1}")
            for i in range(n)]


def submit(http: httpx.Client, n: int, provider: FireworksBatches = FIREWORKS) -> Batch:
    data = b"".join(batch_line(provider, JOB, row, MODEL, {"max_tokens": 8}) for row in rows(n))
    provider.check(http, MODEL)
    file = provider.upload(http, f"batchrun-{JOB}-0.jsonl", data)
    return provider.create(http, file, get_endpoint("chat").urls[0], TAG, MODEL)


def collect(http: httpx.Client, batch: Batch) -> tuple[Batch, dict[int, Outcome]]:
    """Poll the job to its end and read both its files."""
    while not batch.done:
        batch = FIREWORKS.get(http, batch.id)
    outcomes = {}
    for name, from_errors in ((batch.output_file, False), (batch.error_file, True)):
        if name is not None:
            for line in fetched(http, name).splitlines():
                outcome = read_line(FIREWORKS, line, JOB, lambda _: get_endpoint("chat"), from_errors=from_errors)
                assert outcome is not None
                outcomes[outcome.row_index] = outcome
    return batch, outcomes


def test_every_row_of_a_completed_job_comes_back_answered_whatever_the_order(fake: FakeFireworks) -> None:
    with client(fake) as http:
        batch, outcomes = collect(http, submit(http, 50))
    assert sorted(outcomes) == list(range(50))
    assert all(o.result is not None and o.result.status == "ok" and o.result.output_text and o.result.prompt_tokens
               for o in outcomes.values())
    assert (batch.state, batch.counts, batch.errors) == ("completed", {"total": 50, "completed": 50, "failed": 0}, ())
    assert batch.metadata == TAG and batch.error_file is None
    [job] = fake.jobs.values()
    assert batch.id == job.job_id and batch.output_file == f"{job.job_id}-out/{RESULTS_FILE}"
    assert job.model == MODEL and job.input_dataset_id == f"accounts/test-account/datasets/batchrun-{JOB}-0"
    assert job.custom_ids == [f"{JOB}-{i}" for i in range(50)]
    assert all(len(jobs) == 1 for jobs in fake.sent().values())
    with client(fake) as http:
        order = [row.decode() for row in fetched(http, batch.output_file).splitlines()]  # type: ignore[arg-type]
    assert order != sorted(order, key=lambda line: int(line.split(f"{JOB}-")[1].split('"')[0]))  # shuffled


def test_an_expired_job_keeps_its_answers_and_leaves_the_rest_unanswered(fake: FakeFireworks) -> None:
    fake.faults = Faults(seed=5, expire_at=0.4)
    with client(fake) as http:
        batch, outcomes = collect(http, submit(http, 50))
    assert (batch.state, batch.done, batch.errors) == ("expired", True, ())
    assert batch.counts == {"total": 50, "completed": 20, "failed": 0}
    assert len(outcomes) == 20 and all(o.result is not None and o.result.status == "ok" for o in outcomes.values())
    assert set(outcomes) == {int(c.split("-")[1]) for c in fake.answered()}  # the rest: in neither file


def test_a_row_refused_fails_and_one_that_failed_inside_is_asked_again(fake: FakeFireworks) -> None:
    data = b"".join(batch_line(FIREWORKS, JOB, row, MODEL, {}) for row in rows(30))
    refusing = data + json.dumps({"custom_id": f"{JOB}-30", "body": {"prompt": "x"}}).encode() + b"\n"
    with client(fake) as http:
        file = FIREWORKS.upload(http, f"batchrun-{JOB}-0.jsonl", refusing)
        batch, outcomes = collect(http, FIREWORKS.create(http, file, "/v1/chat/completions", TAG, MODEL))
        assert sorted(outcomes) == list(range(31)) and batch.counts["failed"] == 1
        refused = outcomes[30].result
        assert refused is not None and refused.status == "failed"
        assert refused.error == "the batch refused it: HTTP 400: body.messages is required"
        fake.faults = Faults(seed=3, request_error_rate=0.3)
        file = FIREWORKS.upload(http, f"batchrun-{JOB}-1.jsonl", data)
        batch, outcomes = collect(http, FIREWORKS.create(http, file, "/v1/chat/completions", TAG, MODEL))
    assert sorted(outcomes) == list(range(30)) and batch.error_file is not None
    again = {i for i, o in outcomes.items() if o.unanswered}
    assert again == {int(c.split("-")[1]) for c in fake.jobs[batch.id].failing} and again
    assert all(outcomes[i].unanswered == "500: inference failed (injected)" for i in again)
    assert batch.counts["failed"] == len(again)


def test_a_failed_job_says_why_and_what_it_wrote_is_read_if_anything(fake: FakeFireworks) -> None:
    fake.faults = Faults(fail_at=0.5)
    with client(fake) as http:
        batch, outcomes = collect(http, submit(http, 10))
    assert (batch.state, batch.done, batch.error_file) == ("failed", True, None)
    assert batch.errors == ("INTERNAL: batch inference job failed (injected)",)
    # its progress counts 5 answers, which this fake (unlike, perhaps, the service) never writes
    assert batch.counts["completed"] == 5 and batch.output_file is not None and outcomes == {}
    fake.faults = Faults(fail_at=0.0)
    with client(fake) as http:
        batch, outcomes = collect(http, submit_again(http))
    assert (batch.state, batch.output_file, batch.error_file, outcomes) == ("failed", None, None, {})


def submit_again(http: httpx.Client) -> Batch:
    return FIREWORKS.create(http, f"batchrun-{JOB}-0", "/v1/chat/completions", TAG, MODEL)


def test_an_upload_5xx_is_worth_another_try_which_reuses_the_dataset(fake: FakeFireworks) -> None:
    fake.faults = Faults(upload_errors=1)
    data = b"".join(batch_line(FIREWORKS, JOB, row, MODEL, {}) for row in rows(3))
    with client(fake) as http:
        with pytest.raises(RetryableAPIError, match="HTTP 503"):
            FIREWORKS.upload(http, f"batchrun-{JOB}-0.jsonl", data)
        assert fake.datasets[f"batchrun-{JOB}-0"].state == "UPLOADING"
        assert FIREWORKS.upload(http, f"batchrun-{JOB}-0.jsonl", data) == f"batchrun-{JOB}-0"  # filled now
        assert FIREWORKS.upload(http, f"batchrun-{JOB}-0.jsonl", data) == f"batchrun-{JOB}-0"  # taken as it is
    uploads = [path for method, path, _ in fake.requests if method == "POST" and path.endswith(":upload")]
    assert len(uploads) == 2 and fake.datasets[f"batchrun-{JOB}-0"].lines() == data.decode().splitlines()
    assert fake.datasets[f"batchrun-{JOB}-0"].example_count == "3"


def test_a_file_over_the_upload_limit_goes_by_signed_url(fake: FakeFireworks) -> None:
    small = FireworksBatches(upload_limit=500)
    with client(fake) as http:
        batch, outcomes = collect(http, submit(http, 20, small))
    assert sorted(outcomes) == list(range(20)) and batch.state == "completed"
    paths = [(method, path.split("/")[-1]) for method, path, _ in fake.requests]
    assert ("POST", f"batchrun-{JOB}-0:getUploadEndpoint") in paths
    assert ("POST", f"batchrun-{JOB}-0:validateUpload") in paths
    assert not any(path.endswith(":upload") for _, path in paths)
    [put] = [headers for method, _, headers in fake.requests if method == "PUT"]
    assert "authorization" not in put  # the signature is the credential


def test_an_expired_download_url_is_asked_for_again(fake: FakeFireworks) -> None:
    expired: list[str] = []

    def expire_once(response: httpx.Response) -> None:  # the URL expires between handing out and use
        if response.request.url.path.endswith(":getDownloadEndpoint") and not expired:
            fake.expire_urls()
            expired.append(str(response.request.url))

    with client(fake) as http:
        batch = submit(http, 5)
        with client(fake, event_hooks={"response": [expire_once]}) as hooked:
            batch, outcomes = collect(hooked, batch)
        assert sorted(outcomes) == list(range(5)) and expired
        asked = [path for _, path, _ in fake.requests if path.endswith(":getDownloadEndpoint")]
        assert len(asked) == 2  # one expired, one fresh
        assert fetched(http, f"{batch.output_file.split('/')[0]}/{ERRORS_FILE}") == b""  # type: ignore[union-attr]
        assert fetched(http, "no-such-dataset/x.jsonl") == b""
        fake.faults = Faults(urls_expired=True)  # never a URL that works: said, not looped on
        with pytest.raises(RetryableAPIError, match="signed URL"):
            fetched(http, batch.output_file)  # type: ignore[arg-type]


def test_a_wrong_account_or_a_model_that_cannot_batch_names_the_fix(fake: FakeFireworks) -> None:
    with client(fake, account="someone-else") as http, \
            pytest.raises(ConfigError, match=r"batch_api.account_id 'someone-else'.*set batch_api.account_id"):
        FIREWORKS.check(http, MODEL)
    with client(fake) as http:
        with pytest.raises(ConfigError, match=r"batchInferenceSupported is false.*choose a model"):
            FIREWORKS.check(http, "accounts/fireworks/models/no-batch")
        with pytest.raises(ConfigError, match="accounts/<account>/models/<model>"):
            FIREWORKS.check(http, "llama")
        with pytest.raises(ConfigError, match="check model:"):
            FIREWORKS.check(http, "accounts/someone-else/models/private")
        FIREWORKS.check(http, MODEL)
    assert fake.datasets == {} and fake.jobs == {}
    with httpx.Client(base_url=f"{fake.base_url}/accounts/{fake.account_id}",
                      headers={"Authorization": "Bearer wrong"}) as http, \
            pytest.raises(JobFatalAPIError, match="HTTP 401"):
        FIREWORKS.check(http, MODEL)


def test_a_rerun_finds_its_job_by_its_tag_having_recorded_nothing(fake: FakeFireworks) -> None:
    with client(fake) as http:
        file = FIREWORKS.upload(http, "other.jsonl", batch_line(FIREWORKS, JOB, rows(1)[0], MODEL, {}))
        for _ in range(210):  # more than a page of jobs of other runs
            FIREWORKS.create(http, file, "/v1/chat/completions", {"batchrun_job": "another"}, MODEL)
        ours = submit(http, 3)
        FIREWORKS.create(http, file, "/v1/chat/completions", {}, MODEL)
    with client(fake) as http:  # a new process: only the provider remembers
        found = FIREWORKS.tagged(http, "batchrun_job", JOB)
        assert [(b.id, b.metadata) for b in found] == [(ours.id, TAG)]
        assert len(FIREWORKS.tagged(http, "batchrun_job", "another")) == 210


def test_the_official_client_reads_the_dataset_and_job_as_made(fake: FakeFireworks) -> None:
    with client(fake) as http:
        batch = submit(http, 2)
    sdk = fireworks.Fireworks(api_key=fake.api_key, account_id=fake.account_id, base_url=fake.origin, max_retries=0)
    job = sdk.batch_inference_jobs.get(batch.id)
    assert (job.display_name, job.model, job.input_dataset_id) == (
        "batchrun_job=0123456789abcdef&batchrun_batch=0", MODEL, f"accounts/test-account/datasets/batchrun-{JOB}-0")
    assert job.output_dataset_id == f"accounts/test-account/datasets/{batch.id}-out"
    assert sdk.datasets.get(f"batchrun-{JOB}-0").example_count == "2"


def test_cancelling_deletes_the_job_and_keeps_what_it_wrote(fake: FakeFireworks) -> None:
    with client(fake) as http:
        batch = submit(http, 4)
        cancelled = FIREWORKS.cancel(http, batch.id)
        assert (cancelled.state, cancelled.done, cancelled.metadata) == ("cancelled", True, TAG)
        assert fake.jobs[batch.id].deleted
        gone = FIREWORKS.get(http, batch.id)  # a rerun that died after cancelling
        assert (gone.state, gone.done) == ("deleted", True)
        assert fetched(http, gone.output_file) == b""  # type: ignore[arg-type]
        done, _ = collect(http, submit(http, 2))
        assert FIREWORKS.cancel(http, done.id) == done and not fake.jobs[done.id].deleted


@pytest.mark.parametrize("call", [
    lambda http: FIREWORKS.get(http, "job"),
    lambda http: FIREWORKS.tagged(http, "batchrun_job", JOB),
    lambda http: FIREWORKS.check(http, MODEL),
    lambda http: fetched(http, "out/x.jsonl"),
    lambda http: FIREWORKS.create(http, "in", "/v1/chat/completions", TAG, MODEL),
])
@pytest.mark.parametrize("answer", [httpx.Response(200, content=b"<html>"), httpx.Response(200, json=[1]),
                                    httpx.Response(502, text="bad gateway")])
def test_an_answer_that_is_not_what_it_should_be_is_worth_another_try(call, answer: httpx.Response) -> None:
    transport = httpx.MockTransport(lambda request: answer)
    with httpx.Client(transport=transport, base_url="https://api.example/v1/accounts/me") as http, \
            pytest.raises(RetryableAPIError):
        call(http)


def test_a_listed_job_without_its_name_is_worth_another_try() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json={"batchInferenceJobs": [{"state": "x"}]}))
    with httpx.Client(transport=transport, base_url="https://api.example/v1/accounts/me") as http, \
            pytest.raises(RetryableAPIError, match="KeyError: 'name'"):
        FIREWORKS.tagged(http, "batchrun_job", JOB)


def test_ids_and_tags_are_what_fireworks_takes_and_read_back_exactly() -> None:
    assert dataset_id(f"batchrun-{JOB}-12.jsonl") == f"batchrun-{JOB}-12"
    assert dataset_id("Batchrun_Job__X.JSONL") == "batchrun-job-x" and dataset_id("9.jsonl") == "b-9"
    long = dataset_id("batchrun-" + "a" * 100 + ".jsonl")
    assert len(long) == 63 and long != dataset_id("batchrun-" + "a" * 101 + ".jsonl")
    tag = {"batchrun_job": JOB, "batchrun_batch": "a b&c=d"}
    assert metadata_of(display_name(tag)) == tag
    assert metadata_of("my own job") == {} and metadata_of("") == {}


def test_a_model_that_says_in_snake_case_it_cannot_batch_is_refused_too() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"batch_inference_supported": False} if "/models/" in request.url.path else {})

    with httpx.Client(transport=httpx.MockTransport(answer), base_url="https://api.example/v1/accounts/me") as http, \
            pytest.raises(ConfigError, match="cannot run it in a batch inference job"):
        FIREWORKS.check(http, MODEL)
    assert seen == ["/v1/accounts/me/batchInferenceJobs", f"/v1/{MODEL}"]


def test_a_row_for_another_endpoint_than_chat_is_refused_naming_the_fix() -> None:
    row = Row(0, "r0", "completions", {"prompt": "x"}, "line 1")
    with pytest.raises(ConfigError, match="answer chat completions only; set endpoint: chat"):
        batch_line(FIREWORKS, JOB, row, MODEL, {})
