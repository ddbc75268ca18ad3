"""The job's state, opened and checked against this input and spec before any request;
and, for `--restart`, the outputs of the progress it discards moved aside."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .._exceptions import BatchrunError, InputError, StorageError
from ..inputs.reader import InputReader
from ..inputs.template import Template
from ..spec.parse import JobSpec
from ..storage import Store
from ..storage.columns import extra_columns
from ..storage.state import StateStore, state_path
from .part import Part
from .status import StatusFile

__all__ = ["open_reader", "open_state", "set_aside"]


def open_reader(spec: JobSpec, storage: Store) -> InputReader:
    """The job's input: one reader for the whole run, so that every pass sees the version
    of the input that was fingerprinted, even if a file is replaced meanwhile."""
    template = Template(spec.template) if spec.template is not None else None
    return InputReader(storage.inputs(), endpoint=spec.endpoint, require_model=spec.model is None, template=template,
                       reserved=[column.name for column in extra_columns(spec)],
                       priced=spec.pricing if spec.budget.max_usd is not None else None,
                       bounded=spec.budget.is_set and spec.budget.assume_max_tokens is None)


def open_state(spec: JobSpec, reader: InputReader, part: Part, status: StatusFile, *, limit: int | None,
               restart: bool, before_reset: Callable[[StateStore, dict], None] | None = None,
               ) -> tuple[StateStore, int, dict[str, str], list[str]]:
    """Open (or make) the job's state and check it belongs to this input and spec.

    `before_reset`: with `restart`, what must happen to the state's progress before it is
    discarded, the job's lock held (the batch backend cancels its batches), given the state
    (empty if it was damaged: discarded as it opened) and the job's meta as this run makes
    it; if it fails, nothing is discarded and the same command can try again.

    The input is validated in full the first time; a resume whose input digest
    matches the saved one trusts the saved row count, column types and the optional
    columns its rows ask for (`InputReader.asks`). A refusal of a job that had begun
    is written to its `status` (never a running job's: its lock was not ours to take).
    """
    path = state_path(part.output)
    if restart:  # checked before anything is discarded: a bad input must not cost the progress
        digest = reader.fingerprint()
        rows, passthrough = reader.validate()
        asks = reader.asks
    fresh = not path.exists()
    store = StateStore.open(path, discard_damaged=restart)
    try:
        if not restart:
            digest = reader.fingerprint()
            saved = store.meta()
            if saved.get("input_digest") == digest:
                rows, passthrough, asks = saved["rows"], dict(saved["passthrough"]), saved.get("asks", [])
            else:
                rows, passthrough = reader.validate()
                asks = reader.asks
        clash = sorted(set(asks) & set(passthrough))
        if clash:
            raise InputError(f"{reader.name}: rows ask for {clash[0]}, an output column, and the input has a "
                             f"column of that name; rename it in the input")
        # passthrough as pairs: their order is the output's column order
        meta = {"input_digest": digest, "rows": rows, "passthrough": list(map(list, passthrough.items())),
                "request": spec.request_config()}
        if asks:  # only when rows ask: states saved before this key still match
            meta["asks"] = asks
        part.claim(meta)  # which part of the job this is, checked against the others (before a restart discards)
        if restart:
            if before_reset is not None and not fresh:
                before_reset(store, meta)
            store.reset()
        store.claim(meta, spec_name=spec.name)
    except BatchrunError as exc:
        store.close(remove=fresh)
        # A job that never began leaves nothing behind; one that did gets its status updated
        if not fresh:
            status.stopped(str(exc), exc.exit_code)  # type: ignore[attr-defined]
        raise
    return store, rows if limit is None else min(rows, limit), passthrough, asks


def set_aside(outputs: list[Path], storage: Store) -> str | None:
    """Move the outputs of a job's discarded progress out of the way (`--restart`), here
    and on the store: `x.parquet` becomes `x.parquet.before-restart`. Where the first
    one went, if it was there."""
    moved = None
    for output in outputs:
        aside = output.with_name(output.name + ".before-restart")
        try:
            if output.is_file():
                os.replace(output, aside)
                moved = moved or str(aside)
            if storage.move(output, aside):  # where it is published (a local output has moved already)
                moved = moved or str(storage.where(aside))
        except OSError as exc:
            raise StorageError(f"{output}: cannot move the output of the discarded progress aside "
                               f"({exc.strerror}); move or delete it, then rerun with --restart") from exc
    return moved
