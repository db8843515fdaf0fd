from __future__ import annotations

import anyio
import pydantic
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import given, settings
from hypothesis import strategies as st

from ragguard import BulkheadFull, CallContext, ConcurrencyLimit, ConcurrencyPolicy, ManualClock


async def ok() -> str:
    return "ok"


class Holder:
    """Occupies bulkhead slots until released."""

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self.limit = limit
        self.gate = anyio.Event()

    async def _hold(self) -> None:
        await self.gate.wait()

    async def hold(self) -> None:
        await self.limit.call(self._hold)


@pytest.mark.anyio
async def test_uncontended_path_never_checkpoints() -> None:
    limit = ConcurrencyLimit(max_in_flight=2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        # a checkpoint anywhere in the guard would raise the pending cancellation here
        assert await limit.call(ok) == "ok"
    assert (limit.in_flight, limit.queued) == (0, 0)


@pytest.mark.anyio
async def test_max_in_flight_is_never_exceeded() -> None:
    limit = ConcurrencyLimit(max_in_flight=3)
    running = peak = done = 0

    async def work(steps: int) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        running -= 1
        done += 1

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(limit.call, work, i % 5)
    assert peak == 3
    assert done == 40
    assert (limit.in_flight, limit.queued) == (0, 0)


def _run_random_load(backend: str, max_in_flight: int, steps: list[int], cancel_at: set[int]) -> None:
    async def main() -> None:
        limit = ConcurrencyLimit(max_in_flight=max_in_flight)
        running = peak = 0

        async def work(n: int) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                for _ in range(n):
                    await anyio.lowlevel.checkpoint()
            finally:
                running -= 1

        async def caller(i: int, n: int) -> None:
            with anyio.CancelScope() as scope:
                if i in cancel_at:
                    # cancelled after a few scheduler rounds: sometimes while queued, sometimes while running
                    async def cancel_later() -> None:
                        for _ in range(i % 4):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()

                    tg.start_soon(cancel_later)
                await limit.call(work, n)

        async with anyio.create_task_group() as tg:
            for i, n in enumerate(steps):
                tg.start_soon(caller, i, n)
        assert peak <= max_in_flight
        assert (limit.in_flight, limit.queued) == (0, 0)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(
    max_in_flight=st.integers(1, 4),
    steps=st.lists(st.integers(0, 4), min_size=1, max_size=25),
    cancel_at=st.sets(st.integers(0, 24), max_size=10),
)
def test_random_load_respects_the_limit_and_leaks_nothing(
    backend: str, max_in_flight: int, steps: list[int], cancel_at: set[int]
) -> None:
    _run_random_load(backend, max_in_flight, steps, cancel_at)


@pytest.mark.anyio
async def test_waiters_are_served_first_in_first_out() -> None:
    limit = ConcurrencyLimit(max_in_flight=1)
    holder = Holder(limit)
    order: list[int] = []

    async def record(i: int) -> None:
        order.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        for i in range(6):
            tg.start_soon(limit.call, record, i)
            await wait_all_tasks_blocked()  # queued in this order
        assert limit.queued == 6
        holder.gate.set()
    assert order == list(range(6))
    assert (limit.in_flight, limit.queued) == (0, 0)


@pytest.mark.anyio
async def test_newcomers_do_not_overtake_the_queue() -> None:
    limit = ConcurrencyLimit(max_in_flight=1)
    order: list[str] = []
    gate = anyio.Event()

    async def record(name: str) -> None:
        order.append(name)

    async def first() -> None:
        await gate.wait()
        order.append("first")

    async def first_then_newcomer() -> None:
        await limit.call(first)
        # no checkpoint since the release: the slot went to the waiter, which has not resumed yet
        await limit.call(record, "newcomer")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_then_newcomer)
        await wait_all_tasks_blocked()
        tg.start_soon(limit.call, record, "waiter")
        await wait_all_tasks_blocked()
        gate.set()
    assert order == ["first", "waiter", "newcomer"]


@pytest.mark.anyio
async def test_full_queue_is_refused_at_once() -> None:
    limit = ConcurrencyLimit(max_in_flight=1, max_queue=2, name="vec")
    holder = Holder(limit)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        tg.start_soon(limit.call, ok)
        tg.start_soon(limit.call, ok)
        await wait_all_tasks_blocked()
        assert limit.queued == 2
        with pytest.raises(BulkheadFull, match="vec"):
            await limit.call(ok)
        holder.gate.set()
    assert (limit.in_flight, limit.queued) == (0, 0)


@pytest.mark.anyio
async def test_zero_queue_refuses_when_all_slots_are_taken() -> None:
    limit = ConcurrencyLimit(max_in_flight=1, max_queue=0)
    holder = Holder(limit)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        with pytest.raises(BulkheadFull):
            await limit.call(ok)
        holder.gate.set()


@pytest.mark.anyio
async def test_max_wait_runs_out() -> None:
    limit = ConcurrencyLimit(max_in_flight=1, max_wait=0.02)
    holder = Holder(limit)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        with pytest.raises(BulkheadFull, match="no slot freed"):
            await limit.call(ok)
        assert (limit.in_flight, limit.queued) == (1, 0)
        holder.gate.set()
    assert limit.in_flight == 0


@pytest.mark.anyio
async def test_call_deadline_bounds_the_wait() -> None:
    limit = ConcurrencyLimit(max_in_flight=1)
    holder = Holder(limit)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        clock = ManualClock(50.0)
        passed = CallContext(clock=clock, deadline=50.0)
        with pytest.raises(BulkheadFull, match="no time"):
            await limit.run(ok, passed)
        soon = CallContext()
        soon.deadline = soon.clock.now() + 0.02
        with pytest.raises(BulkheadFull, match="no slot freed"):
            await limit.run(ok, soon)
        assert limit.queued == 0
        holder.gate.set()


@pytest.mark.anyio
async def test_cancelled_waiters_leak_nothing() -> None:
    limit = ConcurrencyLimit(max_in_flight=2)
    holder = Holder(limit)
    async with anyio.create_task_group() as outer:
        outer.start_soon(holder.hold)
        outer.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        async with anyio.create_task_group() as waiters:
            for _ in range(10):
                waiters.start_soon(limit.call, ok)
            await wait_all_tasks_blocked()
            assert (limit.in_flight, limit.queued) == (2, 10)
            waiters.cancel_scope.cancel()
        assert (limit.in_flight, limit.queued) == (2, 0)
        holder.gate.set()
    assert (limit.in_flight, limit.queued) == (0, 0)


@pytest.mark.anyio
async def test_slot_handed_to_a_waiter_as_it_is_cancelled_is_passed_on() -> None:
    limit = ConcurrencyLimit(max_in_flight=1)
    gate = anyio.Event()
    served: list[str] = []
    first_scope = anyio.CancelScope()

    async def hold_then_cancel_first_waiter() -> None:
        await gate.wait()
        # cancel the head waiter and, with no checkpoint in between, release the slot (handing it over)
        first_scope.cancel()

    async def record(name: str) -> None:
        served.append(name)

    async def first_waiter() -> None:
        with first_scope:
            await limit.call(record, "first")

    async with anyio.create_task_group() as tg:
        tg.start_soon(limit.call, hold_then_cancel_first_waiter)
        await wait_all_tasks_blocked()
        tg.start_soon(first_waiter)
        await wait_all_tasks_blocked()
        tg.start_soon(limit.call, record, "second")
        await wait_all_tasks_blocked()
        assert limit.queued == 2
        gate.set()
    assert first_scope.cancelled_caught
    assert served == ["second"]
    assert (limit.in_flight, limit.queued) == (0, 0)


@pytest.mark.anyio
async def test_errors_release_the_slot() -> None:
    limit = ConcurrencyLimit(max_in_flight=1)

    async def boom() -> None:
        raise ValueError("boom")

    for _ in range(3):
        with pytest.raises(ValueError, match="boom"):
            await limit.call(boom)
    assert limit.in_flight == 0


@pytest.mark.anyio
async def test_disabled_is_a_pass_through() -> None:
    limit = ConcurrencyLimit(max_in_flight=1, max_queue=0, enabled=False)
    holder = Holder(limit)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.hold)
        await wait_all_tasks_blocked()
        assert await limit.call(ok) == "ok"
        assert limit.in_flight == 0
        holder.gate.set()


def test_settings_are_validated_and_from_policy() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_in_flight"):
        ConcurrencyLimit(max_in_flight=0)
    with pytest.raises(pydantic.ValidationError, match="max_queue"):
        ConcurrencyLimit(max_queue=-1)
    policy = ConcurrencyPolicy(max_in_flight=8, max_queue=3, max_wait=1.5)
    limit = ConcurrencyLimit.from_policy(policy, name="emb")
    assert limit.policy == policy
    assert limit.stage == "concurrency"
    assert "emb" in repr(limit)
