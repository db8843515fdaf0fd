"""Plots of one Monday-morning run (``benchmarks/scenario.py``: ``ragguard demo`` with its defaults) for the docs.

Draws, for naive / sdk-default / guarded, from one run:

- ``scenario-goodput.png``: users served per second (one-second bins) and cumulative users served against time
  since the users arrived, with the quota's ceiling: the most users any client could have served by then if each
  needed the provider (a full bucket, then the refill; a guarded client's cache hits and coalesced questions
  need no quota and can take it above the line);
- ``scenario-latency.png``: p50 / p95 / p99 latency of the served users, per mode.

Run from the repository root (needs matplotlib: ``pip install -e '.[bench]'``)::

    python -m benchmarks.plots                              # runs the scenario (~1-2 minutes), then draws
    python -m benchmarks.plots --from scenario.json         # draws a run saved by benchmarks.scenario --json
    python -m benchmarks.plots --out docs/img --save-json scenario.json

matplotlib is imported here only (Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: colours by mode (colour-blind-safe: Okabe-Ito)
COLOURS = {"naive": "#D55E00", "sdk-default": "#E69F00", "guarded": "#0072B2"}
BIN_S = 1.0
GOODPUT_PNG = "scenario-goodput.png"
LATENCY_PNG = "scenario-latency.png"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        print("plots need matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        raise SystemExit(2) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quota_users_per_s(mode: dict[str, Any], burst_s: float) -> float:
    """The quota's users per second, recovered from a mode's goodput (``served ÷ (q × (wall + burst))``)."""
    if not mode["goodput"]:
        return math.nan
    return float(mode["succeeded"]) / (float(mode["goodput"]) * (float(mode["wall_s"]) + burst_s))


def _burst_s() -> float:
    from ragguard.testing import SimulatorConfig

    return float(SimulatorConfig().burst_seconds)


def goodput_figure(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    report = data["report"]
    modes = [m["mode"] for m in report["modes"]]
    timeline: dict[str, list[list[Any]]] = data["timeline"]
    burst_s = _burst_s()
    guarded = next((m for m in report["modes"] if m["mode"] == "guarded"), report["modes"][0])
    rate = quota_users_per_s(guarded, burst_s)
    end = max((events[-1][0] for events in timeline.values() if events), default=1.0)

    fig, (per_s, cumulative) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    bins = max(1, math.ceil(end / BIN_S))
    for mode in modes:
        events = timeline.get(mode, [])
        served = [t for t, ok in events if ok]
        counts = [0] * bins
        for t in served:
            counts[min(bins - 1, int(t / BIN_S))] += 1
        xs = [(i + 0.5) * BIN_S for i in range(bins)]
        per_s.plot(xs, [c / BIN_S for c in counts], label=mode, color=COLOURS.get(mode), linewidth=1.6)
        served.sort()
        cumulative.step(
            [0.0, *served],
            list(range(len(served) + 1)),
            where="post",
            label=f"{mode}: {len(served):,} served",
            color=COLOURS.get(mode),
            linewidth=1.8,
        )
    if not math.isnan(rate):
        per_s.axhline(
            rate,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"quota: {rate:,.0f} users/s (each needing the provider)",
        )
        users = report["modes"][0]["users"]
        ceiling_end = min(end, max(0.0, (users - rate * burst_s) / rate))
        cumulative.plot(
            [0.0, ceiling_end, end],
            [rate * burst_s, rate * (burst_s + ceiling_end), min(users, rate * (burst_s + end))],
            color="grey",
            linestyle="--",
            linewidth=1,
            label="quota ceiling (full bucket + refill; cache hits go above it)",
        )
    per_s.set_ylabel("users served per second")
    per_s.set_title(
        f"{report['modes'][0]['users']:,} users at once, quota {report['rpm']:,.0f} RPM / {report['tpm']:,.0f} TPM "
        f"per model ({BIN_S:g} s bins)"
    )
    per_s.legend(loc="upper right", fontsize=8)
    per_s.grid(alpha=0.3)
    cumulative.set_xlabel("seconds since the users arrived")
    cumulative.set_ylabel("users served (cumulative)")
    cumulative.legend(loc="center right", fontsize=8)
    cumulative.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_figure(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    report = data["report"]
    modes = report["modes"]
    quantiles = (("p50", "p50_s"), ("p95", "p95_s"), ("p99", "p99_s"))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        xs = [q + (index - (len(modes) - 1) / 2) * width for q in range(len(quantiles))]
        values = [float(mode[key]) for _, key in quantiles]
        bars = ax.bar(
            xs,
            values,
            width=width * 0.95,
            color=COLOURS.get(mode["mode"]),
            label=f"{mode['mode']} ({mode['succeeded']:,}/{mode['users']:,} served)",
        )
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(quantiles)), [name for name, _ in quantiles])
    ax.set_ylabel("latency of served users, seconds")
    ax.set_title("Latency percentiles (served users only: a failed user has no latency)")
    top = max(float(mode[key]) for mode in modes for _, key in quantiles)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.legend(fontsize=8, loc="upper center", ncol=len(modes))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plots",
        description="Goodput-over-time and latency-percentile plots of one Monday-morning run, for the docs.",
    )
    parser.add_argument("--from", dest="source", metavar="PATH", help="a run saved by benchmarks.scenario --json")
    parser.add_argument("--out", default="docs/img", help="where to write the PNGs (default docs/img)")
    parser.add_argument("--save-json", metavar="PATH", help="also save the run drawn (when this script ran it)")
    parser.add_argument("--quick", action="store_true", help="run the scenario with 300 users (not for the docs)")
    args = parser.parse_args(argv)
    _pyplot()  # fail before a long run if matplotlib is missing
    if args.source:
        with open(args.source, encoding="utf-8") as fh:
            data = json.load(fh)
    else:
        from . import scenario

        target = args.save_json or str(Path(args.out) / ".scenario.json")
        status = scenario.main([*(["--quick"] if args.quick else []), "--json", target])
        if status != 0:
            return status
        with open(target, encoding="utf-8") as fh:
            data = json.load(fh)
        if not args.save_json:
            Path(target).unlink()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    goodput_figure(data, out / GOODPUT_PNG)
    latency_figure(data, out / LATENCY_PNG)
    print(f"wrote {out / GOODPUT_PNG} and {out / LATENCY_PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
