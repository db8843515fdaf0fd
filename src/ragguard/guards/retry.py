"""Retries with jittered exponential backoff that honour the provider's own wait hints.

Backoff follows the AWS Architecture Blog, "Exponential Backoff And Jitter" (Marc Brooker, 2015,
https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/): for retry ``n`` (from 0),
``t = min(cap, base·2ⁿ)`` and

- ``full``: sleep ``uniform(0, t)`` (the blog's recommendation: least total work),
- ``equal``: sleep ``t/2 + uniform(0, t/2)``,
- ``decorrelated``: sleep ``min(cap, uniform(base, 3·previous))``, ``previous`` starting at ``base``,
- ``none``: sleep ``t``.

A provider's ``retry-after-ms`` / ``Retry-After`` hint (read by the classifier into
:attr:`~ragguard.Outcome.retry_after`) replaces the backoff, with upward-only jitter so that callers told the
same wait do not all come back at the same instant (hermes-agent#109234).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeAlias, TypeVar

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import JitterKind, RetryPolicy
from ..errors import ConfigError, RetryExhausted
from .budget import RetryBudget, RetryBudgetExhausted, SharedRetryBudget
from .pipeline import GuardBase

__all__ = ["Retry", "RetryEvent", "RetryOn", "backoff_delays"]

T = TypeVar("T")

#: Which exceptions a :class:`Retry` may retry: an exception type, a tuple of them, or a predicate.
RetryOn: TypeAlias = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]

_log = logging.getLogger("ragguard")


class RetryEvent(NamedTuple):
    """What :class:`Retry` tells its ``on_retry`` hook before it waits for the next attempt.

    Attributes:
        attempt: the number (from 1) of the attempt that just failed.
        delay: how long the retry will now wait, in seconds.
        kind: the failed attempt's :attr:`~ragguard.Outcome.kind` (``rate_limit``, ``server``, ``timeout``…).
        error: the failed attempt's exception.
        retry_after: the provider's wait hint in seconds when it was followed, else ``None``.
    """

    attempt: int
    delay: float
    kind: str
    error: Exception
    retry_after: float | None


def backoff_delays(policy: RetryPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """The backoff before each retry (the first yielded value precedes retry 0, i.e. attempt 2), endlessly.

    Every delay is in seconds within ``[0, cap]``; ``decorrelated`` delays are also ``>= base``. Only
    ``policy.base``, ``policy.cap`` and ``policy.jitter`` are read (see the module docstring for the formulas,
    from the AWS Architecture Blog, "Exponential Backoff And Jitter", 2015).

    Args:
        policy: the retry policy.
        rng: the source of randomness (default: the :mod:`random` module's shared generator); pass a seeded
            :class:`random.Random` for reproducible delays.
    """
    return _delays(policy.base, policy.cap, policy.jitter, rng.uniform if rng is not None else random.uniform)


def _delays(base: float, cap: float, jitter: JitterKind, uniform: Callable[[float, float], float]) -> Iterator[float]:
    if jitter == "decorrelated":
        previous = base
        while True:
            previous = min(cap, uniform(base, 3.0 * previous))
            yield previous
    # Doubling t (instead of computing base·2ⁿ) stays finite however many retries are drawn.
    t = min(cap, base)
    while True:
        if jitter == "full":
            yield min(t, uniform(0.0, t))
        elif jitter == "equal":
            half = t / 2.0
            yield min(t, half + uniform(0.0, half))
        else:
            yield t
        t = min(cap, t * 2.0)


def _matcher(on: RetryOn | None) -> Callable[[BaseException], bool] | None:
    if on is None:
        return None
    if isinstance(on, type):
        if not issubclass(on, BaseException):
            raise ConfigError(f"on: {on!r} is not an exception type")
        types: tuple[type[BaseException], ...] = (on,)
    elif isinstance(on, tuple):
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ConfigError(f"on: a tuple must hold exception types only, got {on!r}")
        types = on
    elif callable(on):
        return on
    else:
        raise ConfigError(f"on: expected an exception type, a tuple of them or a predicate, got {on!r}")
    return lambda exc: isinstance(exc, types)


class Retry(GuardBase):
    """Retry a failing call with jittered exponential backoff, honouring ``Retry-After``-style hints.

    Each attempt's exception is judged by the call's classifier (``ctx.classify``, see
    :class:`~ragguard.Outcome`). An attempt is retried only if the outcome is retryable *and* the exception
    matches ``on`` (when given). Cancellation and anything that is not an :class:`Exception` is never
    retried (tenacity#529), and neither are ragguard's own refusals (:class:`~ragguard.CircuitOpenError`,
    :class:`~ragguard.RateLimitTimeout`, :class:`~ragguard.BulkheadFull`,
    :class:`~ragguard.DeadlineExceeded`); :class:`~ragguard.AttemptTimeout` is retried.

    Before retry ``n`` (from 0) it waits:

    - the provider's hint ``h`` (``Outcome.retry_after``) when ``respect_retry_after``: ``h·(1 + uniform(0,
      retry_after_jitter))``, jittered upwards only; a hint above ``max_retry_after`` is not waited for;
    - otherwise the backoff of :func:`backoff_delays` (AWS Architecture Blog, "Exponential Backoff And
      Jitter", 2015).

    A wait that would end at or after the earliest of the call's deadline (``ctx.deadline``) and the retry's
    own ``deadline`` (counted from the start of the first attempt) is not slept: the retry fails fast.

    Args:
        attempts: total attempts, the first one included (``1`` = no retry), 1-100.
        base: backoff base, seconds.
        cap: backoff cap, seconds (``>= base``).
        jitter: ``"full"``, ``"equal"``, ``"decorrelated"`` or ``"none"``.
        deadline: the retries' own total time budget in seconds from the first attempt, or ``None``.
        respect_retry_after: wait as long as the provider's hint says instead of the backoff.
        max_retry_after: longest provider hint (seconds) that is waited for.
        retry_after_jitter: upward-only jitter on a hint, as a fraction of it (``0.1`` = up to +10 %).
        enabled: ``False`` calls once and passes everything through.
        on: restrict retries to an exception type, a tuple of types, or a predicate on the exception.
        clock: the guard's clock for :meth:`call`; waits and deadlines use the call's ``ctx.clock``.
        rng: a :class:`random.Random` for reproducible jitter (default: the :mod:`random` module's).
        on_retry: called with a :class:`RetryEvent` before each wait; its exceptions are logged on the
            ``ragguard`` logger at warning level and do not affect the call.
        budget: a :class:`~ragguard.guards.budget.RetryBudget` (usually shared by every call of a pipeline) or a
            :class:`~ragguard.guards.budget.SharedRetryBudget` (shared by every process, through Redis): each
            call deposits one request, and each retry, once every other check allowed it, must be granted by the
            budget; a refused retry fails fast (nothing is slept) with
            :class:`~ragguard.guards.budget.RetryBudgetExhausted`. A shared budget is awaited: one round trip
            per retry, and deposits sent in batches (see :class:`~ragguard.guards.budget.SharedRetryBudget`).

    Raises:
        pydantic.ValidationError: a policy field is invalid (the error names it).
        ConfigError: ``on`` is not a type, a tuple of types or a callable.

    :meth:`run` raises the original exception unchanged when it is not retried, or
    :class:`~ragguard.RetryExhausted` (``__cause__`` and ``last_error`` = the last attempt's error) when the
    attempts run out, a hint exceeds ``max_retry_after``, the next wait would pass the deadline, or the retry
    budget refuses the retry (:class:`~ragguard.guards.budget.RetryBudgetExhausted`, a subclass).

    Example::

        retry = Retry(attempts=5, base=0.5, cap=20.0)
        hits = await retry.call(index.query, vector=v, top_k=5)
    """

    stage = "retry"
    #: every wait of this guard ends by ``ctx.deadline`` (lets Pipeline elide a redundant cancel scope)
    honours_deadline = True
    __slots__ = (
        "_attempts",
        "_budget",
        "_deadline",
        "_enabled",
        "_match",
        "_max_retry_after",
        "_on_retry",
        "_policy",
        "_respect_retry_after",
        "_retry_after_jitter",
        "_shared_budget",
        "_uniform",
        "clock",
    )

    def __init__(
        self,
        *,
        attempts: int = 4,
        base: float = 0.5,
        cap: float = 20.0,
        jitter: JitterKind = "full",
        deadline: float | None = None,
        respect_retry_after: bool = True,
        max_retry_after: float = 60.0,
        retry_after_jitter: float = 0.1,
        enabled: bool = True,
        on: RetryOn | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        budget: RetryBudget | SharedRetryBudget | None = None,
    ) -> None:
        policy = RetryPolicy(
            enabled=enabled,
            attempts=attempts,
            base=base,
            cap=cap,
            jitter=jitter,
            deadline=deadline,
            respect_retry_after=respect_retry_after,
            max_retry_after=max_retry_after,
            retry_after_jitter=retry_after_jitter,
        )
        if on_retry is not None and not callable(on_retry):
            raise ConfigError(f"on_retry: expected a callable, got {on_retry!r}")
        if budget is not None and not isinstance(budget, (RetryBudget, SharedRetryBudget)):
            raise ConfigError(f"budget: expected a RetryBudget or a SharedRetryBudget, got {budget!r}")
        self._policy = policy
        # Plain copies of the policy: read on every call, cheaper than pydantic attribute access.
        self._enabled = policy.enabled
        self._attempts = policy.attempts
        self._deadline = policy.deadline
        self._respect_retry_after = policy.respect_retry_after
        self._max_retry_after = policy.max_retry_after
        self._retry_after_jitter = policy.retry_after_jitter
        self._match = _matcher(on)
        self._uniform: Callable[[float, float], float] = rng.uniform if rng is not None else random.uniform
        self._on_retry = on_retry
        # one slot per kind: the local path stays synchronous and never pays for the shared one's awaits
        self._budget = budget if isinstance(budget, RetryBudget) else None
        self._shared_budget = budget if isinstance(budget, SharedRetryBudget) else None
        self.clock = clock

    @classmethod
    def from_policy(cls, policy: RetryPolicy, **extras: Any) -> Retry:
        """A :class:`Retry` configured by ``policy``; ``extras``: ``on``, ``clock``, ``rng``, ``on_retry``,
        ``budget``."""
        return cls(**policy.model_dump(), **extras)

    @property
    def policy(self) -> RetryPolicy:
        """The validated configuration (immutable)."""
        return self._policy

    def __repr__(self) -> str:
        p = self._policy
        return (
            f"Retry(attempts={p.attempts}, base={p.base}, cap={p.cap}, jitter={p.jitter!r}, "
            f"deadline={p.deadline}, enabled={p.enabled})"
        )

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` (zero-argument, async) until it succeeds, is not retryable, or retries give up.

        Sets ``ctx.attempt`` to 1, 2, … before each attempt and waits on ``ctx.clock``.

        Raises:
            RetryExhausted: attempts ran out, the provider asked for more than ``max_retry_after``, or the
                next wait would pass the deadline; chained (``from``) to the last attempt's error.
            Exception: the attempt's own error, unchanged, when it is not retried.
        """
        if not self._enabled:
            return await call()
        budget = self._budget
        if budget is not None:
            budget.deposit()
        else:
            shared = self._shared_budget
            if shared is not None:
                return await self._run_shared(call, ctx, shared)
        # Happy path: no allocation, no checkpoint, no clock reading unless the retry has its own deadline.
        started = ctx.clock.now() if self._deadline is not None else 0.0
        attempt = 1
        delays: Iterator[float] | None = None
        while True:
            ctx.attempt = attempt
            try:
                return await call()
            except Exception as exc:  # BaseException (cancellation, KeyboardInterrupt…) is never retried
                if delays is None:
                    delays = _delays(self._policy.base, self._policy.cap, self._policy.jitter, self._uniform)
                event = self._next_wait(exc, ctx, attempt, delays, started)
                if event is None:
                    raise
                if budget is not None and not budget.try_acquire_retry():  # last check: only a real retry spends
                    raise self._refused(exc, ctx, attempt) from exc
                self._notify(event)
            await ctx.clock.sleep(event.delay)
            attempt += 1

    async def _run_shared(self, call: Callable[[], Awaitable[T]], ctx: CallContext, budget: SharedRetryBudget) -> T:
        """:meth:`run` with a budget shared through a store: the same steps, the budget's operations awaited."""
        await budget.deposit()
        started = ctx.clock.now() if self._deadline is not None else 0.0
        attempt = 1
        delays: Iterator[float] | None = None
        while True:
            ctx.attempt = attempt
            try:
                return await call()
            except Exception as exc:  # BaseException (cancellation, KeyboardInterrupt…) is never retried
                if delays is None:
                    delays = _delays(self._policy.base, self._policy.cap, self._policy.jitter, self._uniform)
                event = self._next_wait(exc, ctx, attempt, delays, started)
                if event is None:
                    raise
            # outside the except block, so the store's round trip does not run with the attempt's error in flight
            if not await budget.try_acquire_retry():  # last check: only a real retry spends
                raise self._refused(event.error, ctx, attempt) from event.error
            self._notify(event)
            await ctx.clock.sleep(event.delay)
            attempt += 1

    def _next_wait(
        self, exc: Exception, ctx: CallContext, attempt: int, delays: Iterator[float], started: float
    ) -> RetryEvent | None:
        """The retry to make (how long to wait first: ``delay``), the budget aside; ``None`` to re-raise ``exc``;
        raises RetryExhausted."""
        match = self._match
        if match is not None and not match(exc):
            return None
        outcome = ctx.classify(exc)
        if not outcome.retryable:
            return None
        if attempt >= self._attempts:
            raise RetryExhausted(
                f"{ctx.operation!r} failed after {attempt} attempts: {_describe(exc)}",
                attempts=attempt,
                last_error=exc,
            ) from exc
        backoff = next(delays)  # drawn on every retry so retry n always gets the n-th backoff
        hint = outcome.retry_after if self._respect_retry_after else None
        if hint is not None:
            if hint > self._max_retry_after:
                raise RetryExhausted(
                    f"{ctx.operation!r}: the provider asked to wait {hint:.3f} s before retrying, more than "
                    f"max_retry_after ({self._max_retry_after:.3f} s); gave up after {attempt} attempts: "
                    f"{_describe(exc)}",
                    attempts=attempt,
                    last_error=exc,
                ) from exc
            wait = hint * (1.0 + self._uniform(0.0, self._retry_after_jitter))
        else:
            wait = backoff
        limit = ctx.deadline
        if self._deadline is not None:
            limit = min(limit, started + self._deadline)
        if limit != math.inf:
            remaining = limit - ctx.clock.now()
            if wait >= remaining:  # the next attempt could not even start in time: do not sleep for nothing
                what = (
                    f"a backoff of {wait:.3f} s"
                    if hint is None
                    else f"the provider's retry-after hint of {hint:.3f} s (waiting {wait:.3f} s)"
                )
                raise RetryExhausted(
                    f"{ctx.operation!r}: {what} would pass the deadline ({max(remaining, 0.0):.3f} s left); "
                    f"gave up after {attempt} attempts: {_describe(exc)}",
                    attempts=attempt,
                    last_error=exc,
                ) from exc
        return RetryEvent(attempt, wait, outcome.kind, exc, hint)

    @staticmethod
    def _refused(exc: Exception, ctx: CallContext, attempt: int) -> RetryBudgetExhausted:
        return RetryBudgetExhausted(
            f"{ctx.operation!r}: retry budget exhausted; gave up after {attempt} attempts: {_describe(exc)}",
            attempts=attempt,
            last_error=exc,
        )

    def _notify(self, event: RetryEvent) -> None:
        """Tell the ``on_retry`` hook and telemetry that a retry was granted and is about to wait."""
        hook = self._on_retry
        if hook is not None:
            try:
                hook(event)
            except Exception:  # an observability hook must not break the call, nor fail unseen
                _log.warning("ragguard: Retry on_retry hook raised; ignoring it", exc_info=True)
        telemetry.retry_scheduled(event.attempt, event.delay, event.kind, event.retry_after, event.error)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
