"""Cache-hit latency: ragguard's in-memory cache beside cashews and aiocache, measured in the same run.

ragguard's :class:`ragguard.Cache` (``await cache.get(key)``, with the default JSON serializer and with
:class:`ragguard.MsgpackSerializer`) and ``@ragguard.cached()`` beside cashews (``mem://``: ``await cache.get``,
``@cache(ttl=…)``) and aiocache (``Cache.MEMORY``: ``await c.get``, ``@cached``), each reading a warm entry, for
two values: an embeddings response as a dict (one vector of 1,536 floats, ~32 kB as JSON) and a 74-character
string. Timed like ``benchmarks/overhead.py``: ``n`` sequential awaits per repeat (``n`` calibrated to
``--target-ms``), repeats of all cases interleaved with a rotating order, median over repeats in µs per call,
loop included. Each competitor's ratio is taken against the matching ragguard row (> 1: ragguard is faster).
After timing, every decorated function must have run once only (the priming call), so every timed call was a
hit.

Run from the repository root::

    python -m benchmarks.cache            # ~25 s on 2 cores
    python -m benchmarks.cache --quick    # ~5 s, rougher
    python -m benchmarks.cache --json results.json

cashews and aiocache rows are skipped when those libraries are not installed (``pip install -e '.[dev]'``).
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

import ragguard

EMBED_MODEL = "text-embedding-3-small"

Op = Callable[[], Awaitable[Any]]


# --- the cases ----------------------------------------------------------------------------------------------


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


def _times(x: float) -> str:
    """A multiple for the ratio columns: ``115×``, ``2.4×``."""
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×"


def _console() -> Any:
    from rich.console import Console

    # Piped output (a file, CI logs) gets a table wide enough not to wrap; a terminal keeps its own width.
    return Console(width=None if sys.stdout.isatty() else 150)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ragguard", "cashews", "aiocache", "msgpack"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


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


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure and print the cache table; the JSON-ready results."""
    cases = cache_cases()
    asyncio.run(measure_cache(cases, repeats=args.repeats, target_ms=args.target_ms, progress=progress))
    if sys.stderr.isatty():
        print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)
    return {
        "unit": "µs per call",
        "statistic": "median over repeats",
        "repeats": args.repeats,
        "target_ms_per_repeat": args.target_ms,
        "results": report_cache(cases, args),
    }


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    parser.add_argument("--repeats", type=int, help=f"{prefix}repeats per case (default 11, --quick 5)")
    parser.add_argument("--target-ms", type=float, help=f"{prefix}duration of one repeat (default 80, --quick 6)")


def resolve_arguments(args: argparse.Namespace) -> None:
    if args.repeats is None:
        args.repeats = 5 if args.quick else 11
    if args.target_ms is None:
        args.target_ms = 6.0 if args.quick else 80.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cache",
        description="Cache-hit latency of ragguard's in-memory cache vs cashews and aiocache.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (rougher)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    add_arguments(parser)
    args = parser.parse_args(argv)
    resolve_arguments(args)
    if args.repeats < 1 or args.target_ms <= 0:
        parser.error("--repeats must be >= 1 and --target-ms > 0")

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"\r{message}…" + " " * 20, end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "benchmarks.cache",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
        "cache": run(args, progress),
    }
    wall_s = time.perf_counter() - started
    results["wall_seconds"] = wall_s
    _console().print(
        f"[dim]{args.repeats} interleaved repeats of ~{args.target_ms:g} ms per case, {wall_s:.0f} s in all; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. These machines are shared and noisy: trust ratios "
        "from one run over absolute figures.[/]"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2, ensure_ascii=False)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
