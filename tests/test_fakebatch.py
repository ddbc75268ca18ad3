"""The fake of OpenAI's Files + Batches API, driven by the official openai SDK: if the SDK
reads every answer without complaint, a batch backend tested against the fake talks to the
real shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.fakebatch import MAX_REQUESTS, TERMINAL, BatchFaults, FakeBatchAPI

pytestmark = pytest.mark.slow  # every test here starts a server

CHAT = "/v1/chat/completions"


def chat_line(i: int, url: str = CHAT) -> dict:
    return {"custom_id": f"row-{i}", "method": "POST", "url": url,
            "body": {"model": "test-model", "messages": [{"role": "user", "content": f"question {i}"}]}}


def jsonl(lines: list) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def client_for() -> Iterator:
    clients = []

    def make(fake: FakeBatchAPI) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=fake.base_url, api_key="sk-test-batch", max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def submit(client: openai.OpenAI, lines: list, endpoint: str = CHAT, metadata: dict | None = None):
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h",
                                 metadata=metadata)


def poll(client: openai.OpenAI, batch_id: str, limit: int = 20):
    for _ in range(limit):
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
    raise AssertionError(f"{batch_id} still {batch.status} after {limit} polls")


def test_files_are_stored_listed_read_and_deleted(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        data = jsonl([chat_line(1)])
        first = client.files.create(file=("a.jsonl", data), purpose="batch")
        second = client.files.create(file=("b.jsonl", data), purpose="fine-tune")
        assert (first.object, first.bytes, first.filename, first.purpose) == ("file", len(data), "a.jsonl", "batch")
        assert client.files.retrieve(first.id) == first
        assert [f.id for f in client.files.list()] == [second.id, first.id]  # newest first
        assert [f.id for f in client.files.list(purpose="batch")] == [first.id]
        assert client.files.content(first.id).content == data
        assert client.files.delete(first.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(first.id)
        assert [u.lines for u in fake.uploads] == [[json.dumps(chat_line(1))]] * 2


def test_a_batch_polled_to_completion_answers_every_row_with_usage(client_for) -> None:
    with FakeBatchAPI(polls_to_finish=3) as fake:
        client = client_for(fake)
        created = submit(client, [chat_line(i) for i in range(10)], metadata={"job": "fp-1"})
        assert (created.status, created.object, created.completion_window) == ("validating", "batch", "24h")
        assert created.expires_at == created.created_at + 24 * 3600
        assert client.batches.retrieve(created.id).status == "validating"
        batch = poll(client, created.id)
        assert batch.status == "completed" and batch.error_file_id is None and batch.errors is None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 10, 0)
        assert batch.metadata == {"job": "fp-1"} and batch.model == "test-model"
        assert batch.completed_at is not None and batch.in_progress_at is not None
        output = lines_of(client, batch.output_file_id)
        assert sorted(line["custom_id"] for line in output) == sorted(f"row-{i}" for i in range(10))
        for line in output:
            assert line["id"].startswith("batch_req_") and line["error"] is None
            assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
            assert line["response"]["body"]["object"] == "chat.completion"
        assert batch.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
        assert fake.created[0].metadata == {"job": "fp-1"}


def test_advance_moves_a_batch_one_state_at_a_time(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(1), chat_line(2)]).id
        seen = [client.batches.retrieve(batch_id).status]
        for _ in range(3):
            fake.advance(batch_id)
            seen.append(client.batches.retrieve(batch_id).status)
        assert seen == ["validating", "in_progress", "finalizing", "completed"]


def test_output_comes_shuffled_and_joins_back_by_custom_id(client_for) -> None:
    # Completions, whose fake answer quotes the prompt, so each answer shows which row it is for.
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": f"q{i}"}} for i in range(40)]
    with FakeBatchAPI(BatchFaults(seed=3)) as fake:
        client = client_for(fake)
        batch_id = submit(client, lines, endpoint="/v1/completions").id
        fake.finish()
        output = lines_of(client, client.batches.retrieve(batch_id).output_file_id)
        assert [line["custom_id"] for line in output] != [f"row-{i}" for i in range(40)]
        by_id = {line["custom_id"]: line["response"]["body"] for line in output}
        for i in range(40):
            assert by_id[f"row-{i}"]["choices"][0]["text"].endswith(f" to 'q{i}'")


def test_unshuffled_output_keeps_file_order(client_for) -> None:
    with FakeBatchAPI(BatchFaults(shuffle=False)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(20)]).id
        fake.finish()
        output = lines_of(client, client.batches.retrieve(batch_id).output_file_id)
        assert [line["custom_id"] for line in output] == [f"row-{i}" for i in range(20)]


def test_expiry_keeps_the_answered_rows_and_lists_the_rest_as_batch_expired(client_for) -> None:
    with FakeBatchAPI(BatchFaults(seed=5, expire_share=0.25)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(100)]).id
        fake.finish()
        batch = client.batches.retrieve(batch_id)
        output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
        assert batch.status == "expired" and batch.expired_at is not None and batch.completed_at is None
        assert 10 < len(errors) < 40 and len(output) + len(errors) == 100
        assert {line["custom_id"] for line in output}.isdisjoint(line["custom_id"] for line in errors)
        for line in errors:
            assert line["response"] is None and line["error"]["code"] == "batch_expired"
        assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))


def test_expire_on_demand_after_some_rows_were_answered(client_for) -> None:
    with FakeBatchAPI(BatchFaults(rows_per_step=4, shuffle=False)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(10)]).id
        fake.advance(batch_id)  # in_progress
        fake.advance(batch_id)  # four rows answered
        assert client.batches.retrieve(batch_id).request_counts.completed == 4
        fake.expire(batch_id)
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "expired"
        assert [line["custom_id"] for line in lines_of(client, batch.output_file_id)] == [f"row-{i}" for i in range(4)]
        assert [line["custom_id"] for line in lines_of(client, batch.error_file_id)] == [
            f"row-{i}" for i in range(4, 10)]


def test_refused_rows_are_400s_in_the_error_file_and_the_batch_completes(client_for) -> None:
    with FakeBatchAPI(BatchFaults(seed=2, refuse_share=0.2)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(50)]).id
        fake.finish()
        batch = client.batches.retrieve(batch_id)
        errors = lines_of(client, batch.error_file_id)
        assert batch.status == "completed" and errors
        assert batch.request_counts.failed == len(errors) and batch.request_counts.completed == 50 - len(errors)
        for line in errors:
            assert line["response"]["status_code"] == 400 and line["error"] is None
            assert line["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_status_for_refuses_chosen_rows(client_for) -> None:
    def refuse_seven(line: dict):
        refused = (400, {"error": {"message": "bad", "type": "invalid_request_error"}})
        return refused if line["custom_id"] == "row-7" else None

    with FakeBatchAPI(BatchFaults(status_for=refuse_seven)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(10)]).id
        fake.finish()
        errors = lines_of(client, client.batches.retrieve(batch_id).error_file_id)
        assert [(line["custom_id"], line["response"]["status_code"]) for line in errors] == [("row-7", 400)]


def test_a_duplicate_custom_id_fails_validation_naming_the_line(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(1), chat_line(2), chat_line(1)]).id
        fake.finish()
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
        [error] = batch.errors.data
        assert (error.code, error.line, error.param) == ("duplicate_custom_id", 3, "custom_id")


@pytest.mark.parametrize("bad, code, param", [
    ("not json", "invalid_json_line", None),
    ({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}, "invalid_value", "method"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}, "mismatched_endpoint", "url"),
    ({"method": "POST", "url": CHAT, "body": {}}, "missing_required_parameter", "custom_id"),
])
def test_a_bad_line_fails_validation_naming_it(client_for, bad, code: str, param: str | None) -> None:
    with FakeBatchAPI(polls_to_finish=1) as fake:
        client = client_for(fake)
        batch = poll(client, submit(client, [chat_line(1), bad]).id)
        assert batch.status == "failed"
        assert [(e.code, e.line, e.param) for e in batch.errors.data] == [(code, 2, param)]


def test_more_than_the_limit_of_requests_fails_the_batch(client_for) -> None:
    with FakeBatchAPI(polls_to_finish=1) as fake:
        client = client_for(fake)
        lines = [json.dumps(chat_line(i)) for i in range(MAX_REQUESTS + 1)]
        batch = poll(client, submit(client, lines).id)
        assert batch.status == "failed" and batch.errors.data[0].code == "too_many_requests"


def test_fail_batches_fails_the_next_batches_whole(client_for) -> None:
    with FakeBatchAPI(BatchFaults(fail_batches=1)) as fake:
        client = client_for(fake)
        first, second = submit(client, [chat_line(1)]).id, submit(client, [chat_line(2)]).id
        fake.finish()
        failed, completed = client.batches.retrieve(first), client.batches.retrieve(second)
        assert failed.status == "failed" and failed.errors.data[0].code == "token_limit_exceeded"
        assert completed.status == "completed"


def test_upload_5xx_reaches_the_sdk_as_errors_then_uploads_work(client_for) -> None:
    with FakeBatchAPI(BatchFaults(upload_5xx=2)) as fake:
        client = client_for(fake)
        data = jsonl([chat_line(1)])
        with pytest.raises(openai.InternalServerError) as first:
            client.files.create(file=("a.jsonl", data), purpose="batch")
        with pytest.raises(openai.InternalServerError) as second:
            client.files.create(file=("a.jsonl", data), purpose="batch")
        assert (first.value.status_code, second.value.status_code) == (500, 503)
        assert client.files.create(file=("a.jsonl", data), purpose="batch").purpose == "batch"
        assert (fake.refused_uploads, len(fake.uploads), len(fake.files)) == (2, 1, 1)


def test_cancel_keeps_the_answers_already_made(client_for) -> None:
    with FakeBatchAPI(BatchFaults(rows_per_step=3)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(10)]).id
        fake.advance(batch_id)
        fake.advance(batch_id)
        cancelling = client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        fake.advance(batch_id)
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert len(lines_of(client, batch.output_file_id)) == 3 and batch.error_file_id is None
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch_id)


def test_cancel_error_lines_list_what_was_never_answered(client_for) -> None:
    with FakeBatchAPI(BatchFaults(rows_per_step=3, cancel_error_lines=True)) as fake:
        client = client_for(fake)
        batch_id = submit(client, [chat_line(i) for i in range(10)]).id
        fake.advance(batch_id)
        fake.advance(batch_id)
        client.batches.cancel(batch_id)
        fake.finish(batch_id)
        batch = client.batches.retrieve(batch_id)
        errors = lines_of(client, batch.error_file_id)
        assert [line["error"]["code"] for line in errors] == ["batch_cancelled"] * 7


def test_batches_list_pages_newest_first(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        ids = [submit(client, [chat_line(i)]).id for i in range(5)]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more is True
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
        assert [b.id for b in client.batches.list(after=ids[2], limit=10).data] == ids[1::-1]


def test_create_refuses_a_wrong_window_a_missing_file_and_a_non_batch_file(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        tuned = client.files.create(file=("t.jsonl", jsonl([chat_line(1)])), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=tuned.id, endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=tuned.id, endpoint=CHAT, completion_window="1h")  # type: ignore
        assert fake.created == []


def test_embeddings_and_completions_batches_answer_in_their_endpoint_shape(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        embed = [{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "emb", "input": ["a", "b"]}}]
        complete = [{"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                     "body": {"model": "m", "prompt": "say hi"}}]
        embed_id = submit(client, embed, endpoint="/v1/embeddings").id
        complete_id = submit(client, complete, endpoint="/v1/completions").id
        fake.finish()
        [embedded] = lines_of(client, client.batches.retrieve(embed_id).output_file_id)
        [completed] = lines_of(client, client.batches.retrieve(complete_id).output_file_id)
        assert embedded["response"]["body"]["object"] == "list"
        assert len(embedded["response"]["body"]["data"]) == 2
        assert completed["response"]["body"]["object"] == "text_completion"


def test_custom_ids_in_two_batches_counts_only_rows_two_batches_may_answer(client_for) -> None:
    with FakeBatchAPI(BatchFaults(rows_per_step=2, shuffle=False)) as fake:
        client = client_for(fake)
        first = submit(client, [chat_line(i) for i in range(4)]).id
        fake.advance(first)
        fake.advance(first)  # row-0 and row-1 answered
        fake.expire(first)  # row-2 and row-3 may go again
        submit(client, [chat_line(2), chat_line(3)])
        assert fake.custom_ids_in_two_batches() == set()
        submit(client, [chat_line(1)])
        assert fake.custom_ids_in_two_batches() == {"row-1"}


def test_responses_batches_answer_with_response_objects(client_for) -> None:
    with FakeBatchAPI(polls_to_finish=1) as fake:
        client = client_for(fake)
        line = {"custom_id": "r1", "method": "POST", "url": "/v1/responses", "body": {"model": "m", "input": "hi"}}
        batch = poll(client, submit(client, [line], endpoint="/v1/responses").id)
        [answered] = lines_of(client, batch.output_file_id)
        assert answered["response"]["body"]["object"] == "response"
        assert batch.usage.output_tokens == answered["response"]["body"]["usage"]["output_tokens"]


def test_unknown_ids_are_404s(client_for) -> None:
    with FakeBatchAPI() as fake:
        client = client_for(fake)
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_missing")
        with pytest.raises(openai.NotFoundError):
            client.batches.cancel("batch_missing")
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-missing")
        with pytest.raises(openai.NotFoundError):
            client.files.delete("file-missing")


def test_every_object_validates_against_the_sdk_types_with_every_field(client_for) -> None:
    # The SDK builds its objects without validating them, so a missing or mistyped field
    # would pass unseen: validate the fake's objects strictly, in every state they reach.
    with FakeBatchAPI(BatchFaults(fail_batches=1, rows_per_step=1)) as fake:
        client = client_for(fake)
        failed = submit(client, [chat_line(1)]).id
        batch_id = submit(client, [chat_line(1), chat_line(2)]).id
        cancelled = submit(client, [chat_line(3)]).id
        client.batches.cancel(cancelled)
        seen = set()
        for _ in range(6):
            for stored in fake.batches.values():
                openai.types.Batch.model_validate(stored.obj, strict=True)
                assert set(stored.obj) == set(openai.types.Batch.model_fields)
                seen.add(stored.obj["status"])
            fake.advance()
        assert seen >= {"validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"}
        for stored in fake.files.values():
            openai.types.FileObject.model_validate(stored["obj"], strict=True)
            assert set(stored["obj"]) == set(openai.types.FileObject.model_fields)
        assert (client.batches.retrieve(failed).status, client.batches.retrieve(batch_id).status) == (
            "failed", "completed")
