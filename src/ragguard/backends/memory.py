"""The embedded, in-process backend: one guard instance per key, shared by every client that uses it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["MemoryBackend", "default_backend"]

T = TypeVar("T")


class MemoryBackend:
    """Shared state in process memory.

    Guarded clients ask the backend for their stateful guards by key (e.g. the rate limiter of one credential
    and model, the breaker of one endpoint): two clients with the same API key get the same limiter, so they
    share one quota, as the provider does. Keys never hold secrets in clear (providers hash credentials).
    Thread-safe.
    """

    __slots__ = ("_lock", "_objects")

    def __init__(self) -> None:
        # re-entrant: a factory may itself get or create objects (a shared breaker asks for its store)
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str], Any] = {}

    def get_or_create(self, kind: str, key: str, factory: Callable[[], T]) -> T:
        """The object stored under ``(kind, key)``, created with ``factory()`` on first use."""
        found = self._objects.get((kind, key))
        if found is not None:
            return found  # type: ignore[no-any-return]
        with self._lock:
            found = self._objects.get((kind, key))
            if found is None:
                found = factory()
                self._objects[(kind, key)] = found
            return found

    def items(self, kind: str) -> list[tuple[str, Any]]:
        """Every ``(key, object)`` of one kind (for health reports)."""
        with self._lock:
            return [(key, obj) for (k, key), obj in self._objects.items() if k == kind]

    def clear(self) -> None:
        """Forget every stored object (tests; a fresh start after reconfiguration)."""
        with self._lock:
            self._objects.clear()


_DEFAULT = MemoryBackend()


def default_backend() -> MemoryBackend:
    """The process-wide default backend (an explicit, documented registry).

    ``ragguard.guard(client)`` without ``backend=`` uses it, so every guarded client of one API key and model in
    the process shares one rate limit and one breaker, as the provider sees them.
    """
    return _DEFAULT
