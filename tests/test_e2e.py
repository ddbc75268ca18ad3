"""End to end through the real CLI, against the fault-injecting server on 127.0.0.1."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import (
    assert_key_nowhere,
    cli_env,
    kill_9_during_runs,
    paid_twice,
    read_output,
    run_cli,
    start_cli,
    write_jsonl,
    write_spec,
)
from tests.fakeserver import FakeServer, Faults, error_body, request_key

FLAKY = dict(drop_rate=0.02, error_500_rate=0.03, first_attempt_status=503)


def prompts(n: int, tag: str = "p") -> list[dict]:
    return [{"id": f"{tag}{i}", "prompt": f"prompt {tag} number {i}: say something", "group": i % 7} for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [
        {"id": f"c{i}", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}"}],
         "lang": "en" if i % 2 else "fr"}
        for i in range(n)
    ]


def assert_exact_answers(rows: list[dict], server: FakeServer, keys: list[str]) -> None:
    """Every row ok, in input order, with the text and usage of an answer the server sent."""
    assert [r["row_index"] for r in rows] == list(range(len(keys)))
    for row, key in zip(rows, keys):
        assert row["status"] == "ok", row
        sent = {a["id"]: a for a in server.answers[key]}
        answer = sent[row["response_id"]]
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert row["output_text"] == text
        assert row["finish_reason"] == choice["finish_reason"]
        usage = answer["usage"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
        assert row["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert row["error"] is None


def test_flaky_server_every_prompt_answered_exactly(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=1, **FLAKY)
    rows = prompts(1000)  # some 2,100 requests: every fault dozens of times
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    assert "1,000 rows: 1,000 ok, 0 failed" in result.stdout
    out = read_output(tmp_path / "out/result.parquet")
    assert_exact_answers(out, server, [r["prompt"] for r in rows])
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [r["group"] for r in out] == [r["group"] for r in rows]  # passthrough column
    assert all(r["attempts"] >= 2 for r in out)  # every first attempt was a 503
    outcomes = {r.outcome for r in server.requests}
    assert {"drop", "500", "first_attempt", "ok"} <= outcomes


def test_a_server_shedding_load_with_a_retry_after_fails_no_row(tmp_path: Path, server: FakeServer) -> None:
    """Half the answers are 503s naming a wait: with two attempts a row, a row whose 503s
    were spent attempts would fail one time in four."""
    server.faults = Faults(seed=3, error_503_rate=0.5, shed_503=True, retry_after="0.02")
    rows = prompts(30)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, retry={"max_attempts": 2}, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [r["prompt"] for r in rows])
    assert sum(r.outcome == "503" for r in server.requests) > 20


def test_a_first_row_refused_for_its_route_or_model_stops_the_job_after_one_request(
        tmp_path: Path, server: FakeServer) -> None:
    """A wrong base_url path (or model) answers 404 to every row alike: one request says so.
    Rows naming models of their own may each fare otherwise: they go on."""
    server.faults = Faults(status_for=lambda body: (404, {"detail": "Not Found"}))
    write_jsonl(tmp_path / "input.jsonl", prompts(100))
    spec = write_spec(tmp_path, concurrency=16, endpoint="completions", api={"base_url": server.base_url})
    refused = run_cli("run", str(spec), "--no-progress")
    assert refused.code == 3 and len(server.requests) == 1, refused.stderr
    assert "the first row was refused (HTTP 404: Not Found (no such route or model" in refused.stderr
    assert "then rerun with --restart" in refused.stderr and "rerun the same command" not in refused.stderr
    # LiteLLM answers an unknown model with a 400 that says so: the same
    server.faults = Faults(status_for=lambda body: (400, {"error": {"message": "Invalid model name passed in "
                                                                               "model=test-modle"}}))
    refused = run_cli("run", str(spec), "--no-progress", "--restart")
    assert refused.code == 3 and len(server.requests) == 2 and "the first row was refused" in refused.stderr
    write_jsonl(tmp_path / "input.jsonl", [{**row, "model": f"m{i % 3}"} for i, row in enumerate(prompts(20))])
    run_cli("run", str(spec), "--no-progress", "--restart")
    assert len(server.requests) == 2 + 20
    # Without an endpoint in the spec, each row's own fields say where it goes: a chat row may fare otherwise
    write_jsonl(tmp_path / "input.jsonl", prompts(1) + [{"messages": [{"role": "user", "content": f"q{i}"}]}
                                                       for i in range(9)])
    spec = write_spec(tmp_path, concurrency=4, api={"base_url": server.base_url})
    server.faults = Faults(status_for=lambda body: (404, {"detail": "Not Found"}) if "prompt" in body else None)
    assert run_cli("run", str(spec), "--no-progress", "--restart").code == 1
    assert len(server.requests) == 2 + 20 + 10


def test_answers_with_fewer_choices_than_n_are_counted_in_the_summary(tmp_path: Path, server: FakeServer) -> None:
    """llama.cpp's server ignores n: a user who asked for two samples a row is told."""
    one = {"choices": [{"index": 0, "text": "only one", "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    server.faults = Faults(status_for=lambda body: (200, one) if "number 2:" not in body["prompt"] else None)
    write_jsonl(tmp_path / "input.jsonl", prompts(4))
    spec = write_spec(tmp_path, params={"n": 2}, api={"base_url": server.base_url})
    done = run_cli("run", str(spec), "--no-progress")
    assert done.code == 0, done.stderr
    assert "3 answers with fewer choices than n asked for (the server may not do n)" in done.stdout


def test_chat_rows_from_parquet(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=2, **FLAKY)
    rows = chat_rows(1000)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")  # messages: list<struct>
    spec = write_spec(tmp_path, input="input.parquet", api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert_exact_answers(out, server, [request_key(r) for r in rows])
    assert [r["lang"] for r in out] == [r["lang"] for r in rows]
    sent = next(r for r in server.requests if r.outcome == "ok")
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": "be brief"}  # no null struct fields


def test_batch_api_lines_row_max_tokens_wins(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=3, **FLAKY)
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "test-model", "messages": [{"role": "user", "content": f"batch {i}"}], "max_tokens": 5 + i % 3}}
        for i in range(1000)
    ]
    write_jsonl(tmp_path / "input.jsonl", lines)
    spec = write_spec(tmp_path, params={"max_tokens": 100, "temperature": 0}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    keys = [request_key(line["body"]) for line in lines]
    assert_exact_answers(out, server, keys)
    assert [r["id"] for r in out] == [line["custom_id"] for line in lines]
    for line, key in zip(lines, keys):
        assert {a["max_tokens_seen"] for a in server.answers[key]} == {line["body"]["max_tokens"]}
    assert all(r.body["temperature"] == 0 for r in server.requests)  # params still fill the rest


def test_streaming_joins_deltas_and_takes_usage_from_the_last_chunk(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=4, truncated_stream_rate=0.03, truncated_body_rate=0.02, **FLAKY)
    rows = chat_rows(1000)
    write_jsonl(tmp_path / "input.jsonl", rows)
    # A fault on one attempt in ten: 8 attempts make a row that fails them all (1e-7) unseen
    spec = write_spec(tmp_path, params={"stream": True}, api={"base_url": server.base_url},
                      retry={"max_attempts": 8, "backoff_initial_s": 0.01, "backoff_max_s": 0.05})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert_exact_answers(out, server, [request_key(r) for r in rows])
    assert all(r.body["stream"] is True and r.body["stream_options"] == {"include_usage": True} for r in server.requests)
    assert {"truncated_stream", "truncated_body"} <= {r.outcome for r in server.requests}


def test_openai_style_stream_usage_in_extra_chunk(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(usage_style="openai")
    rows = prompts(50)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, params={"stream": True}, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [r["prompt"] for r in rows])


def test_kill_9_three_times_then_resume_loses_and_repeats_nothing(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=5, latency_s=0.02, latency_jitter_s=0.01, drop_rate=0.01, error_503_rate=0.02)
    rows = prompts(4000)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})
    rng = random.Random(5)

    kill_9_during_runs(spec, server, 3, rng, 200, 700)

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert len(out) == 4000
    assert_exact_answers(out, server, [r["prompt"] for r in rows])
    # A kill loses at most the rows the 32 workers held.
    assert paid_twice(server) <= 3 * 32, paid_twice(server)
    print(f"answers paid twice after 3 kills: {paid_twice(server)}")


def test_rejected_rows_fail_with_the_api_message_and_are_not_retried(tmp_path: Path, server: FakeServer) -> None:
    def reject(body: dict):
        if "BAD" in body.get("prompt", ""):
            return 400, error_body("prompt contains a forbidden word", "invalid_request_error", "bad_prompt")
        return None

    server.faults = Faults(status_for=reject)
    rows = [{"prompt": f"row {i} BAD" if i % 10 == 3 else f"row {i}"} for i in range(100)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1, result.stderr
    assert "100 rows: 90 ok, 10 failed" in result.stdout
    out = read_output(tmp_path / "out/result.parquet")
    failed = [r for r in out if r["status"] == "failed"]
    assert [r["row_index"] for r in failed] == [i for i in range(100) if i % 10 == 3]
    assert all(r["error"] == "HTTP 400: prompt contains a forbidden word" and r["attempts"] == 1 for r in failed)
    assert all(server.count(r["prompt"]) == 1 for r in rows)
    assert [r["id"] for r in out] == [str(i) for i in range(100)]  # no id column: the position

    ok_keys = [r["prompt"] for r in rows if "BAD" not in r["prompt"]]
    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 1
    assert all(server.count(k) == 1 for k in ok_keys)  # no ok row requested again
    assert len(read_output(tmp_path / "out/result.parquet")) == 100


def test_bad_input_key_or_spec_exit_2_without_a_request(tmp_path: Path, server: FakeServer) -> None:
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(10)]
    lines[4] = '{"prompt": "p4",'
    write_jsonl(tmp_path / "input.jsonl", lines)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})
    result = run_cli("run", str(spec))
    assert result.code == 2
    assert "input.jsonl: line 5: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr

    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "fine"}])
    result = run_cli("run", str(spec), env=cli_env())
    assert result.code == 2
    assert "OPENAI_API_KEY is not set; export it or set api.api_key_env" in result.stderr

    spec = write_spec(tmp_path, concurency=4, api={"base_url": server.base_url})
    result = run_cli("run", str(spec))
    assert result.code == 2
    assert "concurency: unknown key; did you mean concurrency?" in result.stderr

    assert server.requests == []
    assert not (tmp_path / "out" / "result.batchrun.sqlite").exists()


def test_wrong_key_aborts_within_a_handful_of_requests_and_never_leaks(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(require_key="the-right-key")
    write_jsonl(tmp_path / "input.jsonl", prompts(3000))
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec))

    assert result.code == 3
    assert "HTTP 401" in result.stderr and "check the API key" in result.stderr
    assert len(server.requests) == 1  # the first row goes alone
    assert_key_nowhere(tmp_path, result.stdout, result.stderr)


def test_concurrency_bounds_requests_in_flight(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(latency_s=0.1)
    write_jsonl(tmp_path / "input.jsonl", prompts(200))
    spec = write_spec(tmp_path, concurrency=16, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    assert server.max_in_flight == 16


def test_changed_params_or_input_refuse_to_resume_until_restart(tmp_path: Path, server: FakeServer) -> None:
    write_jsonl(tmp_path / "input.jsonl", prompts(20))
    spec = write_spec(tmp_path, params={"max_tokens": 64}, api={"base_url": server.base_url})
    assert run_cli("run", str(spec), "--no-progress").code == 0

    spec = write_spec(tmp_path, params={"max_tokens": 128}, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "params.max_tokens was 64, now 128" in result.stderr
    assert "--restart" in result.stderr

    spec = write_spec(tmp_path, params={"max_tokens": 64}, api={"base_url": server.base_url})
    write_jsonl(tmp_path / "input.jsonl", prompts(21))
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "the input file's content changed" in result.stderr
    assert len(server.requests) == 20

    result = run_cli("run", str(spec), "--no-progress", "--restart")
    assert result.code == 0, result.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 21


def test_limit_then_full_run_and_status(tmp_path: Path, server: FakeServer) -> None:
    rows = prompts(30)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--limit", "10", "--no-progress")
    assert result.code == 0, result.stderr
    assert [r["id"] for r in read_output(tmp_path / "out/result.parquet")] == [f"p{i}" for i in range(10)]

    status = run_cli("status", str(spec))
    assert status.code == 0
    assert "ok         10" in status.stdout and "remaining  20" in status.stdout
    assert len(server.requests) == 10  # status sends nothing

    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert len(server.requests) == 30
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [r["prompt"] for r in rows])


def test_sigterm_saves_answers_and_exits_3_then_resumes(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(latency_s=0.3)
    rows = prompts(400)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, concurrency=64, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(100, timeout=30)
    proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 3, stderr
    assert time.monotonic() - sent_at < 5
    assert "interrupted by SIGTERM" in stderr
    answered = {k for k, a in server.answers.items() if a}

    assert run_cli("run", str(spec), "--no-progress").code == 0
    assert all(server.count(k) == 1 for k in answered)  # no answer received before the signal is bought again
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [r["prompt"] for r in rows])


def test_a_second_runner_of_the_same_job_is_refused(tmp_path: Path, server: FakeServer) -> None:
    gate = threading.Event()  # the first runner's requests wait until the second was refused
    server.faults = Faults(hold=lambda body: gate)
    write_jsonl(tmp_path / "input.jsonl", prompts(300))
    spec = write_spec(tmp_path, concurrency=8, api={"base_url": server.base_url})
    first = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(1, timeout=30)

    second = run_cli("run", str(spec), "--no-progress")
    gate.set()

    assert second.code == 2
    assert f"this job is already running (pid {first.pid}" in second.stderr
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert len(server.requests) == 300


def test_a_second_signal_stops_at_once_and_the_state_stays_whole(tmp_path: Path, server: FakeServer) -> None:
    gate = threading.Event()  # every answer after the first waits for the test
    server.faults = Faults(hold=lambda body: gate if server.requests else None)
    rows = prompts(300)
    write_jsonl(tmp_path / "input.jsonl", rows)
    spec = write_spec(tmp_path, concurrency=32, api={"base_url": server.base_url})
    proc = start_cli("run", str(spec), "--no-progress")
    server.wait_for_requests(1 + 32, timeout=30)  # the first answer is in; 32 requests are held in flight
    proc.send_signal(signal.SIGTERM)
    with server._cond:  # still held: the first signal only stopped new rows
        assert not server._cond.wait_for(lambda: server.in_flight < 32, timeout=0.2)
    proc.send_signal(signal.SIGINT)
    sent_at = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    gate.set()

    assert proc.returncode == 3, stderr
    assert time.monotonic() - sent_at < 5  # not the 10 s grace
    assert "Traceback" not in stderr

    server.faults = Faults()
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert_exact_answers(read_output(tmp_path / "out/result.parquet"), server, [r["prompt"] for r in rows])


def test_a_csv_input_is_answered_with_its_columns_passed_through(tmp_path: Path, server: FakeServer) -> None:
    lines = ["id,prompt,topic"] + [f'r{i},"prompt, number {i}",topic-{i % 3}' for i in range(200)]
    (tmp_path / "input.csv").write_text("\n".join(lines) + "\n")
    spec = write_spec(tmp_path, input="input.csv", concurrency=16, api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    out = read_output(tmp_path / "out/result.parquet")
    assert [(r["id"], r["topic"]) for r in out] == [(f"r{i}", f"topic-{i % 3}") for i in range(200)]
    assert_exact_answers(out, server, [f"prompt, number {i}" for i in range(200)])
