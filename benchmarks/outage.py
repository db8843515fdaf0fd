"""Upstream load and recovery under a provider outage: the SDK's default retries against ragguard's retry budget
and circuit breaker, one after the other, under the same steady offered load.

A steady, open-loop offered load (``--rate`` embeddings calls per second, each with its own input, through the
real ``openai`` ``AsyncOpenAI`` SDK) runs for ``--before`` + ``--outage`` + ``--after`` seconds against
ragguard's OpenAI simulator (served on loopback in a child process). ``--before`` seconds in, the simulator's
outage fault starts (``POST /_sim/outage?seconds=…``): for ``--outage`` seconds every request is answered 500.
Modes, the simulator reset in between:

- ``sdk-default``: ``AsyncOpenAI()`` as it comes: the SDK retries a 500 twice (exponential backoff from 0.5 s);
- ``guarded``: ``ragguard.guard(AsyncOpenAI(), Policy())``: the default policy, so the default retry budget
  (retries ≤ 20 % of the requests of the last 10 s plus 10/s) and the default circuit breaker (opens after 5
  failures in a row, probes again after ``open_duration`` = 30 s); the SDK's own retries are switched off;
- ``guarded, no breaker``: the same with the breaker disabled, so the retry budget alone bounds the load.

For each mode: the calls offered while the outage lasted (by their start) and the requests that reached the
provider during it (the simulator's ``faults["outage"]``), and their ratio. For the guarded modes, two bounds:

- the issue's, ``(1 + ratio) × offered``: what the retry budget allows in the long run (plus its floor of
  ``min_retries_per_s``);
- the budget's exact guarantee over an outage of ``T`` seconds: every window of ``window_s`` = ``W`` seconds
  holds at most ``ratio ×`` its requests ``+ min_retries_per_s × W`` retries, and ``k = ceil((T + W/buckets) / W)``
  disjoint windows (of whole buckets) cover the outage, so requests ≤ offered ``+ ratio ×`` (the calls offered
  from ``W`` seconds before the outage to its end) ``+ k × min_retries_per_s × W``. On a short outage the floor
  (100 retries per 10 s window by default, available at once) and the retries earned before the outage weigh
  more than the ratio.

Recovery: the time from the outage's end to the first call that succeeded, and to a steady success rate (from
then on, every half-second of calls, by their start, succeeds at 95 % or more), beside the breaker's
``open_duration``.

Run from the repository root::

    python -m benchmarks.outage              # 50 calls/s, 5 s + a 20 s outage + 15 s, per mode (~2.5 minutes)
    python -m benchmarks.outage --quick      # 20 calls/s, 2 + 6 + 6 s, breaker open_duration 3 s (~1 minute)
    python -m benchmarks.outage --json out.json

Needs the ``openai`` and ``testing`` extras.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import ragguard

EMBED_MODEL = "text-embedding-3-small"
API_KEY = "sk-ragguard-bench-not-a-real-key"
MODES = ("sdk-default", "guarded", "guarded, no breaker")
#: width of the bins in which recovery is judged, seconds; and the success rate that counts as steady
BIN_S = 0.5
STEADY_RATE = 0.95
#: pause between two modes, seconds, before the simulator is reset (late retries of the previous mode land)
SETTLE_S = 1.0


@dataclass
class Call:
    started: float
    ended: float
    error: str | None


@dataclass
class ModeResult:
    """What one mode did; times on :func:`time.monotonic`."""

    mode: str
    calls: list[Call] = field(default_factory=list)
    outage_start: float = 0.0
    outage_end: float = 0.0
    run_end: float = 0.0
    upstream_total: int = 0
    upstream_outage: int = 0
    policy: ragguard.Policy | None = None
    budget: dict[str, int] = field(default_factory=dict)

    def offered(self, start: float, end: float) -> int:
        return sum(1 for c in self.calls if start <= c.started < end)

    @property
    def offered_outage(self) -> int:
        return self.offered(self.outage_start, self.outage_end)

    @property
    def ratio(self) -> float:
        return self.upstream_outage / self.offered_outage if self.offered_outage else math.nan

    @property
    def nominal(self) -> float | None:
        """``(1 + ratio) × offered``: the retry budget's long-run bound, floor aside (guarded modes)."""
        if self.policy is None or not self.policy.retry_budget.enabled:
            return None
        return (1 + self.policy.retry_budget.ratio) * self.offered_outage

    @property
    def bound(self) -> float | None:
        """The retry budget's guarantee on the requests sent during the outage (guarded modes; see the module
        docstring)."""
        if self.policy is None or not self.policy.retry_budget.enabled:
            return None
        budget = self.policy.retry_budget
        window = budget.window_s
        windows = math.ceil((self.outage_end - self.outage_start + window / budget.buckets) / window)
        earning = self.offered(self.outage_start - window, self.outage_end)
        return self.offered_outage + budget.ratio * earning + windows * budget.min_retries_per_s * window

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.calls:
            if c.error is not None:
                counts[c.error] = counts.get(c.error, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def first_success(self) -> float | None:
        """Seconds from the outage's end to the end of the first call that succeeded after it."""
        ends = [c.ended for c in self.calls if c.error is None and c.ended >= self.outage_end]
        return min(ends) - self.outage_end if ends else None

    @property
    def steady(self) -> float | None:
        """Seconds from the outage's end to the first bin (by call start) from which every bin succeeds at
        ``STEADY_RATE`` or more."""
        bins = max(1, math.ceil((self.run_end - self.outage_end) / BIN_S))
        ok = [0] * bins
        total = [0] * bins
        for c in self.calls:
            if c.started >= self.outage_end:
                i = min(bins - 1, int((c.started - self.outage_end) / BIN_S))
                total[i] += 1
                ok[i] += c.error is None
        steady_from: int | None = None
        for i in range(bins):
            good = total[i] == 0 or ok[i] >= STEADY_RATE * total[i]
            if not good:
                steady_from = None
            elif steady_from is None:
                steady_from = i
        return None if steady_from is None else steady_from * BIN_S


def _text(i: int) -> str:
    return f"document {i}"  # distinct inputs: no cache hit, no coalescing, every call is its own request


def _client(mode: str, base_url: str, open_duration: float | None) -> tuple[Any, ragguard.Policy | None, Any]:
    from openai import AsyncOpenAI

    if mode == "sdk-default":
        return AsyncOpenAI(base_url=base_url, api_key=API_KEY), None, None
    breaker: dict[str, Any] = {"enabled": mode == "guarded"}
    if open_duration is not None:
        breaker["open_duration"] = open_duration
    policy = ragguard.Policy(breaker=breaker)  # type: ignore[arg-type]
    # a backend per mode: no breaker or budget state carries over from one mode to the next
    backend = ragguard.MemoryBackend()
    return ragguard.guard(AsyncOpenAI(base_url=base_url, api_key=API_KEY), policy, backend=backend), policy, backend


async def _run_mode(mode: str, control: Any, base_url: str, args: argparse.Namespace) -> ModeResult:
    client, policy, backend = _client(mode, base_url, args.open_duration)
    result = ModeResult(mode=mode, policy=policy)
    create = client.embeddings.create

    async def one(i: int) -> None:
        started = time.monotonic()
        try:
            await create(model=EMBED_MODEL, input=_text(i))
            error = None
        except Exception as exc:  # cancellation is not an Exception: it propagates
            error = type(exc).__name__
        result.calls.append(Call(started, time.monotonic(), error))

    async def start_outage() -> None:
        sent = time.monotonic()
        response = await control.post("/_sim/outage", params={"seconds": args.outage})
        answered = time.monotonic()
        response.raise_for_status()
        outage = response.json()["outage"]
        # the child's time.monotonic is the same system-wide clock on Linux; else take the round trip's middle
        start = outage["started_at"] if sent <= outage["started_at"] <= answered else (sent + answered) / 2
        result.outage_start, result.outage_end = start, start + args.outage

    total = args.before + args.outage + args.after
    n = int(args.rate * total)
    try:
        t0 = time.monotonic() + 0.05
        async with anyio.create_task_group() as tg:
            outage_started = False
            for i in range(n):
                at = t0 + i / args.rate
                if not outage_started and at >= t0 + args.before:
                    await anyio.sleep(max(0.0, t0 + args.before - time.monotonic()))
                    await start_outage()
                    outage_started = True
                await anyio.sleep(max(0.0, at - time.monotonic()))
                tg.start_soon(one, i)
        result.run_end = max(t0 + total, max((c.started for c in result.calls), default=t0))
    finally:
        await client.close()
    response = await control.get("/_sim/stats")
    response.raise_for_status()
    stats = response.json()
    result.upstream_total = int(stats["requests_total"])
    result.upstream_outage = int(stats["faults"].get("outage", 0))
    if backend is not None:
        for _, budget in backend.items("retry_budget"):
            s = budget.stats()
            result.budget = {"requests": s.requests, "retries": s.retries, "refused": s.refused}
    return result


async def _measure(url: str, base_url: str, args: argparse.Namespace, progress: Callable[[str], None]) -> list[Any]:
    import httpx
    from openai import AsyncOpenAI

    results: list[ModeResult] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as control:
        async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as warm:  # untimed warm-up
            await warm.embeddings.create(model=EMBED_MODEL, input="warm-up")
        for index, mode in enumerate(args.modes):
            progress(f"{mode} ({args.before + args.outage + args.after:g} s)")
            if index:
                await anyio.sleep(SETTLE_S)
            (await control.post("/_sim/reset")).raise_for_status()
            gc.collect()
            results.append(await _run_mode(mode, control, base_url, args))
    return results


def measure(args: argparse.Namespace, progress: Callable[[str], None]) -> list[ModeResult]:
    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    # no quota to hit and a realistic small latency: the outage is the only fault
    simulator = OpenAISimulator(SimulatorConfig(rpm=None, tpm=None, base_latency_s=0.02, seed=7))
    with serve(simulator, mode="process") as server:
        return asyncio.run(_measure(server.url, server.base_url, args, progress))


# --- report -------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ragguard", "anyio", "openai", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def report(results: list[ModeResult], args: argparse.Namespace) -> list[dict[str, Any]]:
    from rich.table import Table

    console = _console()
    table = Table(
        title=f"{args.rate:g} embeddings calls/s through the openai SDK for {args.before:g} s + a {args.outage:g} s "
        f"outage (every request answered 500) + {args.after:g} s (OpenAI simulator on loopback)",
        caption="offered: calls started during the outage · upstream: requests that reached the provider during it "
        "(the simulator's count) · (1 + r) × offered: the retry budget's long-run bound (ratio r) · budget bound: "
        "its exact guarantee over the outage, window and floor included (see the module docstring) · first ok / "
        f"steady: seconds from the outage's end to the first success / to every {BIN_S:g} s bin succeeding ≥ "
        f"{STEADY_RATE:.0%}",
    )
    headers = (
        "mode",
        "offered",
        "upstream",
        "upstream ÷ offered",
        "(1 + r) × offered",
        "budget bound",
        "ok / failed",
        "first ok",
        "steady",
    )
    for header in headers:
        table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True)
    rows: list[dict[str, Any]] = []

    def verdict(limit: float | None, value: int) -> str:
        if limit is None:
            return ""
        return f"{limit:,.0f} " + ("[green]met[/]" if value <= limit else "[red]exceeded[/]")

    for r in results:
        bound, nominal = r.bound, r.nominal
        ok = sum(1 for c in r.calls if c.error is None)
        within = bound is not None and r.upstream_outage <= bound
        table.add_row(
            f"[bold cyan]{r.mode}[/]" if r.mode.startswith("guarded") else r.mode,
            f"{r.offered_outage:,}",
            f"{r.upstream_outage:,}",
            f"{r.ratio:.2f}×",
            verdict(nominal, r.upstream_outage),
            verdict(bound, r.upstream_outage),
            f"{ok:,} / {len(r.calls) - ok:,}",
            _seconds(r.first_success),
            _seconds(r.steady),
        )
        rows.append(
            {
                "mode": r.mode,
                "calls": len(r.calls),
                "succeeded": ok,
                "errors": r.errors,
                "offered_during_outage": r.offered_outage,
                "upstream_during_outage": r.upstream_outage,
                "upstream_total": r.upstream_total,
                "ratio": round(r.ratio, 4),
                "nominal_bound": None if nominal is None else round(nominal, 1),
                "within_nominal_bound": None if nominal is None else r.upstream_outage <= nominal,
                "budget_bound": None if bound is None else round(bound, 1),
                "within_budget_bound": within if bound is not None else None,
                "first_success_after_end_s": r.first_success,
                "steady_after_end_s": r.steady,
                "budget": r.budget,
                "open_duration_s": None
                if r.policy is None or not r.policy.breaker.enabled
                else r.policy.breaker.open_duration,
            }
        )
    console.print(table)
    for r in results:
        details = ", ".join(f"{name} × {count:,}" for name, count in r.errors.items()) or "none"
        budget = (
            f"; retry budget: {r.budget['retries']:,} retries granted, {r.budget['refused']:,} refused"
            if r.budget
            else ""
        )
        console.print(f"  {r.mode}: failures {details}; upstream in all {r.upstream_total:,}{budget}")
    for r in results:
        if r.policy is not None and r.policy.breaker.enabled:
            open_s = r.policy.breaker.open_duration
            first = r.first_success
            recovery = (
                "[green]within one open interval[/]" if first is not None and first <= open_s else "[red]not within[/]"
            )
            console.print(
                f"{r.mode}: first success {_seconds(first)} s and steady {_seconds(r.steady)} s after the outage's "
                f"end; breaker open_duration {open_s:g} s: {recovery}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outage",
        description="Upstream load and recovery under a provider outage: the openai SDK's default retries vs "
        "ragguard's retry budget and circuit breaker.",
    )
    parser.add_argument("--quick", action="store_true", help="20 calls/s, 2 + 6 + 6 s, open_duration 3 s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--rate", type=float, help="offered calls per second (default 50, --quick 20)")
    parser.add_argument("--before", type=float, help="seconds before the outage (default 5, --quick 2)")
    parser.add_argument("--outage", type=float, help="outage length, seconds (default 20, --quick 6)")
    parser.add_argument("--after", type=float, help="seconds after the outage (default 15, --quick 6)")
    parser.add_argument(
        "--open-duration", type=float, help="the guarded breaker's open_duration (default: the policy's, --quick 3)"
    )
    parser.add_argument("--mode", dest="modes", action="append", choices=MODES, help="run only this mode (repeatable)")
    args = parser.parse_args(argv)
    defaults = (
        {"rate": 20.0, "before": 2.0, "outage": 6.0, "after": 6.0, "open_duration": 3.0}
        if args.quick
        else {"rate": 50.0, "before": 5.0, "outage": 20.0, "after": 15.0}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.modes is None:
        args.modes = list(MODES)
    if args.rate <= 0 or args.outage <= 0 or args.before < 0 or args.after <= 0:
        parser.error("--rate, --outage and --after must be > 0, --before >= 0")
    if args.open_duration is not None and args.open_duration <= 0:
        parser.error("--open-duration must be > 0")
    try:
        import openai  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        parser.error(f"{exc.name} is not installed (pip install -e '.[dev]')")

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"\r{message}…" + " " * 20, end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    results = measure(args, progress)
    if sys.stderr.isatty():
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    rows = report(results, args)
    wall_s = time.perf_counter() - started
    _console().print(
        f"[dim]{wall_s:.0f} s in all; Python {platform.python_version()}, {os.cpu_count()} CPUs. These machines are "
        "shared and noisy: the counts are robust, the recovery times carry a few tens of milliseconds of noise.[/]"
    )
    if args.json:
        payload = {
            "benchmark": "benchmarks.outage",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "versions": _versions(),
            "rate": args.rate,
            "before_s": args.before,
            "outage_s": args.outage,
            "after_s": args.after,
            "modes": rows,
            "wall_seconds": wall_s,
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2, ensure_ascii=False)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
