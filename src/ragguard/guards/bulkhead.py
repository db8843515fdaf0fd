"""The bulkhead: a cap on calls in flight, with a bounded first-in-first-out queue for the rest.

After resilience4j's ``SemaphoreBulkhead`` (``maxConcurrentCalls``, ``maxWaitDuration``), with a bounded
queue, so that a stalled provider turns into fast :class:`~ragguard.BulkheadFull` refusals rather than
unbounded memory.

Cost: an uncontended call is a counter increment and decrement — no lock, no scheduler checkpoint (an
``anyio.Semaphore`` costs about 6.7 µs here). Only a caller that must wait creates an :class:`anyio.Event`, in
its own task, so the guard is bound to no event loop (aiolimiter#292).

Adaptive limit (``adaptive=``): the limit moves with the provider's answers, after Netflix's concurrency-limits
(the algorithms live apart, in :mod:`ragguard.guards.concurrency_limits`). Each call's end is judged from what
it raised, through ``ctx.classify(exc)`` (an :class:`~ragguard.Outcome`):

- a return value: a **sample**, with its latency (seconds, measured around the call on the guard's clock) and
  the number of calls in flight when it was admitted;
- outcome kind ``rate_limit`` (a 429), ``timeout`` (an attempt timeout, a 408), or ``server`` with status 503 or
  529 (overloaded): a **drop** — the limit shrinks;
- anything else (a 400, a 500, a connection error, another guard's refusal) and cancellations: **ignored**.

When the limit grows, the new slots go at once to the longest waiters; when it shrinks, calls in flight finish
undisturbed and no new call (nor waiter) is admitted until fewer than the new limit are in flight. A slot is
never lost nor duplicated: ``in_flight`` always equals the slots held. A fixed bulkhead pays nothing for this
(one attribute test, the one that checked ``enabled``).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

import anyio

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import AdaptiveConcurrencyPolicy, ConcurrencyPolicy
from ..errors import BulkheadFull
from .concurrency_limits import LimitAlgorithm, limit_from_policy
from .pipeline import GuardBase

__all__ = ["ConcurrencyLimit"]

T = TypeVar("T")

logger = logging.getLogger("ragguard")

# how an adaptive bulkhead reports a finished call to its limit algorithm
_IGNORED = 0
_SAMPLE = 1
_DROPPED = 2
#: server statuses that say "overloaded" (503 Service Unavailable; 529, Anthropic's "overloaded_error")
_OVERLOAD_STATUS = frozenset({503, 529})


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        # set by the releasing task when it hands its slot to this waiter
        self.granted = False


class ConcurrencyLimit(GuardBase):
    """At most ``max_in_flight`` calls run at once; up to ``max_queue`` more wait for a slot, first come first
    served. With ``adaptive``, at most :attr:`limit` calls, a limit that moves within ``[min_limit,
    max_in_flight]`` (see the module docstring).

    A slot is handed directly from a finishing call to the longest waiter, so newcomers never overtake the
    queue. A waiter that is cancelled leaves the queue; if a slot had just been handed to it, it passes the
    slot on, so no slot is ever lost.

    Args:
        max_in_flight: calls allowed to run at once (``>= 1``); the ceiling of an adaptive limit.
        max_queue: callers allowed to wait for a slot (``0``: refuse at once when all slots are taken).
        max_wait: longest wait for a slot, seconds (``None``: until the call's deadline, ``ctx.deadline``).
        enabled: ``False`` makes :meth:`run` a pass-through.
        adaptive: an :class:`~ragguard.AdaptiveConcurrencyPolicy` (or its fields as a mapping), or a ready
            :class:`~ragguard.guards.concurrency_limits.LimitAlgorithm` object (its limit is kept within
            ``[1, max_in_flight]``; ``policy.adaptive`` is then ``None``). ``None``: a fixed limit.
        clock: the clock of the contexts :meth:`call` creates, and of adaptive latency samples.
        name: a label for errors and health reports.

    Waits are measured in real time (an anyio cancel scope) and last at most
    ``min(max_wait, ctx.remaining())`` seconds.

    Raises:
        pydantic.ValidationError: an invalid setting, naming the field.
    """

    stage: ClassVar[str] = "concurrency"
    #: every wait of this guard ends by ``ctx.deadline`` (lets Pipeline elide a redundant cancel scope)
    honours_deadline = True
    __slots__ = (
        "_algorithm",
        "_enabled",
        "_in_flight",
        "_max_in_flight",
        "_max_queue",
        "_max_wait",
        "_special",
        "_waiters",
        "clock",
        "name",
        "policy",
    )

    def __init__(
        self,
        *,
        max_in_flight: int = 64,
        max_queue: int = 10_000,
        max_wait: float | None = None,
        enabled: bool = True,
        adaptive: AdaptiveConcurrencyPolicy | Mapping[str, Any] | LimitAlgorithm | None = None,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "default",
    ) -> None:
        algorithm: LimitAlgorithm | None = None
        if isinstance(adaptive, LimitAlgorithm):
            algorithm, adaptive = adaptive, None
        policy = ConcurrencyPolicy(
            enabled=enabled,
            max_in_flight=max_in_flight,
            max_queue=max_queue,
            max_wait=max_wait,
            adaptive=adaptive,  # type: ignore[arg-type]  # a mapping is validated into the model
        )
        #: the validated settings
        self.policy = policy
        self.name = name
        self.clock = clock
        if policy.adaptive is not None:
            algorithm = limit_from_policy(policy.adaptive, policy.max_in_flight)
        self._algorithm = algorithm
        self._enabled = policy.enabled
        # a disabled or adaptive bulkhead leaves the fixed fast path on one attribute test
        self._special = not policy.enabled or algorithm is not None
        # the current limit: fixed, or the algorithm's, kept within [1, max_in_flight]
        self._max_in_flight = policy.max_in_flight if algorithm is None else self._bounded(algorithm.limit)
        self._max_queue = policy.max_queue
        self._max_wait = math.inf if policy.max_wait is None else policy.max_wait
        self._in_flight = 0
        # waiters in arrival order; an OrderedDict gives O(1) removal of a cancelled waiter from the middle
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()

    @classmethod
    def from_policy(
        cls, policy: ConcurrencyPolicy, *, clock: Clock = SYSTEM_CLOCK, name: str = "default"
    ) -> ConcurrencyLimit:
        """A bulkhead with the settings of a :class:`~ragguard.ConcurrencyPolicy` section."""
        return cls(
            max_in_flight=policy.max_in_flight,
            max_queue=policy.max_queue,
            max_wait=policy.max_wait,
            enabled=policy.enabled,
            adaptive=policy.adaptive,
            clock=clock,
            name=name,
        )

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit(name={self.name!r}, in_flight={self._in_flight}/{self._max_in_flight}, "
            f"queued={len(self._waiters)}/{self._max_queue}"
            + (f", adaptive={self._algorithm!r})" if self._algorithm is not None else ")")
        )

    @property
    def in_flight(self) -> int:
        """Slots taken: calls running, plus waiters just handed a slot that have not resumed yet. May exceed
        :attr:`limit` for a while after an adaptive limit shrank (calls in flight are never interrupted)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot."""
        return len(self._waiters)

    @property
    def limit(self) -> int:
        """Calls allowed in flight now: ``max_in_flight``, or the adaptive limit's current value."""
        return self._max_in_flight

    @property
    def algorithm(self) -> LimitAlgorithm | None:
        """The adaptive limit algorithm (``None``: a fixed limit)."""
        return self._algorithm

    def _bounded(self, limit: int) -> int:
        ceiling = self.policy.max_in_flight
        return ceiling if limit > ceiling else (limit if limit >= 1 else 1)

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` once a slot is free, holding the slot only while it runs.

        Raises:
            BulkheadFull: the queue is full, or no slot freed within ``max_wait`` or before ``ctx.deadline``.
            Whatever ``call`` raises, unchanged.
        """
        if self._special:
            if not self._enabled:
                return await call()
            return await self._run_adaptive(call, ctx)
        if self._in_flight < self._max_in_flight and not self._waiters:
            self._in_flight += 1
        else:
            await self._wait(ctx)
        try:
            return await call()
        finally:
            # _release() inlined for the common case: with no waiter it only frees the slot
            if self._waiters:
                self._release()
            else:
                self._in_flight -= 1

    async def _run_adaptive(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        if self._in_flight < self._max_in_flight and not self._waiters:
            self._in_flight += 1
        else:
            await self._wait(ctx)
        in_flight = self._in_flight
        clock = self.clock
        start = clock.now()
        verdict = _IGNORED  # cancellation (or any BaseException) gives no sample
        try:
            result = await call()
            verdict = _SAMPLE
            return result
        except Exception as exc:
            verdict = self._judge(exc, ctx)
            raise
        finally:
            self._finish(verdict, start, clock.now() - start, in_flight)

    def _judge(self, exc: Exception, ctx: CallContext) -> int:
        try:
            outcome = ctx.classify(exc)
        except Exception:  # a broken classifier must not replace the provider's error
            return _IGNORED
        kind = outcome.kind
        if kind == "rate_limit" or kind == "timeout" or (kind == "server" and outcome.status in _OVERLOAD_STATUS):
            return _DROPPED
        return _IGNORED

    def _finish(self, verdict: int, start: float, rtt: float, in_flight: int) -> None:
        algorithm = self._algorithm
        try:
            if verdict != _IGNORED and algorithm is not None:
                algorithm.on_sample(start, rtt, in_flight, verdict == _DROPPED)
                self._max_in_flight = self._bounded(algorithm.limit)
        except Exception:  # a faulty custom algorithm keeps its last limit; the call's own outcome stands
            logger.exception("concurrency limit %r: %r failed on a sample", self.name, algorithm)
        finally:
            # shrunk: _release only frees the slot (in flight drains); grown: extra slots go to waiters
            self._release()
            self._grant()

    def _grant(self) -> None:
        waiters = self._waiters
        while waiters and self._in_flight < self._max_in_flight:
            waiter, _ = waiters.popitem(last=False)
            self._in_flight += 1
            waiter.granted = True
            waiter.event.set()

    async def _wait(self, ctx: CallContext) -> None:
        if len(self._waiters) >= self._max_queue:
            raise BulkheadFull(
                f"concurrency limit {self.name!r}: {self._in_flight} calls in flight and "
                f"{len(self._waiters)} waiting (max_queue={self._max_queue})"
            )
        timeout = min(self._max_wait, ctx.remaining())
        if timeout <= 0:
            raise BulkheadFull(
                f"concurrency limit {self.name!r}: all {self._max_in_flight} slots taken, no time to wait"
            )
        waiter = _Waiter()
        self._waiters[waiter] = None
        telemetry.queue_changed(self.name, 1)
        try:
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:
            # Cancelled while queued. If a slot was handed over just before, pass it on rather than lose it.
            if waiter.granted:
                self._release()
            else:
                del self._waiters[waiter]
            raise
        finally:
            telemetry.queue_changed(self.name, -1)
        if not waiter.granted:
            del self._waiters[waiter]
            raise BulkheadFull(
                f"concurrency limit {self.name!r}: no slot freed within {timeout:.3f} s "
                f"({self._max_in_flight} in flight)"
            )
        # granted (possibly at the very moment the wait timed out): the slot is ours

    def _release(self) -> None:
        waiters = self._waiters
        # (in_flight exceeds the limit only after an adaptive limit shrank: then the slot is freed, not passed on)
        if waiters and self._in_flight <= self._max_in_flight:
            # hand the slot straight to the longest waiter: in_flight is unchanged
            waiter, _ = waiters.popitem(last=False)
            waiter.granted = True
            waiter.event.set()
        else:
            self._in_flight -= 1
