"""Fallback: degrade instead of fail — when the primary call fails, serve from an ordered chain of alternatives.

An alternative is another model, another provider's client, a cached answer or a static answer. They are tried
in order, each once, after the primary failed with an error that says the provider cannot serve *now*:

- any ragguard refusal or give-up: :class:`~ragguard.CircuitOpenError` (the breaker is open, so the primary
  is not even called), :class:`~ragguard.RetryExhausted` and
  :class:`~ragguard.guards.budget.RetryBudgetExhausted`, :class:`~ragguard.RateLimitTimeout`,
  :class:`~ragguard.BulkheadFull`, :class:`~ragguard.DeadlineExceeded` (and :class:`~ragguard.AttemptTimeout`),
  :class:`~ragguard.BackendUnavailable` — but never :class:`~ragguard.ConfigError`, a bug to fix;
- a provider error the classifier calls retryable (5xx, 408, 409, 429, timeouts, connection errors), or a
  ``quota`` error (OpenAI's ``insufficient_quota``: another account or provider does not share the quota).

A request the provider rejected as wrong — 400, 401, 403, 404, 422 and other non-retryable 4xx — is never
served by an alternative unless the ``when`` predicate says so: the alternative would hide a bug (and might
send the same bad request elsewhere). Cancellation is never caught, so it is never turned into a fallback
(tenacity#529's lesson for retries applies here too). This is the rule of Polly v8's fallback strategy
(``FallbackStrategyOptions.ShouldHandle``) with ragguard's classification as the default predicate.

Knowing which alternative served, in increasing order of intrusiveness:

- :meth:`Fallback.stats`: how many calls each one served (``"primary"`` included) and how many ran out;
- :func:`capture_fallback`: a context manager whose record the guard fills for the calls made inside it
  (a context variable; the return value is never wrapped, so the function keeps its type);
- ``ctx.extras["fallback"]``: the serving alternative's name in the call's
  :class:`~ragguard.CallContext`, for custom guards and telemetry.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar, cast

import anyio.to_thread

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import Classifier, Outcome, classify_exception
from ..errors import ConfigError, RagGuardError
from .pipeline import GuardBase

__all__ = [
    "ARGS_EXTRA",
    "PRIMARY",
    "SERVED_EXTRA",
    "Alternative",
    "Fallback",
    "FallbackExhausted",
    "FallbackResult",
    "FallbackStats",
    "FallbackWhen",
    "capture_fallback",
    "fallback",
    "should_fall_back",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("ragguard")

#: the name :meth:`Fallback.stats` and :class:`FallbackResult` give the primary call
PRIMARY = "primary"
#: the ``ctx.extras`` entry holding the call's ``(args, kwargs)``, which alternatives are called with
ARGS_EXTRA = "fallback_args"
#: the ``ctx.extras`` entry set to the serving alternative's name when one served
SERVED_EXTRA = "fallback"

#: Which primary errors fall back: an exception type, a tuple of them, or ``when(exc, outcome) -> bool``.
FallbackWhen: TypeAlias = type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception, Outcome], bool]


class FallbackExhausted(RagGuardError):
    """The primary failed and so did every alternative. ``__cause__`` (and :attr:`primary_error`) is the
    primary's error.

    Attributes:
        primary_error: the error the primary failed with.
        errors: ``(name, error)`` of every alternative, in the order they were tried.
    """

    def __init__(self, message: str, *, primary_error: Exception, errors: Sequence[tuple[str, Exception]]) -> None:
        super().__init__(message)
        self.primary_error = primary_error
        self.errors: tuple[tuple[str, Exception], ...] = tuple(errors)


class FallbackResult:
    """Which part of a fallback chain served a call, filled in by the guard (see :func:`capture_fallback`).

    Attributes:
        served: ``"primary"``, an alternative's name, or ``None`` (nothing yet, or every alternative failed).
        index: ``0`` for the primary, ``1``… for the alternatives in order; ``None`` when nothing served.
        primary_error: the primary's error when an alternative was tried, else ``None``.
        errors: ``(name, error)`` of the alternatives that failed before one served (all of them when none did).
    """

    __slots__ = ("errors", "index", "primary_error", "served")

    def __init__(self) -> None:
        self.served: str | None = None
        self.index: int | None = None
        self.primary_error: Exception | None = None
        self.errors: tuple[tuple[str, Exception], ...] = ()

    @property
    def degraded(self) -> bool:
        """Whether the call was answered by an alternative rather than by the primary."""
        return self.index is not None and self.index > 0

    def __repr__(self) -> str:
        return (
            f"FallbackResult(served={self.served!r}, index={self.index}, "
            f"primary_error={self.primary_error!r}, errors={len(self.errors)})"
        )


class FallbackStats(NamedTuple):
    """A snapshot of a :class:`Fallback`'s counters since it was created.

    Attributes:
        served: calls served by each part of the chain, ``"primary"`` first, then the alternatives in order.
        fallbacks: calls whose primary failed and fell back (served by an alternative or exhausted).
        exhausted: calls where every alternative failed too (:class:`FallbackExhausted`).
        passed: primary errors that were not fallen back from (re-raised unchanged: a 400, a ``ConfigError``…).
    """

    served: dict[str, int]
    fallbacks: int
    exhausted: int
    passed: int


_CAPTURE: contextvars.ContextVar[FallbackResult | None] = contextvars.ContextVar("ragguard_fallback", default=None)


@contextlib.contextmanager
def capture_fallback() -> Iterator[FallbackResult]:
    """Learn which part of a fallback chain served the calls made inside the block.

    Yields a :class:`FallbackResult` that every :class:`Fallback` finishing a call in this context (in this task,
    in tasks it starts inside the block, and through the sync bridge) fills in; with several calls, the last one
    to finish wins. The calls' return values are untouched. ::

        with ragguard.capture_fallback() as served:
            answer = await ask(question)
        if served.degraded:
            log.warning("answered by %s after %r", served.served, served.primary_error)
    """
    record = FallbackResult()
    token = _CAPTURE.set(record)
    try:
        yield record
    finally:
        _CAPTURE.reset(token)


def should_fall_back(exc: Exception, outcome: Outcome) -> bool:
    """The default rule: whether a primary error is served by the alternatives (see the module docstring).

    ``True`` for ragguard's refusals and give-ups (except :class:`~ragguard.ConfigError`), for retryable provider
    errors and for ``quota`` errors; ``False`` for other non-retryable errors (400/401/403/404/422…). Compose it
    in a ``when`` predicate to widen it: ``when=lambda e, o: o.status == 404 or should_fall_back(e, o)``.
    """
    if isinstance(exc, RagGuardError):
        return not isinstance(exc, ConfigError)
    return outcome.retryable or outcome.kind == "quota"


class Alternative:
    """One link of a fallback chain: a callable (sync or async) or a static value, with a name.

    Made by :class:`Fallback` from what it is given, or explicitly with :meth:`Fallback.static` and
    :meth:`Fallback.named`.

    Attributes:
        name: how :meth:`Fallback.stats`, :class:`FallbackResult` and :class:`FallbackExhausted` call it.
    """

    __slots__ = ("_fn", "_is_async", "_static", "_takes_args", "_value", "name")

    def __init__(self, target: Any, *, name: str | None = None, static: bool = False) -> None:
        if isinstance(target, Alternative):
            raise ConfigError("an Alternative cannot wrap another one")
        if inspect.isawaitable(target):
            raise ConfigError(
                f"alternative {target!r} is an awaitable, which could be awaited only once: pass the async "
                "function itself (or Fallback.static(value) for a fixed answer)"
            )
        self._static = static or not callable(target)
        self._value: Any = target if self._static else None
        self._fn: Callable[..., Any] | None = None if self._static else target
        self._is_async = not self._static and _is_async_callable(target)
        self._takes_args = not self._static and _takes_arguments(target)
        self.name = name if name is not None else ("static" if self._static else _name_of(target))

    def __repr__(self) -> str:
        return f"Alternative({self.name!r}, static={self._static})"

    def renamed(self, name: str) -> Alternative:
        """A copy of this alternative under ``name`` (the original keeps its own)."""
        copy = object.__new__(Alternative)
        for slot in Alternative.__slots__:
            object.__setattr__(copy, slot, getattr(self, slot))
        copy.name = name
        return copy

    async def invoke(self, arguments: tuple[tuple[Any, ...], dict[str, Any]] | None) -> Any:
        """The alternative's answer: the static value, or the callable called with ``arguments`` (when known
        and it takes any), a sync callable in a worker thread (it may block)."""
        if self._static:
            return self._value
        fn = self._fn
        if fn is None:  # static alternatives return before this
            raise RuntimeError("a callable alternative without a function")
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if arguments is not None and self._takes_args:
            args, kwargs = arguments
        if self._is_async:
            return await fn(*args, **kwargs)
        # anyio's own worker threads (not the sync bridge's limiter, which belongs to the bridge's loop); an
        # abandoned thread finishes on its own if the call is cancelled meanwhile
        call = functools.partial(fn, *args, **kwargs) if (args or kwargs) else fn
        result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        if inspect.isawaitable(result):  # e.g. ``lambda: client.aget(key)``: a sync callable making a coroutine
            return await result
        return result


class Fallback(GuardBase):
    """Serve a failed call from an ordered chain of alternatives (stage ``fallback``: outermost in a pipeline).

    The primary call runs first. If it succeeds, its result is returned. If it fails with an error ``when`` lets
    through (default :func:`should_fall_back`: ragguard refusals, retryable and quota errors; never a 400-style
    error, never cancellation), each alternative is tried in order and the first to return serves the call.
    An alternative's own failure (any :class:`Exception`) moves on to the next one. An open circuit breaker
    inside the chain refuses the primary without calling it (:class:`~ragguard.CircuitOpenError`), so the
    alternatives serve at once while it is open.

    Alternatives (each given positionally, in order):

    - an ``async`` function or a sync callable: called with the call's arguments — known when the guard is used
      through :meth:`call`, as a decorator (:func:`fallback`, ``@Fallback(...)``), or when ``ctx.extras``
      holds ``{ARGS_EXTRA: (args, kwargs)}`` — or with none when it takes no parameters or the arguments are
      unknown (a plain :class:`~ragguard.Pipeline` does not pass them down). Sync callables run in a worker
      thread; a sync callable that returns an awaitable has it awaited;
    - :meth:`Fallback.static` ``(value)``, or any value that is not callable: that value, as it is (not copied);
    - :meth:`Fallback.named` ``(name, alternative)``: either of the above under a name of your choice.

    Args:
        *alternatives: the chain, tried in this order (at least one).
        when: which primary errors fall back: an exception type, a tuple of them, or ``when(exc, outcome) ->
            bool`` given the classifier's :class:`~ragguard.Outcome`; it replaces the default rule
            (:func:`should_fall_back`), and is never asked about cancellation. A ``when`` that raises is logged
            on the ``ragguard`` logger and the primary's error propagates.
        classify: the classifier of the contexts :meth:`call` and the decorator create (in a pipeline, the
            pipeline's own).
        clock: the clock of the contexts :meth:`call` and the decorator create.

    Raises:
        ConfigError: no alternative, an awaitable given as one (pass the function), or an invalid ``when``.

    :meth:`run` raises the primary's error unchanged when ``when`` does not let it fall back, and
    :class:`FallbackExhausted` (``__cause__`` = the primary's error, ``errors`` = every alternative's) when
    every alternative failed.

    Example::

        answer = Fallback(
            backup_client.chat.completions.create,   # another provider, same arguments
            cached_answer,                           # async def cached_answer(**kwargs): ...
            Fallback.static(SORRY),                  # last resort
        )
        pipeline = Pipeline(answer, Retry(), CircuitBreaker("chat"), Timeout(30.0))
    """

    stage = "fallback"
    __slots__ = (
        "_alternatives",
        "_exhausted",
        "_fallbacks",
        "_lock",
        "_passed",
        "_served",
        "_when",
        "classify",
        "clock",
    )

    def __init__(
        self,
        *alternatives: Any,
        when: FallbackWhen | None = None,
        classify: Classifier = classify_exception,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not alternatives:
            raise ConfigError("Fallback needs at least one alternative")
        chain: list[Alternative] = []
        taken = {PRIMARY}
        for position, given in enumerate(alternatives, 1):
            alternative = given if isinstance(given, Alternative) else Alternative(given)
            if alternative.name in taken:
                # names must tell the parts apart in stats and errors: a second "static" in third place is
                # "static#3" (a copy: the caller's Alternative keeps its name)
                alternative = alternative.renamed(f"{alternative.name}#{position}")
            taken.add(alternative.name)
            chain.append(alternative)
        self._alternatives: tuple[Alternative, ...] = tuple(chain)
        self._when = _predicate(when)
        self.classify = classify
        self.clock = clock
        self._lock = threading.Lock()  # guards the counters only (a few integer updates)
        self._served = [0] * (len(chain) + 1)
        self._fallbacks = self._exhausted = self._passed = 0

    @staticmethod
    def static(value: Any, *, name: str = "static") -> Alternative:
        """An alternative that answers with ``value`` itself (use it for a value that happens to be callable)."""
        return Alternative(value, name=name, static=True)

    @staticmethod
    def named(name: str, alternative: Any) -> Alternative:
        """``alternative`` (a callable or a static value) under ``name`` in stats, results and errors."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name: expected a non-empty string, got {name!r}")
        if isinstance(alternative, Alternative):
            return alternative.renamed(name)
        return Alternative(alternative, name=name)

    @property
    def alternatives(self) -> Sequence[Alternative]:
        """The chain, in the order it is tried."""
        return self._alternatives

    def __repr__(self) -> str:
        return f"Fallback({', '.join(repr(a.name) for a in self._alternatives)})"

    def stats(self) -> FallbackStats:
        """Calls served by each part of the chain, and the fallen-back, exhausted and passed-through counts."""
        names = [PRIMARY, *(a.name for a in self._alternatives)]
        with self._lock:
            return FallbackStats(
                served=dict(zip(names, self._served, strict=True)),
                fallbacks=self._fallbacks,
                exhausted=self._exhausted,
                passed=self._passed,
            )

    # --- the guard ----------------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` (zero-argument, async); if it fails with an error that falls back, run the alternatives.

        Raises:
            FallbackExhausted: the primary and every alternative failed.
            Exception: the primary's own error, unchanged, when it does not fall back.
        """
        try:
            result = await call()
        except Exception as exc:  # cancellation (a BaseException) is never caught, so never fallen back from
            if not self._falls_back(exc, ctx):
                with self._lock:
                    self._passed += 1
                raise
            primary_error = exc
        else:
            with self._lock:
                self._served[0] += 1
            record = _CAPTURE.get()
            if record is not None:
                _fill(record, PRIMARY, 0, None, ())
            return result
        # outside the except block, so an alternative's error is not chained to the primary's by accident
        return cast(T, await self._degrade(primary_error, ctx))

    async def _degrade(self, primary_error: Exception, ctx: CallContext) -> Any:
        extras = ctx.extras
        arguments = extras.get(ARGS_EXTRA) if extras is not None else None
        errors: list[tuple[str, Exception]] = []
        record = _CAPTURE.get()
        for index, alternative in enumerate(self._alternatives, 1):
            try:
                value = await alternative.invoke(arguments)
            except Exception as exc:  # this alternative failed too: the next one may serve
                errors.append((alternative.name, exc))
                continue
            with self._lock:
                self._served[index] += 1
                self._fallbacks += 1
            if record is not None:
                _fill(record, alternative.name, index, primary_error, errors)
            telemetry.fallback_used(ctx.operation, alternative.name, index, primary_error)
            if ctx.extras is None:
                ctx.extras = {}
            ctx.extras[SERVED_EXTRA] = alternative.name
            return value
        with self._lock:
            self._fallbacks += 1
            self._exhausted += 1
        if record is not None:
            _fill(record, None, None, primary_error, errors)
        telemetry.fallback_used(ctx.operation, None, 0, primary_error)
        tried = "; ".join(f"{name}: {_describe(exc)}" for name, exc in errors)
        raise FallbackExhausted(
            f"{ctx.operation!r} failed ({_describe(primary_error)}) and every alternative failed too: {tried}",
            primary_error=primary_error,
            errors=errors,
        ) from primary_error

    def _falls_back(self, exc: Exception, ctx: CallContext) -> bool:
        try:
            return self._when(exc, ctx.classify(exc))
        except Exception:  # a broken predicate must not hide the primary's error
            _log.exception("ragguard: Fallback could not judge %r; re-raising it", exc)
            return False

    # --- standalone use -----------------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Call ``await fn(*args, **kwargs)`` under this fallback; alternatives get the same arguments."""
        ctx = CallContext(clock=self.clock, classify=self.classify)
        ctx.extras = {ARGS_EXTRA: (args, kwargs)}
        return await self.run(lambda: fn(*args, **kwargs), ctx)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate an async or sync function; alternatives are called with the function's arguments."""
        from ..decorators import guarded

        return guarded(self, fn, extras=_arguments_extra)


def fallback(
    *alternatives: Any,
    when: FallbackWhen | None = None,
    classify: Classifier = classify_exception,
    clock: Clock = SYSTEM_CLOCK,
) -> Callable[[F], F]:
    """Serve the decorated function (sync or async) from ``alternatives`` when it fails; see :class:`Fallback`.

    One :class:`Fallback` per decorated function; alternatives receive the function's arguments (or none, when
    they take no parameters). Written above other ragguard decorators, it sees what they raise::

        @ragguard.fallback(backup_search, Fallback.static([]))
        @ragguard.circuit_breaker("search")     # open: backup_search answers without calling search
        @ragguard.retry(attempts=3)
        async def search(query: str) -> list[str]: ...

    Raises:
        ConfigError: (when decorating) no alternative, or an invalid one or ``when``.
    """
    Fallback(*alternatives, when=when, classify=classify, clock=clock)  # validate now, at decoration time

    def apply(fn: F) -> F:
        guard = Fallback(*alternatives, when=when, classify=classify, clock=clock)
        return cast(F, guard(fn))

    return apply


# --- helpers ----------------------------------------------------------------------------------------------------


def _arguments_extra(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {ARGS_EXTRA: (args, kwargs)}


def _fill(
    record: FallbackResult,
    served: str | None,
    index: int | None,
    primary_error: Exception | None,
    errors: Sequence[tuple[str, Exception]],
) -> None:
    record.served = served
    record.index = index
    record.primary_error = primary_error
    record.errors = tuple(errors)


def _predicate(when: FallbackWhen | None) -> Callable[[Exception, Outcome], bool]:
    if when is None:
        return should_fall_back
    if isinstance(when, type):
        if not issubclass(when, BaseException):
            raise ConfigError(f"when: {when!r} is not an exception type")
        one = when
        return lambda exc, outcome: isinstance(exc, one)
    if isinstance(when, tuple):
        if not when or not all(isinstance(t, type) and issubclass(t, BaseException) for t in when):
            raise ConfigError(f"when: a tuple must hold exception types only, got {when!r}")
        types = when
        return lambda exc, outcome: isinstance(exc, types)
    if callable(when):
        return when
    raise ConfigError(f"when: expected an exception type, a tuple of them or a predicate, got {when!r}")


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    # an instance whose class defines ``async def __call__`` (``fn`` is callable, so its type has one)
    return inspect.iscoroutinefunction(type(fn).__call__)


def _takes_arguments(fn: Any) -> bool:
    """Whether ``fn`` declares any parameter (a builtin whose signature cannot be read is assumed to)."""
    try:
        return bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return True


def _name_of(fn: Any) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__
    return name.rpartition("<locals>.")[2]  # "make_chain.<locals>.cached" reads as "cached"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
