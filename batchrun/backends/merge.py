"""The merge: a sharded job's parts made one output, by `batchrun merge JOB` or by the
last shard to finish.

Each shard, once its part is in place and its lock released, looks for the other parts,
and the one that finds them all (and no shard running) merges: into one Parquet file,
or a dataset folder of hard links.

A part is derived from its shard's state (every answer) and the input (the passthrough
columns), as the shard's run wrote it: the merge reads every part through first, and
one that is missing, damaged or not the state's is written again from them. A part
whose state is gone, or whose input changed since, cannot be: the merge names it and
the command that remakes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .._exceptions import ConfigError, InputError, StateMismatchError, StorageError, UsageError
from ..inputs.reader import InputReader
from ..spec.parse import JobSpec
from ..storage import Store, open_store
from ..storage.columns import extra_columns
from ..storage.lock import lock_holder
from ..storage.durable import fsync
from ..storage.output import OutputWriter, parquet_writer
from ..storage.state import StateStore, differences, state_path
from .layout import (
    NotReady,
    Shard,
    dataset_folder,
    dataset_part,
    find_shards,
    same_job,
    shard_folder,
    shard_output,
    shard_sums,
)

__all__ = ["MergeSummary", "merge_job", "try_merge"]


@dataclass(frozen=True)
class MergeSummary:
    output: Path | str  # a URL on object storage
    shards: int
    rows: int
    ok: int
    failed: int
    remade: tuple[str, ...] = ()  # the shards (`I/N`) whose part was written again from their state

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        line = (f"merged {self.shards} shard{'s' * (self.shards != 1)}: {self.rows:,} rows, {self.ok:,} ok, "
                f"{self.failed:,} failed; output: {self.output}")
        if self.remade:
            many = len(self.remade) > 1
            line += (f"; remade the part{'s' * many} of shard{'s' * many} {', '.join(self.remade)} from "
                     f"{'their states' if many else 'its state'}")
        return line


@dataclass(frozen=True)
class _Finished:
    """A shard whose every row is settled: its state, what that holds, and its part."""

    shard: Shard
    state: Path
    part: Path
    ok: int
    failed: int


def merge_job(spec: JobSpec, *, dataset: bool = False) -> MergeSummary:
    """Make the job's output from its shards' parts: one Parquet file (or, with `dataset`,
    a folder of the parts as `part-00000-of-00004.parquet`...), every row once, in order.

    A part that is missing, damaged or not its state's is first written again from its
    shard's state and the input. Raises ConfigError (exit 2) for shards that do not belong
    together, or a part that cannot be remade here (naming the command that remakes it),
    NotReady (exit 3) while a shard is missing, unfinished or running.
    """
    folder = shard_folder(spec.output)
    storage = open_store(spec)
    storage.pull_folder(folder)  # the shards may have run on other machines: their states and parts
    shards = find_shards(spec.output)
    if not shards:
        raise ConfigError(f"{folder}: no shards of {spec.name} to merge; run it with --shard I/N first")
    counts = sorted({s.count for s in shards})
    if len(counts) > 1:
        raise ConfigError(f"{folder} holds shards of {' and of '.join(map(str, counts))}: shards of different N "
                          "never mix; remove the ones that do not belong")
    count = counts[0]
    # Two shards finishing at once: one checks, remakes and merges, then the other
    with _merge_lock(folder):
        finished = _finished_shards(spec, shards, count)
        remade = _remake_damaged(spec, storage, finished)
        where = _join_parts(spec, storage, [done.part for done in finished], dataset=dataset)
    sums = shard_sums((vars(done) for done in finished), ("ok", "failed"))
    return MergeSummary(storage.where(where), count, sums["ok"] + sums["failed"], sums["ok"], sums["failed"],
                        tuple(remade))


def _remake_damaged(spec: JobSpec, storage: Store, finished: list[_Finished]) -> list[str]:
    """Write again every part that is missing, damaged or not its state's; the shards
    (`I/N`) whose part was remade."""
    remade = []
    for done in finished:
        if (damage := _damage(done)) is not None:
            _remake_part(spec, storage, done, damage)
            storage.push_file(done.part)
            remade.append(str(done.shard))
    return remade


def _join_parts(spec: JobSpec, storage: Store, parts: list[Path], *, dataset: bool) -> Path:
    """The job's output from its parts, in order: one file, or a dataset folder; published."""
    if dataset:
        _link_parts(parts, dataset_folder(spec.output))
    else:
        _concatenate(parts, spec.output)
    for made in sorted(dataset_folder(spec.output).iterdir()) if dataset else [spec.output]:
        storage.push_file(made)
    return dataset_folder(spec.output) if dataset else spec.output


def _finished_shards(spec: JobSpec, shards: dict[Shard, Path], count: int) -> list[_Finished]:
    """Every shard of the job, in order, once each has finished and none runs; else NotReady
    naming those that have not (or StateMismatchError: shards of different jobs)."""
    folder = shard_folder(spec.output)
    first: dict[str, Any] | None = None
    waiting, finished = [], []
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
        elif changes := same_job(first, meta):
            raise StateMismatchError(f"shard {shard} and shard {first_shard} ran different jobs "
                                     f"({'; '.join(changes)}): remove {folder} and run every shard again")
        if meta.get("request") != spec.request_config():
            changes = differences({"request": meta.get("request")}, {"request": spec.request_config()})
            raise StateMismatchError(f"{spec.name} changed since shard {shard} ran ({'; '.join(changes)}); "
                                     f"restore it, or remove {folder} and run every shard again")
        start, stop = shard.bounds(meta["rows"])
        if tally["ok"] + tally["failed"] != stop - start:
            waiting.append(f"{shard.index} ({stop - start - tally['ok'] - tally['failed']:,} rows to go)")
            continue
        finished.append(_Finished(shard, path, shard_output(spec.output, shard), tally["ok"], tally["failed"]))
    missing = [i for i in range(count) if Shard(i, count) not in shards]
    for index in missing:
        orphan = shard_output(spec.output, Shard(index, count))
        if orphan.exists():  # nothing says it is whole, nor of this job
            raise ConfigError(f"{orphan}: shard {index}/{count}'s part has no state beside it "
                              f"({state_path(orphan).name} is gone), so it cannot be checked or remade; remake it "
                              f"with `batchrun run {spec.name} --shard {index}/{count}` (its rows are sent again), "
                              "then merge")
    if missing:  # after the checks above: shards that do not belong together are said first
        raise NotReady(f"shard{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} of {count} "
                       "not started yet: run them, then merge")
    if waiting:
        raise NotReady(f"not every shard has finished: shard {', '.join(waiting)}; merge once they have")
    return finished


def _damage(done: _Finished) -> str | None:
    """What is wrong with a finished shard's part, read through to its last page; None: nothing."""
    if not done.part.exists():
        return "missing"
    try:
        with pq.ParquetFile(done.part) as file:
            if file.metadata.num_rows != done.ok + done.failed:
                return f"damaged ({file.metadata.num_rows:,} rows where its state has {done.ok + done.failed:,})"
            for _ in file.iter_batches():  # every page decodes: a footer that reads is not enough
                pass
    except (OSError, pa.ArrowException) as exc:
        return f"damaged ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return None


def _remake_part(spec: JobSpec, storage: Store, done: _Finished, damage: str) -> None:
    """Write a finished shard's part again from its state and the input, as its run wrote
    it (under the shard's lock, to a temporary name renamed over the old one); sends nothing."""

    def cannot(why: str) -> ConfigError:
        return ConfigError(f"{done.part}: shard {done.shard}'s part is {damage}; it is remade from the shard's "
                           f"state and the input, but {why}. Restore the input the shard ran with and merge again, "
                           f"or remake the part with `batchrun run {spec.name} --shard {done.shard}`")

    try:
        store = StateStore.open(done.state)
    except ConfigError:
        if holder := lock_holder(done.state):
            raise NotReady(f"shard {done.shard.index} began running again (pid {holder}); merge once it has "
                           "finished") from None
        raise
    try:
        meta = store.meta()
        try:
            reader = InputReader(storage.inputs())
        except InputError as exc:
            raise cannot(str(exc)) from exc
        try:
            try:
                digest = reader.fingerprint()
            except InputError as exc:
                raise cannot(str(exc)) from exc
            if digest != meta["input_digest"]:
                raise cannot("the input is not the one the shard ran with")
            start, stop = done.shard.bounds(meta["rows"])
            output = OutputWriter(done.part, store, reader, rows=stop, passthrough=dict(meta["passthrough"]),
                                  extras=extra_columns(spec, meta.get("asks", [])), start=start)
            try:
                output.write(stop)
                reader.check_unchanged()  # the passthrough just copied is the fingerprinted one
                output.finish()
            except BaseException:
                output.discard()
                raise
        finally:
            reader.close()
    finally:
        store.close()


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
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.merge.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o700)
        for n, part in enumerate(parts):
            target = tmp / dataset_part(n, len(parts))
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
