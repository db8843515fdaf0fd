"""SharedCircuitBreaker on a real Redis: two "instances" (two RedisBackend objects, as two processes would have)
share one breaker by name. Durations run on the Redis server's clock, so the tests use short real durations
(0.2-0.3 s) and wait them out, rather than fake clocks."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from ragguard import (
    BackendUnavailable,
    BreakerPolicy,
    BreakerState,
    BulkheadFull,
    CircuitOpenError,
    Outcome,
    RetryExhausted,
)
from ragguard.backends._redis_breaker import RedisBreakerStore
from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_breaker import SharedBreakerPermit, SharedCircuitBreaker
from ragguard.testing.redis_server import RedisServer

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


async def fail_with(breaker: SharedCircuitBreaker, exc: BaseException, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(type(exc)):
            await breaker.call(raiser(exc))


def unique_name() -> str:
    return f"test:{uuid.uuid4().hex}"


class Instances:
    """Backends made by a test, closed at its end."""

    def __init__(self) -> None:
        self.backends: list[RedisBackend] = []

    def backend(self, url: str, **options: Any) -> RedisBackend:
        backend = RedisBackend(url, **options)
        self.backends.append(backend)
        return backend

    def pair(self, url: str, *, backend_options: Any = None, **settings: Any) -> list[SharedCircuitBreaker]:
        """Two breakers with one name on two backends: two instances of an app."""
        name = unique_name()
        return [
            SharedCircuitBreaker(name, store=self.backend(url, **(backend_options or {})), **settings) for _ in range(2)
        ]


@pytest.fixture
async def instances() -> AsyncIterator[Instances]:
    made = Instances()
    yield made
    for backend in made.backends:
        await backend.aclose()


async def wait_until_probe_time(breaker: SharedCircuitBreaker) -> None:
    """Sleep until ``breaker`` would admit a probe, as its CircuitOpenError says (server clock)."""
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert 0 < info.value.retry_after < math.inf
    await anyio.sleep(info.value.retry_after + 0.02)


async def race_for_probe(breakers: list[SharedCircuitBreaker], n: int = 50) -> list[SharedBreakerPermit]:
    """``n`` concurrent acquires spread over ``breakers``: the permits granted (refusals are CircuitOpenError)."""
    granted: list[SharedBreakerPermit] = []
    refused: list[CircuitOpenError] = []

    async def one(breaker: SharedCircuitBreaker) -> None:
        try:
            granted.append(await breaker.acquire())
        except CircuitOpenError as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, breakers[i % len(breakers)])
    assert len(granted) + len(refused) == n
    return granted


# --- shared closed → open ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_consecutive_failures_from_two_instances_open_it_for_both(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=3, min_calls=20, open_duration=30.0)
    await fail_with(a, HTTPError(503), 2)
    assert await b.call(ok) == "ok"  # a success on B breaks A's run: the counter is shared
    await fail_with(a, HTTPError(503), 2)
    assert await b.state() is CLOSED
    await fail_with(b, HTTPError(503))
    for breaker in (a, b):
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.name == a.name
        assert 0 < info.value.retry_after <= 30.0
    snap = await a.snapshot()
    assert (snap.state, snap.calls, snap.failures, snap.consecutive_failures) == (OPEN, 6, 5, 3)
    assert snap.retry_at is not None


@pytest.mark.anyio
async def test_failure_rate_over_the_shared_window(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=100, failure_rate=0.5, window=4, min_calls=4)
    await fail_with(a, HTTPError(500))
    assert await b.call(ok) == "ok"
    assert await a.call(ok) == "ok"
    snap = await b.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 3, 1)
    await fail_with(b, HTTPError(500))  # 2 of 4: the rate is reached
    assert await a.state() is OPEN


@pytest.mark.anyio
async def test_window_slides(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=100, failure_rate=0.75, window=4, min_calls=4)
    await fail_with(a, HTTPError(500), 2)
    for _ in range(3):
        assert await b.call(ok) == "ok"
    snap = await a.snapshot()
    assert (snap.calls, snap.failures) == (4, 1)  # the oldest failure left the window
    await fail_with(a, HTTPError(500), 2)
    snap = await a.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 4, 2)


# --- what counts as a failure (the local breaker's rules) --------------------------------------------------


@pytest.mark.anyio
async def test_rate_limits_and_client_errors_do_not_count_by_default(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=2, min_calls=20)
    await fail_with(a, HTTPError(429), 3)
    await fail_with(b, HTTPError(400), 3)
    await fail_with(b, BulkheadFull("full"))  # another guard's refusal: ignored
    snap = await a.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 6, 0)
    await fail_with(b, RetryExhausted("gave up", attempts=3, last_error=HTTPError(503)))
    snap = await a.snapshot()
    assert (snap.calls, snap.failures) == (7, 1)


@pytest.mark.anyio
async def test_rate_limits_count_when_configured(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=2, min_calls=20, count_rate_limits=True)
    await fail_with(a, HTTPError(429))
    await fail_with(b, HTTPError(429))
    assert await a.state() is OPEN


@pytest.mark.anyio
async def test_is_failure_predicate_decides(redis_url: str, instances: Instances) -> None:
    def only_418(exc: BaseException, outcome: Outcome) -> bool:
        return outcome.status == 418

    a, b = instances.pair(redis_url, failure_threshold=1, min_calls=20, is_failure=only_418)
    await fail_with(a, HTTPError(503))
    assert await b.state() is CLOSED
    await fail_with(b, HTTPError(418))
    assert await a.state() is OPEN


# --- open → half-open: one probe for all instances ------------------------------------------------------------


@pytest.mark.anyio
async def test_exactly_one_instance_gets_the_probe_and_its_success_closes_for_both(
    redis_url: str, instances: Instances
) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, open_duration=0.2)
    await fail_with(a, HTTPError(503))
    await wait_until_probe_time(b)  # the expiry A set is the one B sees
    assert await a.state() is HALF_OPEN

    granted = await race_for_probe([a, b])
    assert len(granted) == 1
    probe = granted[0]
    assert probe.is_probe
    assert probe.shared
    assert (await b.snapshot()).probes == 1

    await probe.record_success()
    for breaker in (a, b):
        assert await breaker.state() is CLOSED
        assert await breaker.call(ok) == "ok"
    snap = await b.snapshot()
    assert (snap.calls, snap.failures) == (2, 0)  # closed with an empty window


@pytest.mark.anyio
async def test_probe_failure_opens_again_for_both(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, open_duration=0.3)
    await fail_with(a, HTTPError(503))
    await wait_until_probe_time(a)
    await fail_with(b, HTTPError(503))  # B's call is the probe, and it fails
    for breaker in (a, b):
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert 0 < info.value.retry_after <= 0.3
    await wait_until_probe_time(a)
    assert await a.call(ok) == "ok"  # the next probe succeeds
    assert await b.state() is CLOSED


@pytest.mark.anyio
async def test_probe_lease_expiry_frees_a_stuck_probe(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, open_duration=0.2, half_open_max_wait=0.3)
    await fail_with(a, HTTPError(503))
    await wait_until_probe_time(a)
    stuck = await a.acquire()  # A's probe never reports in time
    assert stuck.is_probe
    with pytest.raises(CircuitOpenError) as info:
        await b.acquire()
    assert 0 < info.value.retry_after <= 0.3  # until A's lease expires
    await anyio.sleep(info.value.retry_after + 0.02)

    probe = await b.acquire()
    assert probe.is_probe
    await stuck.record_success()  # too late: ignored
    snap = await a.snapshot()
    assert (snap.state, snap.probes) == (HALF_OPEN, 1)
    await probe.record_success()
    assert await a.state() is CLOSED


@pytest.mark.anyio
async def test_cancelled_probe_gives_its_lease_back_at_once(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, open_duration=0.2, half_open_max_wait=60.0)
    await fail_with(a, HTTPError(503))
    await wait_until_probe_time(a)
    entered = anyio.Event()

    async def hang() -> None:
        entered.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(a.call, hang)
        await entered.wait()
        tg.cancel_scope.cancel()
    assert (await b.snapshot()).probes == 0
    assert await b.call(ok) == "ok"  # B gets the probe without waiting 60 s
    assert await a.state() is CLOSED


@pytest.mark.anyio
async def test_several_probes_all_must_succeed(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, open_duration=0.2, half_open_probes=2)
    await fail_with(a, HTTPError(503))
    await wait_until_probe_time(a)
    granted = await race_for_probe([a, b], n=20)
    assert len(granted) == 2
    await granted[0].record_success()
    assert await a.state() is HALF_OPEN
    with pytest.raises(CircuitOpenError):
        await b.acquire()  # one success and one lease held: no third probe
    await granted[1].record_success()
    assert await b.state() is CLOSED


# --- generations, control, hooks ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_results_of_calls_admitted_before_a_transition_are_ignored(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url, failure_threshold=1, min_calls=20)
    permit = await a.acquire()
    await b.force_open()
    await b.reset()
    await permit.record_failure()  # admitted before the transitions
    snap = await a.snapshot()
    assert (snap.state, snap.calls, snap.failures) == (CLOSED, 0, 0)


@pytest.mark.anyio
async def test_force_open_and_reset_are_shared(redis_url: str, instances: Instances) -> None:
    a, b = instances.pair(redis_url)
    await a.force_open()
    with pytest.raises(CircuitOpenError) as info:
        await b.call(ok)
    assert info.value.retry_after == math.inf
    await b.reset()
    assert await a.call(ok) == "ok"

    await b.force_open(0.2)
    await wait_until_probe_time(a)
    assert await a.call(ok) == "ok"
    assert await b.state() is CLOSED
    with pytest.raises(ValueError, match="duration"):
        await a.force_open(-1.0)


@pytest.mark.anyio
async def test_state_changes_seen_by_an_instance_are_announced(redis_url: str, instances: Instances) -> None:
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    name = unique_name()
    a = SharedCircuitBreaker(name, store=instances.backend(redis_url), failure_threshold=1, open_duration=0.2)
    b = SharedCircuitBreaker(
        name,
        store=instances.backend(redis_url),
        failure_threshold=1,
        open_duration=0.2,
        on_state_change=lambda *change: seen.append(change),
    )
    await fail_with(a, HTTPError(503))
    assert seen == []  # B has not looked yet
    await wait_until_probe_time(b)
    assert await b.call(ok) == "ok"
    assert seen == [(name, CLOSED, OPEN), (name, OPEN, HALF_OPEN), (name, HALF_OPEN, CLOSED)]


@pytest.mark.anyio
async def test_from_policy_and_disabled(redis_url: str, instances: Instances) -> None:
    backend = instances.backend(redis_url)
    policy = BreakerPolicy(failure_threshold=1, min_calls=1, window=1)
    breaker = SharedCircuitBreaker.from_policy(policy, store=backend.breaker_store(), name=unique_name())
    assert breaker.policy == policy
    assert isinstance(breaker.store, RedisBreakerStore)
    assert breaker.on_unavailable == "fail_open"
    await fail_with(breaker, HTTPError(503))
    assert await breaker.state() is OPEN

    off = SharedCircuitBreaker.from_policy(BreakerPolicy(enabled=False), store=backend, name=breaker.name)
    assert await off.call(ok) == "ok"  # a pass-through, though the shared breaker is open
    permit = await off.acquire()
    await permit.record_failure()


def test_invalid_settings_are_refused(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    with pytest.raises(ValueError, match="min_calls"):
        SharedCircuitBreaker("x", store=backend, window=5, min_calls=6)
    with pytest.raises(ValueError, match="reconnect_interval"):
        SharedCircuitBreaker("x", store=backend, reconnect_interval=-1)


@pytest.mark.anyio
async def test_keys_carry_one_hash_tag_and_expire_when_idle(redis_url: str, instances: Instances) -> None:
    backend = instances.backend(redis_url)
    store = RedisBreakerStore(backend, idle_ttl=5.0)
    breaker = SharedCircuitBreaker(
        f"secret-tenant-{uuid.uuid4().hex}",
        store=store,
        failure_threshold=1,
        half_open_probes=2,
        half_open_max_wait=1.0,
    )
    keys = store.keys(breaker.name, breaker.policy)
    assert len(keys) == 4
    assert len({key[key.index("{") : key.index("}") + 1] for key in keys}) == 1
    assert all("secret-tenant" not in key and breaker.name not in key for key in keys)
    assert await breaker.call(ok) == "ok"
    client = backend.client()
    for key in keys[:2]:
        assert 0 < await client.pttl(key) <= 5000
    await breaker.force_open()  # until reset: kept
    assert await client.pttl(keys[0]) == -1
    await breaker.reset()
    assert 0 < await client.pttl(keys[0]) <= 5000


# --- Redis unavailable -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fail_open_falls_back_to_a_local_breaker_and_recovers(
    redis_server: RedisServer, instances: Instances
) -> None:
    a, b = instances.pair(
        redis_server.url,
        backend_options={"on_unavailable": "fail_open", "timeout": 0.5},
        failure_threshold=2,
        min_calls=20,
        open_duration=30.0,
        reconnect_interval=0.0,
    )
    assert await a.call(ok) == "ok"
    redis_server.kill()

    permit = await a.acquire()
    assert not permit.shared  # the local fallback admitted it
    await permit.record_success()
    assert a.degraded
    assert await a.call(ok) == "ok"  # no call fails because Redis is down
    await fail_with(a, HTTPError(503), 2)  # the provider goes down too: cut off per process
    with pytest.raises(CircuitOpenError):
        await a.call(ok)
    assert (await a.snapshot()).state is OPEN  # the local view
    assert await b.call(ok) == "ok"  # B's own fallback saw no failure

    await anyio.to_thread.run_sync(redis_server.restart)
    permit = await a.acquire()  # the shared state again: empty after the restart, so closed
    assert permit.shared
    await permit.record_success()
    assert not a.degraded
    snap = await b.snapshot()
    assert (snap.state, snap.calls) == (CLOSED, 1)


@pytest.mark.anyio
async def test_fail_closed_refuses_and_recovers(redis_server: RedisServer, instances: Instances) -> None:
    a, b = instances.pair(
        redis_server.url,
        backend_options={"on_unavailable": "fail_closed", "timeout": 0.3},
        failure_threshold=1,
        reconnect_interval=0.0,
    )
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    redis_server.kill()
    with pytest.raises(BackendUnavailable):
        await a.call(counted)
    assert calls == 0  # refused before the provider was asked
    with pytest.raises(BackendUnavailable):
        await a.snapshot()
    with pytest.raises(BackendUnavailable):
        await b.force_open()

    await anyio.to_thread.run_sync(redis_server.restart)
    assert await a.call(counted) == "ok"
    assert calls == 1
    await fail_with(b, HTTPError(503))
    assert await a.state() is OPEN


@pytest.mark.anyio
async def test_hung_redis_is_unavailable_and_a_finished_call_keeps_its_result(
    redis_server: RedisServer, instances: Instances
) -> None:
    (a, _) = instances.pair(
        redis_server.url,
        backend_options={"on_unavailable": "fail_closed", "timeout": 0.2},
        reconnect_interval=0.0,
    )

    async def hang_redis_then_answer() -> str:
        redis_server.pause()
        return "answer"

    try:
        # admitted by Redis, which then hangs: the result report times out, the call still returns its result
        assert await a.call(hang_redis_then_answer) == "answer"
        with pytest.raises(BackendUnavailable):
            await a.call(ok)
    finally:
        redis_server.resume()
    assert await a.call(ok) == "ok"


@pytest.mark.anyio
async def test_fail_open_keeps_a_verdict_the_hung_redis_missed(redis_server: RedisServer, instances: Instances) -> None:
    (a, _) = instances.pair(
        redis_server.url,
        backend_options={"on_unavailable": "fail_open", "timeout": 0.2},
        failure_threshold=1,
        reconnect_interval=0.0,
    )

    async def hang_redis_then_fail() -> str:
        redis_server.pause()
        raise HTTPError(503)

    try:
        with pytest.raises(HTTPError):  # the call's own error, not BackendUnavailable
            await a.call(hang_redis_then_fail)
        assert a.local.state is OPEN  # the failure Redis could not take went to the local fallback
        with pytest.raises(CircuitOpenError):
            await a.call(ok)
    finally:
        redis_server.resume()


@pytest.mark.anyio
async def test_on_unavailable_override_and_reconnect_interval(redis_server: RedisServer, instances: Instances) -> None:
    backend = instances.backend(redis_server.url, on_unavailable="fail_open", timeout=0.3)
    breaker = SharedCircuitBreaker(unique_name(), store=backend, on_unavailable="fail_closed", reconnect_interval=60)
    assert breaker.on_unavailable == "fail_closed"
    redis_server.kill()
    with pytest.raises(BackendUnavailable):
        await breaker.call(ok)
    await anyio.to_thread.run_sync(redis_server.restart)
    with pytest.raises(BackendUnavailable):
        await breaker.call(ok)  # within reconnect_interval: Redis is not asked again yet
    assert breaker.degraded


# --- Redis Cluster -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shared_breaker_on_a_cluster(redis_cluster_url: str, instances: Instances) -> None:
    a, b = instances.pair(
        redis_cluster_url, backend_options={"cluster": True, "timeout": 2.0}, failure_threshold=2, open_duration=0.2
    )
    await fail_with(a, HTTPError(503))
    await fail_with(b, HTTPError(503))
    with pytest.raises(CircuitOpenError):
        await a.call(ok)
    await wait_until_probe_time(b)
    granted = await race_for_probe([a, b])
    assert len(granted) == 1
    await granted[0].record_success()
    assert await a.state() is CLOSED
    assert await b.call(ok) == "ok"
