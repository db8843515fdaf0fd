"""The bulkhead: a cap on calls in flight, with a bounded first-in-first-out queue for the rest.

After resilience4j's ``SemaphoreBulkhead`` (``maxConcurrentCalls``, ``maxWaitDuration``), with a bounded
queue, so that a stalled provider turns into fast :class:`~ragguard.BulkheadFull` refusals rather than
unbounded memory.

Cost: an uncontended call is a counter increment and decrement — no lock, no scheduler checkpoint (an
``anyio.Semaphore`` costs about 6.7 µs here). Only a caller that must wait creates an :class:`anyio.Event`, in
its own task, so the guard is bound to no event loop (aiolimiter#292).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

import anyio

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import ConcurrencyPolicy
from ..errors import BulkheadFull
from .pipeline import GuardBase

__all__ = ["ConcurrencyLimit"]

T = TypeVar("T")


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        # set by the releasing task when it hands its slot to this waiter
        self.granted = False


class ConcurrencyLimit(GuardBase):
    """At most ``max_in_flight`` calls run at once; up to ``max_queue`` more wait for a slot, first come first
    served.

    A slot is handed directly from a finishing call to the longest waiter, so newcomers never overtake the
    queue. A waiter that is cancelled leaves the queue; if a slot had just been handed to it, it passes the
    slot on, so no slot is ever lost.

    Args:
        max_in_flight: calls allowed to run at once (``>= 1``).
        max_queue: callers allowed to wait for a slot (``0``: refuse at once when all slots are taken).
        max_wait: longest wait for a slot, seconds (``None``: until the call's deadline, ``ctx.deadline``).
        enabled: ``False`` makes :meth:`run` a pass-through.
        clock: the clock of the contexts :meth:`call` creates.
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
        "_enabled",
        "_in_flight",
        "_max_in_flight",
        "_max_queue",
        "_max_wait",
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
        clock: Clock = SYSTEM_CLOCK,
        name: str = "default",
    ) -> None:
        policy = ConcurrencyPolicy(enabled=enabled, max_in_flight=max_in_flight, max_queue=max_queue, max_wait=max_wait)
        #: the validated settings
        self.policy = policy
        self.name = name
        self.clock = clock
        self._enabled = policy.enabled
        self._max_in_flight = policy.max_in_flight
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
        return cls(**policy.model_dump(), clock=clock, name=name)

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit(name={self.name!r}, in_flight={self._in_flight}/{self._max_in_flight}, "
            f"queued={len(self._waiters)}/{self._max_queue})"
        )

    @property
    def in_flight(self) -> int:
        """Slots taken: calls running, plus waiters just handed a slot that have not resumed yet."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot."""
        return len(self._waiters)

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` once a slot is free, holding the slot only while it runs.

        Raises:
            BulkheadFull: the queue is full, or no slot freed within ``max_wait`` or before ``ctx.deadline``.
            Whatever ``call`` raises, unchanged.
        """
        if not self._enabled:
            return await call()
        if self._in_flight < self._max_in_flight and not self._waiters:
            self._in_flight += 1
        else:
            await self._wait(ctx)
        try:
            return await call()
        finally:
            self._release()

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
        if not waiter.granted:
            del self._waiters[waiter]
            raise BulkheadFull(
                f"concurrency limit {self.name!r}: no slot freed within {timeout:.3f} s "
                f"({self._max_in_flight} in flight)"
            )
        # granted (possibly at the very moment the wait timed out): the slot is ours

    def _release(self) -> None:
        waiters = self._waiters
        if waiters:
            # hand the slot straight to the longest waiter: in_flight is unchanged
            waiter, _ = waiters.popitem(last=False)
            waiter.granted = True
            waiter.event.set()
        else:
            self._in_flight -= 1
