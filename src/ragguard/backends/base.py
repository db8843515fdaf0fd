"""What a backend is: the small protocols the guards and providers use to reach shared state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Backend", "SharedBackend"]

T = TypeVar("T")


@runtime_checkable
class Backend(Protocol):
    """Holds per-process guard objects by key (:class:`~ragguard.MemoryBackend` is the embedded one)."""

    def get_or_create(self, kind: str, key: str, factory: Callable[[], T]) -> T:
        """The object stored under ``(kind, key)``, created with ``factory()`` on first use."""
        ...

    def items(self, kind: str) -> list[tuple[str, Any]]:
        """Every ``(key, object)`` of one kind (for health reports)."""
        ...


@runtime_checkable
class SharedBackend(Backend, Protocol):
    """A backend whose state several processes share (:class:`~ragguard.RedisBackend`): rate-limit buckets,
    circuit-breaker state and cache entries live there; bulkheads, single-flight and micro-batching stay local."""

    @property
    def options(self) -> Any:
        """The backend's settings (``on_unavailable``, ``expected_instances``, ``timeout``…)."""
        ...

    def bucket_store(self) -> Any:
        """The shared token-bucket store."""
        ...

    def breaker_store(self) -> Any:
        """The shared circuit-breaker store."""
        ...

    def budget_store(self) -> Any:
        """The shared retry-budget store."""
        ...

    def cache_store(self, *, max_value_bytes: int = ...) -> Any:
        """The shared cache store (async)."""
        ...
