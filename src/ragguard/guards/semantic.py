"""The index behind a semantic cache: prompt embeddings → the cache keys of their answers.

A semantic cache reuses an answer for a prompt that *means* the same as a cached one: it embeds the new prompt,
asks the index for the nearest cached prompt in the same *partition* (same model, parameters and tenant scope:
an entry never crosses partitions) and, when the cosine distance ``1 - cos θ`` is at most the threshold, serves
the answer stored under that prompt's cache key. The answers themselves stay in the exact-match
:class:`~ragguard.Cache` (its TTL, bounds and scoping apply); the index holds only vectors and keys, and a key
whose answer has expired is dropped when it is found missing.

:class:`InMemoryVectorIndex` is the embedded default: exact nearest-neighbour search over unit vectors, bounded
per partition (oldest entries dropped first). Any store with the :class:`VectorIndex` shape (e.g. a guarded
vector database shared by several processes) can replace it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from operator import mul
from typing import Protocol, runtime_checkable

import pydantic

from ..config import SemanticCachePolicy

__all__ = ["InMemoryVectorIndex", "VectorIndex", "cosine_distance"]

#: ``max_entries`` checked by :class:`~ragguard.SemanticCachePolicy`'s rule (one source of truth)
_BOUNDS = pydantic.create_model(
    "InMemoryVectorIndex", max_entries=(int, SemanticCachePolicy.model_fields["max_entries"])
)


def _unit(vector: Sequence[float]) -> tuple[float, ...] | None:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not norm or not math.isfinite(norm):
        return None  # a zero or non-finite vector has no direction: it matches nothing
    return tuple(x / norm for x in vector)


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """``1 - cos θ`` between two vectors of equal length, in ``[0, 2]`` (2 when either has no direction).

    Raises:
        ValueError: the vectors differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"vectors of different lengths: {len(a)} and {len(b)}")
    ua, ub = _unit(a), _unit(b)
    if ua is None or ub is None:
        return 2.0
    return max(0.0, 1.0 - float(sum(map(mul, ua, ub))))


@runtime_checkable
class VectorIndex(Protocol):
    """Where a semantic cache keeps prompt vectors. Implementations must keep partitions apart."""

    async def add(self, partition: str, vector: Sequence[float], key: str) -> None:
        """Remember that the prompt embedded as ``vector`` has its answer under cache key ``key``."""
        ...

    async def nearest(self, partition: str, vector: Sequence[float], max_distance: float) -> tuple[str, float] | None:
        """The cache key of the nearest prompt within ``max_distance`` (cosine distance) and its distance, or
        ``None``. Only entries added to ``partition`` are considered."""
        ...

    async def remove(self, partition: str, key: str) -> None:
        """Forget ``key`` (its answer is gone from the cache)."""
        ...


class InMemoryVectorIndex:
    """Exact nearest-neighbour search over unit vectors, in process memory, bounded per partition.

    A lookup costs one dot product per entry of the partition (about 15 µs for a 1,536-float vector in
    CPython), so keep ``max_entries`` in the low thousands, or use a vector database as the index.

    Args:
        max_entries: most vectors kept per partition (an integer ``>= 1``, as :attr:`SemanticCachePolicy.max_entries
            <ragguard.SemanticCachePolicy>`); the oldest is dropped to make room.

    Raises:
        pydantic.ValidationError: ``max_entries`` is not an integer ``>= 1`` (NaN included).
    """

    __slots__ = ("_lock", "_partitions", "max_entries")

    def __init__(self, max_entries: int = 2_000) -> None:
        self.max_entries: int = _BOUNDS(max_entries=max_entries).model_dump()["max_entries"]
        self._partitions: dict[str, OrderedDict[str, tuple[float, ...]]] = {}
        self._lock = threading.Lock()  # held for dict work only, never across an await

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._partitions.values())

    def __repr__(self) -> str:
        return f"InMemoryVectorIndex(partitions={len(self._partitions)}, entries={len(self)})"

    async def add(self, partition: str, vector: Sequence[float], key: str) -> None:
        unit = _unit(vector)
        if unit is None:
            return
        with self._lock:
            entries = self._partitions.setdefault(partition, OrderedDict())
            entries.pop(key, None)
            entries[key] = unit
            while len(entries) > self.max_entries:
                entries.popitem(last=False)

    async def nearest(self, partition: str, vector: Sequence[float], max_distance: float) -> tuple[str, float] | None:
        unit = _unit(vector)
        with self._lock:
            entries = self._partitions.get(partition)
            candidates = list(entries.items()) if entries else []
        if unit is None or not candidates:
            return None
        best_key, best = "", -2.0
        for key, other in candidates:
            if len(other) != len(unit):
                continue  # another embedding model's vector: never comparable
            similarity = float(sum(map(mul, unit, other)))
            if similarity > best:
                best_key, best = key, similarity
        distance = max(0.0, 1.0 - best)
        return (best_key, distance) if best_key and distance <= max_distance else None

    async def remove(self, partition: str, key: str) -> None:
        with self._lock:
            entries = self._partitions.get(partition)
            if entries is not None:
                entries.pop(key, None)
                if not entries:
                    del self._partitions[partition]
