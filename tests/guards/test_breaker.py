from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
import pydantic
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ragguard import (
    BreakerPolicy,
    BreakerState,
    BulkheadFull,
    CallContext,
    CircuitBreaker,
    CircuitOpenError,
    ManualClock,
    Outcome,
    RetryExhausted,
)
from ragguard.guards.breaker import BreakerPermit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class HTTPError(Exception):
    """An exception shaped like an SDK's status error (``exc.status_code``)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


async def ok() -> str:
    return "ok"


def raiser(exc: BaseException) -> Callable[[], Any]:
    async def fail() -> None:
        raise exc

    return fail


async def fail_with(breaker: CircuitBreaker, exc: BaseException, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(type(exc)):
            await breaker.call(raiser(exc))


# --- closed → open ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker("t", failure_threshold=3, min_calls=20, clock=ManualClock())
    await fail_with(breaker, HTTPError(503), 2)
    assert await breaker.call(ok) == "ok"  # a success breaks the run
    await fail_with(breaker, HTTPError(503), 2)
    assert breaker.state is CLOSED
    await fail_with(breaker, HTTPError(503))
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)


@pytest.mark.anyio
async def test_opens_on_failure_rate_once_min_calls_reached() -> None:
    breaker = CircuitBreaker("t", failure_threshold=100, failure_rate=0.5, window=4, min_calls=4, clock=ManualClock())
    await fail_with(breaker, HTTPError(500), 1)
    assert await breaker.call(ok) == "ok"
    await fail_with(breaker, HTTPError(500), 1)
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures, snap.state) == (
        3,
        2,
        CLOSED,
    )  # 2/3 failed, but only 3 < min_calls calls
    assert await breaker.call(ok) == "ok"  # 2/4 = 0.5 >= 0.5: opens (checked after every call, as resilience4j)
    assert breaker.state is OPEN
    assert breaker.snapshot().failure_rate == 0.5


@pytest.mark.anyio
async def test_window_slides_old_failures_out() -> None:
    breaker = CircuitBreaker("t", failure_threshold=100, failure_rate=0.5, window=4, min_calls=4, clock=ManualClock())
    await fail_with(breaker, HTTPError(500), 1)
    for _ in range(6):
        assert await breaker.call(ok) == "ok"
    await fail_with(breaker, HTTPError(500), 1)  # window: S S S F — the first failure slid out
    snap = breaker.snapshot()
    assert (snap.calls, snap.failures, snap.state) == (4, 1, CLOSED)


@pytest.mark.anyio
async def test_client_errors_never_open_and_count_as_successes() -> None:
    breaker = CircuitBreaker("t", failure_threshold=2, window=4, min_calls=2, clock=ManualClock())
    await fail_with(breaker, HTTPError(400), 10)
    await fail_with(breaker, HTTPError(404), 3)
    snap = breaker.snapshot()
    assert snap.state is CLOSED
    assert (snap.calls, snap.failures, snap.consecutive_failures) == (4, 0, 0)


@pytest.mark.anyio
async def test_rate_limits_do_not_open_unless_counted() -> None:
    lenient = CircuitBreaker("t", failure_threshold=2, clock=ManualClock())
    await fail_with(lenient, HTTPError(429), 5)
    assert lenient.state is CLOSED

    strict = CircuitBreaker("t", failure_threshold=2, count_rate_limits=True, clock=ManualClock())
    await fail_with(strict, HTTPError(429), 2)
    assert strict.state is OPEN


@pytest.mark.anyio
async def test_is_failure_overrides_the_classifier() -> None:
    seen: list[Outcome] = []

    def only_value_errors(exc: BaseException, outcome: Outcome) -> bool:
        seen.append(outcome)
        return isinstance(exc, ValueError)

    breaker = CircuitBreaker("t", failure_threshold=2, is_failure=only_value_errors, clock=ManualClock())
    await fail_with(breaker, HTTPError(503), 3)  # a failure by default, not for this predicate
    assert breaker.state is CLOSED
    await fail_with(breaker, ValueError("bad"), 2)
    assert breaker.state is OPEN
    assert seen[0].status == 503


@pytest.mark.anyio
async def test_retry_exhausted_is_judged_by_its_last_error() -> None:
    breaker = CircuitBreaker("t", failure_threshold=2, clock=ManualClock())
    await fail_with(breaker, RetryExhausted("gave up", attempts=3, last_error=HTTPError(400)), 3)
    assert breaker.state is CLOSED
    await fail_with(breaker, RetryExhausted("gave up", attempts=3, last_error=HTTPError(503)), 2)
    assert breaker.state is OPEN


@pytest.mark.anyio
async def test_other_guards_refusals_are_ignored() -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, window=4, min_calls=1, clock=ManualClock())
    await fail_with(breaker, BulkheadFull("full"), 3)
    snap = breaker.snapshot()
    assert (snap.state, snap.calls) == (CLOSED, 0)


@pytest.mark.anyio
async def test_a_broken_classifier_counts_as_failure_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(exc: BaseException) -> Outcome:
        raise RuntimeError("classifier bug")

    breaker = CircuitBreaker("t", failure_threshold=1, clock=ManualClock())
    ctx = CallContext(clock=breaker.clock, classify=broken)
    with caplog.at_level(logging.ERROR, logger="ragguard"), pytest.raises(HTTPError):
        await breaker.run(raiser(HTTPError(400)), ctx)
    assert breaker.state is OPEN
    assert "judging" in caplog.text


# --- open -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_open_error_says_when_the_next_probe_is() -> None:
    clock = ManualClock(100.0)
    breaker = CircuitBreaker("search", failure_threshold=1, open_duration=30.0, clock=clock)
    await fail_with(breaker, HTTPError(503))
    clock.advance(12.0)
    called = False

    async def must_not_run() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(must_not_run)
    assert not called
    assert info.value.name == "search"
    assert info.value.retry_at == 130.0
    assert info.value.retry_after == pytest.approx(18.0)
    assert breaker.snapshot().retry_at == 130.0
    clock.advance(18.0)
    assert breaker.state is HALF_OPEN


# --- half-open --------------------------------------------------------------------------------------------


async def tripped(probes: int = 1, max_wait: float = 60.0) -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "t",
        failure_threshold=1,
        open_duration=10.0,
        half_open_probes=probes,
        half_open_max_wait=max_wait,
        clock=clock,
    )
    await fail_with(breaker, HTTPError(503))
    clock.advance(10.0)
    return breaker, clock


@pytest.mark.anyio
@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_admits_exactly_n_concurrent_probes(probes: int) -> None:
    breaker, _ = await tripped(probes)
    gate = anyio.Event()
    running = 0

    async def probe() -> str:
        nonlocal running
        running += 1
        await gate.wait()
        return "ok"

    async with anyio.create_task_group() as tg:
        for _ in range(probes):
            tg.start_soon(breaker.call, probe)
        await wait_all_tasks_blocked()
        assert running == probes
        assert breaker.snapshot().probes == probes
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(probe)
        assert info.value.retry_at == 10.0 + 60.0  # the first lease's expiry
        assert breaker.state is HALF_OPEN
        gate.set()
    assert running == probes
    assert breaker.state is CLOSED
    assert breaker.snapshot().calls == 0  # closing starts a fresh window


@pytest.mark.anyio
async def test_a_probe_failure_reopens() -> None:
    breaker, clock = await tripped(probes=2)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is HALF_OPEN  # one of two probes succeeded
    await fail_with(breaker, HTTPError(503))
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_at == clock.now() + 10.0


@pytest.mark.anyio
async def test_stuck_probe_lease_expires_after_half_open_max_wait() -> None:
    breaker, clock = await tripped(probes=1, max_wait=5.0)
    release = anyio.Event()

    async def stuck() -> None:
        await release.wait()
        raise HTTPError(503)

    async def stuck_probe() -> None:
        with pytest.raises(HTTPError):
            await breaker.call(stuck)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stuck_probe)
        await wait_all_tasks_blocked()
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        clock.advance(4.9)
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        clock.advance(0.1)
        assert breaker.snapshot().probes == 0  # the lease expired (resilience4j#903)
        assert await breaker.call(ok) == "ok"
        assert breaker.state is CLOSED
        release.set()
    # the stuck probe's late failure no longer counts
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_cancelled_probe_releases_its_lease() -> None:
    breaker, _ = await tripped(probes=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, anyio.sleep_forever)
        await wait_all_tasks_blocked()
        assert breaker.snapshot().probes == 1
        tg.cancel_scope.cancel()
    snap = breaker.snapshot()
    assert (snap.state, snap.probes) == (HALF_OPEN, 0)
    assert await breaker.call(ok) == "ok"  # the freed lease admits the next probe
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_cancellation_in_closed_state_is_not_recorded() -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, clock=ManualClock())
    with anyio.move_on_after(0):
        await breaker.call(anyio.sleep_forever)
    assert breaker.snapshot().calls == 0


@pytest.mark.anyio
async def test_guard_refusal_during_probe_releases_the_lease() -> None:
    breaker, _ = await tripped(probes=1)
    await fail_with(breaker, BulkheadFull("full"))
    snap = breaker.snapshot()
    assert (snap.state, snap.probes) == (HALF_OPEN, 0)


# --- control, events, config ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_transition_is_announced() -> None:
    events: list[tuple[str, BreakerState, BreakerState]] = []
    clock = ManualClock()
    breaker = CircuitBreaker(
        "ev", failure_threshold=1, open_duration=5.0, clock=clock, on_state_change=lambda *e: events.append(e)
    )
    await fail_with(breaker, HTTPError(503))
    clock.advance(5.0)
    assert await breaker.call(ok) == "ok"
    breaker.force_open()
    breaker.reset()
    assert events == [
        ("ev", CLOSED, OPEN),
        ("ev", OPEN, HALF_OPEN),
        ("ev", HALF_OPEN, CLOSED),
        ("ev", CLOSED, OPEN),
        ("ev", OPEN, CLOSED),
    ]


@pytest.mark.anyio
async def test_a_failing_hook_is_logged_and_never_breaks_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def hook(name: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("hook bug")

    breaker = CircuitBreaker("t", failure_threshold=1, clock=ManualClock(), on_state_change=hook)
    with caplog.at_level(logging.ERROR, logger="ragguard"):
        await fail_with(breaker, HTTPError(503))  # the provider's error, not the hook's
    assert breaker.state is OPEN
    assert "on_state_change" in caplog.text


@pytest.mark.anyio
async def test_force_open_until_reset() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("t", clock=clock)
    breaker.force_open()
    clock.advance(1e9)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after == math.inf
    breaker.reset()
    assert await breaker.call(ok) == "ok"
    breaker.force_open(2.0)
    clock.advance(2.0)
    assert breaker.state is HALF_OPEN
    with pytest.raises(ValueError, match="duration"):
        breaker.force_open(-1.0)


@pytest.mark.anyio
async def test_results_of_calls_admitted_before_a_transition_are_ignored() -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, window=4, min_calls=4, clock=ManualClock())
    gate = anyio.Event()

    async def slow_success() -> str:
        await gate.wait()
        return "ok"

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, slow_success)
        await wait_all_tasks_blocked()
        breaker.reset()
        gate.set()
    assert breaker.snapshot().calls == 0


@pytest.mark.anyio
async def test_disabled_is_a_pass_through() -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, enabled=False, clock=ManualClock())
    await fail_with(breaker, HTTPError(503), 3)
    assert await breaker.call(ok) == "ok"
    assert not breaker.enabled
    assert breaker.snapshot().calls == 0
    permit = breaker.acquire()
    permit.record_failure()
    assert breaker.state is CLOSED


@pytest.mark.anyio
async def test_closed_path_never_checkpoints() -> None:
    breaker = CircuitBreaker("t", clock=ManualClock())
    with anyio.CancelScope() as scope:
        scope.cancel()
        # a checkpoint anywhere in the guard would raise the pending cancellation here
        assert await breaker.call(ok) == "ok"
    assert breaker.snapshot().calls == 1


def test_settings_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="min_calls"):
        CircuitBreaker(window=5, min_calls=10)
    with pytest.raises(pydantic.ValidationError, match="failure_rate"):
        CircuitBreaker(failure_rate=0)
    with pytest.raises(pydantic.ValidationError, match="open_duration"):
        CircuitBreaker(open_duration=-1)


def test_from_policy_and_repr() -> None:
    policy = BreakerPolicy(failure_threshold=2, window=8, min_calls=4, count_rate_limits=True)
    breaker = CircuitBreaker.from_policy(policy, name="pc")
    assert breaker.policy == policy
    assert breaker.name == "pc"
    assert breaker.stage == "breaker"
    assert "pc" in repr(breaker)
    assert "closed" in repr(breaker.snapshot())
    assert str(BreakerState.HALF_OPEN) == "half_open"


def test_a_permit_reports_only_once() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("t", failure_threshold=2, clock=clock)
    permit = breaker.acquire()
    assert not permit.is_probe
    permit.record_failure()
    permit.record_failure()
    assert breaker.snapshot().consecutive_failures == 1


@pytest.mark.anyio
async def test_late_report_of_an_expired_lease_is_ignored() -> None:
    breaker, clock = await tripped(probes=1, max_wait=5.0)
    permit = breaker.acquire()
    assert permit.is_probe
    clock.advance(5.0)
    permit.record_success()  # too late: the lease expired, unseen, before the report
    assert breaker.state is HALF_OPEN
    late_failure = breaker.acquire()
    clock.advance(5.0)
    late_failure.record_failure()
    assert breaker.state is HALF_OPEN


# --- property: the breaker against a reference model ------------------------------------------------------


class ModelBreaker:
    """A deliberately naive breaker: lists instead of a ring buffer, linear scans, no lock."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.state = CLOSED
        self.window: list[bool] = []
        self.consecutive = 0
        self.retry_at = math.inf
        self.epoch = 0
        self.leases: dict[int, float] = {}
        self.successes = 0

    def enter(self, state: BreakerState, now: float, open_for: float = 0.0) -> None:
        self.state = state
        self.epoch += 1
        self.leases = {}
        self.successes = 0
        self.retry_at = now + open_for if state is OPEN else math.inf
        if state is CLOSED:
            self.window = []
            self.consecutive = 0

    def tick(self, now: float) -> None:
        if self.state is OPEN and now >= self.retry_at:
            self.enter(HALF_OPEN, now)
        self.leases = {k: v for k, v in self.leases.items() if now < v}

    def admit(self, now: float, key: int) -> float | None:
        """Admit (None) or refuse, returning the retry_at the error must carry."""
        self.tick(now)
        if self.state is OPEN:
            return self.retry_at
        if self.state is HALF_OPEN:
            if self.successes + len(self.leases) >= self.cfg["half_open_probes"]:
                return min(self.leases.values())
            self.leases[key] = now + self.cfg["half_open_max_wait"]
        return None

    def report(self, now: float, epoch: int, key: int, verdict: str) -> None:
        if epoch != self.epoch:
            return
        if self.state is CLOSED:
            if verdict == "ignore":
                return
            failed = verdict == "failure"
            self.window = [*self.window, failed][-self.cfg["window"] :]
            self.consecutive = self.consecutive + 1 if failed else 0
            calls, failures = len(self.window), sum(self.window)
            if self.consecutive >= self.cfg["failure_threshold"] or (
                calls >= self.cfg["min_calls"] and failures / calls >= self.cfg["failure_rate"]
            ):
                self.enter(OPEN, now, self.cfg["open_duration"])
        elif self.state is HALF_OPEN:
            expiry = self.leases.pop(key, None)
            if expiry is None or now >= expiry or verdict == "ignore":
                return
            if verdict == "failure":
                self.enter(OPEN, now, self.cfg["open_duration"])
            else:
                self.successes += 1
                if self.successes >= self.cfg["half_open_probes"]:
                    self.enter(CLOSED, now)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.held: list[tuple[BreakerPermit, int, int]] = []  # (permit, model epoch, model key)
        self.keys = 0

    @initialize(
        threshold=st.integers(1, 8),
        window=st.integers(1, 6),
        data=st.data(),
        rate=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        probes=st.integers(1, 3),
        max_wait=st.sampled_from([3.0, 20.0]),
    )
    def setup(
        self, threshold: int, window: int, data: st.DataObject, rate: float, probes: int, max_wait: float
    ) -> None:
        cfg: dict[str, Any] = {
            "failure_threshold": threshold,
            "window": window,
            "min_calls": data.draw(st.integers(1, window)),
            "failure_rate": rate,
            "open_duration": 10.0,
            "half_open_probes": probes,
            "half_open_max_wait": max_wait,
        }
        self.model = ModelBreaker(cfg)
        self.breaker = CircuitBreaker("m", clock=self.clock, **cfg)

    @rule()
    def acquire(self) -> None:
        self.keys += 1
        expected = self.model.admit(self.clock.now(), self.keys)
        if expected is None:
            self.held.append((self.breaker.acquire(), self.model.epoch, self.keys))
        else:
            with pytest.raises(CircuitOpenError) as info:
                self.breaker.acquire()
            assert info.value.retry_at == expected
            assert info.value.retry_after == max(0.0, expected - self.clock.now())

    @rule(verdict=st.sampled_from(["success", "failure", "ignore"]))
    def call(self, verdict: str) -> None:
        """A call admitted and reported at once (the common, sequential case)."""
        self.acquire()
        if self.held and self.held[-1][2] == self.keys:
            self.report_one(len(self.held) - 1, verdict)

    @precondition(lambda self: bool(self.held))
    @rule(
        data=st.data(),
        verdict=st.sampled_from(["success", "failure", "ignore"]),
        after=st.sampled_from([0.0, 0.0, 3.0, 20.0]),
    )
    def report(self, data: st.DataObject, verdict: str, after: float) -> None:
        # time may pass between the last look at the breaker and the report (a lease may expire unseen)
        self.clock.advance(after)
        self.report_one(data.draw(st.integers(0, len(self.held) - 1)), verdict)

    def report_one(self, index: int, verdict: str) -> None:
        permit, epoch, key = self.held.pop(index)
        self.model.tick(self.clock.now())
        self.model.report(self.clock.now(), epoch, key, verdict)
        {"success": permit.record_success, "failure": permit.record_failure, "ignore": permit.release}[verdict]()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reset(self) -> None:
        self.model.enter(CLOSED, self.clock.now())
        self.breaker.reset()

    @invariant()
    def agrees_with_model(self) -> None:
        now = self.clock.now()
        self.model.tick(now)
        snap = self.breaker.snapshot()
        assert snap.state is self.model.state
        if snap.state is CLOSED:
            assert snap.calls == len(self.model.window)
            assert snap.failures == sum(self.model.window)
            assert snap.consecutive_failures == self.model.consecutive
        if snap.state is HALF_OPEN:
            assert snap.probes == len(self.model.leases)
        assert self.breaker.state is self.model.state


BreakerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_breaker_matches_reference_model = BreakerMachine.TestCase
