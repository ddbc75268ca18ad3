"""POST /chat/completions: messages in, `choices[i].message` out (`delta` when streamed)."""

from __future__ import annotations

from typing import Any

from .base import Endpoint, StreamReader
from .choices import ChoicesStream, parse_choices
from .protocol import Result

__all__ = ["Chat"]


class Chat(Endpoint):
    name = "chat"
    path = "/chat/completions"

    def parse(self, data: Any) -> Result:
        return parse_choices(data, chat=True)

    def stream(self) -> StreamReader:
        return ChoicesStream(chat=True)
