from __future__ import annotations

from pathlib import Path

import pytest

from batchrun import SpecError, load_spec, parse_spec
from batchrun.spec.parse import DEFAULT_BASE_URL

MINIMAL = {"input": "in.jsonl", "output": "out.parquet"}


def test_defaults_and_paths_relative_to_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text("input: ../data/in.jsonl\noutput: out/x.parquet\n")

    spec = load_spec(path)

    assert spec.input == (tmp_path / "data" / "in.jsonl",)
    assert spec.output == tmp_path / "jobs" / "out" / "x.parquet"
    assert (spec.concurrency, spec.retry.max_attempts) == (32, 6)
    assert spec.api.base_url == DEFAULT_BASE_URL
    assert spec.api.api_key_env == "OPENAI_API_KEY"


def test_json_text_is_a_valid_spec(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"input": "a.parquet", "output": "b.parquet", "concurrency": 4}')
    assert load_spec(path).concurrency == 4


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**MINIMAL, "concurency": 4}, "concurency: unknown key; did you mean concurrency?"),
        ({**MINIMAL, "retry": {"max_atempts": 3}}, "retry.max_atempts: unknown key; did you mean max_attempts?"),
        ({**MINIMAL, "api": {"base_ulr": "http://x"}}, "api.base_ulr: unknown key; did you mean base_url?"),
        ({**MINIMAL, "zzz": 1}, "zzz: unknown key; known keys: input, output"),
        ({"output": "o.parquet"}, "input: required"),
        ({**MINIMAL, "concurrency": 0}, "concurrency: expected a whole number >= 1, got 0"),
        ({**MINIMAL, "concurrency": True}, "concurrency: expected a whole number >= 1, got True"),
        ({**MINIMAL, "endpoint": "images"}, "endpoint: expected one of chat, completions, responses, embeddings"),
        ({**MINIMAL, "input": "in.tsv"}, "must end in .jsonl, .jsonl.gz, .parquet or .csv"),
        ({**MINIMAL, "output": "out.csv"}, "output: 'out.csv' must end in .parquet"),
        ({**MINIMAL, "api": {"base_url": "ftp://x"}}, "api.base_url: expected an http(s):// URL or mock://"),
        ({**MINIMAL, "params": [1]}, "params: expected a mapping, got list"),
    ],
)
def test_invalid_specs_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, environ={})
    assert message in str(info.value)


def test_environment_variables_expand_in_any_string() -> None:
    raw = {**MINIMAL, "model": "${MODEL}", "params": {"stop": ["${STOP:-END}"]}, "api": {"base_url": "${BASE}"}}
    spec = parse_spec(raw, environ={"MODEL": "m1", "BASE": "http://127.0.0.1:9/v1/"})
    assert spec.model == "m1"
    assert spec.params == {"stop": ["END"]}
    assert spec.api.base_url == "http://127.0.0.1:9/v1"


def test_an_unset_variable_is_named() -> None:
    with pytest.raises(SpecError, match=r"model: \$\{NOPE\} is not set"):
        parse_spec({**MINIMAL, "model": "${NOPE}"}, environ={})


def test_openai_api_base_is_the_default_base_url() -> None:
    spec = parse_spec(MINIMAL, environ={"OPENAI_API_BASE": "http://127.0.0.1:8000/v1"})
    assert spec.api.base_url == "http://127.0.0.1:8000/v1"


def test_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match="job.yaml: not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="missing.yaml: cannot read the job spec"):
        load_spec(tmp_path / "missing.yaml")


def test_request_config_is_what_shapes_requests() -> None:
    spec = parse_spec({**MINIMAL, "model": "m", "params": {"max_tokens": 5}, "concurrency": 3}, environ={})
    assert spec.request_config() == {"model": "m", "endpoint": None, "params": {"max_tokens": 5},
                                     "base_url": DEFAULT_BASE_URL}
