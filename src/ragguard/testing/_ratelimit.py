"""Server-side rate limiting for the simulators: token buckets, 60-second windows, OpenAI-style durations.

Nothing here locks: the simulator calls it under its own lock. Times are seconds on the simulator's clock.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Account", "Rejection", "TokenBucket", "WindowCounter", "format_go_duration"]

#: one minute, the period OpenAI publishes its limits over, seconds
MINUTE = 60.0
#: arrivals closer together than this are merged in a window counter (bounds its memory), seconds
WINDOW_RESOLUTION = 0.001
#: float slack when comparing a bucket's level with a cost
_EPSILON = 1e-9


def format_go_duration(seconds: float) -> str:
    """Format seconds the way Go's ``time.Duration.String`` does, as OpenAI's ``x-ratelimit-reset-*`` headers
    show them: ``0s``, ``250ms``, ``1s``, ``1m30.5s``, ``6m0s``, ``1h0m0s``.

    Rounded *up* to the millisecond, so a client that waits the printed time is never early.
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000.0 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


class TokenBucket:
    """A token bucket refilled continuously at ``per_minute / 60`` per second, holding at most
    ``per_minute / 60 · burst_seconds`` (OpenAI enforces per-minute limits over shorter periods).

    The level may go negative: a request larger than the whole capacity is admitted when the bucket is full
    (otherwise it could never pass) and leaves a debt that later requests wait out, so the long-run rate still
    matches ``per_minute``. Completion tokens debited after the fact can also push it below zero.
    """

    __slots__ = ("capacity", "level", "per_minute", "per_second", "updated")

    def __init__(self, per_minute: float, burst_seconds: float, now: float) -> None:
        self.per_minute = per_minute
        self.per_second = per_minute / MINUTE
        self.capacity = self.per_second * burst_seconds
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (``0.0`` when it fits now). Call :meth:`refill` first."""
        need = min(amount, self.capacity)
        if self.level + _EPSILON >= need:
            return 0.0
        return (need - self.level) / self.per_second

    def take(self, amount: float) -> None:
        self.level -= amount

    @property
    def remaining(self) -> int:
        """Whole units available now (never negative)."""
        return max(0, math.floor(self.level + _EPSILON))

    @property
    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.per_second)


class WindowCounter:
    """Sum of amounts admitted in the last 60 seconds and the largest such sum ever seen.

    A deque of ``(time, amount)`` pruned as time moves; arrivals within :data:`WINDOW_RESOLUTION` of the
    previous one are merged, so memory stays bounded by the window length over the resolution whatever the
    rate (and, behind a bucket, by the admitted rate). The peak is checked on every arrival, which is where a
    sliding window's sum can grow, so it is the maximum over all 60-second windows (within the resolution).
    """

    __slots__ = ("_events", "peak", "total", "window")

    def __init__(self, window: float = MINUTE) -> None:
        self.window = window
        self._events: deque[list[float]] = deque()
        self.total = 0.0
        self.peak = 0.0

    def _prune(self, now: float) -> None:
        events = self._events
        horizon = now - self.window
        while events and events[0][0] <= horizon:
            self.total -= events.popleft()[1]
        if not events:
            self.total = 0.0  # no float drift left behind

    def add(self, now: float, amount: float) -> None:
        self._prune(now)
        events = self._events
        if events and abs(now - events[-1][0]) < WINDOW_RESOLUTION:
            events[-1][1] += amount
        else:
            events.append([now, amount])
        self.total += amount
        if self.total > self.peak:
            self.peak = self.total

    def current(self, now: float) -> float:
        self._prune(now)
        return self.total


class Rejection:
    """Why a request was refused: which bucket, how long to wait, and the numbers OpenAI's message shows.

    Attributes:
        kind: ``"requests"`` or ``"tokens"``.
        wait: seconds until the request would fit (``math.inf`` when it never can: larger than the limit).
        limit: the bucket's per-minute limit.
        used: amount admitted in the last 60 seconds.
        requested: what this request asked for.
    """

    __slots__ = ("kind", "limit", "requested", "used", "wait")

    def __init__(self, kind: str, wait: float, limit: float, used: float, requested: float) -> None:
        self.kind = kind
        self.wait = wait
        self.limit = limit
        self.used = used
        self.requested = requested

    @property
    def too_large(self) -> bool:
        return math.isinf(self.wait)


class Account:
    """The request and token buckets of one key (a model, or the pooled key), with their 60-second windows.

    ``None`` for a rate means no limit of that kind (headers for it are then left out).
    """

    __slots__ = (
        "requests",
        "requests_admitted",
        "requests_window",
        "tokens",
        "tokens_admitted",
        "tokens_window",
    )

    def __init__(self, rpm: float | None, tpm: float | None, burst_seconds: float, now: float) -> None:
        self.requests = TokenBucket(rpm, burst_seconds, now) if rpm is not None else None
        self.tokens = TokenBucket(tpm, burst_seconds, now) if tpm is not None else None
        self.requests_window = WindowCounter()
        self.tokens_window = WindowCounter()
        self.requests_admitted = 0
        self.tokens_admitted = 0

    def refill(self, now: float) -> None:
        if self.requests is not None:
            self.requests.refill(now)
        if self.tokens is not None:
            self.tokens.refill(now)

    def admit(self, tokens: int, now: float) -> Rejection | None:
        """Charge one request and ``tokens`` if both fit; otherwise charge nothing and say why.

        When both buckets are short, the one with the longer wait is reported (it is the one that binds).
        """
        self.refill(now)
        rejection: Rejection | None = None
        if self.tokens is not None and tokens > self.tokens.per_minute:
            rejection = Rejection("tokens", math.inf, self.tokens.per_minute, self.tokens_window.current(now), tokens)
            return rejection
        if self.requests is not None:
            wait = self.requests.wait_for(1)
            if wait > 0:
                rejection = Rejection("requests", wait, self.requests.per_minute, self.requests_window.current(now), 1)
        if self.tokens is not None and tokens > 0:
            wait = self.tokens.wait_for(tokens)
            if wait > 0 and (rejection is None or wait > rejection.wait):
                rejection = Rejection("tokens", wait, self.tokens.per_minute, self.tokens_window.current(now), tokens)
        if rejection is not None:
            return rejection
        if self.requests is not None:
            self.requests.take(1)
        self.requests_window.add(now, 1)
        self.requests_admitted += 1
        self.debit(tokens, now)
        return None

    def debit(self, tokens: int, now: float) -> None:
        """Charge ``tokens`` unconditionally (completion tokens counted after the fact)."""
        if tokens <= 0:
            return
        if self.tokens is not None:
            self.tokens.refill(now)
            self.tokens.take(tokens)
        self.tokens_window.add(now, tokens)
        self.tokens_admitted += tokens
