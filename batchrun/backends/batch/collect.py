"""A finished batch's answers into the state: its files downloaded, each line joined to
its row, every row of the batch settled or handed on, in one transaction.

    answered      the row's Result, as a live answer's: cost at batch prices, `backend`
                  "batch", a schema's `parsed` (an answer that breaks the schema is asked
                  again live, where re-asks happen)
    refused       a line the batch refused with a 4xx: a failed row, like a live 4xx
    unanswered    expired, cancelled, failed with the batch, or no line at all: handed to
                  the live engine (`fallback: live`), or a failed row with the provider's
                  word (`fallback: none`; `--retry-failed` sends it again)

Lines of other jobs, of rows not in this batch, or that do not read are passed over:
their rows, with no answer, are unanswered, never lost. Collection commits with the
ledger's change (`Ledger.collecting`), so a kill before the commit collects the batch
again from the provider's files, and after it never.
"""

from __future__ import annotations

from ...endpoints import get_endpoint
from ...endpoints.base import Endpoint
from ...endpoints.result import Result
from ...policy.pricing import cost
from ...spec.schema import Structure
from ...storage.ledger import Entry
from .base import Batch, Outcome
from .cached import remember
from .lines import read_line
from .remote import call
from .session import Session

__all__ = ["BACKEND", "collect"]

BACKEND = "backend"  # the output column, and its key in a result's extra


def collect(session: Session, entry: Entry, batch: Batch) -> tuple[int, int]:
    """Save what `batch` (entry's, finished) answered; (rows answered, rows handed on)."""
    asked = session.store.ledger.asked(entry.key)  # each row's id, model (its price) and cache key
    rows = sorted(asked)
    outcomes = _outcomes(session, batch, get_endpoint(entry.endpoint), set(asked))
    schema = session.spec.answer_schema()
    structure = Structure(schema) if schema is not None else None
    live = session.batch.fallback == "live"
    results: list[Result] = []
    unanswered: dict[int, str] = {}
    for index in rows:
        outcome = outcomes.get(index)
        result = outcome.result if outcome is not None else None
        why = (outcome.unanswered if outcome is not None else None) or _why(batch)
        if result is not None and result.status == "ok" and structure is not None:
            parsed, problem = structure.problem(result.output_text)
            if problem is None:
                result.extra = {**(result.extra or {}), "parsed": parsed}
            elif live:  # re-asks are the live path's
                result, why = None, f"its answer breaks the schema ({problem})"
            else:
                result = Result(index, "", "failed", error=f"the batch's answer breaks the schema: {problem}",
                                output_text=result.output_text, model=result.model)
        if result is None and live:
            unanswered[index] = why
            continue
        if result is None:
            result = Result(index, "", "failed", error=f"the batch did not answer it ({batch.state}): {why}")
        _, row_id, model, _ = asked[index]
        results.append(_settled(session, result, row_id, model or session.spec.model))
    session.store.save(results, released=[entry.hold] if entry.hold is not None else [],
                       also=session.store.ledger.collecting(entry.key, unanswered))
    remember(session, ((asked[r.row_index][3], r) for r in results))
    return len(results), len(unanswered)


def _outcomes(session: Session, batch: Batch, endpoint: Endpoint, rows: set[int]) -> dict[int, Outcome]:
    """Each row's word from the batch's files; an answer beats a line that says none."""
    outcomes: dict[int, Outcome] = {}
    for file, from_errors in ((batch.output_file, False), (batch.error_file, True)):
        if not file:
            continue
        data = call(session, session.provider.download, session.http, file)
        for line in data.splitlines():
            outcome = read_line(session.provider, line, session.job, lambda _: endpoint, from_errors=from_errors)
            if outcome is None or outcome.row_index not in rows:
                continue
            known = outcomes.get(outcome.row_index)
            if known is None or known.result is None:
                outcomes[outcome.row_index] = outcome
    return outcomes


def _why(batch: Batch) -> str:
    errors = "; ".join(batch.errors[:3])
    return f"the batch {batch.state} without an answer for it" + (f" ({errors})" if errors else "")


def _settled(session: Session, result: Result, row_id: str, model: str | None) -> Result:
    """A row's Result as the state keeps it: its id, one attempt, cost at batch prices,
    a failure final (a 4xx, an answer that breaks the schema), the path that answered."""
    result.id, result.attempts = row_id, 1
    if result.status != "ok":
        result.transient = False
    price = session.spec.pricing.get(model or "") if session.spec.pricing else None
    if price is not None and result.status == "ok":
        result.cost_usd = cost(price.batched(), result.prompt_tokens, result.completion_tokens, result.cached_tokens)
    result.extra = {**(result.extra or {}), BACKEND: "batch"}
    return result
