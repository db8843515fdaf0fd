"""Micro-batching throughput against a rate-limited provider (and, from ``benchmarks/cache.py``, cache-hit
latency beside cashews and aiocache), measured in the same run.

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

2. **Cache-hit latency**: ``benchmarks/cache.py`` (ragguard's cache beside cashews and aiocache), run here too
   unless ``--only throughput``.

Run from the repository root::

    python -m benchmarks.batching                     # full run (~2 minutes on 2 cores)
    python -m benchmarks.batching --quick             # ~35 s, rougher figures
    python -m benchmarks.batching --only throughput   # the throughput part alone
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
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import ragguard

if __package__:
    from . import cache as cache_bench
else:  # run as a script: python benchmarks/batching.py
    import cache as cache_bench  # type: ignore[import-not-found,no-redef,unused-ignore]

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
    cache_bench.add_arguments(parser, prefix="cache: ")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 1000 if args.quick else 5000
    if args.cap is None:
        args.cap = 10.0 if args.quick else 30.0
    cache_bench.resolve_arguments(args)
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
        results["cache"] = cache_bench.run(args, progress)
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
