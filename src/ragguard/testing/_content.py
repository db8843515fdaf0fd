"""Deterministic content for the simulators: embedding vectors and reply text, derived from the request.

Pure standard library (no numpy): vectors come from SHAKE-256 of the model and input, replies from a PRNG
seeded with SHA-256 of the prompt. The same request always gets the same answer, in every process.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import sys
from array import array
from collections.abc import Sequence

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "embedding_dimensions",
    "embedding_vector",
    "natural_reply_tokens",
    "reply_text",
    "split_stream_pieces",
    "vector_to_base64",
    "words_embedding_vector",
]

#: default output size of OpenAI's embedding models (https://platform.openai.com/docs/guides/embeddings)
DEFAULT_EMBEDDING_DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
#: dimensions of a model the simulator does not know
FALLBACK_DIMENSIONS = 1536
_BIG_ENDIAN = sys.byteorder == "big"
_INT32_SCALE = 1.0 / 2_147_483_648.0

_WORDS = (
    *("the", "index", "returns", "relevant", "passages", "for", "your", "query", "and", "a", "model"),
    *("answers", "with", "cited", "context", "retrieval", "augmented", "generation", "keeps", "responses"),
    *("grounded", "in", "documents", "vector", "search", "ranks", "chunks", "by", "similarity", "embedding"),
    *("space", "while", "retries", "backoff", "limits", "protect", "upstream", "quota", "tokens", "per"),
    *("minute", "requests", "stream", "arrives", "quickly", "simulated", "reply", "text", "is", "so"),
)


def embedding_dimensions(model: str) -> int:
    """The model's default vector size (1536 for models the simulator does not know)."""
    return DEFAULT_EMBEDDING_DIMENSIONS.get(model, FALLBACK_DIMENSIONS)


def embedding_vector(model: str, item: str | Sequence[int], dimensions: int) -> list[float]:
    """A unit vector (float32 values) for one input.

    The full-size vector comes from SHAKE-256 of ``model`` and the input; a shorter ``dimensions`` keeps its
    first components and re-normalises, the way OpenAI's shortened ``text-embedding-3`` vectors relate to the
    full ones. Values are rounded to float32 so the float and base64 encodings carry exactly the same numbers.
    """
    if isinstance(item, str):
        material = b"t\x00" + item.encode("utf-8")
    else:
        material = b"i\x00" + ",".join(str(int(token)) for token in item).encode("ascii")
    full = embedding_dimensions(model)
    digest = hashlib.shake_256(model.encode("utf-8") + b"\x00" + material).digest(4 * max(full, dimensions))
    ints = array("i")
    ints.frombytes(digest)
    if _BIG_ENDIAN:
        ints.byteswap()
    raw = [value * _INT32_SCALE for value in ints[:dimensions]]
    norm = math.sqrt(math.fsum(value * value for value in raw)) or 1.0
    return array("f", [value / norm for value in raw]).tolist()


_WORD = re.compile(r"\w+")


def words_embedding_vector(model: str, text: str, dimensions: int) -> list[float]:
    """A unit vector (float32 values) that makes texts sharing words *near*: the normalised sum of each
    lower-cased word's :func:`embedding_vector`. Two texts' cosine similarity is about the share of words they
    have in common, so paraphrases land close, as real embeddings do (for testing semantic caches)."""
    words = _WORD.findall(text.lower())
    if not words:
        return embedding_vector(model, text, dimensions)
    total = [0.0] * dimensions
    for word in words:
        for index, value in enumerate(embedding_vector(model, word, dimensions)):
            total[index] += value
    norm = math.sqrt(math.fsum(value * value for value in total)) or 1.0
    return array("f", [value / norm for value in total]).tolist()


def vector_to_base64(vector: Sequence[float]) -> str:
    """Little-endian float32 bytes, base64-encoded, as OpenAI's ``encoding_format="base64"``."""
    packed = array("f", vector)
    if _BIG_ENDIAN:
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _seed(prompt: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{index}\x00{prompt}".encode()).digest()[:8], "big")


def natural_reply_tokens(prompt: str, index: int) -> int:
    """How long the reply to ``prompt`` wants to be, in tokens: 20 to 40 (about 30), fixed by the prompt."""
    return 20 + _seed(prompt, index) % 21


def reply_text(prompt: str, index: int, tokens: int) -> str:
    """Reply number ``index`` to ``prompt``, exactly ``4 · tokens`` characters long.

    At four characters per token (:func:`ragguard._tokens.heuristic_estimator`) that is exactly ``tokens``
    tokens, so usage, limits and clients all agree.
    """
    if tokens <= 0:
        return ""
    rng = random.Random(_seed(prompt, index))
    target = 4 * tokens
    words: list[str] = []
    length = -1
    while length < target:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    text = " ".join(words)[:target]
    if text.endswith(" "):
        text = text[:-1] + "."
    return text[:1].upper() + text[1:]


_PIECE = re.compile(r"\S+\s*|\s+")


def split_stream_pieces(text: str) -> list[str]:
    """Cut a reply into the word-sized deltas of a stream (joined back they give ``text``)."""
    return _PIECE.findall(text)
