"""Cancelling callers at random points never leaves anything held.

Callers are cancelled by anyio cancel scopes with random short timeouts (asyncio and trio) and, on asyncio, by
``task.cancel()`` at random moments, while a slow and faulty provider keeps calls queued in the bulkhead, waiting
in the rate limiter, gathered in micro-batches and probing a half-open breaker. Once every caller is gone: the
bulkhead has nothing in flight or queued, the batcher no open batch and a free send slot, the breaker no probe lease,
the limiter no waiter, and a fresh call succeeds at once.

Three levels: the guarded openai SDK against the simulator (its async client runs on trio too, over httpx2), the
guards alone around plain async functions (hypothesis draws the cancellation points), and targeted cases for the
probe lease and the batcher's send slot.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import sniffio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ragguard
from ragguard import (
    CallContext,
    CircuitBreaker,
    ConcurrencyLimit,
    MicroBatcher,
    Pipeline,
    RateLimiter,
    Retry,
    Timeout,
)
from ragguard.testing import OpenAISimulator, Served

from ._harness import (
    CALM,
    Call,
    Ledger,
    Record,
    asim,
    batcher_problems,
    call_problems,
    core_of,
    count_tasks,
    guard_problems,
    guarded_client,
    make_call,
    plan_call,
    pool_problems,
    settle,
    sim_configure,
    sim_stats,
    state_problems,
    summarize,
    typed,
)

pytestmark = pytest.mark.chaos

# --- the guarded SDK ------------------------------------------------------------------------------------------

#: the simulator during the SDK run: slow (50 ms, a fifth 0.4 s late), a few 30 s stalls, a quarter 5xx
FAULTY = {"base_latency_s": 0.05, "slow_rate": 0.2, "slow_s": 0.4, "stall_rate": 0.05, "error_rate": 0.25}
OPEN_S = 0.3


def sdk_policy(*, batching: bool) -> ragguard.Policy:
    return ragguard.Policy(
        retry={"attempts": 3, "base": 0.02, "cap": 0.1},
        # a quick breaker whose probe lease, if leaked, would refuse every call for 60 s
        breaker={
            "failure_rate": 0.5,
            "window": 20,
            "min_calls": 10,
            "open_duration": OPEN_S,
            "half_open_probes": 1,
            "half_open_max_wait": 60.0,
        },
        # 1,200 RPM in a bucket of 5: callers wait in the limiter
        rate_limit={"rpm": 1_200, "burst_seconds": 0.25, "follow_headers": False},
        # 4 slots: callers queue in the bulkhead
        concurrency={"max_in_flight": 4, "max_queue": 10_000},
        timeout={"attempt": 0.5, "total": 3.0},
        # embeddings gathered across callers, at most 2 batches sent at once
        batching={"enabled": batching, "max_wait": 0.05, "max_in_flight": 2},
        cache={"max_entries": 32},
    )


async def _cancelled_by_scope(client: Any, call: Call, record: Record, after: float | None) -> None:
    started = time.monotonic()
    with anyio.move_on_after(math.inf if after is None else after) as scope:
        await make_call(client, call, record)
    if scope.cancelled_caught:
        record.cancelled = True
        record.seconds = time.monotonic() - started


async def _cancelled_by_task_cancel(client: Any, call: Call, record: Record, after: float) -> None:
    """asyncio only: the call in a task of its own, ``task.cancel()`` after ``after`` seconds."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    task = loop.create_task(make_call(client, call, record))
    handle = loop.call_later(after, task.cancel)
    try:
        await asyncio.wait([task])  # waits without catching the task's CancelledError
    finally:
        handle.cancel()
        if not task.done():  # this caller itself was cancelled: take the call down with it
            task.cancel()
    if task.cancelled():
        record.cancelled = True
        record.seconds = time.monotonic() - started


async def fresh_call(make: Callable[[], Awaitable[Record]], *, within: float) -> Record:
    """A fresh call made again while an open breaker refuses it (each refusal says when it will probe), until it
    ends otherwise or ``within`` seconds passed: a leaked probe lease refuses for ``half_open_max_wait`` (60 s)."""
    started = time.monotonic()
    while True:
        record = await make()
        error = record.error
        left = started + within - time.monotonic()
        if not isinstance(error, ragguard.CircuitOpenError) or error.retry_after >= left:
            record.seconds = time.monotonic() - started
            return record
        await anyio.sleep(error.retry_after)


async def _sdk_chaos(
    served: Served[OpenAISimulator], long_tier: bool, name: str, *, native: bool, batching: bool
) -> list[str]:
    """Callers of a guarded client arriving over a few seconds, most cancelled at a random point (a cancel scope's
    timeout, or with ``native`` on asyncio, ``task.cancel()``); what is left held afterwards, and whether a fresh
    call then succeeds at once."""
    await asim(sim_configure, served, **{**CALM, **FAULTY})
    await asim(served.reset)
    tasks_before = count_tasks()
    backend = ragguard.MemoryBackend()
    policy = sdk_policy(batching=batching)
    client = guarded_client(served, policy, backend)
    rng = random.Random(2024)
    callers = 3_600 if long_tier else 120
    spread = callers / 60  # seconds over which the callers arrive: 60 a second, 3 times what the limiter admits
    ledger = Ledger(issued=callers)
    started = time.monotonic()

    async def caller(index: int) -> None:
        call = plan_call(index, 11, ("embed", "embed", "chat", "stream"), 30, "cancel")
        record = Record(index, call.kind, 0.0)
        await anyio.sleep(rng.uniform(0.0, spread))
        after = None if rng.random() < 0.2 else rng.uniform(0.0, 0.8)  # a fifth never cancelled
        if native and after is not None:
            await _cancelled_by_task_cancel(client, call, record, after)
        else:
            await _cancelled_by_scope(client, call, record, after)
        ledger.add(record)

    async with anyio.create_task_group() as tg:
        for index in range(callers):
            tg.start_soon(caller, index)
    stats = await asim(sim_stats, served)
    violations = call_problems(ledger, policy.timeout.total or math.inf)
    cancelled = ledger.outcomes()["cancelled"]
    if cancelled < callers // 4:
        violations.append(f"only {cancelled} of {callers} callers were cancelled: the test cancels too late")

    # every caller is gone: nothing may be held
    core = core_of(client)

    async def held() -> list[str]:
        found = state_problems(core) + pool_problems(client)
        in_flight = (await asim(sim_stats, served)).in_flight
        if in_flight:
            found.append(f"the simulator is still answering {in_flight} requests")
        return found

    leaked = await settle(held)
    # and a fresh call succeeds at once, once the provider is healthy again (a breaker the run left open admits
    # its probe after OPEN_S; one a fresh success trips, completing its window's minimum, does so again)
    await asim(sim_configure, served, **CALM)
    fresh = Ledger(start=callers, issued=callers + 3)
    for offset, kind in enumerate(("embed", "chat", "stream")):
        call = Call(callers + offset, kind, (f"fresh {kind}",))
        record = await fresh_call(lambda call=call: make_call(client, call), within=1.0 + OPEN_S)  # type: ignore[misc]
        fresh.add(record)
        if record.outcome != "ok":
            leaked.append(f"fresh {kind} call: {record.outcome} after {record.seconds:.2f} s ({record.error!r})")
    await client.close()

    async def tasks() -> list[str]:
        after = count_tasks()
        if tasks_before is not None and after is not None and after > tasks_before:
            return [f"{after - tasks_before} tasks more than before the run"]
        return []

    leaked += await settle(tasks)
    ledger.records.update(fresh.records)
    ledger.issued = fresh.issued
    summarize(name, ledger, stats, time.monotonic() - started, len(leaked))
    return violations + leaked


@pytest.mark.anyio
@pytest.mark.openai
async def test_cancelled_sdk_callers_leave_nothing_held(
    anyio_backend: str, chaos_sim: Served[OpenAISimulator], long_tier: bool
) -> None:
    """anyio cancel scopes with random timeouts, micro-batching on; asyncio and trio."""
    violations = await _sdk_chaos(chaos_sim, long_tier, f"cancel scopes[{anyio_backend}]", native=False, batching=True)
    assert violations == []


@pytest.mark.anyio
@pytest.mark.openai
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_task_cancelled_sdk_callers_leave_nothing_held(
    anyio_backend: str, chaos_sim: Served[OpenAISimulator], long_tier: bool
) -> None:
    """``task.cancel()`` at random moments (asyncio's own cancellation, as ``asyncio.timeout`` and ``wait_for``
    deliver it). Micro-batching off here: a natively cancelled batch sender fails the batch's other callers, a bug
    pinned down by test_a_task_cancelled_batch_sender_does_not_fail_the_others below."""
    violations = await _sdk_chaos(chaos_sim, long_tier, "task.cancel()[asyncio]", native=True, batching=False)
    assert violations == []


# --- the guards alone, around plain async functions -------------------------------------------------------------


class Upstream:
    """A provider of plain async functions: each call sleeps its drawn latency, and fails when drawn to."""

    def __init__(self, latencies: list[float], failures: list[bool]) -> None:
        self.latencies = latencies
        self.failures = failures
        self.calls = 0

    async def __call__(self, index: int) -> str:
        self.calls += 1
        await anyio.sleep(self.latencies[index % len(self.latencies)])
        if self.failures[index % len(self.failures)]:
            raise ConnectionError(f"upstream failed call {index}")
        return f"answer {index}"


def guard_stack() -> tuple[Pipeline, list[Any]]:
    breaker = CircuitBreaker(
        "chaos",
        failure_rate=0.5,
        window=10,
        min_calls=4,
        failure_threshold=3,
        open_duration=0.05,
        half_open_probes=1,
        half_open_max_wait=60.0,
    )
    limiter = RateLimiter(rpm=3_000, burst_seconds=0.1, name="chaos")  # 50/s, a bucket of 5
    bulkhead = ConcurrencyLimit(max_in_flight=3, max_queue=1_000, name="chaos")
    guards = [Retry(attempts=3, base=0.005, cap=0.01), breaker, limiter, bulkhead, Timeout(0.08)]
    return Pipeline(*guards), guards


#: how long a caller that is never cancelled may take before the test calls it hung, seconds
WATCHDOG_S = 3.0

CANCEL_POINTS = st.lists(
    st.tuples(
        st.floats(0.0, 0.15),  # when the caller arrives, seconds
        st.one_of(st.none(), st.floats(0.0, 0.12)),  # when it is cancelled (None: never)
        st.booleans(),  # through the micro-batcher (True) or straight through the pipeline
        st.booleans(),  # on asyncio, the caller is cancelled with task.cancel() (True) or a cancel scope
    ),
    min_size=5,
    max_size=40,
)


async def _guard_chaos(
    points: list[tuple[float, float | None, bool, bool]], latencies: list[float], failures: list[bool]
) -> list[str]:
    tasks_before = count_tasks()
    upstream = Upstream(latencies, failures)
    pipeline, guards = guard_stack()
    guards[1].force_open(0.0)  # start half-open: the first callers are probes, and some are cancelled

    async def dispatch(key: Any, items: list[str]) -> list[str]:
        answer = await pipeline.run(lambda: upstream(len(items)))
        return [f"{answer} for {item}" for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(dispatch, max_items=4, max_wait=0.01, max_in_flight=1)
    problems: list[str] = []

    async def attempt(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except Exception as exc:
            if not typed(exc):
                problems.append(f"caller {index}: untyped {exc!r}")

    async def caller(index: int, arrive: float, cancel: float | None, batched: bool, native: bool) -> None:
        await anyio.sleep(arrive)
        call: Callable[[], Awaitable[Any]]
        if batched:
            call = lambda: batcher.submit("key", [f"item {index % 7}"])  # noqa: E731
        else:
            call = lambda: pipeline.run(lambda: upstream(index), CallContext(deadline=time.monotonic() + 1.0))  # noqa: E731
        started = time.monotonic()
        if native and cancel is not None and sniffio.current_async_library() == "asyncio":
            # asyncio's own cancellation, which anyio's shield does not stop (a batch's sender included)
            loop = asyncio.get_running_loop()
            task = loop.create_task(attempt(index, call))
            handle = loop.call_later(cancel, task.cancel)
            try:
                await asyncio.wait([task])
            finally:
                handle.cancel()
                if not task.done():
                    task.cancel()
        else:
            # a caller never cancelled still gets a watchdog: a hang is reported, not waited for
            with anyio.move_on_after(WATCHDOG_S if cancel is None else cancel) as scope:
                await attempt(index, call)
            if cancel is None and scope.cancelled_caught:
                problems.append(f"caller {index} never ended")
        if time.monotonic() - started > 2.0:
            problems.append(f"caller {index} took {time.monotonic() - started:.2f} s")

    async with anyio.create_task_group() as tg:
        for index, (arrive, cancel, batched, native) in enumerate(points):
            tg.start_soon(caller, index, arrive, cancel, batched, native)
    # every caller is gone
    problems += guard_problems(guards) + batcher_problems(batcher)
    # a fresh call succeeds at once (an open breaker admits its probe after open_duration; a success completing
    # the window's minimum may trip it again, as resilience4j's rate check does)
    upstream.failures = [False]
    upstream.latencies = [0.0]

    async def fresh(call: Callable[[], Awaitable[Any]]) -> Record:
        record = Record(-1, "fresh", 0.0)
        try:
            await call()
        except Exception as exc:
            record.error = exc
        return record

    with anyio.move_on_after(1.0) as scope:
        for call in (lambda: pipeline.run(lambda: upstream(0)), lambda: batcher.submit("key", ["fresh"])):
            record = await fresh_call(lambda call=call: fresh(call), within=0.5)  # type: ignore[misc]
            if record.error is not None:
                problems.append(f"a fresh call failed: {record.error!r}")
    if scope.cancelled_caught:
        problems.append("a fresh call did not finish within 1 s")
    after = count_tasks()
    if tasks_before is not None and after is not None and after > tasks_before:
        problems.append(f"{after - tasks_before} tasks more than before")
    return problems


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancelled_guard_callers_leave_nothing_held(backend: str, long_tier: bool) -> None:
    @settings(
        max_examples=300 if long_tier else 12,
        deadline=None,
        derandomize=not long_tier,
        # a timing-driven example does not shrink reliably: report the first failing one as drawn
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        points=CANCEL_POINTS,
        latencies=st.lists(st.floats(0.0, 0.12), min_size=1, max_size=8),
        failures=st.lists(st.booleans(), min_size=1, max_size=8),
    )
    def check(
        points: list[tuple[float, float | None, bool, bool]], latencies: list[float], failures: list[bool]
    ) -> None:
        problems = anyio.run(_guard_chaos, points, latencies, failures, backend=backend)
        assert problems == []

    check()


# --- targeted: the probe lease and the batcher's send slot -------------------------------------------------------


@pytest.mark.anyio
async def test_a_cancelled_probe_gives_its_lease_back(anyio_backend: str) -> None:
    breaker = CircuitBreaker("probe", half_open_probes=1, half_open_max_wait=60.0, open_duration=0.01)
    breaker.force_open(0.0)  # open, probing at once
    entered = anyio.Event()

    async def slow() -> str:
        entered.set()
        await anyio.sleep(30.0)
        return "late"

    async with anyio.create_task_group() as tg:

        async def probe() -> None:
            with anyio.move_on_after(5.0):
                await breaker.call(slow)

        tg.start_soon(probe)
        await entered.wait()
        assert breaker.snapshot().probes == 1
        with pytest.raises(ragguard.CircuitOpenError):  # the only probe place is taken
            await breaker.call(anyio.sleep, 0)
        tg.cancel_scope.cancel()  # the probing caller is cancelled mid-call
    assert breaker.snapshot().probes == 0
    assert not breaker._leases

    async def quick() -> str:
        return "ok"

    assert await breaker.call(quick) == "ok"  # the next caller probes, without waiting 60 s
    assert breaker.state is ragguard.BreakerState.CLOSED


@pytest.mark.anyio
async def test_cancelled_batch_callers_free_the_send_slot(anyio_backend: str) -> None:
    release = anyio.Event()
    sending = anyio.Event()

    async def dispatch(key: Any, items: list[str]) -> list[str]:
        sending.set()
        await release.wait()
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(dispatch, max_items=2, max_wait=0.001, max_in_flight=1)

    async def release_soon() -> None:
        await anyio.sleep(0.05)
        release.set()

    async with anyio.create_task_group() as outer, anyio.create_task_group() as tg:
        # the first batch takes the only send slot; the next ones wait for it (or lead, or fill)
        for index in range(7):
            tg.start_soon(batcher.submit, "k", [f"item {index}"])
        await sending.wait()
        await anyio.sleep(0.02)
        assert batcher.in_flight == 1
        assert batcher.open_batches + len(batcher._slot_waiters) > 0
        # every caller goes: the sender (a shared batch's send is shielded: it finishes first), the slot waiters,
        # the leaders
        tg.cancel_scope.cancel()
        outer.start_soon(release_soon)
    assert batcher_problems(batcher) == []
    with anyio.fail_after(1.0):
        assert await batcher.submit("k", ["fresh"]) == ["FRESH"]
    assert batcher_problems(batcher) == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_cancelled_batch_sender_does_not_fail_the_others(anyio_backend: str) -> None:
    # anyio's shield does not stop asyncio's own task.cancel(): the send it interrupts is put back, and another
    # caller of the batch sends the items still needed (once a bare KeyError for the others)
    sent: list[list[str]] = []
    sending = anyio.Event()

    async def dispatch(key: Any, items: list[str]) -> list[str]:
        sent.append(items)
        sending.set()
        await anyio.sleep(0.05)
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(dispatch, max_items=2, max_wait=10.0, max_in_flight=1)
    loop = asyncio.get_running_loop()
    first = loop.create_task(batcher.submit("k", ["x"]))
    await asyncio.sleep(0.01)
    # "y" fills the batch: its caller claims it and sends it for both callers (a shielded, shared send)
    second = loop.create_task(batcher.submit("k", ["y"]))
    await sending.wait()
    second.cancel()  # asyncio.timeout() and wait_for() cancel this way too
    await asyncio.wait([first, second])
    assert second.cancelled()
    # the interrupted call's answer is lost with it: the remaining caller sends its item again, alone
    assert sent == [["x", "y"], ["x"]]
    assert first.result() == ["X"]
    assert batcher_problems(batcher) == []
