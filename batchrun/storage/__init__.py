"""Where a job's files live: the SQLite checkpoint, the Parquet output, and the store
they are published to.

    base.py      the `Store` seam: what a kind of store provides, and how to add one
    local.py     a local output: the files are where they are written
    objects.py   an output on object storage (s3://, gs://, ...), mirrored locally
    transfer.py  moving files between this disk and a file system pyarrow.fs opens
    state.py     the checkpoint store (SQLite)
    output.py    the Parquet writer, in input order, atomic
    columns.py   the output columns only some jobs have
    lock.py      one runner per job
    durable.py   fsync of a file or a folder's entries

A job's store is chosen once, from its spec, by `open_store`; nothing else asks where
the output is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Store
from .local import LocalStore
from .objects import ObjectStore

if TYPE_CHECKING:
    from ..spec.parse import JobSpec

__all__ = ["LocalStore", "ObjectStore", "Store", "open_store"]


def open_store(spec: JobSpec) -> Store:
    """The store of the job's files: the kind its `output` names. Raises ConfigError for
    a URL no installed file system can open, before any request."""
    inputs = {"inputs": spec.input, "input_urls": spec.input_urls}
    if spec.output_url is not None:  # the one place that asks: a new kind adds its line here
        return ObjectStore(spec.output_url, spec.output, **inputs)
    return LocalStore(spec.output, **inputs)
