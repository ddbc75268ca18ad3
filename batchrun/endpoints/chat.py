"""POST /chat/completions: messages in, `choices[i].message` out (`delta` when streamed).

A row with only a prompt is sent as one user message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Endpoint, StreamReader
from .choices import ChoicesStream, export_choices, parse_choices
from .result import Result

__all__ = ["Chat"]


class Chat(Endpoint):
    name = "chat"
    path = "/chat/completions"
    field = "messages"
    implied = True
    template_fields = ("messages", "prompt")

    def take(self, body: dict[str, Any], field: str | None) -> str | None:
        if field == "prompt":  # (a row asks in its first field: this one has no messages)
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            return None
        return super().take(body, field)

    def parse(self, data: Any) -> Result:
        return parse_choices(data, chat=True)

    def stream(self) -> StreamReader:
        return ChoicesStream(chat=True)

    def export_body(self, answer: Mapping[str, Any], request: Mapping[str, Any], *, model: str | None,
                    created: int) -> dict[str, Any]:
        return export_choices(answer, model=model, created=created, chat=True)
