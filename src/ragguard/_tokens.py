"""Offline token estimation.

The default estimator must work with no network (tiktoken downloads its encodings on first use), so it uses
OpenAI's published rule of thumb — about 4 characters of English text per token — rounded up, with a floor of
one token per non-empty text. The simulators in :mod:`ragguard.testing` count with the same function, the way
OpenAI's own rate limiter counts from the request before any tokenizer runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["TokenEstimator", "estimate_chat_tokens", "estimate_text_tokens", "heuristic_estimator"]

#: characters per token in OpenAI's rule of thumb ("1 token ≈ 4 characters of English text")
CHARS_PER_TOKEN = 4
#: OpenAI's chat format adds about 3 tokens per message and 3 to prime the reply
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class TokenEstimator(Protocol):
    """Counts the tokens of one text. Must be pure, fast and offline."""

    def __call__(self, text: str) -> int: ...


def heuristic_estimator(text: str) -> int:
    """``ceil(len(text) / 4)`` tokens, at least 1 for a non-empty text, 0 for an empty one."""
    if not text:
        return 0
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def estimate_text_tokens(inputs: str | Iterable[Any], estimator: TokenEstimator = heuristic_estimator) -> int:
    """Tokens of an embeddings-style input: a string, or a list of strings (token-id lists count their length)."""
    if isinstance(inputs, str):
        return estimator(inputs)
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += estimator(item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, (list, tuple)):
            total += len(item)
    return total


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multi-part content: count the text parts
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def estimate_chat_tokens(messages: Iterable[Any], estimator: TokenEstimator = heuristic_estimator) -> int:
    """Prompt tokens of a chat request: each message's text plus OpenAI's per-message framing."""
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            total += estimator(_content_text(message.get("content")))
            name = message.get("name")
            if isinstance(name, str):
                total += estimator(name)
        else:
            total += estimator(_content_text(getattr(message, "content", "")))
    return total
