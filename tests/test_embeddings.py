"""Embeddings: several rows a request, base64 float32 vectors, a refused row split out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.endpoints.embeddings import apportion
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults, error_body, fake_vector


@pytest.mark.parametrize(("total", "weights"), [(100, [1, 1, 1]), (7, [10, 0, 3]), (0, [5, 5]), (3, [0, 0]),
                                                (1_000_003, [17, 4, 99, 1])])
def test_usage_is_apportioned_in_whole_tokens_that_add_up(total: int, weights: list[int]) -> None:
    parts = apportion(total, weights)
    assert sum(parts) == total and all(p >= 0 for p in parts)
    assert apportion(None, weights) == [None] * len(weights)


def float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def test_embedding_rows_go_64_a_request_and_a_refused_row_fails_alone(tmp_path: Path, server: FakeServer) -> None:
    bad = "row 1234 BAD"

    def refuse(body: dict) -> tuple[int, dict] | None:
        if bad in body["input"]:
            return 400, error_body(f"input {body['input'].index(bad)} is not valid text", "invalid_request_error",
                                   "invalid_input")
        return None

    server.faults = Faults(seed=9, status_for=refuse, error_500_rate=0.03)
    texts = [bad if i == 1234 else f"document {i} " * (i % 7 + 1) for i in range(3000)]
    write_jsonl(tmp_path / "input.jsonl", [{"id": f"d{i}", "input": t, "lang": "en"} for i, t in enumerate(texts)])
    spec = write_spec(tmp_path, endpoint="embeddings", concurrency=8, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1, result.stderr
    assert "3,000 rows: 2,999 ok, 1 failed" in result.stdout
    schema = pq.read_schema(tmp_path / "out/result.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32())
    rows = read_output(tmp_path / "out/result.parquet")
    for row, text in zip(rows, texts):
        if row["row_index"] == 1234:
            assert row["status"] == "failed" and row["embedding"] is None
            assert row["error"].startswith("HTTP 400: input 0 is not valid text")
        else:
            assert row["status"] == "ok", row
            assert row["embedding"] == fake_vector(text)  # exact float32
            assert row["lang"] == "en"
    answered = [r for r in server.requests if r.outcome == "ok"]
    assert len(server.requests) <= 3000 / 16
    assert all(r.body["encoding_format"] == "base64" for r in server.requests)
    billed = sum(a["usage"]["prompt_tokens"] for answers in server.answers.values() for a in answers)
    assert sum(r["prompt_tokens"] or 0 for r in rows) == billed
    assert sum(r["total_tokens"] or 0 for r in rows) == billed
    assert len(answered) == sum(len(a) for a in server.answers.values())


def test_row_groups_of_vectors_hold_megabytes_not_thousands_of_rows(tmp_path: Path, server: FakeServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A row group is one table in memory, and the last is written after the last answer:
    rows of 1,024 floats (4 KB) go fewer to a group, so that it holds about
    ROW_GROUP_BYTES; rows of short texts still go up to ROW_GROUP_ROWS to a group."""
    monkeypatch.setattr("batchrun.storage.output.ROW_GROUP_BYTES", 256 << 10)  # 60 vectors, 1,000 short texts
    monkeypatch.setattr("batchrun.storage.output.ROW_GROUP_ROWS", 500)

    def group_sizes() -> list[int]:
        groups = pq.ParquetFile(tmp_path / "out/result.parquet").metadata
        return [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]

    texts = [f"document {i}" for i in range(1200)]
    write_jsonl(tmp_path / "input.jsonl", [{"input": t} for t in texts])
    spec = write_spec(tmp_path, endpoint="embeddings", concurrency=4, params={"dimensions": 1024},
                      api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert [r["embedding"] for r in read_output(tmp_path / "out/result.parquet")] == \
        [fake_vector(t, 1024) for t in texts]
    sizes = group_sizes()
    assert sum(sizes) == 1200 and max(sizes) <= 64  # MIN_GROUP_ROWS: 60 would do

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": t} for t in texts])
    spec = write_spec(tmp_path, endpoint="completions", concurrency=4, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress", "--restart").code == 0
    sizes = group_sizes()
    # Up to 500, in halves when a few more than 500 were settled at once; and the last rows after the rest
    assert sum(sizes) == 1200 and 250 <= max(sizes) <= 500


def test_float_answers_and_templates_work_too(tmp_path: Path, server: FakeServer) -> None:
    pq.write_table(pa.table({"title": [f"t{i}" for i in range(100)], "body": [f"b{i}" for i in range(100)]}),
                   tmp_path / "docs.parquet")
    spec = write_spec(tmp_path, input="docs.parquet", endpoint="embeddings", inputs_per_request=10,
                      template={"input": "{{ title }}: {{ body }}"},
                      params={"encoding_format": "float", "dimensions": 16}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["embedding"] for r in rows] == [fake_vector(f"t{i}: b{i}", 16) for i in range(100)]
    assert [r["title"] for r in rows] == [f"t{i}" for i in range(100)]
    assert len(server.requests) == 10


def test_kill_9_during_embeddings_loses_and_repeats_no_row(tmp_path: Path, server: FakeServer) -> None:
    import random

    from tests.conftest import kill_9_during_runs

    server.faults = Faults(seed=6, latency_s=0.02, error_503_rate=0.03)
    texts = [f"passage {i}" for i in range(6000)]
    write_jsonl(tmp_path / "input.jsonl", [{"input": t} for t in texts])
    spec = write_spec(tmp_path, endpoint="embeddings", inputs_per_request=16, concurrency=8,
                      api={"base_url": server.base_url})
    rng = random.Random(6)
    kill_9_during_runs(spec, server, 2, rng, 40, 120)

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in rows] == list(range(6000))
    answered_in: dict[str, set[str]] = {}
    for key, answers in server.answers.items():
        for text in json.loads(key)[1]:
            answered_in.setdefault(text, set()).update(a["id"] for a in answers)
    for row, text in zip(rows, texts):
        assert row["embedding"] == fake_vector(text)
        assert row["response_id"] in answered_in[text]  # an answer the server sent for this very row
    paid_twice = sum(len(ids) - 1 for ids in answered_in.values())
    assert paid_twice <= 2 * 8 * 16, paid_twice  # a kill loses at most the groups in flight


def group(answer, rows: int = 8, bodies: list[dict] | None = None, **spec: object):
    """Run `rows` embedding rows (or rows of these `bodies`) through Client.call_group
    over MockTransport."""
    import anyio
    import httpx

    from batchrun import parse_spec
    from batchrun.engine.call import Caller
    from batchrun.http.client import Client
    from batchrun.inputs.reader import Row

    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return answer(seen[-1])

    async def noop(seconds: float) -> None:
        pass

    raw = {"input": "i.jsonl", "output": "o.parquet", "model": "m", "endpoint": "embeddings",
           "api": {"base_url": "http://127.0.0.1:9/v1"}, "retry": {"max_attempts": 2}, **spec}
    client = Client(parse_spec(raw, environ={}), api_key="k", transport=httpx.MockTransport(handler), sleep=noop)
    bodies = bodies or [{"input": f"text {i}"} for i in range(rows)]
    batch = [Row(i, f"r{i}", "embeddings", body, f"line {i + 1}") for i, body in enumerate(bodies)]

    async def main() -> list:
        async with client:
            return await Caller(client.spec, client).call_group(batch)

    return anyio.run(main), seen


def test_rows_go_together_only_with_the_same_other_fields() -> None:
    import base64
    import struct

    import httpx

    def vectors(body: dict) -> httpx.Response:
        data = [{"index": i, "embedding": base64.b64encode(struct.pack("<2f", i, 0)).decode()}
                for i in range(len(body["input"]))]
        return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    bodies = [{"input": "a"}, {"input": "b", "user": "u1"}, {"input": "c"}, {"user": "u1", "input": "d"},
              {"input": "e", "user": "u2"}, {"input": "f", "dimensions": 2}, {"input": "g"}]
    results, seen = group(vectors, bodies=bodies)
    sent = sorted((body["input"], body.get("user"), body.get("dimensions")) for body in seen)
    assert sent == [(["a", "c", "g"], None, None), (["b", "d"], "u1", None), (["e"], "u2", None),
                    (["f"], None, 2)]
    assert sorted(r.row_index for r in results) == list(range(7)) and {r.status for r in results} == {"ok"}


def test_a_server_error_fails_the_group_without_splitting_it() -> None:
    import httpx

    results, seen = group(lambda body: httpx.Response(503, json={"error": {"message": "busy"}}))
    assert len(seen) == 2  # two attempts of the one request of 8 rows, never halves
    assert all(r.status == "failed" and r.transient and r.error.startswith("HTTP 503") for r in results)
    results, seen = group(lambda body: httpx.Response(200, json={"object": "list"}))
    assert len(seen) == 1 and all("HTTP 200 without embeddings" in r.error for r in results)


def test_a_server_without_the_route_fails_the_group_in_one_request_and_says_what_to_check() -> None:
    import httpx

    # vLLM serving a generative model answers /v1/embeddings so: no half of the group fares better
    results, seen = group(lambda body: httpx.Response(404, json={"detail": "Not Found"}))
    assert len(seen) == 1
    assert all(r.status == "failed" and not r.transient for r in results)
    assert {r.error for r in results} == {
        "HTTP 404: Not Found (no such route or model on this server: check api.base_url, endpoint and model)"}


def test_one_vector_per_token_stops_the_job_with_what_to_do() -> None:
    import httpx

    from batchrun import JobFatalAPIError

    per_token = {"data": [{"index": 0, "embedding": [[0.1, 0.2], [0.3, 0.4]]}], "usage": {"prompt_tokens": 2}}
    with pytest.raises(JobFatalAPIError, match="one vector per token, not one per input"):
        group(lambda body: httpx.Response(200, json=per_token), rows=1)


def test_one_input_a_request_stores_every_vector(tmp_path: Path) -> None:
    import base64

    import httpx

    from batchrun import run_job

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        data = [{"index": i, "embedding": base64.b64encode(struct.pack("<2f", len(text), 0.5)).decode()}
                for i, text in enumerate(body["input"])]
        return httpx.Response(200, json={"data": data, "model": "e", "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    write_jsonl(tmp_path / "input.jsonl", [{"input": "x" * (i + 1)} for i in range(5)])
    spec = write_spec(tmp_path, endpoint="embeddings", inputs_per_request=1, api={"base_url": "http://127.0.0.1:9/v1"})

    summary = run_job(spec, transport=httpx.MockTransport(answer), environ={"OPENAI_API_KEY": "k"})

    assert (summary.ok, summary.requests) == (5, 5)
    assert [r["embedding"] for r in read_output(summary.output)] == [[float(i + 1), 0.5] for i in range(5)]


@pytest.mark.parametrize("decode", ["simd", "standard library"])
def test_a_vector_is_strict_base64_with_either_decoder(decode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pybase64 decodes where its wheel is installed, binascii elsewhere: the same vectors,
    and the same answers refused (a retry: the server sent what it should not have)."""
    import base64

    from batchrun._exceptions import RetryableAPIError
    from batchrun.endpoints import embeddings

    if decode == "standard library":
        monkeypatch.setattr(embeddings, "_decode", embeddings._strict_b64decode)
    else:
        assert embeddings._decode is not embeddings._strict_b64decode  # pybase64 is a dependency
    vector = struct.pack("<3f", 0.5, -2.0, 1e-3)
    assert embeddings._float32(base64.b64encode(vector).decode()) == vector
    assert embeddings._float32("") == b""
    for bad in ("AAAA\n", "AA AA", "AAA*", "AAA", "A===", "AA==AA==", "ÀAAA"):
        with pytest.raises(RetryableAPIError, match="not base64"):
            embeddings._float32(bad)
    with pytest.raises(RetryableAPIError, match="not float32s"):
        embeddings._float32(base64.b64encode(b"\x00" * 6).decode())
