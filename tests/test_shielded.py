"""``run_shielded``: bookkeeping that must finish once started (a probe's verdict, a limiter refund, a cache
invalidation after a write) survives its caller's cancellation, by anyio and by asyncio's own ``task.cancel()``."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from ragguard._shielded import _RUNNING, run_shielded

#: asyncio's own Task.cancel() has no trio counterpart
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
pytestmark = pytest.mark.anyio


class Work:
    def __init__(self, seconds: float = 0.1, error: Exception | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.finished = False

    async def __call__(self) -> None:
        await anyio.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        self.finished = True


@ASYNCIO_ONLY
async def test_asyncio_task_cancel_ends_the_wait_not_the_work() -> None:
    work = Work()
    task = asyncio.get_running_loop().create_task(run_shielded(work))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # at once: the caller stops waiting
    assert not work.finished
    await asyncio.sleep(0.2)
    assert work.finished  # the work went on in its own task
    assert not _RUNNING  # and nothing is kept once it finished


@ASYNCIO_ONLY
async def test_an_anyio_shield_alone_does_not_stop_task_cancel() -> None:
    """Why ``run_shielded`` exists: the premise, checked against the installed anyio."""
    work = Work()

    async def shielded() -> None:
        with anyio.CancelScope(shield=True):
            await work()

    task = asyncio.get_running_loop().create_task(shielded())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert not work.finished


async def test_an_anyio_cancellation_waits_for_the_work(anyio_backend: str) -> None:
    work = Work()
    with anyio.move_on_after(0.02) as scope:
        await run_shielded(work)
    assert work.finished  # waited for, then the cancellation was delivered
    assert scope.cancelled_caught


async def test_an_error_reaches_a_caller_still_waiting(anyio_backend: str) -> None:
    with pytest.raises(LookupError, match="store said no"):
        await run_shielded(Work(0.01, LookupError("store said no")))
    assert not _RUNNING


@ASYNCIO_ONLY
async def test_an_error_after_the_caller_left_is_retrieved_quietly(caplog: pytest.LogCaptureFixture) -> None:
    work = Work(0.05, LookupError("late"))
    task = asyncio.get_running_loop().create_task(run_shielded(work))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert not _RUNNING
    assert "never retrieved" not in caplog.text
