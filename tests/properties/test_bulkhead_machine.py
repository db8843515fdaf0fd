"""Stateful property test of :class:`ragguard.ConcurrencyLimit` (a fixed bulkhead) against a reference model.

The bulkhead runs on a real event loop (asyncio or trio) in a blocking portal's thread; each rule of the
machine starts a caller task, lets a running call finish, or cancels a caller, then waits until every task of
the loop is blocked and compares the bulkhead with the model: a FIFO queue and a set of running calls.

Checked after every step:

* ``in_flight`` equals the calls running, and never exceeds ``max_in_flight``; ``queued`` equals the model's
  queue (a newcomer never overtakes it: it runs at once only when a slot is free and nobody waits);
* the calls running are exactly the model's: a freed slot goes to the longest waiter (FIFO handoff);
* a caller beyond ``max_queue`` is refused with :class:`~ragguard.BulkheadFull`, and a cancelled waiter leaves
  the queue. A waiter cancelled as a slot is handed to it passes the slot on to the next one, whether the
  cancellation came first (it is still queued when the slot reaches it: the hand-over path of ``_wait``) or
  right after the hand-over (it meets the cancellation inside its call): no slot is ever lost or duplicated;
* at the end, with every call released, nothing is left in flight or queued.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ragguard import BulkheadFull, CallContext, ConcurrencyLimit


@dataclass
class Call:
    """One caller: its status as the test sees it, and the handles to end or cancel it."""

    status: str = "starting"  # starting, waiting (in run, body not entered), running, done, refused, cancelled
    # made by the caller's task, inside the event loop
    gate: anyio.Event | None = None
    scope: anyio.CancelScope | None = None
    # the id of a waiter whose scope this call cancels right before returning from its body (slot not yet
    # released) or right after run() returned (slot already handed over)
    cancel_before_release: int | None = None
    cancel_after_release: int | None = None


async def settle(backend: str) -> None:
    """Return once every other task of the loop is blocked (``anyio.wait_all_tasks_blocked`` without its
    0.1 s polls on asyncio)."""
    if backend == "trio":
        await anyio.wait_all_tasks_blocked()
        return
    this = asyncio.current_task()
    while True:
        await anyio.lowlevel.checkpoint()
        waiters = [t._fut_waiter for t in asyncio.all_tasks() if t is not this]  # type: ignore[attr-defined]
        if all(w is not None and not w.done() for w in waiters):
            return


class BulkheadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self.calls: list[Call] = []
        # the model
        self.running: list[int] = []
        self.queue: list[int] = []  # longest waiter first
        self.outcomes: dict[int, str] = {}

    @initialize(
        backend=st.sampled_from(["asyncio", "trio"]),
        max_in_flight=st.integers(1, 3),
        max_queue=st.integers(0, 4),
    )
    def setup(self, backend: str, max_in_flight: int, max_queue: int) -> None:
        self.backend = backend
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.limit = ConcurrencyLimit(max_in_flight=max_in_flight, max_queue=max_queue)
        self.portal_cm = start_blocking_portal(backend)
        self.portal = self.portal_cm.__enter__()

    # --- the event-loop side -------------------------------------------------------------------------------

    async def caller(self, i: int) -> None:
        call = self.calls[i]
        call.gate = anyio.Event()
        call.scope = anyio.CancelScope()

        async def body() -> None:
            call.status = "running"
            assert call.gate is not None
            await call.gate.wait()
            if call.cancel_before_release is not None:
                self.cancel(call.cancel_before_release)

        with call.scope:
            call.status = "waiting"
            try:
                await self.limit.run(body, CallContext())
            except BulkheadFull:
                call.status = "refused"
                return
            except anyio.get_cancelled_exc_class():
                call.status = "cancelled"
                raise
            call.status = "done"
            if call.cancel_after_release is not None:
                # no checkpoint since run() returned: the slot was just handed to this waiter, which has not
                # resumed yet
                self.cancel(call.cancel_after_release)
        if call.scope.cancelled_caught:
            call.status = "cancelled"

    def cancel(self, i: int) -> None:
        scope = self.calls[i].scope
        assert scope is not None
        scope.cancel()

    def step(self, action: Any = None) -> None:
        """Run ``action`` in the loop thread, then let the loop settle (with a bound: a lost wake-up hangs)."""

        async def run() -> None:
            if action is not None:
                action()
            with anyio.fail_after(5):
                await settle(self.backend)

        self.portal.call(run)

    # --- the model's view of a finished call ---------------------------------------------------------------

    def _free_slot(self) -> None:
        if self.queue:
            self.running.append(self.queue.pop(0))

    # --- rules ---------------------------------------------------------------------------------------------

    @rule()
    def enter(self) -> None:
        i = len(self.calls)
        self.calls.append(Call())
        if len(self.running) < self.max_in_flight and not self.queue:
            self.running.append(i)
        elif len(self.queue) < self.max_queue:
            self.queue.append(i)
        else:
            self.outcomes[i] = "refused"
        self.portal.start_task_soon(self.caller, i)
        self.step()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.running), label="finishing call")
        self.running.remove(i)
        self.outcomes[i] = "done"
        self._free_slot()
        self.step(self.calls[i].gate.set)  # type: ignore[union-attr]

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def cancel_running(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.running), label="cancelled call")
        self.running.remove(i)
        self.outcomes[i] = "cancelled"
        self._free_slot()
        self.step(lambda: self.cancel(i))

    @precondition(lambda self: bool(self.queue))
    @rule(data=st.data())
    def cancel_waiter(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(self.queue), label="cancelled waiter")
        self.queue.remove(i)
        self.outcomes[i] = "cancelled"
        self.step(lambda: self.cancel(i))

    @precondition(lambda self: bool(self.running) and bool(self.queue))
    @rule(data=st.data(), after=st.booleans())
    def finish_as_the_next_waiter_is_cancelled(self, data: st.DataObject, after: bool) -> None:
        """A call ends while the waiter its slot goes to is cancelled, just before or just after the hand-over
        (with no checkpoint in between, so the waiter has not resumed yet)."""
        i = data.draw(st.sampled_from(self.running), label="finishing call")
        head = self.queue.pop(0)
        self.running.remove(i)
        self.outcomes[i] = "done"
        self.outcomes[head] = "cancelled"
        self._free_slot()  # the slot passes on to the next waiter
        if after:
            self.calls[i].cancel_after_release = head
        else:
            self.calls[i].cancel_before_release = head
        self.step(self.calls[i].gate.set)  # type: ignore[union-attr]

    # --- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if self.portal_cm is None:
            return
        assert self.limit.in_flight == len(self.running) <= self.max_in_flight
        assert self.limit.queued == len(self.queue)
        assert {i for i, c in enumerate(self.calls) if c.status == "running"} == set(self.running)
        assert {i for i, c in enumerate(self.calls) if c.status == "waiting"} == set(self.queue)
        for i, outcome in self.outcomes.items():
            assert self.calls[i].status == outcome, f"call {i}: {self.calls[i].status}, model: {outcome}"

    def teardown(self) -> None:
        if self.portal_cm is None:
            return
        try:
            # release everything, longest waiter last: every queued caller must get a slot in turn
            while self.running:
                i = self.running.pop(0)
                self.outcomes[i] = "done"
                self._free_slot()
                self.step(self.calls[i].gate.set)  # type: ignore[union-attr]
                self.agrees_with_the_model()
            assert (self.limit.in_flight, self.limit.queued) == (0, 0)
            assert all(c.status in ("done", "refused", "cancelled") for c in self.calls)
        finally:
            # never leave a task blocked behind: the portal waits for its tasks when it closes
            def cancel_all() -> None:
                for c in self.calls:
                    if c.scope is not None:
                        c.scope.cancel()

            self.portal.call(cancel_all)
            self.portal_cm.__exit__(None, None, None)


BulkheadMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_bulkhead_agrees_with_the_model = BulkheadMachine.TestCase
