"""The :class:`Guard` protocol and :class:`Pipeline`, which composes guards around one call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext, fresh_context
from .._outcome import Classifier, classify_exception

if TYPE_CHECKING:
    from .timeout import Deadline

__all__ = ["STAGES", "Guard", "GuardBase", "Pipeline"]

T = TypeVar("T")

#: Where each kind of guard sits in a pipeline, outermost first (design.md, "Order of a guarded call"):
#: a cache hit costs no quota; identical in-flight requests share one call; batching before limiting lets one
#: permit cover many inputs; the breaker sits inside the retry so it sees (and counts) each attempt and the
#: retry sees its refusal and stops early; every attempt pays for its own permit; a concurrency slot is only
#: held while really calling.
STAGES: dict[str, int] = {
    "observe": 1,
    "fallback": 5,
    "cache": 10,
    "coalesce": 20,
    "batch": 30,
    "deadline": 40,
    "retry": 50,
    "hedge": 55,
    "breaker": 60,
    "rate_limit": 70,
    "concurrency": 80,
    "timeout": 90,
    "custom": 100,
}


@runtime_checkable
class Guard(Protocol):
    """One resilience strategy around a call.

    ``run`` must call ``call`` at most once per attempt it allows (a retry calls it several times), must never
    swallow cancellation, and reports failures by raising.
    """

    stage: ClassVar[str]

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` under this guard; ``ctx`` is the call's own context."""
        ...


class GuardBase(ABC):
    """Shared conveniences of the built-in guards: use one alone with :meth:`call`, or as a decorator.

    Subclasses set ``stage`` and ``clock`` and implement :meth:`run`.
    """

    stage: ClassVar[str] = "custom"
    #: whether every wait of the guard ends by ``ctx.deadline`` (see :func:`_plan`)
    honours_deadline: ClassVar[bool] = False
    clock: Clock
    __slots__ = ()

    @abstractmethod
    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` under this guard; ``ctx`` is the call's own context."""

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Call ``await fn(*args, **kwargs)`` under this guard alone, with a fresh context on its clock."""
        return await self.run(lambda: fn(*args, **kwargs), CallContext(clock=self.clock))

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate an async or sync function with this guard (see :func:`ragguard.decorators.guarded`)."""
        from ..decorators import guarded

        return guarded(self, fn)


class Pipeline:
    """Guards composed around a call, outermost first, in the canonical order of :data:`STAGES`.

    The guards are sorted by their ``stage`` (a stable sort, so two guards of one stage keep the order given),
    because the order is what makes them work together: e.g. a retry outside the rate limiter makes every
    attempt pay for its own permit. Pass ``ordered=False`` to keep exactly the order given.

    Args:
        *guards: the guards; a pipeline is itself a guard (stage ``custom``) and can be nested.
        clock: the clock deadlines are measured on; use the same clock for the guards.
        classify: the classifier the guards use to judge failures (default: the generic one).
        ordered: sort the guards into the canonical order (default ``True``).

    Example::

        pipeline = Pipeline(Retry(attempts=4), CircuitBreaker("search"), Timeout(5.0))
        hits = await pipeline.call(search, "query", top_k=5)
    """

    stage: ClassVar[str] = "custom"
    __slots__ = ("_first", "_fold", "_guards", "_inner", "classify", "clock")

    def __init__(
        self,
        *guards: Guard,
        clock: Clock = SYSTEM_CLOCK,
        classify: Classifier = classify_exception,
        ordered: bool = True,
    ) -> None:
        items = list(guards)
        if ordered:
            items.sort(key=lambda g: STAGES.get(getattr(g, "stage", "custom"), STAGES["custom"]))
        self._guards: tuple[Guard, ...] = tuple(items)
        runs = _plan(self._guards)
        # An outermost Deadline that delegates its enforcement only sets and restores ctx.deadline around the
        # rest: run() does that itself, which saves a layer (a partial and a coroutine, ~0.5 µs) per call.
        self._fold: Deadline | None = _foldable(self._guards[0], runs[0]) if runs else None
        if self._fold is not None:
            runs = runs[1:]
        #: the outermost run, and the others innermost first (the order run() wraps them in)
        self._first: _Run | None = runs[0] if runs else None
        self._inner: tuple[_Run, ...] = runs[:0:-1]
        self.clock = clock
        self.classify = classify

    @property
    def guards(self) -> Sequence[Guard]:
        """The guards, outermost first."""
        return self._guards

    def context(self, *, tokens: float = 0.0, requests: float = 1.0, operation: str = "call") -> CallContext:
        """A fresh :class:`CallContext` for one call through this pipeline (on its ``clock`` and ``classify``)."""
        return fresh_context(self.clock, self.classify, requests, tokens, operation)

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext | None = None) -> T:
        """Run the zero-argument async ``call`` through every guard.

        Raises:
            Whatever the guards raise (see :mod:`ragguard.errors`) or the call's own non-retried error.
        """
        if ctx is None:
            ctx = self.context()
        first = self._first
        if first is None:
            return await call()
        # partial objects, not a closure and a coroutine per layer: each layer still gets a zero-argument
        # callable it may call again (once per retry)
        for run in self._inner:
            call = partial(run, call, ctx)
        fold = self._fold
        if fold is None:
            result: T = await first(call, ctx)
            return result
        # the folded Deadline, exactly as Deadline.run_delegated: ctx.deadline = min(its own, now + seconds)
        # (DeadlineExceeded at once when an enclosing deadline has passed), restored afterwards
        seconds = fold.seconds
        if seconds is None:
            result = await first(call, ctx)
            return result
        saved = ctx.deadline
        ctx.deadline = fold._bound(seconds, ctx)[0]
        try:
            result = await first(call, ctx)
        finally:
            ctx.deadline = saved
        return result

    async def call(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Call ``await fn(*args, **kwargs)`` through the pipeline."""
        return await self.run(lambda: fn(*args, **kwargs))

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Use the pipeline as a decorator on an async or sync function (see :func:`ragguard.decorators.guarded`)."""
        from ..decorators import guarded

        return guarded(self, fn)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(type(g).__name__ for g in self._guards)})"


_Run = Callable[[Callable[[], Awaitable[Any]], CallContext], Awaitable[Any]]


def _plan(guards: tuple[Guard, ...]) -> tuple[_Run, ...]:
    """Each guard's ``run``. A total :class:`~ragguard.Deadline` delegates its enforcement to an attempt
    :class:`~ragguard.Timeout` inside it when every guard in between honours ``ctx.deadline`` in its waits: the
    attempt timeout is capped at the time left, so one cancel scope does the work of two (≈ 7 µs each). When that
    Deadline is also the outermost guard, :class:`Pipeline` folds it into ``run`` (see :func:`_foldable`)."""
    runs: list[_Run] = []
    for index, guard in enumerate(guards):
        run: _Run = guard.run
        delegated = getattr(guard, "run_delegated", None)
        if delegated is not None:
            for inner in guards[index + 1 :]:
                if getattr(inner, "enforces_deadline", False):
                    run = delegated
                    break
                if not getattr(inner, "honours_deadline", False):
                    break
        runs.append(run)
    return tuple(runs)


def _foldable(guard: Guard, run: _Run) -> Deadline | None:
    """``guard`` when it is a :class:`~ragguard.Deadline` (not a subclass, which may change what delegating
    means) that :func:`_plan` made delegate (``run`` is its ``run_delegated``), else ``None``."""
    from .timeout import Deadline  # the timeout module imports this one

    if type(guard) is Deadline and run == guard.run_delegated:
        return guard
    return None
