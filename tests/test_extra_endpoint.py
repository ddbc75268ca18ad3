"""Adding an endpoint is its module and one registry line.

A test-only kind, `moderations` (POST /moderations: `input` in, a flagged/categories
answer out), is registered by a fixture (one `setitem` on the registry) and a real job
runs through it: the spec, validation, the pool, the output and `batchrun export`,
with no other module touched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batchrun import InputError, run_job
from batchrun.endpoints import ENDPOINTS, Endpoint, StreamReader
from batchrun.endpoints.result import Result, answer_id, set_usage, text_of
from tests.conftest import read_output, run_cli, write_jsonl, write_spec


class Moderations(Endpoint):
    """POST /moderations: a text in, whether it is flagged and in which categories out."""

    name = "moderations"
    path = "/moderations"
    field = "input"
    template_fields = ("input",)
    request_fields = frozenset({"input", "model"})
    generates = False
    answers_with_message = False

    def check(self, body: Mapping[str, Any]) -> str | None:
        if not isinstance(body.get("input"), str):
            return f"input must be a string to moderate, got {type(body.get('input')).__name__}"
        return None

    def parse(self, data: Any) -> Result:
        [verdict] = data["results"]
        result = Result(row_index=-1, id="", status="ok", model=text_of(data.get("model")),
                        response_id=text_of(data.get("id")), finish_reason="flagged" if verdict["flagged"] else "clean",
                        output_text=json.dumps({"flagged": verdict["flagged"], "categories": verdict["categories"]}))
        set_usage(result, data.get("usage"))
        return result

    def stream(self) -> StreamReader:
        raise NotImplementedError("moderations are not streamed")

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        return {"id": answer_id(answer, "modr"), "model": model, "results": [json.loads(answer["output_text"])]}


@pytest.fixture
def moderations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ENDPOINTS, "moderations", Moderations())


class Moderator:
    """The server: flags a text with "hate" in it, refuses one with "refuse" (400), and
    keeps every request it was sent. The job's first request goes alone (a wrong key
    costs one request); the server holds the `together` after it until all of them are
    in flight at once, so the job passes only if the pool sends them side by side."""

    def __init__(self, together: int = 0) -> None:
        self.requests: list[httpx.Request] = []
        self.together = together
        self.all_in: anyio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if 1 < len(self.requests) <= 1 + self.together:
            self.all_in = self.all_in or anyio.Event()
            if len(self.requests) == 1 + self.together:
                self.all_in.set()
            with anyio.fail_after(10):
                await self.all_in.wait()
        text = json.loads(request.content)["input"]
        if "refuse" in text:
            return httpx.Response(400, json={"error": {"message": "text too long to moderate"}})
        flagged = "hate" in text
        return httpx.Response(200, json={
            "id": f"modr-{len(text)}", "model": "omni-moderation",
            "results": [{"flagged": flagged, "categories": {"hate": flagged, "violence": False}}]})

    def bodies(self) -> list[dict[str, Any]]:
        return sorted((json.loads(r.content) for r in self.requests), key=lambda b: b["input"])


def _job(tmp_path: Path, rows: list[Any], **spec: Any) -> Path:
    write_jsonl(tmp_path / "input.jsonl", rows)
    return write_spec(tmp_path, endpoint="moderations", concurrency=4, api={"base_url": "https://moderator.test/v1"},
                      **spec)


ROWS = [{"id": "a", "input": "a kind word", "source": "forum"}, {"id": "b", "input": "hate speech", "source": "chat"},
        {"id": "c", "input": "please refuse", "source": "mail"}, {"id": "d", "input": "hello", "source": "forum"}]


@pytest.mark.usefixtures("moderations")
def test_an_extra_endpoint_runs_a_job_through_the_pool_to_the_output_and_the_export(tmp_path: Path) -> None:
    server = Moderator(together=3)
    spec = _job(tmp_path, ROWS, retry={"max_attempts": 1})

    summary = run_job(spec, transport=httpx.MockTransport(server), environ={"OPENAI_API_KEY": "k"})

    assert (summary.ok, summary.failed) == (3, 1)
    assert {str(r.url) for r in server.requests} == {"https://moderator.test/v1/moderations"}
    assert server.bodies() == [{"model": "test-model", "input": text}
                               for text in sorted(row["input"] for row in ROWS)]  # the request fields, nothing else
    rows = read_output(summary.output)
    assert [(r["id"], r["status"], r["finish_reason"], r["source"]) for r in rows] == [
        ("a", "ok", "clean", "forum"), ("b", "ok", "flagged", "chat"), ("c", "failed", None, "mail"),
        ("d", "ok", "clean", "forum")]
    assert json.loads(rows[1]["output_text"]) == {"flagged": True, "categories": {"hate": True, "violence": False}}
    assert rows[2]["error"].startswith("HTTP 400") and "too long to moderate" in rows[2]["error"]
    assert "embedding" not in rows[0]  # the columns of another endpoint stay with it

    out = tmp_path / "results.jsonl"
    exported = run_cli("export", str(spec), "--format", "openai-batch", str(out))
    assert exported.code == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["custom_id"], line["response"]["body"]) for line in lines] == [
        ("a", {"id": "modr-11", "model": "omni-moderation",
               "results": [{"flagged": False, "categories": {"hate": False, "violence": False}}]}),
        ("b", {"id": "modr-11", "model": "omni-moderation",
               "results": [{"flagged": True, "categories": {"hate": True, "violence": False}}]}),
        ("d", {"id": "modr-5", "model": "omni-moderation",
               "results": [{"flagged": False, "categories": {"hate": False, "violence": False}}]})]
    [error] = [json.loads(line) for line in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert (error["custom_id"], error["response"]["status_code"]) == ("c", 400)

    sft = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl"))
    assert (sft.code, "has no answers to train on" in sft.stderr) == (2, True)


@pytest.mark.usefixtures("moderations")
@pytest.mark.parametrize(("row", "message"), [
    ({"input": ["two", "texts"]}, "line 2: input must be a string to moderate, got list"),
    ({"prompt": "hi"}, "line 2: a row needs input; its keys: prompt"),  # a prompt is no request field here
    ({"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "hi"}},
     "line 2: the spec sets endpoint: moderations, but this row is a batch line for embeddings"),
])
def test_the_extra_endpoint_checks_its_rows_before_any_request(tmp_path: Path, row: dict[str, Any],
                                                                message: str) -> None:
    server = Moderator()
    spec = _job(tmp_path, [{"input": "fine"}, row])

    with pytest.raises(InputError, match=message):
        run_job(spec, transport=httpx.MockTransport(server), environ={"OPENAI_API_KEY": "k"})
    assert server.requests == []


@pytest.mark.usefixtures("moderations")
def test_batch_lines_name_the_extra_endpoint_by_its_url_and_the_spec_lists_it(tmp_path: Path) -> None:
    server = Moderator()
    spec = _job(tmp_path, [{"custom_id": "x", "url": "/v1/moderations", "body": {"input": "hello"}},
                           {"custom_id": "y", "url": "/moderations", "body": {"input": "hate"}}])

    summary = run_job(spec, transport=httpx.MockTransport(server), environ={"OPENAI_API_KEY": "k"})

    assert [(r["id"], r["finish_reason"]) for r in read_output(summary.output)] == [("x", "clean"), ("y", "flagged")]
    bad = write_spec(tmp_path, name="bad.yaml", endpoint="moderation")
    result = run_cli("run", str(bad))
    assert result.code == 2
    assert "expected one of chat, completions, responses, embeddings, moderations, got 'moderation'" in result.stderr


def test_without_the_registry_line_the_endpoint_is_unknown(tmp_path: Path) -> None:
    spec = _job(tmp_path, [{"input": "x"}])
    result = run_cli("run", str(spec))
    assert (result.code, "endpoint: expected one of chat, completions, responses, embeddings, got" in result.stderr) \
        == (2, True)
