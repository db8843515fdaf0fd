"""The hot-path shortcuts keep behaviour: a delegated Deadline folded into ``Pipeline.run``, ``Pipeline.context``
built without keyword arguments, the closed breaker's lock-free success, the limiter without a tpm, the bulkhead's
inlined release (docs/benchmarks.md, "The 5 µs goal")."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import ClassVar, TypeVar

import anyio
import anyio.lowlevel
import pytest

import ragguard
from ragguard import CallContext, CircuitBreaker, ManualClock, Pipeline, RateLimiter
from ragguard.guards.pipeline import _plan

T = TypeVar("T")


class Outer(ragguard.GuardBase):
    """A pass-through guard placed before the Deadline: the Deadline then stays a layer (not folded)."""

    stage: ClassVar[str] = "observe"
    __slots__ = ("clock",)

    def __init__(self) -> None:
        self.clock = ragguard.SYSTEM_CLOCK

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        return await call()


class BadRequest(Exception):
    """Shaped like an SDK's 400: never retried (``classify_exception`` reads ``status_code``)."""

    status_code = 400


class OwnDeadline(ragguard.Deadline):
    """A subclass: it may redefine delegation, so it is never folded."""

    __slots__ = ()


# ---------------------------------------------------------------- Pipeline.context


def test_pipeline_context_sets_every_slot_as_callcontext_does() -> None:
    def classify(exc: BaseException) -> ragguard.Outcome:
        return ragguard.classify_exception(exc)

    clock = ManualClock(5.0)
    pipeline = Pipeline(clock=clock, classify=classify)
    pairs = [
        (pipeline.context(), CallContext(clock=clock, classify=classify)),
        (
            pipeline.context(tokens=12.5, requests=3.0, operation="embeddings"),
            CallContext(clock=clock, classify=classify, tokens=12.5, requests=3.0, operation="embeddings"),
        ),
    ]
    for made, expected in pairs:
        assert type(made) is CallContext
        for name in CallContext.__slots__:
            assert getattr(made, name) == getattr(expected, name), name
    assert pairs[0][0] is not pipeline.context()  # a fresh one per call


# ---------------------------------------------------------------- Deadline folded into Pipeline.run


def test_only_an_outermost_delegated_deadline_is_folded() -> None:
    deadline = ragguard.Deadline(5)
    folded = Pipeline(deadline, ragguard.Retry(), ragguard.CircuitBreaker("x"), ragguard.Timeout(1))
    assert folded._fold is deadline
    assert folded._first == folded.guards[1].run  # the Deadline runs no layer
    # the plan itself is unchanged: the Deadline delegates
    assert _plan(tuple(folded.guards))[0] == deadline.run_delegated
    # enforced by itself (no attempt timeout inside), behind another guard, or a subclass: a layer as before
    for pipeline in (
        Pipeline(deadline, ragguard.Retry()),
        Pipeline(Outer(), deadline, ragguard.Retry(), ragguard.Timeout(1)),
        Pipeline(OwnDeadline(5), ragguard.Retry(), ragguard.Timeout(1)),
    ):
        assert pipeline._fold is None


def _shapes(seconds: float | None, clock: ManualClock) -> dict[str, Pipeline]:
    """The same guards with the Deadline folded, and as a (delegated) layer behind a pass-through guard."""
    inner = (ragguard.Retry(attempts=2, clock=clock), ragguard.Timeout(60, clock=clock))
    deadline = ragguard.Deadline(seconds, clock=clock)
    shapes = {
        "folded": Pipeline(deadline, *inner, clock=clock),
        "layer": Pipeline(Outer(), deadline, *inner, clock=clock),
    }
    assert shapes["folded"]._fold is deadline
    assert shapes["layer"]._fold is None
    assert _plan(tuple(shapes["layer"].guards))[1] == deadline.run_delegated
    return shapes


@pytest.fixture
def no_waits() -> Iterator[None]:
    ragguard.set_testing(True)
    try:
        yield
    finally:
        ragguard.set_testing(False)


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["folded", "layer"])
@pytest.mark.parametrize(
    ("enclosing", "inside"),
    [(math.inf, 105.0), (102.0, 102.0), (200.0, 105.0)],
    ids=["none", "tighter-enclosing", "looser-enclosing"],
)
async def test_the_deadline_is_min_of_enclosing_and_own_then_restored(
    shape: str, enclosing: float, inside: float
) -> None:
    clock = ManualClock(100.0)
    pipeline = _shapes(5.0, clock)[shape]
    seen: list[float] = []

    async def call() -> str:
        seen.append(ctx.deadline)
        return "ok"

    ctx = pipeline.context()
    ctx.deadline = enclosing
    assert await pipeline.run(call, ctx) == "ok"
    assert seen == [inside]
    assert ctx.deadline == enclosing

    async def fails() -> str:
        seen.append(ctx.deadline)
        raise BadRequest("not retried")

    with pytest.raises(BadRequest, match="not retried"):
        await pipeline.run(fails, ctx)
    assert seen[-1] == inside
    assert ctx.deadline == enclosing  # restored on an error too


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["folded", "layer"])
async def test_a_retry_inside_sees_the_same_deadline_on_every_attempt(shape: str, no_waits: None) -> None:
    clock = ManualClock(100.0)
    pipeline = _shapes(5.0, clock)[shape]
    seen: list[float] = []

    async def flaky() -> str:
        seen.append(ctx.deadline)
        if len(seen) == 1:
            raise ConnectionError("once")
        return "ok"

    ctx = pipeline.context()
    assert await pipeline.run(flaky, ctx) == "ok"
    assert seen == [105.0, 105.0]
    assert ctx.deadline == math.inf


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["folded", "layer"])
async def test_a_passed_enclosing_deadline_raises_at_once(shape: str) -> None:
    clock = ManualClock(100.0)
    pipeline = _shapes(5.0, clock)[shape]
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    for passed in (99.0, 100.0):
        ctx = pipeline.context()
        ctx.deadline = passed
        with pytest.raises(ragguard.DeadlineExceeded, match="had already passed"):
            await pipeline.run(call, ctx)
        assert ctx.deadline == passed
    assert calls == 0


@pytest.mark.anyio
@pytest.mark.parametrize("shape", ["folded", "layer"])
async def test_a_deadline_of_none_leaves_the_context_alone(shape: str) -> None:
    clock = ManualClock(100.0)
    pipeline = _shapes(None, clock)[shape]
    seen: list[float] = []

    async def call() -> None:
        seen.append(ctx.deadline)

    for enclosing in (math.inf, 150.0):
        ctx = pipeline.context()
        ctx.deadline = enclosing
        await pipeline.run(call, ctx)
        assert ctx.deadline == enclosing
    assert seen == [math.inf, 150.0]


@pytest.mark.anyio
async def test_nested_pipelines_each_fold_their_own_deadline() -> None:
    clock = ManualClock(100.0)
    seen: list[float] = []
    inner = Pipeline(ragguard.Deadline(3, clock=clock), ragguard.Timeout(60, clock=clock), clock=clock)
    outer = Pipeline(ragguard.Deadline(10, clock=clock), ragguard.Retry(clock=clock), inner, clock=clock)
    assert inner._fold is not None

    async def call() -> None:
        seen.append(ctx.deadline)

    ctx = outer.context()
    await outer.run(call, ctx)
    assert seen == [103.0]
    assert ctx.deadline == math.inf


@pytest.mark.anyio
async def test_a_folded_deadline_is_still_enforced_by_the_attempt_timeout() -> None:
    pipeline = Pipeline(ragguard.Deadline(0.05), ragguard.Retry(attempts=3), ragguard.Timeout(10))
    assert pipeline._fold is not None
    with anyio.fail_after(5):
        with pytest.raises(ragguard.DeadlineExceeded) as info:
            await pipeline.run(lambda: anyio.sleep(5))
    assert not isinstance(info.value, ragguard.AttemptTimeout)


# ---------------------------------------------------------------- the closed breaker's lock-free success


def _counts(breaker: CircuitBreaker) -> tuple[str, int, int, int, int]:
    snap = breaker.snapshot()
    return snap.state.value, snap.calls, snap.failures, snap.slow_calls, snap.consecutive_failures


async def _ok() -> str:
    return "ok"


async def _down() -> str:
    raise ConnectionError("down")


@pytest.mark.anyio
async def test_a_quiet_window_still_counts_every_change() -> None:
    breaker = CircuitBreaker("q", window=4, min_calls=4, failure_rate=0.5, failure_threshold=3)
    ctx = CallContext()
    for _ in range(6):  # the window fills, then successes change nothing
        await breaker.run(_ok, ctx)
    assert _counts(breaker) == ("closed", 4, 0, 0, 0)
    with pytest.raises(ConnectionError):
        await breaker.run(_down, ctx)
    assert _counts(breaker) == ("closed", 4, 1, 0, 1)
    await breaker.run(_ok, ctx)  # a success after a failure resets the run of failures
    assert _counts(breaker) == ("closed", 4, 1, 0, 0)
    for _ in range(2):
        await breaker.run(_ok, ctx)
    assert _counts(breaker) == ("closed", 4, 1, 0, 0)
    await breaker.run(_ok, ctx)  # the 4th record after the failure evicts it
    assert _counts(breaker) == ("closed", 4, 0, 0, 0)
    for _ in range(2):  # 2 failures in a full window of 4: rate 0.5 opens it
        with pytest.raises(ConnectionError):
            await breaker.run(_down, ctx)
    assert _counts(breaker)[0] == "open"


@pytest.mark.anyio
async def test_a_slow_success_in_a_quiet_window_counts() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("slow", window=3, min_calls=3, slow_call_s=1.0, slow_call_rate=0.5, clock=clock)
    ctx = CallContext(clock=clock)
    for _ in range(3):
        await breaker.run(_ok, ctx)
    assert _counts(breaker) == ("closed", 3, 0, 0, 0)

    async def slow() -> str:
        clock.advance(2.0)
        return "ok"

    await breaker.run(slow, ctx)
    assert _counts(breaker) == ("closed", 3, 0, 1, 0)
    await breaker.run(slow, ctx)  # 2 slow of 3 >= 0.5
    assert _counts(breaker)[0] == "open"


def test_permits_in_a_quiet_window() -> None:
    breaker = CircuitBreaker("permits", window=2, min_calls=2, failure_rate=1.0)
    for _ in range(3):
        breaker.acquire().record_success()
    assert _counts(breaker) == ("closed", 2, 0, 0, 0)
    permit = breaker.acquire()
    permit.record_failure()
    permit.record_success()  # only the first report counts
    assert _counts(breaker) == ("closed", 2, 1, 0, 1)
    breaker.acquire().record_success(slow=True)
    assert _counts(breaker) == ("closed", 2, 1, 1, 0)
    disabled = CircuitBreaker("off", enabled=False)
    disabled.acquire().record_success()
    assert _counts(disabled) == ("closed", 0, 0, 0, 0)


@pytest.mark.anyio
async def test_successes_admitted_while_quiet_count_once_the_window_changed() -> None:
    breaker = CircuitBreaker("inflight", window=4, min_calls=4, failure_rate=1.0, failure_threshold=10)
    ctx = CallContext()
    for _ in range(4):
        await breaker.run(_ok, ctx)
    release = anyio.Event()

    async def held() -> str:
        await release.wait()
        return "ok"

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(breaker.run, held, CallContext())
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(ConnectionError):
            await breaker.run(_down, ctx)  # admitted after them, settled before them
        assert _counts(breaker) == ("closed", 4, 1, 0, 1)
        release.set()
    # the four successes were recorded, not skipped: they reset the run and evict the failure
    assert _counts(breaker) == ("closed", 4, 0, 0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("control", ["reset", "force_open"])
async def test_successes_admitted_before_a_transition_are_ignored(control: str) -> None:
    seen: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "stale", window=2, min_calls=2, on_state_change=lambda _n, old, new: seen.append((old.value, new.value))
    )
    for _ in range(2):
        await breaker.run(_ok, CallContext())
    release = anyio.Event()

    async def held() -> str:
        await release.wait()
        return "ok"

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(breaker.run, held, CallContext())
        await anyio.wait_all_tasks_blocked()
        getattr(breaker, control)()
        release.set()
    if control == "reset":
        assert _counts(breaker) == ("closed", 0, 0, 0, 0)
        assert seen == []
    else:
        assert _counts(breaker)[0] == "open"
        assert seen == [("closed", "open")]


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch as often as CPython allows, so that lock-free reads meet half-done updates."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _hammer(breaker: CircuitBreaker, backend: str, *, threads: int, tasks: int, each: int, failures: int) -> None:
    """``threads`` event loops (on ``backend``), each running ``tasks`` tasks of ``each`` successful calls that
    yield inside the call, plus one loop making ``failures`` failed calls, all at once on one breaker."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    async def ok() -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    async def successes() -> None:
        async def worker() -> None:
            for _ in range(each):
                await breaker.run(ok, CallContext())

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)

    async def fail() -> None:
        for _ in range(failures):
            with pytest.raises(ConnectionError):
                await breaker.run(_down, CallContext())
            await anyio.lowlevel.checkpoint()

    def thread(main: Callable[[], Awaitable[None]]) -> None:
        try:
            start.wait()
            anyio.run(main, backend=backend)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=thread, args=(successes,)) for _ in range(threads)]
    workers.append(threading.Thread(target=thread, args=(fail,)))
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    assert errors == []


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("start", ["filling", "quiet"])
def test_threads_and_tasks_keep_exact_counts_and_transitions(
    anyio_backend: str, start: str, fast_switching: None
) -> None:
    """No failure leaves the window during the concurrent phase (fewer records than the window holds), so the
    counts after it are exact whatever the interleaving: a success lost or a ring slot clobbered would show, then
    or once the failures are evicted; the failure rate then opens the breaker exactly at the planned failure."""
    window, failures = 3_000, 30
    seen: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "threads",
        window=window,
        min_calls=window,
        failure_rate=failures / window,
        failure_threshold=10**9,
        on_state_change=lambda _n, old, new: seen.append((old.value, new.value)),
    )
    threads, tasks, each = 4, 8, 60  # 1,920 successes + 29 failures < 3,000
    if start == "quiet":

        async def fill() -> None:
            for _ in range(window):
                await breaker.run(_ok, CallContext())

        anyio.run(fill, backend=anyio_backend)
        assert _counts(breaker) == ("closed", window, 0, 0, 0)
    _hammer(breaker, anyio_backend, threads=threads, tasks=tasks, each=each, failures=failures - 1)
    snap = breaker.snapshot()
    expected_calls = window if start == "quiet" else threads * tasks * each + failures - 1
    assert (snap.state.value, snap.calls, snap.failures) == ("closed", expected_calls, failures - 1)
    assert seen == []

    async def finish() -> None:
        for _ in range(window):  # every failure leaves the window exactly once
            await breaker.run(_ok, CallContext())
        assert _counts(breaker) == ("closed", window, 0, 0, 0)
        for _ in range(failures - 1):
            with pytest.raises(ConnectionError):
                await breaker.run(_down, CallContext())
        assert _counts(breaker)[:3] == ("closed", window, failures - 1)
        with pytest.raises(ConnectionError):
            await breaker.run(_down, CallContext())
        assert _counts(breaker)[0] == "open"

    anyio.run(finish, backend=anyio_backend)
    assert seen == [("closed", "open")]


# ---------------------------------------------------------------- the limiter without a tpm


def test_without_a_tpm_requests_are_limited_and_tokens_are_free() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=600, burst_seconds=1.0, clock=clock)  # 10 requests/s, 10 at once
    waits = [limiter.reserve(1, tokens=1e9) for _ in range(12)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.1, 0.2])
    assert limiter.available_tokens == math.inf
    assert limiter.capacity_tokens == math.inf
    with pytest.raises(ragguard.RateLimitTimeout):
        limiter.reserve(1, max_wait=0.1)  # would wait 0.3 s
    clock.advance(0.3)
    assert limiter.reserve(1, tokens=math.inf) == 0.0
    assert limiter.reserve(0, tokens=1e9) == pytest.approx(0.0)  # a call that costs nothing goes at once


def test_with_a_tpm_tokens_are_limited() -> None:
    clock = ManualClock()
    limiter = RateLimiter(tpm=6_000, burst_seconds=1.0, clock=clock)  # 100 tokens/s, 100 at once
    assert limiter.reserve(0, tokens=60) == 0.0
    assert limiter.reserve(0, tokens=60) == pytest.approx(0.2)  # 40 left, 20 more to refill
    # a call that costs no token still waits for the bucket's debt to clear (level back to 0, at 0.2 s)
    assert limiter.reserve(5, tokens=0) == pytest.approx(0.2)
    assert limiter.reserve(0, tokens=250) == pytest.approx(1.2)  # oversize: goes when full
    both = RateLimiter(rpm=600, tpm=6_000, burst_seconds=1.0, clock=ManualClock())
    assert both.reserve(1, tokens=60) == 0.0
    assert both.reserve(1, tokens=60) == pytest.approx(0.2)  # the tokens bucket holds it
    requests = RateLimiter(rpm=600, tpm=6_000, burst_seconds=1.0, clock=ManualClock())
    assert [requests.reserve(1, tokens=0) for _ in range(11)][-1] == pytest.approx(0.1)  # the requests bucket


@pytest.mark.anyio
async def test_without_a_tpm_a_pause_still_holds_every_caller() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rpm=6_000, clock=clock)
    limiter.pause(2.0)
    waits = [limiter.reserve(1) for _ in range(3)]
    cap = min(0.1 * 2.0, 3 * 60 / 6_000)
    assert all(2.0 <= w <= 2.0 + cap + 1e-9 for w in waits)
    clock.advance(10.0)
    pipeline = Pipeline(limiter, clock=clock)
    ctx = pipeline.context(tokens=1e12)
    assert await pipeline.run(_ok, ctx) == "ok"
    assert clock.slept == []  # went at once


# ---------------------------------------------------------------- the bulkhead's inlined release


@pytest.mark.anyio
async def test_the_bulkhead_frees_its_slot_or_hands_it_to_the_oldest_waiter() -> None:
    bulkhead = ragguard.ConcurrencyLimit(max_in_flight=1)
    ctx = CallContext()
    assert await bulkhead.run(_ok, ctx) == "ok"
    with pytest.raises(ConnectionError):
        await bulkhead.run(_down, ctx)
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
    order: list[int] = []
    release = anyio.Event()

    async def holder() -> None:
        await release.wait()

    async def waiter(i: int) -> None:
        async def record() -> None:
            order.append(i)

        await bulkhead.run(record, CallContext())

    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.run, holder, CallContext())
        await anyio.wait_all_tasks_blocked()
        for i in range(3):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        assert (bulkhead.in_flight, bulkhead.queued) == (1, 3)
        release.set()
    assert order == [0, 1, 2]
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
