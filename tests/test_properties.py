"""Property-based tests: any bytes give rows or a clear error, never a crash or a silent skip."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import APIError, InputError
from batchrun._inputs import InputReader
from batchrun._protocol import StreamAssembler

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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
@given(st.binary(max_size=300), st.sampled_from(["in.jsonl", "in.jsonl.gz", "in.parquet"]))
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
