""":class:`MicroBatcher` when the caller sending a shared batch goes: asyncio's own ``task.cancel()`` (which anyio's
shield does not stop) puts the interrupted batch back for another caller, and the sender's deadline bounds the
shared call. tests/guards/test_batch.py covers cancellation by cancel scopes."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from ragguard import DeadlineExceeded
from ragguard.guards.batch import MicroBatcher


def f(item: int) -> int:
    return item * 10 + 1


class Bad(Exception):
    """A provider 400 caused by one bad item."""


def assert_clean(batcher: MicroBatcher[int, int]) -> None:
    assert (batcher.open_batches, batcher.in_flight, len(batcher._slot_waiters)) == (0, 0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_cancelled_sender_puts_back_only_the_unsettled_items_still_needed(anyio_backend: str) -> None:
    sent: list[list[int]] = []
    held = anyio.Event()

    async def dispatch(key: Hashable, items: list[int]) -> list[int]:
        sent.append(items)
        await anyio.lowlevel.checkpoint()
        if items == [4, 3] and not held.is_set():
            held.set()
            await anyio.sleep(30)  # the sender is cancelled here, half of the batch settled
        if 3 in items:
            raise Bad(items)
        return [f(i) for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        dispatch, max_items=4, max_wait=60, is_item_error=lambda exc: isinstance(exc, Bad)
    )
    loop = asyncio.get_running_loop()
    a = loop.create_task(batcher.submit("k", [1]))
    b = loop.create_task(batcher.submit("k", [2, 4]))
    await wait_all_tasks_blocked()
    sender = loop.create_task(batcher.submit("k", [3]))  # fills the batch: its caller sends it for all three
    with anyio.fail_after(5):
        await held.wait()
        sender.cancel()
        await asyncio.wait([a, b, sender])
    assert sender.cancelled()  # the sender's own cancellation propagates
    assert a.result() == [f(1)]
    assert b.result() == [f(2), f(4)]
    # the whole batch (in arrival order), its first half (settled), its bad half (interrupted); then only item 4
    # again: 1 and 2 are settled, and 3 was only the cancelled caller's
    assert sent == [[1, 2, 4, 3], [1, 2], [4, 3], [4]]
    assert_clean(batcher)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_cancelled_sender_left_alone_drops_the_batch(anyio_backend: str) -> None:
    sent: list[list[int]] = []
    sending = anyio.Event()

    async def dispatch(key: Hashable, items: list[int]) -> list[int]:
        sent.append(items)
        sending.set()
        await anyio.sleep(30)
        return [f(i) for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(dispatch, max_items=2, max_wait=60)
    loop = asyncio.get_running_loop()
    other = loop.create_task(batcher.submit("k", [1]))
    await wait_all_tasks_blocked()
    sender = loop.create_task(batcher.submit("k", [2]))
    with anyio.fail_after(5):
        await sending.wait()
        other.cancel()  # a waiter leaves: the sender keeps sending for nobody else
        await asyncio.wait([other])
        sender.cancel()
        await asyncio.wait([sender])
    assert other.cancelled()
    assert sender.cancelled()
    assert sent == [[1, 2]]  # nobody needs the batch any more: never sent again
    assert_clean(batcher)


@pytest.mark.anyio
async def test_a_shared_call_ends_at_its_senders_deadline(anyio_backend: str) -> None:
    cancelled: list[list[int]] = []

    async def dispatch(key: Hashable, items: list[int]) -> list[int]:
        try:
            await anyio.sleep(3)  # far beyond the sender's deadline
        except anyio.get_cancelled_exc_class():
            cancelled.append(items)
            raise
        return [f(i) for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(dispatch, max_items=2, max_wait=60)
    outcomes: dict[str, object] = {}

    async def caller(name: str, item: int, seconds: float | None) -> None:
        deadline = float("inf") if seconds is None else batcher.clock.now() + seconds
        try:
            outcomes[name] = await batcher.submit("k", [item], deadline=deadline)
        except DeadlineExceeded as exc:
            outcomes[name] = exc

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, "waiter", 1, None)
            await wait_all_tasks_blocked()
            tg.start_soon(caller, "sender", 2, 0.05)  # fills the batch and sends it for both
    # the sender's call was cut at its deadline (shielded from its cancellation, not from its deadline); the
    # items it did not settle fail with a typed error for every caller, rather than start another call as late
    assert cancelled == [[1, 2]]
    assert isinstance(outcomes["sender"], DeadlineExceeded)
    assert isinstance(outcomes["waiter"], DeadlineExceeded)
    assert_clean(batcher)
