"""Prompt-cache affinity (`api.affinity`): rows that share a prompt's beginning go to one
replica, whose prefix cache then serves them; the output's cached tokens and cost show it.
Against the fake server's replicas (tests/fakeserver.py, `Faults.replicas`): each with a
prompt cache of its own, reached by `x-session-affinity` or at random."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from batchrun.http.client import Client
from batchrun.spec.parse import parse_spec
from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

DOCUMENTS, QUESTIONS = 40, 8
PRICES = {"test-model": {"input": 1.0, "cached_input": 0.5, "output": 2.0}}


def rows() -> list[dict]:
    """A few-shot block per document, shared by its questions; the rows grouped by document."""
    return [{"id": f"d{d}-q{q}", "messages": [
        {"role": "system", "content": "Answer from the document only."},
        {"role": "user", "content": f"Document {d}: " + f"fact {d} is stated here at length. " * 30},
        {"role": "user", "content": f"Question {q} about document {d}?"}]}
        for d in range(DOCUMENTS) for q in range(QUESTIONS)]


def run(tmp_path: Path, affinity: bool) -> tuple[list[dict], FakeServer]:
    folder = tmp_path / ("with" if affinity else "without")
    folder.mkdir()
    with FakeServer(Faults(replicas=8, replica_cache=16, seed=3)) as server:
        write_jsonl(folder / "input.jsonl", rows())
        spec = write_spec(folder, api={"base_url": server.base_url, "affinity": affinity}, pricing=PRICES,
                          concurrency=16)
        result = run_cli("run", str(spec), "--no-progress")
        assert result.code == 0, result.stderr
        return read_output(folder / "out/result.parquet"), server


def cached_share(out: list[dict]) -> float:
    return sum(r["cached_tokens"] for r in out) / sum(r["prompt_tokens"] for r in out)


@pytest.mark.slow
def test_rows_sharing_a_prefix_reach_one_replica_and_its_cache_serves_them(tmp_path: Path) -> None:
    with_out, with_server = run(tmp_path, affinity=True)
    without_out, without_server = run(tmp_path, affinity=False)
    # Every question of a document went with one key, and each document's key is its own
    keys = defaultdict(set)
    for _, affinity, prefix in with_server.replica_served:
        keys[prefix].add(affinity)
    assert len(keys) == DOCUMENTS and all(len(k) == 1 for k in keys.values())
    assert len(set().union(*keys.values())) == DOCUMENTS
    assert {affinity for _, affinity, _ in without_server.replica_served} == {None}
    shared, spread = cached_share(with_out), cached_share(without_out)
    print(f"cached share of prompt tokens: {shared:.1%} with affinity, {spread:.1%} without")
    assert shared > 0.7 and spread < 0.45 and shared > 1.8 * spread
    assert sum(r["cost_usd"] for r in with_out) < 0.85 * sum(r["cost_usd"] for r in without_out)


def affinity(endpoint: str, body: dict) -> str | None:
    """The key a request of `body` carries, from its JSON as the client encodes it."""
    return Client._affinity(endpoint, body, json.dumps(body, ensure_ascii=False, allow_nan=False).encode())


def test_a_template_system_message_or_a_long_prompt_is_the_shared_prefix() -> None:
    few_shot = [{"role": "system", "content": "s"}, {"role": "user", "content": "example \u00e9 \"quoted\""}]
    first = affinity("chat", {"model": "m", "messages": [*few_shot, {"role": "user", "content": "q1"}]})
    assert first == affinity("chat", {"model": "m", "messages": [*few_shot, {"role": "user", "content": "q2"}]})
    assert first is not None
    assert first != affinity("chat", {"model": "other", "messages": [*few_shot, {"role": "user", "content": "q1"}]})
    other_shots = [few_shot[0], {"role": "user", "content": "another example"}]
    assert first != affinity("chat", {"model": "m", "messages": [*other_shots, {"role": "user", "content": "q1"}]})
    assert affinity("chat", {"model": "m", "messages": [{"role": "user", "content": "short"}]}) is None
    long = "a shared \"preamble\" " * 40
    assert affinity("completions", {"model": "m", "prompt": long + "one"}) == \
        affinity("completions", {"model": "m", "prompt": long + "two"}) is not None
    assert affinity("completions", {"model": "m", "prompt": "a different start " * 40}) != \
        affinity("completions", {"model": "m", "prompt": long})
    assert affinity("embeddings", {"model": "m", "input": [long]}) is None


def test_a_rows_own_fields_beside_its_prompt_leave_its_key_alone() -> None:
    """`user` or `seed` change no prompt token, whether encoded before the messages (a
    row's columns in that order) or after: rows sharing a system message share a key."""
    system = {"role": "system", "content": "the shared instructions"}
    keys = {affinity("chat", {"model": "m", **extra, "messages": [system, {"role": "user", "content": f"q{i}"}]})
            for i, extra in enumerate([{}, {"user": "u1"}, {"user": "u2", "seed": 3}, {"seed": 4}])}
    keys.add(affinity("chat", {"model": "m", "messages": [system, {"role": "user", "content": "q9"}], "user": "u9"}))
    assert len(keys) == 1 and None not in keys
    assert affinity("responses", {"model": "m", "user": "u1", "input": [system, {"role": "user", "content": "a"}]}) \
        == affinity("responses", {"model": "m", "input": [system, {"role": "user", "content": "b"}]}) is not None


def test_affinity_is_on_by_default_for_fireworks_only(tmp_path: Path) -> None:
    base = {"input": "in.jsonl", "output": "out.parquet", "model": "m"}
    assert parse_spec({**base, "api": {"base_url": "https://api.fireworks.ai/inference/v1"}}, base_dir=tmp_path).api \
        .affinity
    assert not parse_spec({**base, "api": {"base_url": "https://api.openai.com/v1"}}, base_dir=tmp_path).api.affinity
    assert parse_spec({**base, "api": {"base_url": "http://127.0.0.1:1/v1", "affinity": True}},
                      base_dir=tmp_path).api.affinity
