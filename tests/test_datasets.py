"""Datasets in, end to end: templates over columns, many files as one table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_output, run_cli, write_jsonl, write_spec
from tests.fakeserver import FakeServer, Faults

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Context: {{ context }}\nQuestion: {{ question }}"},
]


def qa_table(n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "question": [f"what is {i}?" for i in range(start, start + n)],
        "context": [f"{i} is a number" for i in range(start, start + n)],
        "gold": pa.array(range(start, start + n), pa.int32()),
    })


def rendered_key(row: dict) -> str:
    """The fake server's key for the messages this row should have been sent."""
    return json.dumps([{"role": "system", "content": "Answer from the context."},
                       {"role": "user", "content": f"Context: {row['context']}\nQuestion: {row['question']}"}],
                      sort_keys=True)


def test_a_template_renders_every_row_and_the_columns_pass_through(tmp_path: Path, server: FakeServer) -> None:
    server.faults = Faults(seed=3, error_500_rate=0.05)
    pq.write_table(qa_table(1000), tmp_path / "qa.parquet")
    spec = write_spec(tmp_path, input="qa.parquet", template={"messages": MESSAGES}, concurrency=16,
                      api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["row_index"] for r in rows] == list(range(1000))
    for row in rows:
        key = rendered_key(row)
        served = {a["id"]: a for a in server.answers[key]}
        assert row["output_text"] == served[row["response_id"]]["choices"][0]["message"]["content"]
        assert (row["question"], row["context"], row["gold"]) == (
            f"what is {row['row_index']}?", f"{row['row_index']} is a number", row["row_index"])
    assert pq.read_schema(tmp_path / "out/result.parquet").field("gold").type == pa.int32()
    assert all(r.body["messages"][0]["content"] == "Answer from the context." for r in server.requests)

    # Another template is another configuration: no mixing with the answers saved
    changed = [MESSAGES[0], {"role": "user", "content": "Q: {{ question }}"}]
    spec = write_spec(tmp_path, input="qa.parquet", template={"messages": changed}, api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "template" in result.stderr and "--restart" in result.stderr


def test_a_template_naming_a_column_the_input_lacks_exits_2_before_any_request(
        tmp_path: Path, server: FakeServer) -> None:
    pq.write_table(qa_table(50), tmp_path / "qa.parquet")
    spec = write_spec(tmp_path, input="qa.parquet", api={"base_url": server.base_url}, template={
        "messages": [{"role": "user", "content": "{{ question }} {{ no_such_column }}"}]})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 2
    assert "qa.parquet: row 0: template.messages[0].content uses column 'no_such_column'" in result.stderr
    assert "(its columns: context, gold, question)" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.requests == []

    # A value that is null on one row, far into a second file: that file and row are named
    pq.write_table(qa_table(50), tmp_path / "qa-1.parquet")
    late = qa_table(50, start=50).to_pylist()
    late[37]["context"] = None
    pq.write_table(pa.Table.from_pylist(late), tmp_path / "qa-2.parquet")
    spec = write_spec(tmp_path, input="qa-*.parquet", template={"messages": MESSAGES},
                      api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "qa-2.parquet: row 37: template.messages[1].content uses column 'context'" in result.stderr
    assert server.requests == []


@pytest.mark.slow
def test_a_csv_whose_quote_never_closes_exits_2_before_any_request(tmp_path: Path, server: FakeServer) -> None:
    lines = ["prompt,tag"] + [f"question {i},t{i}" for i in range(40)]
    lines[6] = 'question 5,"t5'  # read as is, the job answered 6 rows and exited 0
    (tmp_path / "input.csv").write_text("\n".join(lines) + "\n")
    spec = write_spec(tmp_path, input="input.csv", api={"base_url": server.base_url})

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 2
    assert "input.csv: line 7: a quote opens here and never closes" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.requests == []
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_a_glob_and_a_list_read_as_one_table_and_resume_across_files(tmp_path: Path, server: FakeServer) -> None:
    (tmp_path / "data").mkdir()
    for part in range(3):
        write_jsonl(tmp_path / "data" / f"part-{part}.jsonl",
                    [{"id": f"r{part}-{i}", "prompt": f"part {part} row {i}", "part": part} for i in range(40)])
    spec = write_spec(tmp_path, input="data/part-*.jsonl", api={"base_url": server.base_url})

    assert run_cli("run", str(spec), "--no-progress", "--limit", "60").code == 0
    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [(r["row_index"], r["id"], r["part"]) for r in rows] == [
        (40 * part + i, f"r{part}-{i}", part) for part in range(3) for i in range(40)]
    assert len(server.requests) == 120  # the second run sent only the 60 left

    # The same files listed in another order are read sorted: the same table, nothing to do
    spec = write_spec(tmp_path, input=["data/part-2.jsonl", "data/part-0.jsonl", "data/part-1.jsonl"],
                      api={"base_url": server.base_url})
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 0, result.stderr
    assert len(server.requests) == 120

    # Any file changed: the fingerprint says so
    write_jsonl(tmp_path / "data" / "part-1.jsonl", [{"prompt": "other"}])
    result = run_cli("run", str(spec), "--no-progress")
    assert result.code == 2
    assert "content changed" in result.stderr


@pytest.mark.slow
def test_the_template_example_job_runs_and_exports_with_the_mock_endpoint(tmp_path: Path) -> None:
    import shutil

    from tests.conftest import REPO

    (tmp_path / "jobs").mkdir()
    shutil.copytree(REPO / "examples" / "data", tmp_path / "examples" / "data")
    shutil.copy(REPO / "jobs" / "template-example.yaml", tmp_path / "jobs")
    spec = tmp_path / "jobs" / "template-example.yaml"

    result = run_cli("run", str(spec), "--no-progress")

    assert result.code == 0, result.stderr
    rows = read_output(tmp_path / "examples/out/questions.parquet")
    assert len(rows) == 10 and rows[2]["gold"] == "Paris"
    assert "Question: What is the capital of France?" in rows[2]["output_text"]  # the mock echoes the prompt
    assert run_cli("export", str(spec), "--format", "sft", str(tmp_path / "train.jsonl")).code == 0
    samples = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [m["role"] for m in samples[2]["messages"]] == ["system", "user", "assistant"]
