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
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

from .._clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError, RetryExhausted

__all__ = ["RetryBudget", "RetryBudgetExhausted", "RetryBudgetStats"]

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
