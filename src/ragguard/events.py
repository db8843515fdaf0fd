"""Event hooks: what ragguard's guards do, for users who log instead of trace.

Every event is a frozen dataclass. Subscribe a callable to one kind with :func:`subscribe` or the shortcuts
(:func:`on_call`, :func:`on_attempt`, :func:`on_retry`, :func:`on_rate_limited`, :func:`on_breaker_state_change`,
:func:`on_cache`, :func:`on_batch`, :func:`on_fallback`); each returns a :class:`Subscription` to cancel it
(also a context manager)::

    import logging, ragguard

    log = logging.getLogger("app")
    ragguard.events.on_retry(lambda e: log.warning("retry %s of %s in %.2f s", e.attempt, e.name, e.delay_s))

The subscriptions live in one process-wide registry (the documented exception to "no global mutable state",
like the default backend). Hooks run synchronously in the task that emits, so they must be quick; a hook that
raises is logged on the ``ragguard.events`` logger and ignored, never failing the call.

Events never carry secrets: no API key, no ``Authorization`` header, no request or response body, no exception
message (only its type name). Names are guard labels such as ``openai:chat.completions:gpt-4o-mini``; ``scope``
fields are credential fingerprints (a truncated sha256, never the key).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = [
    "AttemptFinished",
    "BatchFlushed",
    "BreakerStateChanged",
    "CacheAccessed",
    "CallFinished",
    "Event",
    "FallbackUsed",
    "RateLimited",
    "RetryScheduled",
    "Subscription",
    "emit",
    "has_subscribers",
    "on_attempt",
    "on_batch",
    "on_breaker_state_change",
    "on_cache",
    "on_call",
    "on_fallback",
    "on_rate_limited",
    "on_retry",
    "subscribe",
]

_log = logging.getLogger("ragguard.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event."""


@dataclass(frozen=True, slots=True)
class CallFinished(Event):
    """A guarded client call ended (one per call of a guarded OpenAI, Pinecone or method-map client).

    Attributes:
        system: the provider (``openai``, ``pinecone``, or the method-map's label).
        operation: the operation (``chat``, ``embeddings``, ``responses``, ``query``, ``upsert``…).
        model: the requested model (``""`` when none applies).
        duration_s: wall time of the whole call, seconds (waits and retries included).
        attempts: upstream attempts made (``0`` for a cache hit or a coalesced follower).
        error_type: the type name of the error the call ended with, ``None`` on success.
        input_tokens, output_tokens: as the provider reported them in ``usage`` (``None`` when not reported).
        cache_hit: answered from a cache.
        coalesced: answered by an identical in-flight call (single-flight follower).
        scope: the credential fingerprint.
        cost: the call's cost from the user's price table (:func:`ragguard.usage.set_prices`), ``None`` without one.
    """

    system: str
    operation: str
    model: str
    duration_s: float
    attempts: int
    error_type: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_hit: bool
    coalesced: bool
    scope: str
    cost: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptFinished(Event):
    """One upstream attempt ended.

    Attributes:
        system, operation, model: as in :class:`CallFinished`.
        attempt: its number, from 1.
        duration_s: seconds the provider call took.
        error_type: the error's type name, ``None`` on success.
        status_code: the HTTP status when known.
        limiter_wait_s: seconds the rate limiter held this attempt back before it was sent.
    """

    system: str
    operation: str
    model: str
    attempt: int
    duration_s: float
    error_type: str | None
    status_code: int | None
    limiter_wait_s: float


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """A retry will wait ``delay_s`` seconds before the next attempt.

    Attributes:
        name: the retrying pipeline's label (``""`` for a bare :class:`~ragguard.Retry`).
        attempt: the number of the attempt that failed.
        delay_s: the backoff, seconds.
        reason: the failure's kind (``rate_limit``, ``server``, ``timeout``, ``connection``…).
        retry_after_s: the provider's wait hint when it was followed.
        error_type: the failed attempt's error type name.
    """

    name: str
    attempt: int
    delay_s: float
    reason: str
    retry_after_s: float | None
    error_type: str


@dataclass(frozen=True, slots=True)
class RateLimited(Event):
    """A call was held back by a limit: the provider's (a 429) or ragguard's own limiter (a wait).

    Attributes:
        name: the bucket or pipeline label.
        source: ``"provider"`` (an upstream 429) or ``"limiter"`` (the local or shared limiter made it wait).
        wait_s: seconds waited (limiter) or the provider's hint (provider; ``0.0`` when none).
    """

    name: str
    source: Literal["provider", "limiter"]
    wait_s: float


@dataclass(frozen=True, slots=True)
class BreakerStateChanged(Event):
    """A circuit breaker moved between ``closed``, ``open`` and ``half_open``."""

    name: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class CacheAccessed(Event):
    """A cache lookup (``result`` ``hit`` or ``miss``) or eviction (``evicted``)."""

    layer: str
    result: Literal["hit", "miss", "evicted"]


@dataclass(frozen=True, slots=True)
class BatchFlushed(Event):
    """A micro-batch went upstream with ``size`` items from ``callers`` callers."""

    name: str
    size: int
    callers: int


@dataclass(frozen=True, slots=True)
class FallbackUsed(Event):
    """A :class:`~ragguard.Fallback` chain's primary failed with an error of type ``reason``; alternative
    ``served`` (its name; number ``index``, from 1) answered, or none did (``served`` ``None``, ``index`` 0)."""

    name: str
    served: str | None
    index: int
    reason: str


E = TypeVar("E", bound=Event)

_lock = threading.Lock()
# kind -> hooks; replaced (copy-on-write) on every change so emit() reads it without a lock
_hooks: dict[type[Event], tuple[Callable[[Any], object], ...]] = {}


class Subscription:
    """A hook's registration; :meth:`close` (or leaving its ``with`` block) removes it."""

    __slots__ = ("_fn", "_kind")

    def __init__(self, kind: type[Event], fn: Callable[[Any], object]) -> None:
        self._kind = kind
        self._fn = fn

    def close(self) -> None:
        """Stop calling the hook (idempotent)."""
        global _hooks
        with _lock:
            hooks = tuple(h for h in _hooks.get(self._kind, ()) if h is not self._fn)
            updated = dict(_hooks)
            if hooks:
                updated[self._kind] = hooks
            else:
                updated.pop(self._kind, None)
            _hooks = updated

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def subscribe(kind: type[E], fn: Callable[[E], object]) -> Subscription:
    """Call ``fn(event)`` for every event of ``kind`` (a subclass of :class:`Event`) emitted in this process.

    Raises:
        TypeError: ``kind`` is not an event class or ``fn`` is not callable.
    """
    global _hooks
    if not (isinstance(kind, type) and issubclass(kind, Event)) or kind is Event:
        raise TypeError(f"kind: expected an event class from ragguard.events, got {kind!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {fn!r}")
    with _lock:
        updated = dict(_hooks)
        updated[kind] = (*updated.get(kind, ()), fn)
        _hooks = updated
    return Subscription(kind, fn)


def has_subscribers(kind: type[Event]) -> bool:
    """Whether any hook listens for ``kind`` (lets emitters skip building an event nobody reads)."""
    return kind in _hooks


def emit(event: Event) -> None:
    """Deliver ``event`` to the hooks of its kind; a hook's exception is logged and ignored."""
    for hook in _hooks.get(type(event), ()):
        try:
            hook(event)
        except Exception:
            _log.warning("ragguard: an event hook for %s raised; ignoring it", type(event).__name__, exc_info=True)


def on_call(fn: Callable[[CallFinished], object]) -> Subscription:
    """Hook every :class:`CallFinished`."""
    return subscribe(CallFinished, fn)


def on_attempt(fn: Callable[[AttemptFinished], object]) -> Subscription:
    """Hook every :class:`AttemptFinished`."""
    return subscribe(AttemptFinished, fn)


def on_retry(fn: Callable[[RetryScheduled], object]) -> Subscription:
    """Hook every :class:`RetryScheduled`."""
    return subscribe(RetryScheduled, fn)


def on_rate_limited(fn: Callable[[RateLimited], object]) -> Subscription:
    """Hook every :class:`RateLimited`."""
    return subscribe(RateLimited, fn)


def on_breaker_state_change(fn: Callable[[BreakerStateChanged], object]) -> Subscription:
    """Hook every :class:`BreakerStateChanged`."""
    return subscribe(BreakerStateChanged, fn)


def on_cache(fn: Callable[[CacheAccessed], object]) -> Subscription:
    """Hook every :class:`CacheAccessed`."""
    return subscribe(CacheAccessed, fn)


def on_batch(fn: Callable[[BatchFlushed], object]) -> Subscription:
    """Hook every :class:`BatchFlushed`."""
    return subscribe(BatchFlushed, fn)


def on_fallback(fn: Callable[[FallbackUsed], object]) -> Subscription:
    """Hook every :class:`FallbackUsed`."""
    return subscribe(FallbackUsed, fn)
