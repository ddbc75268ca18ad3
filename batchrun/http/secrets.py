"""Keeping the API key out of everything batchrun writes.

Servers echo the key they rejected, whole, cut in half by a length limit, spaced
out or broken over lines. `Redactor` removes every run of `MIN_RUN` or more of the
key's characters in a row, wherever they stand, reading past any character the key
does not contain (spaces, line breaks, quotes), so no piece of the key long enough
to help guess it survives.
"""

from __future__ import annotations

import re

__all__ = ["MIN_RUN", "REDACTED", "Redactor"]

MIN_RUN = 8  # a key shorter than this is no real key, and redacting it would garble text
REDACTED = "[redacted]"


class Redactor:
    """`redactor(text)` is `text` with every piece of the secret replaced by REDACTED."""

    def __init__(self, secret: str | None) -> None:
        secret = secret or ""
        self._grams = {secret[i:i + MIN_RUN] for i in range(len(secret) - MIN_RUN + 1)}
        # The key's own characters; everything else is a separator a piece may be split by.
        self._keyish = re.compile(f"[{re.escape(''.join(sorted(set(secret))))}]") if secret else None

    def __call__(self, text: str) -> str:
        if not self._grams or self._keyish is None or len(text) < MIN_RUN:
            return text
        positions = [m.start() for m in self._keyish.finditer(text)]
        compact = "".join(text[i] for i in positions)
        spans: list[tuple[int, int]] = []
        i = 0
        while i <= len(compact) - MIN_RUN:
            if compact[i:i + MIN_RUN] not in self._grams:
                i += 1
                continue
            end = i + MIN_RUN  # extend while the run stays made of the key's pieces
            while end < len(compact) and compact[end - MIN_RUN + 1:end + 1] in self._grams:
                end += 1
            spans.append((positions[i], positions[end - 1] + 1))
            i = end
        if not spans:
            return text
        parts, last = [], 0
        for start, stop in spans:
            parts += [text[last:start], REDACTED]
            last = stop
        parts.append(text[last:])
        return "".join(parts)
