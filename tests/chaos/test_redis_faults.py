"""Chaos suite, backend half: guarded OpenAI calls under load while Redis fails.

Several "instances" (each its own ``RedisBackend`` and its own real ``openai.AsyncOpenAI`` client, as separate
processes would have) share one quota through one real ``redis-server`` and call an ``OpenAISimulator`` served
over HTTP whose quota equals the policy's. Load is open-loop, above the quota, while one backend fault is
injected (and lifted) on a schedule:

- ``kill``: Redis is killed (SIGKILL) and restarted empty on the same port;
- ``slow``: a delaying TCP proxy sits between the backends and Redis; during the fault every chunk, each way,
  arrives 25-150 ms late, so round trips take 50-300 ms around the backend's 0.2 s timeout;
- ``full``: Redis is filled past ``maxmemory`` with ``maxmemory-policy noeviction``, so every write (and every
  script that writes) is refused with ``OOM``;

each with ``on_unavailable="fail_open"`` and ``"fail_closed"``. Invariants checked after every run:

- every call ended exactly once, with its own answer or a ``ragguard.RagGuardError``, within
  ``Policy.timeout.total`` plus a small tolerance;
- ``on_unavailable`` was applied to every Redis failure: with ``fail_open`` no call failed because of Redis;
  with ``fail_closed`` every call that did failed with ``BackendUnavailable`` in its chain of causes;
- the provider's quota held: the simulator answered no 429 beyond one plus 0.5 % of its requests (fail_open
  included: each instance's local share is ``1/expected_instances`` of the quota);
- after the fault: every backend answers, every shared breaker is closed and read from Redis, and the rate
  limiters admit through Redis again (round trips, no fallbacks, no failures);
- after closing the clients and backends: Redis ``CLIENT LIST``, the proxy and the simulator's port are back to
  their baseline connection counts, and no asyncio task is left behind.

These tests found two bugs, both fixed: ``fail_open`` switching between the Redis bucket and the local share
without carrying over the reservations still waiting on the path left behind (both paths' admissions added up:
702 429s in 5,802 requests in the long kill run), and the bucket store's timeout watchdog leaving a cancel
request on a caller's task when a timed-out operation ended otherwise than by its CancelledError.

Fast tier (default): one fault of 3 s in 6 s of load per test. Long tier (``--long``): six faults of 8 s in
about 100 s of load per test, at a higher rate. redis-py's asyncio client runs on asyncio only: no trio turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.to_thread
import psutil
import pytest
from openai import AsyncOpenAI
from redis.exceptions import RedisError

import ragguard
from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_breaker import SharedCircuitBreaker
from ragguard.guards.shared_limiter import SharedRateLimiter
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve
from ragguard.testing._content import embedding_vector
from ragguard.testing._tcp_proxy import TcpProxy
from ragguard.testing.redis_server import RedisReplyError, RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

Fault = Literal["kill", "slow", "full"]
Mode = Literal["fail_open", "fail_closed"]

KEY = "sk-test-chaos-redis-0123456789"
MODEL = "text-embedding-3-small"
DIMENSIONS = 8
INSTANCES = 3
#: seconds one Redis operation may take (RedisBackend(timeout=...))
BACKEND_TIMEOUT = 0.2
#: the slow fault's delay per chunk and direction (a round trip takes two)
SLOW_DELAY = (0.025, 0.15)
#: how late past ``Policy.timeout.total`` a call may end: two shielded store operations (a limiter's refund, a
#: probe's report), each bounded by the backend timeout, plus scheduling on a loaded 2-core machine (event-loop lag
#: up to about 0.35 s in the long tier, where three instances, the proxy's thread and the simulator share it)
DEADLINE_TOLERANCE = 2 * BACKEND_TIMEOUT + 0.4
#: 429s tolerated, as a share of the upstream requests (plus one): the simulator's bucket holds one second of
#: quota, the limiter's half a second, and a loaded 2-core machine delivers requests in bunches
QUOTA_TOLERANCE_429 = 0.005
#: a call still running this long after its deadline is hung
HANG_AFTER = 15.0
#: the outcome of a call that ended with a CancelledError nobody around it asked for
STRAY = "stray CancelledError"
#: the outcome of a call cancelled by the harness (after a stray CancelledError cancelled its task group)
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Tier:
    rpm: float  # the provider's quota and the policy's rate limit (requests per minute)
    offered: float  # offered load, as a multiple of the quota
    total: float  # Policy.timeout.total, seconds
    warmup: float  # seconds of load before the first fault
    fault: float  # seconds each fault lasts
    healthy: float  # seconds of load after each fault
    cycles: int  # faults injected

    @property
    def load_seconds(self) -> float:
        return self.warmup + self.cycles * (self.fault + self.healthy)


FAST = Tier(rpm=1200, offered=1.5, total=2.0, warmup=1.0, fault=3.0, healthy=2.0, cycles=1)
LONG = Tier(rpm=3000, offered=1.5, total=3.0, warmup=3.0, fault=8.0, healthy=8.0, cycles=6)


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only: these tests do not take trio's turn."""
    return "asyncio"


# --- faults ---------------------------------------------------------------------------------------------------


class RedisFault:
    """Injects one kind of fault into ``server`` (reached directly, never through the proxy)."""

    def __init__(self, kind: Fault, server: RedisServer, proxy: TcpProxy) -> None:
        self.kind = kind
        self.server = server
        self.proxy = proxy
        self.injected = 0
        self._fillers = 0

    async def start(self) -> None:
        self.injected += 1
        if self.kind == "kill":
            await anyio.to_thread.run_sync(self.server.kill)
        elif self.kind == "slow":
            self.proxy.set_delay(*SLOW_DELAY)
        else:
            await anyio.to_thread.run_sync(self._fill)

    async def stop(self) -> None:
        if self.kind == "kill":
            await anyio.to_thread.run_sync(self.server.restart)  # empty, same port
        elif self.kind == "slow":
            self.proxy.set_delay(0.0)
        else:
            await anyio.to_thread.run_sync(self._drain)

    def _fill(self) -> None:
        server = self.server
        server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        for _ in range(16):  # 1 MiB of data that must not be evicted
            server.command("SET", f"chaos:filler:{self._fillers}", b"x" * 65536)
            self._fillers += 1
        server.command("CONFIG", "SET", "maxmemory", used_memory(server) // 2)
        with pytest.raises(RedisReplyError, match="OOM"):  # the fault is real: writes are refused
            server.command("SET", "chaos:probe", "1")

    def _drain(self) -> None:
        server = self.server
        server.command("CONFIG", "SET", "maxmemory", 0)
        server.command("DEL", *[f"chaos:filler:{i}" for i in range(self._fillers)])
        self._fillers = 0


def used_memory(server: RedisServer) -> int:
    info = server.command("INFO", "memory")
    assert isinstance(info, bytes)
    fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    return int(fields["used_memory"])


def redis_clients(server: RedisServer) -> int:
    """Connections Redis has open, not counting the one asking."""
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return len(listing.splitlines()) - 1


def sim_connections(port: int) -> int:
    """TCP connections of this process to or from the simulator's port that are not closed yet."""
    live = {psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT, psutil.CONN_SYN_SENT, psutil.CONN_SYN_RECV}
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.status in live
        and ((conn.raddr and conn.raddr.port == port) or (conn.laddr and conn.laddr.port == port and conn.raddr))
    )


# --- load -----------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every call launched and how each one ended (exactly once)."""

    total: float
    launched: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    twice: list[str] = field(default_factory=list)
    late: list[tuple[str, float]] = field(default_factory=list)
    wrong_answer: list[str] = field(default_factory=list)
    #: the longest call, seconds
    worst: float = 0.0
    #: failures with a Redis error (or BackendUnavailable) in their chain of causes: id -> the chain
    redis_caused: dict[str, str] = field(default_factory=dict)

    def end(self, call_id: str, outcome: str, seconds: float) -> None:
        self.worst = max(self.worst, seconds)
        if call_id in self.ended:
            self.twice.append(call_id)
        self.ended[call_id] = outcome
        if seconds > self.total + DEADLINE_TOLERANCE:
            self.late.append((call_id, round(seconds, 3)))

    def failed(self, call_id: str, exc: BaseException) -> None:
        chain = causes(exc)
        if any(isinstance(e, (RedisError, ragguard.BackendUnavailable)) for e in chain):
            self.redis_caused[call_id] = " <- ".join(f"{type(e).__name__}({str(e)[:100]})" for e in chain)

    def by_outcome(self) -> Counter[str]:
        return Counter(self.ended.values())


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and its explicit causes (``raise ... from``), outermost first. Implicit contexts are left out: an
    error raised while handling a BackendUnavailable (e.g. the local share's RateLimitTimeout) is not caused
    by it."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__
    return chain


async def one_call(client: Any, call_id: str, ledger: Ledger) -> None:
    ledger.launched.add(call_id)
    started = time.monotonic()
    outcome = "hung"
    with anyio.move_on_after(ledger.total + HANG_AFTER) as hang:
        try:
            reply = await client.embeddings.create(model=MODEL, input=call_id, dimensions=DIMENSIONS)
        except ragguard.RagGuardError as exc:
            outcome = type(exc).__name__
            ledger.failed(call_id, exc)
        except Exception as exc:  # an invariant violation: recorded, asserted on below
            outcome = f"untyped {type(exc).__module__}.{type(exc).__qualname__}"
            ledger.failed(call_id, exc)
        except anyio.get_cancelled_exc_class():
            if not hang.cancel_called:  # (a hung call is recorded below)
                # nothing around the call cancelled it: a cancellation leaked out of ragguard (STRAY); else
                # the harness is cancelling, which only a stray cancellation does (it cancels the task group)
                stray = anyio.current_effective_deadline() != -math.inf
                ledger.end(call_id, STRAY if stray else CANCELLED, time.monotonic() - started)
            raise
        else:
            outcome = "ok"
            if [d.embedding for d in reply.data] != [embedding_vector(MODEL, call_id, DIMENSIONS)]:
                ledger.wrong_answer.append(call_id)
    ledger.end(call_id, outcome, time.monotonic() - started)


async def offer_load(clients: list[Any], tier: Tier, ledger: Ledger, stop_at: float, tag: str) -> None:
    """Open-loop load: each instance launches calls at its share of ``offered × rpm`` until ``stop_at``."""
    interval = 60.0 / (tier.rpm * tier.offered) * len(clients)
    async with anyio.create_task_group() as tg:
        for n, client in enumerate(clients):
            tg.start_soon(_launcher, client, f"{tag}-i{n}", interval, n * interval / len(clients), ledger, stop_at)


async def _launcher(client: Any, prefix: str, interval: float, offset: float, ledger: Ledger, stop_at: float) -> None:
    async with anyio.create_task_group() as tg:
        next_at = time.monotonic() + offset
        seq = 0
        while next_at < stop_at:
            await anyio.sleep(max(0.0, next_at - time.monotonic()))
            tg.start_soon(one_call, client, f"{prefix}-{seq}", ledger)
            seq += 1
            next_at += interval


# --- the world of one run -------------------------------------------------------------------------------------


@dataclass
class World:
    server: RedisServer
    proxy: TcpProxy
    served: Served[OpenAISimulator]
    tier: Tier
    mode: Mode


@contextlib.contextmanager
def world(tier: Tier, mode: Mode) -> Iterator[World]:
    config = SimulatorConfig.instant(rpm=tier.rpm, tpm=None, burst_seconds=1.0, base_latency_s=0.01, jitter=0.2)
    with (
        RedisServer() as server,
        TcpProxy(server.host, server.port, seed=7) as proxy,
        serve(OpenAISimulator(config)) as served,
    ):
        yield World(server, proxy, served, tier, mode)


def policy(tier: Tier) -> ragguard.Policy:
    return ragguard.Policy(
        rate_limit={"rpm": tier.rpm, "burst_seconds": 0.5},
        retry={"attempts": 3, "base": 0.05, "cap": 0.5},
        timeout={"total": tier.total, "attempt": 1.0},
        cache={"enabled": False},
        coalesce={"enabled": False},
    )


@contextlib.asynccontextmanager
async def instances(w: World) -> AsyncIterator[tuple[list[Any], list[RedisBackend]]]:
    backends = [
        RedisBackend(
            w.proxy.url("redis"),
            namespace="chaos",
            on_unavailable=w.mode,
            timeout=BACKEND_TIMEOUT,
            expected_instances=INSTANCES,
        )
        for _ in range(INSTANCES)
    ]
    clients = [
        ragguard.guard(AsyncOpenAI(base_url=w.served.base_url, api_key=KEY), policy(w.tier), backend=backend)
        for backend in backends
    ]
    try:
        yield clients, backends
    finally:
        for client in clients:
            await client.close()
        for backend in backends:
            await backend.aclose()


def limiters(backend: RedisBackend) -> list[SharedRateLimiter]:
    return [obj for _, obj in backend.items("shared_rate_limit") if isinstance(obj, SharedRateLimiter)]


def breakers(backend: RedisBackend) -> list[SharedCircuitBreaker]:
    return [obj for _, obj in backend.items("shared_breaker") if isinstance(obj, SharedCircuitBreaker)]


async def wait_until(predicate: Any, within: float, what: str) -> None:
    """Poll ``predicate`` (sync or async) until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {within} s: {what}")
        await anyio.sleep(0.05)


async def healthy(backends: list[RedisBackend]) -> bool:
    """Every backend answers PING and every shared breaker is closed, its state read from Redis."""
    report = await ragguard.ahealth(backends)
    if not all(b.reachable for b in report.backends):
        return False
    for backend in backends:
        for breaker in breakers(backend):
            try:
                snap = await breaker.snapshot()  # raises when the state cannot be read from Redis
            except ragguard.BackendUnavailable:
                return False
            if snap.state is not ragguard.BreakerState.CLOSED:
                return False
    return True


async def through_redis(clients: list[Any], backends: list[RedisBackend], tag: str, calls: int) -> None:
    """Calls from every instance are admitted by the shared bucket again: round trips, no fallback, no failure.
    (A call may still be refused with RateLimitTimeout by the shared bucket itself: that is Redis answering.)"""
    for n, (client, backend) in enumerate(zip(clients, backends, strict=True)):
        [limiter] = limiters(backend)

        async def call(i: int, client: Any = client, n: int = n) -> None:
            with contextlib.suppress(ragguard.RateLimitTimeout):
                await client.embeddings.create(model=MODEL, input=f"{tag}-{n}-{i}", dimensions=DIMENSIONS)

        async def admitted_by_redis(limiter: SharedRateLimiter = limiter, call: Any = call) -> bool:
            before = limiter.stats()
            try:
                await call(-1)
            except ragguard.BackendUnavailable:
                return False  # fail_closed, inside the interval in which the store is not tried again
            after = limiter.stats()
            return after["round_trips"] > before["round_trips"] and after["fallbacks"] == before["fallbacks"]

        await wait_until(admitted_by_redis, 10.0, f"instance {n}'s limiter admits through Redis again")
        before = limiter.stats()
        for i in range(calls):
            await call(i)
        after = limiter.stats()
        assert after["round_trips"] - before["round_trips"] >= calls
        assert after["fallbacks"] == before["fallbacks"]
        assert after["unavailable"] == before["unavailable"]


# --- one run --------------------------------------------------------------------------------------------------


class RedisErrorReachedCaller(AssertionError):
    """A call failed because of Redis without ragguard applying ``on_unavailable``: with ``fail_open`` any
    failure caused by Redis; with ``fail_closed`` one whose causes hold a Redis error but no BackendUnavailable."""


class QuotaExceeded(AssertionError):
    """The provider answered 429: together, the instances sent more than the quota."""


class StrayCancellation(AssertionError):
    """A task was left with a cancel request nobody made: a call ended with a bare CancelledError, or a Redis
    operation returned with ``task.cancelling()`` raised."""


@dataclass
class Report:
    fault: Fault
    mode: Mode
    calls: int
    outcomes: dict[str, int]
    faults_injected: int
    upstream_requests: int
    upstream_429: int
    max_requests_per_60s: int
    fallbacks: int
    store_failures: int
    redis_caused: int
    worst_overshoot: float
    seconds: float

    def line(self) -> str:
        return (
            f"[chaos redis {self.fault}/{self.mode}] {self.calls} calls, {self.faults_injected} faults, "
            f"outcomes {self.outcomes}, failures caused by Redis {self.redis_caused}, upstream "
            f"{self.upstream_requests} requests / {self.upstream_429} 429s (peak {self.max_requests_per_60s} per "
            f"60 s), limiter fallbacks {self.fallbacks}, limiter store failures {self.store_failures}, worst "
            f"deadline overshoot {self.worst_overshoot:+.3f} s, {self.seconds:.1f} s"
        )


async def run_chaos(fault_kind: Fault, mode: Mode, tier: Tier) -> Report:
    """One run (see the module doc); asserts every invariant, the ones that known bugs break last."""
    started = time.monotonic()
    tasks_before = asyncio.all_tasks()
    with world(tier, mode) as w:
        base_redis = await anyio.to_thread.run_sync(redis_clients, w.server)
        base_sim = sim_connections(w.served.port)
        fault = RedisFault(fault_kind, w.server, w.proxy)
        ledger = Ledger(total=tier.total)
        async with instances(w) as (clients, backends):
            stop_at = time.monotonic() + tier.load_seconds

            async def schedule() -> None:
                await anyio.sleep(tier.warmup)
                for _ in range(tier.cycles):
                    await fault.start()
                    try:
                        await anyio.sleep(tier.fault)
                    finally:
                        await fault.stop()
                    await anyio.sleep(tier.healthy)

            async with anyio.create_task_group() as tg:
                tg.start_soon(schedule)
                tg.start_soon(offer_load, clients, tier, ledger, stop_at, "load")

            stats = w.served.stats()
            # -- recovery: Redis answers, breakers closed (read from Redis), limiters admit through Redis
            await wait_until(lambda: healthy(backends), 10.0, "every backend reachable, every breaker closed")
            await through_redis(clients, backends, "recovered", calls=3)
            fallbacks = sum(lim.fallbacks for b in backends for lim in limiters(b))
            store_failures = sum(lim.unavailable for b in backends for lim in limiters(b))

        # -- every call ended once, typed, in time, with its own answer
        outcomes = ledger.by_outcome()
        assert ledger.launched == set(ledger.ended), "calls lost"
        assert not ledger.twice, f"calls that ended twice: {ledger.twice[:5]}"
        untyped = {k: v for k, v in outcomes.items() if k == "hung" or k.startswith("untyped")}  # STRAY: below
        assert not untyped, f"calls that ended outside the RagGuardError tree, or never: {untyped}"
        assert outcomes[STRAY] or not outcomes[CANCELLED], "calls cancelled, though nothing leaked a cancellation"
        assert not ledger.late, f"calls that outlived their deadline: {ledger.late[:5]}"
        assert not ledger.wrong_answer, f"calls answered with another call's answer: {ledger.wrong_answer[:5]}"
        assert outcomes["ok"] > 0
        # -- connections and tasks back to their baseline
        await wait_until(
            lambda: w.proxy.open_connections == 0, 5.0, f"the proxy's connections closed ({w.proxy.open_connections})"
        )
        await wait_until(lambda: redis_clients(w.server) == base_redis, 5.0, f"Redis back to {base_redis} clients")
        await wait_until(
            lambda: sim_connections(w.served.port) == base_sim, 5.0, f"simulator back to {base_sim} connections"
        )

        def no_new_tasks() -> bool:
            return not {t for t in asyncio.all_tasks() - tasks_before if not t.done()}

        await wait_until(no_new_tasks, 5.0, f"no leaked tasks: {asyncio.all_tasks() - tasks_before}")
        bucket = stats.buckets.get(MODEL)
        report = Report(
            fault=fault_kind,
            mode=mode,
            calls=len(ledger.launched),
            outcomes=dict(sorted(outcomes.items())),
            faults_injected=fault.injected,
            upstream_requests=stats.requests_total,
            upstream_429=stats.rate_limited_total,
            max_requests_per_60s=bucket.max_requests_per_60s if bucket is not None else 0,
            fallbacks=fallbacks,
            store_failures=store_failures,
            redis_caused=len(ledger.redis_caused),
            worst_overshoot=ledger.worst - tier.total,
            seconds=time.monotonic() - started,
        )
    print(report.line())
    # -- no cancellation leaked out of ragguard
    if outcomes[STRAY]:
        raise StrayCancellation(
            f"{outcomes[STRAY]} calls ended with a CancelledError nobody asked for (and {outcomes[CANCELLED]} more "
            "were cancelled with their task group by it)"
        )
    # -- on_unavailable was applied to every Redis failure
    if mode == "fail_open":
        leaked = dict(ledger.redis_caused)
    else:
        leaked = {k: v for k, v in ledger.redis_caused.items() if "BackendUnavailable(" not in v}
    if leaked:
        sample = Counter(leaked.values()).most_common(3)
        raise RedisErrorReachedCaller(f"{len(leaked)} calls failed because of Redis ({mode}): {sample}")
    # -- the provider's quota held (fail_open too: each instance kept to its share)
    if stats.rate_limited_total > QUOTA_TOLERANCE_429 * stats.requests_total + 1:
        raise QuotaExceeded(
            f"the simulator answered {stats.rate_limited_total} 429s to {stats.requests_total} requests: "
            + report.line()
        )
    # -- the fault reached the guards
    assert store_failures > 0 or outcomes["BackendUnavailable"] > 0, "the fault was never seen"
    return report


# --- the tests ------------------------------------------------------------------------------------------------


async def scenario(fault: Fault, mode: Mode, long_tier: bool) -> None:
    await run_chaos(fault, mode, LONG if long_tier else FAST)


@pytest.mark.openai
@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_redis_killed_and_restarted_mid_run(mode: Mode, long_tier: bool) -> None:
    """Redis is SIGKILLed under load and restarted, empty, on the same port."""
    await scenario("kill", mode, long_tier)


@pytest.mark.openai
@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_redis_slower_than_its_timeout(mode: Mode, long_tier: bool) -> None:
    """Round trips to Redis take 50-300 ms, around the backend's 0.2 s timeout."""
    await scenario("slow", mode, long_tier)


@pytest.mark.openai
@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_redis_full(mode: Mode, long_tier: bool) -> None:
    """Redis is past ``maxmemory`` with ``noeviction``: every write is refused with OOM."""
    await scenario("full", mode, long_tier)


@pytest.mark.anyio
async def test_a_timed_out_redis_operation_leaves_no_cancellation_behind(long_tier: bool) -> None:
    """Redis answering at about the backend's timeout (80-120 ms each way, 0.2 s timeout), 24 concurrent callers
    of three shared limiters trying Redis on every call: an operation that times out must leave its caller's
    task as it found it, with no cancel request pending (``task.cancelling() == 0``). One left behind makes a
    later deadline scope let a bare CancelledError escape (the scenarios' "stray CancelledError" calls)."""
    seconds = 30.0 if long_tier else 5.0
    tasks_before = asyncio.all_tasks()
    with RedisServer() as server, TcpProxy(server.host, server.port, seed=11) as proxy:
        base_redis = await anyio.to_thread.run_sync(redis_clients, server)
        backends = [
            RedisBackend(proxy.url("redis"), namespace="chaos", timeout=BACKEND_TIMEOUT, expected_instances=INSTANCES)
            for _ in range(INSTANCES)
        ]
        shared = [SharedRateLimiter(b, rpm=1e6, name="stray", backend_retry_after=0.0) for b in backends]
        operations = 0
        stray: list[str] = []

        async def caller(limiter: SharedRateLimiter, stop_at: float) -> None:
            nonlocal operations
            task = asyncio.current_task()
            assert task is not None
            while time.monotonic() < stop_at and not stray:
                await limiter.acquire()
                operations += 1
                if task.cancelling():
                    stray.append(f"task.cancelling() == {task.cancelling()} after operation {operations}")

        try:
            for limiter in shared:
                await limiter.acquire()  # connected while Redis is healthy
            proxy.set_delay(0.08, 0.12)
            stop_at = time.monotonic() + seconds
            async with anyio.create_task_group() as tg:
                for limiter in shared:
                    for _ in range(8):
                        tg.start_soon(caller, limiter, stop_at)
            proxy.set_delay(0.0)
        finally:
            for backend in backends:
                await backend.aclose()
        failures = sum(limiter.unavailable for limiter in shared)
        await wait_until(lambda: proxy.open_connections == 0, 5.0, "the proxy's connections closed")
        await wait_until(lambda: redis_clients(server) == base_redis, 5.0, f"Redis back to {base_redis} clients")
    await wait_until(
        lambda: not {t for t in asyncio.all_tasks() - tasks_before if not t.done()}, 5.0, "no leaked tasks"
    )
    print(f"[chaos redis stray] {operations} operations, {failures} timed out, {len(stray)} stray cancel requests")
    assert operations > 0
    assert failures > 0  # the fault was real: operations did time out
    if stray:
        raise StrayCancellation(f"{stray[0]} ({failures} of {operations} operations timed out)")
