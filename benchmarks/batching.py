"""Micro-batching throughput against a rate-limited provider, and cache-hit latency beside cashews and aiocache,
measured in the same run.

1. **Throughput.** ``--calls`` concurrent single-input ``embeddings.create`` calls (distinct texts, so no two
   inputs can be merged), through the real ``openai`` ``AsyncOpenAI`` SDK, against ragguard's OpenAI simulator
   served on loopback in a child process with an OpenAI-style quota (``--rpm`` requests and ``--tpm`` tokens per
   minute, one second of burst). Four modes, one after the other, the simulator reset in between:

   - ``naive``: a plain client with ``max_retries=0``; every 429 is a failed call;
   - ``sdk-default``: a plain client, the SDK's own retries (2, honouring ``retry-after-ms``);
   - ``guarded``: ``ragguard.guard(client, Policy(rate_limit={"rpm": …, "tpm": …}))``, one request per call;
   - ``guarded + batched``: the same with ``batching={"enabled": True}``: concurrent callers' inputs share
     upstream requests.

   Each mode gets ``--cap`` seconds; calls still running then are cancelled and counted as unfinished. Upstream
   requests and 429s come from the simulator (``GET /_sim/stats``). Throughput is succeeded calls ÷ the time the
   calls ran (the wall time, at most the cap: cancelling thousands of calls can take seconds), and each mode's is
   shown as a ratio to ``guarded + batched``'s.

2. **Cache-hit latency.** ragguard's in-memory :class:`ragguard.Cache` (``await cache.get(key)``) and
   ``@ragguard.cached()`` beside cashews (``mem://``: ``await cache.get``, ``@cache(ttl=…)``) and aiocache
   (``Cache.MEMORY``: ``await c.get``, ``@cached``), each hitting a warm entry, for two values: an embeddings
   response as a dict (one vector of 1,536 floats) and a short string. Timed like ``benchmarks/overhead.py``:
   ``n`` sequential awaits per repeat (``n`` calibrated to ``--target-ms``), repeats of all cases interleaved
   with a rotating order, median over repeats in µs per call, loop included.

Run from the repository root::

    python -m benchmarks.batching            # full run (~1.5 minutes on 2 cores)
    python benchmarks/batching.py --quick    # ~25 s, rougher figures
    python -m benchmarks.batching --json results.json

Competitor libraries that are not installed are skipped (``pip install -e '.[dev]'`` installs them all); the
throughput part needs the ``openai`` and ``testing`` extras.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import ragguard

EMBED_MODEL = "text-embedding-3-small"
API_KEY = "sk-ragguard-bench-not-a-real-key"
MODES = ("naive", "sdk-default", "guarded", "guarded + batched")
REFERENCE_MODE = "guarded + batched"
#: pause between two modes, seconds, before the simulator is reset
SETTLE_S = 1.0

Op = Callable[[], Awaitable[Any]]


# --- 1. throughput ------------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    """What one mode did."""

    mode: str
    calls: int
    succeeded: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: seconds from the first call to the last one's end, cancelling included
    wall_s: float = 0.0
    #: the mode's time cap, seconds
    cap_s: float = math.inf
    capped: bool = False
    upstream_requests: int = 0
    upstream_429: int = 0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def unfinished(self) -> int:
        return self.calls - self.succeeded - self.failed

    @property
    def active_s(self) -> float:
        """Seconds the calls ran: the wall time, but at most the cap (no call succeeds while being cancelled)."""
        return min(self.wall_s, self.cap_s)

    @property
    def calls_per_s(self) -> float:
        return self.succeeded / self.active_s if self.active_s > 0 else math.nan


def _text(i: int) -> str:
    return f"document {i}"


def _client(mode: str, base_url: str, rpm: float, tpm: float) -> Any:
    from openai import AsyncOpenAI

    if mode == "naive":
        return AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
    if mode == "sdk-default":
        return AsyncOpenAI(base_url=base_url, api_key=API_KEY)
    policy = ragguard.Policy(
        rate_limit={"rpm": rpm, "tpm": tpm},  # type: ignore[arg-type]
        batching={"enabled": mode == REFERENCE_MODE},  # type: ignore[arg-type]
    )
    # a backend per mode: no limiter or breaker state carries over from one mode to the next
    return ragguard.guard(AsyncOpenAI(base_url=base_url, api_key=API_KEY), policy, backend=ragguard.MemoryBackend())


async def _run_mode(mode: str, base_url: str, args: argparse.Namespace) -> ModeResult:
    result = ModeResult(mode=mode, calls=args.calls, cap_s=args.cap)
    client = _client(mode, base_url, args.rpm, args.tpm)
    create = client.embeddings.create

    async def one(i: int) -> None:
        try:
            await create(model=EMBED_MODEL, input=_text(i))
        except Exception as exc:  # cancellation (the cap) is not an Exception: it propagates
            name = type(exc).__name__
            result.errors[name] = result.errors.get(name, 0) + 1
        else:
            result.succeeded += 1

    started = time.perf_counter()
    try:
        with anyio.move_on_after(args.cap) as scope:
            async with anyio.create_task_group() as tg:
                for i in range(args.calls):
                    tg.start_soon(one, i)
        result.wall_s = time.perf_counter() - started
        result.capped = scope.cancelled_caught
    finally:
        await client.close()
    return result


async def _stats(control: Any) -> tuple[int, int]:
    response = await control.get("/_sim/stats")
    response.raise_for_status()
    stats = response.json()
    by_status = stats.get("responses_by_status", {})
    return int(stats["requests_total"]), int(by_status.get("429", by_status.get(429, 0)))


async def _throughput(
    url: str, base_url: str, args: argparse.Namespace, progress: Callable[[str], None]
) -> list[ModeResult]:
    import httpx
    from openai import AsyncOpenAI

    results: list[ModeResult] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as control:
        # warm-up, untimed: the SDK's lazy imports and the first connection would otherwise count against the
        # first mode only
        async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as warm:
            await warm.embeddings.create(model=EMBED_MODEL, input="warm-up")
        for index, mode in enumerate(args.modes):
            progress(f"throughput: {mode}")
            if index:
                # requests a cancelled mode had already sent may still be in the simulator: let them finish, or
                # they would land in the next mode's fresh quota
                await anyio.sleep(SETTLE_S)
            (await control.post("/_sim/reset")).raise_for_status()
            gc.collect()
            result = await _run_mode(mode, base_url, args)
            result.upstream_requests, result.upstream_429 = await _stats(control)
            results.append(result)
    return results


def measure_throughput(args: argparse.Namespace, progress: Callable[[str], None]) -> list[ModeResult]:
    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    simulator = OpenAISimulator(SimulatorConfig(rpm=args.rpm, tpm=args.tpm, seed=7))
    with serve(simulator, mode="process") as server:
        return asyncio.run(_throughput(server.url, server.base_url, args, progress))


# --- 2. cache-hit latency -----------------------------------------------------------------------------------


def _embedding_value() -> dict[str, Any]:
    """An embeddings response as a dict (what ``model_dump(mode="json")`` gives): one 1,536-float vector."""
    rng = random.Random(1536)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [rng.uniform(-0.1, 0.1) for _ in range(1536)]}],
        "model": EMBED_MODEL,
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }


#: the cached values, by case group
VALUES: dict[str, Callable[[], Any]] = {
    "embedding dict": _embedding_value,
    "short string": lambda: "The team plan includes ten seats; more can be added from the billing page.",
}

KEY = "document 42"

#: the ragguard row each row's ratio is taken against, by kind of access
RAGGUARD_GET = "ragguard Cache.get"
RAGGUARD_DECORATOR = "@ragguard.cached()"


@dataclass
class CacheCase:
    """One way of reading a warm cache entry."""

    group: str
    label: str
    #: builds and primes the zero-argument coroutine function to time (inside the running event loop); returns
    #: it and a check run after timing (``None`` when fine, else what went wrong, e.g. a miss)
    make: Callable[[Any], Awaitable[tuple[Op, Callable[[], str | None]]]]
    ours: bool = False
    #: the ragguard row this row's ratio is taken against (``None``: no ratio)
    vs: str | None = None
    note: str = ""
    samples_ns: list[float] = field(default_factory=list)
    n: int = 0
    error: str | None = None

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_ns) / 1000.0 if self.samples_ns else math.nan

    @property
    def min_us(self) -> float:
        return min(self.samples_ns) / 1000.0 if self.samples_ns else math.nan


def _fine() -> str | None:
    return None


def _hit_check(calls: list[int]) -> Callable[[], str | None]:
    """After timing, the decorated function must have run once (the priming call): anything else was a miss."""
    return lambda: None if calls[0] == 1 else f"the function ran {calls[0]} times: not every call was a hit"


def _decorated_source(value: Any, calls: list[int]) -> Callable[[str], Awaitable[Any]]:
    async def embed(text: str) -> Any:
        calls[0] += 1
        return value

    return embed


async def _noop_case(value: Any) -> tuple[Op, Callable[[], str | None]]:
    async def noop() -> None:
        pass

    return noop, _fine


def _ragguard_get(serializer: Callable[[], ragguard.Serializer] | None = None) -> Callable[..., Any]:
    async def make(value: Any) -> tuple[Op, Callable[[], str | None]]:
        cache = ragguard.Cache(ttl=3600.0, serializer=serializer() if serializer is not None else None)
        if not await cache.set(KEY, value):
            raise RuntimeError("ragguard Cache.set refused the value")
        get = cache.get
        if await get(KEY) != value:
            raise RuntimeError("ragguard Cache.get did not return the value set")
        return (lambda: get(KEY)), _fine

    return make


async def _ragguard_cached(value: Any) -> tuple[Op, Callable[[], str | None]]:
    calls = [0]
    fn = ragguard.cached(ttl=3600.0)(_decorated_source(value, calls))
    if await fn(KEY) != value:  # the miss that fills the entry
        raise RuntimeError("@ragguard.cached returned something else")
    return (lambda: fn(KEY)), _hit_check(calls)


def _cashews_cases(group: str) -> list[CacheCase]:
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        return []

    def new_cache() -> Any:
        # a private instance set up like the global ``cashews.cache`` (``cache.setup("mem://")``), so cases and
        # groups never share entries
        cache = CashewsCache()
        cache.setup("mem://")
        return cache

    async def get(value: Any) -> tuple[Op, Callable[[], str | None]]:
        cache = new_cache()
        await cache.set(KEY, value, expire=3600)
        get = cache.get
        if await get(KEY) != value:
            raise RuntimeError("cashews cache.get did not return the value set")
        return (lambda: get(KEY)), _fine

    async def decorator(value: Any) -> tuple[Op, Callable[[], str | None]]:
        cache = new_cache()
        calls = [0]
        fn = cache(ttl="1h")(_decorated_source(value, calls))
        if await fn(KEY) != value:
            raise RuntimeError("cashews @cache returned something else")
        return (lambda: fn(KEY)), _hit_check(calls)

    return [
        CacheCase(group, "cashews cache.get", get, vs=RAGGUARD_GET, note="mem://; hit not copied"),
        CacheCase(group, "cashews @cache(ttl=…)", decorator, vs=RAGGUARD_DECORATOR),
    ]


def _aiocache_cases(group: str) -> list[CacheCase]:
    try:
        import aiocache  # type: ignore[import-untyped]
    except ImportError:
        return []

    async def get(value: Any) -> tuple[Op, Callable[[], str | None]]:
        cache = aiocache.Cache(aiocache.Cache.MEMORY)
        await cache.set(KEY, value, ttl=3600)
        get = cache.get
        if await get(KEY) != value:
            raise RuntimeError("aiocache get did not return the value set")
        return (lambda: get(KEY)), _fine

    async def decorator(value: Any) -> tuple[Op, Callable[[], str | None]]:
        calls = [0]
        fn = aiocache.cached(ttl=3600)(_decorated_source(value, calls))
        if await fn(KEY) != value:
            raise RuntimeError("aiocache @cached returned something else")
        return (lambda: fn(KEY)), _hit_check(calls)

    return [
        CacheCase(group, "aiocache get", get, vs=RAGGUARD_GET, note="Cache.MEMORY; hit not copied"),
        CacheCase(group, "aiocache @cached", decorator, vs=RAGGUARD_DECORATOR),
    ]


def cache_cases() -> list[CacheCase]:
    cases: list[CacheCase] = []
    for group in VALUES:
        cases += [
            CacheCase(group, "await noop()", _noop_case, note="the loop's own cost"),
            CacheCase(group, RAGGUARD_GET, _ragguard_get(), ours=True, vs=RAGGUARD_GET, note="JSON decoded per hit"),
            CacheCase(group, RAGGUARD_DECORATOR, _ragguard_cached, ours=True, vs=RAGGUARD_DECORATOR),
        ]
        with contextlib.suppress(ImportError):
            ragguard.MsgpackSerializer()  # ImportError when msgpack is not installed: no msgpack row
            cases.append(
                CacheCase(
                    group,
                    "ragguard Cache.get, msgpack",
                    _ragguard_get(ragguard.MsgpackSerializer),
                    ours=True,
                    vs=RAGGUARD_GET,
                    note="msgpack decoded per hit",
                )
            )
        cases += _cashews_cases(group)
        cases += _aiocache_cases(group)
    return cases


async def _timed(op: Op, n: int) -> int:
    """Nanoseconds taken by ``n`` sequential ``await op()``."""
    loop = range(n)
    start = time.perf_counter_ns()
    for _ in loop:
        await op()
    return time.perf_counter_ns() - start


async def _calibrate(op: Op, target_ns: float) -> int:
    """Iterations that take about ``target_ns``; warms the case up on the way."""
    n = 16
    while True:
        elapsed = await _timed(op, n)
        if elapsed >= target_ns / 8 or n >= 1 << 24:
            return max(50, int(n * target_ns / max(elapsed, 1)))
        n *= 4


async def measure_cache(
    cases: list[CacheCase], *, repeats: int, target_ms: float, progress: Callable[[str], None]
) -> None:
    """Fill each case's ``samples_ns`` (ns per call, one sample per repeat)."""
    target_ns = target_ms * 1e6
    ops: dict[int, Op] = {}
    checks: dict[int, Callable[[], str | None]] = {}
    for index, case in enumerate(cases):
        try:
            op, check = await case.make(VALUES[case.group]())
            case.n = await _calibrate(op, target_ns)
            await _timed(op, case.n // 4)  # warm-up at full size
        except Exception as exc:
            case.error = f"{type(exc).__name__}: {exc}"
            continue
        ops[index], checks[index] = op, check
    order = list(ops)
    for round_ in range(repeats):
        progress(f"cache: round {round_ + 1}/{repeats}")
        shift = round_ % len(order) if order else 0
        for index in order[shift:] + order[:shift]:
            case = cases[index]
            gc.collect()
            elapsed = await _timed(ops[index], case.n)
            case.samples_ns.append(elapsed / case.n)
            await asyncio.sleep(0)
    for index, check in checks.items():
        problem = check()
        if problem is not None:
            cases[index].error = problem
            cases[index].samples_ns.clear()


# --- reporting ----------------------------------------------------------------------------------------------


def _times(x: float) -> str:
    """A multiple for the ratio columns: ``115×``, ``2.4×``."""
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ragguard", "anyio", "openai", "httpx", "cashews", "aiocache", "msgpack"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _console() -> Any:
    from rich.console import Console

    # Piped output (a file, CI logs) gets a table wide enough not to wrap; a terminal keeps its own width.
    return Console(width=None if sys.stdout.isatty() else 150)


def report_throughput(results: list[ModeResult], args: argparse.Namespace) -> list[dict[str, Any]]:
    from rich.table import Table

    console = _console()
    reference = next((r for r in results if r.mode == REFERENCE_MODE), None)
    table = Table(
        title=f"{args.calls:,} concurrent single-input embeddings calls, quota {args.rpm:,.0f} RPM / "
        f"{args.tpm:,.0f} TPM (OpenAI simulator on loopback, openai SDK)",
        caption=f"each mode capped at {args.cap:g} s: calls still running then are cancelled and count as unfinished "
        "(wall includes the cancelling) · upstream, 429s: as the simulator counted them · calls/s: succeeded ÷ "
        f"min(wall, cap) · ratio: this mode's calls/s ÷ {REFERENCE_MODE}'s",
    )
    for header in ("mode", "wall s", "succeeded", "failed", "unfinished", "upstream", "429s", "calls/s", "ratio"):
        table.add_column(header, justify="left" if header in ("mode", "ratio") else "right", no_wrap=True)
    rows: list[dict[str, Any]] = []
    for r in results:
        ratio = r.calls_per_s / reference.calls_per_s if reference is not None and reference.calls_per_s else None
        if ratio is None or r is reference:
            ratio_text = "1.00×" if r is reference else ""
        elif ratio < 1:
            ratio_text = f"{ratio:.3f}×  [red]{_times(1 / ratio)} lower[/]" if ratio > 0 else "0×"
        else:
            ratio_text = f"{ratio:.2f}×  [green]{_times(ratio)} higher[/]"
        table.add_row(
            f"[bold cyan]{r.mode}[/]" if r.mode.startswith("guarded") else r.mode,
            f"{r.wall_s:.2f}" + (f" (cap {r.cap_s:g})" if r.capped else ""),
            f"{r.succeeded:,} ({r.succeeded / r.calls:.0%})",
            f"{r.failed:,}",
            f"{r.unfinished:,}",
            f"{r.upstream_requests:,}",
            f"{r.upstream_429:,} ({r.upstream_429 / max(1, r.upstream_requests):.0%})",
            f"{r.calls_per_s:,.1f}",
            ratio_text,
        )
        rows.append(
            {
                "mode": r.mode,
                "calls": r.calls,
                "wall_s": round(r.wall_s, 4),
                "capped": r.capped,
                "active_s": round(r.active_s, 4),
                "succeeded": r.succeeded,
                "failed": r.failed,
                "unfinished": r.unfinished,
                "errors": r.errors,
                "upstream_requests": r.upstream_requests,
                "upstream_429": r.upstream_429,
                "calls_per_s": round(r.calls_per_s, 2),
                "ratio_to_reference": ratio,
            }
        )
    console.print(table)
    for r in results:
        if r.errors:
            console.print(f"  {r.mode} failures: " + ", ".join(f"{k} × {v:,}" for k, v in sorted(r.errors.items())))
    per_s = args.rpm / 60
    console.print(
        f"[dim]The quota admits {per_s:,.0f} requests/s (plus one second of burst): one input per request caps "
        f"unbatched throughput near {per_s:,.0f} calls/s however the calls are made.[/]"
    )
    return rows


def _ratio_text(row: float, reference: float, *, ours: bool) -> str:
    """``row ÷ reference``, spelt out: for a competitor, how ragguard compares; for a ragguard variant, how it
    compares with the default."""
    ratio = row / reference
    if ours:
        verdict = f"[green]{_times(1 / ratio)} faster[/]" if ratio <= 1 else f"[red]{_times(ratio)} slower[/]"
        return f"{ratio:.2f}×  {verdict}"
    if ratio >= 1.0:
        return f"{ratio:.2f}×  [green]ragguard {_times(ratio)} faster[/]"
    return f"{ratio:.2f}×  [red]ragguard {_times(1 / ratio)} slower[/]"


def report_cache(cases: list[CacheCase], args: argparse.Namespace) -> list[dict[str, Any]]:
    from rich.table import Table

    console = _console()
    table = Table(
        title="Cache-hit latency, in-memory caches (asyncio, one task, warm entry)",
        caption="µs/call: median over repeats, loop included · min: fastest repeat · ratio: this row ÷ the ragguard "
        "row it is compared with (> 1: ragguard is faster)",
    )
    table.add_column("value", style="dim")
    table.add_column("implementation")
    table.add_column("µs/call", justify="right")
    table.add_column("min", justify="right")
    table.add_column("ratio")
    table.add_column("vs")
    table.add_column("note", style="dim")
    rows: list[dict[str, Any]] = []
    previous_group = None
    for case in cases:
        if case.group != previous_group and previous_group is not None:
            table.add_section()
        previous_group = case.group
        label = f"[bold cyan]{case.label}[/]" if case.ours else case.label
        if case.error is not None:
            table.add_row(case.group, label, "—", "—", "", "", f"failed: {case.error}")
            rows.append({"group": case.group, "label": case.label, "ours": case.ours, "error": case.error})
            continue
        reference = next(
            (c for c in cases if c.group == case.group and c.label == case.vs and c.samples_ns and c is not case),
            None,
        )
        ratio = case.median_us / reference.median_us if reference is not None else None
        table.add_row(
            case.group,
            label,
            f"{case.median_us:.2f}",
            f"{case.min_us:.2f}",
            _ratio_text(case.median_us, reference.median_us, ours=case.ours) if reference is not None else "",
            reference.label if reference is not None else "",
            case.note,
        )
        rows.append(
            {
                "group": case.group,
                "label": case.label,
                "ours": case.ours,
                "median_us": case.median_us,
                "min_us": case.min_us,
                "samples_us": [s / 1000.0 for s in case.samples_ns],
                "iterations_per_repeat": case.n,
                "vs": reference.label if reference is not None else None,
                "ratio_to_ragguard": ratio,
                "note": case.note,
            }
        )
    console.print(table)
    console.print(
        "[dim]embedding dict: an embeddings response as a dict, one vector of 1,536 floats (~32 kB as JSON); short "
        "string: 74 characters. ragguard stores serialised bytes (JSON by default, never pickle) and decodes a "
        "fresh copy on every hit; cashews' and aiocache's memory backends hand back the stored object itself "
        "(not copied: a caller that mutates a hit mutates the cache).[/]"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching",
        description="Throughput of concurrent embeddings calls under a rate limit (naive, sdk-default, guarded, "
        "guarded + micro-batched) and cache-hit latency of ragguard's cache vs cashews and aiocache.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls, shorter caps and repeats (rougher)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--only", choices=("throughput", "cache"), help="run one of the two parts")
    parser.add_argument("--calls", type=int, help="concurrent embeddings calls per mode (default 5000, --quick 1000)")
    parser.add_argument("--cap", type=float, help="seconds each mode may run (default 30, --quick 10)")
    parser.add_argument("--rpm", type=float, default=3000.0, help="the simulator's requests per minute (3000)")
    parser.add_argument("--tpm", type=float, default=10_000_000.0, help="the simulator's tokens per minute (10 M)")
    parser.add_argument("--mode", dest="modes", action="append", choices=MODES, help="run only this mode (repeatable)")
    parser.add_argument("--repeats", type=int, help="cache: repeats per case (default 11, --quick 5)")
    parser.add_argument("--target-ms", type=float, help="cache: duration of one repeat (default 80, --quick 6)")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 1000 if args.quick else 5000
    if args.cap is None:
        args.cap = 10.0 if args.quick else 30.0
    if args.repeats is None:
        args.repeats = 5 if args.quick else 11
    if args.target_ms is None:
        args.target_ms = 6.0 if args.quick else 80.0
    if args.modes is None:
        args.modes = list(MODES)
    if args.calls < 1 or args.cap <= 0 or args.rpm <= 0 or args.tpm <= 0 or args.repeats < 1 or args.target_ms <= 0:
        parser.error("--calls, --repeats must be >= 1 and --cap, --rpm, --tpm, --target-ms > 0")

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"\r{message}…" + " " * 20, end="", file=sys.stderr, flush=True)

    def progress_done() -> None:
        if sys.stderr.isatty():
            print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "benchmarks.batching",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
    }
    if args.only in (None, "throughput"):
        try:
            import openai  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            print(f"throughput part skipped: {exc.name} is not installed (pip install -e '.[dev]')", file=sys.stderr)
        else:
            modes = measure_throughput(args, progress)
            progress_done()
            results["throughput"] = {
                "calls": args.calls,
                "rpm": args.rpm,
                "tpm": args.tpm,
                "cap_s": args.cap,
                "reference": REFERENCE_MODE,
                "modes": report_throughput(modes, args),
            }
    if args.only in (None, "cache"):
        cases = cache_cases()
        asyncio.run(measure_cache(cases, repeats=args.repeats, target_ms=args.target_ms, progress=progress))
        progress_done()
        results["cache"] = {
            "unit": "µs per call",
            "statistic": "median over repeats",
            "repeats": args.repeats,
            "target_ms_per_repeat": args.target_ms,
            "results": report_cache(cases, args),
        }
    wall_s = time.perf_counter() - started
    results["wall_seconds"] = wall_s
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
