"""Offline token estimation.

Estimation must never touch the network (tiktoken downloads its encodings on first use). The default is an exact
tokenizer when one is available *locally* — ``tiktoken`` installed and its encoding file already in tiktoken's
cache — and otherwise OpenAI's published rule of thumb, about 4 characters of English text per token, rounded up
with a floor of one token per non-empty text. The simulators in :mod:`ragguard.testing` count with the rule of
thumb, the way OpenAI's own rate limiter estimates from the request before any tokenizer runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = [
    "TokenEstimator",
    "default_estimator",
    "estimate_chat_tokens",
    "estimate_text_tokens",
    "heuristic_estimator",
    "tiktoken_estimator",
]

#: tiktoken's encoding files: where tiktoken would fetch them from (only used to find its cache entry; ragguard
#: never fetches anything) and their SHA-256 as published in ``tiktoken_ext.openai_public``
_ENCODINGS = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

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


def _tiktoken_cache_path(url: str) -> str | None:
    # the same lookup as tiktoken.load.read_file_cached, so a file tiktoken cached is found where it left it
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest())


def tiktoken_estimator(encoding: str = "o200k_base") -> TokenEstimator | None:
    """An exact estimator from ``tiktoken``, or ``None`` when it cannot be had offline.

    Returns ``None`` unless ``tiktoken`` is installed *and* the encoding's file is already in tiktoken's cache
    (``TIKTOKEN_CACHE_DIR``, ``DATA_GYM_CACHE_DIR`` or the temp dir) with the published SHA-256 — so tiktoken
    never gets the chance to download it. ``o200k_base`` is the encoding of the GPT-4o family,
    ``cl100k_base`` of GPT-4 and the ``text-embedding-3`` models.
    """
    known = _ENCODINGS.get(encoding)
    if known is None:
        return None
    url, sha256 = known
    path = _tiktoken_cache_path(url)
    if path is None or not os.path.isfile(path):
        return None
    try:
        import tiktoken

        with open(path, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != sha256:
                return None  # tiktoken would delete it and download again: not here
        enc = tiktoken.get_encoding(encoding)
    except Exception:  # not installed, or an unreadable cache: the heuristic will do
        return None

    def count(text: str) -> int:
        return len(enc.encode(text, disallowed_special=()))

    return count


@functools.cache
def default_estimator() -> TokenEstimator:
    """The estimator :func:`ragguard.guard` uses by default: :func:`tiktoken_estimator` when available
    offline, else :func:`heuristic_estimator`. Decided once per process."""
    return tiktoken_estimator() or heuristic_estimator


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
