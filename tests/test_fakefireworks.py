"""The Fireworks batch fake answers as the real API does for the routes the batch backend
uses: driven with the official client where it is installed, and otherwise with httpx
requests shaped as that client sends them (paths, camelCase bodies, multipart upload)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import fireworks
import httpx
import pytest

from tests.fakefireworks import ERRORS_FILE, RESULTS_FILE, FakeFireworks, Faults

pytestmark = pytest.mark.slow  # every test starts the fake's server

MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"custom_id": f"row-{i}", "body": {"messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(start, start + n)]


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture
def fake() -> Iterator[FakeFireworks]:
    with FakeFireworks() as fake:
        yield fake


@pytest.fixture
def api(fake: FakeFireworks) -> Iterator[httpx.Client]:
    """Requests as the client sends them: the account's routes, the key as a bearer token."""
    with httpx.Client(base_url=f"{fake.base_url}/accounts/{fake.account_id}",
                      headers={"Authorization": f"Bearer {fake.api_key}"}) as client:
        yield client


def upload_input(api: httpx.Client, dataset_id: str, lines: list[dict]) -> None:
    created = api.post("/datasets", json={"datasetId": dataset_id,
                                          "dataset": {"userUploaded": {}, "exampleCount": str(len(lines))}})
    assert created.status_code == 200 and created.json()["state"] == "UPLOADING"
    uploaded = api.post(f"/datasets/{dataset_id}:upload", files={"file": ("input.jsonl", jsonl(lines))})
    assert uploaded.status_code == 200, uploaded.text


def create_job(api: httpx.Client, job_id: str, input_id: str, **body) -> httpx.Response:
    body = {"model": MODEL, "inputDatasetId": f"accounts/test-account/datasets/{input_id}",
            "outputDatasetId": f"accounts/test-account/datasets/{job_id}-out", "displayName": f"batchrun {job_id}",
            "inferenceParameters": {"maxTokens": 64}, **body}
    return api.post("/batchInferenceJobs", params={"batchInferenceJobId": job_id}, json=body)


def poll(api: httpx.Client, job_id: str, times: int) -> dict:
    for _ in range(times):
        job = api.get(f"/batchInferenceJobs/{job_id}").json()
    return job


def download(api: httpx.Client, dataset_id: str) -> dict[str, list[dict]]:
    """The output dataset's files, fetched from their signed URLs without the key."""
    urls = api.get(f"/datasets/{dataset_id}:getDownloadEndpoint").json()["filenameToSignedUrls"]
    return {name: [json.loads(line) for line in httpx.get(url).raise_for_status().text.splitlines()]
            for name, url in urls.items()}


def test_the_official_client_runs_a_job_end_to_end(fake: FakeFireworks) -> None:
    client = fireworks.Fireworks(api_key=fake.api_key, account_id=fake.account_id, base_url=fake.origin,
                                 max_retries=0)
    client.datasets.create(dataset_id="in", dataset={"user_uploaded": {}, "example_count": "3"})
    client.datasets.upload("in", file=("in.jsonl", jsonl(rows(3))))
    job = client.batch_inference_jobs.create(
        batch_inference_job_id="job-1", model=MODEL, input_dataset_id="accounts/test-account/datasets/in",
        output_dataset_id="accounts/test-account/datasets/out", display_name="batchrun job-1",
        inference_parameters={"max_tokens": 7, "temperature": 0.0, "extra_body": json.dumps({"stop": ["\n"]})})
    assert job.state == "JOB_STATE_VALIDATING" and job.name == "accounts/test-account/batchInferenceJobs/job-1"
    states = [client.batch_inference_jobs.get("job-1").state for _ in range(fake.polls_to_finish)]
    assert states == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_RUNNING", "JOB_STATE_COMPLETED"]
    progress = client.batch_inference_jobs.get("job-1").job_progress
    assert (progress.percent, progress.total_input_requests, progress.successfully_processed_requests,
            progress.failed_requests, progress.output_rows) == (100, 3, 3, 0, 3)
    assert progress.input_tokens > 0 and progress.output_tokens > 0
    urls = client.datasets.get_download_endpoint("out").filename_to_signed_urls
    assert set(urls) == {RESULTS_FILE, ERRORS_FILE}
    results = [json.loads(line) for line in httpx.get(urls[RESULTS_FILE]).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["row-0", "row-1", "row-2"]
    answer = results[0]["response"]
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL and answer["max_tokens_seen"] == 7
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    assert [d.name for d in client.datasets.list(page_size=1)] == ["accounts/test-account/datasets/in",
                                                                  "accounts/test-account/datasets/out"]
    listed = client.batch_inference_jobs.list(filter='displayName="batchrun job-1"')
    assert [j.display_name for j in listed] == ["batchrun job-1"]
    client.batch_inference_jobs.delete("job-1")
    with pytest.raises(fireworks.NotFoundError):
        client.batch_inference_jobs.get("job-1")
    client.datasets.delete("in")
    assert "in" not in fake.datasets


def test_the_official_client_is_refused_another_account(fake: FakeFireworks) -> None:
    client = fireworks.Fireworks(api_key=fake.api_key, account_id="someone-else", base_url=fake.origin,
                                 max_retries=0)
    with pytest.raises(fireworks.PermissionDeniedError, match="someone-else"):
        client.datasets.create(dataset_id="in", dataset={"user_uploaded": {}, "example_count": "1"})
    assert fake.datasets == {}


def test_a_wrong_account_or_key_is_refused(fake: FakeFireworks, api: httpx.Client) -> None:
    other = api.get(f"{fake.base_url}/accounts/other/batchInferenceJobs/x")
    assert other.status_code == 403 and other.json()["status"] == "PERMISSION_DENIED"
    keyless = httpx.get(f"{fake.base_url}/accounts/{fake.account_id}/datasets")
    assert keyless.status_code == 401 and keyless.json()["code"] == 16
    assert api.get("/datasets/missing").status_code == 404


def test_a_large_file_goes_by_signed_url_then_validation(fake: FakeFireworks, api: httpx.Client) -> None:
    api.post("/datasets", json={"datasetId": "big", "dataset": {"userUploaded": {}, "exampleCount": "2"}})
    data = jsonl(rows(2))
    urls = api.post("/datasets/big:getUploadEndpoint",
                    json={"filenameToSize": {"input.jsonl": str(len(data))}}).json()["filenameToSignedUrls"]
    early = api.post("/datasets/big:validateUpload", json={})
    assert early.status_code == 400 and early.json()["status"] == "FAILED_PRECONDITION"
    # with the key the signature is refused: signed URLs must never be sent credentials
    assert api.put(urls["input.jsonl"], content=data).status_code == 403
    put = httpx.put(urls["input.jsonl"], content=data, headers={
        "Content-Type": "application/octet-stream", "X-Goog-Content-Length-Range": f"{len(data)},{len(data)}"})
    assert put.status_code == 200
    assert api.post("/datasets/big:validateUpload", json={}).json() == {}
    assert api.get("/datasets/big").json()["state"] == "READY"
    assert fake.datasets["big"].lines() == [json.dumps(r) for r in rows(2)]


def test_an_upload_answers_503_on_demand_and_then_succeeds() -> None:
    with FakeFireworks(faults=Faults(upload_errors=1), upload_limit=500) as fake:
        with httpx.Client(base_url=f"{fake.base_url}/accounts/{fake.account_id}",
                          headers={"Authorization": f"Bearer {fake.api_key}"}) as api:
            api.post("/datasets", json={"datasetId": "in", "dataset": {"userUploaded": {}, "exampleCount": "2"}})
            files = {"file": ("input.jsonl", jsonl(rows(2)))}
            failed = api.post("/datasets/in:upload", files=files)
            assert failed.status_code == 503 and failed.json()["status"] == "UNAVAILABLE"
            assert api.get("/datasets/in").json()["state"] == "UPLOADING"
            assert api.post("/datasets/in:upload", files=files).status_code == 200
            too_big = api.post("/datasets/in:upload", files={"file": ("input.jsonl", jsonl(rows(20)))})
            assert too_big.status_code == 400 and "getUploadEndpoint" in too_big.json()["message"]


def test_expiry_keeps_partial_output_and_a_continuation_reruns_only_the_rest(fake: FakeFireworks,
                                                                             api: httpx.Client) -> None:
    fake.faults = Faults(expire_at=0.5)
    upload_input(api, "in", rows(4))
    assert create_job(api, "first", "in").status_code == 200
    job = poll(api, "first", 4)
    assert job["state"] == "JOB_STATE_EXPIRED" and job["jobProgress"]["outputRows"] == 2
    partial = download(api, "first-out")
    assert sorted(r["custom_id"] for r in partial[RESULTS_FILE]) == ["row-0", "row-1"]
    assert partial[ERRORS_FILE] == []
    fake.faults = Faults()
    again = create_job(api, "second", "in", continuedFromJobName="accounts/test-account/batchInferenceJobs/first")
    assert again.json()["continuedFromJobName"] == "accounts/test-account/batchInferenceJobs/first"
    assert poll(api, "second", 4)["state"] == "JOB_STATE_COMPLETED"
    assert sorted(r["custom_id"] for r in download(api, "second-out")[RESULTS_FILE]) == ["row-2", "row-3"]
    assert all(len(jobs) == 1 for jobs in fake.answered().values()) and len(fake.answered()) == 4
    assert fake.sent()["row-3"] == ["first", "second"] and fake.sent()["row-0"] == ["first"]


def test_request_errors_go_to_the_error_file_and_lines_come_shuffled(fake: FakeFireworks,
                                                                     api: httpx.Client) -> None:
    fake.faults = Faults(seed=3, request_error_rate=0.3)
    upload_input(api, "in", rows(20))
    create_job(api, "job", "in")
    fake.advance("job", steps=fake.polls_to_finish)
    job = api.get("/batchInferenceJobs/job").json()
    output = download(api, "job-out")
    failed = {e["custom_id"] for e in output[ERRORS_FILE]}
    answered = [r["custom_id"] for r in output[RESULTS_FILE]]
    assert failed == fake.jobs["job"].failing and 0 < len(failed) < 20
    assert set(answered) | failed == {f"row-{i}" for i in range(20)} and not set(answered) & failed
    assert job["jobProgress"]["failedRequests"] == len(failed)
    assert job["jobProgress"]["successfullyProcessedRequests"] == len(answered)
    assert answered != sorted(answered, key=lambda c: int(c.split("-")[1]))  # not in input order
    assert all(e["error"]["code"] == 500 for e in output[ERRORS_FILE])


def test_a_failed_job_says_why_and_writes_no_output(fake: FakeFireworks, api: httpx.Client) -> None:
    fake.faults = Faults(fail_at=0.5)
    upload_input(api, "in", rows(4))
    create_job(api, "job", "in")
    job = poll(api, "job", 4)
    assert job["state"] == "JOB_STATE_FAILED" and job["status"]["code"] == "INTERNAL"
    assert api.get("/datasets/job-out:getDownloadEndpoint").json() == {"filenameToSignedUrls": {}}


def test_a_bad_input_line_fails_validation(fake: FakeFireworks, api: httpx.Client) -> None:
    upload_input(api, "in", rows(2) + rows(1))  # row-0 twice
    create_job(api, "job", "in")
    job = poll(api, "job", 1)
    assert job["state"] == "JOB_STATE_FAILED" and job["status"]["code"] == "INVALID_ARGUMENT"
    assert "line 3: duplicate custom_id 'row-0'" in job["status"]["message"]


def test_a_model_without_batch_support_stays_pending(fake: FakeFireworks, api: httpx.Client) -> None:
    upload_input(api, "in", rows(2))
    create_job(api, "job", "in", model="accounts/fireworks/models/no-batch")
    assert poll(api, "job", 10)["state"] == "JOB_STATE_PENDING"
    fake.advance(steps=10)
    assert api.get("/batchInferenceJobs/job").json()["jobProgress"]["percent"] == 0


def test_signed_download_urls_expire(fake: FakeFireworks, api: httpx.Client) -> None:
    upload_input(api, "in", rows(2))
    create_job(api, "job", "in")
    poll(api, "job", 4)
    urls = api.get("/datasets/job-out:getDownloadEndpoint").json()["filenameToSignedUrls"]
    fake.expire_urls()
    expired = httpx.get(urls[RESULTS_FILE])
    assert expired.status_code == 400 and b"<Code>ExpiredToken</Code>" in expired.content
    assert len(download(api, "job-out")[RESULTS_FILE]) == 2  # a fresh endpoint works again
    fake.faults = Faults(urls_expired=True)
    urls = api.get("/datasets/job-out:getDownloadEndpoint").json()["filenameToSignedUrls"]
    assert httpx.get(urls[RESULTS_FILE]).status_code == 400


def test_the_job_parameters_and_the_line_body_make_the_request(fake: FakeFireworks, api: httpx.Client) -> None:
    lines = rows(2)
    lines[1]["body"]["max_tokens"] = 3  # a row's own setting wins over the job's
    upload_input(api, "in", lines)
    create_job(api, "job", "in", inferenceParameters={"maxTokens": 9, "extraBody": json.dumps({"n": 2})})
    poll(api, "job", 4)
    answers = {r["custom_id"]: r["response"] for r in download(api, "job-out")[RESULTS_FILE]}
    assert answers["row-0"]["max_tokens_seen"] == 9 and answers["row-1"]["max_tokens_seen"] == 3
    assert len(answers["row-0"]["choices"]) == 2


def test_lists_page_and_filter(fake: FakeFireworks, api: httpx.Client) -> None:
    upload_input(api, "in", rows(1))
    for name in ("a", "b", "c"):
        create_job(api, name, "in")
    fake.advance("a")
    first = api.get("/batchInferenceJobs", params={"pageSize": 2}).json()
    second = api.get("/batchInferenceJobs", params={"pageSize": 2, "pageToken": first["nextPageToken"]}).json()
    names = [j["name"].rsplit("/", 1)[-1] for j in first["batchInferenceJobs"] + second["batchInferenceJobs"]]
    assert names == ["a", "b", "c"] and second["nextPageToken"] == "" and first["totalSize"] == 3
    waiting = api.get("/batchInferenceJobs", params={"filter": 'state="JOB_STATE_VALIDATING"', "orderBy": "name desc"})
    assert [j["displayName"] for j in waiting.json()["batchInferenceJobs"]] == ["batchrun c", "batchrun b"]
    assert api.get("/batchInferenceJobs", params={"filter": "state ~ x"}).status_code == 400
    assert create_job(api, "a", "in").status_code == 409


def test_a_row_the_model_cannot_answer_is_an_error_line_and_is_rerun_by_a_continuation(
        fake: FakeFireworks, api: httpx.Client) -> None:
    lines = rows(3)
    lines[1]["body"] = {"prompt": "not a chat request"}
    upload_input(api, "in", lines)
    create_job(api, "job", "in")
    assert poll(api, "job", 4)["jobProgress"]["failedRequests"] == 1
    errors = download(api, "job-out")[ERRORS_FILE]
    assert errors == [{"custom_id": "row-1", "error": {"code": 400, "message": "body.messages is required"}}]
    create_job(api, "again", "in", continuedFromJobName="accounts/test-account/batchInferenceJobs/job")
    fake.advance("again", steps=4)
    assert fake.jobs["again"].custom_ids == ["row-1"] and fake.jobs["again"].display_name == "batchrun again"


def test_a_model_says_whether_it_can_be_batched(fake: FakeFireworks, api: httpx.Client) -> None:
    client = fireworks.Fireworks(api_key=fake.api_key, account_id=fake.account_id, base_url=fake.origin,
                                 max_retries=0)
    public = client.models.get("llama-v3p1-8b-instruct", account_id="fireworks").to_dict()
    assert public["name"] == MODEL and public["batchInferenceSupported"] is True
    assert client.models.get("no-batch", account_id="fireworks").to_dict()["batchInferenceSupported"] is False
    assert api.get(f"{fake.base_url}/accounts/someone-else/models/x").status_code == 404
    assert httpx.get(f"{fake.base_url}/accounts/fireworks/models/no-batch").status_code == 401
