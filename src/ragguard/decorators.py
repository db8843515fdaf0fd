"""Decorators that add guards to existing functions, sync or async.

Each decorator builds one guard per decorated function (so its state — a breaker's window, a limiter's
buckets — is shared by every call of that function) and runs each call in a fresh
:class:`~ragguard.CallContext`. Async functions are awaited directly; sync functions go through the same async
core on the sync bridge (see :mod:`ragguard._sync`), so there is one implementation of every behaviour.

Stacking works the natural way: the decorator written on top is the outermost guard::

    @ragguard.retry(attempts=5)          # retries each timed-out attempt
    @ragguard.timeout(2.0)               # per attempt
    async def search(query: str) -> list[str]: ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast, overload

from . import _stateful
from ._clock import SYSTEM_CLOCK
from ._context import CallContext
from ._outcome import classify_exception
from ._sync import run_in_worker, run_sync
from .backends.base import Backend
from .config import BreakerPolicy, JitterKind, RateLimitPolicy
from .guards.breaker import CircuitBreaker
from .guards.bulkhead import ConcurrencyLimit
from .guards.limiter import RateLimiter
from .guards.pipeline import Guard
from .guards.retry import Retry
from .guards.timeout import Timeout

__all__ = ["circuit_breaker", "concurrency_limit", "guarded", "rate_limit", "retry", "timeout"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _context_factory(guard: Guard) -> Callable[[], CallContext]:
    """How to make a call's context for ``guard``, decided once per decorated function (not per call)."""
    context = getattr(guard, "context", None)
    if callable(context):
        return cast(Callable[[], CallContext], context)
    clock = getattr(guard, "clock", SYSTEM_CLOCK)
    classify = getattr(guard, "classify", classify_exception)
    return lambda: CallContext(clock=clock, classify=classify)


def guarded(
    guard: Guard,
    fn: F,
    *,
    tokens: Callable[..., float] | None = None,
    extras: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]] | None = None,
) -> F:
    """Wrap ``fn`` (sync or async) so every call runs under ``guard``; keeps its name, docstring and signature.

    Args:
        guard: any guard or :class:`~ragguard.Pipeline`.
        fn: the function to wrap.
        tokens: optional ``tokens(*args, **kwargs) -> float``, the call's token cost for a tokens-per-minute limit.
        extras: optional ``extras(args, kwargs) -> dict``, per-call data for the guards (``ctx.extras``), e.g. the
            key of a cache or coalescer.
    """

    make_context = _context_factory(guard)

    def context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallContext:
        ctx = make_context()
        if tokens is not None:
            ctx.tokens = float(tokens(*args, **kwargs))
        if extras is not None:
            ctx.extras = extras(args, kwargs)
        return ctx

    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[..., Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await guard.run(lambda: afn(*args, **kwargs), context(args, kwargs))

        return cast(F, async_wrapper)

    @functools.wraps(fn)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = context(args, kwargs)
        return run_sync(lambda: guard.run(lambda: run_in_worker(fn, *args, **kwargs), ctx))

    return cast(F, sync_wrapper)


def qualified_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function: the default name of its breaker, and part of its cache/coalesce keys."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@overload
def retry(fn: F, /) -> F: ...
@overload
def retry(
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    jitter: JitterKind = ...,
    deadline: float | None = ...,
    on: type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None = ...,
    **options: Any,
) -> Callable[[F], F]: ...
def retry(fn: F | None = None, /, **options: Any) -> F | Callable[[F], F]:
    """Retry the decorated function with jittered exponential backoff; see :class:`~ragguard.Retry` for options.

    Usable bare (``@ragguard.retry``) or configured (``@ragguard.retry(attempts=5, on=TimeoutError)``).

    Raises:
        pydantic.ValidationError: an option is invalid (raised when decorating, naming the field).
    """
    Retry(**options)  # validate now, at decoration time

    def apply(f: F) -> F:
        return guarded(Retry(**options), f)

    return apply(fn) if fn is not None else apply


def circuit_breaker(name: str | None = None, *, backend: Backend | None = None, **options: Any) -> Callable[[F], F]:
    """Protect the decorated function with a circuit breaker (one per function, or per ``name``).

    Args:
        name: the breaker's name in errors and health reports (default: the function's qualified name); with a
            shared ``backend``, every process using this name shares one breaker.
        backend: a :class:`~ragguard.RedisBackend` to share the breaker's state (open, failures, the half-open
            probe) across processes: a :class:`~ragguard.SharedCircuitBreaker`. Default: a local
            :class:`~ragguard.CircuitBreaker`.
        **options: :class:`~ragguard.CircuitBreaker` options (``failure_threshold``, ``open_duration``…).

    Raises:
        pydantic.ValidationError: (when decorating, with a backend) an invalid option, naming the field.
    """
    if backend is not None:
        clock = options.pop("clock", SYSTEM_CLOCK)
        section = BreakerPolicy(**options)

    def apply(f: F) -> F:
        label = name or qualified_name(f)
        if backend is not None:
            return guarded(_stateful.circuit_breaker(backend, label, section, clock=clock, label=label), f)
        return guarded(CircuitBreaker(label, **options), f)

    return apply


def rate_limit(
    rpm: float | None = None,
    tpm: float | None = None,
    *,
    tokens: Callable[..., float] | None = None,
    limiter: RateLimiter | None = None,
    backend: Backend | None = None,
    name: str | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Pace the decorated function with a token bucket: ``rpm`` requests and ``tpm`` tokens per minute.

    Args:
        rpm: requests per minute.
        tpm: tokens per minute; ``tokens(*args, **kwargs)`` gives each call's cost.
        tokens: the token cost of a call, computed from its arguments.
        limiter: share an existing :class:`~ragguard.RateLimiter` between functions instead of making one.
        backend: a :class:`~ragguard.RedisBackend` to share the bucket across processes (a
            :class:`~ragguard.SharedRateLimiter`; ``lease=N`` for lease mode). Default: a local limiter.
        name: with ``backend``, the bucket's name (default: the function's qualified name): every process and
            function using one name shares one quota.
        **options: other :class:`~ragguard.RateLimiter` options (``burst_seconds``, ``max_wait``…).

    Raises:
        RateLimitTimeout: (from the call) admission would have waited past ``max_wait`` or the deadline.
    """
    if backend is not None:
        if limiter is not None:
            raise TypeError("pass either limiter= or backend=, not both")
        clock = options.pop("clock", SYSTEM_CLOCK)
        section = RateLimitPolicy(rpm=rpm, tpm=tpm, **options)

        def apply_shared(f: F) -> F:
            guard = _stateful.rate_limiter(backend, name or qualified_name(f), section, clock=clock)
            return guarded(guard, f, tokens=tokens)

        return apply_shared
    shared = limiter if limiter is not None else RateLimiter(rpm=rpm, tpm=tpm, **options)

    def apply(f: F) -> F:
        return guarded(shared, f, tokens=tokens)

    return apply


def concurrency_limit(max_in_flight: int = 64, **options: Any) -> Callable[[F], F]:
    """Let at most ``max_in_flight`` calls of the decorated function run at once (a bulkhead).

    Raises:
        BulkheadFull: (from the call) the wait queue was full or ``max_wait`` ran out.
    """
    bulkhead = ConcurrencyLimit(max_in_flight=max_in_flight, **options)

    def apply(f: F) -> F:
        return guarded(bulkhead, f)

    return apply


def timeout(seconds: float) -> Callable[[F], F]:
    """Give each call of the decorated function at most ``seconds``.

    Under :func:`retry` (written below it) this is a per-attempt timeout and a timed-out attempt is retried.
    A sync function cannot be interrupted: its worker thread is abandoned and finishes on its own.

    Raises:
        AttemptTimeout: (from the call) the call took longer than ``seconds``.
    """
    guard = Timeout(seconds)

    def apply(f: F) -> F:
        return guarded(guard, f)

    return apply
