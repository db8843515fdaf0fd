"""Finish a piece of bookkeeping even if its caller is cancelled, by anyio *or* by asyncio's own ``task.cancel()``.

``anyio.CancelScope(shield=True)`` protects against anyio (and trio) cancellation only: asyncio's native
``Task.cancel()`` — which ``asyncio.timeout()``, ``asyncio.wait_for`` and plain asyncio code use — is delivered
through a shield all the same. For the few awaits that must complete once started (a half-open probe giving its
lease back, a limiter refund, a cache invalidation after a write), :func:`run_shielded` runs the work in a task of
its own on asyncio and waits for it under a shield: a native cancellation of the caller then ends only the
*waiting*, while the work finishes in its task. On trio a shielded scope is enough (trio has no cancellation
outside its cancel scopes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ["run_shielded"]

#: Tasks started by :func:`run_shielded` that have not finished yet. An explicit registry, as the asyncio
#: documentation asks for: the event loop keeps only weak references to tasks, and a caller cancelled natively
#: stops holding its own reference, so without this one the work could be garbage-collected mid-way.
_RUNNING: set[asyncio.Task[Any]] = set()


async def run_shielded(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``fn()`` to completion whatever cancels the caller meanwhile; the caller's cancellation is re-raised
    once it stops waiting (at once for asyncio's ``task.cancel()``, when ``fn`` returns for anyio's).

    ``fn`` must bound its own duration (e.g. by a store timeout) and should handle its own errors: an exception
    it raises reaches the caller only if the caller is still waiting.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): a shield is all it takes
        with anyio.CancelScope(shield=True):
            await fn()
    else:
        task = loop.create_task(fn())
        _RUNNING.add(task)
        task.add_done_callback(_finished)
        with anyio.CancelScope(shield=True):
            await asyncio.shield(task)
    # deliver a cancellation that arrived meanwhile now, not at the caller's next checkpoint
    await anyio.lowlevel.checkpoint_if_cancelled()


def _finished(task: asyncio.Task[Any]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved here: its caller may have stopped waiting (no "never retrieved" warning)
