"""A record made a Row: where it goes and what it carries, from values (no job, no server)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrun import InputError
from batchrun.inputs.files import InputFile
from batchrun.inputs.rows import Row, RowReader
from batchrun.inputs.template import Template


@pytest.fixture
def jsonl(tmp_path: Path) -> Iterator[InputFile]:
    path = tmp_path / "in.jsonl"
    path.write_text("{}\n")
    f = InputFile(path)
    yield f
    f.close()


def read(f: InputFile, record: dict[str, Any], **job: Any) -> Row:
    return RowReader(**job).read(f, 3, "line 4", record, checking=True, check=True)


def test_a_flat_record_goes_where_its_field_says_and_the_rest_is_not_sent(jsonl: InputFile) -> None:
    row = read(jsonl, {"id": "q1", "prompt": "hi", "max_tokens": 5, "topic": "x"})
    assert (row.index, row.id, row.endpoint, row.body, row.where) == (
        3, "q1", "completions", {"prompt": "hi", "max_tokens": 5}, "line 4")
    assert read(jsonl, {"messages": [{"role": "user", "content": "m"}]}).endpoint == "chat"
    assert read(jsonl, {"prompt": "p"}).id == "3"  # no id: its position


def test_the_spec_endpoint_takes_the_record_in_its_own_field(jsonl: InputFile) -> None:
    chat = read(jsonl, {"prompt": "hi"}, endpoint="chat")
    assert (chat.endpoint, chat.body) == ("chat", {"messages": [{"role": "user", "content": "hi"}]})
    responses = read(jsonl, {"input": "hi", "instructions": "be brief"}, endpoint="responses")
    assert (responses.endpoint, responses.body) == ("responses", {"input": "hi", "instructions": "be brief"})
    # a chat job's `input` column is no request field: it passes through
    with pytest.raises(InputError, match="line 4: a row needs prompt, messages or body"):
        read(jsonl, {"input": "hi"}, endpoint="chat")


@pytest.mark.parametrize(("record", "job", "message"), [
    ({"custom_id": "a", "body": {"input": "x"}}, {},
     "this row has input: set endpoint: responses or embeddings in the spec"),
    ({"custom_id": "a", "body": {"input": "x"}}, {"endpoint": "chat"},
     "this row has input, which is for endpoint: responses or embeddings; the spec sets endpoint: chat"),
    ({"text": "x"}, {"endpoint": "responses"}, "a row needs input; its keys: text"),
    ({"custom_id": "a", "url": "/v1/images", "body": {"prompt": "x"}}, {},
     "url '/v1/images' is not supported; use /v1/chat/completions, /v1/completions, /v1/responses or /v1/embeddings"),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}, {},
     "embeddings go several rows to a request: set endpoint: embeddings in the spec"),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}, {"endpoint": "chat"},
     "this row is a batch line for embeddings; the spec sets endpoint: chat"),
    ({"custom_id": "a", "url": "/v1/responses", "body": {"input": "x"}}, {"endpoint": "embeddings"},
     "the spec sets endpoint: embeddings, but this row is a batch line for responses"),
    ({"input": ["a"]}, {"endpoint": "embeddings"}, "input must be a string to embed, got list"),
    ({"prompt": "x"}, {"endpoint": "images"}, "endpoint images is not supported; batchrun sends to chat, "),
    ({"prompt": "x"}, {"require_model": True}, "the row names no model and the spec sets none"),
    ({"prompt": "x", "model": "m"}, {"priced": ["n"]}, "the row's model 'm' has no price in pricing"),
])
def test_a_record_that_cannot_be_sent_is_refused_naming_its_place(jsonl: InputFile, record: dict[str, Any],
                                                                  job: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=re.escape(f"line 4: {message}")):
        read(jsonl, record, **job)


def test_a_template_row_goes_where_the_template_or_the_spec_says(jsonl: InputFile) -> None:
    prompt = read(jsonl, {"q": "why"}, template=Template({"prompt": "Q: {{ q }}"}))
    assert (prompt.endpoint, prompt.body) == ("completions", {"prompt": "Q: why"})
    inputs = read(jsonl, {"q": "why"}, endpoint="embeddings", template=Template({"input": "{{ q }}"}))
    assert (inputs.endpoint, inputs.body) == ("embeddings", {"input": "why"})
    with pytest.raises(InputError, match="line 4: template.prompt uses column 'q'"):
        read(jsonl, {"other": 1}, template=Template({"prompt": "Q: {{ q }}"}))


def test_several_files_name_the_file_in_the_place(jsonl: InputFile) -> None:
    assert read(jsonl, {"prompt": "p"}, several_files=True).where == "in.jsonl line 4"
