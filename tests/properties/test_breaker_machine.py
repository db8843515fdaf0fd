"""Stateful property test of :class:`ragguard.CircuitBreaker` against a reference model, on virtual time.

The model is written from the module docstring of ``ragguard.guards.breaker`` (resilience4j's count-based
sliding window): a plain list for the window, linear scans, no lock. Hypothesis drives random sequences of

* ``acquire`` (a permit held for later, as a stream or a slow call would), reports of held permits (success,
  failure, release; slow or not), possibly after time passed so that a probe lease may expire unseen;
* whole calls through :meth:`CircuitBreaker.run` (returning, raising a failure, a 400, another guard's refusal,
  a ``BaseException``), during which virtual time may pass, judged slow by ``slow_call_s``;
* ``advance`` of the :class:`~ragguard.ManualClock`, ``force_open`` (for a time or until reset) and ``reset``;

and checks after every step that the breaker agrees with the model: its state and window counts, the
``retry_at`` it reports, every refusal is a :class:`~ragguard.CircuitOpenError` carrying the model's retry
time, the half-open probe leases never exceed ``half_open_probes``, and the ``on_state_change`` hook saw
exactly the model's transitions.

(``tests/guards/test_breaker.py`` holds a smaller machine of the same kind; this one adds slow calls, the
``run`` path with time passing inside calls, ``force_open``, and the transition events.)
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ragguard import BreakerState, BulkheadFull, CallContext, CircuitBreaker, CircuitOpenError, ManualClock
from ragguard.guards.breaker import BreakerPermit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
VERDICTS = ["success", "failure", "ignore"]


class HTTPError(Exception):
    """Shaped like an SDK status error: ``classify_exception`` reads ``status_code``."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Abandoned(BaseException):
    """A ``BaseException`` that is not an ``Exception``: like a cancellation, no verdict on the provider."""


class Model:
    """The breaker as its docstring describes it."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.state = CLOSED
        self.window: list[tuple[bool, bool]] = []  # (failed, slow), oldest first, at most cfg["window"]
        self.consecutive = 0
        self.retry_at = math.inf
        self.generation = 0
        self.leases: dict[int, float] = {}  # lease key -> expiry time
        self.successes = 0  # successful probes in this half-open period
        self.transitions: list[tuple[BreakerState, BreakerState]] = []

    def enter(self, state: BreakerState, now: float, open_for: float = math.inf) -> None:
        if state is not self.state:
            self.transitions.append((self.state, state))
        self.state = state
        self.generation += 1  # results of calls admitted before a transition no longer count
        self.leases = {}
        self.successes = 0
        self.retry_at = now + open_for if state is OPEN else math.inf
        if state is CLOSED:
            self.window = []
            self.consecutive = 0

    def look(self, now: float) -> None:
        """What reading the breaker does: an open breaker whose time passed is half-open; stale leases go."""
        if self.state is OPEN and now >= self.retry_at:
            self.enter(HALF_OPEN, now)
        self.leases = {key: expiry for key, expiry in self.leases.items() if now < expiry}

    def admit(self, now: float, key: int) -> tuple[int, bool] | float:
        """``(generation, is_probe)`` when admitted, else the ``retry_at`` the refusal must carry."""
        if self.state is CLOSED:
            return self.generation, False
        self.look(now)
        if self.state is OPEN:
            return self.retry_at
        if self.state is HALF_OPEN:
            if self.successes + len(self.leases) >= self.cfg["half_open_probes"]:
                return min(self.leases.values())  # a place frees at the latest when the oldest lease expires
            self.leases[key] = now + self.cfg["half_open_max_wait"]
            return self.generation, True
        return self.generation, False

    def report(self, now: float, generation: int, key: int, verdict: str, slow: bool) -> None:
        if generation != self.generation:
            return
        if self.state is CLOSED:
            if verdict == "ignore":
                return
            failed = verdict == "failure"
            self.window = [*self.window, (failed, slow)][-self.cfg["window"] :]
            self.consecutive = self.consecutive + 1 if failed else 0
            calls = len(self.window)
            failures = sum(f for f, _ in self.window)
            slows = sum(s for _, s in self.window)
            if self.consecutive >= self.cfg["failure_threshold"] or (
                calls >= self.cfg["min_calls"]
                and (failures / calls >= self.cfg["failure_rate"] or (slows and slows / calls >= self.cfg["slow_rate"]))
            ):
                self.enter(OPEN, now, self.cfg["open_duration"])
        elif self.state is HALF_OPEN:
            expiry = self.leases.pop(key, None)
            if expiry is None or now >= expiry or verdict == "ignore":
                return  # an expired lease's late report, or no verdict
            if verdict == "failure" or slow:  # a slow probe counts as a failed one
                self.enter(OPEN, now, self.cfg["open_duration"])
            else:
                self.successes += 1
                if self.successes >= self.cfg["half_open_probes"]:
                    self.enter(CLOSED, now)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(100.0)
        self.keys = 0
        self.held: list[tuple[BreakerPermit, int, int]] = []  # (permit, model generation, key)
        self.seen: list[tuple[BreakerState, BreakerState]] = []

    @initialize(
        threshold=st.integers(1, 6),
        window=st.integers(1, 6),
        data=st.data(),
        rate=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        slow_rate=st.sampled_from([0.5, 1.0]),
        slow_call_s=st.sampled_from([None, 1.0]),
        open_duration=st.sampled_from([1.0, 2.5, 10.0]),
        probes=st.integers(1, 3),
        max_wait=st.sampled_from([1.5, 4.0, 30.0]),
    )
    def setup(
        self,
        threshold: int,
        window: int,
        data: st.DataObject,
        rate: float,
        slow_rate: float,
        slow_call_s: float | None,
        open_duration: float,
        probes: int,
        max_wait: float,
    ) -> None:
        cfg: dict[str, Any] = {
            "failure_threshold": threshold,
            "window": window,
            "min_calls": data.draw(st.integers(1, window), label="min_calls"),
            "failure_rate": rate,
            "slow_rate": slow_rate,
            "slow_call_s": slow_call_s,
            "open_duration": open_duration,
            "half_open_probes": probes,
            "half_open_max_wait": max_wait,
        }
        self.model = Model(cfg)
        self.breaker = CircuitBreaker(
            "machine",
            failure_threshold=threshold,
            window=window,
            min_calls=cfg["min_calls"],
            failure_rate=rate,
            slow_call_rate=slow_rate,
            slow_call_s=slow_call_s,
            open_duration=open_duration,
            half_open_probes=probes,
            half_open_max_wait=max_wait,
            clock=self.clock,
            on_state_change=lambda name, old, new: self.seen.append((old, new)),
        )

    # --- permits ------------------------------------------------------------------------------------------

    def _acquire(self) -> tuple[BreakerPermit, int, int] | None:
        self.keys += 1
        now = self.clock.now()
        expected = self.model.admit(now, self.keys)
        if isinstance(expected, float):
            with pytest.raises(CircuitOpenError) as info:
                self.breaker.acquire()
            assert info.value.name == "machine"
            assert info.value.retry_at == expected
            assert info.value.retry_after == max(0.0, expected - now)
            return None
        permit = self.breaker.acquire()
        assert permit.is_probe == expected[1]
        return permit, expected[0], self.keys

    @rule()
    def acquire(self) -> None:
        held = self._acquire()
        if held is not None:
            self.held.append(held)

    @precondition(lambda self: bool(self.held))
    @rule(
        data=st.data(),
        verdict=st.sampled_from(VERDICTS),
        slow=st.booleans(),
        after=st.sampled_from([0.0, 0.0, 1.0, 2.0, 5.0]),
    )
    def report(self, data: st.DataObject, verdict: str, slow: bool, after: float) -> None:
        self.clock.advance(after)  # time may pass unseen between the last look and the report
        index = data.draw(st.integers(0, len(self.held) - 1), label="permit")
        permit, generation, key = self.held.pop(index)
        if verdict == "ignore":
            slow = False  # release() carries no slowness
        self.model.report(self.clock.now(), generation, key, verdict, slow)
        if verdict == "success":
            permit.record_success(slow=slow)
        elif verdict == "failure":
            permit.record_failure(slow=slow)
        else:
            permit.release()
        permit.record_failure()  # a second report of the same permit is ignored

    # --- whole calls through run() -----------------------------------------------------------------------

    @rule(
        outcome=st.sampled_from(["return", "failure", "http_400", "http_503", "guard", "abandoned"]),
        latency=st.sampled_from([0.0, 0.0, 0.5, 2.0]),
    )
    def call(self, outcome: str, latency: float) -> None:
        now = self.clock.now()
        self.keys += 1
        expected = self.model.admit(now, self.keys)
        errors: dict[str, BaseException] = {
            "failure": RuntimeError("provider down"),
            "http_400": HTTPError(400),  # the provider answered: counts as a success
            "http_503": HTTPError(503),
            "guard": BulkheadFull("another guard refused"),  # the provider was never asked: ignored
            "abandoned": Abandoned(),  # no verdict
        }
        entered = False

        async def upstream() -> str:
            nonlocal entered
            entered = True
            self.clock.advance(latency)  # the call takes virtual time
            if outcome in errors:
                raise errors[outcome]
            return "ok"

        async def main() -> Any:
            return await self.breaker.run(upstream, CallContext(clock=self.clock))

        if isinstance(expected, float):
            with pytest.raises(CircuitOpenError) as info:
                anyio.run(main)
            assert info.value.retry_at == expected
            assert not entered
            return
        if outcome == "return":
            assert anyio.run(main) == "ok"
        else:
            with pytest.raises(type(errors[outcome])):
                anyio.run(main)
        assert entered
        verdict = {
            "return": "success",
            "http_400": "success",
            "failure": "failure",
            "http_503": "failure",
            "guard": "ignore",
            "abandoned": "ignore",
        }[outcome]
        slow_call_s = self.model.cfg["slow_call_s"]
        slow = verdict != "ignore" and slow_call_s is not None and latency > slow_call_s
        self.model.report(self.clock.now(), expected[0], self.keys, verdict, slow)

    # --- time and control --------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.5, 10.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(duration=st.sampled_from([None, 0.0, 1.0, 5.0]))
    def force_open(self, duration: float | None) -> None:
        self.model.enter(OPEN, self.clock.now(), math.inf if duration is None else duration)
        self.breaker.force_open(duration)

    @rule()
    def reset(self) -> None:
        self.model.enter(CLOSED, self.clock.now())
        self.breaker.reset()

    # --- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        model = self.model
        model.look(self.clock.now())
        snap = self.breaker.snapshot()
        assert snap.state is model.state
        assert self.breaker.state is model.state
        assert snap.calls == len(model.window)
        assert snap.failures == sum(f for f, _ in model.window)
        assert snap.slow_calls == sum(s for _, s in model.window)
        assert snap.consecutive_failures == model.consecutive
        assert snap.retry_at == (model.retry_at if model.state is OPEN else None)
        # never more probes at once than allowed, counting the ones that already succeeded
        assert snap.probes == len(model.leases)
        assert snap.probes + model.successes <= model.cfg["half_open_probes"]
        if snap.state is not HALF_OPEN:
            assert snap.probes == 0
        assert self.seen == model.transitions


BreakerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_breaker_agrees_with_the_model = BreakerMachine.TestCase
