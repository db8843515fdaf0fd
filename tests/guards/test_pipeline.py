"""Pipeline composition: canonical order, re-callable layers, one cancel scope for deadline + attempt timeout."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import anyio
import pytest

import ragguard
from ragguard.guards.pipeline import _plan

T = TypeVar("T")


class Passthrough(ragguard.GuardBase):
    """A custom guard that does not promise to honour ctx.deadline."""

    stage: ClassVar[str] = "rate_limit"
    __slots__ = ("clock",)

    def __init__(self) -> None:
        self.clock = ragguard.SYSTEM_CLOCK

    async def run(self, call: Callable[[], Awaitable[T]], ctx: ragguard.CallContext) -> T:
        return await call()


def test_deadline_delegates_to_an_inner_attempt_timeout() -> None:
    deadline = ragguard.Deadline(5)
    pipeline = ragguard.Pipeline(deadline, ragguard.Retry(), ragguard.CircuitBreaker("x"), ragguard.Timeout(1))
    assert _plan(tuple(pipeline.guards))[0] == deadline.run_delegated
    # a guard that does not promise to honour the deadline keeps the deadline's own cancel scope
    guarded = ragguard.Pipeline(deadline, Passthrough(), ragguard.Timeout(1))
    assert _plan(tuple(guarded.guards))[0] == deadline.run
    # no attempt timeout: the deadline enforces itself
    assert _plan((deadline, ragguard.Retry()))[0] == deadline.run


@pytest.mark.anyio
@pytest.mark.parametrize("middle", ["builtin", "custom"])
async def test_deadline_is_enforced_either_way(middle: str) -> None:
    inner: list[Any] = [ragguard.Retry(attempts=3)] if middle == "builtin" else [Passthrough()]
    pipeline = ragguard.Pipeline(ragguard.Deadline(0.05), *inner, ragguard.Timeout(10))
    started = time.monotonic()
    with pytest.raises(ragguard.DeadlineExceeded) as info:
        await pipeline.run(lambda: anyio.sleep(5))
    assert not isinstance(info.value, ragguard.AttemptTimeout)
    assert time.monotonic() - started < 1.0


@pytest.mark.anyio
async def test_each_layer_may_call_the_rest_again() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError
        return "ok"

    ragguard.set_testing(True)
    try:
        pipeline = ragguard.Pipeline(
            ragguard.Deadline(10), ragguard.Retry(attempts=3), ragguard.ConcurrencyLimit(), ragguard.Timeout(5)
        )
        assert await pipeline.run(flaky) == "ok"
    finally:
        ragguard.set_testing(False)
    assert calls == 3


@pytest.mark.anyio
async def test_empty_pipeline_is_a_passthrough() -> None:
    async def seven() -> int:
        return 7

    assert await ragguard.Pipeline().call(seven) == 7
