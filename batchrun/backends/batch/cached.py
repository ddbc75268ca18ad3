"""The response cache (`cache:`) on the batch path, as on the live one: a row it can answer
is answered from it and never sent (nothing paid), and what a batch answers is added to
it, under the key the live path would use (the live API's URL and the exact body), so
that live runs and batch runs of any job share it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...endpoints import get_endpoint
from ...endpoints.result import Result
from ...engine.cache import cacheable, from_cache
from ...http.client import endpoint_url
from ...inputs.rows import Row
from ...spec.urls import MOCK_BASE_URL, MOCK_SCHEME
from .session import Session

__all__ = ["answer_from_cache", "cache_key", "remember"]

SAVE_EVERY = 1000  # answers from the cache saved in one transaction


def cache_key(session: Session, row: Row, body: Mapping[str, Any] | None = None) -> str | None:
    """The row's request's key in the cache (`body`: the request, if built already); None
    without a cache, or for a request the cache may not answer (not deterministic;
    embeddings, which go several to a request)."""
    cache, spec = session.cache, session.spec
    endpoint = get_endpoint(row.endpoint)
    if cache is None or endpoint.grouped:
        return None
    if body is None:
        body = endpoint.build_body(row.body, spec.model, spec.params)
    if not cacheable(body, everything=cache.spec.everything):
        return None
    base = MOCK_BASE_URL if spec.api.base_url.startswith(MOCK_SCHEME) else spec.api.base_url
    return cache.key(str(endpoint_url(base, row.endpoint)), body)


def answer_from_cache(session: Session, wanted: list[int]) -> list[int]:
    """Answer from the cache what it holds of the `wanted` rows, saved in the state; the
    rows it does not hold, to be sent."""
    if session.cache is None:
        return wanted
    rest: list[int] = []
    answered: list[Result] = []
    for row in session.rows(set(wanted)):
        key = cache_key(session, row)
        hit = session.cache.get(key) if key is not None else None
        if hit is None:
            rest.append(row.index)
            continue
        model = row.body.get("model") or session.spec.model
        price = session.spec.pricing.get(model or "") if session.spec.pricing else None
        # What it saved: a batch's answer, at batch prices
        answered.append(from_cache(hit, row.index, row.id, price.batched() if price else None, None))
        if len(answered) >= SAVE_EVERY:
            session.store.save(answered)
            answered = []
    session.store.save(answered)
    return rest


def remember(session: Session, answers: Iterable[tuple[str | None, Result]]) -> None:
    """Add a batch's answers (key, result), once the state has them, to the cache."""
    if session.cache is not None:
        session.cache.put((key, result) for key, result in answers if key is not None and result.status == "ok")
