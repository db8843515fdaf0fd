"""Degradation modes at run time: "degrade instead of fail".

:class:`~ragguard.DegradePolicy` (``Policy.degrade``) says *when* a guarded call is degraded and *what* it then
does; this module decides the *when* for one pipeline (:class:`Degrader`) and records what happened
(:func:`last_degradation`). The provider modules apply the modes: the OpenAI client serves from the cache only
or returns the app's retrieved context instead of generating (``skip_generation``); the Pinecone index asks for
a smaller ``top_k`` or serves queries from the retrieval cache only.

Triggers, read for the pipeline the call would use (its own breaker, bulkhead and rate limiter):

- ``breaker_open``: checked before the call when the breaker is local (its state is ``open``, no I/O), and
  *after* a refusal otherwise: a :class:`~ragguard.CircuitOpenError` raised by the pipeline (a half-open
  breaker whose probes are taken, a shared breaker open in Redis) degrades the call instead of failing it. A
  half-open breaker is never degraded before the call, so probes still reach the provider and the breaker can
  close again.
- ``overloaded``: before the call, from local state only (no I/O): the bulkhead's queue
  (``max_queue``: a call that would wait for a slot behind more than that many callers) or the local rate
  limiter's wait for this call's cost (``max_limiter_wait`` seconds: request and token buckets, and a
  provider-requested pause). A shared (Redis) limiter has no local view and never triggers it.

How the caller knows: every degraded answer is reported by :func:`last_degradation` (a context variable, so it
follows the task that made the call), and answers ragguard builds itself carry a marker
(:data:`DEGRADED_FINGERPRINT` as a chat completion's ``system_fingerprint``, ids starting
``ragguard-degraded-``). A degraded call with nothing to answer raises :class:`~ragguard.Degraded`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ._clock import SYSTEM_CLOCK, Clock
from ._context import CallContext
from ._sync import run_sync
from .config import DegradePolicy
from .errors import CircuitOpenError
from .guards.breaker import BreakerState, CircuitBreaker
from .guards.bulkhead import ConcurrencyLimit
from .guards.limiter import RateLimiter
from .guards.pipeline import Guard, GuardBase, Pipeline

__all__ = [
    "DEGRADED_FINGERPRINT",
    "DEGRADED_ID_PREFIX",
    "Degradation",
    "DegradeHandler",
    "Degrader",
    "Trigger",
    "degradable",
    "last_degradation",
    "note",
    "run_sync_noting",
]

T = TypeVar("T")

#: the ``system_fingerprint`` of a chat completion ragguard built instead of calling the model
DEGRADED_FINGERPRINT = "ragguard-degraded"
#: how the ``id`` of a chat completion or response built by ragguard starts
DEGRADED_ID_PREFIX = "ragguard-degraded-"


@dataclass(frozen=True, slots=True)
class Degradation:
    """What happened to one degraded call.

    Attributes:
        reason: the trigger: ``breaker_open`` or ``overloaded``.
        modes: the modes applied, in order: ``top_k`` (a smaller retrieval), ``cache_only`` (answered from the
            cache), ``skip_generation`` (answered with the supplied context). Empty when no mode could answer
            (the call then raised :class:`~ragguard.Degraded`).
        detail: a human-readable account of the trigger (e.g. ``"bulkhead 'x': 8 in flight, 60 queued"``).
    """

    reason: str
    modes: tuple[str, ...]
    detail: str = ""


_LAST: contextvars.ContextVar[Degradation | None] = contextvars.ContextVar("ragguard_last_degradation", default=None)


def last_degradation() -> Degradation | None:
    """The degradation of the latest guarded call made from this task (or thread), ``None`` if it was served
    normally.

    Reset by every call of a guarded OpenAI client or Pinecone index (and every call through a
    :class:`Degrader`), set when the call is degraded. It follows :mod:`contextvars` rules: a call awaited
    directly (or a sync client's call) is seen by the code after it; a call made in a child task is seen only
    inside that task.

    Example::

        answer = await client.chat.completions.create(...)
        if (d := ragguard.last_degradation()) is not None:
            log.info("degraded answer (%s: %s)", d.reason, ", ".join(d.modes))
    """
    return _LAST.get()


def note(degradation: Degradation | None) -> None:
    """Record the outcome of the current call for :func:`last_degradation` (providers call it)."""
    _LAST.set(degradation)


def run_sync_noting(make: Callable[[], Awaitable[T]]) -> T:
    """:func:`ragguard._sync.run_sync` for a guarded call, carrying :func:`last_degradation` back to the
    calling thread (the bridge's loop runs the call in a context of its own)."""
    seen: list[Degradation | None] = []

    async def capture() -> T:
        try:
            return await make()
        finally:
            seen.append(_LAST.get())

    try:
        return run_sync(capture)
    finally:
        if seen:
            _LAST.set(seen[0])


class _LimiterView:
    """How long a local :class:`~ragguard.RateLimiter` would hold a call now, from its public levels: a bucket
    admits a cost once it holds ``min(cost, capacity)`` (see :mod:`ragguard.guards.limiter`). The rates and
    capacities are read once: a limiter's settings are fixed."""

    __slots__ = ("_limiter", "_req_need", "_req_rate", "_tok_cap", "_tok_rate")

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter
        rpm, tpm = limiter.rpm, limiter.tpm
        self._req_rate = rpm / 60.0 if rpm is not None else 0.0  # requests per second
        self._req_need = min(1.0, limiter.capacity_requests)
        self._tok_rate = tpm / 60.0 if tpm is not None else 0.0  # tokens per second
        self._tok_cap = limiter.capacity_tokens

    @property
    def name(self) -> str:
        return self._limiter.name

    def wait(self, tokens: float) -> float:
        """Seconds a call costing one request and ``tokens`` would wait now (``0.0``: none)."""
        limiter = self._limiter
        wait = limiter.paused_until - limiter.clock.now()
        if self._req_rate:
            short = (self._req_need - limiter.available_requests) / self._req_rate
            if short > wait:
                wait = short
        if self._tok_rate and tokens > 0.0:
            short = ((tokens if tokens < self._tok_cap else self._tok_cap) - limiter.available_tokens) / self._tok_rate
            if short > wait:
                wait = short
        return wait if 0.0 < wait < math.inf else 0.0


@dataclass(frozen=True, slots=True)
class Trigger:
    """Why a call is degraded: ``reason`` (``breaker_open`` / ``overloaded``), a human-readable ``detail``, and
    the breaker's refusal when that was the trigger (``cause``, else ``None``)."""

    reason: str
    detail: str
    cause: CircuitOpenError | None = None


#: ``handler(call, ctx, trigger)``: answer a degraded call. ``call`` is the rest of the pipeline (the handler
#: may run it, e.g. after making the request smaller), ``ctx`` the call's context.
DegradeHandler = Callable[[Callable[[], Awaitable[Any]], CallContext, Trigger], Awaitable[Any]]


class Degrader(GuardBase):
    """The guard that degrades a call instead of failing it (outermost in a provider's pipeline).

    Before the call it reads the pipeline's local state (:meth:`check`); when the trigger holds, ``handler``
    answers the call instead. When the trigger includes ``breaker_open``, a
    :class:`~ragguard.CircuitOpenError` raised by the rest of the pipeline also goes to ``handler``. Otherwise
    the call runs as usual and :func:`last_degradation` is reset.

    Args:
        policy: the ``Policy.degrade`` section.
        handler: the provider's answer for a degraded call (see :data:`DegradeHandler`).
        clock: the clock of :meth:`call`.

    Call :meth:`bind` with the pipeline the degrader is the head of, so it can read its breaker, bulkhead and
    rate limiter (local ones only: a shared breaker shows through its refusals, a shared limiter not at all).
    """

    stage: ClassVar[str] = "cache"
    __slots__ = (
        "_breaker",
        "_bulkhead",
        "_handler",
        "_limiter",
        "_max_queue",
        "_max_wait",
        "_on_load",
        "clock",
        "policy",
    )

    def __init__(self, policy: DegradePolicy, handler: DegradeHandler, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.policy = policy
        self.clock = clock
        self._handler = handler
        self._on_load = policy.when != "breaker_open"
        self._max_queue = policy.max_queue
        self._max_wait = policy.max_limiter_wait
        self._breaker: CircuitBreaker | None = None
        self._bulkhead: ConcurrencyLimit | None = None
        self._limiter: _LimiterView | None = None

    @property
    def on_refusal(self) -> bool:
        """Whether the trigger includes ``breaker_open`` (a breaker's refusal degrades the call)."""
        return self.policy.when != "overloaded"

    def bind(self, guards: Sequence[Guard]) -> None:
        """Read the load and breaker state of these guards (the pipeline's, after this one)."""
        for guard in guards:
            if isinstance(guard, CircuitBreaker) and guard.enabled and self.on_refusal:
                self._breaker = guard
            elif isinstance(guard, ConcurrencyLimit) and guard.policy.enabled and self._on_load:
                self._bulkhead = guard
            elif isinstance(guard, RateLimiter) and self._on_load:
                self._limiter = _LimiterView(guard)

    def check(self, tokens: float = 0.0) -> Trigger | None:
        """The trigger when a call costing ``tokens`` (and one request) is degraded now, else ``None``.

        Reads local state only: no I/O, no await.
        """
        breaker = self._breaker
        if breaker is not None and breaker.state is BreakerState.OPEN:
            return Trigger("breaker_open", f"circuit breaker {breaker.name!r} is open")
        bulkhead = self._bulkhead
        if bulkhead is not None and self._max_queue is not None:
            # an adaptive bulkhead's current ``limit`` when it has one, else its fixed size
            slots: int = getattr(bulkhead, "limit", bulkhead.policy.max_in_flight)
            full = bulkhead.in_flight >= slots or bulkhead.queued > 0
            position = bulkhead.queued + 1 if full else 0  # this call's place in the queue (0: no wait)
            if position > self._max_queue:
                return Trigger(
                    "overloaded",
                    f"bulkhead {bulkhead.name!r}: {bulkhead.in_flight} in flight, {bulkhead.queued} queued",
                )
        limiter = self._limiter
        if limiter is not None and self._max_wait is not None:
            wait = limiter.wait(tokens)
            if wait > self._max_wait:
                return Trigger("overloaded", f"rate limiter {limiter.name!r}: a call would wait {wait:.3f} s")
        return None

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call``, or let the handler answer it when the trigger holds (before the call, or as the breaker
        refuses it).

        Raises:
            Degraded: (from the handler) the degraded call had nothing to answer with.
            Whatever ``call`` raises otherwise.
        """
        trigger = self.check(ctx.tokens)
        if trigger is None:
            _LAST.set(None)
            if self.policy.when == "overloaded":
                return await call()
            try:
                return await call()
            except CircuitOpenError as exc:
                trigger = Trigger("breaker_open", str(exc), exc)
        result: T = await self._handler(call, ctx, trigger)
        return result


def degradable(pipeline: Pipeline, policy: DegradePolicy, handler: DegradeHandler) -> Pipeline:
    """``pipeline`` with a :class:`Degrader` in front (the same guards, in the same order)."""
    degrader = Degrader(policy, handler, clock=pipeline.clock)
    degrader.bind(pipeline.guards)
    return Pipeline(degrader, *pipeline.guards, clock=pipeline.clock, classify=pipeline.classify, ordered=False)
