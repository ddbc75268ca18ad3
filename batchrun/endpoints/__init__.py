"""The endpoints batchrun sends to, one module each; the seam is `base.Endpoint`.

    chat         POST /chat/completions   messages -> choices
    completions  POST /completions        prompt   -> choices
    responses    POST /responses          input    -> output items
    embeddings   POST /embeddings         input    -> a vector (several rows a request)

Each builds a request body, reads a whole answer and reads a stream. Adding one is a
module and a line in `ENDPOINTS`; the client and the runner do not change.
"""

from __future__ import annotations

from .base import Endpoint, StreamReader
from .chat import Chat
from .completions import Completions
from .embeddings import Embeddings
from .responses import Responses

__all__ = ["ENDPOINTS", "Endpoint", "StreamReader", "get_endpoint"]

ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (Chat(), Completions(), Responses(), Embeddings())}


def get_endpoint(name: str) -> Endpoint:
    return ENDPOINTS[name]
