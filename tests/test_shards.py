"""Shards: N processes run one job together; `merge` (or the last shard) makes its output."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.backends.layout import Shard
from tests.conftest import kill_9, paid_twice, read_output, run_cli, start_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults
from tests.test_remote import _bucket, _env, _put_jsonl, s3  # noqa: F401 (s3: the fixture)


@pytest.mark.parametrize("rows", [0, 1, 3, 7, 20_000, 20_003])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_cover_every_row_once_in_order(rows: int, count: int) -> None:
    covered = [i for index in range(count) for i in range(*Shard(index, count).bounds(rows))]
    assert covered == list(range(rows))


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1/0", "1", "a/b", "1/4/2"])
def test_a_shard_is_written_i_of_n(text: str) -> None:
    with pytest.raises(ValueError):
        Shard.parse(text)


def _prompt_index(body: dict) -> int:
    return int(body["prompt"].split()[1])


@pytest.mark.slow
def test_four_shards_at_once_with_faults_and_kills_merge_every_row_once_in_order(
        tmp_path: Path, server: FakeServer) -> None:
    rows = 20_000
    server.faults = Faults(seed=11, error_503_rate=0.02, drop_rate=0.01, latency_s=0.002)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}", "n_in": i} for i in range(rows)])
    spec = write_spec(tmp_path, concurrency=16, api={"base_url": server.base_url})
    victim = Shard(2, 4)
    start, stop = victim.bounds(rows)

    def sent_by_victim() -> int:
        return sum(start <= _prompt_index(r.body) < stop for r in list(server.requests))

    others = [start_cli("run", str(spec), "--shard", f"{i}/4", "--no-progress") for i in (0, 1, 3)]
    for kill in range(2):  # shard 2 is killed with kill -9 twice, mid-run
        proc = start_cli("run", str(spec), "--shard", str(victim), "--no-progress")
        target = sent_by_victim() + 300 + 200 * kill
        deadline = time.monotonic() + 60
        while sent_by_victim() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_9(proc)
    outs = [proc.communicate(timeout=120) for proc in others]
    assert [proc.returncode for proc in others] == [0, 0, 0], outs
    assert not (tmp_path / "out/result.parquet").exists()  # shard 2 has not finished

    result = run_cli("run", str(spec), "--shard", str(victim), "--no-progress")  # last to finish: merges

    assert result.code == 0, result.stderr
    assert "merged 4 shards: 20,000 rows, 20,000 ok" in result.stdout
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in out] == list(range(rows))
    assert [r["n_in"] for r in out] == list(range(rows))
    for row in out:
        assert row["status"] == "ok"
        assert row["output_text"] in {a["choices"][0]["text"] for a in server.answers[f"row {row['row_index']}"]}
    assert paid_twice(server) <= 2 * 16, paid_twice(server)  # a kill costs at most the victim's requests in flight
    status = json.loads(run_cli("status", str(spec), "--json").stdout)
    assert status["state"] == "finished" and status["ok"] == rows and status["shard_count"] == 4
    assert status["exit_code"] == 0  # the job's, as for a run in one process
    assert [s["shard"] for s in status["shards"]] == ["0/4", "1/4", "2/4", "3/4"]


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"row {i}", "tag": i} for i in range(30)])
    return write_spec(tmp_path, api={"base_url": "mock://"})


@pytest.mark.slow
def test_merge_waits_for_every_shard_and_names_the_missing(sharded: Path) -> None:
    first = run_cli("run", str(sharded), "--shard", "0/3", "--no-progress")
    assert first.code == 0, first.stderr
    assert "not merged: shards 1, 2 of 3 not started" in first.stdout

    merged = run_cli("merge", str(sharded))

    assert merged.code == 3
    assert "shards 1, 2 of 3 not started" in merged.stderr
    assert not (sharded.parent / "out/result.parquet").exists()
    status = json.loads(run_cli("status", str(sharded), "--json").stdout)
    assert status["state"] == "stopped" and status["reason"] == "shards 1, 2 of 3 not started"
    assert status["exit_code"] is None  # the job is not over
    assert status["shards"][0]["state"] == "finished" and status["shards"][0]["rows"] == 10


@pytest.mark.slow
def test_merge_makes_one_file_or_a_dataset_folder_in_input_order(sharded: Path) -> None:
    for i in (2, 0, 1):
        assert run_cli("run", str(sharded), "--shard", f"{i}/3", "--no-merge", "--no-progress").code == 0
    assert not (sharded.parent / "out/result.parquet").exists()

    file = run_cli("merge", str(sharded))
    folder = run_cli("merge", str(sharded), "--dataset")

    assert file.code == 0 and folder.code == 0, (file.stderr, folder.stderr)
    one = read_output(sharded.parent / "out/result.parquet")
    assert [r["tag"] for r in one] == list(range(30)) and [r["row_index"] for r in one] == list(range(30))
    parts = sorted(p.name for p in (sharded.parent / "out/result").iterdir())
    assert parts == ["part-00000-of-00003.parquet", "part-00001-of-00003.parquet", "part-00002-of-00003.parquet"]
    assert pq.read_table(sharded.parent / "out/result").to_pylist() == one


@pytest.mark.slow
def test_shards_of_another_n_or_a_changed_spec_never_mix(sharded: Path) -> None:
    assert run_cli("run", str(sharded), "--shard", "0/3", "--no-progress").code == 0

    other_n = run_cli("run", str(sharded), "--shard", "1/4", "--no-progress")
    assert other_n.code == 2
    assert "holds shards of 3 (not 4)" in other_n.stderr

    text = sharded.read_text().replace("test-model", "other-model")
    sharded.write_text(text)
    changed = run_cli("run", str(sharded), "--shard", "1/3", "--no-progress")
    assert changed.code == 2
    assert 'request.model was "test-model", now "other-model"' in changed.stderr
    merged = run_cli("merge", str(sharded))
    assert merged.code == 2 and 'request.model was "test-model", now "other-model"' in merged.stderr


@pytest.mark.slow
def test_a_job_begun_in_shards_is_never_run_whole_nor_one_run_whole_in_shards(sharded: Path) -> None:
    """Either would pay for every row again, and its output would take the other's place."""
    import shutil

    for index in range(3):
        assert run_cli("run", str(sharded), "--shard", f"{index}/3", "--no-progress").code == 0
    merged = sharded.parent / "out/result.parquet"
    made = merged.read_bytes()
    for extra in ([], ["--limit", "5"], ["--restart"]):
        whole = run_cli("run", str(sharded), "--no-progress", *extra)
        assert whole.code == 2, whole.stdout
        assert "out/result.shards holds this job's progress in 3 shards: run it with --shard I/3" in whole.stderr
        assert " requests " not in whole.stdout
    assert merged.read_bytes() == made  # not replaced, nor moved aside
    assert sum(json.loads(run_cli("status", str(sharded), "--json").stdout)[key] for key in ("ok",)) == 30

    shutil.rmtree(sharded.parent / "out/result.shards")
    assert run_cli("run", str(sharded), "--no-progress").code == 0
    sharded_after = run_cli("run", str(sharded), "--shard", "0/2", "--no-progress")
    assert sharded_after.code == 2
    assert "result.batchrun.sqlite holds this job's progress run whole: run it without --shard" in sharded_after.stderr
    assert not (sharded.parent / "out/result.shards/00000-of-00002.batchrun.sqlite").exists()


@pytest.mark.slow
def test_limit_and_shard_do_not_go_together(sharded: Path) -> None:
    result = run_cli("run", str(sharded), "--shard", "0/3", "--limit", "5", "--no-progress")
    assert result.code == 2 and "--limit and --shard" in result.stderr


@pytest.mark.slow
def test_a_shard_state_killed_before_it_began_is_waited_for(sharded: Path) -> None:
    from batchrun.storage.state import StateStore

    assert run_cli("run", str(sharded), "--shard", "0/2", "--no-progress").code == 0
    folder = sharded.parent / "out/result.shards"
    StateStore.open(folder / "00001-of-00002.batchrun.sqlite").close()  # made, never claimed

    merged = run_cli("merge", str(sharded))

    assert merged.code == 3 and "shard 1 (not begun)" in merged.stderr, merged.stderr


def _run_shards(spec: Path, count: int) -> None:
    for i in range(count):
        result = run_cli("run", str(spec), "--shard", f"{i}/{count}", "--no-merge", "--no-progress")
        assert result.code == 0, result.stderr


def _damage(part: Path, how: str) -> None:
    data = part.read_bytes()
    if how == "truncated":
        part.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        part.write_bytes(bytes(len(data)))
    elif how == "zeroed inside":  # the footer still reads: only its pages are broken
        part.write_bytes(data[:4] + bytes(2000) + data[2004:])
    else:
        part.write_bytes(random.Random(how).randbytes(len(data)))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "zeroed", "zeroed inside", "garbage"])
@pytest.mark.parametrize("dataset", [False, True])
def test_merge_remakes_a_damaged_part_from_its_shard_state(sharded: Path, how: str, dataset: bool) -> None:
    _run_shards(sharded, 3)
    assert run_cli("merge", str(sharded)).code == 0
    expected = read_output(sharded.parent / "out/result.parquet")
    part = sharded.parent / "out/result.shards/00001-of-00003.parquet"
    _damage(part, how)

    merged = run_cli("merge", str(sharded), *(["--dataset"] if dataset else []))

    assert merged.code == 0, merged.stderr
    assert "merged 3 shards: 30 rows, 30 ok" in merged.stdout
    assert "remade the part of shard 1/3 from its state" in merged.stdout
    assert read_output(part) == expected[10:20]
    assert read_output(sharded.parent / ("out/result" if dataset else "out/result.parquet")) == expected


@pytest.mark.slow
def test_the_last_shard_merges_past_a_damaged_part(sharded: Path) -> None:
    for i in (0, 1):
        assert run_cli("run", str(sharded), "--shard", f"{i}/3", "--no-progress").code == 0
    _damage(sharded.parent / "out/result.shards/00000-of-00003.parquet", "truncated")

    last = run_cli("run", str(sharded), "--shard", "2/3", "--no-progress")

    assert last.code == 0, last.stderr
    assert "merged 3 shards: 30 rows, 30 ok" in last.stdout and "remade the part of shard 0/3" in last.stdout
    out = read_output(sharded.parent / "out/result.parquet")
    assert [r["tag"] for r in out] == list(range(30)) and all(r["status"] == "ok" for r in out)


@pytest.mark.slow
def test_a_part_whose_input_changed_names_the_part_and_the_command(sharded: Path) -> None:
    _run_shards(sharded, 3)
    part = sharded.parent / "out/result.shards/00001-of-00003.parquet"
    _damage(part, "garbage")
    write_jsonl(sharded.parent / "input.jsonl", [{"prompt": f"row {i}", "tag": -i} for i in range(30)])

    merged = run_cli("merge", str(sharded))

    assert merged.code == 2, merged.stderr
    assert f"{part}: shard 1/3's part is damaged" in merged.stderr
    assert "the input is not the one the shard ran with" in merged.stderr
    assert f"batchrun run {sharded} --shard 1/3" in merged.stderr
    assert "Traceback" not in merged.stderr and not (sharded.parent / "out/result.parquet").exists()


@pytest.mark.slow
def test_a_part_without_its_state_names_the_part_and_the_command(sharded: Path) -> None:
    _run_shards(sharded, 3)
    folder = sharded.parent / "out/result.shards"
    (folder / "00002-of-00003.batchrun.sqlite").unlink()

    merged = run_cli("merge", str(sharded))

    assert merged.code == 2, merged.stderr
    assert f"{folder / '00002-of-00003.parquet'}: shard 2/3's part has no state beside it" in merged.stderr
    assert f"batchrun run {sharded} --shard 2/3" in merged.stderr
    again = run_cli("run", str(sharded), "--shard", "2/3", "--no-progress")  # the command said: it merges
    assert again.code == 0 and "merged 3 shards: 30 rows, 30 ok" in again.stdout, again.stdout


@pytest.mark.slow
def test_a_damaged_part_on_the_store_is_remade_and_uploaded(tmp_path: Path, s3: dict[str, str]) -> None:  # noqa: F811
    fs = _bucket(s3, "damaged")
    _put_jsonl(fs, "damaged/in.jsonl", [{"prompt": f"row {i}", "i": i} for i in range(40)])
    spec = write_spec(tmp_path, input="s3://damaged/in.jsonl", output="s3://damaged/out/a.parquet",
                      api={"base_url": "mock://"})
    for i in (0, 1):
        ran = run_cli("run", str(spec), "--shard", f"{i}/2", "--no-merge", "--no-progress",
                      env=_env(s3, tmp_path / "w"))
        assert ran.code == 0, ran.stderr
    with fs.open_output_stream("damaged/out/a.shards/00001-of-00002.parquet") as f:
        f.write(b"PAR1 not a part at all")

    merged = run_cli("merge", str(spec), env=_env(s3, tmp_path / "fresh"))  # another machine

    assert merged.code == 0, merged.stderr
    assert "remade the part of shard 1/2 from its state" in merged.stdout
    assert [r["i"] for r in pq.read_table("s3://damaged/out/a.parquet").to_pylist()] == list(range(40))
    assert [r["i"] for r in pq.read_table("s3://damaged/out/a.shards/00001-of-00002.parquet").to_pylist()] == \
        list(range(20, 40))
