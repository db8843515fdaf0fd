from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ragguard
from ragguard import (
    SYSTEM_CLOCK,
    CallContext,
    ManualClock,
    Pipeline,
    RateLimiter,
    RateLimitPolicy,
    RateLimitTimeout,
)
from ragguard._hints import RateLimitHeaders

# ---------------------------------------------------------------- helpers


class EventClock:
    """Virtual time shared by concurrent tasks: each sleeper wakes when the test moves time past its deadline.

    (:class:`ManualClock` advances time on every sleep, one task after the other, so it cannot show several
    callers waiting at once.)
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), event))
        await event.wait()

    def _wake_next(self) -> None:
        when, _, event = heapq.heappop(self._sleepers)
        self._now = max(self._now, when)
        event.set()

    async def advance_to(self, t: float) -> None:
        """Move time to ``t``, waking due sleepers one deadline at a time."""
        await anyio.wait_all_tasks_blocked()
        while self._sleepers and self._sleepers[0][0] <= t:
            self._wake_next()
            await anyio.wait_all_tasks_blocked()
        self._now = max(self._now, t)

    def wake_due(self, t: float) -> None:
        """Move time to ``t`` and end every sleep due by then, without letting the sleepers run yet."""
        while self._sleepers and self._sleepers[0][0] <= t:
            self._wake_next()
        self._now = max(self._now, t)

    async def run_all(self) -> None:
        """Jump from deadline to deadline until nobody sleeps any more."""
        while True:
            await anyio.wait_all_tasks_blocked()
            if not self._sleepers:
                return
            self._wake_next()


class HTTPError(Exception):
    """An SDK-like error: ``status_code`` plus a ``response`` with case-insensitive headers."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers=httpx.Headers(headers or {}))


async def start_in_order(tg: anyio.abc.TaskGroup, fns: list[Callable[[], Awaitable[Any]]]) -> None:
    """Start tasks one at a time, each running until it blocks, so they reserve in this order (trio
    shuffles tasks started together)."""
    for fn in fns:
        tg.start_soon(fn)
        await anyio.wait_all_tasks_blocked()


async def ok() -> str:
    return "ok"


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rpm": -1}, "rpm"),
        ({"rpm": 0}, "rpm"),
        ({"tpm": -5}, "tpm"),
        ({"burst_seconds": 0}, "burst_seconds"),
        ({"burst_seconds": 61}, "burst_seconds"),
        ({"max_wait": -1}, "max_wait"),
        ({"accounting": "lenient"}, "accounting"),
        ({"scope": "org"}, "scope"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        RateLimiter(**kwargs)
    assert [e["loc"][0] for e in info.value.errors()] == [field]


def test_from_policy_and_views() -> None:
    section = RateLimitPolicy(rpm=600, tpm=6000, burst_seconds=2, scope="credential", accounting="reconcile")
    clock = ManualClock()
    limiter = RateLimiter.from_policy(section, clock=clock, name="gpt")
    assert limiter.policy == section
    assert (limiter.rpm, limiter.tpm, limiter.scope, limiter.name) == (600, 6000, "credential", "gpt")
    assert limiter.stage == "rate_limit"
    assert limiter.clock is clock
    # capacity = rate/60 · burst_seconds
    assert limiter.capacity_requests == pytest.approx(20)
    assert limiter.capacity_tokens == pytest.approx(200)
    assert limiter.available_requests == pytest.approx(20)
    assert limiter.available_tokens == pytest.approx(200)
    assert limiter.paused_until == -math.inf
    assert "gpt" in repr(limiter)


def test_unlimited_buckets_report_infinity() -> None:
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=ManualClock())
    assert limiter.available_tokens == math.inf
    assert limiter.capacity_tokens == math.inf
    assert limiter.reserve(1, 10**9) == 0.0  # tokens are free without a tpm
    assert RateLimiter().available_requests == math.inf


def test_negative_costs_are_rejected() -> None:
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=ManualClock())
    with pytest.raises(ValueError, match="requests"):
        limiter.reserve(-1)
    with pytest.raises(ValueError, match="tokens"):
        limiter.reserve(1, math.nan)
    with pytest.raises(ValueError, match="refunds"):
        limiter.refund(tokens=-1)
    with pytest.raises(ValueError, match="debits"):
        limiter.debit(-1)
    with pytest.raises(ValueError, match="pause"):
        limiter.pause(-1)
    with pytest.raises(ValueError, match="pause"):
        limiter.pause(math.inf)


# ---------------------------------------------------------------- buckets


@pytest.mark.anyio
async def test_refill_is_continuous_and_capped() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, clock=clock)  # 10 per second, capacity 10
    for _ in range(3):
        assert await limiter.acquire() == 0.0
    assert limiter.available_requests == pytest.approx(7)
    clock.advance(0.15)
    assert limiter.available_requests == pytest.approx(8.5)
    clock.advance(100)
    assert limiter.available_requests == pytest.approx(10)


@pytest.mark.anyio
async def test_waits_one_interval_when_empty() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)  # capacity 1, one per second
    assert await limiter.acquire() == 0.0
    assert await limiter.acquire() == pytest.approx(1.0)
    assert await limiter.acquire() == pytest.approx(1.0)
    assert clock.slept == [pytest.approx(1.0), pytest.approx(1.0)]


@pytest.mark.anyio
async def test_no_checkpoint_when_nothing_waits() -> None:
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, tpm=60_000, clock=ManualClock())
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        # any checkpoint inside would raise the cancellation here
        await limiter.acquire(1, 100)
        await limiter.run(ok, CallContext(tokens=10))
        reached = True
    assert reached


@pytest.mark.anyio
async def test_the_slowest_bucket_decides() -> None:
    clock = ManualClock()
    limiter = RateLimiter(
        burst_seconds=1.0, rpm=600, tpm=600, clock=clock
    )  # 10 requests / 10 tokens per second, capacity 10
    assert await limiter.acquire(1, 10) == 0.0
    assert await limiter.acquire(1, 5) == pytest.approx(0.5)  # tokens: 5 more at 10/s
    # charged when admitted: the requests bucket refilled to full meanwhile, then paid 1
    assert limiter.available_requests == pytest.approx(9)
    assert limiter.available_tokens == pytest.approx(0.0, abs=1e-9)


def test_a_call_delayed_by_one_bucket_is_charged_to_the_other_when_it_goes() -> None:
    clock = ManualClock()
    limiter = RateLimiter(
        burst_seconds=1.0, rpm=600, tpm=60, clock=clock
    )  # 10 requests/s (capacity 10), 1 token/s (capacity 1)
    assert limiter.reserve(1, 20) == 0.0  # oversize: the tokens bucket is in debt until t = 20
    waits = []
    for _ in range(12):  # token-free calls, spread out while the tokens debt lasts
        waits.append(clock.now() + limiter.reserve(1, 0))
        clock.advance(1.0)
    # the requests bucket lets 10 go at once when the debt clears, then one per 0.1 s: never 12 together
    assert waits == pytest.approx([19.0] * 10 + [19.1, 19.2])


@pytest.mark.anyio
async def test_oversize_cost_goes_when_full_and_leaves_debt() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, tpm=600, clock=clock)  # 10 tokens/s, capacity 10
    assert await limiter.acquire(1, 30) == 0.0  # full bucket: admitted, not refused forever
    assert limiter.available_tokens == pytest.approx(-20)
    assert await limiter.acquire(1, 1) == pytest.approx(2.1)  # the debt clears, then 1 token
    # not full: an oversize call waits only until the bucket is full
    clock.advance(0.5)  # level 5
    assert await limiter.acquire(1, 30) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.floats(1, 100_000),
    tpm=st.floats(10, 1_000_000),
    burst=st.floats(0.01, 10),
    steps=st.lists(
        st.tuples(
            st.one_of(st.just(0.0), st.floats(0, 3)),  # seconds since the previous call, in units of burst
            st.one_of(st.just(1.0), st.floats(0, 3)),  # requests
            st.one_of(st.just(0.0), st.floats(0, 2)),  # tokens, in units of the token capacity
            st.one_of(st.none(), st.floats(0, 5)),  # max_wait, in units of burst
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_window_bound_and_fifo(
    rpm: float, tpm: float, burst: float, steps: list[tuple[float, float, float, float | None]]
) -> None:
    """Over any window of t seconds a bucket admits at most max(capacity, largest cost) + rate·t (just
    capacity + rate·t when no single cost exceeds the capacity), and calls are admitted in call order."""
    clock = ManualClock(1000.0)
    limiter = RateLimiter(rpm=rpm, tpm=tpm, burst_seconds=burst, clock=clock)
    token_cap = tpm / 60 * burst
    admitted: list[tuple[float, float, float]] = []  # (time, requests, tokens)
    for dt, requests, token_units, max_wait in steps:
        clock.advance(dt * burst)
        tokens = token_units * token_cap
        before = (limiter.available_requests, limiter.available_tokens)
        refused: RateLimitTimeout | None = None
        try:
            wait = limiter.reserve(requests, tokens, max_wait=math.inf if max_wait is None else max_wait * burst)
        except RateLimitTimeout as exc:
            refused = exc
        if refused is not None:
            assert max_wait is not None
            assert refused.wait > refused.remaining
            assert (limiter.available_requests, limiter.available_tokens) == before  # nothing consumed
            continue
        assert wait >= 0.0
        admitted.append((clock.now() + wait, requests, tokens))
    times = [a[0] for a in admitted]
    # FIFO (up to float rounding: the schedule is exact arithmetic on floats)
    assert all(later >= earlier - 1e-9 for earlier, later in itertools.pairwise(times))
    for index, rate, cap in ((1, rpm / 60, rpm / 60 * burst), (2, tpm / 60, token_cap)):
        for i in range(len(admitted)):
            total = 0.0
            largest = 0.0
            for j in range(i, len(admitted)):
                total += admitted[j][index]
                largest = max(largest, admitted[j][index])
                span = admitted[j][0] - admitted[i][0]
                bound = max(cap, largest) + rate * span
                assert total <= bound * (1 + 1e-9) + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    burst=st.floats(0.05, 5),
    steps=st.lists(
        st.tuples(st.floats(0, 2), st.floats(0, 2), st.booleans()),  # dt (× burst), requests, cancel later
        min_size=1,
        max_size=30,
    ),
)
def test_window_bound_holds_with_cancelled_reservations(burst: float, steps: list[tuple[float, float, bool]]) -> None:
    """Reservations given back before their time (cancelled callers) never let the others exceed the bound."""
    rate = 10.0
    cap = rate * burst
    clock = ManualClock()
    limiter = RateLimiter(rpm=rate * 60, burst_seconds=burst, clock=clock)
    live: list[tuple[float, float]] = []
    pending: list[tuple[float, float]] = []  # reservations to cancel at the next step if not yet due
    for dt, requests, cancel in steps:
        clock.advance(dt * burst)
        for at, cost in pending:
            if at > clock.now():
                limiter.refund(cost)
            else:
                live.append((at, cost))
        pending = []
        wait = limiter.reserve(requests)
        (pending if cancel else live).append((clock.now() + wait, requests))
    live.extend(pending)  # never cancelled after all
    live.sort()
    for i in range(len(live)):
        total = 0.0
        largest = 0.0
        for j in range(i, len(live)):
            total += live[j][1]
            largest = max(largest, live[j][1])
            bound = max(cap, largest) + rate * (live[j][0] - live[i][0])
            assert total <= bound * (1 + 1e-9) + 1e-6


@pytest.mark.anyio
async def test_concurrent_callers_are_admitted_in_call_order_spaced_by_the_rate() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)  # capacity 1, one per second
    admitted: list[tuple[int, float]] = []

    def caller(i: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await limiter.acquire()
            admitted.append((i, clock.now()))

        return run

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [caller(i) for i in range(5)])
        assert limiter.available_requests == pytest.approx(-4)  # four reservations promised ahead
        await clock.run_all()
    assert [i for i, _ in admitted] == [0, 1, 2, 3, 4]
    assert [t for _, t in admitted] == pytest.approx([0, 1, 2, 3, 4])


# ---------------------------------------------------------------- deadlines and cancellation


@pytest.mark.anyio
async def test_timeout_is_immediate_and_consumes_nothing() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)
    await limiter.acquire()
    with pytest.raises(RateLimitTimeout) as info:
        await limiter.acquire(deadline=clock.now() + 0.5)
    assert info.value.wait == pytest.approx(1.0)
    assert info.value.remaining == pytest.approx(0.5)
    assert clock.slept == []  # no pointless sleep
    assert limiter.available_requests == pytest.approx(0.0)
    assert await limiter.acquire() == pytest.approx(1.0)  # one interval, not two


@pytest.mark.anyio
async def test_run_honours_the_context_deadline_and_max_wait() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock, max_wait=0.25)
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1

    await limiter.run(call, CallContext(clock=clock))
    with pytest.raises(RateLimitTimeout) as info:
        await limiter.run(call, CallContext(clock=clock))  # max_wait
    assert info.value.remaining == pytest.approx(0.25)
    unlimited_wait = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)
    await unlimited_wait.run(call, CallContext(clock=clock))
    with pytest.raises(RateLimitTimeout):
        await unlimited_wait.run(call, CallContext(clock=clock, deadline=clock.now() + 0.9))  # deadline
    assert calls == 2
    assert clock.slept == []


@pytest.mark.anyio
async def test_no_wait_is_never_refused_even_past_the_deadline() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock, max_wait=0)
    assert await limiter.acquire(deadline=clock.now() - 1) == 0.0


@pytest.mark.anyio
async def test_cancelled_waiter_gives_its_reservation_back() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)
    await limiter.acquire()  # empties the bucket
    waits: list[float] = []

    async def late() -> None:
        waits.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()
        tg.start_soon(scope_guarded, scope, limiter)
        await anyio.wait_all_tasks_blocked()
        assert limiter.available_requests == pytest.approx(-1)
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert limiter.available_requests == pytest.approx(0)
        tg.start_soon(late)
        await clock.run_all()
    assert waits == [pytest.approx(1.0)]  # behind one interval, not two


async def scope_guarded(scope: anyio.CancelScope, limiter: RateLimiter) -> None:
    with scope:
        await limiter.acquire()
        pytest.fail("should have been cancelled")


def test_refund_is_capped_at_capacity() -> None:
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, tpm=600, clock=ManualClock())
    limiter.reserve(2, 3)
    limiter.refund(requests=100, tokens=100)
    assert limiter.available_requests == pytest.approx(10)
    assert limiter.available_tokens == pytest.approx(10)


# ---------------------------------------------------------------- accounting


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("accounting", "used", "left"),
    [
        ("openai", 80, 20),  # under-estimate: debit the 30 extra
        ("openai", 30, 50),  # over-estimate: OpenAI never refunds
        ("reconcile", 80, 20),
        ("reconcile", 30, 70),  # refund the 20 unused
        ("openai", None, 50),  # no usage reported
    ],
)
async def test_accounting(accounting: Any, used: float | None, left: float) -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, tpm=6000, clock=clock, accounting=accounting)  # capacity 100 tokens
    ctx = CallContext(clock=clock, tokens=50)

    async def call() -> str:
        ctx.used_tokens = used
        return "done"

    assert await limiter.run(call, ctx) == "done"
    assert limiter.available_tokens == pytest.approx(left)


@pytest.mark.anyio
async def test_failed_calls_keep_their_charge() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, tpm=6000, clock=clock, accounting="reconcile")

    async def call() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await limiter.run(call, CallContext(clock=clock, tokens=50))
    assert limiter.available_tokens == pytest.approx(50)
    assert limiter.available_requests == pytest.approx(9)
    assert limiter.paused_until == -math.inf  # not a rate limit: no pause


def test_debit_takes_the_level_into_debt() -> None:
    limiter = RateLimiter(burst_seconds=1.0, tpm=600, clock=ManualClock())
    limiter.debit(25)
    assert limiter.available_tokens == pytest.approx(-15)
    assert limiter.reserve(0, 1) == pytest.approx(1.6)


# ---------------------------------------------------------------- provider headers


@pytest.mark.anyio
@pytest.mark.parametrize("fail", [False, True])
async def test_headers_lower_the_level_never_raise_it(fail: bool) -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, tpm=6000, clock=clock)  # capacities 10 and 100
    ctx = CallContext(clock=clock, tokens=10)

    def responding(headers: RateLimitHeaders) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            ctx.rate_headers = headers
            if fail:
                raise HTTPError(500)

        return call

    async def run(call: Callable[[], Awaitable[None]]) -> None:
        try:
            await limiter.run(call, ctx)
        except HTTPError:
            assert fail

    await run(responding(RateLimitHeaders(remaining_requests=2, remaining_tokens=30)))
    assert limiter.available_requests == pytest.approx(2)
    assert limiter.available_tokens == pytest.approx(30)
    await run(responding(RateLimitHeaders(remaining_requests=1000, remaining_tokens=90_000)))
    assert limiter.available_requests == pytest.approx(1)  # our own charge only, not raised to 1000
    assert limiter.available_tokens == pytest.approx(20)


@pytest.mark.anyio
async def test_stale_headers_and_follow_headers_off_are_ignored() -> None:
    clock = ManualClock()
    headers = RateLimitHeaders(remaining_requests=0)
    ctx = CallContext(clock=clock)
    ctx.rate_headers = headers  # left over from an earlier attempt
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, clock=clock)
    await limiter.run(ok, ctx)
    assert limiter.available_requests == pytest.approx(9)

    async def call() -> None:
        ctx.rate_headers = RateLimitHeaders(remaining_requests=0)

    off = RateLimiter(burst_seconds=1.0, rpm=600, clock=clock, follow_headers=False)
    await off.run(call, ctx)
    assert off.available_requests == pytest.approx(9)
    off.observe(RateLimitHeaders(remaining_requests=0))  # the mechanism still works when asked
    assert off.available_requests == pytest.approx(0)


# ---------------------------------------------------------------- shared Retry-After


@pytest.mark.anyio
async def test_429_pauses_every_caller_and_releases_them_spaced() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, clock=clock)  # 10 per second, capacity 10
    admitted: list[float] = []

    async def rate_limited() -> None:
        raise HTTPError(429, {"retry-after": "2"})

    with pytest.raises(HTTPError):  # the error still propagates
        await limiter.run(rate_limited, CallContext(clock=clock))
    assert limiter.paused_until == 2.0

    async def other() -> None:
        await limiter.run(ok, CallContext(clock=clock))
        admitted.append(clock.now())

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [other] * 4)
        await clock.run_all()
    # nobody before the pause ends, then one per refill interval: the bucket restarts empty
    assert admitted == pytest.approx([2.1, 2.2, 2.3, 2.4])


@pytest.mark.anyio
async def test_pause_moves_waiting_reservations_back_as_a_block() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)  # one per second, capacity 1
    admitted: list[tuple[str, float]] = []

    def caller(label: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await limiter.acquire()
            admitted.append((label, clock.now()))

        return run

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [caller("x"), caller("y"), caller("z")])  # due at 0, 1, 2
        await clock.advance_to(0.5)
        limiter.pause(3.0)  # until 3.5: everything waiting moves back by 3 s
        tg.start_soon(caller("w"))
        await clock.run_all()
    assert admitted == [("x", 0.0), ("y", 4.0), ("z", 5.0), ("w", 6.0)]


@pytest.mark.anyio
async def test_pause_without_limits_releases_with_upward_jitter() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, clock=clock, rng=random.Random(7))  # neither rpm nor tpm
    limiter.pause(10.0)
    admitted: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        admitted.append(clock.now())

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [caller] * 6)
        await clock.run_all()
    assert all(10.0 <= t <= 11.0 for t in admitted)  # jitter ≤ 10 % of the pause, upward only
    assert len(set(admitted)) == 6  # not all at once


@pytest.mark.anyio
async def test_a_longer_pause_keeps_the_spread_of_callers_already_released_by_a_pause() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, clock=clock, rng=random.Random(3))
    limiter.pause(1.0)
    admitted: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        admitted.append(clock.now())

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [caller] * 4)  # all reserved at 1.0 + jitter ≤ 0.1
        await clock.advance_to(0.5)
        limiter.pause(5.0)  # extends to 5.5 while they sleep
        await clock.run_all()
    assert all(5.5 <= t <= 5.6 for t in admitted)
    assert len(set(admitted)) == 4


@pytest.mark.anyio
async def test_callers_due_when_a_pause_starts_are_held_and_jittered() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, clock=clock, rng=random.Random(5))  # 10/s, capacity 10
    for _ in range(10):
        limiter.reserve()  # empty
    admitted: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        admitted.append(clock.now())

    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [caller] * 3)  # due at 0.1, 0.2, 0.3
        clock.wake_due(0.3)  # their sleeps end, but before they run...
        limiter.pause(2.0)  # ...a 429 pauses everyone until 2.3
        await clock.run_all()
    # never before the pause ends; not all at once; jitter ≤ min(10 % of 2 s, 3 intervals of 0.1 s)
    assert all(2.3 <= t <= 2.5 for t in admitted)
    assert len(set(admitted)) == 3


@pytest.mark.anyio
async def test_a_pause_beyond_a_waiters_deadline_times_it_out_and_refunds() -> None:
    clock = EventClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)
    await limiter.acquire()
    errors: list[RateLimitTimeout] = []

    async def waiter() -> None:
        try:
            await limiter.acquire(deadline=2.0)  # due at 1.0
        except RateLimitTimeout as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await clock.advance_to(0.5)
        limiter.pause(3.0)
        await clock.run_all()
    assert len(errors) == 1
    assert clock.now() == 1.0  # raised when it woke, not after sleeping through the pause
    assert errors[0].wait == pytest.approx(3.0)
    assert limiter.available_requests == pytest.approx(-2.5)  # empty at 3.5, nothing left promised


def test_shorter_pause_inside_a_longer_one_changes_nothing() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)
    limiter.pause(5.0)
    limiter.pause(1.0)
    assert limiter.paused_until == 5.0
    assert limiter.reserve() == pytest.approx(6.0)  # empty at 5.0, one interval
    limiter.pause(10.0)  # extends by 5 s: the reservation above moves to 11
    assert limiter.paused_until == 10.0
    assert limiter.reserve() == pytest.approx(12.0)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "limits", "share", "until"),
    [
        (HTTPError(429, {"retry-after-ms": "1500"}), {"rpm": 600}, True, 1.5),
        (HTTPError(429), {"rpm": 600}, True, 0.1),  # no hint: one request interval
        (HTTPError(429), {"tpm": 6000}, True, 0.2),  # no hint: this call's 20 tokens at 100/s
        (HTTPError(429), {}, True, 1.0),  # no hint, no limits: the default pause
        (HTTPError(429, {"retry-after": "2"}), {"rpm": 600}, False, -math.inf),  # sharing off
        (HTTPError(503, {"retry-after": "2"}), {"rpm": 600}, True, -math.inf),  # not a rate limit
    ],
)
async def test_which_failures_pause(error: Exception, limits: dict[str, Any], share: bool, until: float) -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, **limits, clock=clock, share_retry_after=share)

    async def call() -> None:
        raise error

    with pytest.raises(HTTPError):
        await limiter.run(call, CallContext(clock=clock, tokens=20))
    assert limiter.paused_until == pytest.approx(until)


@pytest.mark.anyio
async def test_a_broken_classifier_does_not_mask_the_error() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=60, clock=clock)

    def classify(exc: BaseException) -> Any:
        raise RuntimeError("classifier bug")

    async def call() -> None:
        raise HTTPError(429)

    with pytest.raises(HTTPError):
        await limiter.run(call, CallContext(clock=clock, classify=classify))


# ---------------------------------------------------------------- composition, threads, real time


@pytest.mark.anyio
async def test_in_a_pipeline() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=600, tpm=6000, clock=clock)
    pipeline = Pipeline(limiter, clock=clock)
    assert await pipeline.run(ok, pipeline.context(tokens=40)) == "ok"
    assert limiter.available_tokens == pytest.approx(60)
    assert await limiter.call(ok) == "ok"
    assert limiter.available_requests == pytest.approx(8)


def test_threads_share_one_limiter_without_losing_updates() -> None:
    clock = ManualClock()
    limiter = RateLimiter(burst_seconds=1.0, rpm=6_000_000, clock=clock)  # capacity 100,000, time stands still

    def hammer() -> None:
        for _ in range(5_000):
            limiter.reserve()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiter.available_requests == pytest.approx(80_000)


@pytest.mark.anyio
async def test_testing_mode_skips_real_waits() -> None:
    limiter = RateLimiter(burst_seconds=1.0, rpm=60)  # one per second on the system clock
    ragguard.set_testing(True)
    try:
        with anyio.fail_after(5):  # three 1 s waits would not fit
            for _ in range(4):
                await limiter.acquire()
    finally:
        ragguard.set_testing(False)


@pytest.mark.anyio
async def test_real_pacing() -> None:
    """A little real time (≈0.1 s): admissions are really spaced by the refill interval."""
    limiter = RateLimiter(rpm=1200, burst_seconds=0.05, clock=SYSTEM_CLOCK)  # 20/s, capacity 1
    admitted: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        admitted.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(caller)
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    assert all(gap >= 0.045 for gap in gaps)
