"""``@ragguard.batched``: a list-in, list-out function micro-batched across concurrent callers."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

import ragguard


@pytest.mark.anyio
async def test_concurrent_callers_share_calls_and_get_their_own_results() -> None:
    calls: list[tuple[list[str], str]] = []

    @ragguard.batched(max_items=8, max_wait=0.01)
    async def shout(items: list[str], *, suffix: str = "!") -> list[str]:
        calls.append((list(items), suffix))
        return [item.upper() + suffix for item in items]

    results: dict[int, list[str]] = {}

    async def caller(i: int) -> None:
        results[i] = await shout([f"a{i}", f"b{i}"])

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(caller, i)
    assert results == {i: [f"A{i}!", f"B{i}!"] for i in range(12)}
    assert len(calls) == 3  # 24 items, 8 per call
    assert all(len(items) <= 8 for items, _ in calls)
    assert shout.batcher.items_sent == 24  # type: ignore[attr-defined]
    # different keyword arguments never share a call
    calls.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: shout(["x"], suffix="?"))
        tg.start_soon(lambda: shout(["y"], suffix="."))
    assert sorted(suffix for _, suffix in calls) == [".", "?"]


@pytest.mark.anyio
async def test_a_function_returning_the_wrong_number_of_results_is_an_error() -> None:
    @ragguard.batched(max_wait=0)
    async def broken(items: list[int]) -> list[int]:
        return items[:-1]

    with pytest.raises(ragguard.RagGuardError, match="one result per item"):
        await broken([1, 2])


def test_sync_functions_batch_across_threads() -> None:
    seen: list[int] = []

    @ragguard.batched(max_items=100, max_wait=0.05)
    def double(items: list[int]) -> list[int]:
        seen.append(len(items))
        return [2 * item for item in items]

    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        results[i] = double([i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [2 * i] for i in range(20)}
    assert sum(seen) == 20
    assert len(seen) < 20  # the threads' items met in shared calls


def test_bad_settings_fail_when_decorating() -> None:
    with pytest.raises(ValidationError, match="max_items"):
        ragguard.batched(max_items=0)
