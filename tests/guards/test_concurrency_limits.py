"""Adaptive concurrency: the limit algorithms as pure objects (AIMD, Gradient2), and the bulkhead enforcing them.

The property test drives an adaptive :class:`ConcurrencyLimit` with a scripted algorithm (the limit jumps up and
down at every sample) through random starts, finishes (success, drop, ignored) and cancellations, and checks
after every step, once every task is blocked, that ``in_flight`` is exactly the number of calls running, that
no slot is idle while a caller waits, that ``in_flight`` only grows up to the current limit, and that nothing is
left at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ragguard import CallContext, ConcurrencyLimit, ConcurrencyPolicy, ManualClock, Policy
from ragguard.config import AdaptiveConcurrencyPolicy
from ragguard.guards.concurrency_limits import AIMDLimit, GradientLimit, LimitAlgorithm, limit_from_policy


class HTTPError(Exception):
    """An exception shaped like an SDK's status error (``exc.status_code``)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


async def ok() -> str:
    return "ok"


# ---------------------------------------------------------------- AIMD


def test_aimd_grows_by_one_per_success_while_the_limit_is_used() -> None:
    aimd = AIMDLimit(min_limit=1, max_limit=100, initial_limit=10)
    for i in range(5):
        aimd.on_sample(float(i), 0.1, in_flight=5, dropped=False)  # 5·2 >= limit: in use
    assert aimd.limit == 11  # 10 → 11, then 11 > 2·5: no longer "in use"
    aimd.on_sample(10.0, 0.1, in_flight=11, dropped=False)
    assert aimd.limit == 12


def test_aimd_does_not_grow_while_idle() -> None:
    aimd = AIMDLimit(initial_limit=20, max_limit=100)
    for i in range(50):
        aimd.on_sample(float(i), 0.1, in_flight=3, dropped=False)
    assert aimd.limit == 20


def test_aimd_shrinks_multiplicatively_on_a_drop() -> None:
    aimd = AIMDLimit(initial_limit=50, max_limit=100, backoff_ratio=0.9)
    aimd.on_sample(0.0, 0.1, in_flight=50, dropped=True)
    assert aimd.limit == 45  # ⌊50 · 0.9⌋
    aimd.on_sample(1.0, 0.1, in_flight=45, dropped=True)  # started after the decrease: a new round
    assert aimd.limit == 40


def test_aimd_decreases_once_per_round() -> None:
    aimd = AIMDLimit(initial_limit=40, max_limit=100, backoff_ratio=0.5)
    # a burst of drops of calls admitted together (start 0.0), reported at 0.5: one decrease
    for _ in range(10):
        aimd.on_sample(0.0, 0.5, in_flight=40, dropped=True)
    assert aimd.limit == 20
    # a call admitted after that decrease was seen decreases again
    aimd.on_sample(0.6, 0.1, in_flight=20, dropped=True)
    assert aimd.limit == 10


def test_aimd_stays_within_bounds() -> None:
    aimd = AIMDLimit(min_limit=3, max_limit=5, initial_limit=4, backoff_ratio=0.5)
    for i in range(20):
        aimd.on_sample(float(i), 0.1, in_flight=5, dropped=False)
    assert aimd.limit == 5
    for i in range(20):
        aimd.on_sample(100.0 + i, 0.1, in_flight=5, dropped=True)
    assert aimd.limit == 3


def test_aimd_counts_a_sample_slower_than_its_timeout_as_a_drop() -> None:
    aimd = AIMDLimit(initial_limit=10, max_limit=20, timeout=1.0)
    aimd.on_sample(0.0, 2.0, in_flight=10, dropped=False)
    assert aimd.limit == 9


def assert_names(error: pydantic.ValidationError, field_name: str) -> None:
    assert (field_name,) in [e["loc"] for e in error.errors()], error


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 5, "max_limit": 4, "initial_limit": 4}, "max_limit"),
        ({"initial_limit": 300}, "initial_limit"),
        ({"backoff_ratio": 1.0}, "backoff_ratio"),
        ({"backoff_ratio": 0.4}, "backoff_ratio"),
        ({"timeout": 0.0}, "timeout_s"),  # AdaptiveConcurrencyPolicy's name for it
        ({"timeout": float("nan")}, "timeout_s"),
        ({"max_limit": 2.5}, "max_limit"),
    ],
)
def test_aimd_rejects_bad_settings_naming_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        AIMDLimit(**kwargs)
    assert_names(info.value, field_name)


# ---------------------------------------------------------------- Gradient2


def test_gradient_grows_by_its_queue_allowance_while_latency_is_steady() -> None:
    gradient = GradientLimit(initial_limit=20, max_limit=1000, smoothing=0.2, queue_size=4)
    gradient.on_sample(0.0, 0.1, in_flight=20, dropped=False)
    # gradient 1 (steady): 20·0.8 + (20 + 4)·0.2 = 20.8
    assert gradient.limit == 20
    for i in range(50):
        gradient.on_sample(float(i), 0.1, in_flight=gradient.limit, dropped=False)
    assert gradient.limit == pytest.approx(20 + 0.8 * 51, abs=1)


def test_gradient_shrinks_when_latency_inflates() -> None:
    gradient = GradientLimit(initial_limit=100, max_limit=1000, smoothing=0.2, queue_size=4, long_window=600)
    for i in range(20):
        gradient.on_sample(float(i), 0.1, in_flight=100, dropped=False)
    steady = gradient.limit
    assert steady >= 100
    # queueing at the provider: latency triples against a long average near 0.1 s
    for i in range(10):
        gradient.on_sample(100.0 + i, 0.3, in_flight=gradient.limit, dropped=False)
    assert gradient.limit < steady * 0.8
    assert gradient.long_rtt < 0.3  # the long average moved only a little


def test_gradient_never_more_than_halves_per_sample() -> None:
    gradient = GradientLimit(initial_limit=100, max_limit=1000, smoothing=1.0, queue_size=0)
    for i in range(20):
        gradient.on_sample(float(i), 0.01, in_flight=100, dropped=False)
    gradient.on_sample(50.0, 100.0, in_flight=100, dropped=False)  # an absurd outlier
    assert gradient.limit == 50


def test_gradient_holds_still_while_app_limited() -> None:
    gradient = GradientLimit(initial_limit=40, max_limit=1000)
    for i in range(30):
        gradient.on_sample(float(i), 0.1 if i < 10 else 1.0, in_flight=5, dropped=False)
    assert gradient.limit == 40


def test_gradient_decays_its_long_average_after_an_overload() -> None:
    gradient = GradientLimit(initial_limit=10, max_limit=100, long_window=1000)
    for i in range(10):
        gradient.on_sample(float(i), 1.0, in_flight=10, dropped=False)  # a slow period
    assert gradient.long_rtt == pytest.approx(1.0)
    for i in range(30):
        gradient.on_sample(20.0 + i, 0.1, in_flight=10, dropped=False)  # back to normal
    # an average over 1000 samples alone would still be ≈ 0.95; the 5 % decay per sample brings it down
    assert gradient.long_rtt < 0.5


def test_gradient_backs_off_on_a_drop_and_stays_within_bounds() -> None:
    gradient = GradientLimit(min_limit=4, initial_limit=40, max_limit=50, backoff_ratio=0.5)
    gradient.on_sample(0.0, 0.1, in_flight=40, dropped=True)
    assert gradient.limit == 20
    for i in range(20):
        gradient.on_sample(10.0 + i, 0.1, in_flight=50, dropped=True)
    assert gradient.limit == 4
    for i in range(500):
        gradient.on_sample(100.0 + i, 0.1, in_flight=50, dropped=False)
    assert gradient.limit == 50


@pytest.mark.parametrize(
    "kwargs",
    [
        {"smoothing": 0.0},
        {"rtt_tolerance": 0.9},
        {"rtt_tolerance": float("nan")},
        {"queue_size": -1},
        {"long_window": 0},
        {"backoff_ratio": 1.0},
        {"initial_limit": 201},
    ],
)
def test_gradient_rejects_bad_settings_naming_the_field(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        GradientLimit(**kwargs)
    assert_names(info.value, next(iter(kwargs)))


def test_the_algorithms_need_explicit_bounds() -> None:
    """The policy may leave max_limit and initial_limit to the bulkhead (None); an algorithm may not."""
    with pytest.raises(TypeError, match="max_limit"):
        AIMDLimit(max_limit=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initial_limit"):
        GradientLimit(initial_limit=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("section", "field_name"),
    [
        ({"algorithm": "vegas"}, "algorithm"),
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 5, "max_limit": 4}, "max_limit"),
        ({"max_limit": 10, "initial_limit": 11}, "initial_limit"),
        ({"backoff_ratio": 1.0}, "backoff_ratio"),
        ({"smoothing": 0}, "smoothing"),
    ],
)
def test_adaptive_policy_names_the_invalid_field(section: dict[str, Any], field_name: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field_name):
        AdaptiveConcurrencyPolicy(**section)


def test_adaptive_limits_may_not_exceed_max_in_flight() -> None:
    with pytest.raises(pydantic.ValidationError, match="adaptive"):
        ConcurrencyPolicy(max_in_flight=8, adaptive={"max_limit": 9})  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="adaptive"):
        Policy(concurrency={"max_in_flight": 8, "adaptive": {"min_limit": 9}})  # type: ignore[arg-type]


def test_the_policy_picks_the_algorithm_and_its_bounds() -> None:
    aimd = limit_from_policy(AdaptiveConcurrencyPolicy(), max_in_flight=32)
    assert isinstance(aimd, AIMDLimit)
    assert (aimd.min_limit, aimd.max_limit, aimd.limit) == (1, 32, 32)
    gradient = limit_from_policy(
        AdaptiveConcurrencyPolicy(algorithm="gradient", min_limit=2, max_limit=16, initial_limit=4), max_in_flight=32
    )
    assert isinstance(gradient, GradientLimit)
    assert (gradient.min_limit, gradient.max_limit, gradient.limit) == (2, 16, 4)


def test_from_policy_builds_an_adaptive_bulkhead() -> None:
    section = ConcurrencyPolicy(max_in_flight=16, adaptive=AdaptiveConcurrencyPolicy(initial_limit=4))
    bulkhead = ConcurrencyLimit.from_policy(section, name="chat")
    assert isinstance(bulkhead.algorithm, AIMDLimit)
    assert (bulkhead.limit, bulkhead.policy) == (4, section)
    fixed = ConcurrencyLimit.from_policy(ConcurrencyPolicy(max_in_flight=16))
    assert (fixed.algorithm, fixed.limit) == (None, 16)


def test_adaptive_settings_load_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGGUARD_CONCURRENCY__ADAPTIVE__ALGORITHM", "gradient")
    monkeypatch.setenv("RAGGUARD_CONCURRENCY__ADAPTIVE__MIN_LIMIT", "2")
    adaptive = Policy().concurrency.adaptive
    assert adaptive is not None
    assert (adaptive.algorithm, adaptive.min_limit) == ("gradient", 2)


# ---------------------------------------------------------------- the bulkhead with an adaptive limit


@pytest.mark.anyio
async def test_the_uncontended_adaptive_path_never_checkpoints() -> None:
    bulkhead = ConcurrencyLimit(max_in_flight=4, adaptive={"initial_limit": 2})
    with anyio.CancelScope() as scope:
        scope.cancel()
        # a checkpoint anywhere in the guard would raise the pending cancellation here
        assert await bulkhead.call(ok) == "ok"
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


@pytest.mark.anyio
async def test_outcomes_drive_the_limit() -> None:
    clock = ManualClock()
    bulkhead = ConcurrencyLimit(max_in_flight=20, adaptive={"initial_limit": 10, "backoff_ratio": 0.5}, clock=clock)

    async def raise_(status: int) -> None:
        raise HTTPError(status)

    for status, expected in [(400, 10), (404, 10), (500, 10), (429, 5), (503, 2), (408, 1)]:
        clock.advance(1.0)  # every call a new round
        with pytest.raises(HTTPError):
            await bulkhead.call(raise_, status)
        assert bulkhead.limit == expected, status
    # a success while the limit is in use grows it; a cancelled call says nothing
    await bulkhead.call(ok)
    assert bulkhead.limit == 2
    with anyio.CancelScope() as scope:
        scope.cancel()
        await bulkhead.call(anyio.sleep, 1)
    assert bulkhead.limit == 2
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


@pytest.mark.anyio
async def test_a_timeout_of_the_attempt_is_a_drop() -> None:
    clock = ManualClock()
    bulkhead = ConcurrencyLimit(max_in_flight=8, adaptive={"backoff_ratio": 0.5}, clock=clock)

    async def slow() -> None:
        raise TimeoutError("attempt timed out")

    with pytest.raises(TimeoutError):
        await bulkhead.run(slow, CallContext(clock=clock))
    assert bulkhead.limit == 4


@pytest.mark.anyio
async def test_a_growing_limit_hands_its_new_slots_to_waiters_at_once() -> None:
    bulkhead = ConcurrencyLimit(max_in_flight=4, adaptive={"initial_limit": 1})
    gates = [anyio.Event() for _ in range(3)]
    running: set[int] = set()

    async def hold(i: int) -> None:
        running.add(i)
        await gates[i].wait()
        running.discard(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(bulkhead.call, hold, i)
            await wait_all_tasks_blocked()
        assert (running, bulkhead.in_flight, bulkhead.queued) == ({0}, 1, 2)
        gates[0].set()  # a success at full use: limit 1 → 2; its slot and the new one go to both waiters
        await wait_all_tasks_blocked()
        assert bulkhead.limit == 2
        assert (running, bulkhead.in_flight, bulkhead.queued) == ({1, 2}, 2, 0)
        gates[1].set()
        gates[2].set()
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


@pytest.mark.anyio
async def test_a_shrinking_limit_lets_calls_in_flight_drain() -> None:
    bulkhead = ConcurrencyLimit(max_in_flight=4, adaptive={"initial_limit": 4, "backoff_ratio": 0.5})
    gates = [anyio.Event() for _ in range(6)]
    outcome: dict[int, int] = {}
    running: set[int] = set()

    async def hold(i: int) -> None:
        running.add(i)
        try:
            await gates[i].wait()
            if outcome.get(i):
                raise HTTPError(outcome[i])
        finally:
            running.discard(i)

    async def call(i: int) -> None:
        with contextlib.suppress(HTTPError):
            await bulkhead.call(hold, i)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(call, i)
            await wait_all_tasks_blocked()
        assert (bulkhead.in_flight, bulkhead.queued) == (4, 2)
        outcome[0] = 429
        gates[0].set()  # a drop: limit 4 → 2; three calls still run, nobody else is let in
        await wait_all_tasks_blocked()
        assert (bulkhead.limit, running, bulkhead.in_flight, bulkhead.queued) == (2, {1, 2, 3}, 3, 2)
        outcome[1] = outcome[2] = 400  # no sample: the limit stays at 2
        gates[1].set()  # 3 in flight over a limit of 2: the slot is freed, not passed on
        await wait_all_tasks_blocked()
        assert (running, bulkhead.in_flight, bulkhead.queued) == ({2, 3}, 2, 2)
        gates[2].set()  # at the limit: the slot passes to the longest waiter
        await wait_all_tasks_blocked()
        assert (bulkhead.limit, running, bulkhead.in_flight, bulkhead.queued) == (2, {3, 4}, 2, 1)
        gates[3].set()  # a success (admitted with 4 in flight): the limit grows to 3, the last waiter goes
        await wait_all_tasks_blocked()
        assert (bulkhead.limit, running, bulkhead.in_flight, bulkhead.queued) == (3, {4, 5}, 2, 0)
        for gate in gates:
            gate.set()
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


@pytest.mark.anyio
async def test_a_faulty_algorithm_keeps_its_limit_and_the_calls_outcome() -> None:
    class Broken:
        limit = 3

        def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
            raise ZeroDivisionError("bug")

    bulkhead = ConcurrencyLimit(max_in_flight=8, adaptive=Broken())
    assert isinstance(Broken(), LimitAlgorithm)
    assert bulkhead.policy.adaptive is None  # a ready object is not a policy section
    assert await bulkhead.call(ok) == "ok"
    assert (bulkhead.limit, bulkhead.in_flight) == (3, 0)


def test_a_custom_algorithm_is_kept_within_one_and_max_in_flight() -> None:
    class Wild:
        def __init__(self, limit: int) -> None:
            self.limit = limit

        def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
            pass

    assert ConcurrencyLimit(max_in_flight=8, adaptive=Wild(100)).limit == 8
    assert ConcurrencyLimit(max_in_flight=8, adaptive=Wild(0)).limit == 1


# ---------------------------------------------------------------- property: slots under random limits


class Scripted:
    """A limit that jumps to the next scripted value at every sample (then stays at the last one)."""

    def __init__(self, limits: list[int]) -> None:
        self.limit = limits[0]
        self._rest = iter(limits[1:])

    def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
        self.limit = next(self._rest, self.limit)


@dataclass
class Call:
    gate: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    status: int = 0  # 0: success; else the HTTP status it fails with
    entered: bool = False
    done: bool = False


async def settle(backend: str) -> None:
    """Return once every other task is blocked (anyio's own helper polls every 0.1 s on asyncio)."""
    if backend == "trio":
        await wait_all_tasks_blocked()
        return
    this = asyncio.current_task()
    while True:
        await anyio.lowlevel.checkpoint()
        waiters = [t._fut_waiter for t in asyncio.all_tasks() if t is not this]  # type: ignore[attr-defined]
        if all(w is not None and not w.done() for w in waiters):
            return


Step = tuple[str, int, int]  # (action, pick, status)
steps_st = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "finish", "cancel"]), st.integers(0, 50), st.sampled_from([0, 0, 429, 400])
    ),
    min_size=1,
    max_size=40,
)


def run_scenario(backend: str, limits: list[int], steps: list[Step]) -> None:
    async def main() -> None:
        bulkhead = ConcurrencyLimit(max_in_flight=6, adaptive=Scripted(limits))
        calls: list[Call] = []

        async def body(call: Call) -> None:
            call.entered = True
            await call.gate.wait()
            if call.status:
                raise HTTPError(call.status)

        async def caller(call: Call) -> None:
            with call.scope, contextlib.suppress(HTTPError):
                await bulkhead.call(body, call)
            call.done = True

        def check(entered_before: int) -> None:
            running = sum(1 for c in calls if c.entered and not c.done)
            waiting = sum(1 for c in calls if not c.entered and not c.done)
            admitted = sum(1 for c in calls if c.entered) - entered_before
            in_flight, limit = bulkhead.in_flight, bulkhead.limit
            assert in_flight == running, "a slot lost or duplicated"
            assert bulkhead.queued == waiting
            assert not (waiting and in_flight < limit), "a slot idle while a caller waits"
            # a step changes the limit (one sample at most) before it admits anyone: whoever got in did so
            # within the limit, and over a shrunk limit nobody gets in until the calls in flight drained
            assert not (admitted and in_flight > limit), "admitted beyond the limit"

        async with anyio.create_task_group() as tg:
            for action, pick, status in steps:
                before = sum(1 for c in calls if c.entered)
                live = [c for c in calls if not c.done]
                if action == "start":
                    call = Call()
                    calls.append(call)
                    tg.start_soon(caller, call)
                elif action == "finish":
                    running = [c for c in live if c.entered and not c.gate.is_set()]
                    if running:
                        call = running[pick % len(running)]
                        call.status = status
                        call.gate.set()
                elif live:
                    live[pick % len(live)].scope.cancel()
                await settle(backend)
                check(before)
            for call in calls:
                call.scope.cancel()
        assert all(c.done for c in calls)
        assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None)
@given(limits=st.lists(st.integers(1, 6), min_size=1, max_size=30), steps=steps_st)
# the limit grows by two while two callers wait: both get in at once
@example(limits=[1, 3], steps=[("start", 0, 0), ("start", 0, 0), ("start", 0, 0), ("finish", 0, 0)])
# the limit shrinks under three calls in flight: nobody gets in until they drained below it
@example(limits=[3, 1], steps=[("start", 0, 0)] * 4 + [("finish", 0, 429), ("finish", 0, 0), ("finish", 0, 0)])
def test_random_limits_and_cancellations_never_lose_a_slot(backend: str, limits: list[int], steps: list[Step]) -> None:
    run_scenario(backend, limits, steps)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=30, deadline=None)
@given(
    adaptive=st.sampled_from([{"algorithm": "aimd", "backoff_ratio": 0.5}, {"algorithm": "gradient"}]),
    work=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 0, 0, 429, 400])), min_size=1, max_size=40),
    cancel_at=st.sets(st.integers(0, 39), max_size=8),
)
def test_real_algorithms_never_run_more_than_their_limit(
    backend: str, adaptive: dict[str, Any], work: list[tuple[int, int]], cancel_at: set[int]
) -> None:
    """Concurrent callers with random work, outcomes and cancellations, through the real algorithms: the calls
    running never exceed the largest limit the algorithm ever took, and nothing is left at the end."""

    class Recording:
        def __init__(self, inner: LimitAlgorithm) -> None:
            self.inner = inner
            self.seen = [inner.limit]

        @property
        def limit(self) -> int:
            return self.inner.limit

        def on_sample(self, start: float, rtt: float, in_flight: int, dropped: bool) -> None:
            self.inner.on_sample(start, rtt, in_flight, dropped)
            self.seen.append(self.inner.limit)

    async def main() -> None:
        algorithm = Recording(limit_from_policy(AdaptiveConcurrencyPolicy(**adaptive, initial_limit=3), 5))
        bulkhead = ConcurrencyLimit(max_in_flight=5, adaptive=algorithm)
        running = 0
        peak_over = 0

        async def body(steps: int, status: int) -> None:
            nonlocal running, peak_over
            running += 1
            peak_over = max(peak_over, running - max(algorithm.seen))
            try:
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                if status:
                    raise HTTPError(status)
            finally:
                running -= 1

        async def caller(i: int, steps: int, status: int) -> None:
            with anyio.CancelScope() as scope:
                if i in cancel_at:
                    scope.cancel()
                with contextlib.suppress(HTTPError):
                    await bulkhead.call(body, steps, status)

        async with anyio.create_task_group() as tg:
            for i, (steps, status) in enumerate(work):
                tg.start_soon(caller, i, steps, status)
        assert peak_over <= 0
        assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
        assert 1 <= bulkhead.limit <= 5

    anyio.run(main, backend=backend)
