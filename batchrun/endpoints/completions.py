"""POST /completions: a prompt in, `choices[i].text` out.

A schema is not sent (the endpoint has no structured-output format); answers are
still validated against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Endpoint, StreamReader
from .choices import ChoicesStream, export_choices, parse_choices
from .result import Result

__all__ = ["Completions"]


class Completions(Endpoint):
    name = "completions"
    path = "/completions"
    field = "prompt"
    implied = True
    template_fields = ("prompt",)

    def ask_for_schema(self, params: dict[str, Any], named: Mapping[str, Any]) -> None:
        return None

    def parse(self, data: Any) -> Result:
        return parse_choices(data, chat=False)

    def stream(self) -> StreamReader:
        return ChoicesStream(chat=False)

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        return export_choices(answer, model=model, created=created, chat=False)
