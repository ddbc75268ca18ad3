"""Input, output and state on object storage: a real S3 server (moto's) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import TEST_KEY, cli_env, kill_9, run_cli, start_cli, write_spec
from tests.fakeserver import FakeServer, Faults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server in its own process; the environment any S3 client reads."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1"}
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for pyarrow in this process
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def _bucket(s3: dict[str, str], name: str) -> pafs.FileSystem:
    urllib.request.urlopen(urllib.request.Request(f"{s3['AWS_ENDPOINT_URL']}/{name}", method="PUT")).read()
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}/")
    return fs


def _put_jsonl(fs: pafs.FileSystem, path: str, rows: list[dict]) -> None:
    with fs.open_output_stream(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())


def _env(s3: dict[str, str], work: Path) -> dict[str, str]:
    return cli_env(OPENAI_API_KEY=TEST_KEY, BATCHRUN_WORK_DIR=str(work), **s3)


def test_a_job_killed_on_one_machine_resumes_on_another_from_the_store(
        tmp_path: Path, s3: dict[str, str], server: FakeServer) -> None:
    rows, interval = 4000, 1.0
    server.faults = Faults(seed=3, latency_s=0.004, error_503_rate=0.02)
    fs = _bucket(s3, "kill")
    _put_jsonl(fs, "kill/in/part-0.jsonl", [{"prompt": f"row {i}", "i": i} for i in range(2000)])
    _put_jsonl(fs, "kill/in/part-1.jsonl", [{"prompt": f"row {i}", "i": i} for i in range(2000, rows)])
    spec = write_spec(tmp_path, input="s3://kill/in/part-*.jsonl", output="s3://kill/out/answers.parquet",
                      concurrency=8, checkpoint={"interval_s": interval}, api={"base_url": server.base_url})

    first = start_cli("run", str(spec), "--no-progress", env=_env(s3, tmp_path / "machine-1"))
    started = time.monotonic()
    while len(server.requests) < 2500 or time.monotonic() - started < 2.5 * interval:
        assert first.poll() is None, first.communicate()
        time.sleep(0.01)
    killed = kill_9(first).at
    answered_before = {r.key for r in list(server.requests) if r.outcome == "ok"}
    assert fs.get_file_info("kill/out/answers.batchrun.sqlite").type == pafs.FileType.File  # uploaded meanwhile
    assert fs.get_file_info("kill/out/answers.parquet").type == pafs.FileType.NotFound

    # A new machine: an empty working folder, nothing but the spec and the store
    second = run_cli("run", str(spec), "--no-progress", env=_env(s3, tmp_path / "machine-2"))

    assert second.code == 0, second.stderr
    assert "output: s3://kill/out/answers.parquet" in second.stdout
    out = pq.read_table("s3://kill/out/answers.parquet").to_pylist()
    assert [r["row_index"] for r in out] == list(range(rows)) and [r["i"] for r in out] == list(range(rows))
    for row in out:
        assert row["output_text"] in {a["choices"][0]["text"] for a in server.answers[f"row {row['row_index']}"]}
    paid_at: dict[str, list[float]] = {}
    for r in server.requests:
        if r.outcome == "ok":
            paid_at.setdefault(r.key, []).append(r.at)
    twice = {key: times for key, times in paid_at.items() if len(times) > 1}
    # Paid twice: only answers that arrived after the last upload before the kill (an
    # upload takes a moment: a second of slack)
    assert all(times[0] >= killed - interval - 1.0 for times in twice.values()), \
        sorted(killed - times[0] for times in twice.values())[-5:]
    assert len(twice) < len(answered_before) / 2, (len(twice), len(answered_before))
    status = json.loads(run_cli("status", str(spec), "--json", env=_env(s3, tmp_path / "machine-3")).stdout)
    assert status["state"] == "finished" and status["ok"] == rows
    assert status["output"] == "s3://kill/out/answers.parquet"


def test_the_newest_state_wins_whichever_machine_wrote_it(tmp_path: Path, s3: dict[str, str]) -> None:
    fs = _bucket(s3, "newest")
    _put_jsonl(fs, "newest/in.jsonl", [{"prompt": f"row {i}"} for i in range(30)])
    spec = write_spec(tmp_path, input="s3://newest/in.jsonl", output="s3://newest/out/a.parquet",
                      api={"base_url": "mock://"})
    one, two = _env(s3, tmp_path / "one"), _env(s3, tmp_path / "two")

    assert run_cli("run", str(spec), "--limit", "10", "--no-progress", env=one).code == 0
    later = run_cli("run", str(spec), "--limit", "20", "--no-progress", env=two)  # resumes machine one's 10
    assert later.code == 0 and "20 rows: 20 ok" in later.stdout and "10 requests" in later.stdout
    again = run_cli("run", str(spec), "--no-progress", env=one)  # machine one's own copy is older now

    assert again.code == 0 and "10 requests" in again.stdout, again.stdout
    assert pq.read_table("s3://newest/out/a.parquet").num_rows == 30


def test_urls_a_store_cannot_answer_are_said_before_any_request(tmp_path: Path, s3: dict[str, str]) -> None:
    _bucket(s3, "present")
    spec = write_spec(tmp_path, input="s3://present/missing-*.jsonl", output="s3://present/out/a.parquet",
                      api={"base_url": "mock://"})
    result = run_cli("run", str(spec), "--no-progress", env=_env(s3, tmp_path / "w"))
    assert result.code == 2
    assert "s3://present/missing-*.jsonl: no input file matches this pattern" in result.stderr


def test_shards_on_two_machines_merge_through_the_store(tmp_path: Path, s3: dict[str, str],
                                                       server: FakeServer) -> None:
    server.faults = Faults(latency_s=0.02)  # long enough for uploads while the shards run
    fs = _bucket(s3, "shards")
    _put_jsonl(fs, "shards/in.jsonl", [{"prompt": f"row {i}", "i": i} for i in range(50)])
    spec = write_spec(tmp_path, input="s3://shards/in.jsonl", output="s3://shards/out/a.parquet", concurrency=2,
                      checkpoint={"interval_s": 0.1}, api={"base_url": server.base_url})

    first = run_cli("run", str(spec), "--shard", "1/2", "--no-progress", env=_env(s3, tmp_path / "one"))
    second = run_cli("run", str(spec), "--shard", "0/2", "--no-progress", env=_env(s3, tmp_path / "two"))

    assert first.code == 0 and "not merged: shard 0 of 2 not started" in first.stdout, first.stdout
    assert second.code == 0 and "merged 2 shards: 50 rows, 50 ok" in second.stdout, second.stdout
    assert "s3://shards/out/a.parquet" in second.stdout
    assert [r["i"] for r in pq.read_table("s3://shards/out/a.parquet").to_pylist()] == list(range(50))
    folder = run_cli("merge", str(spec), "--dataset", env=_env(s3, tmp_path / "three"))
    assert folder.code == 0, folder.stderr
    parts = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector("shards/out/a")))
    assert parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]


def test_plan_and_export_on_a_fresh_machine_read_the_store(tmp_path: Path, s3: dict[str, str]) -> None:
    fs = _bucket(s3, "fresh")
    _put_jsonl(fs, "fresh/in.jsonl", [{"prompt": f"row {i}"} for i in range(12)])
    spec = write_spec(tmp_path, input="s3://fresh/in.jsonl", output="s3://fresh/out/a.parquet",
                      api={"base_url": "mock://"})
    assert run_cli("run", str(spec), "--limit", "5", "--no-progress", env=_env(s3, tmp_path / "one")).code == 0

    plan = run_cli("plan", str(spec), "--json", env=_env(s3, tmp_path / "two"))
    assert plan.code == 0, plan.stderr
    assert json.loads(plan.stdout)["rows"] == 7  # the 5 answered on machine one are left out
    assert run_cli("run", str(spec), "--no-progress", env=_env(s3, tmp_path / "one")).code == 0
    exported = run_cli("export", str(spec), "--format", "sft", str(tmp_path / "sft.jsonl"),
                       env=_env(s3, tmp_path / "three"))
    assert exported.code == 0, exported.stderr
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 12


def test_vectors_settled_on_one_machine_are_in_the_output_written_on_another(
        tmp_path: Path, s3: dict[str, str], server: FakeServer) -> None:
    """A machine's vectors live in a file beside its state; the state it uploads holds them itself."""
    from tests.fakeserver import fake_vector

    fs = _bucket(s3, "vectors")
    texts = [f"passage {i}" for i in range(120)]
    _put_jsonl(fs, "vectors/in.jsonl", [{"input": t} for t in texts])
    spec = write_spec(tmp_path, input="s3://vectors/in.jsonl", output="s3://vectors/out/emb.parquet",
                      endpoint="embeddings", inputs_per_request=8, concurrency=4, api={"base_url": server.base_url})

    first = run_cli("run", str(spec), "--no-progress", "--limit", "40", env=_env(s3, tmp_path / "machine-1"))
    assert first.code == 0, first.stderr
    assert [p.name for p in (tmp_path / "machine-1").rglob("*-vectors")] == ["emb.batchrun.sqlite-vectors"]
    uploaded = tmp_path / "uploaded.sqlite"
    with fs.open_input_stream("vectors/out/emb.batchrun.sqlite") as f:
        uploaded.write_bytes(f.read())
    db = sqlite3.connect(uploaded)
    assert db.execute("SELECT typeof(embedding), COUNT(*) FROM results GROUP BY 1").fetchall() == [("blob", 40)]
    db.close()
    embedded_first = sum(len(json.loads(r.key)[1]) for r in server.requests if r.outcome == "ok")
    assert embedded_first == 40

    second = run_cli("run", str(spec), "--no-progress", env=_env(s3, tmp_path / "machine-2"))

    assert second.code == 0, second.stderr
    out = pq.read_table("s3://vectors/out/emb.parquet").to_pylist()
    assert [r["row_index"] for r in out] == list(range(120))
    assert [r["embedding"] for r in out] == [fake_vector(t) for t in texts]
    embedded = [t for r in server.requests if r.outcome == "ok" for t in json.loads(r.key)[1]]
    assert sorted(embedded) == sorted(texts)  # the first machine's 40 were not sent again
