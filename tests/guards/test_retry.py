from __future__ import annotations

import email.utils
import itertools
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ragguard
from ragguard import (
    AttemptTimeout,
    BulkheadFull,
    CallContext,
    CircuitOpenError,
    ConfigError,
    DeadlineExceeded,
    ManualClock,
    Outcome,
    Pipeline,
    RateLimitTimeout,
    Retry,
    RetryExhausted,
    RetryPolicy,
)
from ragguard.config import JitterKind
from ragguard.guards.retry import RetryEvent, backoff_delays

# ---------------------------------------------------------------- helpers


class HTTPError(Exception):
    """An SDK-like error: ``status_code`` plus a ``response`` with case-insensitive headers."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers=httpx.Headers(headers or {}))


class Script:
    """A call that raises the given errors in turn, then returns ``result``; records each attempt."""

    def __init__(
        self,
        errors: Sequence[BaseException | Callable[[], BaseException]],
        ctx: CallContext | None = None,
        *,
        result: str = "ok",
        takes: float = 0.0,
        clock: ManualClock | None = None,
    ) -> None:
        self.errors = list(errors)
        self.ctx = ctx
        self.result = result
        self.takes = takes
        self.clock = clock
        self.calls = 0
        self.attempts: list[int] = []
        self.raised: list[BaseException] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.ctx is not None:
            self.attempts.append(self.ctx.attempt)
        if self.clock is not None and self.takes:
            self.clock.advance(self.takes)
        if self.errors:
            error = self.errors.pop(0)
            exc = error if isinstance(error, BaseException) else error()
            self.raised.append(exc)
            raise exc
        return self.result


def retry_everything(exc: BaseException) -> Outcome:
    """A careless classifier: says every error is retryable (cancellation must still never be retried)."""
    return Outcome("other", retryable=True, failure=True)


def always(factory: Callable[[], BaseException], n: int = 1000) -> list[Callable[[], BaseException]]:
    return [factory] * n


def expected_t(base: float, cap: float, n: int) -> float:
    return min(cap, base * 2.0**n)


# ---------------------------------------------------------------- backoff: properties

JITTERS: list[JitterKind] = ["full", "equal", "decorrelated", "none"]


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(min_value=1e-3, max_value=100.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
    jitter=st.sampled_from(JITTERS),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_every_delay_within_zero_and_cap(base: float, extra: float, jitter: JitterKind, seed: int) -> None:
    cap = min(3600.0, base + extra)
    policy = RetryPolicy(base=base, cap=cap, jitter=jitter)
    delays = list(itertools.islice(backoff_delays(policy, random.Random(seed)), 60))
    for n, delay in enumerate(delays):
        assert 0.0 <= delay <= cap
        assert math.isfinite(delay)
        t = expected_t(base, cap, n)
        if jitter == "decorrelated":
            assert delay >= min(base, cap)
        elif jitter == "full":
            assert delay <= t
        elif jitter == "equal":
            assert t / 2.0 <= delay <= t
        else:
            assert delay == t


@settings(max_examples=50, deadline=None)
@given(base=st.floats(min_value=1e-3, max_value=10.0), jitter=st.sampled_from(JITTERS))
def test_delays_reach_the_cap_and_stay_finite_for_many_retries(base: float, jitter: JitterKind) -> None:
    policy = RetryPolicy(base=base, cap=max(base, 5.0), jitter=jitter)
    delays = list(itertools.islice(backoff_delays(policy, random.Random(0)), 2000))
    assert all(0.0 <= d <= policy.cap for d in delays)
    if jitter == "none":
        assert delays[-1] == policy.cap


@pytest.mark.parametrize(
    ("jitter", "mean_of_t"),
    [("full", 0.5), ("equal", 0.75), ("none", 1.0)],
)
def test_empirical_mean_matches_the_jitter_kind(jitter: JitterKind, mean_of_t: float) -> None:
    base, cap, retries, samples = 1.0, 100.0, 5, 20_000
    policy = RetryPolicy(base=base, cap=cap, jitter=jitter)
    rng = random.Random(20150304)
    columns: list[list[float]] = [[] for _ in range(retries)]
    for _ in range(samples):
        for n, delay in enumerate(itertools.islice(backoff_delays(policy, rng), retries)):
            columns[n].append(delay)
    for n, column in enumerate(columns):
        t = expected_t(base, cap, n)
        assert statistics.fmean(column) == pytest.approx(mean_of_t * t, rel=0.02)


def test_decorrelated_first_delay_mean_is_twice_base() -> None:
    # uniform(base, 3·base) has mean 2·base while the cap is not reached
    policy = RetryPolicy(base=1.0, cap=100.0, jitter="decorrelated")
    rng = random.Random(7)
    firsts = [next(backoff_delays(policy, rng)) for _ in range(20_000)]
    assert statistics.fmean(firsts) == pytest.approx(2.0, rel=0.02)
    assert min(firsts) >= 1.0
    assert max(firsts) <= 3.0


def test_seeded_rng_gives_reproducible_delays() -> None:
    policy = RetryPolicy(jitter="full")
    a = list(itertools.islice(backoff_delays(policy, random.Random(3)), 10))
    b = list(itertools.islice(backoff_delays(policy, random.Random(3)), 10))
    c = list(itertools.islice(backoff_delays(policy, random.Random(4)), 10))
    assert a == b
    assert a != c


# ---------------------------------------------------------------- Retry: a property over failure sequences


@settings(max_examples=40, deadline=None)
@given(
    failures=st.integers(min_value=0, max_value=8),
    attempts=st.integers(min_value=1, max_value=6),
    jitter=st.sampled_from(JITTERS),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_calls_and_sleeps_follow_attempts(failures: int, attempts: int, jitter: JitterKind, seed: int) -> None:
    for backend in ("asyncio", "trio"):
        clock = ManualClock()
        retry = Retry(attempts=attempts, base=0.1, cap=2.0, jitter=jitter, clock=clock, rng=random.Random(seed))
        ctx = CallContext(clock=clock)
        script = Script([ConnectionError(f"boom {i}") for i in range(failures)], ctx)

        async def main(retry: Retry = retry, script: Script = script, ctx: CallContext = ctx) -> object:
            try:
                return await retry.run(script, ctx)
            except RetryExhausted as exc:
                return exc

        result = anyio.run(main, backend=backend)
        expected_calls = min(failures + 1, attempts)
        assert script.calls == expected_calls
        assert script.attempts == list(range(1, expected_calls + 1))
        if failures < attempts:
            assert result == "ok"
        else:
            assert isinstance(result, RetryExhausted)
            assert result.attempts == attempts
            assert result.__cause__ is script.raised[-1]
        assert len(clock.slept) == expected_calls - 1
        assert all(0.0 <= s <= 2.0 for s in clock.slept)


# ---------------------------------------------------------------- Retry: examples


@pytest.mark.anyio
async def test_retries_then_succeeds() -> None:
    clock = ManualClock()
    retry = Retry(attempts=4, base=1.0, cap=20.0, jitter="none", clock=clock)
    ctx = CallContext(clock=clock)
    script = Script([ConnectionError("reset"), HTTPError(503)], ctx)
    assert await retry.run(script, ctx) == "ok"
    assert script.calls == 3
    assert script.attempts == [1, 2, 3]
    assert clock.slept == [1.0, 2.0]


@pytest.mark.anyio
async def test_exhausts_and_chains_the_last_error() -> None:
    clock = ManualClock()
    retry = Retry(attempts=3, base=0.5, clock=clock, rng=random.Random(1))
    ctx = CallContext(clock=clock, operation="embeddings")
    script = Script(always(lambda: HTTPError(500)), ctx)
    with pytest.raises(RetryExhausted, match="after 3 attempts") as info:
        await retry.run(script, ctx)
    assert script.calls == 3
    assert len(script.raised) == 3
    assert info.value.__cause__ is script.raised[-1]
    assert info.value.last_error is script.raised[-1]
    assert info.value.attempts == 3
    assert "embeddings" in str(info.value)
    assert len(clock.slept) == 2


@pytest.mark.anyio
async def test_one_attempt_wraps_a_retryable_error() -> None:
    clock = ManualClock()
    err = ConnectionError("down")
    with pytest.raises(RetryExhausted) as info:
        await Retry(attempts=1, clock=clock).call(Script([err]))
    assert info.value.__cause__ is err
    assert clock.slept == []


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_never_retried(status: int) -> None:
    clock = ManualClock()
    err = HTTPError(status)
    script = Script([err])
    with pytest.raises(HTTPError) as info:
        await Retry(clock=clock).call(script)
    assert info.value is err  # re-raised unchanged, not wrapped
    assert script.calls == 1
    assert clock.slept == []


@pytest.mark.anyio
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_transient_statuses_are_retried(status: int) -> None:
    clock = ManualClock()
    script = Script([HTTPError(status)])
    assert await Retry(clock=clock).call(script) == "ok"
    assert script.calls == 2


@pytest.mark.anyio
async def test_a_non_retryable_error_after_retries_is_raised_unchanged() -> None:
    clock = ManualClock()
    bad = HTTPError(400)
    script = Script([HTTPError(503), bad])
    with pytest.raises(HTTPError) as info:
        await Retry(clock=clock).call(script)
    assert info.value is bad
    assert script.calls == 2


@pytest.mark.anyio
async def test_cancellation_is_never_retried() -> None:
    clock = ManualClock()
    retry = Retry(attempts=5, clock=clock)
    calls = 0
    with anyio.CancelScope() as scope:

        async def call() -> str:
            nonlocal calls
            calls += 1
            scope.cancel()
            await anyio.lowlevel.checkpoint()  # raises the backend's cancellation exception
            return "unreachable"

        await retry.run(call, CallContext(clock=clock, classify=retry_everything))
        pytest.fail("cancellation did not propagate")
    assert scope.cancelled_caught
    assert calls == 1
    assert clock.slept == []


class Interrupt(BaseException):
    pass


@pytest.mark.anyio
async def test_base_exceptions_are_never_retried() -> None:
    clock = ManualClock()
    script = Script([Interrupt()])
    with pytest.raises(Interrupt):
        await Retry(clock=clock).run(script, CallContext(clock=clock, classify=retry_everything))
    assert script.calls == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "hint"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ],
)
async def test_retry_after_hint_is_honoured_with_upward_jitter(headers: dict[str, str], hint: float) -> None:
    for seed in range(20):
        clock = ManualClock()
        retry = Retry(base=100.0, cap=100.0, clock=clock, rng=random.Random(seed))
        assert await retry.call(Script([HTTPError(429, headers)])) == "ok"
        assert len(clock.slept) == 1
        assert hint <= clock.slept[0] <= hint * 1.1 + 1e-9


@pytest.mark.anyio
async def test_retry_after_http_date_is_honoured() -> None:
    clock = ManualClock()
    date = email.utils.formatdate(time.time() + 10, usegmt=True)
    retry = Retry(base=100.0, cap=100.0, retry_after_jitter=0.0, clock=clock)
    assert await retry.call(Script([HTTPError(503, {"Retry-After": date})])) == "ok"
    # an HTTP-date has whole-second resolution and real time passes while the test runs
    assert 8.5 <= clock.slept[0] <= 10.0


@pytest.mark.anyio
async def test_retry_after_jitter_spreads_callers_upwards_only() -> None:
    waits = []
    for seed in range(50):
        clock = ManualClock()
        retry = Retry(clock=clock, rng=random.Random(seed), retry_after_jitter=0.5)
        await retry.call(Script([HTTPError(429, {"retry-after": "2"})]))
        waits.append(clock.slept[0])
    assert min(waits) >= 2.0
    assert max(waits) <= 3.0
    assert max(waits) - min(waits) > 0.5  # they do not all come back together


@pytest.mark.anyio
async def test_a_past_http_date_retries_at_once() -> None:
    clock = ManualClock()
    date = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert await Retry(clock=clock).call(Script([HTTPError(429, {"retry-after": date})])) == "ok"
    assert clock.slept == [0.0]


@pytest.mark.anyio
async def test_hint_ignored_when_not_respected() -> None:
    clock = ManualClock()
    retry = Retry(jitter="none", base=1.0, respect_retry_after=False, clock=clock)
    assert await retry.call(Script([HTTPError(429, {"retry-after": "30"})])) == "ok"
    assert clock.slept == [1.0]


@pytest.mark.anyio
async def test_hint_longer_than_remaining_deadline_fails_fast() -> None:
    clock = ManualClock()
    ctx = CallContext(clock=clock, deadline=5.0)
    err = HTTPError(429, {"retry-after": "10"})
    script = Script([err])
    with pytest.raises(RetryExhausted, match=r"10\.000 s") as info:
        await Retry(clock=clock).run(script, ctx)
    assert "5.000 s left" in str(info.value)
    assert info.value.__cause__ is err
    assert script.calls == 1
    assert clock.slept == []


@pytest.mark.anyio
async def test_backoff_longer_than_remaining_deadline_fails_fast() -> None:
    clock = ManualClock()
    ctx = CallContext(clock=clock, deadline=2.5)
    retry = Retry(attempts=10, base=1.0, jitter="none", clock=clock)
    script = Script(always(lambda: ConnectionError("x")), ctx)
    with pytest.raises(RetryExhausted, match=r"backoff of 2\.000 s") as info:
        await retry.run(script, ctx)
    # waits 1 s (ends at 1 < 2.5), then a 2 s wait would end at 3 >= 2.5
    assert clock.slept == [1.0]
    assert script.calls == 2
    assert info.value.attempts == 2
    assert info.value.__cause__ is script.raised[-1]


@pytest.mark.anyio
async def test_own_deadline_counts_from_the_first_attempt() -> None:
    clock = ManualClock(start=100.0)
    retry = Retry(attempts=10, base=1.0, jitter="none", deadline=3.0, clock=clock)
    ctx = CallContext(clock=clock)
    script = Script(always(lambda: TimeoutError()), ctx, takes=1.0, clock=clock)
    with pytest.raises(RetryExhausted, match="deadline"):
        await retry.run(script, ctx)
    # attempt 1 ends at 101, waits 1 s (until 102 < 103); attempt 2 ends at 103: no time left
    assert clock.slept == [1.0]
    assert script.calls == 2


@pytest.mark.anyio
async def test_the_earlier_of_the_two_deadlines_wins() -> None:
    clock = ManualClock()
    retry = Retry(attempts=10, base=1.0, jitter="none", deadline=100.0, clock=clock)
    ctx = CallContext(clock=clock, deadline=1.5)
    with pytest.raises(RetryExhausted):
        await retry.run(Script(always(lambda: OSError())), ctx)
    assert clock.slept == [1.0]


@pytest.mark.anyio
async def test_max_retry_after_exceeded_fails_fast() -> None:
    clock = ManualClock()
    err = HTTPError(429, {"retry-after": "120"})
    script = Script([err])
    with pytest.raises(RetryExhausted, match=r"asked to wait 120\.000 s") as info:
        await Retry(max_retry_after=60.0, clock=clock).call(script)
    assert info.value.__cause__ is err
    assert script.calls == 1
    assert clock.slept == []


@pytest.mark.anyio
async def test_on_restricts_retries_to_a_type() -> None:
    clock = ManualClock()
    retry = Retry(on=ConnectionError, clock=clock)
    assert await retry.call(Script([ConnectionResetError()])) == "ok"
    err = TimeoutError("retryable for the classifier, but not in on=")
    script = Script([err])
    with pytest.raises(TimeoutError) as info:
        await retry.call(script)
    assert info.value is err
    assert script.calls == 1


@pytest.mark.anyio
async def test_on_accepts_a_tuple_and_a_predicate() -> None:
    clock = ManualClock()
    by_tuple = Retry(on=(ConnectionError, TimeoutError), clock=clock)
    assert await by_tuple.call(Script([TimeoutError(), ConnectionError()])) == "ok"
    with pytest.raises(OSError, match="disk"):
        await by_tuple.call(Script([OSError("disk")]))

    by_predicate = Retry(on=lambda exc: "again" in str(exc), clock=clock)
    assert await by_predicate.call(Script([RuntimeError("try again")])) == "ok"
    with pytest.raises(RuntimeError, match="fatal"):
        await by_predicate.call(Script([RuntimeError("fatal")]))


@pytest.mark.anyio
async def test_on_cannot_widen_what_the_classifier_refuses() -> None:
    clock = ManualClock()
    script = Script([HTTPError(400)])
    with pytest.raises(HTTPError):
        await Retry(on=HTTPError, clock=clock).call(script)
    assert script.calls == 1


@pytest.mark.anyio
async def test_attempt_timeout_is_retried() -> None:
    clock = ManualClock()
    script = Script([AttemptTimeout("attempt took too long", timeout=1.0)])
    assert await Retry(clock=clock).call(script) == "ok"
    assert script.calls == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "refusal",
    [
        CircuitOpenError("search", retry_at=30.0, retry_after=30.0),
        RateLimitTimeout("no capacity", wait=5.0, remaining=1.0),
        BulkheadFull("queue full"),
        DeadlineExceeded("total deadline passed", timeout=10.0),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_ragguard_refusals_are_not_retried(refusal: Exception) -> None:
    clock = ManualClock()
    script = Script([refusal])
    with pytest.raises(type(refusal)) as info:
        await Retry(clock=clock).call(script)
    assert info.value is refusal
    assert script.calls == 1
    assert clock.slept == []


@pytest.mark.anyio
async def test_the_contexts_classifier_decides() -> None:
    clock = ManualClock()
    never = lambda exc: Outcome("client", retryable=False, failure=False)  # noqa: E731
    ctx = CallContext(clock=clock, classify=never)
    script = Script([ConnectionError()])
    with pytest.raises(ConnectionError):
        await Retry(clock=clock).run(script, ctx)
    assert script.calls == 1


@pytest.mark.anyio
async def test_disabled_runs_once_and_passes_through() -> None:
    clock = ManualClock()
    err = ConnectionError()
    script = Script([err])
    with pytest.raises(ConnectionError) as info:
        await Retry(enabled=False, clock=clock).call(script)
    assert info.value is err
    assert script.calls == 1
    assert await Retry(enabled=False, clock=clock).call(Script([])) == "ok"


@pytest.mark.anyio
async def test_success_on_first_attempt_does_not_checkpoint() -> None:
    # Inside a cancelled scope any checkpoint raises: the happy path must not yield to the event loop.
    clock = ManualClock()
    retry = Retry(deadline=10.0, clock=clock)
    with anyio.CancelScope() as scope:
        scope.cancel()
        assert await retry.run(Script([]), CallContext(clock=clock)) == "ok"
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_decorrelated_and_seeded_retries_are_reproducible() -> None:
    async def schedule(seed: int) -> list[float]:
        clock = ManualClock()
        retry = Retry(attempts=6, base=0.5, cap=4.0, jitter="decorrelated", clock=clock, rng=random.Random(seed))
        assert await retry.call(Script([ConnectionError()] * 5)) == "ok"
        return clock.slept

    first = await schedule(5)
    assert len(first) == 5
    assert all(0.5 <= s <= 4.0 for s in first)
    assert await schedule(5) == first
    assert await schedule(6) != first


@pytest.mark.anyio
async def test_concurrent_calls_keep_their_own_state() -> None:
    clock = ManualClock()
    retry = Retry(attempts=4, base=0.01, clock=clock)
    ctx_a, ctx_b = CallContext(clock=clock), CallContext(clock=clock)
    a = Script([ConnectionError()] * 2, ctx_a, result="a")
    b = Script([ConnectionError()] * 3, ctx_b, result="b")
    results: dict[str, str] = {}

    async def run(name: str, script: Script, ctx: CallContext) -> None:
        results[name] = await retry.run(script, ctx)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", a, ctx_a)
        tg.start_soon(run, "b", b, ctx_b)
    assert results == {"a": "a", "b": "b"}
    assert a.attempts == [1, 2, 3]
    assert b.attempts == [1, 2, 3, 4]


@pytest.mark.anyio
async def test_on_retry_hook_sees_every_retry() -> None:
    clock = ManualClock()
    events: list[RetryEvent] = []
    retry = Retry(jitter="none", base=1.0, clock=clock, on_retry=events.append)
    script = Script([ConnectionError(), HTTPError(429, {"retry-after": "2"})])
    assert await retry.call(script) == "ok"
    assert [e.attempt for e in events] == [1, 2]
    assert [e.delay for e in events] == clock.slept
    assert [e.kind for e in events] == ["connection", "rate_limit"]
    assert [e.error for e in events] == script.raised
    assert events[0].retry_after is None
    assert events[1].retry_after == 2.0


@pytest.mark.anyio
async def test_a_failing_hook_is_logged_and_does_not_break_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def hook(event: RetryEvent) -> None:
        raise RuntimeError("metrics backend down")

    clock = ManualClock()
    with caplog.at_level(logging.WARNING, logger="ragguard"):
        assert await Retry(clock=clock, on_retry=hook).call(Script([ConnectionError()])) == "ok"
    records = [r for r in caplog.records if r.name == "ragguard"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


@pytest.mark.anyio
async def test_testing_mode_skips_real_waits() -> None:
    ragguard.set_testing(True)
    try:
        with anyio.fail_after(5):  # a real wait would be 10 s + 20 s
            retry = Retry(attempts=3, base=10.0, cap=20.0, jitter="none")
            assert await retry.call(Script([ConnectionError(), ConnectionError()])) == "ok"
    finally:
        ragguard.set_testing(False)


@pytest.mark.anyio
async def test_works_inside_a_pipeline() -> None:
    clock = ManualClock()
    pipeline = Pipeline(Retry(clock=clock, jitter="none", base=0.5), clock=clock)
    script = Script([ConnectionError()])
    assert await pipeline.run(script) == "ok"
    assert clock.slept == [0.5]


# ---------------------------------------------------------------- configuration


def test_from_policy_and_defaults() -> None:
    clock = ManualClock()
    policy = RetryPolicy(attempts=2, base=0.25, cap=1.0, jitter="equal", deadline=9.0)
    retry = Retry.from_policy(policy, clock=clock)
    assert retry.policy == policy
    assert retry.clock is clock
    assert retry.stage == "retry"
    assert Retry().policy == RetryPolicy()
    assert "attempts=2" in repr(retry)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"base": 0.0}, "base"),
        ({"base": 5.0, "cap": 1.0}, "cap"),
        ({"jitter": "bogus"}, "jitter"),
        ({"deadline": -1.0}, "deadline"),
        ({"max_retry_after": 0.0}, "max_retry_after"),
        ({"retry_after_jitter": 2.0}, "retry_after_jitter"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Retry(**kwargs)
    assert [e["loc"][0] for e in info.value.errors()] == [field]


@pytest.mark.parametrize("on", [int, ("x",), (), 42])
def test_bad_on_is_a_config_error(on: Any) -> None:
    with pytest.raises(ConfigError, match="on"):
        Retry(on=on)


def test_bad_on_retry_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="on_retry"):
        Retry(on_retry=42)  # type: ignore[arg-type]
