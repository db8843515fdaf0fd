"""Hedged requests against a heavy-tailed latency: tail latency without and with a p90 hedge, and what it costs
upstream, measured in the same run.

Two workloads, each run twice (``unhedged``, then ``hedged p90``) with the same seed:

1. **In process.** An ``async`` function whose latency is lognormal (median ``--median-ms``, σ ``--sigma``: a
   classic heavy tail, p99 ≈ 10× the median at σ = 1), called ``--calls`` times at ``--rate`` calls per second,
   directly or through :class:`ragguard.guards.hedge.Hedge`. Upstream load is counted at the function.
2. **OpenAI simulator.** ``embeddings.create`` through the real ``openai`` SDK and a guarded client
   (``ragguard.guard(AsyncOpenAI(...), Policy(hedge=...))``) against ragguard's OpenAI simulator served on
   loopback in a child process, with ``--stall-rate`` of the answers held ``--stall-s`` seconds (a provider's
   occasional stuck request) on top of a 20 ms ± 50 % latency, at ``--sim-rate`` calls per second (64-dimension
   vectors, so the client's CPU stays out of the picture). Upstream load is what the simulator counted.

The hedged mode sends one hedge after the 90th percentile of the last 200 latencies (100 ms until 20 are known),
every hedge granted by a retry budget of ``--ratio`` × requests per 10 s window and no floor
(``min_retries_per_s=0``), so the extra upstream load can never pass ``--ratio``: the table shows it does not.

Calls arrive open-loop, at a fixed rate whatever the answers do (a closed loop of workers would send fewer calls
while some are stalled, hiding the tail it should measure: "coordinated omission"). A call's latency runs from
the moment it was due to be sent to its answer, so any queueing in the client counts.

Run from the repository root::

    python -m benchmarks.hedging            # full run (~1.5 minutes on 2 cores)
    python benchmarks/hedging.py --quick    # ~40 s, rougher tails
    python -m benchmarks.hedging --json results.json

The simulator part needs the ``openai`` and ``testing`` extras (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import ragguard
from ragguard.guards.budget import RetryBudget
from ragguard.guards.hedge import Hedge

EMBED_MODEL = "text-embedding-3-small"
API_KEY = "sk-bench-hedging-0000000000"
MODES = ("unhedged", "hedged p90")
#: the hedged mode's settings (the same in both workloads)
HEDGE = {"percentile": 90.0, "delay": 0.1, "window": 200, "min_samples": 20, "max_hedges": 1}
QUANTILES = (50.0, 90.0, 99.0, 99.9)
#: short vectors: decoding 1,536 floats per answer would make the client's CPU, not the provider, the bottleneck
#: on a 2-core machine that also runs the simulator
DIMENSIONS = 64


@dataclass
class ModeResult:
    """One workload run in one mode."""

    workload: str
    mode: str
    calls: int
    latencies: list[float] = field(default_factory=list)
    upstream: int = 0
    hedges: int = 0
    wins: int = 0
    refused: int = 0
    delay: float | None = None
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def quantile(self, q: float) -> float:
        """Nearest-rank ``q``-th percentile of the latencies, seconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan
        return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]

    @property
    def extra_load(self) -> float:
        """Upstream requests beyond one per call, as a fraction of the calls."""
        return self.upstream / self.calls - 1.0 if self.calls else 0.0


async def _open_loop(result: ModeResult, rate: float, call: Callable[[int], Awaitable[Any]]) -> None:
    """``result.calls`` calls, call ``i`` due at ``i / rate`` seconds, each timed from when it was due."""

    async def one(i: int, due: float) -> None:
        try:
            await call(i)
        except Exception as exc:  # counted, not timed; cancellation propagates
            result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
            return
        result.latencies.append(time.perf_counter() - due)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(result.calls):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await anyio.sleep(wait)
            tg.start_soon(one, i, due)
    result.wall_s = time.perf_counter() - start


# --- 1. in process ------------------------------------------------------------------------------------------


async def _inprocess_mode(mode: str, args: argparse.Namespace) -> ModeResult:
    result = ModeResult("in process", mode, args.calls)
    rng = random.Random(args.seed)
    mu = math.log(args.median_ms / 1000.0)

    async def upstream() -> None:
        result.upstream += 1
        await anyio.sleep(rng.lognormvariate(mu, args.sigma))

    hedge: Hedge | None = None
    if mode != "unhedged":
        budget = RetryBudget(ratio=args.ratio, min_retries_per_s=0.0, window_s=10.0)
        hedge = Hedge(**HEDGE, budget=budget)  # type: ignore[arg-type]

    async def call(i: int) -> None:
        if hedge is None:
            await upstream()
        else:
            await hedge.call(upstream)

    await _open_loop(result, args.rate, call)
    if hedge is not None:
        stats = hedge.stats()
        result.hedges, result.wins, result.refused, result.delay = stats.hedges, stats.wins, stats.refused, stats.delay
    return result


def measure_inprocess(args: argparse.Namespace) -> list[ModeResult]:
    return [asyncio.run(_inprocess_mode(mode, args)) for mode in MODES]


# --- 2. OpenAI simulator ------------------------------------------------------------------------------------


def _policy(mode: str, args: argparse.Namespace) -> ragguard.Policy:
    return ragguard.Policy(
        hedge={"enabled": mode != "unhedged", **HEDGE},  # type: ignore[arg-type]
        retry_budget={"ratio": args.ratio, "min_retries_per_s": 0.0, "window_s": 10.0},  # type: ignore[arg-type]
        # every call goes upstream: nothing may be answered by the call-saving layers
        cache={"enabled": False},  # type: ignore[arg-type]
        coalesce={"enabled": False},  # type: ignore[arg-type]
        timeout={"attempt": 30.0, "total": 60.0},  # type: ignore[arg-type]
    )


async def _openai_mode(mode: str, args: argparse.Namespace, base_url: str, control: Any) -> ModeResult:
    from openai import AsyncOpenAI

    result = ModeResult("openai simulator", mode, args.calls)
    client = ragguard.guard(
        AsyncOpenAI(base_url=base_url, api_key=API_KEY), _policy(mode, args), backend=ragguard.MemoryBackend()
    )
    try:
        await client.embeddings.create(model=EMBED_MODEL, input="warm-up")  # connection and lazy imports, untimed
        (await control.post("/_sim/reset")).raise_for_status()

        async def call(i: int) -> None:
            await client.embeddings.create(model=EMBED_MODEL, input=f"benchmark text {i}", dimensions=DIMENSIONS)

        await _open_loop(result, args.sim_rate, call)
        response = await control.get("/_sim/stats")
        response.raise_for_status()
        result.upstream = int(response.json()["requests_total"])
        core: Any = client.ragguard  # type: ignore[attr-defined]
        for guard in core.pipeline("embeddings", EMBED_MODEL).guards:
            if isinstance(guard, Hedge):
                stats = guard.stats()
                result.hedges, result.wins, result.refused = stats.hedges, stats.wins, stats.refused
                result.delay = stats.delay
    finally:
        await client.close()
    return result


async def _openai(url: str, base_url: str, args: argparse.Namespace) -> list[ModeResult]:
    import httpx

    results = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as control:
        for mode in MODES:
            results.append(await _openai_mode(mode, args, base_url, control))
    return results


def measure_openai(args: argparse.Namespace) -> list[ModeResult]:
    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    config = SimulatorConfig(
        rpm=None,
        tpm=None,
        base_latency_s=0.02,
        per_token_latency_s=0.0,
        jitter=0.5,
        stall_rate=args.stall_rate,
        stall_s=args.stall_s,
        seed=args.seed,
    )
    with serve(OpenAISimulator(config), mode="process") as server:
        return asyncio.run(_openai(server.url, server.base_url, args))


# --- report -------------------------------------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:,.1f}"


def report(results: list[ModeResult], title: str, args: argparse.Namespace) -> dict[str, Any]:
    from rich.table import Table

    console = _console()
    table = Table(
        title=title,
        caption="latency: the caller's, ms (nearest-rank percentiles) · upstream: requests the provider saw · "
        f"extra load: upstream ÷ calls − 1; the retry budget allows at most {args.ratio:.0%} (no floor)",
    )
    headers = ("mode", *(f"p{q:g}" for q in QUANTILES), "max", "upstream", "extra load", "hedges", "won", "refused")
    for header in headers:
        table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True)
    rows = []
    for r in results:
        table.add_row(
            f"[bold cyan]{r.mode}[/]" if r.mode != "unhedged" else r.mode,
            *(_ms(r.quantile(q)) for q in QUANTILES),
            _ms(max(r.latencies) if r.latencies else None),
            f"{r.upstream:,}",
            f"{r.extra_load:+.1%}",
            f"{r.hedges:,}",
            f"{r.wins:,}",
            f"{r.refused:,}",
        )
        rows.append(
            {
                "mode": r.mode,
                "calls": r.calls,
                "succeeded": len(r.latencies),
                "errors": r.errors,
                "wall_s": round(r.wall_s, 3),
                **{f"p{q:g}_ms": round(r.quantile(q) * 1000, 2) for q in QUANTILES},
                "max_ms": round(max(r.latencies) * 1000, 2) if r.latencies else None,
                "upstream": r.upstream,
                "extra_load": round(r.extra_load, 4),
                "hedges": r.hedges,
                "hedge_wins": r.wins,
                "refused": r.refused,
                "final_delay_ms": None if r.delay is None else round(r.delay * 1000, 2),
            }
        )
    console.print(table)
    base, hedged = results[0], results[-1]
    verdict: dict[str, Any] = {}
    for q in (99.0, 99.9):
        before, after = base.quantile(q), hedged.quantile(q)
        verdict[f"p{q:g}_ratio"] = round(before / after, 2) if after else None
    within = hedged.extra_load <= args.ratio + 1e-9
    verdict["within_budget"] = within
    console.print(
        f"  p99: {_ms(base.quantile(99))} → {_ms(hedged.quantile(99))} ms "
        f"([green]{verdict['p99_ratio']}× lower[/]); p99.9: {verdict['p99.9_ratio']}× lower; "
        f"p50: {_ms(base.quantile(50))} → {_ms(hedged.quantile(50))} ms; "
        f"extra upstream load {hedged.extra_load:.1%} ({hedged.hedges:,} hedges for {hedged.calls:,} calls, "
        f"{hedged.refused:,} refused by the budget) — "
        + ("[green]within[/]" if within else "[red]over[/]")
        + f" the {args.ratio:.0%} budget; final hedge delay {_ms(hedged.delay)} ms"
    )
    for r in results:
        if r.errors:
            console.print(f"  {r.mode} failures: " + ", ".join(f"{k} × {v:,}" for k, v in sorted(r.errors.items())))
    return {"modes": rows, **verdict}


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ragguard", "anyio", "openai", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hedging",
        description="Tail latency without and with a p90 hedge (in process: lognormal latency; through the "
        "openai SDK: the OpenAI simulator with stalls), and the extra upstream load it costs.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls (rougher tails)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--only", choices=("inprocess", "openai"), help="run one of the two workloads")
    parser.add_argument("--calls", type=int, help="calls per mode and workload (default 2000, --quick 800)")
    parser.add_argument("--rate", type=float, default=500.0, help="in process: calls per second (500)")
    parser.add_argument("--sim-rate", type=float, default=50.0, help="simulator: calls per second (50)")
    parser.add_argument("--median-ms", type=float, default=20.0, help="in process: median latency, ms (20)")
    parser.add_argument("--sigma", type=float, default=1.0, help="in process: lognormal sigma (1.0)")
    parser.add_argument("--stall-rate", type=float, default=0.03, help="simulator: share of stalled answers (0.03)")
    parser.add_argument("--stall-s", type=float, default=1.5, help="simulator: stall length, seconds (1.5)")
    parser.add_argument("--ratio", type=float, default=0.2, help="retry budget: hedges per request (0.2)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the latencies and faults (7)")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 800 if args.quick else 2000
    if args.calls < 1 or min(args.rate, args.sim_rate, args.median_ms, args.sigma) <= 0 or args.stall_s < 0:
        parser.error("--calls must be >= 1, --rate, --sim-rate, --median-ms and --sigma > 0, --stall-s >= 0")

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "benchmarks.hedging",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
        "hedge": HEDGE,
        "calls": args.calls,
        "rate_per_s": args.rate,
        "sim_rate_per_s": args.sim_rate,
        "budget_ratio": args.ratio,
    }
    if args.only in (None, "inprocess"):
        title = (
            f"{args.calls:,} calls at {args.rate:g}/s to an async function of lognormal latency "
            f"(median {args.median_ms:g} ms, σ {args.sigma:g})"
        )
        results["inprocess"] = report(measure_inprocess(args), title, args)
    if args.only in (None, "openai"):
        try:
            import openai  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            print(f"simulator part skipped: {exc.name} is not installed (pip install -e '.[dev]')", file=sys.stderr)
        else:
            title = (
                f"{args.calls:,} embeddings calls at {args.sim_rate:g}/s, openai SDK + ragguard.guard → "
                f"OpenAI simulator (20 ms ± 50 %, {args.stall_rate:.0%} of answers stalled {args.stall_s:g} s)"
            )
            results["openai"] = report(measure_openai(args), title, args)
    wall_s = time.perf_counter() - started
    results["wall_seconds"] = round(wall_s, 1)
    _console().print(
        f"[dim]{wall_s:.0f} s in all; Python {platform.python_version()}, {os.cpu_count()} CPUs. These machines are "
        "shared and noisy: trust ratios from one run over absolute figures.[/]"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2, ensure_ascii=False)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
