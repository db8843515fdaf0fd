"""Hedged requests: when an attempt is slow, send another one and keep whichever answers first.

After "The Tail at Scale" (Jeffrey Dean and Luiz André Barroso, Communications of the ACM 56(2), 2013): defer
the backup request until the first has been outstanding longer than a high percentile of the latency of its
kind of request, so only the slowest few percent are duplicated, and cancel the other copy once one answers.
Polly v8's hedging strategy (``HedgingStrategyOptions``: ``Delay``, ``MaxHedgedAttempts``) is the closest
library counterpart; here the extra attempts are also bounded by a :class:`~ragguard.guards.budget.RetryBudget`
(Finagle's ``BackupRequestFilter`` likewise caps its backup requests with ``maxExtraLoad``, a fraction of the
requests), so a slow provider never sees its load multiplied.

Only for idempotent reads — embeddings, vector queries, fetches: two copies of a write may both be applied.

A hedge races *slowness*, not failures: an attempt that fails while no other attempt is in flight ends the
call at once with its error (the :class:`~ragguard.Retry` outside decides what to do next, with its backoff and
its budget); a non-retryable error (a 400, a 401…) ends the call at once even while others are in flight, since
every copy of the request would get it. The first success wins; the other attempts are cancelled inside an
anyio task group and their cancellation never leaks out of :meth:`Hedge.run`.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar, cast

import anyio
import anyio.abc

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from ..config import HedgePolicy
from ..errors import ConfigError
from .budget import RetryBudget, SharedRetryBudget
from .pipeline import GuardBase

__all__ = ["Hedge", "HedgeStats"]

T = TypeVar("T")


class HedgeStats(NamedTuple):
    """A snapshot of a :class:`Hedge` (for metrics and benchmarks).

    Attributes:
        calls: calls run with hedging enabled.
        hedges: extra attempts sent (each one granted by the retry budget).
        wins: calls answered by a hedge rather than by their first attempt.
        refused: hedges the retry budget refused (no hedge was sent).
        samples: latencies currently in the window.
        delay: the delay the next call would hedge after, seconds (``None``: it would not hedge).
    """

    calls: int
    hedges: int
    wins: int
    refused: int
    samples: int
    delay: float | None


class _Race:
    """The attempts of one call: who is in flight, who won, what failed. Touched only by the call's own tasks."""

    __slots__ = ("done", "errors", "fatal", "in_flight", "result", "scope", "winner")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.done = False
        self.in_flight = 0
        self.winner = -1  # index of the attempt that succeeded: 0 the first, 1… the hedges
        self.result: Any = None
        #: failures in the order they happened, with whether each was another guard's refusal
        self.errors: list[tuple[Exception, bool]] = []
        self.fatal: Exception | None = None


class Hedge(GuardBase):
    """Send up to ``max_hedges`` extra attempts of a slow call, ``delay`` apart, and keep the first success.

    The delay is fixed (``delay``) or the ``percentile`` of the latencies of recent calls' first attempts over a
    sliding window of the last ``window`` (nearest-rank percentile, clamped to ``[min_delay, max_delay]``); until
    ``min_samples`` latencies are known it is ``delay``, and with ``delay=None`` nothing is hedged until then.
    A first attempt cancelled because a hedge won enters the window with the time it had run (a lower bound of
    its latency, at least about the delay): hedging then does not hide the tail it cuts, so the percentile does
    not drift down.

    Each hedge must first be granted by the retry budget (``try_acquire_retry``); a refused hedge is not sent and
    the call goes on waiting for the attempts in flight. The budget caps the extra load: over its window,
    hedges (plus retries, when shared with a :class:`~ragguard.Retry`) ``<= ratio ×`` requests ``+`` its floor.

    The delay is slept on the call's clock (``ctx.clock``): under :func:`~ragguard.set_testing` or a
    :class:`~ragguard.ManualClock` it passes at once, so a call that does not answer within one scheduler
    checkpoint is hedged immediately.

    In a :class:`~ragguard.Pipeline` the stage is ``hedge``, inside the retry and outside the circuit breaker:
    each hedged attempt goes through the breaker, pays its own rate-limit permit and takes its own concurrency
    slot and attempt timeout. The attempts share the call's :class:`~ragguard.CallContext`.

    Args:
        enabled: ``False`` makes :meth:`run` a pass-through. (``True`` here; :class:`~ragguard.HedgePolicy`
            defaults to ``False``: hedging is opt-in.)
        delay: seconds before a hedge (fixed when ``percentile`` is ``None``; otherwise used until
            ``min_samples`` latencies are known, ``None`` meaning no hedge until then).
        percentile: hedge after this percentile (``(0, 100)``) of recent latencies; ``None``: fixed ``delay``.
        window: latencies kept for the percentile (the last ``window`` calls).
        min_samples: latencies needed before the percentile is used.
        max_hedges: most extra attempts per call (``1..10``).
        min_delay, max_delay: clamp of a percentile delay, seconds.
        budget: the :class:`~ragguard.guards.budget.RetryBudget` (or
            :class:`~ragguard.guards.budget.SharedRetryBudget`, shared by every process: then each hedge costs
            one round trip to its store) that grants each hedge, usually the one the pipeline's
            :class:`~ragguard.Retry` uses. Default: a private ``RetryBudget()`` (20 % of requests plus 10 per
            second, over 10 s).
        deposit: whether each call deposits one request in ``budget``; pass ``False`` when a
            :class:`~ragguard.Retry` outside already deposits into the same budget, so calls count once.
        clock: the clock of the contexts :meth:`call` creates (waits and latencies use the call's ``ctx.clock``).

    Raises:
        pydantic.ValidationError: a policy field is invalid (the error names it).
        ConfigError: ``budget`` is not a :class:`~ragguard.guards.budget.RetryBudget` or a
            :class:`~ragguard.guards.budget.SharedRetryBudget`.

    :meth:`run` returns the first successful attempt's result, or raises: a non-retryable error at once (other
    attempts cancelled); otherwise, once no attempt is left in flight, the first failure that was not another
    guard's refusal (an open breaker, a full bulkhead…), else the first failure. Cancellation from outside
    cancels every attempt and propagates unchanged.

    Example::

        hedge = Hedge(percentile=90, delay=0.25)  # p90 of recent calls; 250 ms until 20 are known
        vectors = await Pipeline(Retry(), hedge, Timeout(5.0)).call(embed, texts)
    """

    stage = "hedge"
    #: every wait of this guard (the sleep before a hedge) ends when the attempts in flight end, and each of
    #: those ends by ``ctx.deadline`` when an attempt Timeout sits inside (lets Pipeline elide a cancel scope)
    honours_deadline = True
    __slots__ = (
        "_budget",
        "_cached",
        "_calls",
        "_delay",
        "_deposit",
        "_enabled",
        "_hedges",
        "_lock",
        "_max_delay",
        "_max_hedges",
        "_min_delay",
        "_min_samples",
        "_percentile",
        "_policy",
        "_refused",
        "_samples",
        "_shared_budget",
        "_stale",
        "_wins",
        "clock",
    )

    def __init__(
        self,
        *,
        enabled: bool = True,
        delay: float | None = None,
        percentile: float | None = 90.0,
        window: int = 200,
        min_samples: int = 20,
        max_hedges: int = 1,
        min_delay: float = 0.0,
        max_delay: float | None = None,
        budget: RetryBudget | SharedRetryBudget | None = None,
        deposit: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        policy = HedgePolicy(
            enabled=enabled,
            delay=delay,
            percentile=percentile,
            window=window,
            min_samples=min_samples,
            max_hedges=max_hedges,
            min_delay=min_delay,
            max_delay=max_delay,
        )
        if budget is not None and not isinstance(budget, (RetryBudget, SharedRetryBudget)):
            raise ConfigError(f"budget: expected a RetryBudget or a SharedRetryBudget, got {budget!r}")
        self._policy = policy
        # plain copies of the policy: read on every call, cheaper than pydantic attribute access
        self._enabled = policy.enabled
        self._delay = policy.delay
        self._percentile = policy.percentile
        self._min_samples = policy.min_samples
        self._max_hedges = policy.max_hedges
        self._min_delay = policy.min_delay
        self._max_delay = math.inf if policy.max_delay is None else policy.max_delay
        self._deposit = deposit or budget is None  # a private budget has no one else to deposit into it
        # one slot per kind: the local budget is synchronous, the shared one is awaited
        self._shared_budget = budget if isinstance(budget, SharedRetryBudget) else None
        self._budget = budget if isinstance(budget, RetryBudget) else None
        if budget is None:
            self._budget = RetryBudget(clock=clock)
        self._samples: collections.deque[float] = collections.deque(maxlen=policy.window)
        self._stale = True
        self._cached: float | None = None
        # held only for a few list operations (and one sort of <= window floats), never across an await
        self._lock = threading.Lock()
        self._calls = self._hedges = self._wins = self._refused = 0
        self.clock = clock

    @classmethod
    def from_policy(cls, policy: HedgePolicy, **extras: Any) -> Hedge:
        """A :class:`Hedge` configured by ``policy``; ``extras``: ``budget``, ``deposit``, ``clock``."""
        return cls(**policy.model_dump(), **extras)

    @property
    def policy(self) -> HedgePolicy:
        """The validated configuration (immutable)."""
        return self._policy

    @property
    def budget(self) -> RetryBudget | SharedRetryBudget:
        """The retry budget that grants each hedge."""
        budget = self._budget if self._budget is not None else self._shared_budget
        if budget is None:  # set in __init__: one of the two always is
            raise RuntimeError("a Hedge without a retry budget")
        return budget

    def __repr__(self) -> str:
        p = self._policy
        return (
            f"Hedge(delay={p.delay}, percentile={p.percentile}, window={p.window}, "
            f"max_hedges={p.max_hedges}, enabled={p.enabled})"
        )

    # --- the delay ----------------------------------------------------------------------------------------------

    def current_delay(self) -> float | None:
        """Seconds the next call would wait before its first hedge (``None``: it would not hedge).

        The fixed ``delay`` until ``min_samples`` latencies are known (always, without a percentile); then the
        nearest-rank ``percentile`` of the window — the ``⌈p/100 · n⌉``-th smallest of its ``n`` latencies —
        clamped to ``[min_delay, max_delay]``.
        """
        percentile = self._percentile
        if percentile is None:
            return self._delay
        with self._lock:
            samples = self._samples
            if len(samples) < self._min_samples:
                return self._delay
            if self._stale:
                ordered = sorted(samples)
                rank = max(1, math.ceil(percentile / 100.0 * len(ordered)))
                value = ordered[rank - 1]
                self._cached = min(max(value, self._min_delay), self._max_delay)
                self._stale = False
            return self._cached

    def _observe(self, latency: float) -> None:
        if self._percentile is None:
            return
        with self._lock:
            self._samples.append(latency)
            self._stale = True

    def stats(self) -> HedgeStats:
        """The counters since the hedge was created, and the current delay."""
        delay = self.current_delay()
        with self._lock:
            return HedgeStats(
                calls=self._calls,
                hedges=self._hedges,
                wins=self._wins,
                refused=self._refused,
                samples=len(self._samples),
                delay=delay,
            )

    # --- the guard ----------------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` (zero-argument, async), hedging it when it is slow; see the class docstring.

        Raises:
            Exception: a non-retryable attempt error at once, or, when every attempt failed, the first failure
                that was not another guard's refusal (else the first failure); never a loser's cancellation.
        """
        if not self._enabled:
            return await call()
        budget = self._budget
        shared = self._shared_budget
        if self._deposit:
            if budget is not None:
                budget.deposit()
            elif shared is not None:
                await shared.deposit()
        delay = self.current_delay()
        with self._lock:
            self._calls += 1
        clock = ctx.clock
        if delay is None:  # warming up: no hedge, but the latency counts
            started = clock.now()
            result = await call()
            self._observe(clock.now() - started)
            return result
        async with anyio.create_task_group() as tg:
            race = _Race(tg.cancel_scope)
            race.in_flight = 1
            tg.start_soon(self._attempt, race, call, ctx, 0)
            for index in range(1, self._max_hedges + 1):
                await clock.sleep(delay)
                # the race may have been decided during the sleep's last checkpoint, before the cancellation
                # reached this task (trio delivers it at the next checkpoint): never start a hedge then
                if race.done:
                    break
                granted = budget.try_acquire_retry() if budget is not None else await _acquire(shared)
                if race.done:  # decided during the shared budget's round trip
                    break
                if not granted:
                    with self._lock:
                        self._refused += 1
                    break
                with self._lock:
                    self._hedges += 1
                race.in_flight += 1
                tg.start_soon(self._attempt, race, call, ctx, index)
        if race.winner >= 0:
            if race.winner > 0:
                with self._lock:
                    self._wins += 1
            return cast(T, race.result)
        raise _chosen(race)

    async def _attempt(self, race: _Race, call: Callable[[], Awaitable[Any]], ctx: CallContext, index: int) -> None:
        """One attempt of the race; reports into ``race`` and never raises anything but cancellation."""
        clock = ctx.clock
        started = clock.now()
        ended = False
        try:
            result = await call()
            ended = True
        except Exception as exc:  # cancellation (a BaseException) propagates: the task group absorbs it
            ended = True
            race.in_flight -= 1
            if not race.done:
                _failed(race, exc, ctx)
            return
        finally:
            if not ended and index == 0 and race.winner > 0:
                # cancelled because a hedge won: it had run this long at least (a censored sample, ~ the delay or more)
                self._observe(clock.now() - started)
        race.in_flight -= 1
        if race.done:
            return  # a photo finish, or a non-retryable error already decided the call
        race.done = True
        race.winner = index
        race.result = result
        race.scope.cancel()
        if index == 0:
            self._observe(clock.now() - started)


async def _acquire(shared: SharedRetryBudget | None) -> bool:
    return shared is not None and await shared.try_acquire_retry()


def _failed(race: _Race, exc: Exception, ctx: CallContext) -> None:
    """Record a failed attempt; decide the race when the error is non-retryable or nothing is left in flight."""
    try:
        outcome = ctx.classify(exc)
        refusal = outcome.kind == "guard"
        fatal = not outcome.retryable and not refusal
    except Exception:  # a broken classifier: treat the error as the call's answer rather than guess
        refusal, fatal = False, True
    race.errors.append((exc, refusal))
    if fatal:
        race.fatal = exc
    if fatal or race.in_flight == 0:
        race.done = True
        race.scope.cancel()


def _chosen(race: _Race) -> Exception:
    """The error a failed race raises: the fatal one, else the first that reached the provider, else the first."""
    if race.fatal is not None:
        return race.fatal
    for exc, refusal in race.errors:
        if not refusal:
            return exc
    if race.errors:
        return race.errors[0][0]
    # unreachable: a race ends with a winner or an error, or the task group raised (cancelled from outside)
    raise RuntimeError("hedge: the race ended without a result or an error")
