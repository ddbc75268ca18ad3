"""What a batch job and its servers look like in the batch backend's tests: the fake live
API beside the fake of OpenAI's Files + Batches API (tests/fakebatch.py), and a job
spec that sends to both."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import TEST_KEY, write_jsonl, write_spec
from tests.fakebatch import FakeBatchAPI
from tests.fakeserver import FakeServer

ENV = {"OPENAI_API_KEY": TEST_KEY}
PRICES = {"test-model": {"input": 1.0, "output": 2.0}}


def job(tmp_path: Path, live: FakeServer, batches: FakeBatchAPI, rows: int, **spec: object) -> Path:
    """A job of `rows` prompts through `batches`, what they do not answer through `live`."""
    write_jsonl(tmp_path / "input.jsonl", ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(rows)))
    batch = {"kind": "openai", "base_url": batches.base_url, "poll_interval_s": 0.01, **spec.pop("batch", {})}
    api = {"base_url": live.base_url, **spec.pop("api", {})}
    return write_spec(tmp_path, api=api, pricing=PRICES, batch_api=batch, **spec)
