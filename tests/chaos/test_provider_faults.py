"""The provider-fault matrix: a guarded ``AsyncOpenAI`` under a concurrent mixed load (embeddings, chat, streamed
chat) while the simulator injects one fault, then the harness's invariants (tests/chaos/_harness.py).

Fast tier: ~150-250 calls per fault, the fault on for the whole load or a burst at its start. Long tier (``--long``):
sustained load for ``RAGGUARD_CHAOS_SECONDS`` (default 60) seconds per fault, bursty faults cycling on and off.
The openai SDK is driven on asyncio here (its async client is asyncio-first); guard-level cancellation is tested on
trio too (test_cancellation.py).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

import ragguard
from ragguard.testing import OpenAISimulator, Served, SimulatorStats

from ._harness import (
    CALM,
    EMBED_MODEL,
    TOLERANCE_S,
    Ledger,
    asim,
    breakers_close,
    call_problems,
    core_of,
    count_tasks,
    guarded_client,
    pool_problems,
    run_load,
    settle,
    sim_configure,
    sim_outage,
    sim_stats,
    state_problems,
    summarize,
)

pytestmark = [pytest.mark.chaos, pytest.mark.openai]

#: seconds of load per fault in the long tier
LONG_SECONDS = float(os.environ.get("RAGGUARD_CHAOS_SECONDS", "60"))
#: long tier: a bursty fault is on this long, then off for LONG_CALM_S, over and over
LONG_BURST_S = 8.0
LONG_CALM_S = 7.0
#: long tier: calls offered per second (at most)
LONG_RATE = 150.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def policy(**sections: Any) -> ragguard.Policy:
    """The matrix's policy: short timeouts and a quick breaker so faults show within seconds; a small cache so it
    evicts under load (its bound is checked)."""
    base: dict[str, Any] = {
        "retry": {"attempts": 4, "base": 0.05, "cap": 0.4},
        "breaker": {
            "failure_rate": 0.5,
            "window": 40,
            "min_calls": 20,
            "failure_threshold": 20,
            "open_duration": 1.0,
            "half_open_probes": 1,
            "half_open_max_wait": 5.0,
        },
        "timeout": {"attempt": 1.0, "total": 5.0},
        "concurrency": {"max_in_flight": 24, "max_queue": 10_000},
        "cache": {"max_entries": 64},
        # embeddings micro-batched across callers (its send slots and open batches are checked after the run)
        "batching": {"enabled": True, "max_wait": 0.005, "max_in_flight": 4},
    }
    base.update(sections)
    return ragguard.Policy(**base)


def _faults(*names: str) -> Callable[[SimulatorStats], int]:
    return lambda stats: sum(stats.faults.get(name, 0) for name in names)


@dataclass(frozen=True)
class Fault:
    """One row of the matrix."""

    name: str
    #: simulator settings while the fault is on
    during: dict[str, Any] = field(default_factory=dict)
    #: simulator settings for the whole scenario (e.g. a small quota)
    sim: dict[str, Any] = field(default_factory=dict)
    #: the fault is the simulator's outage (every request answered 500) rather than ``during``
    outage: bool = False
    #: fast tier: the fault lasts this long from the load's start, then heals while the load goes on
    #: (``None``: the whole load); long tier: on LONG_BURST_S, off LONG_CALM_S, repeatedly
    burst: float | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    mix: tuple[str, ...] = ("embed", "chat", "stream")
    #: how many times the fault was injected, from the simulator's stats (must be > 0)
    injected: Callable[[SimulatorStats], int] = field(default_factory=_faults)
    #: share of calls that must end with their answer
    min_ok: float = 0.0


FAULTS = [
    # a small provider quota (1,500 RPM per model: 25/s, a bucket of 12) and a local limiter set 40× too high
    Fault(
        "rate_limit_storm",
        sim={"rpm": 1_500, "burst_seconds": 0.5},
        # not corrected by the provider's x-ratelimit-* headers either: only 429s and Retry-After pace the calls
        policy={"rate_limit": {"rpm": 60_000, "follow_headers": False}},
        injected=lambda stats: stats.rate_limited_total,
        min_ok=0.25,
    ),
    Fault("error_burst", during={"error_rate": 0.7}, burst=1.5, injected=_faults("error_500", "error_503")),
    Fault("outage", outage=True, burst=1.5, injected=_faults("outage")),
    Fault("dropped_connections", during={"drop_rate": 0.3}, injected=_faults("drop"), min_ok=0.5),
    # stalls of 30 s against a 1 s attempt timeout, embeddings micro-batched: stalled batches hold the send slots, and
    # the callers queued behind them must still end within the total deadline (targeted:
    # test_batched_embeddings_end_within_the_total_deadline below)
    Fault("stalls", during={"stall_rate": 0.15}, injected=_faults("stall"), min_ok=0.5),
    # 0.3 s late against a 1 s attempt timeout: nothing may fail
    Fault("slow_responses", during={"slow_rate": 0.4}, injected=_faults("slow"), min_ok=1.0),
    Fault("malformed_json", during={"malformed_rate": 0.3}, injected=_faults("malformed"), min_ok=0.5),
    Fault(
        "wrong_content_type",
        during={"wrong_content_type_rate": 0.3},
        mix=("embed", "chat"),
        injected=_faults("wrong_content_type"),
        min_ok=0.5,
    ),
    # streams answered 200 with an HTML page (no SSE event): each such attempt fails with the SDK's
    # APIResponseValidationError and is retried like any malformed answer (it was once handed to the caller as an
    # empty stream that ended without error)
    Fault(
        "wrong_content_type_streams",
        during={"wrong_content_type_rate": 0.3},
        mix=("stream",),
        injected=_faults("wrong_content_type"),
        min_ok=0.5,
    ),
    Fault(
        "truncated_streams",
        during={"stream_break_rate": 0.4, "stream_break_style": "truncate"},
        mix=("stream", "stream", "embed", "chat"),
        injected=_faults("stream_break"),
        min_ok=0.3,
    ),
    Fault(
        "broken_streams",
        during={"stream_break_rate": 0.4, "stream_break_style": "disconnect"},
        mix=("stream", "stream", "embed", "chat"),
        injected=_faults("stream_break"),
        min_ok=0.3,
    ),
]


def _load(fault: Fault, long_tier: bool) -> dict[str, Any]:
    """How much load: fast tier, 150 calls as fast as 32 callers go, or for a burst, an offered 60 calls/s until
    2.5 s after the burst ends (the breaker must close again under load); long tier, 64 callers offering up to
    LONG_RATE calls/s for LONG_SECONDS."""
    if long_tier:
        return {"calls": 10_000_000, "concurrency": 64, "duration": LONG_SECONDS, "rate": LONG_RATE}
    if fault.burst is not None:
        return {"calls": 10_000, "concurrency": 32, "duration": fault.burst + 2.5, "rate": 60.0}
    return {"calls": 150, "concurrency": 32}


async def _drive(fault: Fault, served: Served[OpenAISimulator], long_tier: bool, done: anyio.Event) -> None:
    """Switch the fault on and off over the load (see :attr:`Fault.burst`); it is on when this starts."""
    if fault.burst is None:
        return
    on_s, off_s = (LONG_BURST_S, LONG_CALM_S) if long_tier else (fault.burst, math.inf)
    while True:
        with anyio.move_on_after(on_s):
            await done.wait()
        await _heal(fault, served)
        if done.is_set():
            return
        with anyio.move_on_after(off_s):
            await done.wait()
        if done.is_set():
            return
        await _break(fault, served, on_s)


async def _break(fault: Fault, served: Served[OpenAISimulator], seconds: float) -> None:
    if fault.outage:
        await asim(sim_outage, served, seconds)
    else:
        await asim(sim_configure, served, **fault.during)


async def _heal(fault: Fault, served: Served[OpenAISimulator]) -> None:
    if fault.outage:
        await asim(sim_outage, served, 0)
    else:
        await asim(sim_configure, served, **{name: CALM[name] for name in fault.during})


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: getattr(f, "name", None))
async def test_invariants_hold_under_provider_fault(
    fault: Fault, chaos_sim: Served[OpenAISimulator], long_tier: bool
) -> None:
    served = chaos_sim
    await asim(sim_configure, served, **{**CALM, **fault.sim})
    await asim(served.reset)
    tasks_before = count_tasks()
    p = policy(**fault.policy)
    backend = ragguard.MemoryBackend()
    client = guarded_client(served, p, backend)
    total = p.timeout.total or math.inf
    ledger = Ledger()
    started = time.monotonic()
    await _break(fault, served, fault.burst or LONG_BURST_S)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drive, fault, served, long_tier, done)
        await run_load(client, ledger, seed=7, mix=fault.mix, label=fault.name, **_load(fault, long_tier))
        done.set()
    await _heal(fault, served)
    load_calls = ledger.issued
    ok = ledger.outcomes()["ok"]
    stats = await asim(sim_stats, served)

    violations = call_problems(ledger, total)
    if fault.injected(stats) == 0:
        violations.append(f"the fault was never injected: {stats.faults}, {stats.rate_limited}")
    if ok < fault.min_ok * load_calls:
        violations.append(f"only {ok} of {load_calls} calls answered: {dict(ledger.outcomes())}")
    recovery = Ledger(start=ledger.issued, issued=ledger.issued)
    open_duration = p.breaker.open_duration
    violations += await breakers_close(client, backend, within=open_duration + 4.0, label=fault.name, ledger=recovery)
    violations += call_problems(recovery, total)
    ledger.records.update(recovery.records)
    ledger.issued = recovery.issued

    async def leaks() -> list[str]:
        found = state_problems(core_of(client)) + pool_problems(client)
        in_flight = (await asim(sim_stats, served)).in_flight
        if in_flight:
            found.append(f"the simulator is still answering {in_flight} requests")
        return found

    leaked = await settle(leaks)
    await client.close()

    async def tasks() -> list[str]:
        after = count_tasks()
        if tasks_before is not None and after is not None and after > tasks_before:
            return [f"{after - tasks_before} tasks more than before the run"]
        return []

    leaked += await settle(tasks)
    violations += leaked
    summarize(fault.name, ledger, stats, time.monotonic() - started, len(leaked))
    assert violations == []


@pytest.mark.anyio
async def test_batched_embeddings_end_within_the_total_deadline(chaos_sim: Served[OpenAISimulator]) -> None:
    served = chaos_sim
    await asim(sim_configure, served, **{**CALM, "stall_rate": 1.0})
    await asim(served.reset)
    p = ragguard.Policy(
        retry={"attempts": 1},
        breaker={"enabled": False},
        timeout={"attempt": 0.5, "total": 0.5},
        batching={"enabled": True, "max_wait": 0.001, "max_in_flight": 1},
        cache={"enabled": False},
        coalesce={"enabled": False},
    )
    client = guarded_client(served, p, ragguard.MemoryBackend())
    took: list[float] = []
    errors: list[Exception] = []

    async def embed(index: int) -> None:
        await anyio.sleep(0.05 * index)  # one batch each: the batch timer is 1 ms
        started = time.monotonic()
        try:
            await client.embeddings.create(model=EMBED_MODEL, input=f"deadline {index}")
        except Exception as exc:
            errors.append(exc)
        took.append(time.monotonic() - started)

    async with anyio.create_task_group() as tg:
        for index in range(5):
            tg.start_soon(embed, index)
    await client.close()
    await asim(sim_configure, served, **CALM)
    # every call stalled: each ends with a typed error within its total deadline, the wait for the only send slot
    # included (it was once outside the deadline: aembed gave the batcher none)
    assert len(errors) == 5
    assert all(isinstance(exc, ragguard.RagGuardError) for exc in errors)
    assert max(took) <= 0.5 + TOLERANCE_S, sorted(took)
