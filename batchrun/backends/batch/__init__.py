"""The providers' batch APIs (about half the live price, answered within a day).

    base.py       the `Provider` seam: a row's request as an input line, a line read back
    openai.py     OpenAI's Files + Batches (also the LiteLLM proxy's, Together's, Groq's)
    fireworks.py  Fireworks' datasets + batch inference jobs
    lines.py      the same for every provider: the `custom_id` (the job and the row),
                  files split within the provider's limits, lines joined to their rows

The spec's `batch_api.kind` names the provider (see `spec.model.BatchApiSpec`).
"""

from __future__ import annotations

from .base import Outcome, Provider
from .fireworks import FireworksBatches
from .openai import OpenAIBatches

__all__ = ["PROVIDERS", "Outcome", "Provider"]

PROVIDERS: dict[str, Provider] = {p.name: p for p in (OpenAIBatches(), FireworksBatches())}
