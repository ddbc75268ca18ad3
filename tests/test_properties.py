"""Property-based tests: any bytes, in a file or from a server, give rows or a clear error,
never a crash or a silent skip."""

from __future__ import annotations

import gzip
import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import APIError, InputError, JobFatalAPIError, parse_spec
from batchrun.endpoints.result import Result
from batchrun.endpoints.sse import StreamAssembler
from batchrun.engine.call import Caller
from batchrun.http.client import Client
from batchrun.inputs.reader import InputReader, Row
from batchrun.storage.output import result_schema
from batchrun.storage.state import StateStore
from tests.conftest import examples

SETTINGS = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
row_like = st.dictionaries(
    st.sampled_from(["id", "custom_id", "prompt", "messages", "body", "url", "method", "model", "max_tokens",
                     "stream", "note", "status", "n"]) | st.text(max_size=6),
    json_values,
    max_size=5,
)


def read(data: bytes, name: str = "in.jsonl") -> tuple[int, dict[str, str]]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        reader = InputReader(path)
        count, types = reader.validate()
        rows = list(reader.rows())
        assert len(rows) == count
        if types:
            assert sum(t.num_rows for t in reader.passthrough_batches(types)) == count
        return count, types


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(["in.jsonl", "in.jsonl.gz", "in.parquet", "in.csv"]))
def test_any_bytes_give_rows_or_an_input_error(data: bytes, name: str) -> None:
    try:
        read(data, name)
    except InputError as exc:
        assert name in str(exc)


@SETTINGS
@given(st.binary(max_size=200))
def test_any_gzipped_bytes_give_rows_or_an_input_error(data: bytes) -> None:
    try:
        read(gzip.compress(data), "in.jsonl.gz")
    except InputError as exc:
        assert "in.jsonl.gz" in str(exc)


@SETTINGS
@given(st.lists(row_like | json_values, max_size=6), st.lists(st.sampled_from(["", " ", "\t"]), max_size=3))
def test_json_lines_give_one_row_each_or_an_input_error(records: list, blanks: list[str]) -> None:
    lines = [json.dumps(r) for r in records] + blanks
    try:
        count, _ = read(("\n".join(lines) + "\n").encode())
    except InputError as exc:
        assert "in.jsonl" in str(exc)
    else:
        assert count == len(records)  # nothing skipped without a word


# What json reads and no request can carry, beside what it can
hostile_values = st.sampled_from([
    rb'"\ud800"', rb'"x\udc00"', rb'"\udc00\ud800"', b'"\xed\xa0\x80"', b'"\xed\xbf\xbf"', rb'"\ud83d\ude00"',
    b"NaN", b"-Infinity", b"Infinity", b"1e999", b"-1E400", b"123456789012345678901234567890", b'"plain"',
    b"0.5", b"[[1, [2]]]", b'{"k": NaN}', b'["\xed\xa0\x80"]', b"\xef\xbb\xbf", b"",
])


@SETTINGS
@given(st.lists(st.tuples(hostile_values, hostile_values, hostile_values), min_size=1, max_size=4))
def test_a_row_that_passes_validation_can_be_sent(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    """Whatever json reads in a line, a row validation lets through has a request body
    that encodes as the client encodes it (UTF-8 JSON without NaN)."""
    from batchrun._json import dumps

    data = b"".join(b'{"prompt": %s, "temperature": %s, "note": %s}\n' % line for line in lines)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.jsonl"
        path.write_bytes(data)
        reader = InputReader(path, endpoint="completions")
        try:
            count, types = reader.validate()
        except InputError as exc:
            assert "in.jsonl" in str(exc)
            return
        rows = list(reader.rows())
        assert len(rows) == count == len(lines)
        for row in rows:
            dumps(row.body).encode("utf-8")  # raises if it cannot be sent
        if types:
            assert sum(t.num_rows for t in reader.passthrough_batches(types)) == count


stream_chunks = st.one_of(
    json_values.map(json.dumps),
    st.builds(
        lambda content, finish, usage: json.dumps(
            {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}], "usage": usage}
        ),
        json_values, st.none() | st.sampled_from(["stop", "length"]) | json_values, json_values,
    ),
    st.just("[DONE]"),
    st.text(max_size=30),
)


@SETTINGS
@given(st.lists(stream_chunks, max_size=8), st.sampled_from(["chat", "completions"]))
def test_any_event_stream_gives_a_result_or_an_api_error(chunks: list[str], endpoint: str) -> None:
    assembler = StreamAssembler(endpoint)
    try:
        for chunk in chunks:
            assembler.feed_line(f"data: {chunk}")
            assembler.feed_line("")
        result = assembler.result()
    except APIError:
        return
    assert result.output_text is None or isinstance(result.output_text, str)
    assert result.finish_reason is None or isinstance(result.finish_reason, str)
    assert all(v is None or isinstance(v, int) for v in (result.prompt_tokens, result.total_tokens))


# -- answers: whatever the server sends, a stored row or a clear failure ---------------------

text_with_surrogates = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                                      categories=None, exclude_categories=()), max_size=12)
wild_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | text_with_surrogates,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text_with_surrogates, children, max_size=3),
    max_leaves=10,
)
answer_like = st.fixed_dictionaries({
    "id": wild_json,
    "choices": st.lists(st.fixed_dictionaries({
        "index": st.integers(0, 1) | wild_json,
        "message": st.fixed_dictionaries({"content": wild_json, "tool_calls": wild_json}),
        "delta": st.fixed_dictionaries({"content": wild_json}),
        "text": wild_json,
        "finish_reason": st.sampled_from(["stop", "length"]) | wild_json,
    }), max_size=2) | wild_json,
    "usage": st.fixed_dictionaries({"prompt_tokens": wild_json, "completion_tokens": wild_json,
                                    "total_tokens": wild_json}) | wild_json,
})
bodies = st.one_of(
    st.binary(max_size=400),
    answer_like.map(lambda a: json.dumps(a).encode()),  # escapes: lone surrogates survive as \\udXXX
    st.lists(answer_like.map(json.dumps) | st.text(max_size=40), max_size=4).map(
        lambda events: "".join(f"data: {e}\n\n" for e in events).encode() + b"data: [DONE]\n\n"),
)


@pytest.fixture(scope="module")
def state() -> Iterator[tuple[StateStore, itertools.count[int]]]:
    """One state for every example, each example's answer on a row of its own: a fresh
    SQLite file per example cost most of the test's time, and proved nothing more."""
    with tempfile.TemporaryDirectory() as folder:
        store = StateStore.open(Path(folder) / "s.sqlite")
        try:
            yield store, itertools.count()
        finally:
            store.close()


@SETTINGS
@given(bodies, st.sampled_from(["application/json", "text/event-stream"]), st.sampled_from(["chat", "completions"]),
       st.booleans())
def test_any_answer_gives_a_stored_row_or_a_clear_failure(state: tuple[StateStore, itertools.count[int]],
                                                          body: bytes, content_type: str, endpoint: str,
                                                          stream: bool) -> None:
    spec = parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m", "params": {"stream": stream},
                       "retry": {"max_attempts": 1}, "api": {"base_url": "http://127.0.0.1:9/v1"}}, environ={})
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body,
                                                                   headers={"content-type": content_type}))
    client = Client(spec, api_key="sk-property-key", transport=transport)
    body_fields = {"messages": [{"role": "user", "content": "q"}]} if endpoint == "chat" else {"prompt": "q"}

    store, rows = state
    index = next(rows)

    async def main() -> Result:
        async with client:
            return await Caller(spec, client).call(Row(index, "r", endpoint, body_fields, "line 1"))

    result = anyio.run(main)
    assert result.status in ("ok", "failed")
    assert (result.error is None) == (result.status == "ok")
    store.save([result])  # SQLite takes it...
    [row] = store.results(index, index + 1)
    pa.Table.from_arrays([pa.array([value], type=field.type) for value, field in zip(row, result_schema())],
                         schema=result_schema())  # ...and so does the Parquet output


@SETTINGS
@given(st.sampled_from([301, 400, 404, 408, 422, 429, 500, 503, 599]), bodies,
       st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
                                        "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                                        "x-ratelimit-over-limit", "location"]),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)))
def test_any_refusal_gives_a_failed_row_or_stops_the_job_with_a_message(status: int, body: bytes,
                                                                        headers: dict[str, str]) -> None:
    spec = parse_spec({"input": "i.jsonl", "output": "o.parquet", "model": "m", "retry": {"max_attempts": 2},
                       "rate_limit": {"tokens_per_minute": 1000},
                       "api": {"base_url": "http://127.0.0.1:9/v1"}}, environ={})
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body, headers=headers))

    async def no_wait(seconds: float) -> None:
        assert 0 <= seconds < float("inf")

    client = Client(spec, api_key="sk-property-key", transport=transport, sleep=no_wait)

    async def main() -> Result:
        async with client:
            return await Caller(spec, client).call(Row(0, "r", "completions", {"prompt": "q"}, "line 1"))

    try:
        result = anyio.run(main)
    except JobFatalAPIError as exc:  # a redirect: the job stops, saying where it points
        assert status == 301 and str(exc).startswith("HTTP 301: ")
        return
    assert result.status == "failed" and result.error.startswith(f"HTTP {status}: ")
    result.error.encode("utf-8")
