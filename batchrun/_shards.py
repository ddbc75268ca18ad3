"""Shards: N runners share one job, each answering a contiguous 1/N of its rows.

    answers.parquet                      the job's output, made by `merge`
    answers.shards/00001-of-00004.parquet             shard 1's part (rows of its range)
    answers.shards/00001-of-00004.batchrun.sqlite     its state, lock and status beside it

A shard is a job of its own to the runner (its own state, lock, status and output
part) whose state also records `[index, count]`. Its rows are
`[rows * index // count, rows * (index + 1) // count)`, so the parts in index order are
the input in order, and merging is concatenation. Every shard's state records the
input's digest and the request configuration: shards of another N, or of a changed
spec, are refused at the start of a run and at the merge, naming the difference.

The merge is made by `batchrun merge JOB`, or by the last shard to finish: each
shard, once its part is in place and its lock released, looks for the other parts,
and the one that finds them all (and no shard running) merges.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigError, JobAborted, StateMismatchError, StorageError, UsageError
from ._lock import lock_holder
from ._state import StateStore, differences

if TYPE_CHECKING:
    from ._spec import JobSpec

__all__ = ["MergeSummary", "Shard", "check_siblings", "find_shards", "merge_job", "shard_output", "try_merge"]

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
        return rows * self.index // self.count, rows * (self.index + 1) // self.count


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


def _read_meta(path: Path) -> dict[str, Any]:
    store = StateStore.open(path, lock=False)
    try:
        return store.meta()
    finally:
        store.close()


def _same_job(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    ignored = ("shard", "version")
    return differences({k: v for k, v in a.items() if k not in ignored}, {k: v for k, v in b.items() if k not in ignored})


def check_siblings(output: Path, shard: Shard, meta: dict[str, Any]) -> None:
    """Refuse to run a shard beside shards of another N, or of another input or spec."""
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
        if saved and (changes := _same_job(saved, meta)):
            raise StateMismatchError(
                f"shard {other} in {shard_folder(output)} ran another job ({'; '.join(changes)}); shards of a "
                "changed spec or input never mix. Restore the spec and input it ran with, or remove that folder "
                "to start every shard over"
            )


@dataclass(frozen=True)
class MergeSummary:
    output: Path | str  # a URL on object storage
    shards: int
    rows: int
    ok: int
    failed: int

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        return (f"merged {self.shards} shard{'s' * (self.shards != 1)}: {self.rows:,} rows, {self.ok:,} ok, "
                f"{self.failed:,} failed; output: {self.output}")


def merge_job(spec: JobSpec, *, dataset: bool = False) -> MergeSummary:
    """Make the job's output from its shards' parts: one Parquet file (or, with `dataset`,
    a folder of the parts as `part-00000-of-00004.parquet`...), every row once, in order.

    Raises ConfigError (exit 2) for shards that do not belong together, NotReady
    (exit 3) while a shard is missing, unfinished or running.
    """
    import pyarrow.parquet as pq

    folder = shard_folder(spec.output)
    remote = None
    if spec.output_url:  # the shards ran on other machines: their states and parts are on the store
        from ._remote import Remote

        remote = Remote(spec.output_url, spec.output)
        remote.pull_folder(folder)
    shards = find_shards(spec.output)
    if not shards:
        raise ConfigError(f"{folder}: no shards of {spec.name} to merge; run it with --shard I/N first")
    counts = sorted({s.count for s in shards})
    if len(counts) > 1:
        raise ConfigError(f"{folder} holds shards of {' and of '.join(map(str, counts))}: shards of different N "
                          "never mix; remove the ones that do not belong")
    count = counts[0]
    first: dict[str, Any] | None = None
    waiting, parts, rows, ok, failed = [], [], 0, 0, 0
    for shard, path in shards.items():
        if pid := lock_holder(path):
            waiting.append(f"{shard.index} (running, pid {pid})")
            continue
        store = StateStore.open(path, lock=False)
        try:
            meta, tally = store.meta(), store.counts()
        finally:
            store.close()
        if not meta:  # made, then killed before it recorded what it is for
            waiting.append(f"{shard.index} (not begun)")
            continue
        if first is None:
            first, first_shard = meta, shard
        elif changes := _same_job(first, meta):
            raise StateMismatchError(f"shard {shard} and shard {first_shard} ran different jobs "
                                     f"({'; '.join(changes)}): remove {folder} and run every shard again")
        if meta.get("request") != spec.request_config():
            changes = differences({"request": meta.get("request")}, {"request": spec.request_config()})
            raise StateMismatchError(f"{spec.name} changed since shard {shard} ran ({'; '.join(changes)}); "
                                     f"restore it, or remove {folder} and run every shard again")
        start, stop = shard.bounds(meta["rows"])
        part = shard_output(spec.output, shard)
        if tally["ok"] + tally["failed"] != stop - start or not part.exists():
            waiting.append(f"{shard.index} ({stop - start - tally['ok'] - tally['failed']:,} rows to go)")
            continue
        if pq.ParquetFile(part).metadata.num_rows != stop - start:
            waiting.append(f"{shard.index} (its part is not the state's: rerun it)")
            continue
        parts.append(part)
        rows, ok, failed = rows + stop - start, ok + tally["ok"], failed + tally["failed"]
    missing = [i for i in range(count) if Shard(i, count) not in shards]
    if missing:  # after the checks above: shards that do not belong together are said first
        raise NotReady(f"shard{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} of {count} "
                       "not started yet: run them, then merge")
    if waiting:
        raise NotReady(f"not every shard has finished: shard {', '.join(waiting)}; merge once they have")
    with _merge_lock(folder):
        if dataset:
            _link_parts(parts, dataset_folder(spec.output))
        else:
            _concatenate(parts, spec.output)
        if remote is not None:
            for made in sorted(dataset_folder(spec.output).iterdir()) if dataset else [spec.output]:
                remote.push_file(made)
    where = dataset_folder(spec.output) if dataset else spec.output
    return MergeSummary(remote.url_of(where) if remote else where, count, rows, ok, failed)


def try_merge(spec: JobSpec, *, dataset: bool = False) -> MergeSummary | str:
    """The merge a finishing shard makes if it is the last; else why not, in a few words."""
    try:
        return merge_job(spec, dataset=dataset)
    except NotReady as exc:
        return str(exc)
    except (UsageError, StorageError) as exc:  # the shard's own run went well: said, not raised
        return f"cannot merge: {exc}"


@contextlib.contextmanager
def _merge_lock(folder: Path):  # type: ignore[no-untyped-def]
    """Two shards finishing at once both find every part: one merges, then the other."""
    fd = os.open(folder / ".merge.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _concatenate(parts: list[Path], output: Path) -> None:
    """The parts' row groups, in order, into one file under a temporary name; then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ._output import parquet_writer, fsync

    files = [pq.ParquetFile(part) for part in parts]
    schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.merge.tmp")
    try:
        writer = parquet_writer(tmp, schema)
        with writer:
            for f in files:
                for group in range(f.num_row_groups):
                    table = f.read_row_group(group)
                    writer.write_table(table if table.schema == schema else table.cast(schema))
        fsync(tmp)
        os.replace(tmp, output)
        fsync(output.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{output}: cannot write the merged output: {exc.strerror or exc}") from exc


def _link_parts(parts: list[Path], folder: Path) -> None:
    """A folder of the parts (hard links where the file system allows: no copy), made
    under another name and renamed into place: a reader never sees it half made (while
    an older one is swapped out, for a moment it sees none)."""
    from ._output import fsync

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.merge.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o700)
        for n, part in enumerate(parts):
            target = tmp / f"part-{n:05d}-of-{len(parts):05d}.parquet"
            try:
                os.link(part, target)
            except OSError:
                shutil.copyfile(part, target)
        fsync(tmp)
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        fsync(folder.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{folder}: cannot write the merged dataset: {exc.strerror or exc}") from exc
