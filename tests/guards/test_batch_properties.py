"""Property tests of :class:`MicroBatcher`: result routing under random arrivals, limits, cancellations, errors.

Each example builds random callers (two batch keys, items duplicated within and across callers, random arrival
delays, random cancellations), a random batcher (``max_items``, ``max_cost``, ``max_in_flight``, ``max_wait``)
and a fake upstream that raises an item error (``is_item_error``) for any call holding a designated bad item.
The async part runs in ``anyio.run`` inside the ``@given`` test, on asyncio and on trio.

``test_routing_*`` (time virtual, a :class:`ManualClock` with delays counted in scheduler checkpoints, or real,
the system clock with half-millisecond delays; cancellations at random times) checks that:

* a caller that was not cancelled gets exactly ``[f(i) for i in items]``; or, if and only if one of its own items
  is bad, the error of its first bad item, raised by a call holding that item alone; or
  :class:`BatchItemTooLarge` for its first item costing more than ``max_cost``;
* a cancelled caller either finished before the cancellation reached it (with that same outcome) or sees the
  cancellation, which reaches its own cancel scope; a cancellation raised inside ``submit`` (in the leader's
  timer or in a dispatch it runs) always leaves ``submit``;
* no call exceeds ``max_items`` or ``max_cost``, holds an item twice or an item of another key;
* calls running at once never exceed ``max_in_flight``, nor does ``in_flight``;
* afterwards the batcher holds no state.

``test_cancelled_callers_leave_while_the_upstream_is_held`` holds every upstream call at a gate, cancels a random
subset of the (then all blocked) callers and checks that each of them leaves at once with its cancellation,
except the sender of a call in flight, which leaves with it once the call returned; that ``in_flight`` counts the
calls held; that calls sent afterwards hold only items a remaining caller needs; and the outcomes as above.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragguard import ManualClock
from ragguard._clock import SYSTEM_CLOCK, Clock
from ragguard.guards.batch import BatchItemTooLarge, MicroBatcher

#: one delay unit in real-time mode, in seconds
UNIT = 0.0005

Outcome = tuple[Any, ...]


def f(item: int) -> int:
    return item * 10 + 1


def cost(item: int) -> float:
    return item % 7


class Bad(Exception):
    """An item error (a provider's 400): the batch held a bad item."""

    def __init__(self, items: list[int]) -> None:
        super().__init__(f"bad item in {items}")
        self.items = list(items)


def is_bad(exc: Exception) -> bool:
    return isinstance(exc, Bad)


@dataclass(frozen=True)
class Caller:
    key: str
    items: tuple[int, ...]
    arrive: int  # delay units before submitting
    cancel_at: int | None  # delay units (from the start) after which its cancel scope is cancelled


@dataclass(frozen=True)
class Scenario:
    callers: tuple[Caller, ...]
    bad: frozenset[int]
    max_items: int
    max_cost: float | None
    max_in_flight: int
    max_wait: int  # delay units
    dispatch_delays: tuple[int, ...]  # delay units of the n-th dispatch (cyclic)


@dataclass
class Report:
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    cancelled: dict[int, str] = field(default_factory=dict)  # caller -> its phase when its scope was cancelled
    caught: dict[int, bool] = field(default_factory=dict)  # caller -> its scope's cancelled_caught
    # callers that saw their cancellation raised inside submit (in the leader's timer sleep or in dispatch)
    delivered: set[int] = field(default_factory=set)
    calls: list[tuple[Hashable, list[int]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    submitted: set[tuple[Hashable, int]] = field(default_factory=set)
    peak: int = 0
    state: tuple[int, int, int] = (-1, -1, -1)  # open_batches, in_flight, slot waiters


class ObservingClock:
    """A clock that reports a cancellation raised in ``sleep`` (the batch leader's timer)."""

    def __init__(self, inner: Clock, on_cancelled: Callable[[], None]) -> None:
        self.inner = inner
        self.on_cancelled = on_cancelled

    def now(self) -> float:
        return self.inner.now()

    async def sleep(self, seconds: float) -> None:
        try:
            await self.inner.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.on_cancelled()
            raise


caller_st = st.builds(
    Caller,
    key=st.sampled_from(["k0", "k1"]),
    items=st.lists(st.integers(0, 20), min_size=1, max_size=5).map(tuple),
    arrive=st.integers(0, 4),
    cancel_at=st.one_of(st.none(), st.integers(0, 12)),
)

scenario_st = st.builds(
    Scenario,
    callers=st.lists(caller_st, min_size=1, max_size=10).map(tuple),
    bad=st.frozensets(st.integers(0, 20), max_size=3),
    max_items=st.integers(1, 6),
    max_cost=st.one_of(st.none(), st.integers(3, 15).map(float)),
    max_in_flight=st.integers(1, 3),
    max_wait=st.integers(0, 3),
    dispatch_delays=st.lists(st.integers(0, 3), min_size=1, max_size=4).map(tuple),
)


def expected(s: Scenario, c: Caller) -> Outcome:
    if s.max_cost is not None:
        for index, item in enumerate(c.items):
            if cost(item) > s.max_cost:
                return ("too_large", index)
    for item in c.items:
        if item in s.bad:
            return ("bad", (item,))  # raised by a dispatch of the caller's first bad item alone
    return ("ok", [f(i) for i in c.items])


async def run_scenario(s: Scenario, real_time: bool) -> Report:
    report = Report()
    phase: dict[int, str] = {}
    task_of: dict[int, int] = {}  # task id -> caller
    scopes = [anyio.CancelScope() for _ in s.callers]
    running = 0
    cancelled_exc = anyio.get_cancelled_exc_class()

    def cancellation_raised() -> None:
        """A cancellation was raised in a caller's task, inside submit: note it if it is the caller's own."""
        c = task_of.get(anyio.get_current_task().id)
        if c is None:
            report.violations.append("a cancellation was raised outside any caller")
        elif scopes[c].cancel_called:
            # The caller's scope is cancelled and visible there (the batcher's only shield covers dispatch
            # while others wait, and then dispatch is not cancelled): this cancellation must leave submit.
            report.delivered.add(c)

    async def pause(units: int) -> None:
        if real_time:
            if units:
                await anyio.sleep(units * UNIT)
        else:
            for _ in range(units):
                await anyio.lowlevel.checkpoint()

    async def dispatch(key: Hashable, items: list[int]) -> list[int]:
        nonlocal running
        n = len(report.calls)
        report.calls.append((key, list(items)))
        if len(items) > s.max_items:
            report.violations.append(f"dispatch of {len(items)} items > max_items {s.max_items}")
        if s.max_cost is not None and sum(cost(i) for i in items) > s.max_cost:
            report.violations.append(f"dispatch {items} costs more than max_cost {s.max_cost}")
        if len(set(items)) != len(items):
            report.violations.append(f"dispatch {items} holds an item twice")
        if batcher.in_flight > s.max_in_flight:
            report.violations.append(f"in_flight {batcher.in_flight} > max_in_flight {s.max_in_flight}")
        running += 1
        report.peak = max(report.peak, running)
        try:
            await pause(s.dispatch_delays[n % len(s.dispatch_delays)])
            await anyio.lowlevel.checkpoint()
        except cancelled_exc:
            cancellation_raised()
            raise
        finally:
            running -= 1
        if any(i in s.bad for i in items):
            raise Bad(items)
        return [f(i) for i in items]

    clock = ObservingClock(SYSTEM_CLOCK if real_time else ManualClock(), cancellation_raised)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        dispatch,
        max_items=s.max_items,
        max_cost=s.max_cost,
        max_wait=s.max_wait * UNIT,
        max_in_flight=s.max_in_flight,
        cost=cost,
        is_item_error=is_bad,
        clock=clock,
    )

    async def caller(c: int, spec: Caller) -> None:
        phase[c] = "before"
        task_of[anyio.get_current_task().id] = c
        with scopes[c]:
            try:
                await pause(spec.arrive)
            except cancelled_exc:
                report.outcomes[c] = ("cancelled",)
                raise
            phase[c] = "in"
            report.submitted.update((spec.key, i) for i in spec.items)
            try:
                report.outcomes[c] = ("ok", await batcher.submit(spec.key, list(spec.items)))
            except Bad as exc:
                report.outcomes[c] = ("bad", tuple(exc.items))
            except BatchItemTooLarge as exc:
                report.outcomes[c] = ("too_large", exc.index)
            except cancelled_exc:
                report.outcomes[c] = ("cancelled",)
                raise
            except Exception as exc:
                report.outcomes[c] = ("unexpected", repr(exc))
            finally:
                phase[c] = "out"
        report.caught[c] = scopes[c].cancelled_caught

    async def canceller(c: int, after: int) -> None:
        await pause(after)
        report.cancelled[c] = phase.get(c, "before")
        scopes[c].cancel()

    with anyio.fail_after(10):  # a lost wake-up would hang: make it a failure
        async with anyio.create_task_group() as tg:
            for c, spec in enumerate(s.callers):
                tg.start_soon(caller, c, spec)
                if spec.cancel_at is not None:
                    tg.start_soon(canceller, c, spec.cancel_at)
    report.state = (batcher.open_batches, batcher.in_flight, len(batcher._slot_waiters))
    return report


def check(s: Scenario, report: Report) -> None:
    assert report.violations == []
    assert report.peak <= s.max_in_flight
    for key, items in report.calls:
        assert all((key, i) in report.submitted for i in items), f"{key}: {items} mixes in another key's items"
    for c, spec in enumerate(s.callers):
        want = expected(s, spec)
        got = report.outcomes[c]
        when = report.cancelled.get(c)
        if got == ("cancelled",):
            assert when is not None, f"caller {c} was never cancelled, yet saw a cancellation"
            assert when != "out"
            assert report.caught[c], f"caller {c}: the cancellation did not reach its cancel scope"
            continue
        # Not cancelled, or cancelled too late to matter: a cancellation requested while it waited stays pending
        # until its next checkpoint, which submit need not reach (e.g. woken with its results just before).
        assert got == want, f"caller {c} ({spec}): {got} != {want}"
        assert not report.caught.get(c, False)
        assert c not in report.delivered, f"caller {c}: its cancellation was raised inside submit and swallowed"
    assert report.state == (0, 0, 0), "the batcher kept state: (open_batches, in_flight, slot waiters)"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=80, deadline=None)
@given(s=scenario_st)
def test_routing_with_virtual_time(backend: str, s: Scenario) -> None:
    check(s, anyio.run(run_scenario, s, False, backend=backend))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(s=scenario_st)
def test_routing_with_real_time(backend: str, s: Scenario) -> None:
    check(s, anyio.run(run_scenario, s, True, backend=backend))


# --- cancellation while the upstream is held ------------------------------------------------------------------


@dataclass(frozen=True)
class HeldCaller:
    key: str
    items: tuple[int, ...]
    arrive: int  # checkpoints before submitting
    cancel: bool


@dataclass(frozen=True)
class HeldScenario:
    callers: tuple[HeldCaller, ...]
    max_items: int
    max_cost: float | None
    max_in_flight: int


held_st = st.builds(
    HeldScenario,
    callers=st.lists(
        st.builds(
            HeldCaller,
            key=st.sampled_from(["k0", "k1"]),
            items=st.lists(st.integers(0, 12), min_size=1, max_size=5).map(tuple),
            arrive=st.integers(0, 3),
            cancel=st.booleans(),
        ),
        min_size=1,
        max_size=10,
    ).map(tuple),
    max_items=st.integers(1, 6),
    max_cost=st.one_of(st.none(), st.integers(3, 15).map(float)),
    max_in_flight=st.integers(1, 3),
)


@dataclass
class HeldReport:
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    caught: dict[int, bool] = field(default_factory=dict)
    senders: set[int] = field(default_factory=set)  # callers running a (held) call when the others were cancelled
    stayed: set[int] = field(default_factory=set)  # cancelled callers still inside submit before the gate opened
    in_flight_held: tuple[int, int] = (-1, -1)  # (in_flight, calls held) before the gate opened
    late_calls: list[tuple[Hashable, list[int]]] = field(default_factory=list)  # calls sent after the gate opened
    violations: list[str] = field(default_factory=list)
    state: tuple[int, int, int] = (-1, -1, -1)


async def settle(backend: str) -> None:
    """Return once every other task is blocked: ``anyio.wait_all_tasks_blocked``, minus its 0.1 s polls on asyncio."""
    if backend == "trio":
        await anyio.wait_all_tasks_blocked()
        return
    this = asyncio.current_task()
    while True:
        await anyio.lowlevel.checkpoint()
        # the test the asyncio backend of anyio.wait_all_tasks_blocked makes, polled at every loop iteration
        waiters = [t._fut_waiter for t in asyncio.all_tasks() if t is not this]  # type: ignore[attr-defined]
        if all(w is not None and not w.done() for w in waiters):
            return


async def run_held(s: HeldScenario, backend: str) -> HeldReport:
    report = HeldReport()
    gate = anyio.Event()
    task_of: dict[int, int] = {}
    sending: dict[int, int] = {}  # caller -> calls it is running
    done: set[int] = set()
    scopes = [anyio.CancelScope() for _ in s.callers]
    cancelled_exc = anyio.get_cancelled_exc_class()

    async def dispatch(key: Hashable, items: list[int]) -> list[int]:
        c = task_of[anyio.get_current_task().id]
        if len(items) > s.max_items or (s.max_cost is not None and sum(cost(i) for i in items) > s.max_cost):
            report.violations.append(f"call {items} over the limits")
        if gate.is_set():
            report.late_calls.append((key, list(items)))
        sending[c] = sending.get(c, 0) + 1
        try:
            await gate.wait()
        finally:
            sending[c] -= 1
        return [f(i) for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        dispatch,
        max_items=s.max_items,
        max_cost=s.max_cost,
        max_wait=0.01,
        max_in_flight=s.max_in_flight,
        cost=cost,
        clock=ManualClock(),
    )

    async def caller(c: int, spec: HeldCaller) -> None:
        task_of[anyio.get_current_task().id] = c
        with scopes[c]:
            try:
                for _ in range(spec.arrive):
                    await anyio.lowlevel.checkpoint()
                report.outcomes[c] = ("ok", await batcher.submit(spec.key, list(spec.items)))
            except BatchItemTooLarge as exc:
                report.outcomes[c] = ("too_large", exc.index)
            except cancelled_exc:
                report.outcomes[c] = ("cancelled",)
                raise
            except Exception as exc:
                report.outcomes[c] = ("unexpected", repr(exc))
            finally:
                done.add(c)
        report.caught[c] = scopes[c].cancelled_caught

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for c, spec in enumerate(s.callers):
                tg.start_soon(caller, c, spec)
            await settle(backend)  # every caller waits: for its batch, a slot or the upstream
            report.senders = {c for c, n in sending.items() if n}
            for c, spec in enumerate(s.callers):
                if spec.cancel:
                    scopes[c].cancel()
            await settle(backend)
            report.stayed = {c for c, spec in enumerate(s.callers) if spec.cancel and c not in done}
            report.in_flight_held = (batcher.in_flight, sum(sending.values()))
            gate.set()
    report.state = (batcher.open_batches, batcher.in_flight, len(batcher._slot_waiters))
    return report


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=80, deadline=None)
@given(s=held_st)
def test_cancelled_callers_leave_while_the_upstream_is_held(backend: str, s: HeldScenario) -> None:
    report = anyio.run(run_held, s, backend, backend=backend)
    assert report.violations == []
    in_flight, held = report.in_flight_held
    assert in_flight == held <= s.max_in_flight
    # a cancelled caller leaves at once, unless it is sending a call (shielded while others wait for it)
    assert report.stayed <= report.senders
    needed: dict[str, set[int]] = {"k0": set(), "k1": set()}
    for c, spec in enumerate(s.callers):
        want = expected(Scenario((), frozenset(), s.max_items, s.max_cost, s.max_in_flight, 0, (0,)), spec)
        got = report.outcomes[c]
        if want[0] == "too_large":  # refused before any wait: the cancellation came too late
            assert got == want
        elif spec.cancel:
            assert got == ("cancelled",), f"caller {c}: cancelled while blocked, yet {got}"
            assert report.caught[c]
        else:
            assert got == want, f"caller {c}: {got} != {want}"
        if (not spec.cancel or c in report.stayed) and want[0] != "too_large":
            needed[spec.key].update(spec.items)
    # the items of callers that left were withdrawn from the batches not sent yet
    for key, items in report.late_calls:
        assert set(items) <= needed[str(key)], f"{key}: {items} sends items no remaining caller needs"
    assert report.state == (0, 0, 0)
