"""The bridge that lets sync callers use the async core (one implementation, not two).

Sync calls are run on one process-wide event loop in a daemon thread, reached through an anyio
:class:`~anyio.from_thread.BlockingPortal`; the blocking function itself runs in a worker thread of that loop,
so the loop stays free to pace, time out and schedule other sync callers. Because every sync caller goes
through the same loop, guards shared by sync callers (limiters, bulkheads, breakers) see one consistent state.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["run_in_worker", "run_sync"]

T = TypeVar("T")

#: most sync callers that may run their blocking call at once (each caller thread already waits on one)
_MAX_WORKER_THREADS = 1_000


class _PortalRegistry:
    """The process's one blocking portal, started on first use and restarted after ``fork``.

    This is an explicit, documented registry: it holds a running event loop thread, nothing else.
    """

    __slots__ = ("_cm", "_limiter", "_lock", "_pid", "_portal")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._pid = 0
        self._limiter: anyio.CapacityLimiter | None = None

    def portal(self) -> BlockingPortal:
        portal = self._portal
        if portal is not None and self._pid == os.getpid():
            return portal
        with self._lock:
            if self._portal is None or self._pid != os.getpid():
                cm = start_blocking_portal(backend="asyncio", name="ragguard-sync")
                self._portal = cm.__enter__()
                self._cm = cm
                self._pid = os.getpid()
                self._limiter = None
            return self._portal

    def limiter(self) -> anyio.CapacityLimiter:
        # Created inside the portal's loop on first use: anyio limiters belong to the loop that made them.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(_MAX_WORKER_THREADS)
        return self._limiter

    def close(self) -> None:
        with self._lock:
            cm, self._cm, self._portal = self._cm, None, None
            if cm is not None and self._pid == os.getpid():
                cm.__exit__(None, None, None)


_REGISTRY = _PortalRegistry()
atexit.register(_REGISTRY.close)


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run the async ``fn`` to completion on the sync bridge's loop and return its result (blocks)."""
    return _REGISTRY.portal().call(fn)


async def run_in_worker(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run the blocking ``fn(*args, **kwargs)`` in a worker thread of the current loop.

    If the awaiting task is cancelled (e.g. an attempt timeout), the thread is abandoned: it finishes on its
    own, its result is dropped, and the caller gets the timeout at once instead of waiting for the blocking call.
    """
    call = functools.partial(fn, *args, **kwargs) if (args or kwargs) else fn
    return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=_REGISTRY.limiter())
