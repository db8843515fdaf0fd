"""Time limits: :class:`Timeout` bounds one attempt, :class:`Deadline` bounds the whole call.

Both run the call inside an :class:`anyio.CancelScope`, so expiry really cancels the work in flight (the
attempt's HTTP request, the retries' backoff sleep…) instead of merely giving up waiting for it
(tenacity#529). A cancellation that comes from an enclosing scope is never turned into a ragguard error: it
propagates unchanged.

Durations are seconds on the call's clock (``ctx.clock``); the cancel scope itself fires on the event loop's
real clock, ``anyio.current_time()`` plus the remaining seconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

import anyio

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import TimeoutPolicy
from ..errors import AttemptTimeout, DeadlineExceeded
from .pipeline import GuardBase

__all__ = ["Deadline", "Timeout"]

T = TypeVar("T")


class Timeout(GuardBase):
    """A per-attempt timeout: each attempt gets ``seconds``, capped by what is left of the call's deadline.

    Sits innermost in a pipeline (stage ``timeout``), so a retry outside it starts a new attempt after one.

    Args:
        seconds: the attempt's time limit in seconds (``None``: no limit, :meth:`run` is a pass-through).
        clock: the clock of the contexts :meth:`call` creates.

    Raises (from :meth:`run`):
        AttemptTimeout: the attempt ran longer than ``seconds`` (retryable; ``timeout`` carries ``seconds``).
        DeadlineExceeded: the call's deadline (``ctx.deadline``) passed before or during the attempt.
        pydantic.ValidationError: (from the constructor) ``seconds <= 0``.
    """

    stage: ClassVar[str] = "timeout"
    __slots__ = ("clock", "seconds")

    @property
    def enforces_deadline(self) -> bool:
        """Whether this timeout also cancels an attempt when the call's deadline passes (it does when set)."""
        return self.seconds is not None

    def __init__(self, seconds: float | None = 30.0, *, clock: Clock = SYSTEM_CLOCK) -> None:
        #: the attempt's time limit in seconds, or ``None``
        self.seconds = TimeoutPolicy(attempt=seconds).attempt
        self.clock = clock

    @classmethod
    def from_policy(cls, policy: TimeoutPolicy, *, clock: Clock = SYSTEM_CLOCK) -> Timeout | None:
        """The per-attempt timeout of a :class:`~ragguard.TimeoutPolicy` (``policy.attempt``), or ``None``."""
        return None if policy.attempt is None else cls(policy.attempt, clock=clock)

    def __repr__(self) -> str:
        return f"Timeout({self.seconds})"

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` with at most ``seconds`` (and at most ``ctx.remaining()``) to finish."""
        seconds = self.seconds
        if seconds is None:
            return await call()
        remaining = ctx.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"{ctx.operation}: the call's deadline passed before the attempt started")
        limit = seconds if seconds <= remaining else remaining
        with anyio.CancelScope(deadline=anyio.current_time() + limit):
            return await call()
        # Reached only when our scope swallowed its own deadline's cancellation: like trio, anyio lets a
        # cancellation of an enclosing scope pass through a cancelled inner scope, so a foreign one (even one
        # that is due at the same moment) propagates unchanged and never becomes a ragguard error.
        if limit < seconds:
            raise DeadlineExceeded(
                f"{ctx.operation}: the call's deadline passed during attempt {ctx.attempt}", timeout=None
            ) from None
        raise AttemptTimeout(
            f"{ctx.operation}: attempt {ctx.attempt} timed out after {seconds:g} s", timeout=seconds
        ) from None


class Deadline(GuardBase):
    """A total deadline for the whole call, retries and waits included (stage ``deadline``).

    Sets ``ctx.deadline`` to ``min(ctx.deadline, now + seconds)`` while the rest of the pipeline runs — so
    inner guards (retry backoff, limiter and bulkhead waits, attempt timeouts) see how much time is left — and
    cancels whatever is running when it passes. ``ctx.deadline`` is restored afterwards.

    Args:
        seconds: the total time limit in seconds (``None``: no limit, :meth:`run` is a pass-through).
        clock: the clock of the contexts :meth:`call` creates.

    Raises (from :meth:`run`):
        DeadlineExceeded: the deadline passed (``timeout`` carries its length in seconds).
        pydantic.ValidationError: (from the constructor) ``seconds <= 0``.
    """

    stage: ClassVar[str] = "deadline"
    __slots__ = ("clock", "seconds")

    def __init__(self, seconds: float | None = 120.0, *, clock: Clock = SYSTEM_CLOCK) -> None:
        #: the total time limit in seconds, or ``None``
        self.seconds = TimeoutPolicy(total=seconds).total
        self.clock = clock

    @classmethod
    def from_policy(cls, policy: TimeoutPolicy, *, clock: Clock = SYSTEM_CLOCK) -> Deadline | None:
        """The total deadline of a :class:`~ragguard.TimeoutPolicy` (``policy.total``), or ``None``."""
        return None if policy.total is None else cls(policy.total, clock=clock)

    def __repr__(self) -> str:
        return f"Deadline({self.seconds})"

    def _bound(self, seconds: float, ctx: CallContext) -> tuple[float, float]:
        """The deadline to set on ``ctx`` (clock time) and its length in seconds."""
        saved = ctx.deadline
        now = ctx.clock.now()
        deadline = now + seconds
        if saved < deadline:
            # an enclosing deadline is tighter: enforce that one
            length = saved - now
            if length <= 0:
                raise DeadlineExceeded(f"{ctx.operation}: the call's deadline had already passed")
            return saved, length
        return deadline, seconds

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` (the rest of the pipeline) with ``ctx.deadline`` set and enforced."""
        seconds = self.seconds
        if seconds is None:
            return await call()
        saved = ctx.deadline
        deadline, length = self._bound(seconds, ctx)
        ctx.deadline = deadline
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + length):
                return await call()
        finally:
            ctx.deadline = saved
        # Reached only when our scope swallowed its own deadline's cancellation (see Timeout.run).
        raise DeadlineExceeded(f"{ctx.operation}: deadline of {length:g} s exceeded", timeout=length) from None

    async def run_delegated(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Like :meth:`run`, but leave the enforcement to the guards inside (no cancel scope of its own).

        :class:`Pipeline` uses this when an attempt :class:`Timeout` sits inside and every guard in between
        honours ``ctx.deadline`` in its waits: the attempt timeout is already capped at the time left, so a
        second cancel scope (≈ 7 µs) would add cost and no protection.
        """
        seconds = self.seconds
        if seconds is None:
            return await call()
        saved = ctx.deadline
        ctx.deadline = self._bound(seconds, ctx)[0]
        try:
            return await call()
        finally:
            ctx.deadline = saved
