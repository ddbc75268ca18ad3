"""`mock://`: an OpenAI-compatible endpoint served in-process, for trying batchrun out.

It answers chat and completion requests, streaming included, with a short
deterministic text and honest token counts (whitespace words), so a newcomer can
run the example job with no account and no network.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx

from ..spec.urls import MOCK_BASE_URL, MOCK_SCHEME

__all__ = ["MOCK_BASE_URL", "MOCK_SCHEME", "mock_transport"]


def mock_transport() -> httpx.MockTransport:
    return httpx.MockTransport(_handle)


def _handle(request: httpx.Request) -> httpx.Response:
    try:
        body = json.loads(request.content)
    except ValueError:
        return _error(400, "the request body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    path = request.url.path.rstrip("/")
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages: a non-empty list is required")
        last = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        asked = last if isinstance(last, str) else json.dumps(last)
        prompt_words = sum(len(json.dumps(m).split()) for m in messages)
        chat = True
    elif path.endswith("/completions"):
        if not isinstance(body.get("prompt"), str):
            return _error(400, "prompt: a string is required")
        asked = body["prompt"]
        prompt_words = len(asked.split())
        chat = False
    else:
        return _error(404, f"no such endpoint: {request.url.path}")

    text = _answer(asked, body.get("max_tokens"))
    usage = {
        "prompt_tokens": prompt_words,
        "completion_tokens": len(text.split()),
        "total_tokens": prompt_words + len(text.split()),
    }
    response_id = "mock-" + hashlib.sha256(request.content).hexdigest()[:16]
    model = body.get("model") or "mock-model"
    if body.get("stream"):
        return _stream(response_id, model, chat, text, usage)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    data = {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
    return httpx.Response(200, json=data)


def _answer(asked: str, max_tokens: Any) -> str:
    words = f"(mock answer) You asked: {asked}".split()
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = words[:max_tokens]
    return " ".join(words)


def _stream(response_id: str, model: str, chat: bool, text: str, usage: dict[str, int]) -> httpx.Response:
    """Fireworks' shape: one chunk per word, usage in the chunk with finish_reason."""
    words = text.split(" ")
    events = []
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        last = i == len(words) - 1
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if last else None}
        if chat:
            choice["delta"] = {"content": piece, **({"role": "assistant"} if i == 0 else {})}
        else:
            choice["text"] = piece
        chunk = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "model": model,
            "choices": [choice],
            "usage": usage if last else None,
        }
        events.append(f"data: {json.dumps(chunk)}\n\n")
    events.append("data: [DONE]\n\n")
    return httpx.Response(200, content="".join(events).encode(), headers={"content-type": "text/event-stream"})


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error"}})
