"""``ragguard.health()`` / ``ahealth()``: what an operator's /health and /ready endpoints return."""

from __future__ import annotations

import json

import pytest

import ragguard


@pytest.mark.anyio
async def test_a_fresh_backend_is_ok_and_an_open_breaker_makes_it_not_ready() -> None:
    backend = ragguard.MemoryBackend()
    guarded = ragguard.guard(
        _Service(),
        ragguard.Policy(
            retry={"enabled": False}, breaker={"failure_threshold": 2}, rate_limit={"rpm": 600, "tpm": 60_000}
        ),
        methods={"search": None},
        backend=backend,
    )
    report = await ragguard.ahealth([backend])
    assert report.status == "ok"
    assert report.ready
    assert [b.state for b in report.breakers] == ["closed"]
    [limiter] = report.limiters
    assert limiter.rpm == 600
    assert limiter.available_requests == pytest.approx(5.0)  # 600/min × 0.5 s of burst
    [bulkhead] = report.bulkheads
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await guarded.search(fail=True)
    report = await ragguard.ahealth([backend])
    assert report.status == "down"
    assert not report.ready
    assert report.live
    [breaker] = report.breakers
    assert breaker.state == "open"
    assert breaker.retry_after_s is not None
    assert breaker.retry_after_s > 0
    json.dumps(report.model_dump(mode="json"))  # ready for a JSON endpoint


def test_the_sync_form_and_the_cli() -> None:
    import subprocess
    import sys

    report = ragguard.health([ragguard.MemoryBackend()])
    assert report.status == "ok"
    done = subprocess.run([sys.executable, "-m", "ragguard", "health"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ready"] is True
    down = subprocess.run(
        [sys.executable, "-m", "ragguard", "health", "--redis", "redis://127.0.0.1:9/0", "--fail-closed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1
    assert json.loads(down.stdout)["backends"][-1]["reachable"] is False


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio-only
async def test_an_unreachable_fail_closed_redis_is_not_ready(anyio_backend: str) -> None:
    backend = ragguard.RedisBackend("redis://127.0.0.1:9/0", on_unavailable="fail_closed", timeout=0.2)
    report = await ragguard.ahealth([backend])
    assert [b.reachable for b in report.backends] == [False]
    assert not report.ready
    assert report.status == "down"


class _Service:
    async def search(self, *, fail: bool = False) -> str:
        if fail:
            raise ConnectionError("down")
        return "ok"
