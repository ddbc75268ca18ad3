"""POST /completions: a prompt in, `choices[i].text` out."""

from __future__ import annotations

from typing import Any

from .base import Endpoint, StreamReader
from .choices import ChoicesStream, parse_choices
from .protocol import Result

__all__ = ["Completions"]


class Completions(Endpoint):
    name = "completions"
    path = "/completions"

    def parse(self, data: Any) -> Result:
        return parse_choices(data, chat=False)

    def stream(self) -> StreamReader:
        return ChoicesStream(chat=False)
