"""Time as the guards see it: an injectable clock and the process-wide testing switch.

Every guard reads time through a :class:`Clock` (``now()`` in seconds from an arbitrary origin, monotonic) and
waits through ``await clock.sleep(seconds)``. The default :data:`SYSTEM_CLOCK` uses :func:`time.monotonic` and
:func:`anyio.sleep`; :class:`ManualClock` is virtual time for tests (in the spirit of .NET's ``TimeProvider``
used by Polly v8). :func:`set_testing` (in the spirit of stamina's ``set_testing``) makes the system clock's
sleeps return at once so a test suite never waits for real backoff.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock", "is_testing", "set_testing"]


@runtime_checkable
class Clock(Protocol):
    """What a guard needs of time: a monotonic reading in seconds and a way to wait."""

    def now(self) -> float:
        """Monotonic time in seconds (arbitrary origin)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a value ``<= 0`` still yields to the scheduler once). Cancellable."""
        ...


class _TestingSwitch:
    """The one explicit, documented piece of process-wide mutable state: whether waits are skipped."""

    __slots__ = ("enabled",)

    def __init__(self) -> None:
        self.enabled = False


_TESTING = _TestingSwitch()


def set_testing(enabled: bool) -> None:
    """Turn the testing mode on or off for the whole process.

    In testing mode the system clock's :meth:`SystemClock.sleep` returns after one scheduler checkpoint instead
    of waiting, so backoff, Retry-After pauses and rate-limit waits cost no wall time. Deadlines, attempt limits
    and every decision a guard makes stay exactly as in production. Use it in your own test suite::

        @pytest.fixture(autouse=True)
        def _no_waits():
            ragguard.set_testing(True)
            yield
            ragguard.set_testing(False)
    """
    _TESTING.enabled = bool(enabled)


def is_testing() -> bool:
    """Whether :func:`set_testing` switched waits off."""
    return _TESTING.enabled


class SystemClock:
    """Real time: :func:`time.monotonic` and :func:`anyio.sleep` (skipped in testing mode)."""

    __slots__ = ()

    #: seconds on the monotonic clock (``time.monotonic`` itself: no Python frame on the hot path)
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0 or _TESTING.enabled:
            await anyio.lowlevel.checkpoint()
            return
        await anyio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """Virtual time for tests: ``now()`` only moves when a test calls :meth:`advance` or a task sleeps.

    ``await sleep(s)`` moves the clock forward by ``s`` and returns after one checkpoint, so code under test runs
    as if the wait happened, instantly. It is a sequential model of time: two tasks that sleep concurrently
    advance it one after the other, which is what single-call unit tests want.

    Args:
        start: the initial reading in seconds.
    """

    __slots__ = ("_now", "slept")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        #: every requested sleep, in seconds, in order (handy for asserting backoff schedules)
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` (must be ``>= 0``)."""
        if seconds < 0:
            raise ValueError("ManualClock cannot go backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds > 0:
            self._now += seconds
        await anyio.lowlevel.checkpoint()
