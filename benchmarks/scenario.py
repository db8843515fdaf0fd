"""The Monday-morning scenario (``ragguard demo``) as a benchmark: goodput against the provider's quota, per mode.

Runs :func:`ragguard.cli.demo.run_demo` with its defaults (:class:`ragguard.cli.demo.DemoOptions`: 1,000 users
at once, a quota of 5,000 RPM / 4 M TPM per model, a 200-chunk knowledge base ingested first, the real
``openai`` and ``pinecone`` SDKs against ragguard's simulators in child processes) for the three modes, one after
the other: ``naive`` (a new client per request, no retries), ``sdk-default`` (one client per SDK, its own
retries) and ``guarded`` (``ragguard.guard`` with the demo's policy). For each mode it prints:

- users served and failed, the provider's 429s, latency percentiles (nearest rank, over served users);
- ``wall s``: the users' phase, from the first user's start to the last one's end;
- ``min s``: the least wall time the quota allows for what the mode sent (each model's buckets start full and
  refill at rpm/60 and tpm/60 per second);
- ``wall / min``: how close the mode came to the quota's pace (1.0× is the best any client can do);
- ``goodput``: users served ÷ the users the quota admits in that wall time (a full bucket plus the refill).

It also records when each user finished (through ``run_demo``'s ``on_user`` callback), which
``benchmarks/plots.py`` draws; ``--json`` writes it with the demo's own report.

Run from the repository root (needs the ``cli`` extra: ``pip install -e '.[dev]'``)::

    python -m benchmarks.scenario                 # the demo's defaults, ~1-2 minutes on 2 cores
    python -m benchmarks.scenario --quick         # 300 users, 60 chunks
    python -m benchmarks.scenario --json scenario.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import anyio

#: exit status when the scenario cannot run here (an SDK missing): ``python -m benchmarks`` reports "skipped"
SKIPPED = 77


class Timeline:
    """When each user of each mode finished, in seconds since the mode's users started, and whether served."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.events: dict[str, list[tuple[float, bool]]] = {}

    def on_stage(self, mode: str, stage: str) -> None:
        if stage == "users":
            self.started[mode] = time.perf_counter()
            self.events[mode] = []

    def on_user(self, mode: str, ok: bool) -> None:
        start = self.started.get(mode)
        if start is not None:
            self.events[mode].append((round(time.perf_counter() - start, 4), ok))


def run(options: Any) -> tuple[Any, Timeline]:
    """Run the demo; its report and the timeline."""
    from ragguard.cli.demo import run_demo

    timeline = Timeline()
    report = anyio.run(lambda: run_demo(options, on_user=timeline.on_user, on_stage=timeline.on_stage))
    return report, timeline


def _ratio(wall: float, minimum: float) -> float:
    return wall / minimum if minimum > 0 else math.nan


def print_report(report: Any) -> dict[str, dict[str, float]]:
    """The table and the ratios; the per-mode figures the summary quotes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    users = report.modes[0].users if report.modes else 0
    table = Table(
        title=f"Monday morning: {users:,} users at once, quota {report.rpm:,.0f} RPM / {report.tpm:,.0f} TPM per "
        f"model, {report.corpus} chunks ingested first (ragguard.cli.demo.run_demo)",
        caption="wall s: the users' phase · min s: least wall time the quota allows for what the mode sent · "
        "wall / min: 1.0× is the quota's own pace · goodput: served ÷ what the quota admits in the wall time · "
        "p50-p99: latency of served users",
    )
    headers = ("mode", "served", "failed", "429s", "p50 s", "p95 s", "p99 s", "wall s", "min s", "wall / min")
    for header in (*headers, "goodput"):
        table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True)
    figures: dict[str, dict[str, float]] = {}
    for m in report.modes:
        ratio = _ratio(m.wall_s, m.theoretical_min_s)
        figures[m.mode] = {"goodput": m.goodput, "wall_over_min": ratio, "served": m.succeeded, "wall_s": m.wall_s}
        table.add_row(
            f"[bold cyan]{m.mode}[/]" if m.mode == "guarded" else m.mode,
            f"{m.succeeded:,} ({m.succeeded / max(1, m.users):.0%})",
            f"{m.failed:,}",
            f"{m.upstream_429:,} ({m.upstream_429 / max(1, m.upstream_requests):.0%})",
            f"{m.p50_s:.2f}",
            f"{m.p95_s:.2f}",
            f"{m.p99_s:.2f}",
            f"{m.wall_s:.2f}",
            f"{m.theoretical_min_s:.2f}",
            "—" if math.isnan(ratio) else f"{ratio:.2f}×",
            f"{m.goodput:.0%}",
        )
    console.print(table)
    for m in report.modes:
        if m.errors:
            console.print(f"  {m.mode} failures: " + ", ".join(f"{k} × {v:,}" for k, v in sorted(m.errors.items())))
    guarded = figures.get("guarded")
    if guarded is not None:
        for other in ("naive", "sdk-default"):
            theirs = figures.get(other)
            if theirs is None:
                continue
            gain = guarded["goodput"] / theirs["goodput"] if theirs["goodput"] else math.inf
            console.print(
                f"guarded vs {other}: goodput {guarded['goodput']:.0%} vs {theirs['goodput']:.0%} "
                f"({'∞' if math.isinf(gain) else f'{gain:.1f}'}×); served {guarded['served']:,.0f} vs "
                f"{theirs['served']:,.0f}; wall / min {guarded['wall_over_min']:.2f}× vs {theirs['wall_over_min']:.2f}×"
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scenario",
        description="The Monday-morning scenario (ragguard demo, defaults): goodput and wall / min per mode.",
    )
    parser.add_argument("--quick", action="store_true", help="300 users and 60 chunks instead of the defaults")
    parser.add_argument("--users", type=int, help="users (default: the demo's, 1,000)")
    parser.add_argument("--json", metavar="PATH", help="also write the report and the timeline as JSON to PATH")
    args = parser.parse_args(argv)
    try:
        import openai  # noqa: F401
        import pinecone  # noqa: F401
        import uvicorn  # noqa: F401

        from ragguard.cli.demo import DemoOptions
    except ImportError as exc:
        print(f"scenario skipped: {exc.name} is not installed (pip install -e '.[dev]')")
        return SKIPPED
    overrides: dict[str, Any] = {}
    if args.quick:
        overrides.update(users=300, corpus=60)
    if args.users is not None:
        overrides["users"] = args.users
    options = DemoOptions(**overrides)
    started = time.perf_counter()
    report, timeline = run(options)
    figures = print_report(report)
    wall = time.perf_counter() - started
    print(f"{wall:.0f} s in all; Python {platform.python_version()}, {os.cpu_count()} CPUs")
    if args.json:
        payload = {
            "benchmark": "benchmarks.scenario",
            "options": options.model_dump(mode="json"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "report": report.model_dump(mode="json"),
            "ratios": figures,
            "timeline": {mode: [[t, ok] for t, ok in events] for mode, events in timeline.events.items()},
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=1)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
