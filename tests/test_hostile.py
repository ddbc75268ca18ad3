"""End to end against servers that misbehave on purpose and files damaged on purpose.

Each test is one promise a hostile user once broke: whatever a server answers, whatever
is done to the files, a job stores what it can, refuses what it cannot, names the
cause, and never crashes (exit 4) or writes the key anywhere.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    TEST_KEY,
    assert_key_nowhere,
    cli_env,
    paid_twice,
    read_output,
    run_cli,
    start_cli,
    write_jsonl,
    write_spec,
)
from tests.fakeserver import FakeServer, Faults


def http_answer(body: bytes, *, content_type: str = "application/json", **headers: str) -> list[bytes]:
    head = ["HTTP/1.1 200 OK", f"content-type: {content_type}", f"content-length: {len(body)}",
            *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()), "connection: close"]
    return ["\r\n".join(head).encode() + b"\r\n\r\n", body]


def for_prompts(answers: dict[str, Callable[[], Iterator[bytes] | list[bytes]]]) -> Callable[[dict], object]:
    """A raw_answer fault: the prompts named get their raw answer, the others the usual one."""
    return lambda body: answers[body["prompt"]]() if body.get("prompt") in answers else None


def peak_rss_mb(*args: str) -> tuple[int, float, str]:
    """Run the CLI in a child of a fresh interpreter: (exit code, the CLI's peak RSS in MB, stderr)."""
    script = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
              "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
              "sys.stderr.write(p.stderr)")
    proc = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "batchrun", *args],
                          capture_output=True, text=True, cwd=REPO, env=cli_env(OPENAI_API_KEY=TEST_KEY), timeout=300)
    code, peak = proc.stdout.split()
    return int(code), float(peak), proc.stderr


def test_an_answer_holding_a_lone_surrogate_is_stored_and_the_job_finishes(tmp_path: Path,
                                                                             server: FakeServer) -> None:
    odd = b'{"id": "odd", "model": "m", "choices": [{"index": 0, "text": "half \\ud800 a pair", ' \
          b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}}'
    server.faults = Faults(raw_answer=for_prompts({"p1234": lambda: http_answer(odd)}))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(3000)])
    spec = write_spec(tmp_path, concurrency=64, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["ok"] * 3000
    assert (out[1234]["output_text"], out[1234]["total_tokens"]) == ("half \ufffd a pair", 6)
    assert len(server.requests) == 3000  # nothing paid twice


def test_a_stream_splitting_an_emoji_and_usage_beyond_int64_are_stored(tmp_path: Path, server: FakeServer) -> None:
    events = [
        {"id": "s", "choices": [{"index": 0, "text": "smile \ud83d", "finish_reason": None}]},
        {"id": "s", "choices": [{"index": 0, "text": "\ude00", "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 2**64, "completion_tokens": 3, "total_tokens": 2**64 + 3}},
    ]
    # json.dumps writes each half of the pair as its own \\u escape, as such a server does
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    server.faults = Faults(raw_answer=for_prompts({"p1": lambda: http_answer(stream, content_type="text/event-stream")}))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}", "stream": True} for i in range(4)])
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    row = read_output(tmp_path / "out/result.parquet")[1]
    assert (row["status"], row["output_text"]) == ("ok", "smile \U0001F600")
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (None, 3, None)


def test_events_are_read_as_the_standard_says(tmp_path: Path, server: FakeServer) -> None:
    chunk = {"id": "s", "choices": [{"index": 0, "text": "two lines", "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    text = json.dumps(chunk, indent=1)  # one object over several lines
    split = "".join(f"data: {line}\n" for line in text.splitlines()) + "\n"
    doubled = f"data: {json.dumps(chunk)}\ndata: {json.dumps(chunk)}\n\n"
    sse = lambda events: lambda: http_answer(events.encode() + b"data: [DONE]\n\n", content_type="text/event-stream")
    server.faults = Faults(raw_answer=for_prompts({"p1": sse(": hi\nretry: 10\n" + split), "p2": sse(doubled)}))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}", "stream": True} for i in range(3)])
    spec = write_spec(tmp_path, retry={"max_attempts": 2, "backoff_initial_s": 0.01}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert (out[1]["status"], out[1]["output_text"], out[1]["total_tokens"]) == ("ok", "two lines", 3)
    assert (out[2]["status"], out[2]["output_text"], out[2]["attempts"]) == ("failed", None, 2)
    assert "not one JSON object" in out[2]["error"]


@functools.cache
def bomb() -> bytes:
    """1 GB of zeros, gzipped to 1 MB: made when first sent (seconds of work that every
    process collecting the tests would pay otherwise), once per process."""
    # Run-length matching finds the same longest matches in zeros as the default search
    # (the same 1 MB), in two thirds of the time
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)
    return b"".join(packer.compress(bytes(1 << 20)) for _ in range(1024)) + packer.flush()


def endless(head: bytes, chunk: bytes) -> Iterator[bytes]:
    yield head
    while True:
        yield chunk


HUGE = {
    "gzip-bomb": lambda: http_answer(bomb(), content_encoding="gzip"),
    "5-GB-body": lambda: endless(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: 5368709120\r\n\r\n", b"[" * (1 << 20)),
    "endless-stream": lambda: endless(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                      b"transfer-encoding: chunked\r\n\r\n",
                                      b"100000\r\n" + b": keep-alive\n".ljust(1 << 20, b" ") + b"\r\n"),
}


def test_huge_answers_fail_their_attempts_within_the_usual_memory(tmp_path: Path, server: FakeServer) -> None:
    """Every third row meets one of the three; 16 requests in flight."""
    bomb()  # made now, not while the server answers
    kinds = list(HUGE)
    server.faults = Faults(raw_answer=for_prompts({f"p{i}": HUGE[kinds[i // 3 % 3]] for i in range(1, 60, 3)}))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}", "stream": i % 2 == 0} for i in range(60)])
    spec = write_spec(tmp_path, concurrency=16, retry={"max_attempts": 2, "backoff_initial_s": 0.01},
                      api={"base_url": server.base_url})

    code, peak_mb, stderr = peak_rss_mb("run", str(spec), "--no-progress")

    assert code == 1, stderr
    out = read_output(tmp_path / "out/result.parquet")
    failed = [r for r in out if r["status"] == "failed"]
    assert [r["row_index"] for r in failed] == list(range(1, 60, 3))
    assert {r["error"] for r in failed} == {"answer too large: more than 33,554,432 bytes (api.max_answer_mb)"}
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"
    print(f"peak RSS with 20 rows of huge answers: {peak_mb:.0f} MB")


def test_no_piece_of_the_key_reaches_any_file_or_output(tmp_path: Path, server: FakeServer) -> None:
    def refusal(status: int, text: str, content_type: str = "application/json") -> Callable[[], list[bytes]]:
        body = text.encode()
        head = f"HTTP/1.1 {status} Oops\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        return lambda: [head.encode(), body]

    message = lambda text: json.dumps({"error": {"message": text}})
    server.faults = Faults(raw_answer=for_prompts({
        "p1": refusal(400, message("x" * 480 + f" you sent {TEST_KEY}, which is wrong")),
        "p2": refusal(400, message(f"key: {' '.join(TEST_KEY)}")),
        "p3": refusal(400, message(f"key: {TEST_KEY[:11]}\n{TEST_KEY[11:]}")),
        "p4": refusal(500, f"upstream said: Authorization: Bearer {TEST_KEY}", "text/plain"),
    }))
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    spec = write_spec(tmp_path, retry={"max_attempts": 2, "backoff_initial_s": 0.01}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in out] == ["ok", "failed", "failed", "failed", "failed", "ok"]
    assert out[4]["error"].startswith("HTTP 500: upstream said: Authorization: Bearer [redacted]")
    assert_key_nowhere(tmp_path, result.stdout, result.stderr, piece=8)


def versioned(version: str, n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"{version} prompt {i}", "tag": f"{version}-{i}"} for i in range(n)]


def assert_paired(rows: list[dict]) -> None:
    """Each answer quotes the start of its prompt: it must be the prompt of the row's own columns."""
    for row in rows:
        version, index = row["tag"].split("-")
        assert f"'{version} prompt {index}" in row["output_text"], row


def test_an_input_replaced_during_the_run_is_read_as_it_was(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(latency_s=0.02)
    write_jsonl(tmp_path / "input.jsonl", versioned("v1", 6000))
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(1500, timeout=60)
    write_jsonl(tmp_path / "input.new", versioned("v2", 6000))
    (tmp_path / "input.new").replace(tmp_path / "input.jsonl")  # as editors and atomic writers do
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 0, stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert len(out) == 6000 and {r["tag"][:2] for r in out} == {"v1"}
    assert_paired(out)
    assert {r.body["prompt"][:2] for r in server.requests} == {"v1"}


def rewritten_during_a_run(tmp_path: Path, server: FakeServer, rows: int, *, concurrency: int, latency_s: float,
                           after: int) -> tuple[Path, str]:
    """A job of `rows` whose input is rewritten in place (same inode, same size) once the
    server has seen `after` requests; its spec, and what it said as it stopped (exit 3)."""
    server.faults = Faults(latency_s=latency_s)
    write_jsonl(tmp_path / "input.jsonl", versioned("v1", rows))
    spec = write_spec(tmp_path, concurrency=concurrency, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(after, timeout=60)
    write_jsonl(tmp_path / "input.jsonl", versioned("v2", rows))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "input.jsonl: the input file was changed while the job read it" in stderr
    return spec, stderr


def test_an_input_rewritten_in_place_stops_the_job_and_no_answer_is_mispaired(tmp_path: Path,
                                                                               server: FakeServer) -> None:
    spec, stderr = rewritten_during_a_run(tmp_path, server, 6000, concurrency=32, latency_s=0.02, after=1500)

    assert "rerun the same command to resume" not in stderr  # not as it stands: it says what to do
    assert "Traceback" not in stderr
    assert not (tmp_path / "out/result.parquet").exists()
    db = sqlite3.connect(tmp_path / "out/result.batchrun.sqlite")
    saved = db.execute("SELECT row_index, output_text FROM results WHERE status = 'ok'").fetchall()
    db.close()
    assert saved
    assert_paired([{"tag": f"v1-{i}", "output_text": text} for i, text in saved])

    server.faults = Faults()  # slow answers only kept the first run going until the rewrite
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2 and "the input file's content changed" in result.stderr
    result = run_cli("run", str(spec), "--no-progress", "--restart")
    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert {r["tag"][:2] for r in out} == {"v2"}
    assert_paired(out)


def test_a_small_input_rewritten_in_place_stops_the_job_soon_not_at_its_end(tmp_path: Path,
                                                                             server: FakeServer) -> None:
    """A small input is read once, before the first request: a change is seen by its size
    or time within seconds, not after every row was paid for into a state the next run refuses."""
    rewritten_during_a_run(tmp_path, server, 200, concurrency=2, latency_s=0.5, after=1)  # 50 s of answers

    assert len(server.requests) < 200  # stopped within seconds of the change (5 s checks), not 50


def damage_overwrite_middle(state: Path) -> None:
    data = bytearray(state.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8192] = bytes(range(256)) * 32
    state.write_bytes(bytes(data))


def damage_other_program(state: Path) -> None:
    state.unlink()
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()


def damage_edited_meta(state: Path) -> None:
    db = sqlite3.connect(state)
    db.execute("UPDATE meta SET value = '\"many\"' WHERE key = 'rows'")
    db.commit()
    db.close()


DAMAGE = {
    "cut-to-0-bytes": (lambda state: state.write_bytes(b""), "it is empty (0 bytes)"),
    "garbage": (lambda state: state.write_bytes(b"\x00garbage" * 4096), "SQLite cannot read it"),
    "overwritten-in-the-middle": (damage_overwrite_middle, "SQLite"),  # finds it damaged, or cannot read it
    "another-program": (damage_other_program, "it is a SQLite database, but not a batchrun state (tables: notes)"),
    "edited-meta": (damage_edited_meta, "its metadata was edited or damaged (rows)"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_state_is_named_before_any_request_and_restart_recovers(tmp_path: Path, server: FakeServer,
                                                                         damage: str) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i} " + "words " * 40} for i in range(600)])
    spec = write_spec(tmp_path, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress", "--limit", "500").code == 0
    state = tmp_path / "out/result.batchrun.sqlite"
    do, message = DAMAGE[damage]
    do(state)
    server.reset_stats()

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 2, result.stderr
    assert f"{state} is not a usable batchrun state: {message}" in result.stderr
    assert "rerun with --restart to discard it and start over" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.requests == []
    assert run_cli("status", str(spec)).code == 2  # status says the same, and sends nothing
    result = run_cli("run", str(spec), "--no-progress", "--restart")
    assert result.code == 0, result.stderr
    assert len(server.requests) == 600 and len(read_output(tmp_path / "out/result.parquet")) == 600


@pytest.mark.parametrize(("suffix", "message"), [
    ("-wal", "result.batchrun.sqlite-wal: the state's write-ahead log was removed while the job ran; "
             "every answer saved so far was copied from it into the state"),
    (".lock", "result.batchrun.sqlite.lock: the job's lock file was removed or replaced while the job ran"),
])
def test_a_state_companion_removed_under_a_running_job_is_noticed(tmp_path: Path, server: FakeServer,
                                                                  suffix: str, message: str) -> None:
    server.faults = Faults(latency_s=0.02)
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(3000)])
    spec = write_spec(tmp_path, concurrency=16, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(400, timeout=60)
    (tmp_path / f"out/result.batchrun.sqlite{suffix}").unlink()
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 3, stderr
    assert message in stderr and "Traceback" not in stderr
    server.faults = Faults()  # slow answers only kept the first run going until the removal
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 3000
    assert paid_twice(server) <= 16, paid_twice(server)  # the rows the workers held when it was noticed


def test_files_that_hold_answers_are_private_whatever_the_umask(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, output="made/by/batchrun/result.parquet", api={"base_url": server.base_url})
    proc = subprocess.run(["sh", "-c", f'umask 000 && exec "{sys.executable}" -m batchrun run "{spec}" --no-progress'],
                          capture_output=True, text=True, cwd=REPO, env=cli_env(OPENAI_API_KEY=TEST_KEY), timeout=60)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "made/by/batchrun"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"result.parquet": 0o600, "result.batchrun.sqlite": 0o600, "result.batchrun.sqlite.lock": 0o600,
                     "result.status.json": 0o600}
    # Every folder it made, not only the last (mkdir's parents take the umask's mode)
    for made in (folder, folder.parent, folder.parent.parent):
        assert made.stat().st_mode & 0o777 == 0o700, made  # the -wal and -shm: tests/test_state.py


def test_another_jobs_temporary_output_is_left_alone(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    spec = write_spec(tmp_path, output="out/x.parquet", api={"base_url": server.base_url})
    theirs = tmp_path / "out/.x.parquet.parquet.4242.tmp"  # the job writing x.parquet.parquet, running
    mine = tmp_path / "out/.x.parquet.4243.tmp"  # this job's, from a run killed while writing
    theirs.parent.mkdir()
    theirs.write_bytes(b"theirs")
    mine.write_bytes(b"mine")

    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert theirs.read_bytes() == b"theirs" and not mine.exists()


def on_a_small_disk(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh) with tmp_path/out on a fresh 20 MB file system of its own, in a mount
    namespace: as root, or as any user where user namespaces are allowed."""
    mount = f'mount -t tmpfs -o size=20m tmpfs "{tmp_path}/out" && '
    return subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", mount + script],
                          capture_output=True, text=True, cwd=REPO, env=cli_env(OPENAI_API_KEY=TEST_KEY),
                          timeout=120)


FILL = 'head -c 30m /dev/zero > "{out}/filler" 2>/dev/null; '
RUN = '"{python}" -m batchrun run "{spec}" --no-progress {flags}; echo "exit $?" >&2; '


def test_a_full_disk_at_the_start_or_on_a_rerun_is_exit_3_before_any_request(tmp_path: Path,
                                                                             server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": f"p{i}"} for i in range(50)])
    spec = write_spec(tmp_path, api={"base_url": server.base_url})
    (tmp_path / "out").mkdir()
    fill, run = FILL.format(out=tmp_path / "out"), RUN.format(python=sys.executable, spec=spec, flags="")

    proc = on_a_small_disk(tmp_path, fill + run)

    assert "exit 3" in proc.stderr, proc.stderr
    assert "the disk is full" in proc.stderr or "MB free" in proc.stderr
    assert "Traceback" not in proc.stderr and server.requests == []

    limited = RUN.format(python=sys.executable, spec=spec, flags="--limit 20")
    proc = on_a_small_disk(tmp_path, limited + fill + run)

    first, rerun = proc.stderr.split("exit 0")
    assert "20 rows: 20 ok" in proc.stdout
    assert "exit 3" in rerun and "MB free; batchrun needs at least 16 MB there" in rerun, proc.stderr
    assert "no request was sent" in rerun and "Traceback" not in rerun
    assert len(server.requests) == 20


@pytest.mark.parametrize("line", [
    '{"prompt": "half of a pair: \\ud83d"}',
    '{"id": "\\udc00", "prompt": "fine"}',
    '{"prompt": "fine", "note": "\\ud800"}',
    '{"prompt": "fine", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
], ids=["prompt", "id", "passthrough", "100,000-deep"])
def test_a_row_no_request_can_carry_is_exit_2_naming_its_line_before_any_request(
    tmp_path: Path, server: FakeServer, line: str
) -> None:
    lines = [json.dumps({"prompt": f"p{i}", "note": "n"}) for i in range(7)] + [line, '{"prompt": "p9"}']
    write_jsonl(tmp_path / "input.jsonl", lines)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 2, result.stderr
    assert "input.jsonl: line 8: " in result.stderr and "Traceback" not in result.stderr
    assert server.requests == []
    assert list((tmp_path / "out").iterdir()) == []  # no state, no lock: nothing was begun
