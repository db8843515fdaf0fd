"""The shared (distributed) rate limiter: one requests-per-minute and tokens-per-minute quota for every process.

:class:`SharedRateLimiter` behaves like :class:`~ragguard.RateLimiter` (read its module docstring: the same
reservation schedule, accounting, header following and shared Retry-After), but the schedule lives in a
:class:`BucketStore` that several processes or machines share, normally Redis
(:meth:`ragguard.RedisBackend.bucket_store`), on the store's clock (Redis ``TIME``), never the callers' clocks.

Strict mode (the default)
-------------------------
Each call is one round trip: the store reserves the call's requests *and* tokens in one step and answers "go",
"sleep ``w`` seconds, your slot is held" or "refused: the wait ``w`` exceeds your budget" (nothing reserved, so
:class:`~ragguard.RateLimitTimeout` is raised at once). A caller that had to wait makes one more round trip
after its sleep, to follow a shared pause another instance set meanwhile (the pause then holds it too, with the
same block shift and release jitter as the local limiter). A caller cancelled while waiting gives its
reservation back (a shielded round trip, bounded by the backend timeout); the cancellation is re-raised. It gives
back only what no later reservation depends on (Go's ``Reservation.CancelAt``, as the local limiter: read
``RateLimiter``'s module docstring), so no newcomer shares a slot with a caller scheduled after it.

Fairness: reservations are first come, first served in the order the store executes them (Redis runs scripts
one at a time). A waiting caller already holds its slot; newcomers are scheduled after it, so no caller is
starved by later arrivals, in this process or another.

Window bound: over any window of ``t`` seconds, the admissions of every instance together stay within
``capacity + rate·t`` per bucket (``max(capacity, largest cost) + rate·t`` with oversize costs), as for the
local limiter.

Lease mode (opt-in: ``lease=N``)
--------------------------------
For hot paths: one round trip reserves a block of ``N`` calls like the one that takes it (``N`` requests, or
that call's requests if more, and ``N`` times its tokens), and this process spends it locally, with no round
trip, until it runs out or ``max(burst_seconds, block)`` seconds pass; the next acquire then takes a new lease,
giving the unspent remainder back in the same round trip. Callers that find the lease spent while a lease
request is in flight queue behind it, first come first served, and are handed their share when it arrives (or
the first one it does not cover takes the next lease), so one thread never has two lease requests in flight.
Token settlements (debit/refund) are folded into the next lease's round trip.

Slack: a process can spend, at any time, what remains of a lease taken earlier, so over any window of ``t``
seconds the admissions of ``k`` instances may exceed ``capacity + rate·t`` by at most ``N × k`` requests (and
``k`` token blocks of ``N`` calls' tokens). An instance is one thread (one event loop): each thread using the
limiter holds its own lease. Choose ``N`` well below the bucket's capacity (``rpm/60 · burst_seconds``).
Refusals in lease mode are decided per lease: a queued caller is refused at once when the lease in flight will
be usable later than its budget allows. Throughput: one thread admits at most ``N`` calls per round trip while
callers queue (with one caller it is about ``N`` times the strict rate; with many concurrent callers the single
lease request in flight, which the slack bound requires, is the limit).

When the store is unavailable
-----------------------------
A store operation that fails raises :class:`~ragguard.BackendUnavailable` (Redis down, or slower than the
backend's ``timeout``). ``on_unavailable`` then decides:

- ``fail_open``: the call is admitted by a local :class:`~ragguard.RateLimiter` holding this process's fair share
  (``rpm/expected_instances``, ``tpm/expected_instances``, same burst in seconds): no call fails because Redis is
  down, and the provider's quota still holds if every instance does the same.
- ``fail_closed``: :class:`~ragguard.BackendUnavailable` is raised (within the backend timeout).

After a failure the limiter does not try the store again for ``backend_retry_after`` seconds (default 1 s), so a
dead or hanging Redis does not add its timeout to every call; in that interval ``fail_open`` callers go straight
to the local share and ``fail_closed`` callers get :class:`~ragguard.BackendUnavailable` at once. The first call
after the interval tries the store again: both modes recover on their own, with no restart.

Switching paths (``fail_open``): callers already sleeping on a reservation of the path left behind still go, and
the path taken over knows nothing of them. So the switch carries them over, and assumes the worst of what it
cannot know:

- to the local share, at the first store failure: the local share starts empty (this process may have spent the
  shared burst already) and is charged with the reservations this process still has waiting in the store;
- back to the store, at the first call after ``backend_retry_after``: that call drains the shared bucket (sets
  its level to empty, like a provider's ``x-ratelimit-remaining-*: 0``; idempotent, so every instance may do it)
  and charges it with the callers still waiting in the local share, *before* reserving its own slot; callers
  arriving meanwhile use the local share. Unspent leases are dropped. If the store fails again on the way, the
  limiter stays on the local share.

Without this, both paths' admissions add up after each switch (a restarted Redis, or one that was full, offers a
whole burst while the local share's callers still go) and the provider's quota is exceeded. Settlements
(debit, refund, headers, pauses) that fail are dropped, never raised: the call has already happened. A
rate-limited failure always pauses the local fallback too, so a pause holds even if Redis fails meanwhile.

Telemetry: :attr:`SharedRateLimiter.round_trips`, :attr:`~SharedRateLimiter.fallbacks` (calls admitted by the
local share), :attr:`~SharedRateLimiter.unavailable` (store failures seen), :attr:`~SharedRateLimiter.leases`
(leases taken) and :attr:`~SharedRateLimiter.lease_admissions` (calls admitted from a lease), all plain counters
(approximate if several threads share one limiter).
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import anyio
import pydantic

from .. import telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._hints import MAX_HINT_SECONDS, RateLimitHeaders
from .._shielded import run_shielded
from ..backends.redis import RedisBackendOptions
from ..config import RateLimitPolicy
from ..errors import BackendUnavailable, RateLimitTimeout
from .limiter import DEFAULT_PAUSE, PAUSE_JITTER_FRACTION, PAUSE_JITTER_INTERVALS, RateLimiter
from .pipeline import GuardBase

__all__ = ["BucketStore", "BucketStoreProvider", "SharedRateLimiter"]

T = TypeVar("T")

OnUnavailable = Literal["fail_open", "fail_closed"]

#: seconds during which a limiter whose store just failed does not try it again
DEFAULT_BACKEND_RETRY_AFTER = 1.0
#: float slack when spending a lease (costs are sums of ``count·60/rate`` in seconds)
_EPS = 1e-9

# how a call was admitted (decides where it is settled)
_STORE = 0
_FALLBACK = 1
_LEASE = 2


class ReservationView(Protocol):
    """What :meth:`BucketStore.reserve` answers (e.g. :class:`ragguard.backends._redis_bucket.Reservation`)."""

    @property
    def admitted(self) -> bool:
        """``True``: reserved, sleep :attr:`wait` then call; ``False``: refused, nothing reserved."""
        ...

    @property
    def wait(self) -> float:
        """Seconds until the call may go (``0.0``: at once)."""
        ...

    @property
    def shift(self) -> float:
        """The bucket's total pause shift when the reservation was made."""
        ...

    @property
    def now(self) -> float:
        """The store's time of the reservation, seconds (any origin; only differences are used)."""
        ...

    @property
    def slot(self) -> float:
        """The reservation's time less :attr:`shift` (store time), passed back to :meth:`BucketStore.refund` when
        its caller gives it up (``math.inf`` when it did not wait)."""
        ...


class BucketStateView(Protocol):
    """What :meth:`BucketStore.check` answers (store time, seconds)."""

    @property
    def now(self) -> float: ...

    @property
    def shift(self) -> float: ...

    @property
    def paused_until(self) -> float: ...

    @property
    def jitter_cap(self) -> float: ...


@runtime_checkable
class BucketStore(Protocol):
    """Shared reservation-schedule buckets (see :mod:`ragguard.backends._redis_bucket` for the semantics).

    Costs, levels and ``burst`` are in seconds of refill (``count · 60 / rate_per_minute``), times on the
    store's own clock. Every method raises :class:`~ragguard.BackendUnavailable` when the store cannot answer.
    """

    async def reserve(
        self,
        name: str,
        req_cost: float,
        tok_cost: float,
        burst: float,
        budget: float,
        jitter: float,
        refund_req: float = 0.0,
        refund_tok: float = 0.0,
    ) -> ReservationView: ...

    async def check(self, name: str) -> BucketStateView: ...

    async def refund(self, name: str, req_cost: float, tok_cost: float, burst: float, slot: float = math.inf) -> None:
        """Give capacity back: a reservation's (``slot``: only what no later reservation depends on), or, with
        ``slot=math.inf``, the whole amount off the end of the schedule."""
        ...

    async def debit(self, name: str, req_cost: float, tok_cost: float) -> None: ...

    async def pause(
        self, name: str, seconds: float, burst: float, jitter_cap: float, requests: bool, tokens: bool
    ) -> None: ...

    async def observe(self, name: str, req_level: float | None, tok_level: float | None, burst: float) -> None: ...


class BucketStoreProvider(Protocol):
    """Something that makes a :class:`BucketStore`, e.g. :class:`ragguard.RedisBackend`."""

    def bucket_store(self) -> BucketStore: ...


#: ``expected_instances`` checked by :class:`~ragguard.RedisBackendOptions`'s rule (one source of truth)
_INSTANCES = pydantic.create_model(
    "SharedRateLimiter", expected_instances=(int, RedisBackendOptions.model_fields["expected_instances"])
)


class _StoreSkipped(Exception):
    """Internal: another caller's store request just failed; do not try the store yet."""


# what a queued lease waiter is told when it wakes
_PENDING = 0
_GRANTED = 1  # its cost was taken from the new lease: go
_FETCH = 2  # the lease ran out before its turn: it takes the next lease
_REFUSED = 3  # the next lease comes later than its budget allows (``error``)
_RETRY = 4  # the store failed: fall back (or fail closed)


class _Waiter:
    """A caller queued behind the lease request in flight."""

    __slots__ = ("deadline", "error", "event", "req", "tok", "verdict")

    def __init__(self, req: float, tok: float, deadline: float) -> None:
        self.req = req
        self.tok = tok
        self.deadline = deadline
        self.event = anyio.Event()
        self.verdict = _PENDING
        self.error: RateLimitTimeout | None = None


class _Lane:
    """The lease of one thread (so of one event loop at a time), touched only by that thread.

    Attributes:
        req, tok: what is left of the current lease, seconds of refill.
        until: the limiter clock's time after which the lease is not spent any more.
        pending_tok: tokens settled since the lease was taken, seconds of refill (positive: to give back with the
            next lease; negative: debt to charge with it).
        fetching: whether a lease request is in flight (its caller hands the lease out when it arrives).
        ready_at: when the lease in flight becomes usable (limiter clock; ``inf`` until the store answered).
        queue: callers waiting for the lease in flight, first come first served.
    """

    __slots__ = ("fetching", "pending_tok", "queue", "ready_at", "req", "tok", "until")

    def __init__(self) -> None:
        self.req = 0.0
        self.tok = 0.0
        self.until = -math.inf
        self.pending_tok = 0.0
        self.fetching = False
        self.ready_at = math.inf
        self.queue: deque[_Waiter] = deque()


class SharedRateLimiter(GuardBase):
    """Requests-per-minute and tokens-per-minute limits shared by every process using one store (module doc).

    Args:
        store: a :class:`BucketStore`, or something with a ``bucket_store()`` method (a
            :class:`~ragguard.RedisBackend`).
        rpm, tpm, burst_seconds, scope, accounting, follow_headers, share_retry_after, max_wait: as for
            :class:`~ragguard.RateLimiter` (:class:`~ragguard.RateLimitPolicy`). Every instance sharing the
            bucket must use the same ``rpm``, ``tpm`` and ``burst_seconds``.
        name: the bucket's name (instances with the same name and store share one quota); it is hashed into the
            Redis key, never stored in clear.
        clock: the clock waits are slept on (bucket arithmetic uses the store's clock).
        on_unavailable: ``fail_open`` or ``fail_closed`` (default: the store's own setting, else ``fail_open``).
        expected_instances: how many processes share the bucket, ``1..100_000`` as for
            :class:`~ragguard.RedisBackendOptions`; the ``fail_open`` fallback allows this process
            ``1/expected_instances`` of each rate (default: the store's setting, else 1).
        lease: opt-in lease mode: requests per lease, an integer ``>= 1`` (:attr:`RateLimitPolicy.lease
            <ragguard.RateLimitPolicy>`; ``None``: strict mode, one round trip per call).
        backend_retry_after: seconds after a store failure during which the store is not tried again.
        rng: the random source of the release jitter.

    Raises:
        pydantic.ValidationError: an invalid rate-limit setting, ``lease`` or ``expected_instances``, naming the
            field.
        ValueError: a negative ``backend_retry_after``, or an unknown ``on_unavailable``.

    Example::

        backend = ragguard.RedisBackend("redis://redis:6379/0", expected_instances=4)
        limiter = SharedRateLimiter(backend, rpm=3_000, tpm=250_000, name="openai:gpt-4o-mini")
        reply = await limiter.run(lambda: client.chat.completions.create(...), CallContext(tokens=1_200))
    """

    stage: ClassVar[str] = "rate_limit"
    #: a store round trip may outlast ``ctx.deadline`` by up to the backend timeout
    honours_deadline = False

    __slots__ = (
        "_block_req",
        "_burst",
        "_fallback",
        "_follow_headers",
        "_held_lock",
        "_held_req",
        "_held_tok",
        "_jitter_limit",
        "_lanes",
        "_lease",
        "_local_req",
        "_local_tok",
        "_max_wait",
        "_reconcile",
        "_rejoining",
        "_req_inv",
        "_retry_after",
        "_rng",
        "_share_retry_after",
        "_skip_until",
        "_store",
        "_tok_inv",
        "clock",
        "expected_instances",
        "fallbacks",
        "last_error",
        "lease_admissions",
        "leases",
        "name",
        "on_unavailable",
        "policy",
        "round_trips",
        "unavailable",
    )

    def __init__(
        self,
        store: BucketStore | BucketStoreProvider,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst_seconds: float = 0.5,
        scope: Literal["model", "credential"] = "model",
        accounting: Literal["openai", "reconcile"] = "openai",
        follow_headers: bool = True,
        share_retry_after: bool = True,
        max_wait: float | None = None,
        name: str = "default",
        clock: Clock = SYSTEM_CLOCK,
        on_unavailable: OnUnavailable | None = None,
        expected_instances: int | None = None,
        lease: int | None = None,
        backend_retry_after: float = DEFAULT_BACKEND_RETRY_AFTER,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = RateLimitPolicy(
            rpm=rpm,
            tpm=tpm,
            burst_seconds=burst_seconds,
            scope=scope,
            accounting=accounting,
            follow_headers=follow_headers,
            share_retry_after=share_retry_after,
            max_wait=max_wait,
            lease=lease,
        )
        policy = self.policy
        lease = policy.lease
        make = getattr(store, "bucket_store", None)
        self._store: BucketStore = make() if callable(make) else store  # type: ignore[assignment]
        if on_unavailable is None:
            on_unavailable = getattr(self._store, "on_unavailable", "fail_open")
        if on_unavailable not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_unavailable must be 'fail_open' or 'fail_closed', got {on_unavailable!r}")
        if expected_instances is None:
            expected_instances = getattr(self._store, "expected_instances", 1)
        expected_instances = _INSTANCES(expected_instances=expected_instances).model_dump()["expected_instances"]
        if not backend_retry_after >= 0.0:
            raise ValueError(f"backend_retry_after must be >= 0 seconds, got {backend_retry_after!r}")
        self.name = name
        self.clock = clock
        self.on_unavailable: OnUnavailable = on_unavailable
        self.expected_instances = expected_instances
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not a secret
        self._burst = float(policy.burst_seconds)
        self._req_inv = 60.0 / policy.rpm if policy.rpm is not None else 0.0
        self._tok_inv = 60.0 / policy.tpm if policy.tpm is not None else 0.0
        self._max_wait = policy.max_wait if policy.max_wait is not None else math.inf
        self._reconcile = policy.accounting == "reconcile"
        self._follow_headers = policy.follow_headers
        self._share_retry_after = policy.share_retry_after
        self._jitter_limit = PAUSE_JITTER_INTERVALS * self._req_inv
        self._retry_after = float(backend_retry_after)
        self._skip_until = -math.inf
        # what is waiting on each admission path, carried over to the other when fail_open switches paths (module
        # doc): store reservations in seconds of refill of the shared buckets, local-share ones in requests and
        # tokens; a lock because several threads may share the limiter (taken around store waits and local-share
        # admissions, never on a call the store admits at once)
        self._held_lock = threading.Lock()
        self._held_req = self._held_tok = 0.0
        self._local_req = self._local_tok = 0.0
        self._rejoining = False
        share = float(expected_instances)
        self._fallback = RateLimiter(
            rpm=policy.rpm / share if policy.rpm is not None else None,
            tpm=policy.tpm / share if policy.tpm is not None else None,
            burst_seconds=policy.burst_seconds,
            scope=policy.scope,
            accounting=policy.accounting,
            follow_headers=policy.follow_headers,
            share_retry_after=policy.share_retry_after,
            max_wait=policy.max_wait,
            clock=clock,
            name=f"{name} (local share)",
            rng=self._rng,
        )
        # lease mode: the block one lease reserves on the requests bucket (seconds of refill), and the lease state
        # of each thread using the limiter
        self._lease = lease
        self._block_req = lease * self._req_inv if lease is not None else 0.0
        self._lanes: dict[int, _Lane] = {}
        #: store round trips made
        self.round_trips = 0
        #: calls admitted by the local fallback share while the store was unavailable
        self.fallbacks = 0
        #: store failures (``BackendUnavailable``) seen
        self.unavailable = 0
        #: leases taken (lease mode)
        self.leases = 0
        #: calls admitted from a lease without a round trip (lease mode)
        self.lease_admissions = 0
        #: the last store failure (``None`` once the store answered again)
        self.last_error: BaseException | None = None

    @classmethod
    def from_policy(
        cls, section: RateLimitPolicy, *, store: BucketStore | BucketStoreProvider, **extras: Any
    ) -> SharedRateLimiter:
        """Build a limiter from a :class:`~ragguard.RateLimitPolicy`, a ``store`` and the keyword arguments of
        the constructor (``name``, ``clock``, ``on_unavailable``, ``expected_instances``, ``lease``, …); an
        extra given here overrides the policy's value of the same name (e.g. ``lease``)."""
        return cls(store, **{**section.model_dump(), **extras})

    # --- read-only views -------------------------------------------------------------------------------

    @property
    def store(self) -> BucketStore:
        return self._store

    @property
    def rpm(self) -> float | None:
        return self.policy.rpm

    @property
    def tpm(self) -> float | None:
        return self.policy.tpm

    @property
    def scope(self) -> Literal["model", "credential"]:
        return self.policy.scope

    @property
    def lease(self) -> int | None:
        """Requests per lease (``None``: strict mode)."""
        return self._lease

    @property
    def fallback(self) -> RateLimiter:
        """The local limiter holding this process's share, used by ``fail_open`` while the store is down."""
        return self._fallback

    def stats(self) -> dict[str, int]:
        """The telemetry counters, for spans and health reports."""
        return {
            "round_trips": self.round_trips,
            "fallbacks": self.fallbacks,
            "unavailable": self.unavailable,
            "leases": self.leases,
            "lease_admissions": self.lease_admissions,
        }

    # --- admission -------------------------------------------------------------------------------------

    async def acquire(self, requests: float = 1.0, tokens: float = 0.0, *, deadline: float = math.inf) -> None:
        """Wait until a call costing ``requests`` and ``tokens`` may go.

        Args:
            requests: the cost against the requests bucket (``>= 0``).
            tokens: the cost against the tokens bucket (``>= 0``).
            deadline: absolute time on this limiter's ``clock`` by which the wait must end.

        Raises:
            RateLimitTimeout: the wait would exceed ``min(max_wait, deadline - now)``; nothing stays reserved.
            BackendUnavailable: the store is unavailable and ``on_unavailable`` is ``fail_closed``.
            ValueError: a negative or NaN cost.
        """
        budget = self._max_wait
        if deadline != math.inf:
            left = deadline - self.clock.now()
            if left < budget:
                budget = left
        await self._admit(requests, tokens, budget)

    async def _admit(self, requests: float, tokens: float, budget: float) -> int:
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"rate limiter costs must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        if self._skip_until != -math.inf:
            if self._skipping() or self._rejoining:
                return await self._unavailable(None, requests, tokens, budget)
            if self.on_unavailable == "fail_open":
                started = self.clock.now()
                try:
                    await self._rejoin()
                except BackendUnavailable as exc:
                    return await self._unavailable(exc, requests, tokens, budget - (self.clock.now() - started))
                budget -= self.clock.now() - started  # the reservation's wait must still end within the deadline
        req_cost = requests * self._req_inv
        tok_cost = tokens * self._tok_inv
        try:
            if self._lease is not None:
                await self._lease_admit(req_cost, tok_cost, budget)
                return _LEASE
            reply = await self._store.reserve(self.name, req_cost, tok_cost, self._burst, budget, self._rng.random())
        except BackendUnavailable as exc:
            return await self._unavailable(exc, requests, tokens, budget)
        except _StoreSkipped:
            return await self._unavailable(None, requests, tokens, budget)
        self.round_trips += 1
        if self._skip_until != -math.inf and self.on_unavailable == "fail_closed":
            # (fail_open recovers only through _rejoin: an answer to a request sent before the failure is no
            # reason to leave the local share without carrying its callers over)
            self._recovered()
        if reply.wait > 0.0:
            if not reply.admitted:
                raise RateLimitTimeout(
                    f"rate limiter {self.name!r} needs {reply.wait:.3f} s before admitting the call; "
                    f"the wait may last only {budget:.3f} s",
                    wait=reply.wait,
                    remaining=budget,
                )
            await self._held_wait(reply, req_cost, tok_cost, budget)
        return _STORE

    async def _held_wait(self, reply: ReservationView, req_cost: float, tok_cost: float, budget: float) -> None:
        """:meth:`_wait`, counting the reservation as held in the store meanwhile (carried over to the local share
        if the store fails before it goes)."""
        with self._held_lock:
            self._held_req += req_cost
            self._held_tok += tok_cost
        try:
            await self._wait(reply, req_cost, tok_cost, budget)
        finally:
            with self._held_lock:
                self._held_req -= req_cost
                self._held_tok -= tok_cost

    async def _wait(self, reply: ReservationView, req_cost: float, tok_cost: float, budget: float) -> None:
        """Sleep until the reservation's time; then re-check the bucket once, to follow a shared pause set
        meanwhile (by any instance), until no pause moves the reservation any more."""
        clock = self.clock
        shift0 = reply.shift
        reserved_at = reply.now + reply.wait  # store time
        limit_at = reply.now + budget
        base = reserved_at
        delay = reply.wait
        late = -1.0
        left = 0.0
        try:
            while True:
                await clock.sleep(delay)
                try:
                    state = await self._store.check(self.name)
                except BackendUnavailable as exc:
                    self._note_failure(exc)
                    break  # the reservation stands; a pause could not be set without the store either
                self.round_trips += 1
                moved = reserved_at + (state.shift - shift0)
                floor = state.paused_until
                candidate = moved if moved >= floor else floor
                if candidate <= base:
                    break  # no pause moved us while we slept
                base = candidate
                target = candidate + (self._rng.uniform(0.0, state.jitter_cap) if floor > moved else 0.0)
                if target > limit_at:
                    late = target - state.now
                    left = limit_at - state.now
                    break
                delay = target - state.now
        except BaseException:
            await self._refund_quietly(req_cost, tok_cost, reply.slot)
            raise
        if late >= 0.0:
            await self._refund_quietly(req_cost, tok_cost, reply.slot)
            raise RateLimitTimeout(
                f"rate limiter {self.name!r} was paused by the provider: {late:.3f} s more to wait, "
                f"the wait may last only {left:.3f} s more",
                wait=late,
                remaining=left,
            )

    async def _refund_quietly(self, req_cost: float, tok_cost: float, slot: float) -> None:
        """Give a reservation back (only what no later reservation depends on: ``slot``, see
        :meth:`BucketStore.refund`), shielded from cancellation (bounded by the store's timeout); a store failure
        is noted, not raised."""
        if not (req_cost or tok_cost):
            return

        async def refund() -> None:
            try:
                await self._store.refund(self.name, req_cost, tok_cost, self._burst, slot)
            except BackendUnavailable as exc:
                self._note_failure(exc)
            except Exception:  # noqa: S110 - nothing may replace the cancellation or refusal being raised
                pass
            else:
                self.round_trips += 1

        # finished even if the caller is cancelled again meanwhile, by anyio or by asyncio's own task.cancel()
        await run_shielded(refund)

    # --- lease mode ------------------------------------------------------------------------------------

    def _lane(self) -> _Lane:
        ident = threading.get_ident()
        lane = self._lanes.get(ident)
        if lane is None:
            lane = self._lanes[ident] = _Lane()
        return lane

    async def _lease_admit(self, req_cost: float, tok_cost: float, budget: float) -> None:
        """Spend from this thread's lease; or queue behind the lease request in flight; or take a new lease."""
        lane = self._lane()
        now = self.clock.now()
        if not lane.queue and now < lane.until and lane.req >= req_cost - _EPS and lane.tok >= tok_cost - _EPS:
            lane.req -= req_cost
            lane.tok -= tok_cost
            self.lease_admissions += 1
            return
        if not lane.fetching:
            lane.fetching = True
            await self._take_lease(lane, req_cost, tok_cost, budget)
            return
        ahead = lane.ready_at - now
        if ahead > budget and ahead > 0.0:
            raise self._late(ahead, budget)
        waiter = _Waiter(req_cost, tok_cost, now + budget)
        lane.queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.verdict == _PENDING:
                lane.queue.remove(waiter)
            elif waiter.verdict == _GRANTED:  # give the unused share back to the lease
                lane.req += req_cost
                lane.tok += tok_cost
            elif waiter.verdict == _FETCH:
                self._pass_on(lane, failed=False)
            raise
        verdict = waiter.verdict
        if verdict == _GRANTED:
            self.lease_admissions += 1
            return
        if verdict == _FETCH:
            await self._take_lease(lane, req_cost, tok_cost, waiter.deadline - self.clock.now())
            return
        if verdict == _REFUSED and waiter.error is not None:
            raise waiter.error
        raise _StoreSkipped

    def _late(self, ahead: float, budget: float) -> RateLimitTimeout:
        return RateLimitTimeout(
            f"rate limiter {self.name!r}: the next lease is {ahead:.3f} s away; the wait may last only {budget:.3f} s",
            wait=ahead,
            remaining=budget,
        )

    async def _take_lease(self, lane: _Lane, req_cost: float, tok_cost: float, budget: float) -> None:
        """Reserve a block (giving back the unspent remainder in the same round trip), spend this caller's cost
        from it and hand the rest out to the callers queued meanwhile. ``lane.fetching`` is set by the caller."""
        refund_req = lane.req if lane.req > 0.0 else 0.0
        refund_tok = (lane.tok if lane.tok > 0.0 else 0.0) + lane.pending_tok
        lane.req = lane.tok = lane.pending_tok = 0.0
        lane.until = -math.inf
        block_req = self._block_req if self._block_req > req_cost else req_cost
        block_tok = (self._lease or 1) * tok_cost
        cost_tok = block_tok
        if refund_tok < 0.0:  # debt settled since the last lease: charge it with this one
            cost_tok -= refund_tok
            refund_tok = 0.0
        clock = self.clock
        taken = False
        try:
            reply = await self._store.reserve(
                self.name, block_req, cost_tok, self._burst, budget, self._rng.random(), refund_req, refund_tok
            )
            self.round_trips += 1
            if self._skip_until != -math.inf and self.on_unavailable == "fail_closed":
                self._recovered()
            if reply.wait > 0.0:
                lane.ready_at = clock.now() + reply.wait
                self._refuse_late(lane)
                if not reply.admitted:
                    raise RateLimitTimeout(
                        f"rate limiter {self.name!r} needs {reply.wait:.3f} s before admitting the call; "
                        f"the wait may last only {budget:.3f} s",
                        wait=reply.wait,
                        remaining=budget,
                    )
                await self._held_wait(reply, block_req, cost_tok, budget)
            self.leases += 1
            lifetime = block_req if block_req > block_tok else block_tok
            if lifetime < self._burst:
                lifetime = self._burst
            lane.req = block_req - req_cost
            lane.tok = block_tok - tok_cost
            lane.until = clock.now() + lifetime
            taken = True
        finally:
            lane.ready_at = math.inf
            if taken:
                self._hand_out(lane)
            else:
                self._pass_on(lane, failed=self._skip_until != -math.inf and self._skipping())

    def _refuse_late(self, lane: _Lane) -> None:
        """Refuse at once the queued callers whose budget ends before the lease in flight is usable."""
        ready_at = lane.ready_at
        if not any(waiter.deadline < ready_at for waiter in lane.queue):
            return
        now = self.clock.now()
        keep: deque[_Waiter] = deque()
        for waiter in lane.queue:
            if waiter.deadline < ready_at:
                waiter.verdict = _REFUSED
                waiter.error = self._late(ready_at - now, waiter.deadline - now)
                waiter.event.set()
            else:
                keep.append(waiter)
        lane.queue = keep

    def _hand_out(self, lane: _Lane) -> None:
        """Give the new lease to the queued callers in order while it covers them; the first it does not cover
        takes the next lease."""
        queue = lane.queue
        granted: list[_Waiter] = []
        while queue:
            waiter = queue[0]
            if not (lane.req >= waiter.req - _EPS and lane.tok >= waiter.tok - _EPS):
                break
            queue.popleft()
            lane.req -= waiter.req
            lane.tok -= waiter.tok
            waiter.verdict = _GRANTED
            granted.append(waiter)
        if queue:
            # woken first, so the next lease request leaves before the granted callers run
            waiter = queue.popleft()
            waiter.verdict = _FETCH  # lane.fetching stays set: the role passes to it
            waiter.event.set()
        else:
            lane.fetching = False
        for waiter in granted:
            waiter.event.set()

    def _pass_on(self, lane: _Lane, *, failed: bool) -> None:
        """The lease request failed or its caller left: the next queued caller takes over, or, when the store
        is down, every queued caller falls back."""
        queue = lane.queue
        if failed:
            while queue:
                waiter = queue.popleft()
                waiter.verdict = _RETRY
                waiter.event.set()
        elif queue:
            waiter = queue.popleft()
            waiter.verdict = _FETCH
            waiter.event.set()
            return
        lane.fetching = False

    def _drop_lease(self) -> None:
        for lane in list(self._lanes.values()):
            lane.req = lane.tok = 0.0
            lane.until = -math.inf

    # --- the store is unavailable ----------------------------------------------------------------------

    def _skipping(self) -> bool:
        return self.clock.now() < self._skip_until

    def _recovered(self) -> None:
        self._skip_until = -math.inf
        self.last_error = None

    def _note_failure(self, exc: BaseException) -> None:
        entering = self._skip_until == -math.inf
        self.unavailable += 1
        self.last_error = exc
        self._skip_until = self.clock.now() + self._retry_after
        if entering and self.on_unavailable == "fail_open":
            self._enter_fallback()

    def _enter_fallback(self) -> None:
        """Switch to the local share (module doc): it starts empty, charged with this process's reservations
        still waiting in the store."""
        with self._held_lock:
            held_req = self._held_req
            held_tok = self._held_tok
        fallback = self._fallback
        fallback.observe(RateLimitHeaders(remaining_requests=0.0, remaining_tokens=0.0))
        requests = held_req / self._req_inv if self._req_inv and held_req > 0.0 else 0.0
        tokens = held_tok / self._tok_inv if self._tok_inv and held_tok > 0.0 else 0.0
        if requests or tokens:
            fallback.debit(tokens, requests)

    async def _rejoin(self) -> None:
        """Switch back to the store (module doc): drain the shared buckets, then charge them with the callers still
        waiting in the local share; one caller at a time (the others use the local share meanwhile).

        Raises:
            BackendUnavailable: the store failed again (noted by the caller; the limiter stays on the local share).
        """
        self._rejoining = True
        try:
            name = self.name
            burst = self._burst
            await self._store.observe(name, 0.0 if self._req_inv else None, 0.0 if self._tok_inv else None, burst)
            self.round_trips += 1
            with self._held_lock:
                req_cost = self._local_req * self._req_inv
                tok_cost = self._local_tok * self._tok_inv
            if req_cost > 0.0 or tok_cost > 0.0:
                await self._store.debit(name, max(req_cost, 0.0), max(tok_cost, 0.0))
                self.round_trips += 1
        finally:
            self._rejoining = False
        self._drop_lease()  # leases taken before the failure were drained with the buckets
        self._recovered()

    async def _unavailable(self, exc: BackendUnavailable | None, requests: float, tokens: float, budget: float) -> int:
        if exc is not None:
            self._note_failure(exc)
        if self.on_unavailable == "fail_closed":
            if exc is not None:
                raise exc
            raise BackendUnavailable(
                f"rate limiter {self.name!r}: the shared store failed less than {self._retry_after:g} s ago "
                f"({type(self.last_error).__name__}: {self.last_error}); not trying it again yet"
            ) from self.last_error
        self.fallbacks += 1
        deadline = self.clock.now() + budget if budget != math.inf else math.inf
        with self._held_lock:
            self._local_req += requests
            self._local_tok += tokens
        try:
            await self._fallback.acquire(requests, tokens, deadline=deadline)
        finally:
            with self._held_lock:
                self._local_req -= requests
                self._local_tok -= tokens
        return _FALLBACK

    # --- settlement ------------------------------------------------------------------------------------

    async def _quietly(self, operation: Callable[[], Awaitable[None]], *, masking: bool = False) -> None:
        """Run a settlement; an unavailable store is noted, not raised. ``masking``: the caller is about to
        re-raise the provider's error, which no other error of ours may replace."""
        if self._skip_until != -math.inf and self._skipping():
            return
        try:
            await operation()
        except BackendUnavailable as exc:
            self._note_failure(exc)
        except Exception:
            if not masking:
                raise
        else:
            self.round_trips += 1

    async def debit(self, tokens: float, requests: float = 0.0) -> None:
        """Charge extra cost now in the shared bucket, without waiting (the level may go negative).

        Raises:
            BackendUnavailable: the store could not answer.
            ValueError: a negative or NaN amount.
        """
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"debits must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        await self._store.debit(self.name, requests * self._req_inv, tokens * self._tok_inv)
        self.round_trips += 1

    async def refund(self, requests: float = 0.0, tokens: float = 0.0) -> None:
        """Give capacity back to the shared bucket (never above capacity, nor above empty during a pause), off the
        end of the schedule: for the **newest** reservation only (a call :meth:`acquire` admitted but that was
        not made, before anyone else reserved), or tokens charged but not spent. Giving back an older reservation
        this way, after later ones were made in any instance, would let a newcomer share a slot with one of them;
        a caller cancelled while waiting gives its own reservation back, clamped (see the module doc).

        Raises:
            BackendUnavailable: the store could not answer.
            ValueError: a negative or NaN amount.
        """
        if not (requests >= 0.0 and tokens >= 0.0):
            raise ValueError(f"refunds must be >= 0, got requests={requests!r}, tokens={tokens!r}")
        await self._store.refund(self.name, requests * self._req_inv, tokens * self._tok_inv, self._burst)
        self.round_trips += 1

    async def pause(self, seconds: float) -> None:
        """Hold every caller of the bucket, in every instance, for ``seconds`` of the store's clock (a provider's
        Retry-After); the local fallback share pauses too. See :meth:`ragguard.RateLimiter.pause`.

        Raises:
            BackendUnavailable: the store could not answer (the local fallback is paused anyway).
            ValueError: ``seconds`` negative, NaN or infinite.
        """
        if not (0.0 <= seconds < math.inf):
            raise ValueError(f"pause must be finite and >= 0 seconds, got {seconds!r}")
        self._fallback.pause(seconds)
        self._drop_lease()
        await self._store.pause(
            self.name, seconds, self._burst, self._jitter_cap(seconds), bool(self._req_inv), bool(self._tok_inv)
        )
        self.round_trips += 1

    def _jitter_cap(self, seconds: float) -> float:
        cap = PAUSE_JITTER_FRACTION * seconds
        if self._req_inv and self._jitter_limit < cap:
            cap = self._jitter_limit
        return cap

    async def observe(self, headers: RateLimitHeaders) -> None:
        """Lower the shared levels to the provider's ``remaining_requests`` / ``remaining_tokens`` when those
        are lower (never raise them). No round trip when the provider reports at least a full bucket left.

        Raises:
            BackendUnavailable: the store could not answer.
        """
        req_level, tok_level = self._levels(headers)
        if req_level is None and tok_level is None:
            return
        await self._store.observe(self.name, req_level, tok_level, self._burst)
        self.round_trips += 1

    def _levels(self, headers: RateLimitHeaders) -> tuple[float | None, float | None]:
        """The provider's remaining counts in seconds of refill, ``None`` where they cannot lower anything."""
        burst = self._burst
        req_level = tok_level = None
        remaining = headers.remaining_requests
        if remaining is not None and self._req_inv:
            level = remaining * self._req_inv
            if level < burst:
                req_level = level
        remaining = headers.remaining_tokens
        if remaining is not None and self._tok_inv:
            level = remaining * self._tok_inv
            if level < burst:
                tok_level = level
        return req_level, tok_level

    # --- the guard -------------------------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        """Wait for ``ctx.requests`` and ``ctx.tokens`` of shared capacity, run ``call``, then settle the account.

        Raises:
            RateLimitTimeout: the wait would exceed ``min(max_wait, ctx.remaining())``.
            BackendUnavailable: the store is unavailable and ``on_unavailable`` is ``fail_closed``.
            Whatever ``call`` raises (after pausing the shared bucket if it was rate-limited).
        """
        requests = ctx.requests
        tokens = ctx.tokens
        budget = self._max_wait
        if ctx.deadline != math.inf:
            left = ctx.remaining()
            if left < budget:
                budget = left
        started = self.clock.now()
        route = await self._admit(requests, tokens, budget)
        waited = self.clock.now() - started
        if waited > 0.001:  # a round trip to the store is not a wait
            telemetry.limiter_waited(self.name, waited)
        # The context outlives one attempt: only headers this attempt brought count.
        seen = ctx.rate_headers
        try:
            result = await call()
        except Exception as exc:
            await self._after_failure(exc, ctx, seen, requests, tokens, route)
            raise
        used = ctx.used_tokens
        if used is not None and self._tok_inv:
            extra = used - tokens
            if extra > 0.0 or (extra < 0.0 and self._reconcile):
                await self._settle_tokens(extra, route)
        if self._follow_headers:
            headers = ctx.rate_headers
            if headers is not None and headers is not seen:
                await self._observe_after(headers, route)
        return result

    async def _settle_tokens(self, extra: float, route: int) -> None:
        """Debit (``extra > 0``) or refund (``extra < 0``) tokens where the call was admitted."""
        if route == _FALLBACK:
            if extra > 0.0:
                self._fallback.debit(extra)
            else:
                self._fallback.refund(0.0, -extra)
            return
        cost = extra * self._tok_inv
        if route == _LEASE:
            # folded into the next lease's round trip: a debt is charged with it, a refund given back with it
            self._lane().pending_tok -= cost
            return
        name = self.name
        if cost > 0.0:
            await self._quietly(lambda: self._store.debit(name, 0.0, cost))
        else:
            await self._quietly(lambda: self._store.refund(name, 0.0, -cost, self._burst))

    async def _observe_after(self, headers: RateLimitHeaders, route: int, *, masking: bool = False) -> None:
        if route == _FALLBACK:
            self._fallback.observe(headers)
            return
        req_level, tok_level = self._levels(headers)
        if req_level is None and tok_level is None:
            return
        name = self.name
        await self._quietly(lambda: self._store.observe(name, req_level, tok_level, self._burst), masking=masking)

    async def _after_failure(
        self,
        exc: Exception,
        ctx: CallContext,
        seen: RateLimitHeaders | None,
        requests: float,
        tokens: float,
        route: int,
    ) -> None:
        # The failed call keeps its charge: providers count failed requests.
        if self._follow_headers:
            headers = ctx.rate_headers
            if headers is not None and headers is not seen:
                await self._observe_after(headers, route, masking=True)
        if not self._share_retry_after:
            return
        try:
            outcome = ctx.classify(exc)
        except Exception:  # a broken classifier must not replace the provider's error
            return
        if not outcome.rate_limited:
            return
        hint = outcome.retry_after
        if hint is None or not hint >= 0.0:
            # No usable hint: the time one request (and this call's tokens) takes to refill.
            if self._req_inv or self._tok_inv:
                hint = max(max(requests, 1.0) * self._req_inv, max(tokens, 1.0) * self._tok_inv)
            else:
                hint = DEFAULT_PAUSE
        seconds = min(hint, MAX_HINT_SECONDS)
        self._fallback.pause(seconds)
        self._drop_lease()
        cap = self._jitter_cap(seconds)
        name = self.name
        requests_limited = bool(self._req_inv)
        tokens_limited = bool(self._tok_inv)
        await self._quietly(
            lambda: self._store.pause(name, seconds, self._burst, cap, requests_limited, tokens_limited), masking=True
        )

    def __repr__(self) -> str:
        mode = f"lease={self._lease}" if self._lease is not None else "strict"
        return (
            f"SharedRateLimiter(name={self.name!r}, rpm={self.policy.rpm}, tpm={self.policy.tpm}, "
            f"burst_seconds={self.policy.burst_seconds}, {mode}, {self.on_unavailable})"
        )


if TYPE_CHECKING:  # the Redis store satisfies the protocol

    def _redis_store_is_a_bucket_store(store: Any) -> BucketStore:
        from ..backends._redis_bucket import RedisBucketStore

        checked: RedisBucketStore = store
        return checked
