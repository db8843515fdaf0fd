"""Distributed rate limiting on Redis: acquires per second of ragguard's shared bucket beside the libraries people
use instead, each as a ratio to the floor, a raw ``EVALSHA`` of a trivial script (issue 4, "Benchmarks").

Cases (every one a single Redis round trip per acquire, except lease mode):

- ``floor``: ``client.evalsha(sha, 1, key)`` of ``return 1`` on a redis-py asyncio client: what any one-round-trip
  limiter costs at the least.
- ``ragguard strict``: ``SharedRateLimiter.acquire(requests=1, tokens=100)``: requests per minute *and* tokens per
  minute in one Lua script, on the server's clock.
- ``ragguard lease``: the same with ``lease=10``: one round trip per 10 acquires (slack ≤ 10 × instances).
- ``limits moving`` / ``limits fixed``: ``limits.aio.strategies.MovingWindowRateLimiter`` /
  ``FixedWindowRateLimiter`` ``.hit()`` on ``limits.aio.storage.RedisStorage`` (redis-py implementation); one
  limit (requests only).
- ``throttled token bucket``: throttled-py's asyncio ``Throttled(using="token_bucket").limit()`` on its
  ``RedisStore``; requests only.

Every rate is huge, so nothing ever waits or is refused: the figures are pure cost. Each case runs with one task
and with 64 concurrent tasks (each library with a pool large enough for 64). Method: rounds; in each round every
case runs for ``--seconds`` (order rotating between rounds, so a busy spell of this shared machine spreads over
every case); a case's ratio is taken against the floor of the same round; the table shows medians over rounds.

Run from the repository root::

    python -m benchmarks.redis_limiter                 # starts its own redis-server (~40 s)
    python -m benchmarks.redis_limiter --quick         # ~10 s, rougher
    python -m benchmarks.redis_limiter --redis-url redis://127.0.0.1:6379/0 --json out.json

Libraries that are not installed are skipped (``pip install -e '.[dev]'`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_limiter import SharedRateLimiter

#: Targets from the issue.
TARGET_STRICT = 0.9
TARGET_LEASE = 5.0
#: A rate no benchmark can reach: nothing ever waits.
HUGE = 10**9
#: Pool size for every client (64 tasks each hold at most one connection at a time).
POOL = 128
LEASE = 10

Op = Callable[[], Awaitable[Any]]


@dataclass
class Case:
    label: str
    #: builds the zero-argument coroutine function to time, inside the running loop
    make: Callable[[], Awaitable[Op]]
    ours: bool = False
    rates: dict[int, list[float]] = field(default_factory=dict)
    ratios: dict[int, list[float]] = field(default_factory=dict)
    error: str | None = None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


class Bench:
    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = RedisBackend(url, max_connections=POOL)
        self.limiters: list[SharedRateLimiter] = []
        self.closers: list[Callable[[], Awaitable[Any]]] = [self.backend.aclose]

    async def floor(self) -> Op:
        client = self.backend.client()
        script = client.register_script("return 1")
        await script(keys=["bench:floor"])
        sha = script.sha
        return lambda: client.evalsha(sha, 1, "bench:floor")

    def _limiter(self, lease: int | None) -> SharedRateLimiter:
        limiter = SharedRateLimiter(
            self.backend, rpm=float(HUGE) * 60, tpm=float(HUGE) * 60, name=f"bench:{uuid.uuid4().hex}", lease=lease
        )
        self.limiters.append(limiter)
        return limiter

    async def strict(self) -> Op:
        limiter = self._limiter(None)
        return lambda: limiter.acquire(1, 100)

    async def lease(self) -> Op:
        limiter = self._limiter(LEASE)
        return lambda: limiter.acquire(1, 100)

    async def _limits(self, strategy: str) -> Op:
        from limits import RateLimitItemPerSecond
        from limits.aio import strategies
        from limits.aio.storage import RedisStorage

        storage = RedisStorage("async+" + self.url, implementation="redispy", max_connections=POOL)
        limiter = getattr(strategies, strategy)(storage)
        item = RateLimitItemPerSecond(10**7)  # the moving window keeps one list entry per hit, up to the limit
        key = uuid.uuid4().hex

        async def hit() -> bool:
            ok: bool = await limiter.hit(item, "bench", key)
            return ok

        assert await hit()
        return hit

    async def limits_moving(self) -> Op:
        return await self._limits("MovingWindowRateLimiter")

    async def limits_fixed(self) -> Op:
        return await self._limits("FixedWindowRateLimiter")

    async def throttled(self) -> Op:
        from throttled.asyncio import RedisStore, Throttled, per_sec

        store = RedisStore(server=self.url, options={"CONNECTION_POOL_KWARGS": {"max_connections": POOL}})
        throttle = Throttled(
            key=f"bench:{uuid.uuid4().hex}", using="token_bucket", quota=per_sec(HUGE, burst=HUGE), store=store
        )

        async def limit() -> Any:
            result = await throttle.limit()
            assert not result.limited
            return result

        await limit()
        return limit


async def timed(op: Op, tasks: int, seconds: float) -> float:
    """Acquires per second of ``tasks`` concurrent loops of ``op`` over about ``seconds``."""
    count = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal count
        n = 0
        while True:
            for _ in range(16):
                await op()
            n += 16
            if time.perf_counter() >= end:
                break
        count += n

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(tasks)))
    return count / (time.perf_counter() - start)


async def run(url: str, rounds: int, seconds: float, concurrency: list[int]) -> list[Case]:
    bench = Bench(url)
    cases = [
        Case("floor: raw EVALSHA `return 1`", bench.floor),
        Case("ragguard strict (RPM+TPM, 1 round trip)", bench.strict, ours=True),
        Case(f"ragguard lease (lease={LEASE})", bench.lease, ours=True),
        Case("limits moving window (redis-py)", bench.limits_moving),
        Case("limits fixed window (redis-py)", bench.limits_fixed),
        Case("throttled-py token bucket", bench.throttled),
    ]
    ops: dict[str, Op] = {}
    for case in cases:
        try:
            ops[case.label] = await case.make()
        except Exception as exc:  # a missing or broken library is reported, not fatal
            case.error = f"{type(exc).__name__}: {exc}"
    live = [case for case in cases if case.error is None]
    for tasks in concurrency:
        for case in live:  # warm-up: connections for every task
            await timed(ops[case.label], tasks, seconds / 4)
        for r in range(rounds):
            order = live[r % len(live) :] + live[: r % len(live)]
            rates = {case.label: await timed(ops[case.label], tasks, seconds) for case in order}
            floor = rates[cases[0].label]
            for case in live:
                case.rates.setdefault(tasks, []).append(rates[case.label])
                case.ratios.setdefault(tasks, []).append(rates[case.label] / floor)
    for limiter in bench.limiters:
        stats = limiter.stats()
        if stats["fallbacks"] or stats["unavailable"]:
            print(f"warning: {limiter!r} fell back to local state: {stats}", file=sys.stderr)
    for close in bench.closers:
        await close()
    return cases


def report(cases: list[Case], concurrency: list[int], rounds: int, seconds: float, server: str = "?") -> None:
    print(
        f"\nRedis limiter acquires per second (median of {rounds} rounds × {seconds:g} s; ratio: to the floor of "
        f"the same round)\nRedis {server}, python {platform.python_version()}, redis-py {version('redis')}, limits "
        f"{version('limits')}, throttled-py {version('throttled-py')}\n"
    )
    header = f"{'case':44s}" + "".join(f"{f'{t} task' + ('s' if t > 1 else ''):>24s}" for t in concurrency)
    print(header)
    print("-" * len(header))
    for case in cases:
        if case.error is not None:
            print(f"{case.label:44s}  skipped: {case.error}")
            continue
        cells = ""
        for tasks in concurrency:
            rate = statistics.median(case.rates[tasks])
            ratio = statistics.median(case.ratios[tasks])
            cells += f"{rate:>12,.0f}/s {ratio:>8.2f}×"
        print(f"{case.label:44s}{cells}")
    strict, lease = cases[1], cases[2]
    others = [c for c in cases[3:] if c.error is None]
    print()
    for tasks in concurrency:
        s = statistics.median(strict.ratios[tasks])
        le = statistics.median(lease.ratios[tasks])
        best_other = max((statistics.median(c.ratios[tasks]) for c in others), default=0.0)
        print(
            f"{tasks:>2} task(s): strict {s:.2f}× floor (target ≥ {TARGET_STRICT}: "
            f"{'met' if s >= TARGET_STRICT else 'NOT met'}); faster than every other library: "
            f"{'yes' if s > best_other else 'NO'} (best other {best_other:.2f}×); lease {le:.2f}× floor "
            f"(target ≥ {TARGET_LEASE}: {'met' if le >= TARGET_LEASE else 'NOT met'})"
        )


#: exit status of a benchmark that could not run here (no redis-server, a library missing): the autotools
#: convention for a skipped test, which ``python -m benchmarks`` reports as "skipped"
SKIPPED = 77


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    from ragguard.testing.redis_server import RedisServer

    with RedisServer() as server:
        yield server.url


def redis_version(url: str) -> str:
    """The server's ``redis_version`` (``INFO server``), or ``"?"``."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()
    except Exception:  # a version we cannot read is no reason to stop the benchmark
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.redis_limiter", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--redis-url", help="use this Redis (it gets keys under bench:/LIMITS/throttled)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, --quick 3)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per case per round (0.4, quick 0.15)")
    parser.add_argument("--tasks", type=int, action="append", help="concurrency (repeatable; default 1 and 64)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    seconds = args.seconds or (0.15 if args.quick else 0.4)
    concurrency = args.tasks or [1, 64]
    try:
        import redis  # noqa: F401
    except ImportError:
        print("redis_limiter skipped: redis-py is not installed (pip install -e '.[dev]')")
        return SKIPPED
    if not args.redis_url:
        from ragguard.testing.redis_server import find_redis_server

        try:
            find_redis_server()
        except RuntimeError as exc:
            print(f"redis_limiter skipped: {exc}")
            return SKIPPED
    with redis_url(args.redis_url) as url:
        server_version = redis_version(url)
        cases = asyncio.run(run(url, rounds, seconds, concurrency))
    report(cases, concurrency, rounds, seconds, server_version)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "benchmarks.redis_limiter",
                    "redis_version": server_version,
                    "rounds": rounds,
                    "seconds": seconds,
                    "cases": {
                        c.label: {
                            "error": c.error,
                            "rates": c.rates,
                            "ratios": c.ratios,
                            "median_rate": {t: statistics.median(r) for t, r in c.rates.items()},
                            "median_ratio": {t: statistics.median(r) for t, r in c.ratios.items()},
                        }
                        for c in cases
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
