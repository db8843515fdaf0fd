"""``python -m benchmarks``: run every benchmark, one after the other, each printing its own tables.

Each benchmark compares ragguard with its alternatives in the same process run and prints the ratios (see
``benchmarks/README.md`` and ``docs/benchmarks.md``):

=============== ==============================================================================================
``overhead``    per-call overhead of each guard and of the full pipeline vs tenacity, stamina, backoff,
                aiolimiter, pybreaker, aiobreaker, asyncio and anyio
``redis``       the shared Redis rate limiter vs a raw ``EVALSHA``, ``limits`` and throttled-py (starts its own
                ``redis-server``; skipped when none can be found)
``cache``       cache-hit latency vs cashews and aiocache
``batching``    embeddings throughput under a quota: naive, sdk-default, guarded, guarded + micro-batched
``ingest``      vector ingestion under a write limit: per-vector upserts vs guarded bulk upsert
``scenario``    the Monday-morning scenario (``ragguard demo`` defaults): goodput and wall / min per mode
``hedging``     tail latency with and without hedged requests
``outage``      upstream load and recovery through a provider outage
``profile``     where the full pipeline's overhead goes (not run unless named with ``--only``)
=============== ==============================================================================================

Usage, from the repository root (``pip install -e '.[dev]'`` installs every competitor)::

    python -m benchmarks                         # everything, full length (~10 minutes on 2 cores)
    python -m benchmarks --quick                 # everything, short runs (~3 minutes)
    python -m benchmarks --only overhead --only cache
    python -m benchmarks --json-dir results/     # also write each benchmark's JSON to results/NAME.json

A benchmark that cannot run here (a library or ``redis-server`` missing) is reported as skipped; one that fails
does not stop the others. The exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

#: exit status of a benchmark's ``main`` meaning "cannot run here" (autotools' convention for a skipped test)
SKIPPED = 77


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    what: str
    #: arguments always passed (e.g. the part of a script this entry runs)
    argv: tuple[str, ...] = ()
    #: whether the script accepts ``--json PATH``
    json: bool = True
    #: run when no ``--only`` is given
    default: bool = True


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("overhead", "benchmarks.overhead", "per-call overhead vs tenacity, stamina, backoff, aio/pybreaker…"),
    Benchmark("redis", "benchmarks.redis_limiter", "Redis limiter vs raw EVALSHA, limits, throttled-py"),
    Benchmark("cache", "benchmarks.cache", "cache hits vs cashews and aiocache"),
    Benchmark(
        "batching",
        "benchmarks.batching",
        "embeddings throughput under a quota, batched vs naive",
        ("--only", "throughput"),  # its cache part is the "cache" entry
    ),
    Benchmark("ingest", "benchmarks.ingest", "vector ingestion: guarded bulk upsert vs per-vector upserts"),
    Benchmark("scenario", "benchmarks.scenario", "the Monday-morning scenario: goodput vs the quota"),
    Benchmark("hedging", "benchmarks.hedging", "tail latency with and without hedging"),
    Benchmark("outage", "benchmarks.outage", "upstream load and recovery through an outage"),
    Benchmark("profile", "benchmarks.pipeline_profile", "where the full pipeline's overhead goes", default=False),
)


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every ragguard benchmark (each compares ragguard with its alternatives in one run).",
    )
    parser.add_argument("--quick", action="store_true", help="short runs of every benchmark (rougher figures)")
    parser.add_argument(
        "--only", metavar="NAME", action="append", choices=names, help=f"run only this one (repeatable): {names}"
    )
    parser.add_argument("--json-dir", metavar="DIR", help="also write each benchmark's results to DIR/NAME.json")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:10s} {b.what}{'' if b.default else '  (only with --only)'}")
        return 0
    chosen = [b for b in BENCHMARKS if (b.name in args.only if args.only else b.default)]
    if args.json_dir:
        Path(args.json_dir).mkdir(parents=True, exist_ok=True)

    print(
        f"ragguard benchmarks{' (--quick)' if args.quick else ''}: {', '.join(b.name for b in chosen)}; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    outcomes: list[tuple[str, str, float]] = []
    for bench in chosen:
        bench_argv = list(bench.argv)
        if args.quick:
            bench_argv.append("--quick")
        if args.json_dir and bench.json:
            bench_argv += ["--json", str(Path(args.json_dir) / f"{bench.name}.json")]
        command = " ".join(["python -m", bench.module, *bench_argv])
        print(f"\n{'=' * 100}\n{bench.name}: {bench.what}\n$ {command}\n", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(bench.module)
            status = module.main(bench_argv)
        except ImportError as exc:
            outcome = f"skipped: {exc.name or exc} is not installed"
            print(outcome)
        except SystemExit as exc:  # argparse errors
            outcome = "ok" if exc.code in (0, None) else f"failed: exit status {exc.code}"
        except Exception:  # one benchmark failing must not stop the others; the traceback says why
            traceback.print_exc()
            outcome = "failed"
        else:
            outcome = {0: "ok", None: "ok", SKIPPED: "skipped"}.get(status, f"failed: exit status {status}")
        elapsed = time.perf_counter() - started
        outcomes.append((bench.name, outcome, elapsed))
        sys.stdout.flush()

    print(f"\n{'=' * 100}\nsummary")
    for name, outcome, elapsed in outcomes:
        print(f"  {name:10s} {outcome:40s} {elapsed:7.1f} s")
    return 1 if any(outcome.startswith("failed") for _, outcome, _ in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
