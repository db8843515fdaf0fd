"""Adaptive concurrency limit algorithms, separate from the bulkhead that enforces them.

After Netflix's concurrency-limits (https://github.com/Netflix/concurrency-limits): the enforcer
(:class:`~ragguard.ConcurrencyLimit` with ``adaptive=...``) reports every call to a :class:`LimitAlgorithm` as

- a **sample** — the call succeeded: ``on_sample(start, rtt, in_flight, dropped=False)``, with its round-trip
  time in seconds;
- a **drop** — the provider said it is overloaded (a 429, a timeout, a 503): ``on_sample(..., dropped=True)``;
  the limit shrinks;
- **ignored** — no useful sample (a 400, a cancellation, another guard's refusal): the algorithm is not called.

and reads :attr:`LimitAlgorithm.limit` afterwards. The algorithms are plain objects with no clock, no lock and
no event loop: every time they see is passed in, so they are tested as pure functions of their inputs.

- :class:`AIMDLimit` — additive increase, multiplicative decrease (Netflix ``AIMDLimit``).
- :class:`GradientLimit` — Netflix ``Gradient2Limit``: grows while short-term latency stays near the long-term
  average, shrinks as it inflates (a queue is building up at the provider).

Both keep the limit within ``[min_limit, max_limit]``. Their settings are checked by the rules of
:class:`~ragguard.AdaptiveConcurrencyPolicy` (one source of truth): an invalid one raises
:class:`pydantic.ValidationError` naming the policy's field.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from ..config import AdaptiveConcurrencyPolicy

__all__ = ["AIMDLimit", "GradientLimit", "LimitAlgorithm", "limit_from_policy"]


def _bounds(checked: AdaptiveConcurrencyPolicy) -> tuple[int, int]:
    """``max_limit`` and ``initial_limit``, which the policy may leave to the bulkhead (``None``) but an
    algorithm needs."""
    if checked.max_limit is None or checked.initial_limit is None:
        raise TypeError("max_limit and initial_limit must be integers, not None")
    return checked.max_limit, checked.initial_limit


@runtime_checkable
class LimitAlgorithm(Protocol):
    """What the bulkhead needs of an adaptive limit: the current limit and a way to report a call.

    Implementations need no thread-safety: the bulkhead calls them from one event loop, between awaits.
    """

    @property
    def limit(self) -> int:
        """Calls allowed in flight now (``>= 1``)."""
        ...

    def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
        """Report one finished call.

        Args:
            start: when the call was admitted, seconds on the enforcer's clock.
            rtt: how long it ran, seconds (``>= 0``).
            in_flight: calls in flight when it was admitted, itself included.
            dropped: the provider shed it (429, timeout, overload): shrink.
        """
        ...


class AIMDLimit:
    """Additive increase, multiplicative decrease, as Netflix's ``AIMDLimit``.

    - a drop: ``limit = max(min_limit, ⌊limit · backoff_ratio⌋)`` — but only once per *round*: a drop of a call
      admitted before the last decrease does not decrease again (TCP cuts its window once per round trip, not
      once per lost packet), so a burst of 429s answering one over-full window shrinks the limit once;
    - a sample slower than ``timeout`` (when set) counts as a drop (Netflix's ``timeout``);
    - a success while the limit is being used (``in_flight · 2 >= limit``): ``limit = min(max_limit, limit + 1)``;
      an idle limit does not grow, so it never drifts far above what was ever tried.

    Args:
        min_limit: the floor (``>= 1``).
        max_limit: the ceiling (``>= min_limit``).
        initial_limit: the limit before any sample (within the bounds).
        backoff_ratio: the decrease factor, in ``[0.5, 1)`` (Netflix's default 0.9).
        timeout: a sample longer than this many seconds counts as a drop (finite, ``> 0``; ``None``: never).

    Raises:
        pydantic.ValidationError: a setting outside :class:`~ragguard.AdaptiveConcurrencyPolicy`'s rules (bounds
            out of order, a ratio outside ``[0.5, 1)``, NaN…), naming the policy's field (``timeout`` is its
            ``timeout_s``).
    """

    __slots__ = ("_backoff_ratio", "_decreased_at", "_limit", "_timeout", "max_limit", "min_limit")

    def __init__(
        self,
        *,
        min_limit: int = 1,
        max_limit: int = 200,
        initial_limit: int = 20,
        backoff_ratio: float = 0.9,
        timeout: float | None = None,
    ) -> None:
        checked = AdaptiveConcurrencyPolicy(
            algorithm="aimd",
            min_limit=min_limit,
            max_limit=max_limit,
            initial_limit=initial_limit,
            backoff_ratio=backoff_ratio,
            timeout_s=timeout,
        )
        self.min_limit = checked.min_limit
        self.max_limit, self._limit = _bounds(checked)
        self._backoff_ratio = checked.backoff_ratio
        self._timeout = math.inf if checked.timeout_s is None else checked.timeout_s
        # admission time after which a drop may decrease again (one decrease per round)
        self._decreased_at = -math.inf

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return self._limit

    def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
        """See :meth:`LimitAlgorithm.on_sample`."""
        if dropped or rtt > self._timeout:
            if start >= self._decreased_at:
                self._limit = max(self.min_limit, math.floor(self._limit * self._backoff_ratio))
                # calls admitted until now saw the old limit: their drops belong to this round
                self._decreased_at = start + rtt
        elif in_flight * 2 >= self._limit and self._limit < self.max_limit:
            self._limit += 1

    def __repr__(self) -> str:
        return f"AIMDLimit(limit={self._limit}, min_limit={self.min_limit}, max_limit={self.max_limit})"


class _ExpAverage:
    """Netflix's ``ExpAvgMeasurement``: a plain mean over the first ``warmup`` samples, then an exponential
    moving average with factor ``2 / (window + 1)``."""

    __slots__ = ("_count", "_factor", "_warmup", "value")

    def __init__(self, window: int, warmup: int = 10) -> None:
        self._factor = 2.0 / (window + 1)
        self._warmup = warmup
        self._count = 0
        self.value = 0.0

    def add(self, sample: float) -> float:
        if self._count < self._warmup:
            self._count += 1
            self.value += (sample - self.value) / self._count
        else:
            self.value += (sample - self.value) * self._factor
        return self.value


class GradientLimit:
    """Gradient2, as Netflix's ``Gradient2Limit``: compare a long-term average RTT with the latest RTT.

    Per sample (``short`` = its RTT, ``long`` = the exponential average of RTTs over ``long_window`` samples)::

        gradient = max(0.5, min(1.0, rtt_tolerance · long / short))
        target   = limit · gradient + queue_size
        limit    = limit · (1 - smoothing) + target · smoothing        # then clamped to [min_limit, max_limit]

    So while latency stays within ``rtt_tolerance`` × its long-term average the limit grows by about
    ``smoothing · queue_size`` per sample (``queue_size`` is the allowance of calls that may queue at the
    provider); when latency inflates it shrinks toward ``limit · gradient`` (at most halving per step, so one
    outlier cannot collapse it). As in Gradient2: the limit does not change while less than half of it is in
    use (app-limited: latency then says nothing about capacity); and when ``long > 2 · short`` the long average
    is decayed by 5 % so it follows latency back down after a long overload.

    Unlike Gradient2, which reads only latency, a **drop** multiplies the limit by ``backoff_ratio`` (once per
    round, as :class:`AIMDLimit`): a 429 or a timeout says the provider is saturated whatever the RTTs say.

    Args:
        min_limit: the floor (``>= 1``).
        max_limit: the ceiling (``>= min_limit``).
        initial_limit: the limit before any sample (within the bounds).
        smoothing: weight of each new estimate, in ``(0, 1]`` (Netflix's default 0.2).
        rtt_tolerance: how much latency may exceed its long-term average before the limit shrinks, ``>= 1``
            (Netflix's default 1.5).
        queue_size: calls allowed to queue at the provider, the growth allowance (``>= 0``; Netflix's default 4).
        long_window: samples the long-term average spans (``>= 1``; Netflix's default 600).
        backoff_ratio: the decrease on a drop, in ``[0.5, 1)``.

    Raises:
        pydantic.ValidationError: a setting outside :class:`~ragguard.AdaptiveConcurrencyPolicy`'s rules, naming
            it.
    """

    __slots__ = (
        "_backoff_ratio",
        "_decreased_at",
        "_estimate",
        "_long",
        "_queue_size",
        "_smoothing",
        "_tolerance",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        min_limit: int = 1,
        max_limit: int = 200,
        initial_limit: int = 20,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        queue_size: int = 4,
        long_window: int = 600,
        backoff_ratio: float = 0.9,
    ) -> None:
        checked = AdaptiveConcurrencyPolicy(
            algorithm="gradient",
            min_limit=min_limit,
            max_limit=max_limit,
            initial_limit=initial_limit,
            smoothing=smoothing,
            rtt_tolerance=rtt_tolerance,
            queue_size=queue_size,
            long_window=long_window,
            backoff_ratio=backoff_ratio,
        )
        self.min_limit = checked.min_limit
        self.max_limit, initial = _bounds(checked)
        self._estimate = float(initial)
        self._smoothing = checked.smoothing
        self._tolerance = checked.rtt_tolerance
        self._queue_size = checked.queue_size
        self._long = _ExpAverage(checked.long_window)
        self._backoff_ratio = checked.backoff_ratio
        self._decreased_at = -math.inf

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return int(self._estimate)

    @property
    def long_rtt(self) -> float:
        """The long-term average RTT, seconds (``0.0`` before any sample)."""
        return self._long.value

    def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
        """See :meth:`LimitAlgorithm.on_sample`."""
        if dropped:
            if start >= self._decreased_at:
                self._estimate = max(float(self.min_limit), math.floor(self._estimate * self._backoff_ratio))
                self._decreased_at = start + rtt
            return
        if not rtt > 0.0:
            return  # a zero (or NaN) RTT has no ratio to offer
        long = self._long.add(rtt)
        if long > 2.0 * rtt:
            long = self._long.value = long * 0.95
        estimate = self._estimate
        if in_flight < estimate / 2.0:
            return  # app-limited
        gradient = max(0.5, min(1.0, self._tolerance * long / rtt))
        target = estimate * gradient + self._queue_size
        estimate = estimate * (1.0 - self._smoothing) + target * self._smoothing
        self._estimate = max(float(self.min_limit), min(float(self.max_limit), estimate))

    def __repr__(self) -> str:
        return (
            f"GradientLimit(limit={self.limit}, long_rtt={self._long.value:.4f}, min_limit={self.min_limit}, "
            f"max_limit={self.max_limit})"
        )


def limit_from_policy(policy: AdaptiveConcurrencyPolicy, max_in_flight: int) -> AIMDLimit | GradientLimit:
    """The algorithm a :class:`~ragguard.AdaptiveConcurrencyPolicy` describes; ``max_in_flight`` is the ceiling
    when the policy sets no ``max_limit``, and the start when it sets no ``initial_limit``."""
    max_limit = policy.max_limit if policy.max_limit is not None else max_in_flight
    initial = policy.initial_limit if policy.initial_limit is not None else max_limit
    if policy.algorithm == "gradient":
        return GradientLimit(
            min_limit=policy.min_limit,
            max_limit=max_limit,
            initial_limit=initial,
            smoothing=policy.smoothing,
            rtt_tolerance=policy.rtt_tolerance,
            queue_size=policy.queue_size,
            long_window=policy.long_window,
            backoff_ratio=policy.backoff_ratio,
        )
    return AIMDLimit(
        min_limit=policy.min_limit,
        max_limit=max_limit,
        initial_limit=initial,
        backoff_ratio=policy.backoff_ratio,
        timeout=policy.timeout_s,
    )
