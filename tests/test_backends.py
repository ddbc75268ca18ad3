"""Backends: which rows each process runs, what limits reach the engine, the engine's bounds.

No server: the jobs here run against the mock endpoint (`mock://`), in this process.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from batchrun import ConfigError, load_spec, run_job
from batchrun.backends import LocalBackend, ShardBackend
from batchrun.backends.layout import Shard, shard_output, shard_sums, slice_of
from batchrun.backends.ray.quota import LeasedLimiter
from batchrun.backends.ray.worker import shard_spec
from batchrun.backends.shards import ShardPart
from batchrun.engine.limits import Limits
from batchrun.engine.part import WholeJob
from batchrun.engine.run import RunOptions
from batchrun.policy.concurrency import EPOCH_S, answered_lately
from batchrun.policy.rate import RateLimiter
from tests.conftest import read_output, write_jsonl, write_spec

ENGINE = Path(__file__).parent.parent / "batchrun" / "engine"


@pytest.mark.parametrize("total", [0, 1, 5, 16, 1001])
@pytest.mark.parametrize("count", [1, 3, 4, 16])
def test_slices_cover_everything_once_in_order_at_most_one_apart(total: int, count: int) -> None:
    slices = [slice_of(total, index, count) for index in range(count)]
    assert [i for start, stop in slices for i in range(start, stop)] == list(range(total))
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1


def test_a_shard_its_concurrency_and_its_lease_take_the_same_slice(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, concurrency=10, api={"base_url": "mock://"}))
    slices = [slice_of(10, index, 4) for index in range(4)]
    assert [shard_spec(spec, Shard(i, 4)).concurrency for i in range(4)] == [b - a for a, b in slices] == [2, 3, 2, 3]
    leases = [LeasedLimiter(requests_per_minute=None, tokens_per_minute=None, workers=4, tokens_each=1,
                            concurrency=10, worker=i)
              for i in range(4)]
    assert [lease.control.limit for lease in leases] == [2, 3, 2, 3]
    assert Shard(1, 4).bounds(10) == slice_of(10, 1, 4) == (2, 5)


def test_shard_sums_add_counts_and_leave_a_cost_none_when_no_shard_has_one() -> None:
    parts = [{"ok": 3, "failed": 1, "cost_usd": None}, {"ok": 2, "failed": None}, {"ok": 5}]
    assert shard_sums(parts, ("ok", "failed"), optional=("cost_usd",)) == {"ok": 10, "failed": 1, "cost_usd": None}
    parts[1]["cost_usd"] = 0.25
    assert shard_sums(parts, ("ok",), optional=("cost_usd",)) == {"ok": 10, "cost_usd": 0.25}
    lost = shard_sums([{"lost_usd": 0.0}, {}], ("lost_usd",))["lost_usd"]
    assert (lost, type(lost)) == (0.0, float)  # dollars stay a float in status --json, 0 or not


def test_answered_lately_is_within_one_epoch() -> None:
    assert answered_lately(100.0, 100.0 + EPOCH_S - 0.01)
    assert not answered_lately(100.0, 100.0 + EPOCH_S)
    assert not answered_lately(float("-inf"), 0.0)


def test_a_shard_part_has_its_own_output_rows_and_state_record(tmp_path: Path) -> None:
    output = tmp_path / "out" / "answers.parquet"
    part = ShardPart(output, Shard(2, 4))
    assert part.output == shard_output(output, Shard(2, 4)) == tmp_path / "out" / "answers.shards" / (
        "00002-of-00004.parquet")
    assert (part.label, part.bounds(10), part.outputs) == ("2/4", (5, 7), (part.output, output))
    meta: dict[str, Any] = {"rows": 10}
    part.claim(meta)  # no siblings yet: nothing to refuse
    assert meta == {"rows": 10, "shard": [2, 4]}
    whole = WholeJob(output)
    assert (whole.output, whole.label, whole.bounds(10), whole.outputs) == (output, None, (0, 10), (output,))


def test_limit_and_a_shard_are_refused_before_anything_is_opened(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = load_spec(write_spec(tmp_path, api={"base_url": "mock://"}))
    with pytest.raises(ConfigError, match="--limit and --shard do not go together"):
        ShardBackend(Shard(0, 2)).run(spec, RunOptions(limit=1))
    assert not (tmp_path / "out").exists()


class CountingLimiter(RateLimiter):
    """A rate limiter that counts the slots asked of it: the one a backend passed in."""

    def __init__(self) -> None:
        super().__init__(requests_per_minute=None, tokens_per_minute=None)
        self.reserved = 0

    def reserve(self, *args: Any, **kwargs: Any) -> float:
        self.reserved += 1
        return super().reserve(*args, **kwargs)


def test_the_limiter_a_backend_passes_in_paces_every_request(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = load_spec(write_spec(tmp_path, api={"base_url": "mock://"}))
    limiter = CountingLimiter()
    summary = LocalBackend(Limits(rate_limiter=limiter)).run(spec, RunOptions())
    assert (summary.ok, summary.requests, limiter.reserved) == (5, 5, 5)
    assert len(read_output(spec.output)) == 5


def test_run_job_with_a_shard_runs_its_slice_and_the_last_merges(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(7)])
    spec = write_spec(tmp_path, api={"base_url": "mock://"})
    first = run_job(spec, shard=Shard(0, 2))
    assert (first.shard, first.rows, first.merged) == ("0/2", 3, "not merged: shard 1 of 2 not started yet: "
                                                                 "run them, then merge")
    last = run_job(spec, shard=Shard(1, 2))
    assert (last.shard, last.rows) == ("1/2", 4)
    assert last.merged is not None and last.merged.startswith("merged 2 shards: 7 rows, 7 ok")
    assert [row["output_text"] for row in read_output(load_spec(spec).output)] == [
        f"(mock answer) You asked: p{i}" for i in range(7)]


def test_the_engine_imports_neither_backends_nor_tools() -> None:
    imported = set()
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                imported.add(node.module.split(".")[0])
    assert imported and not imported & {"backends", "tools", "_cli", "airflow"}
