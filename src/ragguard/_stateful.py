"""The guards whose state a backend holds, made for a backend: local objects for a :class:`MemoryBackend`,
shared ones (Redis) for a :class:`~ragguard.backends.base.SharedBackend`. Used by providers and decorators so
both build the same guard for the same backend, policy and name."""

from __future__ import annotations

from typing import Any

from ._clock import Clock
from .backends.base import Backend, SharedBackend
from .config import BreakerPolicy, CachePolicy, RateLimitPolicy, RetryBudgetPolicy
from .guards._cache_store import AsyncCacheStore, CacheStore, MemoryCacheStore
from .guards.breaker import CircuitBreaker
from .guards.budget import RetryBudget, SharedRetryBudget
from .guards.limiter import RateLimiter
from .guards.pipeline import Guard

__all__ = ["cache_store", "circuit_breaker", "is_shared", "rate_limiter", "retry_budget"]


def is_shared(backend: Backend) -> bool:
    """Whether ``backend`` shares state between processes (it offers the shared stores)."""
    return isinstance(backend, SharedBackend)


def rate_limiter(backend: Backend, name: str, section: RateLimitPolicy, *, clock: Clock) -> Guard:
    """The rate limiter of bucket ``name``: one per backend, name and settings."""
    key = f"{name}:{section.model_dump_json()}"
    if isinstance(backend, SharedBackend):
        from .guards.shared_limiter import SharedRateLimiter

        shared: SharedBackend = backend
        return backend.get_or_create(
            "shared_rate_limit",
            key,
            lambda: SharedRateLimiter.from_policy(section, store=shared, name=name, clock=clock),
        )
    return backend.get_or_create("rate_limit", key, lambda: RateLimiter.from_policy(section, clock=clock, name=name))


def circuit_breaker(backend: Backend, name: str, section: BreakerPolicy, *, clock: Clock, label: str = "") -> Guard:
    """The circuit breaker ``name`` (one per backend, name and settings); ``label`` names it in errors."""
    key = f"{name}:{section.model_dump_json()}"
    if isinstance(backend, SharedBackend):
        from .guards.shared_breaker import SharedCircuitBreaker

        shared: SharedBackend = backend
        return backend.get_or_create(
            "shared_breaker",
            key,
            lambda: SharedCircuitBreaker.from_policy(section, store=shared, name=name, clock=clock),
        )
    return backend.get_or_create(
        "breaker", key, lambda: CircuitBreaker.from_policy(section, name=label or name, clock=clock)
    )


def retry_budget(
    backend: Backend, name: str, section: RetryBudgetPolicy, *, clock: Clock
) -> RetryBudget | SharedRetryBudget:
    """The retry budget ``name`` (one per backend, name and settings): a :class:`SharedRetryBudget` on a backend
    that offers a budget store (``budget_store()``, e.g. :class:`~ragguard.RedisBackend`), so every process spends
    one budget; else a local :class:`RetryBudget`. ``section.enabled`` is the caller's business."""
    key = f"{name}:{section.model_dump_json()}"
    if isinstance(backend, SharedBackend):
        shared: Any = backend
        return backend.get_or_create(
            "shared_retry_budget",
            key,
            lambda: SharedRetryBudget.from_policy(section, store=shared, name=name, clock=clock),
        )
    return backend.get_or_create(
        "retry_budget",
        key,
        lambda: RetryBudget(
            section.ratio, section.min_retries_per_s, section.window_s, buckets=section.buckets, clock=clock
        ),
    )


def cache_store(backend: Backend, section: CachePolicy, *, clock: Clock) -> CacheStore | AsyncCacheStore:
    """Where cache entries live: the shared store of a shared backend, else one in-memory LRU store per backend
    and size (bounded by ``section.max_entries`` and ``max_bytes``)."""
    if isinstance(backend, SharedBackend):
        store: Any = backend.cache_store()
        return store  # type: ignore[no-any-return]
    return backend.get_or_create(
        "cache_store",
        f"{section.max_entries}:{section.max_bytes}",
        lambda: MemoryCacheStore(section.max_entries, section.max_bytes, clock=clock),
    )
