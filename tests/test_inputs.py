from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import InputError
from batchrun.inputs import reader as reader_module
from batchrun.inputs.files import InputFile
from batchrun.inputs.reader import InputReader
from tests.conftest import write_jsonl


def test_three_shapes_become_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "hi", "max_tokens": 3, "tag": "x"},
        {"messages": [{"role": "user", "content": "yo", "name": "u1"}], "temperature": 0.5},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "max_tokens": 9}},
    ])
    rows = list(InputReader(path).rows())

    assert [(r.index, r.id, r.endpoint) for r in rows] == [(0, "a", "completions"), (1, "1", "chat"), (2, "c", "completions")]
    assert rows[0].body == {"prompt": "hi", "max_tokens": 3}  # tag is passthrough, not sent
    assert rows[1].body == {"messages": [{"role": "user", "content": "yo", "name": "u1"}], "temperature": 0.5}
    assert rows[2].body == {"prompt": "p", "max_tokens": 9}


def test_messages_pass_through_untouched(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm",
         "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": messages}])
    [row] = InputReader(path).rows()
    assert row.body["messages"] == messages


def test_prompt_rows_go_to_chat_when_the_spec_says_so(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    [row] = InputReader(path, endpoint="chat").rows()
    assert (row.endpoint, row.body) == ("chat", {"messages": [{"role": "user", "content": "hi"}]})

    path = write_jsonl(tmp_path / "in2.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(InputError, match="endpoint: completions, but this row has messages"):
        list(InputReader(path, endpoint="completions").rows())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x",', "in.jsonl: line 3: not valid JSON"),
        ('["prompt"]', "in.jsonl: line 3: expected a JSON object, got list"),
        ('{"text": "x", "label": 1}', "line 3: a row needs prompt, messages or body (an OpenAI batch line); its keys: label, text"),
        ('{"custom_id": "z", "url": "/v1/images/generations", "body": {"prompt": "x"}}', "url '/v1/images/generations' is not supported"),
        ('{"id": [1], "prompt": "x"}', "line 3: id must be a string or an integer"),
        ('{"messages": []}', "line 3: messages must be a non-empty list of {role, content} objects"),
        ('{"prompt": "x", "status": "new"}', "column 'status' clashes with the output column"),
        ('{"prompt": "a\\ud800"}', "line 3: prompt holds a lone surrogate"),
        ('{"id": "\\udfff", "prompt": "x"}', "line 3: id holds a lone surrogate"),
        ('{"prompt": "x", "meta": {"tags": ["\\uD83D"]}}', "line 3: meta.tags[0] holds a lone surrogate"),
        ('{"prompt": "x", "k": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 3: nested too deeply to read"),
        ('{"prompt": "x", "k": ' + "[" * 200 + "]" * 200 + "}", "line 3: nested more than 100 levels deep"),
        ('{"messages": [{"role": "user", "content": "x"}, "hi"]}', "line 3: messages[1] must be an object"),
        ('{"messages": [{"content": "x"}]}', "line 3: messages[0] has no role"),
        ('{"messages": [{"role": "user"}]}', "line 3: messages[0] has no content"),
        ('{"messages": [{"role": "user", "content": 7}]}', "line 3: messages[0].content must be text"),
        ('{"prompt": ["a", "b"]}', "line 3: prompt must be a string, got list"),
        ('{"custom_id": "c", "body": {"prompt": 5}}', "line 3: prompt must be a string, got int"),
        ('{"prompt": "x", "temperature": NaN}', "line 3: temperature: nan is not a number JSON can carry"),
        ('{"prompt": "x", "logit_bias": {"7": -Infinity}}', "line 3: logit_bias.7: -inf is not a number"),
        ('{"prompt": "x", "temperature": 1e999}', "line 3: temperature: inf is not a number JSON can carry"),
        # JSON text inside a field: what it decodes to is held to the same checks
        ('{"messages": "[{\\"role\\": \\"user\\", \\"content\\": \\"\\\\ud800\\"}]"}',
         "line 3: messages[0].content holds a lone surrogate"),
        ('{"messages": "[{\\"role\\": \\"user\\", \\"content\\": NaN}]"}',
         "line 3: messages is a string but not valid JSON (NaN is not a number JSON can carry)"),
        ('{"messages": "' + "[" * 100_000 + '"}', "line 3: messages is JSON text nested too deeply to read"),
        ('{"body": "{\\"prompt\\": \\"x\\", \\"seed\\": 1' + "0" * 5000 + '}"}',
         "line 3: body is a string but not valid JSON (Exceeds the limit"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "a"}', "", line])
    with pytest.raises(InputError) as info:
        InputReader(path).validate()
    assert message in str(info.value)


def test_a_surrogate_written_as_bytes_is_refused_with_its_line(tmp_path: Path) -> None:
    """Bytes ED A0 80 are no UTF-8 but json reads them (surrogatepass) as "\ud800"."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"id": 7, "prompt": "bad \xed\xa0\x80 here"}\n')
    with pytest.raises(InputError, match="line 2: prompt holds a lone surrogate"):
        InputReader(path).validate()


@pytest.fixture(params=["in memory", "on disk"])
def ids_kept(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A small input's ids are checked in memory, a large one's on disk: both ways."""
    if request.param == "on disk":
        monkeypatch.setattr(reader_module, "KEEP_BYTES", 0)
    return request.param


def test_duplicate_ids_are_named_with_both_places(tmp_path: Path, ids_kept: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"},
                                               {"custom_id": "x", "body": {"prompt": "c"}}])
    with pytest.raises(InputError, match="duplicate row ids: 'x' at line 1 and line 3"):
        InputReader(path).validate()


def test_a_row_without_a_model_is_an_error_when_the_spec_names_none(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "model": "m"}, {"prompt": "b"}])
    with pytest.raises(InputError, match="line 2: the row names no model"):
        InputReader(path, require_model=True).validate()


def test_validate_counts_rows_and_infers_passthrough_types(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl.gz", [
        {"prompt": "a", "k": 1, "score": 1, "tags": ["x"], "note": None},
        {"prompt": "b", "k": 2, "score": 2.5, "tags": "y"},
    ])
    reader = InputReader(path)
    count, types = reader.validate()
    assert count == 2
    assert types == {"k": "int", "score": "float", "tags": "json", "note": "null"}
    [table] = reader.passthrough_batches(types)
    assert table.to_pylist() == [
        {"k": 1, "score": 1.0, "tags": '["x"]', "note": None},
        {"k": 2, "score": 2.5, "tags": "y", "note": None},
    ]


def test_parquet_messages_as_structs_or_json_text(tmp_path: Path) -> None:
    structs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob"}]
    table = pa.Table.from_pylist([
        {"id": 7, "messages": structs, "meta": {"k": 1}},
        {"id": 8, "messages": structs, "meta": {"k": 2}},
    ])
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(structs)}]), tmp_path / "b.parquet")

    reader = InputReader(tmp_path / "a.parquet")
    rows = list(reader.rows())
    assert [r.id for r in rows] == ["7", "8"]
    # absent struct fields come back as nulls and must not be sent
    assert rows[0].body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob"}]
    _, types = reader.validate()
    [extra] = reader.passthrough_batches(types)
    assert extra.schema.field("meta").type == pa.struct([("k", pa.int64())])  # Parquet types are kept

    [row] = InputReader(tmp_path / "b.parquet").rows()
    assert row.body["messages"] == structs


def test_unreadable_inputs_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input file not found"):
        InputReader(tmp_path / "missing.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read as Parquet"):
        InputReader(tmp_path / "bad.parquet").validate()
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="bad.jsonl.gz: cannot read"):
        InputReader(tmp_path / "bad.jsonl.gz").validate()
    good = gzip.compress(b'{"prompt": "x"}\n' * 1000)
    (tmp_path / "corrupt.jsonl.gz").write_bytes(good[:20] + bytes(50) + good[70:])
    with pytest.raises(InputError, match="corrupt.jsonl.gz: cannot read"):
        InputReader(tmp_path / "corrupt.jsonl.gz").validate()


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    before = InputReader(path).fingerprint()
    write_jsonl(path, [{"prompt": "b"}])
    assert InputReader(path).fingerprint() != before


def test_parquet_struct_fields_absent_in_a_row_are_not_sent(tmp_path: Path) -> None:
    bodies = [{"prompt": "a", "temperature": 0.1}, {"prompt": "b", "max_tokens": 3}]
    pq.write_table(pa.Table.from_pylist([{"custom_id": f"r{i}", "body": b} for i, b in enumerate(bodies)]),
                   tmp_path / "in.parquet")
    rows = list(InputReader(tmp_path / "in.parquet").rows())
    assert [r.body for r in rows] == bodies  # no "temperature": None to override the spec


def test_a_batch_line_whose_url_is_not_a_string_is_an_input_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "url": [None], "body": {"prompt": "x"}}])
    with pytest.raises(InputError, match=r"line 1: url \[None\] is not supported"):
        InputReader(path).validate()


def test_valid_surrogate_pairs_nan_in_passthrough_and_tool_call_turns_are_fine(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        '{"prompt": "smile \\ud83d\\ude00", "score": NaN}',
        {"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "tool_calls": [{"id": "c"}]},
                      {"role": "tool", "tool_call_id": "c", "content": "3"}], "score": 1.5},
    ])
    reader = InputReader(path)
    assert reader.validate() == (2, {"score": "float"})
    assert [row.body.get("prompt") for row in reader.rows()] == ["smile \U0001F600", None]


def test_integers_in_passthrough_keep_their_exact_value(tmp_path: Path) -> None:
    big = 4611686018427387905  # 2**62 + 1: a float64 would round it
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "v": big, "w": big}, {"prompt": "b", "v": 1, "w": 0.5}])
    reader = InputReader(path)
    _, types = reader.validate()
    assert types == {"v": "int", "w": "json"}
    [table] = reader.passthrough_batches(types)
    assert table.to_pylist() == [{"v": big, "w": str(big)}, {"v": 1, "w": "0.5"}]


@pytest.mark.parametrize(("column", "message"), [
    (pa.array([b"hello", b"bytes"], pa.binary()), "row 0: prompt must be a string, got bytes (a Parquet binary"),
    (pa.Array.from_buffers(pa.string(), 2, pa.array([b"ok", b"\xff!"], pa.binary()).buffers()),
     "row 1: a string column holds bytes that are not UTF-8"),
])
def test_parquet_values_no_request_can_carry_are_named(tmp_path: Path, column: pa.Array, message: str) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": column}), path)
    with pytest.raises(InputError, match=re.escape(message)):
        InputReader(path).validate()


def test_parquet_request_fields_must_be_json(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "temperature": [0.5, float("nan")]}), path)
    with pytest.raises(InputError, match="row 1: temperature: nan is not a number JSON can carry"):
        InputReader(path).validate()


def test_csv_with_a_header_row_gives_rows_and_typed_passthrough(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,prompt,max_tokens,score,note\n'
                    'q1,"hello, world",5,1.5,first\n'
                    'q2,"two\nlines",,2,\n'
                    'q3,"[""messages"" text is JSON]",7,,third\n')
    reader = InputReader(path)
    count, types = reader.validate()
    assert count == 3
    assert [(row.id, row.endpoint, row.body) for row in reader.rows()] == [
        ("q1", "completions", {"prompt": "hello, world", "max_tokens": 5}),
        ("q2", "completions", {"prompt": "two\nlines"}),  # an empty cell is not sent
        ("q3", "completions", {"prompt": '["messages" text is JSON]', "max_tokens": 7}),
    ]
    [table] = reader.passthrough_batches(types)
    assert table.to_pylist() == [{"score": 1.5, "note": "first"}, {"score": 2.0, "note": ""},
                                 {"score": None, "note": "third"}]
    assert table.schema.field("score").type == pa.float64()


def test_csv_messages_are_json_text_and_bad_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('messages,lang\n"[{""role"": ""user"", ""content"": ""hi""}]",en\n"[{""content"": ""x""}]",fr\n')
    with pytest.raises(InputError, match="in.csv: line 3: messages\\[0\\] has no role"):
        InputReader(path).validate()
    path.write_text('messages,lang\n"[{""role"": ""user"", ""content"": ""hi""}]",en\n')
    reader = InputReader(path)
    assert reader.validate() == (1, {"lang": "string"})
    assert [row.body for row in reader.rows()] == [{"messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("id,prompt\na,x\nb,y,extra\n")
    with pytest.raises(InputError, match="in.csv: line 3: 3 values, but the header names 2 columns"):
        InputReader(path).validate()


def test_csv_json_text_is_held_to_the_row_checks(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""half a pair \\ud83d""}]"\n')
    with pytest.raises(InputError, match=r"in.csv: line 2: messages\[0\].content holds a lone surrogate"):
        InputReader(path).validate()


def test_a_glob_reads_its_files_in_sorted_order_as_one_table(tmp_path: Path) -> None:
    from batchrun.inputs.files import expand_inputs

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"prompt": ["c", "d"], "k": pa.array([3, 4], pa.int32())}), tmp_path / "data" / "p-2.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"], "k": pa.array([1, 2], pa.int64()),
                             "only_here": ["x", "y"]}), tmp_path / "data" / "p-1.parquet")
    write_jsonl(tmp_path / "data" / "p-3.jsonl", [{"prompt": "e", "k": 5}])
    (tmp_path / "data" / "notes.txt").write_text("not an input")

    paths = expand_inputs([tmp_path / "data" / "p-*"])
    assert [p.name for p in paths] == ["p-1.parquet", "p-2.parquet", "p-3.jsonl"]
    reader = InputReader(paths)
    count, types = reader.validate()
    rows = list(reader.rows())
    assert count == 5
    assert [(r.index, r.body["prompt"], r.where) for r in rows] == [
        (0, "a", "p-1.parquet row 0"), (1, "b", "p-1.parquet row 1"), (2, "c", "p-2.parquet row 0"),
        (3, "d", "p-2.parquet row 1"), (4, "e", "p-3.jsonl line 1")]
    table = pa.concat_tables(reader.passthrough_batches(types))
    assert table.schema.field("k").type == pa.int64()  # int32 and int64 widen to one column
    assert table.to_pylist() == [{"k": 1, "only_here": "x"}, {"k": 2, "only_here": "y"}, {"k": 3, "only_here": None},
                                 {"k": 4, "only_here": None}, {"k": 5, "only_here": None}]
    with pytest.raises(InputError, match=r"p-\*.csv: no input file matches"):
        expand_inputs([tmp_path / "data" / "p-*.csv"])
    with pytest.raises(InputError, match="notes.txt: matched by input"):
        expand_inputs([tmp_path / "data" / "*"])


def test_ids_and_errors_name_the_file_they_are_in(tmp_path: Path, ids_kept: str) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2"}, {"id": "x", "prompt": "3"}])
    with pytest.raises(InputError, match="duplicate row ids: 'x' at a.jsonl line 1 and b.jsonl line 2"):
        InputReader([a, b]).validate()
    # Files of one name in two folders: each place is its own, though they read alike
    (tmp_path / "other").mkdir()
    c = write_jsonl(tmp_path / "other" / "a.jsonl", [{"id": "x", "prompt": "4"}])
    with pytest.raises(InputError, match="duplicate row ids: 'x' at a.jsonl line 1 and a.jsonl line 1"):
        InputReader([a, c]).validate()
    write_jsonl(c, [{"id": "y", "prompt": "4"}, {"id": "z", "prompt": "5"}])
    assert InputReader([a, c]).validate()[0] == 3
    write_jsonl(b, [{"prompt": "2"}, {"prompt": 3}])
    with pytest.raises(InputError, match=r"b.jsonl: line 2: prompt must be a string"):
        InputReader([a, b]).validate()


def test_the_fingerprint_covers_every_file_and_their_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2"}])
    both = InputReader([a, b]).fingerprint()
    assert InputReader([a]).fingerprint() == InputReader(a).fingerprint() != both  # one file: as before
    assert InputReader([b, a]).fingerprint() != both
    write_jsonl(b, [{"prompt": "3"}])
    assert InputReader([a, b]).fingerprint() != both


def test_files_whose_columns_cannot_be_one_table_are_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["a"], "k": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "k": [[1, 2]]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"column 'k' is int64 in .*a.parquet but list<element: int64> in .*b.parquet"):
        InputReader([tmp_path / "a.parquet", tmp_path / "b.parquet"]).validate()


def test_a_template_renders_each_row_and_every_column_passes_through(tmp_path: Path) -> None:
    from batchrun.inputs.template import Template

    pq.write_table(pa.table({"id": ["q1", "q2"], "question": ["why?", "how?"], "context": ["c1", None],
                             "max_tokens": [1, 2]}), tmp_path / "in.parquet")
    template = Template({"messages": [{"role": "user", "content": "{{ context }} / {{ question }}"}]})
    reader = InputReader(tmp_path / "in.parquet", template=template)
    with pytest.raises(InputError, match=r"in.parquet: row 1: template.messages\[0\].content uses column 'context'"):
        reader.validate()
    pq.write_table(pa.table({"id": ["q1", "q2"], "question": ["why?", "how?"], "context": ["c1", "c2"],
                             "max_tokens": [1, 2]}), tmp_path / "in.parquet")
    reader = InputReader(tmp_path / "in.parquet", template=template)
    count, types = reader.validate()
    assert list(types) == ["question", "context", "max_tokens"]  # not request fields: the template's values
    assert [(r.id, r.endpoint, r.body) for r in reader.rows()] == [
        ("q1", "chat", {"messages": [{"role": "user", "content": "c1 / why?"}]}),
        ("q2", "chat", {"messages": [{"role": "user", "content": "c2 / how?"}]}),
    ]


def test_a_given_id_that_is_another_rows_position_is_a_duplicate(tmp_path: Path, ids_kept: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"id": 1, "prompt": "c"},
                                               {"id": "03", "prompt": "d"}, {"id": 3, "prompt": "e"}])
    with pytest.raises(InputError, match=r"'1' at line 3 and at position 1, a row without an id") as info:
        InputReader(path).validate()
    assert "'03'" not in str(info.value)  # "03" is no position; row 4's own id 3 is its position
    write_jsonl(path, [{"prompt": "a"}, {"id": 7, "prompt": "b"}, {"id": "x", "prompt": "c"}])
    assert InputReader(path).validate()[0] == 3


def _counting_passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passes made over the input's files: each is one `records` call."""
    passes: list[str] = []
    records = InputFile.records

    def counted(self: InputFile, **kwargs: object) -> object:
        passes.append(self.path.name)
        return records(self, **kwargs)

    monkeypatch.setattr(InputFile, "records", counted)
    return passes


def test_a_small_inputs_validated_rows_serve_the_next_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"id": f"r{i}", "prompt": f"p{i}", "tag": i} for i in range(50)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    expected = [(r.index, r.id, r.endpoint, r.body, r.where) for r in InputReader(path).rows()]
    passes = _counting_passes(monkeypatch)

    with InputReader(path) as reader:
        assert reader.validate()[0] == 50
        assert passes == ["in.jsonl"]
        assert [(r.index, r.id, r.endpoint, r.body, r.where) for r in reader.rows(10)] == expected[10:]
        assert passes == ["in.jsonl"]  # read once, by validation
        # Handed out once: the pass after reads the file again
        assert [r.id for r in reader.rows()] == [r["id"] for r in records]
        assert passes == ["in.jsonl", "in.jsonl"]


def test_a_larger_input_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * 100} for _ in range(30)])
    monkeypatch.setattr(reader_module, "KEEP_BYTES", path.stat().st_size - 1)
    passes = _counting_passes(monkeypatch)

    with InputReader(path) as reader:
        reader.validate()
        assert len(list(reader.rows())) == 30
    assert passes == ["in.jsonl", "in.jsonl"]


def test_a_compressed_input_counts_as_ten_times_its_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps({"prompt": "x" * 100}) + "\n" for _ in range(30)))
    monkeypatch.setattr(reader_module, "KEEP_BYTES", path.stat().st_size * 10 - 1)
    passes = _counting_passes(monkeypatch)

    with InputReader(path) as reader:
        reader.validate()
        list(reader.rows())
    assert passes == ["in.jsonl.gz", "in.jsonl.gz"]
