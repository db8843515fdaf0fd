"""The window bound across OS processes: 4 processes share one Redis bucket, each acquiring as fast as it may.

Property: over any window of ``w`` seconds, the admissions of all processes together stay within
``capacity + rate × w`` (strict mode), and within ``capacity + rate × w + lease × instances`` in lease mode,
checked on every window spanned by two admissions of the merged timestamps.

The timestamps are each process's ``time.time()`` right after ``acquire`` returned (one clock for every process
on this machine). A process scheduled late records its admission late, which can only bunch admissions by the
delay, so the check allows ``rate × TOLERANCE`` more (about two admissions).
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from typing import Any

import anyio
import pytest

from ragguard.backends.redis import RedisBackend
from ragguard.guards.shared_limiter import SharedRateLimiter

PROCESSES = 4
RPM = 3_000.0  # 50 requests per second
BURST = 0.2  # capacity: 10 requests
RATE = RPM / 60.0
CAPACITY = RATE * BURST
#: seconds of scheduling delay tolerated between an admission and its timestamp
TOLERANCE = 0.05


def _worker(url: str, name: str, lease: int | None, duration: float, barrier: Any, out: Any) -> None:
    async def main() -> tuple[list[float], dict[str, int], int]:
        # fail_closed with a long timeout: a fallback admission would not be bounded by the shared bucket
        backend = RedisBackend(url, timeout=2.0, on_unavailable="fail_closed")
        limiter = SharedRateLimiter(backend, rpm=RPM, burst_seconds=BURST, name=name, lease=lease)
        await backend.ping()
        stamps: list[float] = []
        errors = 0
        barrier.wait(30)
        end = time.time() + duration
        while True:
            try:
                await limiter.acquire(1)
            except Exception:
                errors += 1
                continue
            now = time.time()
            if now >= end:
                break
            stamps.append(now)
        await backend.aclose()
        return stamps, limiter.stats(), errors

    out.put(anyio.run(main, backend="asyncio"))


def run_processes(url: str, lease: int | None, duration: float) -> tuple[list[list[float]], list[dict[str, int]]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    name = f"test:{uuid.uuid4().hex}"
    procs = [
        ctx.Process(target=_worker, args=(url, name, lease, duration, barrier, out), daemon=True)
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=duration + 60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert all(errors == 0 for _, _, errors in results), [errors for _, _, errors in results]
    return [stamps for stamps, _, _ in results], [stats for _, stats, _ in results]


def worst_excess(stamps: list[float], slack: float) -> float:
    """max over every window [t_i, t_j] of (admissions in it) - (capacity + rate × (length + TOLERANCE) + slack)."""
    worst = -float("inf")
    for i, start in enumerate(stamps):
        for j in range(i, len(stamps)):
            excess = (j - i + 1) - (CAPACITY + RATE * (stamps[j] - start + TOLERANCE) + slack)
            if excess > worst:
                worst = excess
    return worst


@pytest.mark.parametrize(("lease", "duration"), [(None, 10.0), (5, 4.0)], ids=["strict", "lease"])
def test_admissions_in_any_window_stay_within_the_bound(redis_url: str, lease: int | None, duration: float) -> None:
    per_process, stats = run_processes(redis_url, lease, duration)
    stamps = sorted(t for process in per_process for t in process)
    slack = (lease or 0) * PROCESSES
    assert worst_excess(stamps, slack) <= 0.0
    # the processes were not starved: together they used most of the quota, each a fair part of it
    assert len(stamps) >= 0.8 * RATE * duration
    assert min(len(process) for process in per_process) >= 0.1 * len(stamps)
    for process, counters in zip(per_process, stats, strict=True):
        if lease is None:  # one round trip per admission at least
            assert counters["round_trips"] >= len(process)
        else:  # most admissions spent a lease locally
            assert counters["lease_admissions"] >= 0.5 * len(process)
