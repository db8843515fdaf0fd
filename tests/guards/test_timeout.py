from __future__ import annotations

import math
import time

import anyio
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ragguard import (
    AttemptTimeout,
    CallContext,
    Deadline,
    DeadlineExceeded,
    ManualClock,
    Timeout,
    TimeoutPolicy,
    classify_exception,
)

TINY = 0.02  # seconds: the only real waits in this file, where a real cancel scope must fire


async def ok() -> str:
    return "ok"


# --- Timeout ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fast_attempt_returns_its_value() -> None:
    assert await Timeout(5.0).call(ok) == "ok"


@pytest.mark.anyio
async def test_attempt_timeout_raises_attempt_timeout() -> None:
    ctx = CallContext(operation="embeddings")
    ctx.attempt = 2
    with pytest.raises(AttemptTimeout) as info:
        await Timeout(TINY).run(anyio.sleep_forever, ctx)
    error = info.value
    assert error.timeout == TINY
    assert "attempt 2" in str(error)
    assert "embeddings" in str(error)
    assert error.__cause__ is None  # chains nothing
    assert error.__suppress_context__
    assert isinstance(error, DeadlineExceeded)
    assert classify_exception(error).retryable  # another attempt may be faster


@pytest.mark.anyio
async def test_call_deadline_that_bites_first_raises_deadline_exceeded() -> None:
    ctx = CallContext()
    ctx.deadline = ctx.clock.now() + TINY
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await Timeout(10.0).run(anyio.sleep_forever, ctx)
    assert type(info.value) is DeadlineExceeded  # not the retryable AttemptTimeout
    assert time.monotonic() - started < 5.0


@pytest.mark.anyio
async def test_deadline_already_passed_never_starts_the_attempt() -> None:
    clock = ManualClock(10.0)
    ctx = CallContext(clock=clock, deadline=10.0)
    called = False

    async def must_not_run() -> None:
        nonlocal called
        called = True

    with pytest.raises(DeadlineExceeded):
        await Timeout(10.0).run(must_not_run, ctx)
    assert not called


@pytest.mark.anyio
async def test_errors_of_the_attempt_pass_unchanged() -> None:
    async def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await Timeout(5.0).call(boom)


# --- Deadline ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_deadline_expiry_raises_deadline_exceeded_in_time() -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await Deadline(TINY).call(anyio.sleep_forever)
    elapsed = time.monotonic() - started
    assert type(info.value) is DeadlineExceeded
    assert info.value.timeout == TINY
    assert info.value.__cause__ is None
    # fires no earlier than asked (minus the event loop clock's granularity); the upper bound is generous
    assert TINY - 0.005 <= elapsed < 5.0


@pytest.mark.anyio
async def test_deadline_is_set_for_the_inner_guards_and_restored() -> None:
    clock = ManualClock(100.0)
    ctx = CallContext(clock=clock)
    seen: list[float] = []

    async def look() -> str:
        seen.append(ctx.deadline)
        seen.append(ctx.remaining())
        return "ok"

    assert await Deadline(30.0).run(look, ctx) == "ok"
    assert seen == [130.0, 30.0]
    assert ctx.deadline == math.inf

    ctx.deadline = 110.0  # a tighter deadline already set is kept
    seen.clear()
    assert await Deadline(30.0).run(look, ctx) == "ok"
    assert seen == [110.0, 10.0]
    assert ctx.deadline == 110.0


@pytest.mark.anyio
async def test_deadline_is_restored_after_an_error() -> None:
    ctx = CallContext(clock=ManualClock())

    async def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await Deadline(30.0).run(boom, ctx)
    assert ctx.deadline == math.inf


@pytest.mark.anyio
async def test_deadline_exceeded_at_once_when_an_outer_deadline_passed() -> None:
    ctx = CallContext(clock=ManualClock(5.0), deadline=5.0)
    with pytest.raises(DeadlineExceeded):
        await Deadline(30.0).run(ok, ctx)
    assert ctx.deadline == 5.0


@pytest.mark.anyio
async def test_deadline_caps_inner_attempt_timeouts() -> None:
    ctx = CallContext()

    async def attempt() -> None:
        await Timeout(10.0).run(anyio.sleep_forever, ctx)

    with pytest.raises(DeadlineExceeded) as info:
        await Deadline(TINY).run(attempt, ctx)
    assert not isinstance(info.value, AttemptTimeout)


# --- foreign cancellation is never converted --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("guard", [Timeout(10.0), Deadline(10.0)], ids=["timeout", "deadline"])
async def test_outer_cancellation_propagates_unchanged(guard: Timeout | Deadline) -> None:
    with anyio.move_on_after(TINY) as outer:
        await guard.call(anyio.sleep_forever)
        pytest.fail("the outer scope should have cancelled the call")
    assert outer.cancelled_caught


@pytest.mark.anyio
@pytest.mark.parametrize("guard", [Timeout(10.0), Deadline(10.0)], ids=["timeout", "deadline"])
async def test_outer_cancel_from_another_task_propagates(guard: Timeout | Deadline) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(guard.call, anyio.sleep_forever)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert tg.cancel_scope.cancelled_caught


@pytest.mark.anyio
@pytest.mark.parametrize("guard", [Timeout(TINY), Deadline(TINY)], ids=["timeout", "deadline"])
async def test_outer_cancellation_wins_when_both_are_due(guard: Timeout | Deadline) -> None:
    with anyio.CancelScope() as outer:

        async def overrun_then_get_cancelled() -> None:
            time.sleep(TINY * 2)  # noqa: ASYNC251 - blocks on purpose: our own deadline passes meanwhile
            outer.cancel()
            await anyio.sleep_forever()

        await guard.call(overrun_then_get_cancelled)
    assert outer.cancelled_caught  # no AttemptTimeout / DeadlineExceeded escaped the outer scope


# --- pass-through, config ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("guard", [Timeout(None), Deadline(None)], ids=["timeout", "deadline"])
async def test_none_is_a_pass_through(guard: Timeout | Deadline) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        # no cancel scope, no checkpoint: the pending cancellation is never seen
        assert await guard.call(ok) == "ok"


def test_settings_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="attempt"):
        Timeout(0)
    with pytest.raises(pydantic.ValidationError, match="total"):
        Deadline(-1.0)


@given(attempt=st.one_of(st.none(), st.floats(0.001, 1e6)), total=st.one_of(st.none(), st.floats(0.001, 1e6)))
def test_from_policy(attempt: float | None, total: float | None) -> None:
    policy = TimeoutPolicy(attempt=attempt, total=total)
    timeout, deadline = Timeout.from_policy(policy), Deadline.from_policy(policy)
    assert (timeout is None) == (attempt is None)
    assert (deadline is None) == (total is None)
    if timeout is not None:
        assert timeout.seconds == attempt
        assert timeout.stage == "timeout"
    if deadline is not None:
        assert deadline.seconds == total
        assert deadline.stage == "deadline"
