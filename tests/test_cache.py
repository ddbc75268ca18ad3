"""A response cache shared by jobs: an answer paid for once is not paid for again."""

from __future__ import annotations

import random
from pathlib import Path

from batchrun.engine.cache import cacheable
from tests.conftest import kill_9_during_runs, read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

PRICES = {"test-model": {"input": 2.0, "output": 8.0}}


def test_only_deterministic_requests_are_cached_unless_told() -> None:
    assert cacheable({"temperature": 0}, everything=False)
    assert cacheable({"temperature": 0.7, "seed": 3}, everything=False)
    assert not cacheable({"temperature": 0.7}, everything=False) and not cacheable({}, everything=False)
    assert cacheable({}, everything=True)


def test_two_jobs_share_a_cache_and_the_second_pays_only_for_what_is_new(tmp_path: Path, server: FakeServer) -> None:
    cache = {"path": "cache/responses.sqlite"}
    common = dict(pricing=PRICES, params={"temperature": 0, "max_tokens": 16}, cache=cache,
                  api={"base_url": server.base_url})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "input.jsonl", [{"id": f"a{i}", "prompt": f"question {i}"} for i in range(1000)])
    first = write_spec(tmp_path, name="a.yaml", input="a/input.jsonl", output="a/out.parquet", **common)
    assert run_cli("run", str(first), "--no-progress").code == 0
    assert len(server.requests) == 1000
    first_rows = {r["id"][1:]: r for r in read_output(tmp_path / "a" / "out.parquet")}

    server.faults = Faults(latency_s=0.01)
    server.reset_stats()
    write_jsonl(tmp_path / "b" / "input.jsonl", [{"id": f"b{i}", "prompt": f"question {i}"} for i in range(1500)])
    second = write_spec(tmp_path, name="b.yaml", input="b/input.jsonl", output="b/out.parquet", concurrency=8,
                        **common)
    kill_9_during_runs(second, server, 1, random.Random(3), 100, 200)
    result = run_cli("run", str(second), "--no-progress")

    assert result.code == 0, result.stderr
    # Only the 500 questions the first job never asked; a few of them twice, as the kill
    # lost the answers in flight (at most one per worker)
    assert {r.body["prompt"] for r in server.requests} == {f"question {i}" for i in range(1000, 1500)}
    assert 500 <= len(server.requests) <= 500 + 8
    rows = read_output(tmp_path / "b" / "out.parquet")
    assert [r["id"] for r in rows] == [f"b{i}" for i in range(1500)]  # every row once, in order
    for row in rows:
        index = row["id"][1:]
        if int(index) < 1000:
            mine = first_rows[index]
            assert row["cached"] is True and row["cost_usd"] == 0.0
            assert (row["output_text"], row["response_id"], row["total_tokens"]) == (
                mine["output_text"], mine["response_id"], mine["total_tokens"])
        else:
            assert row["cached"] is False and row["cost_usd"] > 0
    saved = sum(first_rows[str(i)]["cost_usd"] for i in range(1000))
    assert "1,000 from the cache" in result.stdout and f"(${saved:,.4f} saved)" in result.stdout


def test_requests_that_are_not_deterministic_are_asked_again_unless_everything(
        tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"q {i}"} for i in range(20)])
    for run, cache in enumerate(["c.sqlite", "c.sqlite", {"path": "c.sqlite", "everything": True},
                                 {"path": "c.sqlite", "everything": True}]):
        spec = write_spec(tmp_path, output=f"out{run}/r.parquet", params={"temperature": 0.7}, cache=cache,
                          api={"base_url": server.base_url})
        assert run_cli("run", str(spec), "--no-progress").code == 0
    assert len(server.requests) == 20 + 20 + 20 + 0  # only `everything` stores them, and then serves them


def test_jobs_running_at_once_share_the_cache_safely(tmp_path: Path, server: FakeServer) -> None:
    from tests.conftest import start_cli

    server.faults = Faults(latency_s=0.002)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"q {i}"} for i in range(600)])
    specs = [write_spec(tmp_path, name=f"j{n}.yaml", output=f"out{n}/r.parquet", params={"seed": 7}, concurrency=16,
                        cache="shared.sqlite", api={"base_url": server.base_url}) for n in range(3)]
    procs = [start_cli("run", str(spec), "--no-progress") for spec in specs]
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0

    outputs = [read_output(tmp_path / f"out{n}" / "r.parquet") for n in range(3)]
    for rows in outputs:
        assert len(rows) == 600 and all(r["status"] == "ok" for r in rows)
    # whichever job asked first, every row's answer is one the server sent for its prompt
    for rows in outputs:
        for row in rows:
            assert row["response_id"] in {a["id"] for a in server.answers[f"q {row['row_index']}"]}
    late = run_cli("run", str(write_spec(tmp_path, name="j3.yaml", output="out3/r.parquet", params={"seed": 7},
                                         cache="shared.sqlite", api={"base_url": server.base_url})), "--no-progress")
    assert late.code == 0 and "600 from the cache" in late.stdout


def test_the_summary_says_how_many_requests_the_cache_could_not_answer_and_why(tmp_path: Path) -> None:
    from batchrun import run_job

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"q {i}", "temperature": 0 if i < 3 else 0.7}
                                           for i in range(10)])
    spec = write_spec(tmp_path, cache="c.sqlite", api={"base_url": "mock://"})

    summary = run_job(spec, environ={})

    assert summary.uncacheable == 7
    assert "7 requests not looked up in the cache: not deterministic (no temperature: 0 or seed" in summary.line()
    assert run_job(spec, restart=True, environ={}).cache_hits == 3


def test_a_damaged_cache_says_what_to_do(tmp_path: Path) -> None:
    import pytest

    from batchrun import ConfigError, run_job

    (tmp_path / "c.sqlite").write_bytes(b"not a database at all" * 100)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "q", "temperature": 0}])
    spec = write_spec(tmp_path, cache="c.sqlite", api={"base_url": "mock://"})

    with pytest.raises(ConfigError, match="c.sqlite.*move or delete the file .a new one is made."):
        run_job(spec, environ={})
