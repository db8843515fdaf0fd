"""The decorators on async and sync functions, through the one async core."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anyio
import pytest
from pydantic import ValidationError

import ragguard


@pytest.fixture(autouse=True)
def _no_waits() -> Iterator[None]:
    ragguard.set_testing(True)
    yield
    ragguard.set_testing(False)


class Flaky(Exception):
    pass


class Status(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.anyio
async def test_retry_async_function_until_success() -> None:
    calls = 0

    @ragguard.retry(attempts=3)
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Flaky
        return x * 2

    assert await fetch(21) == 42
    assert calls == 3
    assert fetch.__name__ == "fetch"


def test_retry_sync_function_runs_through_the_async_core() -> None:
    calls = 0
    threads: set[int] = set()

    @ragguard.retry(attempts=4)
    def fetch() -> str:
        nonlocal calls
        calls += 1
        threads.add(threading.get_ident())
        if calls < 3:
            raise Flaky
        return "ok"

    assert fetch() == "ok"
    assert calls == 3
    assert threading.get_ident() not in threads  # ran in a worker thread of the sync bridge


def test_bare_retry_decorator_and_exhaustion_chains_last_error() -> None:
    @ragguard.retry
    def always() -> None:
        raise Flaky("boom")

    with pytest.raises(ragguard.RetryExhausted) as info:
        always()
    assert isinstance(info.value.__cause__, Flaky)
    assert info.value.attempts == 4


def test_non_retryable_status_is_never_retried_sync() -> None:
    calls = 0

    @ragguard.retry(attempts=5)
    def bad_request() -> None:
        nonlocal calls
        calls += 1
        raise Status(400)

    with pytest.raises(Status):
        bad_request()
    assert calls == 1


def test_invalid_options_fail_at_decoration_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="attempts"):
        ragguard.retry(attempts=0)
    with pytest.raises(ValidationError, match="rpm"):
        ragguard.rate_limit(rpm=-5)


@pytest.mark.anyio
async def test_circuit_breaker_opens_and_refuses() -> None:
    @ragguard.circuit_breaker(failure_threshold=2, open_duration=60)
    async def down() -> None:
        raise ConnectionError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await down()
    with pytest.raises(ragguard.CircuitOpenError) as info:
        await down()
    assert "down" in info.value.name
    assert info.value.retry_after > 0


@pytest.mark.anyio
async def test_concurrency_limit_caps_in_flight() -> None:
    in_flight = peak = 0

    @ragguard.concurrency_limit(3)
    async def work() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.001)
        in_flight -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(work)
    assert peak == 3


@pytest.mark.anyio
async def test_timeout_under_retry_retries_slow_attempts() -> None:
    calls = 0

    @ragguard.retry(attempts=3)
    @ragguard.timeout(0.02)
    async def slow_then_fast() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(1)
        return "done"

    assert await slow_then_fast() == "done"
    assert calls == 2


def test_timeout_sync_function_abandons_the_thread() -> None:
    release = threading.Event()

    @ragguard.timeout(0.05)
    def stuck() -> None:
        release.wait(5)

    with pytest.raises(ragguard.AttemptTimeout):
        stuck()
    release.set()


@pytest.mark.anyio
async def test_rate_limit_token_cost_from_arguments() -> None:
    limiter = ragguard.RateLimiter(tpm=600, burst_seconds=1.0)  # 10 tokens per second, bucket of 10

    @ragguard.rate_limit(limiter=limiter, tokens=lambda text: len(text))
    async def embed(text: str) -> int:
        return len(text)

    assert await embed("abcdefgh") == 8
    assert limiter.available_tokens == pytest.approx(2, abs=0.5)


@pytest.mark.anyio
async def test_pipeline_as_decorator_orders_guards() -> None:
    pipeline = ragguard.Pipeline(ragguard.Timeout(5), ragguard.Retry(attempts=2), ragguard.Deadline(10))
    assert [type(g).__name__ for g in pipeline.guards] == ["Deadline", "Retry", "Timeout"]
    calls = 0

    @pipeline
    async def once_flaky() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Flaky
        return 7

    assert await once_flaky() == 7
