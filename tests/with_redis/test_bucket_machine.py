"""Stateful property test of the Redis token bucket behind :class:`ragguard.SharedRateLimiter`, on a real Redis.

Two limiters on two :class:`~ragguard.RedisBackend` objects (two "processes") share one bucket. Hypothesis
drives random reservations (request and token costs, some larger than the bucket; budgets from 0 to unlimited),
gives back the newest reservation while it is still in the future (the limiter's plain ``refund``) or any
waiting one, newest or not (the store's ``refund`` with the reservation's slot, what a caller cancelled while
waiting does), pauses the bucket (a shared Retry-After),
feeds ``x-ratelimit-remaining-*`` headers and lets real time pass in short sleeps (the bucket runs on the Redis
server's clock). The limiters sleep on :class:`~ragguard.ManualClock` objects, so a reservation's wait costs no
real time: what is checked is the schedule the store hands out. A pass-through store records each reservation's
admission time on the server's clock: exact (``now + wait``) for a caller told to wait, else bracketed by
reading the server's time just before and after the round trip.

Checked: every returned wait is ``>= 0`` and within the caller's budget; a refusal is
:class:`~ragguard.RateLimitTimeout` with a wait over the budget and leaves the bucket as it was; headers never
move the schedule earlier (never raise a level); and, over every window, the admissions of both limiters
together stay within ``max(capacity, largest cost) + rate·t`` per bucket (the bound of the module docstring of
``ragguard.guards.shared_limiter``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from ragguard import ManualClock, RateLimitHeaders, RateLimitTimeout
from ragguard.backends._redis_bucket import BucketState, RedisBucketStore, Reservation
from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_limiter import SharedRateLimiter

# 20 requests/s and 200 tokens/s; a burst of 0.25 s holds 5 requests and 50 tokens
RPM, TPM, BURST = 1_200.0, 12_000.0, 0.25
CAPACITY = {"requests": RPM / 60 * BURST, "tokens": TPM / 60 * BURST}
RATE = {"requests": RPM / 60, "tokens": TPM / 60}


class RecordingStore:
    """A :class:`~ragguard.guards.shared_limiter.BucketStore` that passes every call to the Redis store, and
    remembers the last reservation with the server's time read just before and just after it."""

    def __init__(self, inner: RedisBucketStore) -> None:
        self.inner = inner
        self.last: tuple[Reservation, BucketState, BucketState] | None = None

    async def reserve(
        self,
        name: str,
        req_cost: float,
        tok_cost: float,
        burst: float,
        budget: float,
        jitter: float,
        refund_req: float = 0.0,
        refund_tok: float = 0.0,
    ) -> Reservation:
        before = await self.inner.check(name)
        reply = await self.inner.reserve(name, req_cost, tok_cost, burst, budget, jitter, refund_req, refund_tok)
        after = await self.inner.check(name)
        self.last = (reply, before, after)
        return reply

    async def check(self, name: str) -> BucketState:
        return await self.inner.check(name)

    async def refund(self, name: str, req_cost: float, tok_cost: float, burst: float, slot: float = math.inf) -> None:
        await self.inner.refund(name, req_cost, tok_cost, burst, slot)

    async def debit(self, name: str, req_cost: float, tok_cost: float) -> None:
        await self.inner.debit(name, req_cost, tok_cost)

    async def pause(
        self, name: str, seconds: float, burst: float, jitter_cap: float, requests: bool, tokens: bool
    ) -> None:
        await self.inner.pause(name, seconds, burst, jitter_cap, requests, tokens)

    async def observe(self, name: str, req_level: float | None, tok_level: float | None, burst: float) -> None:
        await self.inner.observe(name, req_level, tok_level, burst)


class Admission:
    """One admitted reservation: its server time lies in ``[lo, hi]`` (``lo == hi`` when exactly known); ``slot``:
    the store's handle to give it back (``math.inf`` when it did not wait)."""

    __slots__ = ("hi", "limiter", "lo", "requests", "slot", "tokens")

    def __init__(
        self, lo: float, hi: float, requests: float, tokens: float, limiter: int, slot: float = math.inf
    ) -> None:
        self.lo, self.hi = lo, hi
        self.requests, self.tokens = requests, tokens
        self.limiter = limiter
        self.slot = slot


def check_window_bound(log: list[Admission]) -> None:
    """Over every window, admissions stay within ``max(capacity, largest cost) + rate·t`` per bucket.

    Sound with uncertain times: the admissions whose earliest time lies in ``[lo_i, lo_j]`` happened within
    ``max(hi) - lo_i`` seconds.
    """
    log = sorted(log, key=lambda a: a.lo)
    for unit in ("requests", "tokens"):
        for i in range(len(log)):
            total = largest = 0.0
            latest = -math.inf
            for j in range(i, len(log)):
                cost = getattr(log[j], unit)
                total += cost
                largest = max(largest, cost)
                latest = max(latest, log[j].hi)
                span = latest - log[i].lo
                # (+10 µs: server times are floats near 1.8e9 s, good to about 0.2 µs each)
                bound = max(CAPACITY[unit], largest) + RATE[unit] * (span + 1e-5)
                assert total <= bound + 1e-6, f"{unit}: {total} admitted within {span:.6f} s, bound {bound}"


class BucketMachine(RuleBasedStateMachine):
    def __init__(self, portal: BlockingPortal, backends: list[RedisBackend]) -> None:
        super().__init__()
        self.portal = portal
        name = f"machine:{uuid.uuid4().hex}"
        self.stores = [RecordingStore(backend.bucket_store()) for backend in backends]
        self.limiters = [
            SharedRateLimiter(store, name=name, rpm=RPM, tpm=TPM, burst_seconds=BURST, clock=ManualClock())
            for store in self.stores
        ]
        self.log: list[Admission] = []
        self.newest: Admission | None = None  # while it may be given back

    def state(self) -> BucketState:
        return self.portal.call(self.stores[0].check, self.limiters[0].name)

    @initialize()
    def start_empty(self) -> None:
        state = self.state()
        assert (state.req_tat, state.tok_tat) == (-1e300, -1e300)  # a fresh bucket: full

    @rule(
        limiter=st.integers(0, 1),
        requests=st.sampled_from([0.0, 1.0, 1.0, 2.0, 7.0]),
        tokens=st.sampled_from([0.0, 10.0, 10.0, 60.0]),
        budget=st.sampled_from([0.0, 0.0, 0.05, 0.3, math.inf]),
    )
    def request(self, limiter: int, requests: float, tokens: float, budget: float) -> None:
        self._request(limiter, requests, tokens, budget)

    @rule(
        limiter=st.integers(0, 1),
        count=st.integers(2, 10),
        requests=st.sampled_from([1.0, 1.0, 2.0]),
        tokens=st.sampled_from([0.0, 10.0]),
    )
    def crowd(self, limiter: int, count: int, requests: float, tokens: float) -> None:
        """Many callers at once (what fills the bucket to its bound, and queues waiters to cancel)."""
        for _ in range(count):
            self._request(limiter, requests, tokens, math.inf)

    def _request(self, limiter: int, requests: float, tokens: float, budget: float) -> None:
        shared = self.limiters[limiter]
        recorder = self.stores[limiter]
        deadline = shared.clock.now() + budget
        refused: RateLimitTimeout | None = None
        try:
            self.portal.call(lambda: shared.acquire(requests, tokens, deadline=deadline))
        except RateLimitTimeout as exc:
            refused = exc
        assert recorder.last is not None
        if refused is not None:
            reply, before, after = recorder.last
            assert not reply.admitted
            assert refused.wait > budget
            assert (after.req_tat, after.tok_tat) == (before.req_tat, before.tok_tat)  # nothing reserved
            return
        reply, before, after = recorder.last
        assert reply.admitted
        assert 0.0 <= reply.wait <= budget
        if reply.wait > 0.0:
            lo = hi = reply.now + reply.wait
        else:
            lo, hi = before.now, after.now
        self.newest = Admission(lo, hi, requests, tokens, limiter, reply.slot)
        self.log.append(self.newest)

    @rule()
    def give_back_the_newest(self) -> None:
        """Its caller gives it up before its turn, with the plain refund (right for the newest reservation only).

        (No precondition: whether there is one depends on real time, and Hypothesis needs the rules it may draw
        to be the same when it replays a case.)"""
        newest = self.newest
        if newest is None:
            return
        self.newest = None
        if newest.lo <= self.state().now + 0.01:
            return  # (nearly) due: its caller has gone
        self.log.remove(newest)
        shared = self.limiters[newest.limiter]
        self.portal.call(lambda: shared.refund(newest.requests, newest.tokens))

    @rule(pick=st.integers(0, 2**16))
    def cancel_a_waiter(self, pick: int) -> None:
        """A caller waiting for its turn, the newest or an older one, of either limiter, is cancelled: it gives its
        reservation back with its slot (what ``SharedRateLimiter`` does when a waiting caller is cancelled).
        (No precondition, as above.)"""
        if not self.log:
            return
        now = self.state().now
        waiting = [admission for admission in self.log if admission.slot != math.inf and admission.lo > now + 0.01]
        if not waiting:
            return  # none waited, or all are (nearly) due: their callers have gone
        admission = waiting[pick % len(waiting)]
        self.log.remove(admission)
        if admission is self.newest:
            self.newest = None
        store = self.stores[admission.limiter]
        name = self.limiters[admission.limiter].name
        req_cost, tok_cost = admission.requests * 60 / RPM, admission.tokens * 60 / TPM
        before = self.state()
        self.portal.call(lambda: store.refund(name, req_cost, tok_cost, BURST, admission.slot))
        after = self.state()
        # never a level lowered, never more given back than charged
        assert before.req_tat - req_cost - 1e-6 <= after.req_tat <= before.req_tat
        assert before.tok_tat - tok_cost - 1e-6 <= after.tok_tat <= before.tok_tat

    @rule(seconds=st.sampled_from([0.0, 0.005, 0.02, 0.05]))
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    @rule(limiter=st.integers(0, 1), seconds=st.sampled_from([0.0, 0.05, 0.2]))
    def pause(self, limiter: int, seconds: float) -> None:
        shared = self.limiters[limiter]
        before = self.state()
        self.portal.call(lambda: shared.pause(seconds))
        after = self.state()
        if seconds > 0.0:
            # on the server's clock: nobody goes before its end (a shorter pause inside a longer one changes
            # nothing), and both buckets are empty then
            assert before.now + seconds <= after.paused_until + 1e-6
            assert after.paused_until <= max(before.paused_until, after.now + seconds) + 1e-6
            assert min(after.req_tat, after.tok_tat) >= after.paused_until + BURST - 1e-6

    @rule(
        limiter=st.integers(0, 1),
        remaining_requests=st.sampled_from([None, 0.0, 2.0, 1e6]),
        remaining_tokens=st.sampled_from([None, 0.0, 20.0, 1e9]),
    )
    def observe(self, limiter: int, remaining_requests: float | None, remaining_tokens: float | None) -> None:
        shared = self.limiters[limiter]
        headers = RateLimitHeaders(remaining_requests=remaining_requests, remaining_tokens=remaining_tokens)
        before = self.state()
        self.portal.call(lambda: shared.observe(headers))
        after = self.state()
        # the schedule never moves earlier: a level is never raised
        assert after.req_tat >= before.req_tat
        assert after.tok_tat >= before.tok_tat
        if remaining_requests is not None and remaining_requests * 60 / RPM < BURST:
            # lowered to what the provider says is left: full again no sooner than that level allows
            assert after.req_tat >= before.now + BURST - remaining_requests * 60 / RPM - 1e-9

    def teardown(self) -> None:
        check_window_bound(self.log)


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    """redis.asyncio runs on asyncio: the machine's rules call into one asyncio loop in a portal thread."""
    with start_blocking_portal("asyncio") as portal:
        yield portal


@pytest.fixture
def backends(redis_flushed: str, portal: BlockingPortal) -> Iterator[list[RedisBackend]]:
    # fail_closed: a store failure must surface, never be hidden by the local fallback (which this test does
    # not record); a generous timeout, as this 2-core machine may be busy: the schedule is under test, not Redis
    made = [RedisBackend(redis_flushed, timeout=5.0, on_unavailable="fail_closed") for _ in range(2)]
    yield made
    for backend in made:
        portal.call(backend.aclose)


def test_shared_bucket_keeps_the_window_bound(portal: BlockingPortal, backends: list[RedisBackend]) -> None:
    run_state_machine_as_test(
        lambda: BucketMachine(portal, backends),  # type: ignore[arg-type]  # a factory is fine (see its docs)
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


class FrozenClock(ManualClock):
    """Virtual time that stands still: a sleep lasts until it is cancelled (a caller waiting for its turn);
    ``asleep`` (set by the test) is set when a caller starts sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.asleep: anyio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        if self.asleep is not None:
            self.asleep.set()
        await anyio.sleep_forever()


def test_cancelling_a_waiter_in_the_middle_keeps_the_window_bound(
    portal: BlockingPortal, backends: list[RedisBackend]
) -> None:
    store = RecordingStore(backends[0].bucket_store())
    name = f"middle:{uuid.uuid4().hex}"
    # 10 requests/s with a burst of 0.1 s: capacity 1 request, one slot every 0.1 s. `shared` never really
    # sleeps (its clock is virtual: what is checked is the schedule); `frozen`'s callers wait until cancelled.
    shared = SharedRateLimiter(store, name=name, rpm=600, burst_seconds=0.1, clock=ManualClock())
    frozen_clock = FrozenClock()
    frozen = SharedRateLimiter(store, name=name, rpm=600, burst_seconds=0.1, clock=frozen_clock)
    times: list[float] = []

    def admitted() -> float:
        assert store.last is not None
        reply, _, after = store.last
        return reply.now + reply.wait if reply.wait else after.now

    async def cancelled_while_waiting(then: float = 0.0) -> None:
        """A caller of `frozen` reserves and waits; once `shared` has reserved `then` more, it is cancelled."""
        scope = anyio.CancelScope()

        async def wait_for_turn() -> None:
            with scope:
                await frozen.acquire(1)

        asleep = frozen_clock.asleep = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(wait_for_turn)
            with anyio.fail_after(5):
                await asleep.wait()  # it has reserved and waits for its turn
            times.append(admitted())
            for _ in range(int(then)):
                await shared.acquire(1)
                times.append(admitted())
            scope.cancel()
        assert scope.cancelled_caught

    async def scenario() -> None:
        await shared.acquire(1)  # a goes now
        times.append(admitted())
        await cancelled_while_waiting(then=1)  # b waits for 0.1 s; c reserves 0.2 s; b is cancelled
        await shared.acquire(1)  # d
        times.append(admitted())
        await cancelled_while_waiting()  # e, the newest, is cancelled: its slot goes to f
        await shared.acquire(1)  # f
        times.append(admitted())

    portal.call(scenario)
    a, b, c, d, e, f = times
    assert b - a == pytest.approx(0.1, abs=0.01)
    assert c - b == pytest.approx(0.1, abs=0.01)
    # c and d must not go together: two requests within 0 s exceed the capacity of 1
    assert d >= c + 0.1 - 1e-6
    assert f == pytest.approx(e, abs=1e-6)  # the newest waiter gave its whole reservation back
