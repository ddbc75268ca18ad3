"""`batch_api:`: the rows go to the provider's batch API. The section is checked as every
other is, each provider's needs named before any request."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from batchrun import ConfigError, SpecError, parse_spec, run_job
from batchrun.backends.layout import Shard
from batchrun.backends.ray.driver import run_on_ray
from batchrun.spec.model import BatchApiSpec
from tests.conftest import write_jsonl, write_spec

BASE = {"input": "in.jsonl", "output": "out.parquet", "model": "m"}
LOCAL = {"base_url": "http://127.0.0.1:8000/v1"}


def batch_api(environ: dict[str, str] | None = None, **spec: Any) -> BatchApiSpec | None:
    return parse_spec({**BASE, **spec}, environ=environ or {}).batch_api


def test_no_section_or_false_is_no_batch_api() -> None:
    assert batch_api() is None
    assert batch_api(batch_api=False) is None


def test_the_kind_follows_the_api_fireworks_with_its_batch_url_and_the_accounts_variable() -> None:
    found = batch_api({"FIREWORKS_ACCOUNT_ID": "acct-1"}, batch_api={"account_id": "${FIREWORKS_ACCOUNT_ID}"})
    assert found == BatchApiSpec(kind="fireworks", base_url="https://api.fireworks.ai/v1",
                                 api_key_env="OPENAI_API_KEY", account_id="acct-1")


def test_any_other_api_is_openais_files_and_batches_at_its_own_url_with_its_key() -> None:
    found = batch_api(api={**LOCAL, "api_key_env": "VLLM_KEY"}, batch_api=True)
    assert found == BatchApiSpec(kind="openai", base_url="http://127.0.0.1:8000/v1", api_key_env="VLLM_KEY")
    assert (found.poll_interval_s, found.rows_per_batch, found.max_wait_h, found.fallback) == (60.0, None, 24.0, "live")


def test_every_key_can_be_set() -> None:
    found = batch_api(api=LOCAL, batch_api={"kind": "openai", "base_url": "http://127.0.0.1:9000/v1/",
                                            "poll_interval_s": 5, "rows_per_batch": 1000, "max_wait_h": 2,
                                            "fallback": "none", "api_key_env": "BATCH_KEY"})
    assert found == BatchApiSpec(kind="openai", base_url="http://127.0.0.1:9000/v1", api_key_env="BATCH_KEY",
                                 poll_interval_s=5.0, rows_per_batch=1000, max_wait_h=2.0, fallback="none")


@pytest.mark.parametrize("section, message", [
    ({"kind": "anthropic"}, "batch_api.kind: 'anthropic' is not a batch API batchrun knows; one of fireworks, openai"),
    ({"kind": "fireworks"}, "batch_api.account_id: required for Fireworks' batch API; write "
                            "account_id: ${FIREWORKS_ACCOUNT_ID} and export it"),
    ({"kind": "openai", "account_id": "a"}, "batch_api.account_id: only Fireworks' batch API takes an account"),
    ({"kind": "openai", "rows_per_batch": 50_001}, "batch_api.rows_per_batch: OpenAI's batch API takes at most "
                                                   "50,000 requests a batch, got 50,001"),
    ({"kind": "openai", "rows_per_batch": 0}, "batch_api.rows_per_batch: expected a whole number >= 1"),
    ({"kind": "openai", "fallback": "maybe"}, "batch_api.fallback: expected live"),
    ({"kind": "openai", "poll_interval_s": "1m"}, "batch_api.poll_interval_s: expected a number"),
    ({"fallbak": "live"}, "batch_api.fallbak: unknown key; did you mean fallback?"),
    ("yes", "batch_api: expected a mapping, got str"),
])
def test_a_wrong_section_names_the_key_and_the_fix(section: Any, message: str) -> None:
    with pytest.raises(SpecError, match="^" + re.escape(message)):
        batch_api(batch_api=section)


def test_fireworks_batches_chat_only_and_one_model_a_job() -> None:
    with pytest.raises(SpecError, match="Fireworks' batch API does not answer the embeddings endpoint; drop batch_api"):
        batch_api(endpoint="embeddings", batch_api={"kind": "fireworks", "account_id": "a"})
    with pytest.raises(SpecError, match="Fireworks runs one model a batch job; set model:"):
        parse_spec({"input": "in.jsonl", "output": "out.parquet", "batch_api": {"account_id": "a"}}, environ={})


def test_openai_batches_every_endpoint() -> None:
    for endpoint in ("chat", "completions", "responses", "embeddings"):
        assert batch_api(api=LOCAL, endpoint=endpoint, batch_api=True).kind == "openai"  # type: ignore[union-attr]


def test_the_batch_api_is_no_part_of_what_a_resume_must_match() -> None:
    live = parse_spec({**BASE, "api": LOCAL}, environ={})
    batched = parse_spec({**BASE, "api": LOCAL, "batch_api": True}, environ={})
    assert batched.request_config() == live.request_config()


def test_a_batch_api_job_is_not_run_in_shards(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api=LOCAL, batch_api=True)
    with pytest.raises(ConfigError, match="batch_api and --shard do not go together"):
        run_job(spec, environ={"OPENAI_API_KEY": "sk-test-0123456789abcdef"}, shard=Shard(0, 2))
    assert not (tmp_path / "out").exists()


def test_a_batch_api_job_without_its_key_is_refused_before_any_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api=LOCAL, batch_api={"api_key_env": "BATCH_KEY"})
    with pytest.raises(ConfigError, match="BATCH_KEY is not set; export it or set batch_api.api_key_env in"):
        run_job(spec, environ={"OPENAI_API_KEY": "sk-test-0123456789abcdef"})
    assert not (tmp_path / "out").exists()


def test_a_batch_api_job_is_not_run_on_ray(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", [{"prompt": "p"}])
    spec = write_spec(tmp_path, api=LOCAL, batch_api=True)
    with pytest.raises(ConfigError, match="batch_api and --ray do not go together"):
        run_on_ray(spec, workers=2)
    assert not (tmp_path / "out").exists()
