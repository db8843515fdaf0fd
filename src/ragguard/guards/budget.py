"""A retry budget: retries may add at most a fraction of recent traffic, plus a small floor, upstream.

After Finagle's ``RetryBudget`` (``com.twitter.finagle.service.RetryBudget``: ``ttl`` = 10 s,
``minRetriesPerSec`` = 10, ``percentCanRetry`` = 20 %) and Envoy's retry budgets
(``envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget``: ``budget_percent`` = 20 %, with a
``min_retry_concurrency`` floor). Per-call attempt limits do not stop a retry storm: when a provider is down,
every call retries ``attempts - 1`` times and the load sent upstream is multiplied by ``attempts``. A budget
shared by all the calls of a pipeline caps the *aggregate* retries instead: over the last ``window_s``
seconds, ::

    retries  <=  ratio × requests  +  min_retries_per_s × window_s

so upstream load stays ``<= (1 + ratio) ×`` the offered load (plus the floor), whatever the failure rate. A
retry the budget refuses fails fast (no backoff is slept) with the provider's error chained.

The window is a ring of ``buckets`` equal time buckets (``window_s / buckets`` seconds each): the current
bucket and the ``buckets - 1`` before it count, so the effective window is between ``window_s - window_s /
buckets`` and ``window_s`` long. Every operation is O(1) amortised (at most ``buckets`` slots are cleared
per call) under a :class:`threading.Lock` held only for that arithmetic, so one budget may be shared by
event loops and threads; nothing is bound to an event loop.

:class:`SharedRetryBudget` keeps the same window in a shared store (:class:`~ragguard.RedisBackend`, through
:class:`BudgetStore`), so that every process of an app spends one budget: the load an outage sends upstream is
then bounded for the app as a whole, not per process (``n`` processes with local budgets get ``n`` floors).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from .._clock import SYSTEM_CLOCK, Clock
from ..config import RetryBudgetPolicy
from ..errors import BackendUnavailable, ConfigError, RetryExhausted

__all__ = [
    "BudgetStore",
    "BudgetStoreReply",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryBudgetStats",
    "SharedRetryBudget",
]

logger = logging.getLogger("ragguard")

OnUnavailable = Literal["fail_open", "fail_closed"]

# Tolerance of the admission test, so float rounding of ``ratio × requests`` (0.1 × 30 = 3.0000000000000004,
# 0.3 × 10 = 2.9999999999999996) never refuses a retry that was earned.
_EPSILON = 1e-9


class RetryBudgetExhausted(RetryExhausted):
    """A retry was refused by a :class:`RetryBudget`: the call failed fast, without waiting for a backoff.

    A :class:`~ragguard.RetryExhausted`, so ``except RetryExhausted`` catches it; ``__cause__`` and
    :attr:`last_error` are the provider's error.

    Attributes:
        attempts: how many attempts were made.
        last_error: the last attempt's error.
        reason: always ``"retry_budget"``.
    """

    reason = "retry_budget"


class RetryBudgetStats(NamedTuple):
    """A snapshot of a :class:`RetryBudget` (for metrics and health reports).

    Attributes:
        requests: first attempts deposited since the budget was created.
        retries: retries allowed since the budget was created.
        refused: retries refused since the budget was created.
        window_requests: first attempts in the current window.
        window_retries: retries allowed in the current window.
        available: retries the budget would allow right now (``>= 0``).
    """

    requests: int
    retries: int
    refused: int
    window_requests: int
    window_retries: int
    available: int


class RetryBudget:
    """A sliding-window retry budget shared by the calls of a pipeline (Finagle ``RetryBudget``, Envoy retry budgets).

    Every logical call :meth:`deposit` s one request; every retry must first be granted by
    :meth:`try_acquire_retry`, which allows it only while, over the last ``window_s`` seconds, ::

        retries (this one included)  <=  ratio × requests  +  min_retries_per_s × window_s

    Args:
        ratio: retries allowed per request in the window (``0.2`` = retries may add 20 % to the load), 0-10.
        min_retries_per_s: the floor, in retries per second, so that a quiet pipeline can still retry
            (Finagle's ``minRetriesPerSec``); ``0`` for none.
        window_s: how far back requests and retries count, seconds (Finagle's ``ttl``).
        buckets: how many time buckets the window is cut into (its resolution), 1-1000.
        clock: where time is read (only :meth:`~ragguard.Clock.now`; the budget never waits).

    Raises:
        ConfigError: an argument is out of range.

    Example::

        budget = RetryBudget(ratio=0.2, min_retries_per_s=10.0, window_s=10.0)
        retry = Retry(attempts=4, budget=budget)
    """

    __slots__ = (
        "_floor",
        "_head",
        "_lock",
        "_ratio",
        "_refused",
        "_req",
        "_requests",
        "_ret",
        "_retries",
        "_width",
        "_win_req",
        "_win_ret",
        "buckets",
        "clock",
        "min_retries_per_s",
        "ratio",
        "window_s",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_s: float = 10.0,
        window_s: float = 10.0,
        *,
        buckets: int = 10,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 10.0):
            raise ConfigError(f"ratio: expected a number in [0, 10] (retries per request), got {ratio!r}")
        if not (isinstance(min_retries_per_s, (int, float)) and 0.0 <= min_retries_per_s < math.inf):
            raise ConfigError(f"min_retries_per_s: expected a finite number >= 0, got {min_retries_per_s!r}")
        if not (isinstance(window_s, (int, float)) and 0.0 < window_s < math.inf):
            raise ConfigError(f"window_s: expected a finite number of seconds > 0, got {window_s!r}")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= 1000:
            raise ConfigError(f"buckets: expected an integer in [1, 1000], got {buckets!r}")
        #: retries allowed per request in the window
        self.ratio = float(ratio)
        #: the floor, retries per second
        self.min_retries_per_s = float(min_retries_per_s)
        #: the window, seconds
        self.window_s = float(window_s)
        #: how many buckets the window is cut into
        self.buckets = buckets
        self.clock = clock
        self._ratio = self.ratio
        self._floor = self.min_retries_per_s * self.window_s  # retries always allowed per window
        self._width = self.window_s / buckets  # seconds per bucket
        self._req = [0] * buckets  # requests per bucket (ring)
        self._ret = [0] * buckets  # retries per bucket (ring)
        self._win_req = 0  # sum of _req
        self._win_ret = 0  # sum of _ret
        self._head = math.floor(clock.now() / self._width)  # absolute index of the newest bucket
        self._requests = 0
        self._retries = 0
        self._refused = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_retries_per_s={self.min_retries_per_s}, "
            f"window_s={self.window_s}, buckets={self.buckets})"
        )

    def _roll(self, now: float) -> int:
        """Expire the buckets older than the window; the slot of the current bucket. Hold ``_lock``."""
        n = self.buckets
        index = math.floor(now / self._width)
        head = self._head
        if index <= head:  # same bucket, or a clock read by another thread just before ours: count it as now
            return head % n
        if index - head >= n:  # the whole window expired
            for slot in range(n):
                self._req[slot] = 0
                self._ret[slot] = 0
            self._win_req = 0
            self._win_ret = 0
        else:
            req, ret = self._req, self._ret
            for absolute in range(head + 1, index + 1):
                slot = absolute % n
                self._win_req -= req[slot]
                self._win_ret -= ret[slot]
                req[slot] = 0
                ret[slot] = 0
        self._head = index
        return index % n

    def _spend(self) -> None:
        """Record one retry granted elsewhere (by a shared budget), without checking: keeps a fallback's window
        in step with what this process really sent."""
        now = self.clock.now()
        with self._lock:
            slot = self._roll(now)
            self._ret[slot] += 1
            self._win_ret += 1
            self._retries += 1

    def deposit(self, requests: int = 1) -> None:
        """Record ``requests`` first attempts (logical calls); each earns ``ratio`` retries for ``window_s`` s."""
        if requests < 0:
            raise ValueError(f"requests: expected >= 0, got {requests!r}")
        now = self.clock.now()
        with self._lock:
            slot = self._roll(now)
            self._req[slot] += requests
            self._win_req += requests
            self._requests += requests

    def try_acquire_retry(self) -> bool:
        """Whether one more retry fits in the budget now; if it does, it is recorded as spent.

        Never waits. A refusal is counted in :attr:`RetryBudgetStats.refused`.
        """
        now = self.clock.now()
        with self._lock:
            slot = self._roll(now)
            if self._win_ret + 1 <= self._ratio * self._win_req + self._floor + _EPSILON:
                self._ret[slot] += 1
                self._win_ret += 1
                self._retries += 1
                return True
            self._refused += 1
            return False

    def stats(self) -> RetryBudgetStats:
        """The counters and the current window (expiring old buckets first)."""
        now = self.clock.now()
        with self._lock:
            self._roll(now)
            allowed = math.floor(self._ratio * self._win_req + self._floor + _EPSILON)
            return RetryBudgetStats(
                requests=self._requests,
                retries=self._retries,
                refused=self._refused,
                window_requests=self._win_req,
                window_retries=self._win_ret,
                available=max(0, allowed - self._win_ret),
            )


# --- shared across processes ----------------------------------------------------------------------------------


class BudgetStoreReply(Protocol):
    """What a :class:`BudgetStore` operation answers (see :class:`ragguard.backends._redis_budget.BudgetReply`)."""

    @property
    def granted(self) -> bool:
        """For :meth:`BudgetStore.acquire`: whether the retry was granted (and recorded); else ``False``."""
        ...

    @property
    def window_requests(self) -> int:
        """Requests in the shared window after the operation."""
        ...

    @property
    def window_retries(self) -> int:
        """Retries in the shared window after the operation."""
        ...


class BudgetStore(Protocol):
    """Where a :class:`SharedRetryBudget` keeps its window (:class:`ragguard.backends._redis_budget.
    RedisBudgetStore` for Redis). Each operation is atomic, timed by the store's own clock, and raises
    :class:`~ragguard.BackendUnavailable` when the store cannot answer in time.

    Every operation names the budget and its window geometry (``window_s`` seconds in ``buckets`` buckets);
    budgets that differ in either are kept apart. ``ratio`` and ``floor`` (retries per window) are the caller's
    rule, applied to the shared counts.
    """

    @property
    def on_unavailable(self) -> OnUnavailable: ...

    @property
    def expected_instances(self) -> int: ...

    async def deposit(self, name: str, requests: int, *, window_s: float, buckets: int) -> BudgetStoreReply: ...

    async def acquire(
        self, name: str, *, deposit: int, ratio: float, floor: float, window_s: float, buckets: int
    ) -> BudgetStoreReply: ...

    async def snapshot(self, name: str, *, window_s: float, buckets: int) -> BudgetStoreReply: ...


@runtime_checkable
class _HasBudgetStore(Protocol):
    def budget_store(self) -> BudgetStore: ...


class SharedRetryBudget:
    """A :class:`RetryBudget` whose window every process of an app shares, through a :class:`BudgetStore`.

    The rule is the local one, over the requests and retries of *every* instance using the same ``store``,
    ``name`` and window: over the last ``window_s`` seconds (``buckets`` buckets, on the store's clock, e.g.
    the Redis server's ``TIME``), ::

        retries (this one included)  <=  ratio × requests  +  min_retries_per_s × window_s

    so the app as a whole sends at most ``(1 + ratio) ×`` its offered load (plus one floor) upstream, however
    many processes it runs. :meth:`deposit` and :meth:`try_acquire_retry` are coroutines.

    Round trips: a retry costs one (:meth:`try_acquire_retry`, which also carries this instance's pending
    deposits, so its own requests always count before its retry is judged). Deposits are added up locally and
    sent at most once per ``flush_interval`` seconds (the first one at once): a call that succeeds first time
    costs no round trip most of the time. Deposits not yet sent are invisible to the other instances for at
    most ``flush_interval`` seconds (they see fewer requests, so they allow fewer retries: the bound holds), and
    each sent batch counts in the bucket of its sending, up to ``flush_interval`` seconds late.

    When the store cannot answer (:class:`~ragguard.BackendUnavailable`): ``fail_open`` judges retries by a local
    :class:`RetryBudget` holding this process's share (same ``ratio``, ``min_retries_per_s /
    expected_instances``), which sees every deposit and every retry of this instance all along, so it takes over
    with a warm window; ``fail_closed`` refuses every retry. Deposits never fail and first attempts are never
    refused, in either mode. For ``reconnect_interval`` seconds after a failure the store is not asked again;
    after that, every operation tries it again, so both modes recover on their own.

    Args:
        name: the budget's name, shared by the instances (a provider's endpoint and model); hashed in Redis keys.
        store: a :class:`BudgetStore`, or an object with ``budget_store()`` such as a
            :class:`~ragguard.RedisBackend`.
        ratio, min_retries_per_s, window_s, buckets: as for :class:`RetryBudget` (retries per request, retries
            per second, seconds, buckets), checked by :class:`~ragguard.RetryBudgetPolicy`'s rules.
        clock: this instance's clock (the local fallback, ``flush_interval`` and ``reconnect_interval``).
        on_unavailable: ``fail_open`` or ``fail_closed`` (default: the store's own setting).
        expected_instances: how many processes share the budget; the ``fail_open`` fallback's floor is divided
            by it (default: the store's setting).
        flush_interval: longest time, seconds, deposits wait locally before they are sent (``0``: every deposit
            is a round trip).
        reconnect_interval: seconds during which the store is not asked again after it failed.

    Raises:
        pydantic.ValidationError: ``ratio``, ``min_retries_per_s``, ``window_s`` or ``buckets`` outside
            :class:`~ragguard.RetryBudgetPolicy`'s rules (NaN included), naming the field.
        ConfigError: a negative ``flush_interval`` or ``reconnect_interval``, an ``expected_instances`` below 1,
            or an unknown ``on_unavailable``.

    Example::

        backend = ragguard.RedisBackend("redis://redis:6379/0")
        budget = ragguard.SharedRetryBudget("openai:embeddings", store=backend)
        retry = ragguard.Retry(attempts=4, budget=budget)
    """

    __slots__ = (
        "_floor",
        "_flush_at",
        "_flush_interval",
        "_last_error",
        "_local",
        "_lock",
        "_on_unavailable",
        "_pending",
        "_reconnect_interval",
        "_retry_store_at",
        "buckets",
        "clock",
        "expected_instances",
        "fallbacks",
        "min_retries_per_s",
        "name",
        "ratio",
        "refused",
        "requests",
        "retries",
        "round_trips",
        "store",
        "unavailable",
        "window_s",
    )

    def __init__(
        self,
        name: str = "default",
        *,
        store: BudgetStore | _HasBudgetStore,
        ratio: float = 0.2,
        min_retries_per_s: float = 10.0,
        window_s: float = 10.0,
        buckets: int = 10,
        clock: Clock = SYSTEM_CLOCK,
        on_unavailable: OnUnavailable | None = None,
        expected_instances: int | None = None,
        flush_interval: float = 0.1,
        reconnect_interval: float = 1.0,
    ) -> None:
        policy = RetryBudgetPolicy(ratio=ratio, min_retries_per_s=min_retries_per_s, window_s=window_s, buckets=buckets)
        resolved = store.budget_store() if isinstance(store, _HasBudgetStore) else store
        mode = on_unavailable if on_unavailable is not None else resolved.on_unavailable
        if mode not in ("fail_open", "fail_closed"):
            raise ConfigError(f"on_unavailable: expected 'fail_open' or 'fail_closed', got {mode!r}")
        share = expected_instances if expected_instances is not None else resolved.expected_instances
        if isinstance(share, bool) or not isinstance(share, int) or share < 1:
            raise ConfigError(f"expected_instances: expected an integer >= 1, got {share!r}")
        if not (isinstance(flush_interval, (int, float)) and 0.0 <= flush_interval < math.inf):
            raise ConfigError(f"flush_interval: expected a finite number of seconds >= 0, got {flush_interval!r}")
        if not (isinstance(reconnect_interval, (int, float)) and 0.0 <= reconnect_interval < math.inf):
            raise ConfigError(
                f"reconnect_interval: expected a finite number of seconds >= 0, got {reconnect_interval!r}"
            )
        # the fallback holds this process's share
        local = RetryBudget(
            policy.ratio, policy.min_retries_per_s / share, policy.window_s, buckets=policy.buckets, clock=clock
        )
        self.name = name
        self.store: BudgetStore = resolved
        self.clock = clock
        self.ratio = local.ratio
        self.min_retries_per_s = float(policy.min_retries_per_s)
        self.window_s = local.window_s
        self.buckets = local.buckets
        self.expected_instances = share
        self._floor = self.min_retries_per_s * self.window_s
        self._local = local
        self._on_unavailable: OnUnavailable = mode
        self._flush_interval = float(flush_interval)
        self._reconnect_interval = float(reconnect_interval)
        self._lock = threading.Lock()
        self._pending = 0  # deposits not yet sent to the store
        self._flush_at = -math.inf  # when pending deposits are sent next (the first at once)
        self._retry_store_at = -math.inf
        self._last_error: BaseException | None = None
        #: first attempts deposited by this instance
        self.requests = 0
        #: retries this instance was granted (by the store, or by the fallback)
        self.retries = 0
        #: retries this instance was refused (by the store, the fallback, or ``fail_closed``)
        self.refused = 0
        #: retries judged by the local fallback while the store was unavailable (``fail_open``)
        self.fallbacks = 0
        #: store failures seen
        self.unavailable = 0
        #: operations sent to the store
        self.round_trips = 0

    @classmethod
    def from_policy(
        cls,
        policy: RetryBudgetPolicy,
        *,
        store: BudgetStore | _HasBudgetStore,
        name: str = "default",
        clock: Clock = SYSTEM_CLOCK,
        on_unavailable: OnUnavailable | None = None,
        expected_instances: int | None = None,
        flush_interval: float = 0.1,
        reconnect_interval: float = 1.0,
    ) -> SharedRetryBudget:
        """A shared budget with the settings of a :class:`~ragguard.RetryBudgetPolicy` section (``enabled`` is
        the caller's business: a disabled section should give no budget at all)."""
        return cls(
            name,
            store=store,
            ratio=policy.ratio,
            min_retries_per_s=policy.min_retries_per_s,
            window_s=policy.window_s,
            buckets=policy.buckets,
            clock=clock,
            on_unavailable=on_unavailable,
            expected_instances=expected_instances,
            flush_interval=flush_interval,
            reconnect_interval=reconnect_interval,
        )

    def __repr__(self) -> str:
        return (
            f"SharedRetryBudget({self.name!r}, {self.store!r}, ratio={self.ratio}, "
            f"min_retries_per_s={self.min_retries_per_s}, window_s={self.window_s}, buckets={self.buckets}, "
            f"{self._on_unavailable})"
        )

    @property
    def on_unavailable(self) -> OnUnavailable:
        """What happens to retries when the store cannot answer: ``fail_open`` (local fallback) or ``fail_closed``."""
        return self._on_unavailable

    @property
    def fallback(self) -> RetryBudget:
        """The local budget holding this process's share, used by ``fail_open`` while the store is unavailable."""
        return self._local

    @property
    def degraded(self) -> bool:
        """Whether the last attempt to reach the store failed (until one succeeds)."""
        return self._last_error is not None

    async def deposit(self, requests: int = 1) -> None:
        """Record ``requests`` first attempts; each earns ``ratio`` retries for ``window_s`` s, for every instance.

        Sent to the store at most once per ``flush_interval`` seconds (or with this instance's next retry).
        Never raises because of the store (a failure is logged and counted; the local fallback has the deposit).

        Raises:
            ValueError: ``requests`` is negative.
        """
        if requests < 0:
            raise ValueError(f"requests: expected >= 0, got {requests!r}")
        self._local.deposit(requests)
        now = self.clock.now()
        with self._lock:
            self.requests += requests
            self._pending += requests
            if now < self._flush_at:
                return
            pending, self._pending = self._pending, 0
            self._flush_at = now + self._flush_interval
        if pending == 0 or now < self._retry_store_at:
            return  # the store failed a moment ago: the fallback holds these deposits
        try:
            self.round_trips += 1
            await self.store.deposit(self.name, pending, window_s=self.window_s, buckets=self.buckets)
        except Exception as exc:  # a store that cannot count must never fail a first attempt
            self._store_failed(exc)
            return
        self._last_error = None

    async def try_acquire_retry(self) -> bool:
        """Whether one more retry fits in the shared budget now; if it does, it is recorded as spent, for every
        instance. One round trip (carrying this instance's pending deposits). Never waits beyond the store's
        timeout; never raises because of the store: with the store unavailable, ``fail_open`` asks the local
        fallback and ``fail_closed`` answers ``False``."""
        now = self.clock.now()
        if now < self._retry_store_at:
            return self._unavailable()
        with self._lock:
            pending, self._pending = self._pending, 0
            self._flush_at = now + self._flush_interval
        try:
            self.round_trips += 1
            reply = await self.store.acquire(
                self.name,
                deposit=pending,
                ratio=self.ratio,
                floor=self._floor,
                window_s=self.window_s,
                buckets=self.buckets,
            )
        except Exception as exc:  # judged as if the store were down (logged): never an error for the call
            self._store_failed(exc)
            return self._unavailable()
        self._last_error = None
        if reply.granted:
            self._local._spend()  # keep the fallback's window in step with what was really sent
            with self._lock:
                self.retries += 1
            return True
        with self._lock:
            self.refused += 1
        return False

    def _unavailable(self) -> bool:
        if self._on_unavailable == "fail_closed":
            with self._lock:
                self.refused += 1
            return False
        granted = self._local.try_acquire_retry()
        with self._lock:
            self.fallbacks += 1
            if granted:
                self.retries += 1
            else:
                self.refused += 1
        return granted

    def _store_failed(self, exc: BaseException) -> None:
        self._last_error = exc
        self._retry_store_at = self.clock.now() + self._reconnect_interval
        with self._lock:
            self.unavailable += 1
        if isinstance(exc, BackendUnavailable):
            logger.warning("retry budget %r: shared state unavailable (%s)", self.name, exc)
        else:
            logger.error("retry budget %r: the store failed; judging as unavailable", self.name, exc_info=exc)

    async def stats(self) -> RetryBudgetStats:
        """This instance's counters (``requests``, ``retries``, ``refused``) and the *shared* window
        (``window_requests``, ``window_retries``, ``available``), read in one store operation (which also sends
        this instance's pending deposits). With ``fail_open`` and the store unavailable, the window is the local
        fallback's.

        Raises:
            BackendUnavailable: the store cannot answer and ``on_unavailable`` is ``fail_closed``.
        """
        with self._lock:
            pending, self._pending = self._pending, 0
        try:
            self.round_trips += 1
            if pending:
                reply = await self.store.deposit(self.name, pending, window_s=self.window_s, buckets=self.buckets)
            else:
                reply = await self.store.snapshot(self.name, window_s=self.window_s, buckets=self.buckets)
        except BackendUnavailable as exc:
            self._store_failed(exc)
            if self._on_unavailable == "fail_closed":
                raise
            local = self._local.stats()
            window_requests, window_retries, available = (
                local.window_requests,
                local.window_retries,
                local.available,
            )
        else:
            self._last_error = None
            window_requests, window_retries = reply.window_requests, reply.window_retries
            allowed = math.floor(self.ratio * window_requests + self._floor + _EPSILON)
            available = max(0, allowed - window_retries)
        with self._lock:
            return RetryBudgetStats(
                requests=self.requests,
                retries=self.retries,
                refused=self.refused,
                window_requests=window_requests,
                window_retries=window_retries,
                available=available,
            )
