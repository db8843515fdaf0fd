"""Stateful property test of :class:`ragguard.RateLimiter` (RPM and TPM buckets) on virtual time.

Hypothesis drives random sequences of reservations (request and token costs, some larger than a bucket, budgets
from 0 to unlimited) through the non-waiting :meth:`RateLimiter.reserve` (or its handle-returning core, the
reservation a caller of :meth:`RateLimiter.acquire` holds while it waits), gives back the latest reservation
with :meth:`RateLimiter.refund` or any waiting one, newest or not, as a caller cancelled before its turn does,
advances a :class:`~ragguard.ManualClock`, and feeds the provider's
signals: ``x-ratelimit-*`` headers (:meth:`RateLimiter.observe`, remaining counts and advertised limits) and
shared Retry-After pauses (:meth:`RateLimiter.pause`). The reference model is the log of what was admitted
and when, plus what the module docstring of ``ragguard.guards.limiter`` promises:

* over any window of ``t`` seconds each bucket admits at most ``max(capacity, largest cost) + rate·t`` (the
  configured rate: the provider's headers only ever slow it down), checked over every pair of admissions;
* a returned wait is ``>= 0``, within the caller's budget, and no later than an upper bound on when the buckets
  can hold the call, kept by the model from the documented effects of each operation; a refusal is
  :class:`~ragguard.RateLimitTimeout` with a wait over the budget, and consumes nothing;
* headers never raise a level; the effective rate is ``min(configured, advertised)`` (``scope="model"``);
* a bucket left idle long enough admits any call at once, even one larger than the bucket (it goes when full).
"""

from __future__ import annotations

import math
import random
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ragguard import ManualClock, RateLimiter, RateLimitHeaders, RateLimitTimeout
from ragguard.guards.limiter import PAUSE_JITTER_FRACTION, PAUSE_JITTER_INTERVALS, _Reservation

#: one admission of the log: (time, requests, tokens)
Admission = tuple[float, float, float]

#: relative float slack of the bound checks (the schedule is float arithmetic on absolute times)
EPS = 1e-9


class Bucket:
    """One bucket of the model: its configured rate, and an upper bound on when it is full again."""

    def __init__(self, per_minute: float | None, burst: float) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self.advertised: float | None = None
        #: upper bound on the bucket's "full again" time (its GCRA theoretical arrival time)
        self.full_by = -math.inf

    @property
    def effective(self) -> float | None:
        if self.per_minute is None:
            return None
        if self.advertised is None:
            return self.per_minute
        return min(self.per_minute, self.advertised)

    def cost_s(self, units: float) -> float:
        """Seconds of refill ``units`` cost at the effective rate."""
        rate = self.effective
        return 0.0 if rate is None else units * 60.0 / rate

    @property
    def capacity(self) -> float:
        """The configured capacity, units (the bound of the window check)."""
        return math.inf if self.per_minute is None else self.per_minute / 60.0 * self.burst

    @property
    def holds(self) -> float:
        """What the bucket holds when full now, units (less while the provider's advertised limit is lower)."""
        rate = self.effective
        return math.inf if rate is None else rate / 60.0 * self.burst

    def ready_by(self, units: float) -> float:
        """Upper bound on when the bucket holds ``units`` (an oversize cost goes when the bucket is full)."""
        return self.full_by - self.burst + min(self.cost_s(units), self.burst)

    def charge(self, at: float, units: float) -> None:
        self.full_by = max(self.full_by, at) + self.cost_s(units)

    def slow_down(self, old_s: float, new_s: float, base: float) -> None:
        """The rate fell from ``1/old_s`` to ``1/new_s`` per second: the level (debt included) is kept in units,
        and the last ``burst`` seconds of admissions may be charged again at the new rate (documented replay)."""
        if new_s <= old_s or self.full_by <= base:
            return
        k = new_s / old_s
        behind = self.full_by - base
        kept = base + self.burst + (behind - self.burst) * k
        replayed = base - self.burst + (behind + self.burst) * k
        self.full_by = max(self.full_by, kept, replayed)


class LimiterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1_000.0)
        self.admitted: list[Admission] = []
        self.latest: Admission | None = None  # the newest reservation, while it may be refunded
        # reservations made through the handle-returning core, with their handles (what a waiting caller holds)
        self.waiting: list[tuple[Admission, _Reservation]] = []
        self.paused_until = -math.inf
        self.jitter_cap = 0.0

    @initialize(
        rpm=st.sampled_from([None, 60.0, 600.0, 6_000.0]),
        tpm=st.sampled_from([None, 600.0, 60_000.0]),
        burst=st.sampled_from([0.25, 0.5, 1.0, 3.0]),
        scope=st.sampled_from(["model", "credential"]),
        follow_headers=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(
        self, rpm: float | None, tpm: float | None, burst: float, scope: str, follow_headers: bool, seed: int
    ) -> None:
        self.burst = burst
        self.learns = follow_headers and scope == "model"
        self.req = Bucket(rpm, burst)
        self.tok = Bucket(tpm, burst)
        self.limiter = RateLimiter(
            rpm=rpm,
            tpm=tpm,
            burst_seconds=burst,
            scope=scope,  # type: ignore[arg-type]
            follow_headers=follow_headers,
            clock=self.clock,
            rng=random.Random(seed),
        )

    def levels(self) -> tuple[float, float]:
        return self.limiter.available_requests, self.limiter.available_tokens

    def wait_bound(self, requests: float, tokens: float) -> float:
        now = self.clock.now()
        at = max(now, self.req.ready_by(requests), self.tok.ready_by(tokens))
        if self.paused_until > at:
            at = self.paused_until + self.jitter_cap
        return at - now

    # --- reservations ---------------------------------------------------------------------------------------

    def _request(self, requests: float, tokens: float, budget: float, *, handle: bool = False) -> float | None:
        before = self.levels()
        bound = self.wait_bound(requests, tokens)
        refused: RateLimitTimeout | None = None
        reservation: _Reservation | None = None
        try:
            if handle:
                # what acquire() does before it sleeps (the limiter's own max_wait is unlimited here)
                reservation = self.limiter._reserve(requests, tokens, budget)
                wait = 0.0 if reservation is None else reservation.wait
            else:
                wait = self.limiter.reserve(requests, tokens, max_wait=budget)
        except RateLimitTimeout as exc:
            refused = exc
        if refused is not None:
            assert refused.wait > budget
            assert refused.wait > 0.0
            assert refused.wait <= bound * (1 + EPS) + 1e-6
            assert self.levels() == before  # a refusal consumes nothing
            return None
        assert 0.0 <= wait <= max(budget, 0.0)
        assert wait <= bound * (1 + EPS) + 1e-6, f"wait {wait} beyond the model's bound {bound}"
        at = self.clock.now() + wait
        self.req.charge(at, requests)
        self.tok.charge(at, tokens)
        admission = (at, requests, tokens)
        self.admitted.append(admission)
        self.latest = admission
        if reservation is not None:
            self.waiting.append((admission, reservation))
        return wait

    @rule(
        requests=st.sampled_from([0.0, 1.0, 1.0, 2.0, 5.0]),
        tokens=st.sampled_from([0.0, 1.0, 50.0, 500.0, 5_000.0, 50_000.0]),
        budget=st.sampled_from([0.0, 0.0, 0.5, 2.0, math.inf]),
        handle=st.booleans(),
    )
    def request(self, requests: float, tokens: float, budget: float, handle: bool) -> None:
        self._request(requests, tokens, budget, handle=handle)

    @rule(
        count=st.integers(2, 12),
        requests=st.sampled_from([0.5, 1.0, 1.0]),
        tokens=st.sampled_from([0.0, 10.0, 200.0]),
        budget=st.sampled_from([0.0, 1.0, math.inf]),
        handle=st.booleans(),
    )
    def crowd(self, count: int, requests: float, tokens: float, budget: float, handle: bool) -> None:
        """Many callers at the same instant (what fills a bucket to its bound)."""
        for _ in range(count):
            self._request(requests, tokens, budget, handle=handle)

    def _forget(self, admission: Admission) -> None:
        self.admitted.remove(admission)
        self.waiting = [(kept, handle) for kept, handle in self.waiting if kept is not admission]
        if self.latest is admission:
            self.latest = None

    @precondition(lambda self: self.latest is not None and self.latest[0] > self.clock.now())
    @rule()
    def refund_latest(self) -> None:
        """The newest caller gives its reservation back with the handle-less refund(), before its turn."""
        assert self.latest is not None
        _, requests, tokens = latest = self.latest
        self._forget(latest)
        self.limiter.refund(requests, tokens)

    @precondition(lambda self: any(admission[0] > self.clock.now() for admission, _ in self.waiting))
    @rule(pick=st.integers(0, 2**16))
    def cancel_a_waiter(self, pick: int) -> None:
        """A caller waiting for its turn, the newest or any older one, is cancelled and gives its reservation back
        (what acquire() does when cancelled while it sleeps)."""
        candidates = [(admission, handle) for admission, handle in self.waiting if admission[0] > self.clock.now()]
        admission, handle = candidates[pick % len(candidates)]
        before = self.levels()
        self._forget(admission)
        self.limiter._give_back(handle)
        after = self.levels()
        # never more than it charged, never a level lowered
        assert after[0] >= before[0]
        assert after[1] >= before[1]

    @rule(
        requests=st.sampled_from([1.0, 5.0, 100.0]),
        tokens=st.sampled_from([0.0, 500.0, 1_000_000.0]),
    )
    def idle_then_request(self, requests: float, tokens: float) -> None:
        """After a long idle time a call goes at once, whatever its size (an oversize one when full)."""
        drain = max(self.req.full_by, self.tok.full_by, self.paused_until + self.jitter_cap) - self.clock.now()
        self.clock.advance(max(drain, 0.0) + 1.0)
        assert self.levels() == pytest.approx((self.req.holds, self.tok.holds), rel=1e-9)
        assert self._request(requests, tokens, 0.0) == 0.0

    # --- time and the provider's signals -------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.sampled_from([0.0, 0.2, 1.0, 5.0]))
    def pause(self, seconds: float) -> None:
        """A shared Retry-After: nobody goes before its end, and the buckets restart empty then."""
        now = self.clock.now()
        until = now + seconds
        resume = max(self.paused_until, now)
        if until > resume:
            self.paused_until = until
            cap = PAUSE_JITTER_FRACTION * seconds
            if self.req.per_minute is not None:
                cap = min(cap, PAUSE_JITTER_INTERVALS * 60.0 / self.req.effective)  # type: ignore[operator]
            self.jitter_cap = cap
        for bucket in (self.req, self.tok):
            if bucket.per_minute is not None:
                # reservations already made move back by at most `seconds`; the bucket is empty at `until`
                bucket.full_by = max(bucket.full_by + seconds, until + self.burst)
        self.limiter.pause(seconds)
        assert self.limiter.paused_until == self.paused_until

    @rule(
        remaining_requests=st.sampled_from([None, 0.0, 1.0, 3.0, 1e6]),
        remaining_tokens=st.sampled_from([None, 0.0, 100.0, 1e9]),
        limit_requests=st.sampled_from([None, None, 30.0, 300.0, 60_000.0]),
        limit_tokens=st.sampled_from([None, None, 300.0, 6_000.0, 1e7]),
    )
    def observe(
        self,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        limit_requests: float | None,
        limit_tokens: float | None,
    ) -> None:
        now = self.clock.now()
        base = max(now, self.paused_until)
        if self.learns:
            for bucket, limit in ((self.req, limit_requests), (self.tok, limit_tokens)):
                if bucket.per_minute is not None and limit is not None:
                    old_s = bucket.cost_s(1.0)
                    bucket.advertised = limit
                    bucket.slow_down(old_s, bucket.cost_s(1.0), base)
        for bucket in (self.req, self.tok):
            if bucket.per_minute is not None:
                bucket.full_by = max(bucket.full_by, now + self.burst)  # a level lowered to >= 0
        before = self.levels()
        rates_before = (self.limiter.effective_rpm, self.limiter.effective_tpm)
        self.limiter.observe(
            RateLimitHeaders(
                remaining_requests=remaining_requests,
                remaining_tokens=remaining_tokens,
                limit_requests=limit_requests,
                limit_tokens=limit_tokens,
            )
        )
        after = self.levels()
        rates_after = (self.limiter.effective_rpm, self.limiter.effective_tpm)
        # Never raised. The level compared is the one at the end of any pause (what a slower rate keeps, in
        # units); a faster rate keeps the schedule's times, so then it is compared in seconds of refill (a full
        # bucket holds more units at a faster rate).
        ahead = base - now
        for level_before, level_after, rate_before, rate_after in zip(
            before, after, rates_before, rates_after, strict=True
        ):
            if rate_before is None or rate_after is None:
                continue
            level_before = min(self.burst * rate_before / 60, level_before + ahead * rate_before / 60)
            level_after = min(self.burst * rate_after / 60, level_after + ahead * rate_after / 60)
            if rate_after > rate_before:
                level_before, level_after = level_before / rate_before, level_after / rate_after
            assert level_after <= level_before + 1e-9 * max(1.0, abs(level_before))
        if remaining_requests is not None and self.req.per_minute is not None:
            assert after[0] <= max(remaining_requests, 0.0) + 1e-6 * max(1.0, remaining_requests)
        if remaining_tokens is not None and self.tok.per_minute is not None:
            assert after[1] <= max(remaining_tokens, 0.0) + 1e-6 * max(1.0, remaining_tokens)

    # --- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def rates_follow_the_headers(self) -> None:
        if not hasattr(self, "limiter"):
            return
        assert self.limiter.effective_rpm == self.req.effective
        assert self.limiter.effective_tpm == self.tok.effective

    def teardown(self) -> None:
        if not hasattr(self, "limiter"):
            return
        log = sorted(self.admitted)
        for index, bucket in ((1, self.req), (2, self.tok)):
            if bucket.per_minute is None:
                continue
            rate = bucket.per_minute / 60.0  # the configured rate: headers only ever slow the limiter
            for i in range(len(log)):
                total = 0.0
                largest = 0.0
                for j in range(i, len(log)):
                    total += log[j][index]
                    largest = max(largest, log[j][index])
                    span = log[j][0] - log[i][0]
                    bound = max(bucket.capacity, largest) + rate * span
                    assert total <= bound * (1 + 1e-7) + 1e-6, (
                        f"{'requests' if index == 1 else 'tokens'}: {total} admitted in {span} s "
                        f"from {log[i][0]}, bound {bound}"
                    )


LimiterMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_limiter_keeps_the_window_bound = LimiterMachine.TestCase


# --- giving back a reservation that is not the newest --------------------------------------------------------


class FrozenClock(ManualClock):
    """Virtual time that stands still: a sleep lasts until it is cancelled (a caller waiting for its turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleepers = 0

    async def sleep(self, seconds: float) -> None:
        self.sleepers += 1
        try:
            await anyio.sleep_forever()
        finally:
            self.sleepers -= 1


@pytest.mark.anyio
async def test_cancelling_a_waiter_in_the_middle_keeps_the_window_bound() -> None:
    clock = FrozenClock()
    limiter = RateLimiter(rpm=60, burst_seconds=1.0, clock=clock)  # 1 request/s, capacity 1

    async def wait_for_turn(scope: anyio.CancelScope) -> None:
        with scope:
            await limiter.acquire(1)

    a = limiter.reserve(1)  # goes now
    b_scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(wait_for_turn, b_scope)  # b reserves t=1 and sleeps until then
        await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 1
        c = limiter.reserve(1)  # waits 2 s
        assert (a, c) == (0.0, 2.0)
        b_scope.cancel()  # b is cancelled while waiting: it gives back what c does not depend on
    assert b_scope.cancelled_caught
    d = limiter.reserve(1)
    # c and d must not go together: two requests in a window of 0 s exceed the capacity of 1
    assert d >= c + 1.0
    assert d == 3.0  # and b's slot is not lost either: d goes right after c

    # the newest waiter cancelled gives its whole reservation back: the next caller takes its slot
    e_scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(wait_for_turn, e_scope)  # e reserves t=4
        await anyio.wait_all_tasks_blocked()
        e_scope.cancel()
    assert limiter.reserve(1) == 4.0


@pytest.mark.parametrize(
    ("settings", "first", "waiter", "later", "min_gap"),
    [
        # an oversize waiter (5 requests, capacity 1) goes when full at t=1 and leaves debt; a later caller at t=6
        pytest.param({"rpm": 60, "burst_seconds": 1.0}, (1, 0), (5, 0), (1, 0), 1.0, id="oversize-waiter"),
        # 10 tokens/s, capacity 2.5: the later caller at t=50.1 is charged from its own time (the unlimited
        # requests bucket keeps it behind the waiter), not on top of the waiter's cost
        pytest.param(
            {"tpm": 600, "burst_seconds": 0.25, "follow_headers": False}, (0, 1), (0, 500), (0, 50), 5.0, id="reset"
        ),
    ],
)
@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_back_nothing_a_later_caller_depends_on(
    settings: dict[str, Any],
    first: tuple[float, float],
    waiter: tuple[float, float],
    later: tuple[float, float],
    min_gap: float,
) -> None:
    """Cases where measuring the later reservations by how far they pushed ``tat`` gives back too much (the
    newcomer then shares the later caller's slot); found by the machine above."""
    limiter = RateLimiter(clock=FrozenClock(), **settings)
    assert limiter.reserve(*first) == 0.0
    scope = anyio.CancelScope()

    async def wait_for_turn() -> None:
        with scope:
            await limiter.acquire(*waiter)

    async with anyio.create_task_group() as group:
        group.start_soon(wait_for_turn)
        await anyio.wait_all_tasks_blocked()
        at = limiter.reserve(*later)
        scope.cancel()
    newcomer = limiter.reserve(*later)
    # two such calls closer than min_gap exceed max(capacity, largest cost) + rate·t
    assert newcomer >= at + min_gap - 1e-9
