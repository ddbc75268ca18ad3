"""Shards: where a sharded job's files lie and which rows each shard answers.

    answers.parquet                      the job's output, made by `merge`
    answers.shards/00001-of-00004.parquet             shard 1's part (rows of its range)
    answers.shards/00001-of-00004.batchrun.sqlite     its state, lock and status beside it

A shard is a job of its own to the runner (its own state, lock, status and output
part) whose state also records `[index, count]`. Its rows are
`[rows * index // count, rows * (index + 1) // count)` (`slice_of`, the one place that
says so), so the parts in index order are the input in order, and merging is
concatenation. Every shard's state records the input's digest and the request
configuration: shards of another N, or of a changed spec, are refused at the start of a
run (`check_siblings`) and at the merge (backends/merge.py), naming the difference.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, JobAborted, StateMismatchError, UsageError
from ..storage import Store
from ..storage.lock import lock_holder
from ..storage.state import StateStore, differences, state_path

__all__ = ["NotReady", "Shard", "a_shard_state", "check_siblings", "check_unsharded", "dataset_folder", "dataset_part",
           "find_shards", "input_rows", "pull_shard_states", "same_job", "shard_folder", "shard_output", "shard_sums",
           "slice_of"]

_NAME = re.compile(r"(\d{5})-of-(\d{5})\.batchrun\.sqlite")


class NotReady(JobAborted):
    """Shards are missing, unfinished or running: merge later (exit 3)."""

    rerun_resumes = False


@dataclass(frozen=True, order=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N`: shard I (from 0) of N."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"{text!r}: write the shard as I/N, such as 0/4 (I counts from 0)")
        index, count = int(match[1]), int(match[2])
        if not 0 < count <= 99999 or index >= count:
            raise ValueError(f"{text!r}: I must be 0 to N-1, and N 1 to 99999")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, rows: int) -> tuple[int, int]:
        """The shard's rows [start, stop) of a job of `rows` rows."""
        return slice_of(rows, self.index, self.count)


def slice_of(total: int, index: int, count: int) -> tuple[int, int]:
    """Slice `index` of `count` of `total` things (a job's rows, its requests in flight,
    its budget): [start, stop), contiguous and in order, their sizes at most one apart."""
    return total * index // count, total * (index + 1) // count


def shard_sums(parts: Iterable[Mapping[str, Any]], names: Iterable[str], *,
               optional: Iterable[str] = ()) -> dict[str, Any]:
    """The shards' counts added up: each of `names` (a count missing or None is 0), and
    each of `optional` (a cost: None when no shard has one)."""
    parts = list(parts)
    sums: dict[str, Any] = {name: sum((part.get(name) or 0 for part in parts), 0.0 if name.endswith("_usd") else 0)
                            for name in names}
    for name in optional:
        values = [part[name] for part in parts if part.get(name) is not None]
        sums[name] = sum(values) if values else None
    return sums


def shard_folder(output: Path) -> Path:
    return output.with_name(output.stem + ".shards")


def shard_output(output: Path, shard: Shard) -> Path:
    """The shard's output part; its state and status are named after it."""
    return shard_folder(output) / f"{shard.name}{output.suffix}"


def dataset_folder(output: Path) -> Path:
    return output.with_suffix("")


def find_shards(output: Path) -> dict[Shard, Path]:
    """Every shard that has a state in the job's shard folder, with its state's path."""
    folder = shard_folder(output)
    found: dict[Shard, Path] = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if match:
                found[Shard(int(match[1]), int(match[2]))] = path
    return dict(sorted(found.items()))


def dataset_part(index: int, count: int) -> str:
    """The name of part `index` of `count` in the dataset folder `merge --dataset` makes."""
    return f"part-{index:05d}-of-{count:05d}.parquet"


def pull_shard_states(storage: Store, output: Path) -> set[str]:
    """Bring the states of a sharded job's shards from the store, not their parts (for
    `status`: the parts are the job's size); return the names the store's shard folder holds."""
    folder = shard_folder(output)
    names = storage.names_in(folder)
    for name in sorted(names):
        if _NAME.fullmatch(name) and not lock_holder(folder / name):  # a shard running here has the newest
            storage.pull_state(folder / name)
    return names


def a_shard_state(storage: Store, output: Path) -> Path | None:
    """One shard's state (any: each records the job's input and request), brought from the
    store if it holds one; None for a job with no shard begun."""
    folder = shard_folder(output)
    for name in sorted(storage.names_in(folder)):
        if _NAME.fullmatch(name):
            if not lock_holder(folder / name):  # a shard running here has the newest
                storage.pull_state(folder / name)
            return folder / name
    return next(iter(find_shards(output).values()), None)


def input_rows(shards: dict[Shard, Path]) -> int | None:
    """The input's row count, as the shards' states record it; None while none has begun."""
    for path in shards.values():
        with contextlib.suppress(FileNotFoundError, JobAborted, UsageError):  # gone, or damaged: the next
            meta = _read_meta(path)
            if "rows" in meta:
                return int(meta["rows"])
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    store = StateStore.open(path, lock=False)
    try:
        return store.meta()
    finally:
        store.close()


def same_job(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    ignored = ("shard", "version")
    return differences({k: v for k, v in a.items() if k not in ignored}, {k: v for k, v in b.items() if k not in ignored})


def check_unsharded(output: Path) -> None:
    """Refuse to run a job whole beside the progress of its shards: it would pay for
    every row again, and its output would take the place of theirs."""
    if shards := find_shards(output):
        count = next(iter(shards)).count
        raise ConfigError(
            f"{shard_folder(output)} holds this job's progress in {count} shards: run it with --shard I/{count} "
            "(then merge), or remove that folder to run the job whole (every answer is then paid again)")


def check_siblings(output: Path, shard: Shard, meta: dict[str, Any]) -> None:
    """Refuse to run a shard beside shards of another N, or of another input or spec, or
    beside the job's progress run whole."""
    whole = state_path(output)
    if whole.exists():
        raise ConfigError(
            f"{whole} holds this job's progress run whole: run it without --shard, or remove that file and those "
            f"named after it beside it to run the job in shards (every answer is then paid again)")
    others = {s: p for s, p in find_shards(output).items() if s != shard}
    counts = sorted({s.count for s in others} - {shard.count})
    if counts:
        raise ConfigError(
            f"{shard_folder(output)} holds shards of {counts[0]} (not {shard.count}): shards of different N "
            f"never mix. Run --shard I/{counts[0]}, or remove that folder to start over with {shard.count} shards"
        )
    for other, path in others.items():
        try:
            saved = _read_meta(path)
        except (FileNotFoundError, JobAborted, ConfigError):
            continue  # gone meanwhile, or unreadable: the merge checks again
        if saved and (changes := same_job(saved, meta)):
            raise StateMismatchError(
                f"shard {other} in {shard_folder(output)} ran another job ({'; '.join(changes)}); shards of a "
                "changed spec or input never mix. Restore the spec and input it ran with, or remove that folder "
                "to start every shard over"
            )
