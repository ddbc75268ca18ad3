from __future__ import annotations

from pathlib import Path

import pytest

from batchrun import ConfigError, StateMismatchError
from batchrun._protocol import Result
from batchrun._state import StateStore, lock_holder

META = {"input_digest": "abc", "rows": 3, "passthrough": {}, "request": {"model": "m", "params": {"max_tokens": 5}}}


def test_results_upsert_by_row_and_attempts_add_up(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "failed", attempts=6, error="HTTP 500: x"), Result(1, "b", "ok", attempts=1)])
    store.save([Result(0, "a", "ok", output_text="hi", total_tokens=3, attempts=2)])

    rows = store.results(0, 3)
    assert [(r[0], r[2], r[3], r[-3], r[-1]) for r in rows] == [(0, "ok", "hi", 8, None), (1, "ok", None, 1, None)]
    assert store.counts() == {"ok": 2, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 3}
    assert list(store.ok_rows(3)) == [1, 1, 0]
    store.close()


def test_state_survives_reopening(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(2, "c", "ok")])
    store.close()
    store = StateStore.open(tmp_path / "s.sqlite")
    assert store.meta()["rows"] == 3
    assert list(store.ok_rows(3)) == [0, 0, 1]
    store.close()


def test_a_state_for_other_params_is_refused_with_the_difference(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    changed = {**META, "request": {"model": "m", "params": {"max_tokens": 6}}}
    with pytest.raises(StateMismatchError) as info:
        store.claim(changed, spec_name="job.yaml")
    assert "params.max_tokens was 5, now 6" in str(info.value)
    assert "--restart" in str(info.value)
    store.close()


def test_restart_empties_the_state(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.sqlite")
    store.claim(META, spec_name="job.yaml")
    store.save([Result(0, "a", "ok")])
    store.close()
    store = StateStore.open(tmp_path / "s.sqlite")
    store.reset()
    assert store.meta() == {} and store.counts()["ok"] == 0
    store.close()


def test_one_runner_per_state_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    first = StateStore.open(path)
    assert lock_holder(path) is not None
    with pytest.raises(ConfigError, match="this job is already running"):
        StateStore.open(path)
    first.close()
    assert lock_holder(path) is None
    StateStore.open(path).close()
