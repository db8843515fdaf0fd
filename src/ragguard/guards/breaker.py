"""The circuit breaker: stop calling a provider that is down, probe it now and then, resume when it answers.

Semantics follow resilience4j's ``CircuitBreaker`` with a count-based sliding window
(https://resilience4j.readme.io/docs/circuitbreaker):

- **closed** — every call goes through and its result enters a ring buffer of the last ``window`` calls
  (O(1) per call). The breaker opens when ``failure_threshold`` calls in a row failed, or when the window
  holds at least ``min_calls`` calls and the share of failures in it is ``>= failure_rate``. Both checks run
  after every recorded call, as in resilience4j.
- **open** — every call is refused at once with :class:`~ragguard.CircuitOpenError`, which says when the
  breaker will next admit a probe. After ``open_duration`` seconds the breaker is half-open.
- **half-open** — at most ``half_open_probes`` probe calls are admitted, each holding a *lease*; other calls
  are refused. When that many probes succeeded the breaker closes with an empty window; one probe failure
  opens it again. A lease not reported within ``half_open_max_wait`` seconds expires and frees its place for
  another probe, so a probe that never reports cannot leave the breaker stuck half-open (resilience4j#903);
  the late report of an expired lease is ignored.

What a call's result counts as:

- a return value: a **success**;
- an exception: judged from ``ctx.classify(exc)`` (an :class:`~ragguard.Outcome`; for
  :class:`~ragguard.RetryExhausted` the last error it chains is judged). It is a **failure** when
  ``outcome.failure``, or when ``count_rate_limits`` and ``outcome.rate_limited``; the ``is_failure``
  predicate, when given, decides instead. Any other exception — a 400, a 401, by default a 429 — counts as
  a **success**: the provider answered, so it is up, and one caller's bad request must not open the breaker
  for everyone;
- a refusal by another ragguard guard (outcome kind ``guard``: a full bulkhead, a rate-limit timeout, a
  deadline…) that ``is_failure`` does not call a failure is **ignored**: the provider was never asked;
- a cancellation (or any other ``BaseException``): **ignored**, and a probe's lease is released at once.

Slow calls (resilience4j's slow-call rate, made size-aware: resilience4j#1477 — LLM calls take from 150 ms to
minutes, so one duration threshold cannot tell a slow provider from a long answer). A call recorded as a success
or a failure is also judged *slow* or not, by the first rule that applies:

1. a stream whose first chunk's time is known (``ctx.first_token_s``): slow when it exceeds
   ``slow_first_token_s`` (or, when that is unset, ``slow_call_s``);
2. a completion whose output size is known (``ctx.output_tokens``, ``n`` tokens; 0 counts as 1) and
   ``slow_call_s_per_token`` set: slow when its latency exceeds ``slow_first_token_s + slow_call_s_per_token · n``
   (``slow_first_token_s`` counting 0 when unset) — the usual model of LLM latency, time to first token plus
   time per output token;
3. otherwise, raw latency: slow when it exceeds ``slow_call_s``.

The latency is the attempt's own (``ctx.attempt_s``, set by the provider layer: no rate-limit wait nor bulkhead
queueing in it) when known, else the time around this guard's call. The breaker also opens when the window holds
at least ``min_calls`` calls and the share of slow ones is ``>= slow_call_rate``; a slow half-open probe counts
as a failed one. With no slow-call setting (the default) the breaker reads no clock per call. (Source:
https://resilience4j.readme.io/docs/circuitbreaker, ``slowCallRateThreshold``/``slowCallDurationThreshold``.)

A result only counts in the state that admitted its call: results of calls admitted before a transition
(including :meth:`CircuitBreaker.reset` and :meth:`CircuitBreaker.force_open`) are ignored.

The breaker never holds its lock across the wrapped call (pybreaker#7); its bookkeeping is a few attribute
updates under a :class:`threading.Lock`, so one breaker may also be shared by event loops in several threads.
A success that changes nothing (closed, with a full window free of failures and slow calls: the steady state of a
healthy provider) is recognised by one attribute read and takes neither the lock nor the bookkeeping (see
``CircuitBreaker._quiet``).
"""

from __future__ import annotations

import enum
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import Outcome
from ..config import BreakerPolicy
from ..errors import CircuitOpenError, RetryExhausted
from .pipeline import GuardBase

__all__ = ["BreakerPermit", "BreakerSnapshot", "BreakerState", "CircuitBreaker", "StateChangeHook", "is_slow_call"]

T = TypeVar("T")

logger = logging.getLogger("ragguard")


class BreakerState(str, enum.Enum):
    """The three states of a circuit breaker (values as they appear in health reports and telemetry)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN

#: ``on_state_change(name, old, new)``, called after every transition.
StateChangeHook = Callable[[str, BreakerState, BreakerState], None]

# How a call's result is recorded.
_SUCCESS = 0
_FAILURE = 1
_IGNORED = 2

#: ``CircuitBreaker._quiet`` when a success would change something (no generation has this number)
_NOT_QUIET = -2


def is_slow_call(
    latency_s: float,
    *,
    output_tokens: float | None = None,
    first_token_s: float | None = None,
    slow_call_s: float | None = None,
    slow_call_s_per_token: float | None = None,
    slow_first_token_s: float | None = None,
) -> bool:
    """Whether a call counts as slow, by the size-aware rules of the module docstring (first that applies).

    Args:
        latency_s: the call's latency, seconds.
        output_tokens: tokens it generated, when known.
        first_token_s: seconds to a stream's first chunk, when known.
        slow_call_s: the raw-latency threshold, seconds (``None``: none).
        slow_call_s_per_token: the per-output-token allowance, seconds per token (``None``: none).
        slow_first_token_s: the first-chunk threshold, seconds, and the fixed part of the per-token rule.
    """
    if first_token_s is not None:
        threshold = slow_first_token_s if slow_first_token_s is not None else slow_call_s
        if threshold is not None:
            return first_token_s > threshold
    if output_tokens is not None and slow_call_s_per_token is not None:
        fixed = slow_first_token_s if slow_first_token_s is not None else 0.0
        return latency_s > fixed + slow_call_s_per_token * (output_tokens if output_tokens >= 1.0 else 1.0)
    return slow_call_s is not None and latency_s > slow_call_s


class BreakerSnapshot:
    """A consistent view of a breaker at one moment (for health reports and tests).

    Attributes:
        name: the breaker's name.
        state: its state.
        calls: calls recorded in the sliding window (``<= window``).
        failures: failures among them.
        failure_rate: ``failures / calls`` (``0.0`` when the window is empty).
        slow_calls: slow calls among them (always 0 without a slow-call setting).
        slow_call_rate: ``slow_calls / calls`` (``0.0`` when the window is empty).
        consecutive_failures: failures in a row since the last success.
        retry_at: while open, the clock time (seconds) at which it will admit a probe; otherwise ``None``.
        probes: probe leases currently held (half-open only).
    """

    __slots__ = (
        "calls",
        "consecutive_failures",
        "failure_rate",
        "failures",
        "name",
        "probes",
        "retry_at",
        "slow_call_rate",
        "slow_calls",
        "state",
    )

    def __init__(
        self,
        *,
        name: str,
        state: BreakerState,
        calls: int,
        failures: int,
        consecutive_failures: int,
        retry_at: float | None,
        probes: int,
        slow_calls: int = 0,
    ) -> None:
        self.name = name
        self.state = state
        self.calls = calls
        self.failures = failures
        self.failure_rate = failures / calls if calls else 0.0
        self.slow_calls = slow_calls
        self.slow_call_rate = slow_calls / calls if calls else 0.0
        self.consecutive_failures = consecutive_failures
        self.retry_at = retry_at
        self.probes = probes

    def __repr__(self) -> str:
        return (
            f"BreakerSnapshot(name={self.name!r}, state={self.state.value}, calls={self.calls}, "
            f"failures={self.failures}, failure_rate={self.failure_rate:.3f}, slow_calls={self.slow_calls}, "
            f"consecutive_failures={self.consecutive_failures}, retry_at={self.retry_at}, "
            f"probes={self.probes})"
        )


class BreakerPermit:
    """Permission for one call, from :meth:`CircuitBreaker.acquire`; report its result exactly once.

    For code that cannot put the call inside :meth:`CircuitBreaker.run` (e.g. a stream judged at its first
    chunk). Only the first report counts; later ones do nothing. A permit that is never reported holds its
    half-open lease until ``half_open_max_wait`` expires it.
    """

    __slots__ = ("_breaker", "_generation", "_lease")

    def __init__(self, breaker: CircuitBreaker, generation: int, lease: int) -> None:
        self._breaker: CircuitBreaker | None = breaker
        self._generation = generation
        self._lease = lease

    @property
    def is_probe(self) -> bool:
        """Whether this permit holds a half-open probe lease."""
        return self._lease != 0

    def record_success(self, *, slow: bool = False) -> None:
        """The call succeeded (or the provider answered with an error that is not a failure); ``slow``: it
        counts as slow (judge it with :func:`is_slow_call`)."""
        self._report(_SUCCESS, slow)

    def record_failure(self, *, slow: bool = False) -> None:
        """The call failed in a way that says the provider is unhealthy; ``slow`` as for :meth:`record_success`."""
        self._report(_FAILURE, slow)

    def release(self) -> None:
        """The call ended without a verdict (cancelled, or refused before reaching the provider)."""
        self._report(_IGNORED)

    def _report(self, verdict: int, slow: bool = False) -> None:
        breaker = self._breaker
        if breaker is not None:
            self._breaker = None
            if verdict == _SUCCESS and not slow and self._generation == breaker._quiet:
                return  # a success that changes nothing (see CircuitBreaker._quiet)
            breaker._settle(self._generation, self._lease, verdict, slow)


class CircuitBreaker(GuardBase):
    """A named circuit breaker (closed → open → half-open → closed); see the module docstring for the rules.

    Args:
        name: the breaker's name, in errors, events and health reports (e.g. ``"pinecone"``).
        failure_threshold: consecutive failures that open the breaker.
        failure_rate: failure share in ``(0, 1]`` over the window that opens the breaker.
        window: size of the count-based sliding window, in calls.
        min_calls: calls the window must hold before the failure rate counts (``<= window``).
        open_duration: seconds the breaker stays open before admitting probes.
        half_open_probes: probe calls admitted (concurrently) while half-open; that many successes close it.
        half_open_max_wait: seconds after which an unreported probe lease expires.
        count_rate_limits: count a rate-limited answer (a 429) as a failure; by default it is flow control.
        slow_call_s: seconds beyond which a call of unknown size is slow (``None``: no such rule).
        slow_call_s_per_token: seconds per output token allowed a completion of known size (``None``: no
            such rule).
        slow_first_token_s: seconds allowed before a stream's first chunk, and the fixed part of the
            per-token rule (``None``: 0 there, and streams fall back to ``slow_call_s``).
        slow_call_rate: slow share in ``(0, 1]`` over the window (at least ``min_calls`` calls) that opens the
            breaker.
        enabled: ``False`` makes :meth:`run` a pass-through.
        is_failure: ``(exc, outcome) -> bool``, overriding which exceptions are failures.
        clock: the clock ``open_duration`` and ``half_open_max_wait`` are measured on.
        on_state_change: ``(name, old, new)`` called after every transition; its exceptions are logged to the
            ``ragguard`` logger and never reach the call.

    Raises:
        pydantic.ValidationError: an invalid setting (e.g. ``min_calls > window``), naming the field.

    Example::

        breaker = CircuitBreaker("search", failure_threshold=3, open_duration=10.0)
        hits = await breaker.call(index.query, vector=v, top_k=5)   # CircuitOpenError while open
    """

    stage: ClassVar[str] = "breaker"
    #: every wait of this guard ends by ``ctx.deadline`` (lets Pipeline elide a redundant cancel scope)
    honours_deadline = True
    __slots__ = (
        "_calls",
        "_consecutive",
        "_count_rate_limits",
        "_enabled",
        "_failure_rate",
        "_failure_threshold",
        "_failures",
        "_generation",
        "_half_open_max_wait",
        "_half_open_probes",
        "_is_failure",
        "_lease_seq",
        "_leases",
        "_lock",
        "_min_calls",
        "_on_state_change",
        "_open_duration",
        "_outcomes",
        "_pending",
        "_pos",
        "_probe_successes",
        "_quiet",
        "_retry_at",
        "_slow",
        "_slow_call_rate",
        "_slow_call_s",
        "_slow_first_token_s",
        "_slow_outcomes",
        "_slow_per_token",
        "_state",
        "_timed",
        "_window",
        "clock",
        "name",
        "policy",
    )

    def __init__(
        self,
        name: str = "default",
        *,
        failure_threshold: int = 5,
        failure_rate: float = 0.5,
        window: int = 20,
        min_calls: int = 10,
        open_duration: float = 30.0,
        half_open_probes: int = 1,
        half_open_max_wait: float = 60.0,
        count_rate_limits: bool = False,
        slow_call_s: float | None = None,
        slow_call_s_per_token: float | None = None,
        slow_first_token_s: float | None = None,
        slow_call_rate: float = 1.0,
        enabled: bool = True,
        is_failure: Callable[[BaseException, Outcome], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateChangeHook | None = None,
    ) -> None:
        policy = BreakerPolicy(
            enabled=enabled,
            failure_threshold=failure_threshold,
            failure_rate=failure_rate,
            window=window,
            min_calls=min_calls,
            open_duration=open_duration,
            half_open_probes=half_open_probes,
            half_open_max_wait=half_open_max_wait,
            count_rate_limits=count_rate_limits,
            slow_call_s=slow_call_s,
            slow_call_s_per_token=slow_call_s_per_token,
            slow_first_token_s=slow_first_token_s,
            slow_call_rate=slow_call_rate,
        )
        #: the validated settings
        self.policy = policy
        self.name = name
        self.clock = clock
        # copies of the policy's fields: plain attribute reads on the hot path
        self._enabled = policy.enabled
        self._failure_threshold = policy.failure_threshold
        self._failure_rate = policy.failure_rate
        self._window = policy.window
        self._min_calls = policy.min_calls
        self._open_duration = policy.open_duration
        self._half_open_probes = policy.half_open_probes
        self._half_open_max_wait = policy.half_open_max_wait
        self._count_rate_limits = policy.count_rate_limits
        self._slow_call_s = policy.slow_call_s
        self._slow_per_token = policy.slow_call_s_per_token
        self._slow_first_token_s = policy.slow_first_token_s
        self._slow_call_rate = policy.slow_call_rate
        # only a breaker with a slow-call rule reads the clock around each call
        self._timed = (
            policy.slow_call_s is not None
            or policy.slow_call_s_per_token is not None
            or (policy.slow_first_token_s is not None)
        )
        self._is_failure = is_failure
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._state = _CLOSED
        # bumped by every transition: a result only counts in the state that admitted its call
        self._generation = 0
        # the sliding window: a ring buffer of 0 (success) / 1 (failure)
        self._outcomes = bytearray(policy.window)
        self._pos = 0
        self._calls = 0
        self._failures = 0
        # the same window's slow flags (0/1), and their count
        self._slow_outcomes = bytearray(policy.window)
        self._slow = 0
        self._consecutive = 0
        self._retry_at = math.inf
        # half-open: lease id -> clock time at which it expires
        self._leases: dict[int, float] = {}
        self._lease_seq = 0
        self._probe_successes = 0
        # transitions waiting to be announced, outside the lock
        self._pending: list[tuple[BreakerState, BreakerState]] = []
        # The generation while a success changes nothing, else _NOT_QUIET. "Quiet" is: closed, the window full
        # (calls == window), no failure and no slow call in it (so no consecutive failure either). A success
        # there would overwrite a 0 with a 0 and move the ring's position over identical entries: no count, no
        # order, no transition changes. It is written only under the lock, by every operation that changes what
        # it depends on (_record, _transition), before that operation releases the lock, so a lock-free reader
        # that sees the generation of its call's admission sees either the state a finished operation left, or
        # that of one still running that started quiet: its no-op success is ordered before that operation.
        # One attribute read, atomic under the GIL: no torn view of several fields (reading the counts
        # themselves without the lock could see a failure's count before the window filled, and lose a call).
        self._quiet = _NOT_QUIET

    @classmethod
    def from_policy(
        cls,
        policy: BreakerPolicy,
        *,
        name: str = "default",
        is_failure: Callable[[BaseException, Outcome], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateChangeHook | None = None,
    ) -> CircuitBreaker:
        """A breaker with the settings of a :class:`~ragguard.BreakerPolicy` section."""
        return cls(
            name,
            **policy.model_dump(),
            is_failure=is_failure,
            clock=clock,
            on_state_change=on_state_change,
        )

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # --- the guard ------------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` if the breaker admits it, and record its result.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every probe lease taken.
            Whatever ``call`` raises, unchanged.
        """
        if not self._enabled:
            return await call()
        # Lock-free admission while closed (the common case): the generation is read before the state, so a
        # racing transition at worst makes this call's result ignored.
        generation = self._generation
        if self._state is _CLOSED:
            lease = 0
        else:
            generation, lease = self._admit()
        if self._timed:
            return await self._run_timed(call, ctx, generation, lease)
        try:
            result = await call()
        except Exception as exc:
            self._settle(generation, lease, self._judge(exc, ctx))
            raise
        except BaseException:
            # cancellation is no verdict on the provider, but a probe must give its lease back
            if lease:
                self._settle(generation, lease, _IGNORED)
            raise
        if generation != self._quiet:  # else a success that changes nothing: no lock (see _quiet)
            self._settle(generation, lease, _SUCCESS)
        return result

    async def _run_timed(self, call: Callable[[], Awaitable[T]], ctx: CallContext, generation: int, lease: int) -> T:
        clock = self.clock
        start = clock.now()
        try:
            result = await call()
        except Exception as exc:
            verdict = self._judge(exc, ctx)
            self._settle(generation, lease, verdict, verdict != _IGNORED and self._slow_call(clock.now() - start, ctx))
            raise
        except BaseException:
            if lease:
                self._settle(generation, lease, _IGNORED)
            raise
        slow = self._slow_call(clock.now() - start, ctx)
        if slow or generation != self._quiet:  # else a success that changes nothing (see _quiet)
            self._settle(generation, lease, _SUCCESS, slow)
        return result

    def _slow_call(self, elapsed: float, ctx: CallContext) -> bool:
        attempt_s = ctx.attempt_s
        return is_slow_call(
            elapsed if attempt_s is None else attempt_s,
            output_tokens=ctx.output_tokens,
            first_token_s=ctx.first_token_s,
            slow_call_s=self._slow_call_s,
            slow_call_s_per_token=self._slow_per_token,
            slow_first_token_s=self._slow_first_token_s,
        )

    def acquire(self) -> BreakerPermit:
        """Ask for permission to make one call; report its result on the returned permit.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every probe lease taken.
        """
        if not self._enabled:
            return BreakerPermit(self, -1, 0)  # generation -1 never matches: reports are ignored
        generation = self._generation
        if self._state is _CLOSED:
            return BreakerPermit(self, generation, 0)
        generation, lease = self._admit()
        return BreakerPermit(self, generation, lease)

    def _judge(self, exc: Exception, ctx: CallContext) -> int:
        # RetryExhausted is ragguard's own wrapper: the provider's health shows in the error it chains
        target: BaseException = exc.last_error if isinstance(exc, RetryExhausted) else exc
        try:
            outcome = ctx.classify(target)
            predicate = self._is_failure
            if predicate is not None:
                failed = predicate(target, outcome)
            else:
                failed = outcome.failure or (self._count_rate_limits and outcome.rate_limited)
        except Exception:
            logger.exception("circuit breaker %r: judging %r failed; counting it as a failure", self.name, exc)
            return _FAILURE
        if failed:
            return _FAILURE
        # another guard's refusal: the provider was never asked, so it says nothing about its health
        return _IGNORED if outcome.kind == "guard" else _SUCCESS

    # --- the state machine (under the lock, never across a call) --------------------------------------------

    def _admit(self) -> tuple[int, int]:
        error: CircuitOpenError | None = None
        admitted = (0, 0)
        with self._lock:
            now = self.clock.now()
            state = self._state
            if state is _OPEN and now >= self._retry_at:
                self._to_half_open()
                state = _HALF_OPEN
            if state is _CLOSED:
                admitted = (self._generation, 0)
            elif state is _OPEN:
                error = CircuitOpenError(self.name, self._retry_at, self._retry_at - now)
            else:
                self._expire_leases(now)
                leases = self._leases
                if self._probe_successes + len(leases) < self._half_open_probes:
                    self._lease_seq += 1
                    leases[self._lease_seq] = now + self._half_open_max_wait
                    admitted = (self._generation, self._lease_seq)
                else:
                    # every probe place is taken: one frees at the latest when its lease expires
                    retry_at = min(leases.values())
                    error = CircuitOpenError(self.name, retry_at, retry_at - now)
        if self._pending:
            self._announce()
        if error is not None:
            raise error
        return admitted

    def _settle(self, generation: int, lease: int, verdict: int, slow: bool = False) -> None:
        with self._lock:
            if generation != self._generation:
                return  # admitted in an earlier state: its result no longer counts
            state = self._state
            if state is _CLOSED:
                if verdict != _IGNORED:
                    self._record(verdict == _FAILURE, slow)
            elif state is _HALF_OPEN:
                expires_at = self._leases.pop(lease, None)
                if expires_at is not None and verdict != _IGNORED and self.clock.now() < expires_at:
                    if verdict == _FAILURE or slow:
                        self._to_open(self._open_duration)
                    else:
                        self._probe_successes += 1
                        if self._probe_successes >= self._half_open_probes:
                            self._to_closed()
        if self._pending:
            self._announce()

    def _record(self, failed: bool, slow: bool = False) -> None:
        outcomes = self._outcomes
        pos = self._pos
        full = self._calls == self._window
        if full:
            self._failures -= outcomes[pos]  # the oldest call leaves the window
        else:
            self._calls += 1
        outcomes[pos] = failed
        if slow or self._slow:  # (all slow flags are 0 while the count is 0: nothing to keep)
            slows = self._slow_outcomes
            if full:
                self._slow -= slows[pos]
            slows[pos] = slow
            self._slow += slow
        pos += 1
        self._pos = 0 if pos == self._window else pos
        if failed:
            self._failures += 1
            self._consecutive += 1
        else:
            self._consecutive = 0
        if self._consecutive >= self._failure_threshold or (
            self._calls >= self._min_calls
            and (
                self._failures / self._calls >= self._failure_rate
                or (self._slow and self._slow / self._calls >= self._slow_call_rate)
            )
        ):
            self._to_open(self._open_duration)
        elif not self._failures and not self._slow and self._calls == self._window:
            self._quiet = self._generation  # closed (only a closed breaker records)
        else:
            self._quiet = _NOT_QUIET

    def _expire_leases(self, now: float) -> None:
        leases = self._leases
        if leases:
            for lease in [lease for lease, expires_at in leases.items() if now >= expires_at]:
                del leases[lease]

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._quiet = _NOT_QUIET
        self._state = new
        self._generation += 1
        self._leases.clear()
        self._probe_successes = 0
        if old is not new:
            self._pending.append((old, new))  # announced (telemetry, hook) once the lock is released

    def _to_open(self, duration: float) -> None:
        self._retry_at = self.clock.now() + duration
        self._transition(_OPEN)

    def _to_half_open(self) -> None:
        self._retry_at = math.inf
        self._transition(_HALF_OPEN)

    def _to_closed(self) -> None:
        self._retry_at = math.inf
        # stale ring entries are overwritten before they are read again: counts and position are enough (the slow
        # flags are only written while one is set, so they are cleared here)
        if self._slow:
            self._slow_outcomes[:] = bytes(self._window)
        self._pos = self._calls = self._failures = self._slow = self._consecutive = 0
        self._transition(_CLOSED)

    def _announce(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for old, new in pending:
            telemetry.breaker_changed(self.name, old.value, new.value)
        hook = self._on_state_change
        if hook is None:
            return
        for old, new in pending:
            try:
                hook(self.name, old, new)
            except Exception:
                logger.exception("circuit breaker %r: on_state_change(%s -> %s) failed", self.name, old, new)

    # --- introspection and control --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the breaker guards calls (``False``: :meth:`run` is a pass-through)."""
        return self._enabled

    @property
    def state(self) -> BreakerState:
        """The current state; reading it moves an open breaker whose ``open_duration`` passed to half-open."""
        with self._lock:
            if self._state is _OPEN and self.clock.now() >= self._retry_at:
                self._to_half_open()
            state = self._state
        if self._pending:
            self._announce()
        return state

    def snapshot(self) -> BreakerSnapshot:
        """The state, the window's counts and the held probe leases, read together."""
        with self._lock:
            now = self.clock.now()
            if self._state is _OPEN and now >= self._retry_at:
                self._to_half_open()
            self._expire_leases(now)
            snap = BreakerSnapshot(
                name=self.name,
                state=self._state,
                calls=self._calls,
                failures=self._failures,
                consecutive_failures=self._consecutive,
                retry_at=self._retry_at if self._state is _OPEN else None,
                probes=len(self._leases),
                slow_calls=self._slow,
            )
        if self._pending:
            self._announce()
        return snap

    def force_open(self, duration: float | None = None) -> None:
        """Open the breaker now, for ``duration`` seconds (``None``: until :meth:`reset`).

        Calls in flight are not interrupted; their results are ignored.
        """
        if duration is not None and not duration >= 0:
            raise ValueError(f"duration must be >= 0 seconds, got {duration}")
        with self._lock:
            self._to_open(math.inf if duration is None else duration)
        if self._pending:
            self._announce()

    def reset(self) -> None:
        """Close the breaker with an empty window, whatever its state; calls in flight are not recorded."""
        with self._lock:
            self._to_closed()
        if self._pending:
            self._announce()
