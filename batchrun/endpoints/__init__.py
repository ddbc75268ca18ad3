"""The endpoints batchrun sends to, one module each; the seam is `base.Endpoint`.

    chat         POST /chat/completions   messages -> choices
    completions  POST /completions        prompt   -> choices
    responses    POST /responses          input    -> output items
    embeddings   POST /embeddings         input    -> a vector (several rows a request)

Each says which rows it takes, builds a request body, reads a whole answer and a
stream, and rebuilds an answer for export (see `base.Endpoint` for the whole list).

To add an endpoint: write its module (a subclass of `Endpoint`), then add one
instance to `ENDPOINTS` below. The spec's `endpoint:` values, the batch-line URLs
the input may name, the rows' shapes, the client and the runner all follow from
this registry; nothing else changes. The order is the order messages list them in.

    sse.py     server-sent events, read for every endpoint's `StreamReader`
    result.py  `Result`, one settled row, and the helpers answers are read with
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Endpoint, StreamReader
from .chat import Chat
from .completions import Completions
from .embeddings import Embeddings
from .responses import Responses

__all__ = ["DEFAULT", "ENDPOINTS", "Endpoint", "StreamReader", "endpoint_at", "field_of", "get_endpoint",
           "implied_by", "job_endpoint", "taking"]

ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (Chat(), Completions(), Responses(), Embeddings())}

# A spec that names no endpoint: each row goes where its field says (`implied_by`), and
# the job's own rules (which fields are requests, where a schema goes, what a budget
# needs, what export makes) are this endpoint's.
DEFAULT = "chat"


def get_endpoint(name: str) -> Endpoint:
    return ENDPOINTS[name]


def job_endpoint(name: str | None) -> Endpoint:
    """The endpoint whose rules a job follows: the one its spec names, else `DEFAULT`'s."""
    return ENDPOINTS[name or DEFAULT]


def endpoint_at(url: str) -> Endpoint | None:
    """The endpoint a batch line's `url` names (with or without /v1), or None."""
    return next((e for e in ENDPOINTS.values() if url in e.urls), None)


def field_of(body: Mapping[str, Any]) -> str | None:
    """The field a row asks in: the first, in the registry's order, that it gives a value."""
    return next((e.field for e in ENDPOINTS.values() if body.get(e.field) is not None), None)


def implied_by(field: str | None) -> Endpoint | None:
    """The endpoint a row asking in `field` goes to when the spec names none; None where
    the spec must say (several endpoints take the field, or none does)."""
    return next((e for e in ENDPOINTS.values() if e.implied and e.field == field), None)


def taking(field: str) -> list[str]:
    """The names of the endpoints whose rows ask in `field`."""
    return [e.name for e in ENDPOINTS.values() if e.field == field]
