"""Rows to the provider: planned into batches in the ledger, then uploaded, then created;
and the batches an earlier run planned but did not see through, seen through.

Each step's intent is in the state before its remote call (see `storage.ledger`), so a
kill -9 anywhere leaves a batch whose next step a rerun knows: a batch the provider
lists under the job's fingerprint and the batch's key is adopted, never created twice;
a file uploaded is used; rows planned are uploaded again (the file is rebuilt from the
same rows, which no other batch can hold).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Iterator

from ..._exceptions import BudgetReached, ConfigError
from ...endpoints import get_endpoint
from ...engine.holds import Holds
from ...inputs.rows import Row
from ...policy.pricing import Budget
from ...policy.pricing import usd as format_usd
from ...storage.ledger import BatchRow, Entry
from .base import Batch
from .cached import cache_key
from .lines import batch_line, chunks
from .remote import call, go_on
from .session import KEY_TAG, TAG, Session

__all__ = ["cancel_duplicates", "send", "send_planned"]


def send(session: Session, wanted: Iterable[int], budget: Budget | None) -> int:
    """Send the `wanted` rows in batches within the provider's limits; the rows sent.
    Raises BudgetReached before the upload of a batch whose worst case the budget cannot
    hold (the batches before it are sent: a sent batch cannot be stopped from spending)."""
    wanted = set(wanted)
    sent = 0
    facts: dict[int, BatchRow] = {}
    for endpoint, rows in itertools.groupby(session.rows(wanted), key=lambda row: row.endpoint):
        for chunk in chunks(_lines(session, rows, facts),
                            max_rows=_most_rows(session), max_bytes=session.provider.max_bytes):
            go_on(session)  # a SIGTERM between two batches: the next is not sent
            key = secrets.token_hex(6)
            these = [facts.pop(index) for index, _ in chunk]
            hold = _hold(session, budget, these)
            session.store.ledger.plan(key, endpoint, these, time.time(), hold)
            _upload_and_create(session, key, endpoint, lambda chunk=chunk: b"".join(line for _, line in chunk), None)
            sent += len(chunk)
    return sent


def send_planned(session: Session, entries: list[Entry]) -> int:
    """See through the batches an earlier run planned but has no batch id for: adopt the
    batch the provider lists under their key, else create it (uploading first if need be).
    How many there were."""
    missing = [entry for entry in entries if entry.batch_id is None]
    if not missing:
        return 0
    found = _tagged(session)
    for entry in missing:
        go_on(session)
        if (batch := found.get(entry.key)) is not None:
            session.store.ledger.seen(entry.key, batch.state, batch.counts, batch.id)
            continue
        _upload_and_create(session, entry.key, entry.endpoint, lambda key=entry.key: _file_of(session, key),
                           entry.file_id)
    return len(missing)


def cancel_duplicates(session: Session) -> int:
    """Cancel the batches the provider lists under a key of this job's other than the one
    the state records: made twice by a retry whose first answer was lost on the way (a
    proxy's own retries, say), they would answer their rows twice. How many."""
    recorded = {entry.key: entry.batch_id for entry in session.store.ledger.entries(outstanding=True)}
    twice = [batch for batch in call(session, session.provider.tagged, session.http, TAG, session.job)
             if batch.metadata.get(KEY_TAG) in recorded and batch.id != recorded[batch.metadata[KEY_TAG]]
             and not batch.done]
    for batch in twice:
        call(session, session.provider.cancel, session.http, batch.id)
    return len(twice)


def _tagged(session: Session) -> dict[str, Batch]:
    """The job's batches the provider lists, by their key (the newest of any key twice)."""
    found: dict[str, Batch] = {}
    for batch in call(session, session.provider.tagged, session.http, TAG, session.job):
        found.setdefault(batch.metadata.get(KEY_TAG, ""), batch)
    return found


def _file_of(session: Session, key: str) -> bytes:
    """A planned batch's input file, made again from its rows (which no other batch holds)."""
    rows = set(session.store.ledger.rows(key))
    return b"".join(line for _, line in _lines(session, session.rows(rows)))


def _upload_and_create(session: Session, key: str, endpoint: str, data: Callable[[], bytes],
                       file_id: str | None) -> None:
    """Upload a planned batch's file (unless `file_id`: an earlier run uploaded it), then
    create the batch; each id recorded as soon as it is known. A file the provider no
    longer has is uploaded again; a refusal for good forgets the batch (its rows are free
    again) before it is raised."""
    provider, http, ledger = session.provider, session.http, session.store.ledger
    try:
        batch = None
        if file_id is not None:
            with contextlib.suppress(ConfigError):  # not there any more (deleted, expired)
                batch = _create(session, key, endpoint, file_id)
        if batch is None:
            file_id = call(session, provider.upload, http, f"batchrun-{session.job}-{key}.jsonl", data())
            ledger.uploaded(key, file_id)
            go_on(session)  # stopped during the upload: a rerun creates the batch from the file
            batch = _create(session, key, endpoint, file_id)
    except ConfigError as exc:
        ledger.forget(key)
        raise ConfigError(f"{exc}. Nothing of it was sent; fix the cause (batch_api.rows_per_batch for a file "
                          "too large, the account, the model) and rerun") from None
    ledger.seen(key, batch.state, batch.counts, batch.id)


def _create(session: Session, key: str, endpoint: str, file_id: str) -> Batch:
    """Create the batch, retried as any call is; but a try after one whose answer was lost
    (a timeout, a 5xx: the provider may have made the batch all the same) first looks for
    the batch under its key, so that none is made twice."""
    provider, http = session.provider, session.http
    tries = 0

    def attempt() -> Batch:
        nonlocal tries
        tries += 1
        if tries > 1 and (made := _tagged(session).get(key)) is not None:
            return made
        return provider.create(http, file_id, get_endpoint(endpoint).urls[0], {TAG: session.job, KEY_TAG: key},
                               session.spec.model)

    return call(session, attempt)


def _most_rows(session: Session) -> int:
    limits = [n for n in (session.batch.rows_per_batch, session.provider.max_rows) if n]
    return min(limits) if limits else 1_000_000


def _lines(session: Session, rows: Iterable[Row], facts: dict[int, BatchRow] | None = None,
           ) -> Iterator[tuple[int, bytes]]:
    """(row index, input line) for each row, as the live path would send it; what the
    batch keeps of each row goes in `facts`, with its worst case: a live request's at
    batch prices."""
    spec, provider = session.spec, session.provider
    holds = Holds(spec, Budget(None, None), None)
    for row in rows:
        if provider.one_model and row.body.get("model", spec.model) != spec.model:
            raise ConfigError(f"batch_api: row {row.index + 1} asks for model {row.body['model']!r}, and a "
                              f"{provider.name} batch runs one model, the spec's ({spec.model!r}); drop the rows' "
                              "model, or drop batch_api to send them live")
        body = get_endpoint(row.endpoint).build_body(row.body, spec.model, spec.params)  # once a row
        line = batch_line(provider, session.job, row, spec.model, spec.params, body)
        if facts is not None:
            model = row.body.get("model")
            price = spec.pricing.get(model or spec.model or "") if spec.pricing else None
            worst = holds.worst(price.batched() if price else None, body, len(line),
                                generates=get_endpoint(row.endpoint).generates)
            facts[row.index] = BatchRow(row.index, row.id, model if isinstance(model, str) else None,
                                        cache_key(session, row, body), worst.usd if worst else None,
                                        worst.tokens if worst else None)
        yield row.index, line


def _hold(session: Session, budget: Budget | None, facts: list[BatchRow]) -> tuple[int, float, int] | None:
    """The batch's worst case held against the budget (id, usd, tokens); BudgetReached
    when it does not fit."""
    if budget is None:
        return None
    usd = sum(fact.worst_usd or 0.0 for fact in facts)
    tokens = sum(fact.worst_tokens or 0 for fact in facts)
    hold = budget.reserve(usd, tokens)
    if hold is None:
        most = f"{format_usd(usd)} ({tokens:,} tokens)" if budget.max_usd is not None else f"{tokens:,} tokens"
        raise BudgetReached(f"the budget is reached: {budget.describe()}, and the next batch ({len(facts):,} rows) "
                            f"could cost up to {most}; a batch cannot be stopped once sent, so it was not sent. "
                            f"Raise the budget in {session.spec.name} (or lower batch_api.rows_per_batch) and rerun")
    return hold.id, hold.usd, hold.tokens
