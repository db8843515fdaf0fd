"""A circuit breaker whose state every instance of an app shares (through Redis, or any :class:`BreakerStore`).

:class:`SharedCircuitBreaker` follows the rules of :class:`~ragguard.CircuitBreaker` (see
:mod:`ragguard.guards.breaker`: resilience4j's count-based sliding window, the same :class:`~ragguard.BreakerPolicy`
and the same verdicts on a call's result — a 429 is no failure unless ``count_rate_limits``, a 4xx is a success,
another guard's refusal and a cancellation are ignored), but the window, the open state and its expiry live in a
shared store: failures recorded by one instance open the breaker for all of them, and with
``half_open_probes=1`` exactly one instance at a time sends the half-open probe (a lease that expires after
``half_open_max_wait`` seconds, so a probe that never reports cannot leave the breaker stuck).

Differences from the local breaker:

- every call costs two round trips to the store (permission, then the result; each one Lua script with
  :class:`~ragguard.RedisBackend`); a result whose call was admitted in an earlier state is ignored, as locally;
- :meth:`~SharedCircuitBreaker.state`, :meth:`~SharedCircuitBreaker.snapshot`,
  :meth:`~SharedCircuitBreaker.acquire`, :meth:`~SharedCircuitBreaker.force_open` and
  :meth:`~SharedCircuitBreaker.reset` are coroutines (they ask the store);
- durations are measured on the store's clock (the Redis server's ``TIME``); ``retry_at`` in
  :class:`~ragguard.CircuitOpenError` and in snapshots is translated to this instance's ``clock``;
- ``on_state_change`` is called for the transitions this instance *sees* (in the replies to its own calls):
  one made by another instance is seen at this instance's next call, and states that came and went in between
  are not reported.

When the store cannot answer (:class:`~ragguard.BackendUnavailable`): with ``fail_open`` the call is judged by a
local :class:`~ragguard.CircuitBreaker` with the same policy, so a provider that is down is still cut off per
process; with ``fail_closed`` the call is refused at once with :class:`~ragguard.BackendUnavailable`. A failed
result report never fails a call that already ran (with
``fail_open`` its verdict then goes to the local fallback). For ``reconnect_interval`` seconds after a failure the store
is not asked again (a hung Redis then costs one timeout per interval, not two per call); after that, every call
tries it again, so both modes recover by themselves.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import Outcome
from .._shielded import run_shielded
from ..config import BreakerPolicy
from ..errors import BackendUnavailable, CircuitOpenError
from .breaker import (
    _FAILURE,
    _IGNORED,
    _SUCCESS,
    BreakerPermit,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
    StateChangeHook,
)
from .pipeline import GuardBase

__all__ = ["BreakerStore", "BreakerStoreReply", "SharedBreakerPermit", "SharedCircuitBreaker"]

T = TypeVar("T")

logger = logging.getLogger("ragguard")

OnUnavailable = Literal["fail_open", "fail_closed"]


class BreakerStoreReply(Protocol):
    """What a :class:`BreakerStore` operation answers (see :class:`ragguard.backends._redis_breaker.BreakerReply`).

    ``state`` is ``"closed"``, ``"open"`` or ``"half_open"``; ``retry_after`` is in seconds (``math.inf``: open
    until reset; ``None``: nothing to wait for); ``lease`` is the probe lease of an admitted half-open call.
    """

    @property
    def state(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def admitted(self) -> bool: ...
    @property
    def lease(self) -> str | None: ...
    @property
    def retry_after(self) -> float | None: ...
    @property
    def calls(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def consecutive_failures(self) -> int: ...
    @property
    def probes(self) -> int: ...


class BreakerStore(Protocol):
    """Where a :class:`SharedCircuitBreaker` keeps its state (:class:`ragguard.backends._redis_breaker.
    RedisBreakerStore` for Redis). Each operation is atomic, timed by the store's own clock, and raises
    :class:`~ragguard.BackendUnavailable` when the store cannot answer in time."""

    @property
    def on_unavailable(self) -> OnUnavailable: ...

    async def permit(self, name: str, policy: BreakerPolicy) -> BreakerStoreReply: ...

    async def record(
        self, name: str, policy: BreakerPolicy, *, generation: int, success: bool | None, lease: str | None = None
    ) -> BreakerStoreReply: ...

    async def force_open(
        self, name: str, policy: BreakerPolicy, duration: float | None = None
    ) -> BreakerStoreReply: ...

    async def reset(self, name: str, policy: BreakerPolicy) -> BreakerStoreReply: ...

    async def snapshot(self, name: str, policy: BreakerPolicy) -> BreakerStoreReply: ...


@runtime_checkable
class _HasBreakerStore(Protocol):
    def breaker_store(self) -> BreakerStore: ...


class SharedBreakerPermit:
    """Permission for one call, from :meth:`SharedCircuitBreaker.acquire`; report its result exactly once.

    The reports are coroutines (they reach the store); only the first one counts. A permit never reported holds
    its half-open lease until ``half_open_max_wait`` expires it. ``shared`` is ``False`` when the permit came from
    the local fallback breaker (the store was unavailable, ``fail_open``).
    """

    __slots__ = ("_breaker", "_generation", "_lease", "_local")

    def __init__(
        self,
        breaker: SharedCircuitBreaker | None,
        generation: int,
        lease: str | None,
        local: BreakerPermit | None = None,
    ) -> None:
        self._breaker = breaker
        self._generation = generation
        self._lease = lease
        self._local = local

    @property
    def is_probe(self) -> bool:
        """Whether this permit holds a half-open probe lease."""
        return self._lease is not None or (self._local is not None and self._local.is_probe)

    @property
    def shared(self) -> bool:
        """Whether the shared state admitted the call (``False``: the local fallback breaker did)."""
        return self._local is None

    async def record_success(self) -> None:
        """The call succeeded (or the provider answered with an error that is not a failure)."""
        await self._report(_SUCCESS)

    async def record_failure(self) -> None:
        """The call failed in a way that says the provider is unhealthy."""
        await self._report(_FAILURE)

    async def release(self) -> None:
        """The call ended without a verdict (cancelled, or refused before reaching the provider)."""
        await self._report(_IGNORED)

    async def _report(self, verdict: int) -> None:
        local, self._local = self._local, None
        if local is not None:
            self._breaker = None
            local._report(verdict)
            return
        breaker, self._breaker = self._breaker, None
        if breaker is not None:
            await breaker._settle(self._generation, self._lease, verdict)


class SharedCircuitBreaker(GuardBase):
    """A circuit breaker whose state is shared by every instance using the same ``store`` and ``name``.

    Same rules and settings as :class:`~ragguard.CircuitBreaker` (see the module docstring for what differs).

    Args:
        name: the breaker's name, shared by the instances (e.g. ``"openai:chat.completions:gpt-4o"``); hashed in
            Redis keys, never stored in clear.
        store: a :class:`BreakerStore`, or an object with ``breaker_store()`` such as a
            :class:`~ragguard.RedisBackend`.
        failure_threshold, failure_rate, window, min_calls, open_duration, half_open_probes, half_open_max_wait,
            count_rate_limits, enabled, is_failure: as for :class:`~ragguard.CircuitBreaker` (seconds, calls, a
            share in ``(0, 1]``); ``open_duration`` and ``half_open_max_wait`` run on the store's clock.
        slow_call_s, slow_call_s_per_token, slow_first_token_s, slow_call_rate: validated and kept in ``policy``
            (so ``from_policy`` takes any :class:`~ragguard.BreakerPolicy`), but not applied yet: the shared
            window counts failures only, never slowness.
        clock: this instance's clock: ``retry_at`` values are given on it, the local fallback runs on it, and
            ``reconnect_interval`` is measured on it.
        on_state_change: ``(name, old, new)`` for each transition this instance sees (also those of the local
            fallback); its exceptions are logged to the ``ragguard`` logger and never reach the call.
        on_unavailable: ``fail_open`` or ``fail_closed`` when the store cannot answer (default: the store's own
            setting, i.e. the ``RedisBackend``'s).
        reconnect_interval: seconds during which the store is not asked again after it failed (``>= 0``).

    Raises:
        pydantic.ValidationError: an invalid setting (e.g. ``min_calls > window``), naming the field.
        ValueError: a negative ``reconnect_interval`` or an unknown ``on_unavailable``.

    Example::

        backend = ragguard.RedisBackend("redis://redis:6379/0")
        breaker = ragguard.SharedCircuitBreaker("search", store=backend, failure_threshold=3, open_duration=10.0)
        hits = await breaker.call(index.query, vector=v, top_k=5)   # CircuitOpenError while open, for everyone
    """

    stage: ClassVar[str] = "breaker"
    __slots__ = (
        "_enabled",
        "_last_error",
        "_local",
        "_on_state_change",
        "_on_unavailable",
        "_reconnect_interval",
        "_retry_store_at",
        "_seen",
        "clock",
        "name",
        "policy",
        "store",
    )

    def __init__(
        self,
        name: str = "default",
        *,
        store: BreakerStore | _HasBreakerStore,
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
        on_unavailable: OnUnavailable | None = None,
        reconnect_interval: float = 1.0,
    ) -> None:
        # the local fallback validates the settings and holds the verdict rules (one source of truth)
        local = CircuitBreaker(
            name,
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
            enabled=enabled,
            is_failure=is_failure,
            clock=clock,
            on_state_change=on_state_change,
        )
        if not reconnect_interval >= 0:
            raise ValueError(f"reconnect_interval must be >= 0 seconds, got {reconnect_interval}")
        resolved = store.breaker_store() if isinstance(store, _HasBreakerStore) else store
        mode = on_unavailable if on_unavailable is not None else resolved.on_unavailable
        if mode not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_unavailable must be 'fail_open' or 'fail_closed', got {mode!r}")
        #: the validated settings
        self.policy: BreakerPolicy = local.policy
        self.name = name
        self.store: BreakerStore = resolved
        self.clock = clock
        self._local = local
        self._enabled = local.policy.enabled
        self._on_state_change = on_state_change
        self._on_unavailable: OnUnavailable = mode
        self._reconnect_interval = reconnect_interval
        self._retry_store_at = -math.inf
        self._last_error: BackendUnavailable | None = None
        self._seen = BreakerState.CLOSED

    @classmethod
    def from_policy(
        cls,
        policy: BreakerPolicy,
        *,
        store: BreakerStore | _HasBreakerStore,
        name: str = "default",
        is_failure: Callable[[BaseException, Outcome], bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_state_change: StateChangeHook | None = None,
        on_unavailable: OnUnavailable | None = None,
        reconnect_interval: float = 1.0,
    ) -> SharedCircuitBreaker:
        """A shared breaker with the settings of a :class:`~ragguard.BreakerPolicy` section."""
        return cls(
            name,
            store=store,
            **policy.model_dump(),
            is_failure=is_failure,
            clock=clock,
            on_state_change=on_state_change,
            on_unavailable=on_unavailable,
            reconnect_interval=reconnect_interval,
        )

    def __repr__(self) -> str:
        return f"SharedCircuitBreaker({self.name!r}, {self.store!r}, {self._on_unavailable})"

    # --- the guard ------------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Run ``call`` if the shared breaker admits it, and record its result in the shared window.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every probe lease taken (``retry_at`` on
                this instance's clock).
            BackendUnavailable: the store cannot answer and ``on_unavailable`` is ``fail_closed``.
            Whatever ``call`` raises, unchanged.
        """
        if not self._enabled:
            return await call()
        permit = await self._acquire()
        try:
            result = await call()
        except Exception as exc:
            await self._report(permit, self._local._judge(exc, ctx))
            raise
        except BaseException:
            # cancellation is no verdict on the provider, but a probe must give its lease back
            if permit.is_probe:
                await self._report(permit, _IGNORED)
            raise
        await self._report(permit, _SUCCESS)
        return result

    async def acquire(self) -> SharedBreakerPermit:
        """Ask for permission to make one call; report its result on the returned permit (awaiting it).

        Raises:
            CircuitOpenError: the breaker is open, or half-open with every probe lease taken.
            BackendUnavailable: the store cannot answer and ``on_unavailable`` is ``fail_closed``.
        """
        if not self._enabled:
            return SharedBreakerPermit(None, -1, None)
        return await self._acquire()

    async def _report(self, permit: SharedBreakerPermit, verdict: int) -> None:
        if permit.is_probe:
            # a probe's verdict (or its lease) must reach the store even if the caller is being cancelled (by
            # anyio or by asyncio's own task.cancel()); the store's own timeout bounds the wait
            await run_shielded(functools.partial(permit._report, verdict))
        else:
            await permit._report(verdict)

    async def _acquire(self) -> SharedBreakerPermit:
        if self.clock.now() < self._retry_store_at:
            return self._unavailable(self._last_error)
        try:
            reply = await self.store.permit(self.name, self.policy)
        except BackendUnavailable as exc:
            self._store_failed(exc)
            return self._unavailable(exc)
        self._observe(reply.state)
        if reply.admitted:
            return SharedBreakerPermit(self, reply.generation, reply.lease)
        retry_after = math.inf if reply.retry_after is None else reply.retry_after
        raise CircuitOpenError(self.name, self.clock.now() + retry_after, retry_after)

    def _unavailable(self, cause: BackendUnavailable | None) -> SharedBreakerPermit:
        if self._on_unavailable == "fail_closed":
            raise BackendUnavailable(f"circuit breaker {self.name!r}: shared state unavailable ({cause})") from cause
        return SharedBreakerPermit(None, -1, None, self._local.acquire())

    def _store_failed(self, exc: BackendUnavailable) -> None:
        self._last_error = exc
        self._retry_store_at = self.clock.now() + self._reconnect_interval
        logger.warning("circuit breaker %r: shared state unavailable (%s)", self.name, exc)

    async def _settle(self, generation: int, lease: str | None, verdict: int) -> None:
        if verdict == _IGNORED and lease is None:
            return  # nothing to tell the store
        success = None if verdict == _IGNORED else verdict == _SUCCESS
        try:
            reply = await self.store.record(self.name, self.policy, generation=generation, success=success, lease=lease)
        except BackendUnavailable as exc:
            # the call already ran: its result must not be lost to it. Keep the verdict for this process.
            self._store_failed(exc)
            if self._on_unavailable == "fail_open" and verdict != _IGNORED and self._local.state is BreakerState.CLOSED:
                self._local.acquire()._report(verdict)
            return
        except Exception:
            # a store error (not an outage) must not turn a call that ran into a failure either
            logger.exception("circuit breaker %r: recording a result failed", self.name)
            return
        self._observe(reply.state)

    def _observe(self, state: str) -> None:
        self._last_error = None  # the store answered
        new = BreakerState(state)
        old = self._seen
        if new is old:
            return
        self._seen = new
        telemetry.breaker_changed(self.name, old.value, new.value)
        hook = self._on_state_change
        if hook is not None:
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
    def on_unavailable(self) -> OnUnavailable:
        """What happens when the store cannot answer: ``fail_open`` (local fallback) or ``fail_closed``."""
        return self._on_unavailable

    @property
    def degraded(self) -> bool:
        """Whether the last attempt to reach the store failed (until one succeeds, calls are judged by the local
        fallback, or refused with ``fail_closed``; the store is asked again ``reconnect_interval`` seconds after
        the failure)."""
        return self._last_error is not None

    @property
    def local(self) -> CircuitBreaker:
        """The local fallback breaker (same policy), used while the store is unavailable with ``fail_open``."""
        return self._local

    async def state(self) -> BreakerState:
        """The shared state (an open breaker whose ``open_duration`` is up reads half-open).

        Raises:
            BackendUnavailable: the store cannot answer and ``on_unavailable`` is ``fail_closed`` (with
                ``fail_open``, the local fallback's state is returned).
        """
        return (await self.snapshot()).state

    async def snapshot(self) -> BreakerSnapshot:
        """The shared state, window counts and held probe leases, read together in one store operation.

        ``retry_at`` is on this instance's clock. With ``fail_open`` and the store unavailable, the local
        fallback's snapshot is returned (see :attr:`degraded`).

        Raises:
            BackendUnavailable: the store cannot answer and ``on_unavailable`` is ``fail_closed``.
        """
        try:
            reply = await self.store.snapshot(self.name, self.policy)
        except BackendUnavailable as exc:
            self._store_failed(exc)
            if self._on_unavailable == "fail_closed":
                raise
            return self._local.snapshot()
        self._observe(reply.state)
        retry_after = reply.retry_after
        return BreakerSnapshot(
            name=self.name,
            state=BreakerState(reply.state),
            calls=reply.calls,
            failures=reply.failures,
            consecutive_failures=reply.consecutive_failures,
            retry_at=None if retry_after is None or reply.state != "open" else self.clock.now() + retry_after,
            probes=reply.probes,
        )

    async def force_open(self, duration: float | None = None) -> None:
        """Open the breaker for every instance now, for ``duration`` seconds (``None``: until :meth:`reset`).

        The local fallback is opened too. Calls in flight are not interrupted; their results are ignored.

        Raises:
            ValueError: a negative ``duration``.
            BackendUnavailable: the shared state could not be changed (whatever ``on_unavailable``).
        """
        self._local.force_open(duration)
        try:
            reply = await self.store.force_open(self.name, self.policy, duration)
        except BackendUnavailable as exc:
            self._store_failed(exc)
            raise
        self._observe(reply.state)

    async def reset(self) -> None:
        """Close the breaker for every instance with an empty window (and the local fallback too); results of
        calls in flight are not recorded.

        Raises:
            BackendUnavailable: the shared state could not be changed (whatever ``on_unavailable``).
        """
        self._local.reset()
        try:
            reply = await self.store.reset(self.name, self.policy)
        except BackendUnavailable as exc:
            self._store_failed(exc)
            raise
        self._observe(reply.state)
