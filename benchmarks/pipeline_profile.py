"""Where the full pipeline's per-call overhead goes, and what proposed changes would save (anchors.md: the whole
pipeline — timeout + retry + breaker + limiter + bulkhead — at most 5 µs per call on a no-op).

Three measurements on asyncio, timed exactly like ``benchmarks/overhead.py`` (calibrated sequential awaits of a
no-op, interleaved repeats, median µs per call, loop included), then a profile:

1. **Layers.** The pipeline built up one guard at a time (Retry, + CircuitBreaker, + RateLimiter, +
   ConcurrencyLimit, + Timeout, + Deadline), so each row's difference from the previous one is what that guard
   adds inside a real pipeline; and each guard alone in a one-guard ``Pipeline``.
2. **Timer anatomy.** What one ``with anyio.CancelScope(deadline=anyio.current_time() + s)`` is made of:
   the clock read through anyio's backend dispatch, the scope's construction through that dispatch, entering and
   leaving a scope with no deadline, arming and cancelling its timer; beside ``loop.time()``, a bare
   ``loop.call_at`` + ``cancel``, and ``asyncio.timeout``.
3. **Proposals** (code in this file, *not* ragguard's; each keeps ``Timeout``'s contract: ``AttemptTimeout`` /
   ``DeadlineExceeded`` on expiry, an outer cancellation propagates unchanged, and ``Deadline`` still delegates
   to it), numbered as in ``docs/benchmarks.md`` ("What remains"): the full pipeline with ``Timeout`` replaced by

   1. ``WatchdogTimeout``: on asyncio, no cancel scope and no timer per call: the call's deadline goes into a
      per-loop table and one timer per loop, set for the earliest deadline, cancels the calls that outlive theirs
      (``Task.cancel`` / ``Task.uncancel``, exactly as ``asyncio.timeout`` does — the scheme ragguard's Redis
      bucket store already uses, ``_Watchdog`` in ``ragguard/backends/_redis_bucket.py``); on trio it falls back
      to the anyio scope;
   2. with 1, the ``Deadline`` folded into the call's context (its deadline set when the context is made) instead
      of a layer that sets and restores it;
   3. ``CachedScopeTimeout``: the same anyio cancel scope, but the backend's scope class and clock looked up once
      per event loop instead of through anyio's per-call backend dispatch (sniffio) — twice per call today.

   Before timing, the script checks each proposal's behaviour (a slow call times out with ``AttemptTimeout``, a
   deadline with ``DeadlineExceeded``, a fast one returns, an outer cancel scope's cancellation propagates).
4. **Profile.** ``cProfile`` of the full pipeline: calls and own time per function (cProfile's own cost inflates
   every figure several-fold; read it for the shape, the tables above for the µs).

Run from the repository root::

    python -m benchmarks.pipeline_profile            # ~40 s on 2 cores
    python -m benchmarks.pipeline_profile --quick    # ~8 s, rougher
    python -m benchmarks.pipeline_profile --json profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import math
import os
import platform
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import anyio

import ragguard
from ragguard.errors import AttemptTimeout, DeadlineExceeded

from .overhead import NEVER_LIMITED_RPM, TARGET_PIPELINE_US, Case, Op, measure, noop

T = TypeVar("T")


# --- the proposals (not ragguard's code) --------------------------------------------------------------------


def _timeout_error(seconds: float, limit: float, ctx: ragguard.CallContext) -> DeadlineExceeded:
    """What ``ragguard.Timeout.run`` raises when its scope expired (same messages)."""
    if limit < seconds:
        return DeadlineExceeded(f"{ctx.operation}: the call's deadline passed during attempt {ctx.attempt}")
    return AttemptTimeout(f"{ctx.operation}: attempt {ctx.attempt} timed out after {seconds:g} s", timeout=seconds)


class _ProposalTimeout(ragguard.GuardBase):
    """``ragguard.Timeout``'s outside: stage, delegation flag, seconds capped by the deadline."""

    stage: ClassVar[str] = "timeout"
    enforces_deadline: ClassVar[bool] = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.clock = ragguard.SYSTEM_CLOCK

    def _limit(self, ctx: ragguard.CallContext) -> float:
        seconds = self.seconds
        remaining = ctx.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"{ctx.operation}: the call's deadline passed before the attempt started")
        return seconds if seconds <= remaining else remaining


#: per event loop: (the backend's cancel scope class, the loop's clock); asyncio only, trio goes through anyio
_SCOPE_KITS: dict[asyncio.AbstractEventLoop, tuple[type[anyio.CancelScope], Callable[[], float]]] = {}


class CachedScopeTimeout(_ProposalTimeout):
    """Proposal 3: the anyio cancel scope ``Timeout`` uses, minus anyio's backend dispatch per call.

    ``anyio.CancelScope(...)`` and ``anyio.current_time()`` each ask sniffio which library runs (~1.2 µs each);
    the class of the scope anyio returns and the loop's clock do not change while a loop runs, so they are looked
    up once per loop. Same scope, same semantics (shields, nesting, trio unchanged).
    """

    async def run(self, call: Callable[[], Awaitable[T]], ctx: ragguard.CallContext) -> T:
        limit = self._limit(ctx)
        loop = asyncio._get_running_loop()
        if loop is None:  # trio (or another backend): anyio as today
            scope_cls: Any = anyio.CancelScope
            now = anyio.current_time
        else:
            kit = _SCOPE_KITS.get(loop)
            if kit is None:
                kit = _SCOPE_KITS[loop] = (type(anyio.CancelScope()), loop.time)
            scope_cls, now = kit
        with scope_cls(deadline=now() + limit):
            return await call()
        raise _timeout_error(self.seconds, limit, ctx) from None


class _Watchdog:
    """One timer per event loop for every call in flight: armed for the earliest deadline, it cancels the calls
    that outlive theirs and re-arms for the next one.

    An entry is a list ``[deadline, task, task.cancelling() at entry, expired]`` (a list: no ``__init__`` call on
    the hot path), keyed by its ``id``.
    """

    __slots__ = ("at", "entries", "handle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.entries: dict[int, list[Any]] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.at = math.inf

    def arm(self, deadline: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.at = deadline
        self.handle = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.handle = None
        self.at = math.inf
        now = self.loop.time()
        later = math.inf
        for key, entry in list(self.entries.items()):
            if entry[0] <= now:
                # A real version would skip (and re-check later) a task inside a shielded anyio scope: a native
                # Task.cancel does not respect anyio shields.
                del self.entries[key]
                entry[3] = True
                entry[1].cancel()
            elif entry[0] < later:
                later = entry[0]
        if later != math.inf:
            self.arm(later)


_WATCHDOGS: dict[asyncio.AbstractEventLoop, _Watchdog] = {}
_current_task = asyncio.current_task


class WatchdogTimeout(_ProposalTimeout):
    """Proposal 1: on asyncio, no cancel scope and no timer per call (see :class:`_Watchdog`); the expiry is
    turned into ``AttemptTimeout`` as ``asyncio.timeout`` turns its own into ``TimeoutError`` (``uncancel``: an
    outer cancellation requested meanwhile still wins). On trio, the anyio scope as today."""

    async def run(self, call: Callable[[], Awaitable[T]], ctx: ragguard.CallContext) -> T:
        limit = self._limit(ctx)
        loop = asyncio._get_running_loop()
        if loop is None:
            with anyio.CancelScope(deadline=anyio.current_time() + limit):
                return await call()
            raise _timeout_error(self.seconds, limit, ctx) from None
        dog = _WATCHDOGS.get(loop)
        if dog is None:
            dog = _WATCHDOGS[loop] = _Watchdog(loop)
        task: Any = _current_task(loop)
        deadline = loop.time() + limit
        entry = [deadline, task, task.cancelling(), False]
        key = id(entry)
        dog.entries[key] = entry
        if deadline < dog.at:
            dog.arm(deadline)
        try:
            return await call()
        except asyncio.CancelledError:
            if entry[3] and task.uncancel() <= entry[2]:
                raise _timeout_error(self.seconds, limit, ctx) from None
            raise
        finally:
            dog.entries.pop(key, None)


class LayerOnlyTimeout(_ProposalTimeout):
    """Not a proposal: ``Timeout``'s layer (the deadline cap, one more awaited ``run``) with no timer at all; what
    any timer implementation costs at the least on top of the guards without timers."""

    async def run(self, call: Callable[[], Awaitable[T]], ctx: ragguard.CallContext) -> T:
        self._limit(ctx)
        return await call()


#: ``Task.cancelling`` / ``Task.uncancel`` (the watchdog) and ``asyncio.timeout`` are Python 3.11+
HAS_UNCANCEL = sys.version_info >= (3, 11)

PROPOSALS: dict[str, type[_ProposalTimeout]] = {"CachedScopeTimeout": CachedScopeTimeout}
if HAS_UNCANCEL:
    PROPOSALS["WatchdogTimeout"] = WatchdogTimeout


async def check_proposal(timeout_cls: type[_ProposalTimeout]) -> str | None:
    """``None`` when the proposal behaves as ``Timeout`` must, else what went wrong."""
    # a slow attempt times out
    try:
        await ragguard.Pipeline(timeout_cls(0.02)).call(anyio.sleep, 1.0)
    except AttemptTimeout:
        pass
    except Exception as exc:
        return f"slow call raised {type(exc).__name__}, not AttemptTimeout"
    else:
        return "slow call did not time out"
    # a deadline delegated to it (Deadline sees enforces_deadline) ends the call with DeadlineExceeded
    try:
        await ragguard.Pipeline(ragguard.Deadline(0.02), ragguard.Retry(attempts=2), timeout_cls(5.0)).call(
            anyio.sleep, 1.0
        )
    except AttemptTimeout:
        return "deadline expiry raised AttemptTimeout, not DeadlineExceeded"
    except DeadlineExceeded:
        pass
    else:
        return "deadline did not end the call"

    # a fast call returns its value
    async def fast() -> str:
        await asyncio.sleep(0)
        return "ok"

    if await ragguard.Pipeline(timeout_cls(1.0)).call(fast) != "ok":
        return "fast call lost its value"
    # an outer cancellation is not turned into a ragguard error
    with anyio.move_on_after(0.02) as scope:
        await ragguard.Pipeline(timeout_cls(5.0)).call(anyio.sleep, 1.0)
    if not scope.cancelled_caught:
        return "outer cancellation did not propagate"
    return None


# --- the cases ----------------------------------------------------------------------------------------------


def _guard(name: str) -> ragguard.GuardBase:
    if name == "Retry":
        return ragguard.Retry(attempts=4)
    if name == "CircuitBreaker":
        return ragguard.CircuitBreaker("bench")
    if name == "RateLimiter":
        return ragguard.RateLimiter(rpm=NEVER_LIMITED_RPM)
    if name == "ConcurrencyLimit":
        return ragguard.ConcurrencyLimit(max_in_flight=64)
    if name == "Timeout":
        return ragguard.Timeout(30.0)
    if name == "Deadline":
        return ragguard.Deadline(120.0)
    if name in PROPOSALS:
        return PROPOSALS[name](30.0)
    if name == "LayerOnlyTimeout":
        return LayerOnlyTimeout(30.0)
    raise ValueError(name)


def _pipeline_op(*names: str, folded_deadline: float | None = None) -> Callable[[], Op]:
    """A no-op call through a pipeline of ``names``; with ``folded_deadline``, no ``Deadline`` guard: the context
    is made with its deadline already set (proposal 2)."""

    def make() -> Op:
        pipeline = ragguard.Pipeline(*(_guard(n) for n in names))
        run = pipeline.run
        context = pipeline.context
        if folded_deadline is None:
            return lambda: run(noop, context())
        monotonic = time.monotonic  # SYSTEM_CLOCK.now
        seconds = folded_deadline

        def op() -> Awaitable[None]:
            ctx = context()
            ctx.deadline = monotonic() + seconds
            return run(noop, ctx)

        return op

    return make


LAYERS = ("Retry", "CircuitBreaker", "RateLimiter", "ConcurrencyLimit", "Timeout", "Deadline")
FULL = LAYERS
FULL_LABEL = "full pipeline (Deadline + Retry + Breaker + Limiter + Bulkhead + Timeout)"


def layer_cases() -> list[Case]:
    cases = [
        Case("layers", "await noop()", lambda: noop),
        Case("layers", "Pipeline() with no guard + CallContext", _pipeline_op()),
    ]
    for i in range(len(LAYERS)):
        label = "+ ".join(LAYERS[: i + 1]) if i == 0 else "+ " + LAYERS[i]
        cases.append(Case("layers", label, _pipeline_op(*LAYERS[: i + 1]), ours=True))
    for name in LAYERS[:-1]:
        cases.append(Case("alone", f"Pipeline({name})", _pipeline_op(name), ours=True))
    return cases


def timer_cases() -> list[Case]:
    def current_time() -> Op:
        async def op() -> None:
            anyio.current_time()

        return op

    def loop_time() -> Op:
        loop = asyncio.get_running_loop()

        async def op() -> None:
            loop.time()

        return op

    def construct(scope_cls: Callable[..., Any]) -> Callable[[], Op]:
        def make() -> Op:
            async def op() -> None:
                scope_cls(deadline=1e12)

            return op

        return make

    def backend_scope() -> Any:
        return type(anyio.CancelScope())

    def enter_exit(timed: bool) -> Callable[[], Op]:
        def make() -> Op:
            scope_cls = backend_scope()
            loop = asyncio.get_running_loop()
            if timed:

                async def op() -> None:
                    with scope_cls(deadline=loop.time() + 30.0):
                        await noop()

            else:

                async def op() -> None:
                    with scope_cls():
                        await noop()

            return op

        return make

    def anyio_scope() -> Op:
        async def op() -> None:
            with anyio.CancelScope(deadline=anyio.current_time() + 30.0):
                await noop()

        return op

    def call_at() -> Op:
        loop = asyncio.get_running_loop()

        def callback() -> None:
            pass

        async def op() -> None:
            loop.call_at(loop.time() + 30.0, callback).cancel()

        return op

    def asyncio_timeout() -> Op:
        timeout: Any = asyncio.timeout  # type: ignore[attr-defined,unused-ignore]  # 3.11+, as this script

        async def op() -> None:
            async with timeout(30.0):
                await noop()

        return op

    return [
        Case("timer", "await noop()", lambda: noop),
        Case("timer", "loop.time()", loop_time),
        Case("timer", "anyio.current_time()", current_time, note="sniffio dispatch + loop.time()"),
        Case("timer", "anyio.CancelScope(deadline=…) (construct only)", construct(anyio.CancelScope)),
        Case(
            "timer",
            "backend CancelScope(deadline=…) (construct only)",
            lambda: construct(backend_scope())(),
            note="type(anyio.CancelScope()), no dispatch",
        ),
        Case("timer", "with backend CancelScope() (no deadline)", enter_exit(timed=False), note="no timer"),
        Case("timer", "with backend CancelScope(deadline=loop.time()+30)", enter_exit(timed=True)),
        Case(
            "timer", "with anyio.CancelScope(deadline=anyio.current_time()+30)", anyio_scope, note="what Timeout does"
        ),
        Case("timer", "loop.call_at(…) + handle.cancel()", call_at, note="a timer armed and disarmed"),
        Case("timer", "async with asyncio.timeout(30)", asyncio_timeout),
    ]


UNTIMED = ("Retry", "CircuitBreaker", "RateLimiter", "ConcurrencyLimit")


def proposal_cases() -> list[Case]:
    def full_with(name: str) -> tuple[str, ...]:
        return tuple(name if n == "Timeout" else n for n in FULL)

    return [
        Case("proposals", FULL_LABEL, _pipeline_op(*FULL), ours=True),
        Case(
            "proposals",
            "1. full, Timeout → WatchdogTimeout",
            _pipeline_op(*full_with("WatchdogTimeout")),
            ours=True,
            vs=FULL_LABEL,
        ),
        Case(
            "proposals",
            "1 + 2. WatchdogTimeout, Deadline folded into the context",
            _pipeline_op(*UNTIMED, "WatchdogTimeout", folded_deadline=120.0),
            ours=True,
            vs=FULL_LABEL,
            note="no Deadline layer",
        ),
        Case(
            "proposals",
            "3. full, Timeout → CachedScopeTimeout",
            _pipeline_op(*full_with("CachedScopeTimeout")),
            ours=True,
            vs=FULL_LABEL,
        ),
        Case(
            "proposals",
            "full, Timeout → LayerOnlyTimeout (no timer at all)",
            _pipeline_op(*full_with("LayerOnlyTimeout")),
            ours=True,
            vs=FULL_LABEL,
            note="not a proposal: the floor for any timer",
        ),
        Case(
            "proposals",
            "Retry + Breaker + Limiter + Bulkhead (no timers)",
            _pipeline_op(*UNTIMED),
            ours=True,
            vs=FULL_LABEL,
            note="not a proposal",
        ),
    ]


# --- profile --------------------------------------------------------------------------------------------------


def profile_full(calls: int, top: int) -> tuple[str, list[dict[str, Any]]]:
    """cProfile of ``calls`` no-op calls through the full pipeline: the table as text, and its rows."""

    async def run() -> None:
        op = _pipeline_op(*FULL)()
        for _ in range(100):
            await op()
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(calls):
            await op()
            if i % 1000 == 999:
                await asyncio.sleep(0)
        profiler.disable()
        stats = pstats.Stats(profiler)
        rows.extend(_rows(stats, calls))

    rows: list[dict[str, Any]] = []
    asyncio.run(run())
    rows.sort(key=lambda r: r["own_us_per_call"], reverse=True)
    rows = rows[:top]
    out = io.StringIO()
    total = sum(r["own_us_per_call"] for r in rows)
    out.write(f"{'own µs/call':>11}  {'calls/call':>10}  function\n")
    for r in rows:
        out.write(f"{r['own_us_per_call']:>11.2f}  {r['calls_per_call']:>10.1f}  {r['function']}\n")
    out.write(f"{total:>11.2f}  (sum of the rows above, under cProfile)\n")
    return out.getvalue(), rows


def _rows(stats: pstats.Stats, calls: int) -> list[dict[str, Any]]:
    rows = []
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, ncalls, tottime, _, _) in entries.items():
        if name in ("run", "sleep") and "benchmarks" in filename and "pipeline_profile" in filename:
            continue
        short = filename
        for marker in ("site-packages/", "src/", "lib/python3"):
            if marker in filename:
                short = filename.split(marker, 1)[1]
                break
        where = f"{short}:{line}" if line else short
        rows.append(
            {
                "function": f"{name} ({where})",
                "calls_per_call": ncalls / calls,
                "own_us_per_call": tottime / calls * 1e6,
            }
        )
    return rows


# --- reporting ----------------------------------------------------------------------------------------------


def _table(title: str, cases: list[Case], *, delta: bool, console: Any) -> list[dict[str, Any]]:
    from rich.table import Table

    table = Table(title=title)
    for header in ("case", "µs/call", "min", "Δ µs" if delta else "vs", "note"):
        table.add_column(header, justify="left" if header in ("case", "note", "vs") else "right")
    by_label = {c.label: c for c in cases if c.samples_ns}
    rows: list[dict[str, Any]] = []
    previous: Case | None = None
    for case in cases:
        if case.error is not None:
            table.add_row(case.label, "—", "—", "", f"failed: {case.error}")
            rows.append({"label": case.label, "error": case.error})
            continue
        third = ""
        if delta and previous is not None and case.group == "layers" and previous.samples_ns:
            third = f"{case.median_us - previous.median_us:+.2f}"
        elif not delta and case.vs in by_label:
            ratio = case.median_us / by_label[case.vs].median_us
            third = f"{ratio:.2f}×"
        style = ""
        if "full" in case.label and case.median_us <= TARGET_PIPELINE_US:
            style = "green"
        table.add_row(case.label, f"{case.median_us:.2f}", f"{case.min_us:.2f}", third, case.note, style=style)
        rows.append(
            {"label": case.label, "median_us": case.median_us, "min_us": case.min_us, "note": case.note or None}
        )
        previous = case
    console.print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_profile",
        description="Where the full pipeline's per-call overhead goes (layers, the timer's anatomy, cProfile) and "
        "what two proposed Timeout implementations would save.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--repeats", type=int, help="repeats per case (default 11, --quick 5)")
    parser.add_argument("--target-ms", type=float, help="duration of one repeat (default 80, --quick 6)")
    parser.add_argument("--profile-calls", type=int, default=None, help="calls profiled (default 200k, quick 50k)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 11)
    target_ms = args.target_ms or (6.0 if args.quick else 80.0)
    profile_calls = args.profile_calls or (50_000 if args.quick else 200_000)

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 130)
    started = time.perf_counter()

    async def checks() -> dict[str, str | None]:
        return {name: await check_proposal(cls) for name, cls in PROPOSALS.items()}

    problems = asyncio.run(checks())
    for name, problem in problems.items():
        verdict = "[green]behaves as Timeout[/]" if problem is None else f"[red]{problem}[/]"
        console.print(f"check {name}: {verdict}")

    groups = {"layers": layer_cases(), "timer": timer_cases(), "proposals": proposal_cases()}
    everything = [case for cases in groups.values() for case in cases]

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"\r{message}…", end="", file=sys.stderr, flush=True)

    asyncio.run(measure(everything, repeats=repeats, target_ms=target_ms, progress=progress))
    if sys.stderr.isatty():
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr, flush=True)
    results: dict[str, Any] = {
        "benchmark": "benchmarks.pipeline_profile",
        "unit": "µs per call",
        "python": platform.python_version(),
        "anyio": anyio.__version__ if hasattr(anyio, "__version__") else None,
        "cpus": os.cpu_count(),
        "checks": problems,
    }
    results["layers"] = _table(
        "1. The full pipeline built up one guard at a time (Δ: what the guard adds), then each guard alone",
        groups["layers"],
        delta=True,
        console=console,
    )
    results["timer"] = _table(
        "2. Anatomy of one anyio cancel scope with a deadline (asyncio)", groups["timer"], delta=False, console=console
    )
    results["proposals"] = _table(
        f"3. The full pipeline with a proposed Timeout (target ≤ {TARGET_PIPELINE_US:g} µs; vs: ÷ today's)",
        groups["proposals"],
        delta=False,
        console=console,
    )
    text, rows = profile_full(profile_calls, top=16)
    console.print(f"4. cProfile of {profile_calls:,} calls through the full pipeline (own time, inflated):")
    console.print(text, markup=False, highlight=False)
    results["profile"] = rows
    wall = time.perf_counter() - started
    console.print(
        f"[dim]{repeats} interleaved repeats of ~{target_ms:g} ms per case, {wall:.0f} s in all; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs; noisy shared machine: read differences under "
        "~0.3 µs as noise.[/]"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2, ensure_ascii=False)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
