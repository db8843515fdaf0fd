"""Fallback: when the primary fails with an error that says "not now", an ordered chain of alternatives serves."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from ragguard import (
    AttemptTimeout,
    BulkheadFull,
    CallContext,
    CircuitBreaker,
    CircuitOpenError,
    ConfigError,
    DeadlineExceeded,
    ManualClock,
    Outcome,
    Pipeline,
    RagGuardError,
    RateLimitTimeout,
    Retry,
    RetryExhausted,
)
from ragguard.guards.budget import RetryBudgetExhausted
from ragguard.guards.fallback import (
    ARGS_EXTRA,
    SERVED_EXTRA,
    Fallback,
    FallbackExhausted,
    capture_fallback,
    fallback,
    should_fall_back,
)


class StatusError(Exception):
    """An SDK-like error carrying an HTTP status."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Primary:
    """The primary call: counts its calls and fails with ``error`` (or answers ``"primary"`` when it is None)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "primary"


class Recorder:
    """Alternatives that note, in one shared list, that they were called and with what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def answering(self, name: str, value: Any = None, error: Exception | None = None) -> Any:
        async def alternative(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if error is not None:
                raise error
            return value if value is not None else name

        alternative.__qualname__ = name
        return alternative


# ---------------------------------------------------------------- the chain


@pytest.mark.anyio
async def test_alternatives_are_tried_in_order_until_one_serves() -> None:
    rec = Recorder()
    guard = Fallback(
        rec.answering("other_model", error=StatusError(503)),
        rec.answering("cache"),
        rec.answering("never"),
    )

    assert await guard.call(Primary(ConnectionError("reset"))) == "cache"

    assert [name for name, _, _ in rec.calls] == ["other_model", "cache"]
    stats = guard.stats()
    assert stats.served == {"primary": 0, "other_model": 0, "cache": 1, "never": 0}
    assert (stats.fallbacks, stats.exhausted, stats.passed) == (1, 0, 0)


@pytest.mark.anyio
async def test_a_successful_primary_is_returned_and_no_alternative_runs() -> None:
    rec = Recorder()
    guard = Fallback(rec.answering("cache"))
    assert await guard.call(Primary()) == "primary"
    assert rec.calls == []
    assert guard.stats().served == {"primary": 1, "cache": 0}


@pytest.mark.anyio
async def test_the_caller_learns_which_one_served() -> None:
    rec = Recorder()
    guard = Fallback(rec.answering("backup", error=TimeoutError("slow too")), rec.answering("cache"))
    primary_error = StatusError(502)

    with capture_fallback() as served:
        assert await guard.call(Primary()) == "primary"
    assert (served.served, served.index, served.degraded, served.primary_error) == ("primary", 0, False, None)

    with capture_fallback() as served:
        assert await guard.call(Primary(primary_error)) == "cache"
    assert (served.served, served.index, served.degraded) == ("cache", 2, True)
    assert served.primary_error is primary_error
    assert [(name, type(exc)) for name, exc in served.errors] == [("backup", TimeoutError)]

    # and in the call's context, for guards and telemetry
    ctx = CallContext()
    assert await guard.run(Primary(primary_error), ctx) == "cache"
    assert ctx.extras == {SERVED_EXTRA: "cache"}


@pytest.mark.anyio
async def test_static_values_are_served_as_they_are() -> None:
    def a_callable_answer() -> str:
        return "called"

    guard = Fallback(
        Fallback.static(a_callable_answer),  # a callable kept as a value
        Fallback.static("second", name="canned"),
        "third",  # not callable: a static value too
    )
    assert await guard.call(Primary(ConnectionError())) is a_callable_answer
    assert [a.name for a in guard.alternatives] == ["static", "canned", "static#3"]

    later = Fallback(Fallback.named("sorry", "We are busy, try again in a minute."))
    assert await later.call(Primary(StatusError(503))) == "We are busy, try again in a minute."
    assert later.stats().served == {"primary": 0, "sorry": 1}


@pytest.mark.anyio
async def test_alternatives_get_the_calls_arguments_unless_they_take_none() -> None:
    rec = Recorder()

    async def zero_arg() -> str:
        rec.calls.append(("zero_arg", (), {}))
        raise ConnectionError("down too")

    guard = Fallback(zero_arg, rec.answering("same_args"))
    assert await guard.call(Primary(ConnectionError()), "query", top_k=5) == "same_args"
    assert rec.calls == [("zero_arg", (), {}), ("same_args", ("query",), {"top_k": 5})]

    # in a pipeline, arguments reach the alternatives through ctx.extras
    rec.calls.clear()
    pipeline = Pipeline(Fallback(rec.answering("in_pipeline")))
    ctx = pipeline.context()
    ctx.extras = {ARGS_EXTRA: (("q",), {})}
    assert await pipeline.run(Primary(ConnectionError()), ctx) == "in_pipeline"
    assert rec.calls == [("in_pipeline", ("q",), {})]


@pytest.mark.anyio
async def test_sync_alternatives_run_in_a_worker_thread() -> None:
    threads: list[int] = []

    def from_disk(query: str) -> str:
        threads.append(threading.get_ident())
        return f"cached {query}"

    guard = Fallback(from_disk)
    assert await guard.call(Primary(ConnectionError()), "q") == "cached q"
    assert threads
    assert threads[0] != threading.get_ident()


def test_the_decorator_serves_sync_functions_through_the_sync_bridge() -> None:
    calls: list[str] = []

    def backup(question: str) -> str:
        calls.append(f"backup {question}")
        return f"backup answer to {question}"

    @fallback(backup, "static answer")
    def ask(question: str) -> str:
        """Ask the primary model."""
        calls.append(f"primary {question}")
        raise ConnectionError("primary down")

    with capture_fallback() as served:
        assert ask("why?") == "backup answer to why?"
    assert calls == ["primary why?", "backup why?"]
    assert served.served == "backup"
    assert ask.__name__ == "ask"
    assert ask.__doc__ == "Ask the primary model."


@pytest.mark.anyio
async def test_the_decorator_serves_async_functions_with_their_arguments() -> None:
    rec = Recorder()

    @fallback(rec.answering("backup"))
    async def search(query: str, *, top_k: int) -> str:
        raise StatusError(500)

    assert await search("q", top_k=3) == "backup"
    assert rec.calls == [("backup", ("q",), {"top_k": 3})]


# ---------------------------------------------------------------- when to fall back


@pytest.mark.anyio
async def test_an_open_breaker_is_served_by_the_fallback_without_calling_the_primary() -> None:
    breaker = CircuitBreaker("chat")
    rec = Recorder()
    pipeline = Pipeline(Retry(attempts=3), breaker, Fallback(rec.answering("cached")))
    primary = Primary()
    breaker.force_open(30.0)

    with capture_fallback() as served:
        assert await pipeline.call(primary) == "cached"

    assert primary.calls == 0
    assert isinstance(served.primary_error, CircuitOpenError)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        CircuitOpenError("x", 1.0, 1.0),
        RetryExhausted("gave up", attempts=4, last_error=StatusError(503)),
        RetryBudgetExhausted("budget", attempts=1, last_error=StatusError(503)),
        RateLimitTimeout("too long", wait=9.0, remaining=1.0),
        BulkheadFull("full"),
        DeadlineExceeded("late", timeout=1.0),
        AttemptTimeout("slow", timeout=1.0),
        StatusError(500),
        StatusError(503),
        StatusError(429),
        StatusError(408),
        TimeoutError("read timed out"),
        ConnectionError("reset"),
    ],
    ids=lambda e: type(e).__name__ + (f"-{e.status_code}" if isinstance(e, StatusError) else ""),
)
async def test_refusals_and_retryable_errors_fall_back_by_default(error: Exception) -> None:
    guard = Fallback("degraded")
    assert await guard.call(Primary(error)) == "degraded"


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_a_request_the_provider_rejected_never_falls_back_by_default(status: int) -> None:
    rec = Recorder()
    guard = Fallback(rec.answering("backup"))
    error = StatusError(status)

    with pytest.raises(StatusError) as info:
        await guard.call(Primary(error))

    assert info.value is error
    assert rec.calls == []
    assert guard.stats().passed == 1


@pytest.mark.anyio
async def test_a_config_error_is_a_bug_and_never_falls_back() -> None:
    with pytest.raises(ConfigError):
        await Fallback("degraded").call(Primary(ConfigError("bad policy")))


@pytest.mark.anyio
async def test_a_quota_error_falls_back_another_provider_does_not_share_the_quota() -> None:
    def quota(exc: BaseException) -> Outcome:
        return Outcome("quota", retryable=False, failure=False, status=429)

    guard = Fallback("other provider", classify=quota)
    assert await guard.call(Primary(StatusError(429))) == "other provider"


@pytest.mark.anyio
async def test_a_when_predicate_replaces_the_default_rule() -> None:
    widened = Fallback("not found: default", when=lambda e, o: o.status == 404 or should_fall_back(e, o))
    assert await widened.call(Primary(StatusError(404))) == "not found: default"
    assert await widened.call(Primary(StatusError(503))) == "not found: default"
    with pytest.raises(StatusError):
        await widened.call(Primary(StatusError(400)))

    by_type = Fallback("typed", when=(KeyError,))
    assert await by_type.call(Primary(KeyError("k"))) == "typed"
    with pytest.raises(ConnectionError):
        await by_type.call(Primary(ConnectionError()))


@pytest.mark.anyio
async def test_a_broken_predicate_lets_the_primarys_error_through(caplog: pytest.LogCaptureFixture) -> None:
    def broken(exc: Exception, outcome: Outcome) -> bool:
        raise ValueError("oops")

    error = ConnectionError("reset")
    with pytest.raises(ConnectionError) as info:
        await Fallback("x", when=broken).call(Primary(error))
    assert info.value is error
    assert "could not judge" in caplog.text


@pytest.mark.anyio
async def test_retries_that_give_up_fall_back() -> None:
    clock = ManualClock()
    rec = Recorder()
    primary = Primary(StatusError(503))
    pipeline = Pipeline(
        Retry(attempts=3, base=0.01, cap=0.01, clock=clock), Fallback(rec.answering("cache")), clock=clock
    )

    assert await pipeline.call(primary) == "cache"
    assert primary.calls == 3


# ---------------------------------------------------------------- exhaustion and cancellation


@pytest.mark.anyio
async def test_when_every_alternative_fails_fallback_exhausted_says_what_each_one_did() -> None:
    rec = Recorder()
    first, second = StatusError(503), TimeoutError("cache timed out")
    guard = Fallback(rec.answering("backup_model", error=first), rec.answering("cache", error=second))
    primary_error = ConnectionError("primary down")

    with capture_fallback() as served, pytest.raises(FallbackExhausted) as info:
        await guard.call(Primary(primary_error))

    exc = info.value
    assert isinstance(exc, RagGuardError)
    assert exc.__cause__ is primary_error
    assert exc.primary_error is primary_error
    assert exc.errors == (("backup_model", first), ("cache", second))
    for part in ("primary down", "backup_model: StatusError: HTTP 503", "cache: TimeoutError: cache timed out"):
        assert part in str(exc)
    assert guard.stats().exhausted == 1
    assert (served.served, served.index, served.primary_error) == (None, None, primary_error)
    assert len(served.errors) == 2


@pytest.mark.anyio
async def test_cancellation_propagates_and_is_never_turned_into_a_fallback() -> None:
    rec = Recorder()
    guard = Fallback(rec.answering("backup"))
    started = anyio.Event()

    async def stalled() -> str:
        started.set()
        await anyio.sleep_forever()
        return "unreachable"

    async with anyio.create_task_group() as tg:
        tg.start_soon(guard.call, stalled)
        await started.wait()
        tg.cancel_scope.cancel()

    assert tg.cancel_scope.cancelled_caught
    assert rec.calls == []
    assert guard.stats().fallbacks == 0


@pytest.mark.anyio
async def test_a_cancelled_alternative_stops_the_chain() -> None:
    rec = Recorder()
    started = anyio.Event()

    async def slow_backup() -> str:
        started.set()
        await anyio.sleep_forever()
        return "unreachable"

    guard = Fallback(slow_backup, rec.answering("never"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(guard.call, Primary(ConnectionError()))
        await started.wait()
        tg.cancel_scope.cancel()

    assert rec.calls == []  # the cancellation was not taken for the backup's failure
    assert guard.stats().exhausted == 0


# ---------------------------------------------------------------- configuration


def test_a_fallback_needs_valid_alternatives() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        Fallback()
    with pytest.raises(ConfigError, match="at least one"):
        fallback()

    async def answer() -> str:
        return "a"

    coroutine = answer()
    with pytest.raises(ConfigError, match="awaitable"):
        Fallback(coroutine)
    coroutine.close()
    with pytest.raises(ConfigError, match="when"):
        Fallback("x", when=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        Fallback.named("", "x")


def test_the_fallback_is_the_outermost_stage() -> None:
    pipeline = Pipeline(Retry(), CircuitBreaker("x"), Fallback("static"))
    assert type(pipeline.guards[0]) is Fallback
    assert Fallback.stage == "fallback"
