from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import given, settings
from hypothesis import strategies as st

from ragguard._context import CallContext
from ragguard.guards.coalesce import CoalescePolicy, Coalescer, coalesce
from ragguard.guards.pipeline import STAGES, Pipeline


class Upstream:
    """An upstream call that blocks on a gate and records how often it ran and was cancelled."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.cancelled = 0
        self.error = error
        self.gate = anyio.Event()

    async def __call__(self, value: Any) -> Any:
        self.calls += 1
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return value


def context(key: Hashable | None) -> CallContext:
    ctx = CallContext()
    ctx.extras = {"coalesce_key": key}
    return ctx


class Caller:
    """One caller in its own cancel scope; records what it got."""

    def __init__(self, coalescer: Coalescer, upstream: Upstream, key: Hashable | None, value: Any) -> None:
        self.coalescer, self.upstream, self.key, self.value = coalescer, upstream, key, value
        self.scope = anyio.CancelScope()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.left = False

    async def __call__(self) -> None:
        with self.scope:
            try:
                self.result = await self.coalescer.run(lambda: self.upstream(self.value), context(self.key))
            except anyio.get_cancelled_exc_class():
                self.cancelled = True  # the cancellation reached the caller
                raise
            except Exception as exc:
                self.error = exc
            finally:
                self.left = True


@pytest.mark.anyio
async def test_a_thousand_identical_calls_make_one_upstream_call() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    value = object()
    callers = [Caller(coalescer, upstream, "k", value) for _ in range(1_000)]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        assert coalescer.in_flight == 1
        upstream.gate.set()
    assert upstream.calls == 1
    assert all(caller.result is value for caller in callers)
    assert (coalescer.leaders, coalescer.followers, coalescer.in_flight) == (1, 999, 0)


@pytest.mark.anyio
async def test_the_error_is_shared_by_every_waiter() -> None:
    coalescer = Coalescer()
    error = ValueError("boom")
    upstream = Upstream(error)
    callers = [Caller(coalescer, upstream, "k", None) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        upstream.gate.set()
    assert upstream.calls == 1
    assert all(caller.error is error for caller in callers)
    assert coalescer.in_flight == 0


@pytest.mark.anyio
async def test_different_keys_do_not_share() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    callers = [Caller(coalescer, upstream, key, key) for key in ("a", "b", "a", "b", ("c", 1))]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        assert coalescer.in_flight == 3
        upstream.gate.set()
    assert upstream.calls == 3
    assert [caller.result for caller in callers] == ["a", "b", "a", "b", ("c", 1)]
    assert (coalescer.leaders, coalescer.followers) == (3, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("extras", [None, {}, {"coalesce_key": None}])
async def test_no_key_means_no_coalescing(extras: dict[str, Any] | None) -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    results: list[int] = []

    async def one(i: int) -> None:
        ctx = CallContext()
        ctx.extras = extras
        results.append(await coalescer.run(lambda: upstream(i), ctx))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
        await wait_all_tasks_blocked()
        assert coalescer.in_flight == 0
        upstream.gate.set()
    assert upstream.calls == 3
    assert sorted(results) == [0, 1, 2]
    assert (coalescer.leaders, coalescer.followers) == (0, 0)


@pytest.mark.anyio
async def test_a_custom_key_function() -> None:
    coalescer = Coalescer(key=lambda ctx: ctx.operation)
    upstream = Upstream()
    results: list[str] = []

    async def one(operation: str) -> None:
        results.append(await coalescer.run(lambda: upstream(operation), CallContext(operation=operation)))

    async with anyio.create_task_group() as tg:
        for operation in ("x", "x", "y"):
            tg.start_soon(one, operation)
        await wait_all_tasks_blocked()
        upstream.gate.set()
    assert upstream.calls == 2
    assert sorted(results) == ["x", "x", "y"]


@pytest.mark.anyio
async def test_cancelling_a_follower_does_not_affect_the_others() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    leader, follower, other = (Caller(coalescer, upstream, "k", "v") for _ in range(3))
    async with anyio.create_task_group() as tg:
        for caller in (leader, follower, other):
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        follower.scope.cancel()
        await wait_all_tasks_blocked()
        assert follower.left
        assert follower.cancelled
        assert upstream.cancelled == 0
        upstream.gate.set()
    assert (leader.result, other.result, follower.result) == ("v", "v", None)
    assert upstream.calls == 1


@pytest.mark.anyio
async def test_cancelling_the_leader_leaves_at_once_and_the_followers_still_get_the_result() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    leader = Caller(coalescer, upstream, "k", "v")
    followers = [Caller(coalescer, upstream, "k", "ignored") for _ in range(3)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await wait_all_tasks_blocked()
        for follower in followers:
            tg.start_soon(follower)
        await wait_all_tasks_blocked()
        assert coalescer.leaders == 1
        leader.scope.cancel()
        await wait_all_tasks_blocked()
        # the leader left before the shared call finished, and its cancellation propagated
        assert leader.left
        assert leader.cancelled
        assert leader.scope.cancelled_caught
        assert upstream.cancelled == 0
        assert not any(follower.left for follower in followers)
        upstream.gate.set()
    assert [follower.result for follower in followers] == ["v", "v", "v"]
    assert upstream.calls == 1


@pytest.mark.anyio
async def test_when_every_waiter_is_cancelled_the_upstream_call_is_cancelled() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    callers = [Caller(coalescer, upstream, "k", "v") for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        for caller in callers[:-1]:
            caller.scope.cancel()
        await wait_all_tasks_blocked()
        assert upstream.cancelled == 0  # one waiter remains
        callers[-1].scope.cancel()
        await wait_all_tasks_blocked()
        assert upstream.cancelled == 1
        assert coalescer.in_flight == 0
    assert all(caller.cancelled for caller in callers)


@pytest.mark.anyio
async def test_a_leader_cancelled_before_the_flight_starts_grounds_it_and_the_key_is_free_again() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await coalescer.run(lambda: upstream("v"), context("k"))
    assert scope.cancelled_caught
    await wait_all_tasks_blocked()
    assert coalescer.in_flight == 0
    assert upstream.calls == upstream.cancelled  # never ran, or ran and was cancelled
    upstream.gate.set()
    assert await coalescer.run(lambda: upstream("w"), context("k")) == "w"


@pytest.mark.anyio
async def test_after_completion_a_new_call_starts_a_new_flight() -> None:
    coalescer = Coalescer()
    upstream = Upstream()
    upstream.gate.set()
    assert await coalescer.run(lambda: upstream(1), context("k")) == 1
    assert coalescer.in_flight == 0
    assert await coalescer.run(lambda: upstream(2), context("k")) == 2
    assert upstream.calls == 2
    assert coalescer.leaders == 2


@pytest.mark.anyio
async def test_an_error_is_not_remembered() -> None:
    coalescer = Coalescer()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first")
        return "ok"

    with pytest.raises(ValueError, match="first"):
        await coalescer.run(flaky, context("k"))
    assert await coalescer.run(flaky, context("k")) == "ok"


@pytest.mark.anyio
async def test_beyond_max_keys_calls_run_uncoalesced() -> None:
    coalescer = Coalescer(max_keys=1)
    upstream = Upstream()
    callers = [Caller(coalescer, upstream, key, key) for key in ("a", "a", "b", "b")]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        assert coalescer.in_flight == 1
        upstream.gate.set()
    assert upstream.calls == 3  # one for "a", one per "b" caller
    assert [caller.result for caller in callers] == ["a", "a", "b", "b"]


@pytest.mark.anyio
async def test_disabled_is_a_pass_through() -> None:
    coalescer = Coalescer(enabled=False)
    upstream = Upstream()
    callers = [Caller(coalescer, upstream, "k", i) for i in range(3)]
    async with anyio.create_task_group() as tg:
        for caller in callers:
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        upstream.gate.set()
    assert upstream.calls == 3
    assert [caller.result for caller in callers] == [0, 1, 2]


@pytest.mark.anyio
async def test_the_shared_call_runs_in_the_leaders_context_variables() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    coalescer = Coalescer()

    async def read() -> str:
        return var.get()

    var.set("leader")
    assert await coalescer.run(read, context("k")) == "leader"


@pytest.mark.anyio
async def test_in_a_pipeline() -> None:
    coalescer = Coalescer()
    pipeline = Pipeline(coalescer)
    upstream = Upstream()
    upstream.gate.set()
    ctx = pipeline.context()
    ctx.extras = {"coalesce_key": "k"}
    assert await pipeline.run(lambda: upstream("v"), ctx) == "v"
    assert coalescer.leaders == 1


def test_policy_validation_and_from_policy() -> None:
    assert Coalescer.stage == "coalesce"
    assert "coalesce" in STAGES
    with pytest.raises(pydantic.ValidationError, match="max_keys"):
        Coalescer(max_keys=0)
    with pytest.raises(pydantic.ValidationError):
        CoalescePolicy(unknown=1)  # type: ignore[call-arg]
    policy = CoalescePolicy(max_keys=7)
    with pytest.raises(pydantic.ValidationError):
        policy.max_keys = 8  # type: ignore[misc]
    coalescer = Coalescer.from_policy(policy)
    assert coalescer.policy == policy
    assert "in_flight=0/7" in repr(coalescer)
    with pytest.raises(pydantic.ValidationError, match="max_keys"):
        coalesce(max_keys=-1)


@pytest.mark.anyio
async def test_decorator_coalesces_identical_calls() -> None:
    runs: list[tuple[Any, ...]] = []
    gate = anyio.Event()

    @coalesce()
    async def search(query: str, *, top_k: int = 3, filters: Any = None) -> str:
        runs.append((query, top_k))
        await gate.wait()
        return f"{query}:{top_k}"

    results: list[str] = []

    async def one(*args: Any, **kwargs: Any) -> None:
        results.append(await search(*args, **kwargs))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(lambda: one("q", top_k=3))
        tg.start_soon(lambda: one("q", top_k=4))
        tg.start_soon(lambda: one("q", top_k=3, filters=["unhashable"]))
        await wait_all_tasks_blocked()
        gate.set()
    assert sorted(runs) == [("q", 3), ("q", 3), ("q", 4)]
    assert sorted(results) == ["q:3"] * 6 + ["q:4"]
    assert search.__name__ == "search"


@pytest.mark.anyio
async def test_decorator_with_a_key_function() -> None:
    runs = 0
    gate = anyio.Event()

    @coalesce(lambda query: query.lower())
    async def search(query: str) -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return query

    results: list[str] = []

    async def one(query: str) -> None:
        results.append(await search(query))

    async with anyio.create_task_group() as tg:
        for query in ("Q", "q"):
            tg.start_soon(one, query)
        await wait_all_tasks_blocked()
        gate.set()
    assert runs == 1
    assert results[0] == results[1]


def test_decorator_on_a_sync_function() -> None:
    release = threading.Event()
    runs = 0
    coalescer = Coalescer()

    @coalesce(coalescer=coalescer)
    def lookup(x: int) -> int:
        nonlocal runs
        runs += 1
        release.wait(5)
        return x * 2

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(lookup(21))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(5_000):  # wait until every caller has joined the one flight
        if coalescer.leaders + coalescer.followers == 4:
            break
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == [42] * 4
    assert runs == 1
    assert (coalescer.leaders, coalescer.followers) == (1, 3)


# ---- property: random callers, keys and cancellations ----------------------------------------------------------

CallerSpec = tuple[int, bool, bool]  # (key, cancelled, late)


async def settle(condition: Callable[[], bool]) -> None:
    """Yield to the scheduler until ``condition()`` holds (a bounded number of times): no real sleeping."""
    for _ in range(2_000):
        if condition():
            return
        await anyio.lowlevel.checkpoint()


class Wave:
    """One wave of callers: early ones start, some are cancelled, late ones start, then every flight lands."""

    def __init__(self, coalescer: Coalescer, calls: dict[int, int], cancelled: dict[int, int]) -> None:
        self.coalescer = coalescer
        self.calls = calls  # upstream calls started per key, over all waves
        self.cancelled = cancelled  # upstream calls cancelled per key, over all waves
        self.gate = anyio.Event()
        self.outcomes: dict[int, Any] = {}
        self.scopes: dict[int, anyio.CancelScope] = {}

    async def upstream(self, key: int) -> tuple[int, int]:
        self.calls[key] = index = self.calls.get(key, 0) + 1
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled[key] = self.cancelled.get(key, 0) + 1
            raise
        return (key, index)

    async def one(self, i: int, key: int) -> None:
        with self.scopes.setdefault(i, anyio.CancelScope()):
            try:
                self.outcomes[i] = await self.coalescer.run(lambda: self.upstream(key), context(key))
            except anyio.get_cancelled_exc_class():
                self.outcomes[i] = "cancelled"
                raise

    def joined(self) -> int:
        return self.coalescer.leaders + self.coalescer.followers

    async def run(self, wave: list[CallerSpec]) -> None:
        coalescer, calls = self.coalescer, self.calls
        before = dict(calls)
        joined = self.joined()
        early = [(i, key) for i, (key, _, late) in enumerate(wave) if not late]
        late = [(i, key) for i, (key, _, is_late) in enumerate(wave) if is_late]
        to_cancel = [i for i, (_, cancel, is_late) in enumerate(wave) if cancel and not is_late]

        def started(keys: list[tuple[int, int]]) -> bool:
            return all(calls.get(key, 0) > before.get(key, 0) for _, key in keys)

        async with anyio.create_task_group() as tg:
            for i, key in early:
                tg.start_soon(self.one, i, key)
            # every early caller has joined and every flight's upstream call is running
            await settle(lambda: self.joined() - joined == len(early) and started(early))
            for i in to_cancel:
                self.scopes[i].cancel()
            await settle(lambda: all(i in self.outcomes for i in to_cancel))
            for i, key in late:
                tg.start_soon(self.one, i, key)
            await settle(lambda: self.joined() - joined == len(wave) and started(late))
            self.gate.set()

        # what each key's flights should have been
        for key in {spec[0] for spec in wave}:
            early_ones = [i for i, k in early if k == key]
            late_ones = [i for i, k in late if k == key]
            survivors = [i for i in early_ones if i not in to_cancel]
            first = before.get(key, 0) + 1
            if early_ones and not survivors and late_ones:
                flights = 2  # the first flight was grounded; the late ones started another
                expected = {i: (key, first + 1) for i in late_ones}
            else:
                flights = 1
                expected = {i: (key, first) for i in survivors + late_ones}
            expected.update((i, "cancelled") for i in early_ones if i in to_cancel)
            assert {i: self.outcomes[i] for i in expected} == expected
            assert calls[key] - before.get(key, 0) == flights
        assert coalescer.in_flight == 0


def _run_waves(backend: str, waves: list[list[CallerSpec]]) -> None:
    async def main() -> None:
        coalescer = Coalescer()
        calls: dict[int, int] = {}
        cancelled: dict[int, int] = {}
        for wave in waves:
            await Wave(coalescer, calls, cancelled).run(wave)
        # a flight is cancelled exactly when every early caller of its key was cancelled
        grounded: dict[int, int] = {}
        for wave in waves:
            for key in {spec[0] for spec in wave}:
                early = [spec for spec in wave if spec[0] == key and not spec[2]]
                if early and all(spec[1] for spec in early):
                    grounded[key] = grounded.get(key, 0) + 1
        await settle(lambda: cancelled == grounded)
        assert cancelled == grounded

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(
    waves=st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=10),
        min_size=1,
        max_size=3,
    )
)
def test_random_callers_get_their_keys_result_with_one_upstream_call_per_flight(
    backend: str, waves: list[list[CallerSpec]]
) -> None:
    _run_waves(backend, waves)
