from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragguard import DeadlineExceeded, ManualClock
from ragguard.guards.batch import BatchingPolicy, BatchItemTooLarge, MicroBatcher


def f(item: int) -> int:
    return item * 10 + 1


class Bad(Exception):
    """A provider 400 caused by one bad item."""


class Down(Exception):
    """The whole upstream call failed."""


class Upstream:
    """A fake provider: records each call, fails on bad items, can be held at a gate."""

    def __init__(self, bad: frozenset[int] = frozenset(), steps: int = 0) -> None:
        self.calls: list[tuple[Hashable, list[int]]] = []
        self.bad = bad
        self.steps = steps
        self.running = 0
        self.peak = 0
        self.fail_with: Exception | None = None
        self.gate: anyio.Event | None = None

    async def __call__(self, key: Hashable, items: list[int]) -> list[int]:
        self.calls.append((key, list(items)))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(self.steps):
                await anyio.lowlevel.checkpoint()
            if self.fail_with is not None:
                raise self.fail_with
            if self.bad.intersection(items):
                raise Bad(f"bad item in {items}")
            return [f(i) for i in items]
        finally:
            self.running -= 1


def is_bad(exc: Exception) -> bool:
    return isinstance(exc, Bad)


def assert_clean(batcher: MicroBatcher[Any, Any]) -> None:
    assert batcher.open_batches == 0
    assert batcher.in_flight == 0
    assert not batcher._slot_waiters


def test_policy_validates() -> None:
    assert BatchingPolicy().max_items == 2048
    invalid: list[dict[str, Any]] = [{"max_items": 0}, {"max_cost": 0}, {"max_wait": -1}, {"max_in_flight": 0}]
    for bad in [*invalid, {"nope": 1}]:
        with pytest.raises(pydantic.ValidationError):
            BatchingPolicy(**bad)
    with pytest.raises(pydantic.ValidationError, match="max_items"):
        MicroBatcher(Upstream(), max_items=0)
    b = MicroBatcher.from_policy(BatchingPolicy(max_items=3, max_cost=None), Upstream())
    assert b.policy.max_items == 3
    assert b.policy.max_cost is None


@pytest.mark.anyio
async def test_thousand_concurrent_callers_few_dispatches() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_items=128, clock=ManualClock())
    results: dict[int, list[int]] = {}

    async def caller(i: int) -> None:
        results[i] = await batcher.submit("m", [i])

    async with anyio.create_task_group() as tg:
        for i in range(1000):
            tg.start_soon(caller, i)
    assert results == {i: [f(i)] for i in range(1000)}
    assert len(up.calls) <= math.ceil(1000 / 128) + 1
    assert all(len(items) <= 128 for _, items in up.calls)
    assert sorted(i for _, items in up.calls for i in items) == list(range(1000))
    assert (batcher.batches_sent, batcher.items_sent, batcher.items_submitted) == (len(up.calls), 1000, 1000)
    assert_clean(batcher)


@pytest.mark.anyio
async def test_system_clock_max_wait_gathers_callers() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_wait=0.002)
    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(batcher.submit, "m", [i])
    assert len(up.calls) == 1
    assert sorted(up.calls[0][1]) == list(range(50))
    assert_clean(batcher)


@pytest.mark.anyio
async def test_items_and_cost_caps_never_exceeded_and_caller_order_kept() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        up, max_items=5, max_cost=20, cost=lambda i: i % 7, clock=ManualClock()
    )
    results: dict[int, list[int]] = {}
    lists = {c: [c * 100 + j for j in range(c % 9 + 1)] for c in range(30)}

    async def caller(c: int) -> None:
        results[c] = await batcher.submit("m", lists[c])

    async with anyio.create_task_group() as tg:
        for c in lists:
            tg.start_soon(caller, c)
    assert results == {c: [f(i) for i in items] for c, items in lists.items()}
    for _, items in up.calls:
        assert len(items) <= 5
        assert sum(i % 7 for i in items) <= 20
    assert_clean(batcher)


@pytest.mark.anyio
async def test_keys_never_share_a_batch() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, clock=ManualClock())
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(batcher.submit, f"k{i % 2}", [i])
    assert sorted((k, sorted(items)) for k, items in up.calls) == [("k0", [0, 2, 4, 6, 8]), ("k1", [1, 3, 5, 7, 9])]


@pytest.mark.anyio
async def test_duplicates_sent_once_and_fanned_out() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, clock=ManualClock())
    results: list[list[int]] = []

    async def caller(items: list[int]) -> None:
        results.append(await batcher.submit("m", items))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller, [1, 2, 1])
    assert up.calls == [("m", [1, 2])]
    assert results == [[f(1), f(2), f(1)]] * 5
    assert batcher.duplicates_merged == 13
    assert_clean(batcher)


@pytest.mark.anyio
async def test_unhashable_items_are_not_merged() -> None:
    calls: list[list[list[int]]] = []

    async def dispatch(key: Hashable, items: list[list[int]]) -> list[int]:
        calls.append(items)
        return [sum(i) for i in items]

    batcher: MicroBatcher[list[int], int] = MicroBatcher(dispatch, clock=ManualClock())
    assert await batcher.submit("m", [[1, 2], [1, 2]]) == [3, 3]
    assert calls == [[[1, 2], [1, 2]]]


@pytest.mark.anyio
async def test_whole_batch_error_reaches_its_callers_only() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_items=4, clock=ManualClock())
    outcomes: dict[int, object] = {}

    async def caller(i: int) -> None:
        try:
            outcomes[i] = await batcher.submit("m", [i])
        except Down as exc:
            outcomes[i] = exc

    real = up.__call__
    failed_batch: list[int] = []

    async def flaky(key: Hashable, items: list[int]) -> list[int]:
        if 0 in items:
            failed_batch.extend(items)
            raise Down("503")
        return await real(key, items)

    batcher._dispatch = flaky
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(caller, i)
    failed = {i for i, o in outcomes.items() if isinstance(o, Down)}
    assert failed == set(failed_batch)
    assert len(failed) == 4
    assert all(outcomes[i] == [f(i)] for i in range(8) if i not in failed)
    assert len({id(outcomes[i]) for i in failed}) == 1
    assert_clean(batcher)


@pytest.mark.anyio
async def test_item_isolation_by_halving() -> None:
    up = Upstream(bad=frozenset({37}))
    batcher: MicroBatcher[int, int] = MicroBatcher(up, is_item_error=is_bad, clock=ManualClock())
    outcomes: dict[int, object] = {}

    async def caller(i: int) -> None:
        try:
            outcomes[i] = await batcher.submit("m", [i])
        except Bad as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(caller, i)
    assert isinstance(outcomes.pop(37), Bad)
    assert outcomes == {i: [f(i)] for i in range(64) if i != 37}
    assert len(up.calls) == 1 + 2 * 6  # one full batch, then two halves per level down to the single item
    assert_clean(batcher)


@pytest.mark.anyio
async def test_without_is_item_error_the_batch_fails_as_a_whole() -> None:
    up = Upstream(bad=frozenset({3}))
    batcher: MicroBatcher[int, int] = MicroBatcher(up, clock=ManualClock())
    with pytest.raises(Bad):
        await batcher.submit("m", [1, 2, 3])
    assert len(up.calls) == 1


@pytest.mark.anyio
async def test_too_large_item_fails_only_its_caller() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_cost=100, cost=float, clock=ManualClock())
    outcomes: dict[int, object] = {}

    async def caller(c: int, items: list[int]) -> None:
        try:
            outcomes[c] = await batcher.submit("m", items)
        except BatchItemTooLarge as exc:
            outcomes[c] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, 0, [1, 2])
        tg.start_soon(caller, 1, [3, 500, 4])
        tg.start_soon(caller, 2, [5])
    err = outcomes[1]
    assert isinstance(err, BatchItemTooLarge)
    assert isinstance(err, ValueError)
    assert (err.index, err.cost, err.max_cost) == (1, 500, 100)
    assert outcomes[0] == [f(1), f(2)]
    assert outcomes[2] == [f(5)]
    assert [sorted(items) for _, items in up.calls] == [[1, 2, 5]]  # nothing of the failed caller was sent


@pytest.mark.anyio
async def test_cancelled_waiter_leaves_others_fine_and_leaks_nothing() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_wait=60, clock=ManualClock())
    results: dict[int, list[int]] = {}
    scopes: dict[int, anyio.CancelScope] = {}

    async def caller(i: int, items: list[int]) -> None:
        with anyio.CancelScope() as scope:
            scopes[i] = scope
            results[i] = await batcher.submit("m", items)

    async with anyio.create_task_group() as tg:
        # ManualClock: the leader's 60 s sleep passes after one checkpoint; hold it with a slow first caller
        up.gate = anyio.Event()
        for i in range(4):
            tg.start_soon(caller, i, [i, 99] if i == 1 else [i])
        await wait_all_tasks_blocked()
        assert len(up.calls) == 1  # the first batch went as soon as the leader's timer ran
        sent = up.calls[0][1]
        scopes[0].cancel()  # leaves a sent batch
        await wait_all_tasks_blocked()
        up.gate.set()
    assert 0 not in results
    assert all(results[i] == ([f(i), f(99)] if i == 1 else [f(i)]) for i in range(1, 4))
    assert set(sent) == {0, 1, 2, 3, 99}
    assert_clean(batcher)


@pytest.mark.anyio
async def test_cancelled_callers_items_are_withdrawn_from_an_unsent_batch() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_in_flight=1, clock=ManualClock())
    results: dict[int, list[int]] = {}
    scopes: dict[int, anyio.CancelScope] = {}

    async def caller(i: int, items: list[int]) -> None:
        with anyio.CancelScope() as scope:
            scopes[i] = scope
            results[i] = await batcher.submit("m", items)

    up.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, 0, [0])  # takes the only slot and holds it
        await wait_all_tasks_blocked()
        tg.start_soon(caller, 1, [1, 5])
        tg.start_soon(caller, 2, [2, 5])
        tg.start_soon(caller, 3, [3])
        await wait_all_tasks_blocked()
        assert batcher.open_batches == 0
        assert len(batcher._slot_waiters) == 1
        scopes[1].cancel()  # item 1 goes, item 5 stays (caller 2 needs it)
        scopes[3].cancel()
        await wait_all_tasks_blocked()
        up.gate.set()
    assert [sorted(items) for _, items in up.calls] == [[0], [2, 5]]
    assert results == {0: [f(0)], 2: [f(2), f(5)]}
    assert_clean(batcher)


@pytest.mark.anyio
async def test_batch_nobody_needs_is_dropped_unsent() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_wait=0.5)
    with anyio.move_on_after(0.001):
        await batcher.submit("m", [1])
    assert up.calls == []
    assert_clean(batcher)


@pytest.mark.anyio
async def test_deadline_raises_for_that_caller_only() -> None:
    clock = ManualClock()
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_in_flight=1, clock=clock)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit("m", [1], deadline=clock.now())
    up.gate = anyio.Event()
    outcomes: dict[int, object] = {}

    async def caller(i: int, deadline: float) -> None:
        try:
            outcomes[i] = await batcher.submit("m", [i], deadline=deadline)
        except DeadlineExceeded as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, 0, math.inf)  # holds the slot
        await wait_all_tasks_blocked()
        tg.start_soon(caller, 1, clock.now() + 0.002)  # waits for the slot, 2 ms real time
        tg.start_soon(caller, 2, math.inf)
        await anyio.sleep(0.01)
        up.gate.set()
    assert isinstance(outcomes[1], DeadlineExceeded)
    assert outcomes[0] == [f(0)]
    assert outcomes[2] == [f(2)]
    assert_clean(batcher)


@pytest.mark.anyio
async def test_leader_cancelled_during_timer_hands_the_timer_on() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_wait=0.003)
    results: dict[int, list[int]] = {}
    leader = anyio.CancelScope()

    async def first() -> None:
        with leader:
            results[0] = await batcher.submit("m", [0])

    async def second() -> None:
        results[1] = await batcher.submit("m", [1])

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_all_tasks_blocked()  # caller 0 sleeps the batch's timer
            tg.start_soon(second)
            await wait_all_tasks_blocked()
            leader.cancel()
    assert results == {1: [f(1)]}
    assert up.calls == [("m", [1])]
    assert_clean(batcher)


@pytest.mark.anyio
async def test_max_in_flight_respected() -> None:
    up = Upstream(steps=5)
    batcher: MicroBatcher[int, int] = MicroBatcher(up, max_items=2, max_in_flight=3, clock=ManualClock())
    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(batcher.submit, "m", [i])
    assert up.peak == 3
    assert sorted(i for _, items in up.calls for i in items) == list(range(40))
    assert_clean(batcher)


@pytest.mark.anyio
async def test_disabled_is_a_pass_through() -> None:
    up = Upstream()
    batcher: MicroBatcher[int, int] = MicroBatcher(up, enabled=False)
    assert await batcher.submit("m", [1, 1]) == [f(1), f(1)]
    assert await batcher.submit("m", []) == []
    assert up.calls == [("m", [1, 1])]


@pytest.mark.anyio
async def test_wrong_result_count_is_an_error() -> None:
    async def short(key: Hashable, items: list[int]) -> Sequence[int]:
        return items[:-1]

    batcher: MicroBatcher[int, int] = MicroBatcher(short, clock=ManualClock())
    with pytest.raises(Exception, match="2 results for 3 items"):
        await batcher.submit("m", [1, 2, 3])
    assert_clean(batcher)


callers_st = st.lists(
    st.tuples(
        st.lists(st.integers(0, 30), min_size=1, max_size=6),  # items
        st.integers(0, 4),  # checkpoints before arriving
        st.one_of(st.none(), st.integers(0, 6)),  # cancel after this many checkpoints
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.anyio
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    callers=callers_st,
    bad=st.frozensets(st.integers(0, 30), max_size=3),
    max_items=st.integers(1, 6),
    max_in_flight=st.integers(1, 3),
    steps=st.integers(0, 3),
)
async def test_property_each_caller_gets_its_results_or_its_error(
    callers: list[tuple[list[int], int, int | None]],
    bad: frozenset[int],
    max_items: int,
    max_in_flight: int,
    steps: int,
) -> None:
    up = Upstream(bad=bad, steps=steps)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        up,
        max_items=max_items,
        max_cost=12,
        cost=lambda i: i % 5,
        max_in_flight=max_in_flight,
        is_item_error=is_bad,
        clock=ManualClock(),
    )
    outcomes: dict[int, object] = {}

    async def caller(c: int, items: list[int], delay: int) -> None:
        for _ in range(delay):
            await anyio.lowlevel.checkpoint()
        try:
            outcomes[c] = await batcher.submit("m", items)
        except Bad as exc:
            outcomes[c] = exc

    async def canceller(scope: anyio.CancelScope, after: int) -> None:
        for _ in range(after):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    with anyio.fail_after(5):  # a lost wake-up would hang: make it a failure
        await _run_property(callers, outcomes, caller, canceller)

    for c, (items, _, _) in enumerate(callers):
        if c not in outcomes:
            assert callers[c][2] is not None  # only a cancelled caller may have no outcome
            continue
        if bad.intersection(items):
            assert isinstance(outcomes[c], Bad)
        else:
            assert outcomes[c] == [f(i) for i in items]
    for _, items in up.calls:
        assert len(items) <= max_items
        assert sum(i % 5 for i in items) <= 12
        assert len(set(items)) == len(items)
    assert up.peak <= max_in_flight
    assert_clean(batcher)


async def _run_property(
    callers: list[tuple[list[int], int, int | None]], outcomes: dict[int, object], caller: Any, canceller: Any
) -> None:
    async with anyio.create_task_group() as tg:
        scopes = []
        for c, (items, delay, cancel_after) in enumerate(callers):
            scope = anyio.CancelScope()
            scopes.append(scope)

            async def run(
                scope: anyio.CancelScope = scope, c: int = c, items: list[int] = items, d: int = delay
            ) -> None:
                with scope:
                    await caller(c, items, d)

            tg.start_soon(run)
            if cancel_after is not None:
                tg.start_soon(canceller, scope, cancel_after)
