"""Per-call overhead of ragguard's guards on a no-op async call, side by side with the libraries people use
instead, measured in the same run (``/work/shared/guide/anchors.md``, "Performance anchors").

Every case awaits ``noop()`` (an ``async def`` that returns at once) through one guard or library, on asyncio,
in a single task, on the happy path: retries succeed first time, breakers are closed, limiters never make a
caller wait, semaphores are uncontended and timeouts never fire. What is measured is therefore pure overhead.

Method: each case runs ``n`` sequential awaits timed with :func:`time.perf_counter_ns` (``n`` calibrated so one
repeat lasts ``--target-ms``), after a warm-up; the repeats of all cases are interleaved (case order rotates
every round), so a slow spell of this shared, noisy machine hits every case rather than one; the figure
reported is the median over repeats, in µs per call, including the loop's own cost (the ``await noop()`` row).
The garbage collector stays on (its cost is part of a library's real cost) but is emptied before each repeat.

Run from the repository root::

    python -m benchmarks.overhead            # full run (~1 minute on 2 cores)
    python benchmarks/overhead.py --quick    # a few seconds, rougher figures
    python -m benchmarks.overhead --json results.json

Competitor libraries that are not installed are skipped (``pip install -e '.[dev]'`` installs them all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import ragguard

#: The anchors' target for the whole pipeline (timeout + retry + breaker + limiter + bulkhead), µs per call.
TARGET_PIPELINE_US = 5.0

#: A rate that never makes a caller wait here: even at 10 M calls/s the bucket would never empty.
NEVER_LIMITED_RPM = 1e12

Op = Callable[[], Awaitable[Any]]


async def noop() -> None:
    """The guarded call: returns at once, never yields to the event loop."""


@dataclass
class Case:
    """One measured way of calling :func:`noop`."""

    group: str
    label: str
    #: builds the zero-argument coroutine function to time; called inside the running event loop, because
    #: several of the libraries bind objects to the loop that creates them (aiolimiter#292)
    make: Callable[[], Op]
    #: ``True`` for ragguard's own rows
    ours: bool = False
    #: the label of the competitor this row's ratio is taken against (ragguard rows only)
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


# --- the cases ----------------------------------------------------------------------------------------------


def _call(guard: ragguard.GuardBase) -> Op:
    """``guard.run`` with a fresh context per call, as every real call has (per-call state: tenacity#93)."""
    run = guard.run
    context = ragguard.CallContext
    return lambda: run(noop, context())


def _pipeline_call(pipeline: ragguard.Pipeline) -> Op:
    run = pipeline.run
    context = pipeline.context
    return lambda: run(noop, context())


#: The pipelines measured, by name: which guards, outermost first (Pipeline sorts them anyway).
PIPELINES: dict[str, str] = {
    "full": "Deadline+Retry+CircuitBreaker+RateLimiter+ConcurrencyLimit+Timeout",
    "anchor": "Retry+CircuitBreaker+RateLimiter+ConcurrencyLimit+Timeout",
    "untimed": "Retry+CircuitBreaker+RateLimiter+ConcurrencyLimit",
}


def _guards(kind: str) -> list[ragguard.GuardBase]:
    guards: list[ragguard.GuardBase] = [
        ragguard.Retry(attempts=4),
        ragguard.CircuitBreaker("bench"),
        ragguard.RateLimiter(rpm=NEVER_LIMITED_RPM),
        ragguard.ConcurrencyLimit(max_in_flight=64),
    ]
    if kind in ("full", "anchor"):
        guards.append(ragguard.Timeout(30.0))
    if kind == "full":
        guards.insert(0, ragguard.Deadline(120.0))
    return guards


def _pipeline(kind: str) -> ragguard.Pipeline:
    return ragguard.Pipeline(*_guards(kind))


def _partial_chained(kind: str) -> Op:
    """A proposal, not ragguard's code: chain the layers with :func:`functools.partial` built per call instead
    of a lambda plus a ``Pipeline._step`` coroutine per layer (same semantics: each layer gets a zero-argument
    callable that starts the rest of the chain, callable again for each retry)."""
    pipeline = _pipeline(kind)
    guards = tuple(pipeline.guards)
    outer = guards[0].run
    inner = guards[:0:-1]  # innermost first
    context = pipeline.context

    async def run() -> None:
        ctx = context()
        call: Callable[[], Awaitable[Any]] = noop
        for guard in inner:
            call = functools.partial(guard.run, call, ctx)
        await outer(call, ctx)

    return run


def _baseline_cases() -> list[Case]:
    def sleep0() -> Op:
        return lambda: asyncio.sleep(0)

    return [
        Case("baseline", "await noop()", lambda: noop),
        Case("baseline", "await asyncio.sleep(0)", sleep0, note="one trip through the event loop"),
    ]


def _retry_cases() -> list[Case]:
    cases = [
        Case(
            "retry",
            "ragguard Retry.run",
            lambda: _call(ragguard.Retry(attempts=4)),
            ours=True,
            vs="tenacity AsyncRetrying",
        ),
        Case(
            "retry",
            "@ragguard.retry",
            lambda: ragguard.retry(attempts=4)(noop),
            ours=True,
            vs="tenacity @retry",
        ),
    ]
    try:
        import tenacity
    except ImportError:
        pass
    else:

        def tenacity_decorator() -> Op:
            decorate = tenacity.retry(
                stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_random_exponential(multiplier=0.5, max=20)
            )
            fn: Op = decorate(noop)
            return fn

        def tenacity_retrying() -> Op:
            stop = tenacity.stop_after_attempt(4)
            wait = tenacity.wait_random_exponential(multiplier=0.5, max=20)

            async def op() -> None:
                # the documented loop form; a fresh AsyncRetrying per call, like the decorator makes
                async for attempt in tenacity.AsyncRetrying(stop=stop, wait=wait):
                    with attempt:
                        await noop()

            return op

        cases += [
            Case("retry", "tenacity @retry", tenacity_decorator),
            Case("retry", "tenacity AsyncRetrying", tenacity_retrying, note="async for attempt in …"),
        ]
    try:
        import stamina
    except ImportError:
        pass
    else:

        def stamina_decorator() -> Op:
            fn: Op = stamina.retry(on=Exception, attempts=4)(noop)
            return fn

        cases.append(Case("retry", "stamina @retry", stamina_decorator))
    try:
        import backoff
    except ImportError:
        pass
    else:

        def backoff_decorator() -> Op:
            fn: Op = backoff.on_exception(backoff.expo, Exception, max_tries=4)(noop)
            return fn

        cases.append(Case("retry", "backoff @on_exception", backoff_decorator))
    return cases


def _breaker_cases() -> list[Case]:
    cases = [
        Case(
            "breaker",
            "ragguard CircuitBreaker.run",
            lambda: _call(ragguard.CircuitBreaker("bench")),
            ours=True,
            vs="aiobreaker call_async",
        ),
        Case(
            "breaker",
            "@ragguard.circuit_breaker",
            lambda: ragguard.circuit_breaker("bench")(noop),
            ours=True,
            vs="aiobreaker @breaker",
        ),
    ]
    try:
        import pybreaker
    except ImportError:
        pass
    else:

        def pybreaker_op() -> Op:
            breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

            async def op() -> None:
                # pybreaker's own call_async needs tornado; its documented fallback for coroutines is
                # the calling() context manager (which also holds its lock only around the bookkeeping)
                with breaker.calling():
                    await noop()

            return op

        cases.append(Case("breaker", "pybreaker calling()", pybreaker_op, note="call_async needs tornado"))
    try:
        import aiobreaker  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:

        def aiobreaker_call() -> Op:
            breaker = aiobreaker.CircuitBreaker(fail_max=5)
            call_async = breaker.call_async
            return lambda: call_async(noop)

        def aiobreaker_decorator() -> Op:
            fn: Op = aiobreaker.CircuitBreaker(fail_max=5)(noop)
            return fn

        cases += [
            Case("breaker", "aiobreaker call_async", aiobreaker_call),
            Case("breaker", "aiobreaker @breaker", aiobreaker_decorator),
        ]
    return cases


def _limiter_cases() -> list[Case]:
    cases = [
        Case(
            "rate limit",
            "ragguard RateLimiter.run",
            lambda: _call(ragguard.RateLimiter(rpm=NEVER_LIMITED_RPM)),
            ours=True,
            vs="aiolimiter async with",
        ),
    ]
    try:
        import aiolimiter
    except ImportError:
        pass
    else:

        def aiolimiter_op() -> Op:
            limiter = aiolimiter.AsyncLimiter(NEVER_LIMITED_RPM, 60.0)

            async def op() -> None:
                async with limiter:
                    await noop()

            return op

        cases.append(Case("rate limit", "aiolimiter async with", aiolimiter_op))
    return cases


def _concurrency_cases() -> list[Case]:
    def asyncio_semaphore() -> Op:
        semaphore = asyncio.Semaphore(64)

        async def op() -> None:
            async with semaphore:
                await noop()

        return op

    def anyio_semaphore(**options: Any) -> Callable[[], Op]:
        def make() -> Op:
            semaphore = anyio.Semaphore(64, **options)

            async def op() -> None:
                async with semaphore:
                    await noop()

            return op

        return make

    cases = [
        Case(
            "concurrency",
            "ragguard ConcurrencyLimit.run",
            lambda: _call(ragguard.ConcurrencyLimit(max_in_flight=64)),
            ours=True,
            vs="asyncio.Semaphore",
        ),
        Case("concurrency", "asyncio.Semaphore", asyncio_semaphore),
        Case("concurrency", "anyio.Semaphore", anyio_semaphore(), note="checkpoints on every acquire"),
    ]
    try:
        anyio.Semaphore(1, fast_acquire=True)
    except TypeError:  # anyio < 4.5
        pass
    else:
        cases.append(Case("concurrency", "anyio.Semaphore(fast_acquire)", anyio_semaphore(fast_acquire=True)))
    return cases


def _timeout_cases() -> list[Case]:
    def anyio_fail_after() -> Op:
        async def op() -> None:
            with anyio.fail_after(30.0):
                await noop()

        return op

    def anyio_cancel_scope() -> Op:
        async def op() -> None:
            with anyio.CancelScope(deadline=anyio.current_time() + 30.0):
                await noop()

        return op

    cases = [
        Case(
            "timeout",
            "ragguard Timeout.run",
            lambda: _call(ragguard.Timeout(30.0)),
            ours=True,
            vs="anyio.fail_after",
        ),
        Case(
            "timeout",
            "ragguard Deadline.run",
            lambda: _call(ragguard.Deadline(120.0)),
            ours=True,
            vs="anyio.fail_after",
        ),
    ]
    if sys.version_info >= (3, 11):

        def asyncio_timeout() -> Op:
            async def op() -> None:
                async with asyncio.timeout(30.0):
                    await noop()

            return op

        cases.append(Case("timeout", "asyncio.timeout", asyncio_timeout, note="asyncio only"))
    cases += [
        Case("timeout", "anyio.fail_after", anyio_fail_after),
        Case("timeout", "anyio.CancelScope(deadline=…)", anyio_cancel_scope, note="what ragguard's timers use"),
    ]
    return cases


STACK_LABEL = "tenacity → aiobreaker → aiolimiter"
TIMED_STACK_LABEL = "that stack + Semaphore + timeouts"


def _pipeline_cases(*, proposals: bool) -> list[Case]:
    timed_vs = TIMED_STACK_LABEL if sys.version_info >= (3, 11) else STACK_LABEL
    cases = [
        Case(
            "pipeline",
            "ragguard full pipeline",
            lambda: _pipeline_call(_pipeline("full")),
            ours=True,
            vs=timed_vs,
        ),
        Case(
            "pipeline",
            "ragguard anchors' pipeline",
            lambda: _pipeline_call(_pipeline("anchor")),
            ours=True,
            vs=timed_vs,
        ),
        Case(
            "pipeline",
            "ragguard pipeline without timers",
            lambda: _pipeline_call(_pipeline("untimed")),
            ours=True,
            vs=STACK_LABEL,
        ),
        Case(
            "pipeline",
            "@pipeline (full, as a decorator)",
            lambda: _pipeline("full")(noop),
            ours=True,
            vs=timed_vs,
        ),
    ]
    if proposals:
        cases += [
            Case(
                "pipeline",
                "proposal: full, partial-chained",
                lambda: _partial_chained("full"),
                ours=True,
                vs="ragguard full pipeline",
                note="not ragguard's code: see _partial_chained",
            ),
            Case(
                "pipeline",
                "proposal: without timers, partial-chained",
                lambda: _partial_chained("untimed"),
                ours=True,
                vs="ragguard pipeline without timers",
                note="not ragguard's code: see _partial_chained",
            ),
        ]
    try:
        import aiobreaker
        import aiolimiter
        import tenacity
    except ImportError:
        return cases

    def retry_decorator() -> Callable[[Op], Op]:
        decorate: Callable[[Op], Op] = tenacity.retry(
            stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_random_exponential(multiplier=0.5, max=20)
        )
        return decorate

    def stack() -> Op:
        breaker = aiobreaker.CircuitBreaker(fail_max=5)
        limiter = aiolimiter.AsyncLimiter(NEVER_LIMITED_RPM, 60.0)

        async def attempt() -> None:
            async with limiter:
                await noop()

        return retry_decorator()(breaker(attempt))

    cases.append(Case("pipeline", STACK_LABEL, stack, note="the anchors' stack"))
    if sys.version_info >= (3, 11):

        def timed_stack() -> Op:
            breaker = aiobreaker.CircuitBreaker(fail_max=5)
            limiter = aiolimiter.AsyncLimiter(NEVER_LIMITED_RPM, 60.0)
            semaphore = asyncio.Semaphore(64)

            async def attempt() -> None:
                async with limiter, semaphore, asyncio.timeout(30.0):
                    await noop()

            retried = retry_decorator()(breaker(attempt))

            async def op() -> None:
                async with asyncio.timeout(120.0):
                    await retried()

            return op

        cases.append(Case("pipeline", TIMED_STACK_LABEL, timed_stack, note="the full pipeline's guards"))
    return cases


def all_cases(*, proposals: bool = False) -> list[Case]:
    return [
        *_baseline_cases(),
        *_retry_cases(),
        *_breaker_cases(),
        *_limiter_cases(),
        *_concurrency_cases(),
        *_timeout_cases(),
        *_pipeline_cases(proposals=proposals),
    ]


# --- measuring ----------------------------------------------------------------------------------------------


#: calls timed back to back before one untimed trip through the event loop (see :func:`_timed`)
CHUNK = 1000


async def _timed(op: Op, n: int) -> int:
    """Nanoseconds taken by ``n`` sequential ``await op()``.

    Timed in chunks of :data:`CHUNK` calls with one untimed ``asyncio.sleep(0)`` between them: a no-op never
    yields, so without it the timer cases would pile up every cancelled timer handle of a repeat in the loop's
    heap (a real call yields, and the loop drops them), which made those cases ~10-20 % slower and noisier.
    """
    elapsed = 0
    clock = time.perf_counter_ns
    sleep = asyncio.sleep
    while n > 0:
        chunk = range(CHUNK if n > CHUNK else n)
        n -= CHUNK
        start = clock()
        for _ in chunk:
            await op()
        elapsed += clock() - start
        await sleep(0)
    return elapsed


async def _calibrate(op: Op, target_ns: float) -> int:
    """Iterations that take about ``target_ns``; warms the case up on the way."""
    n = 64
    while True:
        elapsed = await _timed(op, n)
        if elapsed >= target_ns / 8 or n >= 1 << 24:
            return max(100, int(n * target_ns / max(elapsed, 1)))
        n *= 4


async def measure(cases: list[Case], *, repeats: int, target_ms: float, progress: Callable[[str], None]) -> None:
    """Fill each case's ``samples_ns`` (ns per call, one sample per repeat)."""
    target_ns = target_ms * 1e6
    ops: dict[int, Op] = {}
    for index, case in enumerate(cases):
        try:
            op = case.make()
            await op()  # fails fast if the library does not work here
            case.n = await _calibrate(op, target_ns)
            await _timed(op, case.n // 4)  # warm-up at full size
            await asyncio.sleep(0)
        except Exception as exc:
            case.error = f"{type(exc).__name__}: {exc}"
            continue
        ops[index] = op
    order = list(ops)
    for round_ in range(repeats):
        progress(f"round {round_ + 1}/{repeats}")
        # rotate the order so no case always runs right after the same neighbour or at the same point
        shift = round_ % len(order) if order else 0
        for index in order[shift:] + order[:shift]:
            case = cases[index]
            gc.collect()
            elapsed = await _timed(ops[index], case.n)
            case.samples_ns.append(elapsed / case.n)


# --- reporting ----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ragguard", "anyio", "tenacity", "stamina", "backoff", "pybreaker", "aiobreaker", "aiolimiter"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _ratio_text(ours: float, theirs: float) -> str:
    ratio = ours / theirs
    if ratio <= 1.0:
        return f"{ratio:.2f}×  [green]{1 / ratio:.1f}× faster[/]"
    return f"{ratio:.2f}×  [red]{ratio:.1f}× slower[/]"


def report(cases: list[Case], *, args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    """Print the table and return the JSON-ready results."""
    from rich.console import Console
    from rich.table import Table

    # Piped output (a file, CI logs) gets a table wide enough not to wrap; a terminal keeps its own width.
    console = Console(width=None if sys.stdout.isatty() else 150)
    by_label = {c.label: c for c in cases if c.samples_ns}
    bare = by_label.get("await noop()")
    bare_us = bare.median_us if bare is not None else math.nan

    table = Table(
        title="ragguard overhead on a no-op async call (asyncio, one task, happy path)",
        caption="µs/call: median over repeats, loop included · min: fastest repeat · × bare: ÷ `await noop()` · "
        "ratio: ragguard ÷ competitor (< 1: ragguard is faster)",
    )
    table.add_column("group", style="dim")
    table.add_column("implementation")
    table.add_column("µs/call", justify="right")
    table.add_column("min", justify="right")
    table.add_column("× bare", justify="right")
    table.add_column("ratio")
    table.add_column("competitor")
    table.add_column("note", style="dim")

    rows: list[dict[str, Any]] = []
    previous_group = None
    for case in cases:
        if case.group != previous_group and previous_group is not None:
            table.add_section()
        previous_group = case.group
        if case.error is not None:
            table.add_row(case.group, case.label, "—", "—", "—", "", "", f"failed: {case.error}")
            rows.append({"group": case.group, "label": case.label, "ours": case.ours, "error": case.error})
            continue
        competitor = by_label.get(case.vs) if case.vs else None
        ratio = case.median_us / competitor.median_us if competitor is not None else None
        table.add_row(
            case.group,
            f"[bold cyan]{case.label}[/]" if case.ours else case.label,
            f"{case.median_us:.2f}",
            f"{case.min_us:.2f}",
            f"{case.median_us / bare_us:.1f}",
            _ratio_text(case.median_us, competitor.median_us) if competitor is not None else "",
            competitor.label if competitor is not None else "",
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
                "x_bare": case.median_us / bare_us,
                "vs": competitor.label if competitor is not None else None,
                "ratio_to_competitor": ratio,
                "note": case.note,
            }
        )
    console.print(table)
    console.print(
        "Pipelines: full = " + PIPELINES["full"] + "; anchors' = " + PIPELINES["anchor"] + " (anchors.md's "
        "definition); without timers = " + PIPELINES["untimed"] + ". Competitor stacks: tenacity @retry → "
        "aiobreaker → aiolimiter (the anchors' stack); + Semaphore + timeouts = asyncio.timeout(120) → tenacity "
        "→ aiobreaker → aiolimiter → asyncio.Semaphore → asyncio.timeout(30), the full pipeline's guards.",
        style="dim",
    )

    targets: dict[str, dict[str, Any]] = {}
    for label, what in (
        ("ragguard full pipeline", PIPELINES["full"]),
        ("ragguard anchors' pipeline", PIPELINES["anchor"]),
        ("ragguard pipeline without timers", PIPELINES["untimed"]),
    ):
        pipeline = by_label.get(label)
        if pipeline is None:
            continue
        met = pipeline.median_us <= TARGET_PIPELINE_US
        targets[label] = {
            "guards": what,
            "median_us": pipeline.median_us,
            "min_us": pipeline.min_us,
            "target_us": TARGET_PIPELINE_US,
            "met": met,
        }
        verdict = "[green]met[/]" if met else "[red]NOT met[/]"
        fastest = ""
        if not met and pipeline.min_us <= TARGET_PIPELINE_US:
            fastest = " (met by the fastest repeat: the machine was busy)"
        console.print(
            f"Target ≤ {TARGET_PIPELINE_US:g} µs/call (anchors.md), {label}: median {pipeline.median_us:.2f} µs, "
            f"fastest repeat {pipeline.min_us:.2f} µs → {verdict}{fastest}"
        )
    scope = by_label.get("anyio.CancelScope(deadline=…)")
    if scope is not None:
        console.print(
            f"[dim]A timer is one anyio cancel scope, {scope.median_us:.1f} µs here on its own (a Deadline with a "
            "Timeout inside it delegates to it: the full pipeline has one scope), which alone exceeds the target; "
            "`python -m benchmarks.pipeline_profile` takes it apart and times proposed replacements.[/]"
        )
    console.print(
        f"[dim]{args.repeats} interleaved repeats of ~{args.target_ms:g} ms per case, {wall_s:.0f} s in all; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs. These machines are shared and noisy: trust "
        "ratios from one run over absolute figures, and re-run before reading anything into a difference under "
        "~20 %.[/]"
    )
    return {
        "benchmark": "benchmarks.overhead",
        "unit": "µs per call",
        "statistic": "median over repeats",
        "repeats": args.repeats,
        "target_ms_per_repeat": args.target_ms,
        "wall_seconds": wall_s,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
        "targets": targets,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description="Per-call overhead of ragguard's guards vs tenacity, stamina, backoff, pybreaker, aiobreaker, "
        "aiolimiter, asyncio and anyio, measured side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a few seconds, rougher)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--repeats", type=int, help="repeats per case (default 11, --quick 5)")
    parser.add_argument("--target-ms", type=float, help="duration of one repeat of one case (default 80, --quick 6)")
    parser.add_argument("--only", metavar="GROUP", action="append", help="measure only this group (repeatable)")
    parser.add_argument(
        "--proposals", action="store_true", help="also time proposed pipeline optimisations (not ragguard's code)"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 11
    if args.target_ms is None:
        args.target_ms = 6.0 if args.quick else 80.0
    if args.repeats < 1 or args.target_ms <= 0:
        parser.error("--repeats must be >= 1 and --target-ms > 0")

    cases = all_cases(proposals=args.proposals)
    if args.only:
        keep = {g.lower() for g in args.only} | {"baseline"}
        cases = [c for c in cases if c.group in keep]

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"\r{message}…", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    asyncio.run(measure(cases, repeats=args.repeats, target_ms=args.target_ms, progress=progress))
    if sys.stderr.isatty():
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr, flush=True)
    results = report(cases, args=args, wall_s=time.perf_counter() - started)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2, ensure_ascii=False)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
