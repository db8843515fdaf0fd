"""The ``ragguard`` command line: ``ragguard demo`` runs the Monday-morning scenario, ``ragguard loadtest`` load-tests
your own code against the simulators, ``ragguard health`` reports readiness."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._report import missing_modules
from .loadtest import add_loadtest_parser, run_from_args

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ragguard`` command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ragguard",
        description="Production hygiene for RAG code: retries, breakers, rate limits, bulkheads.",
    )
    parser.add_argument("--version", action="version", version=f"ragguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the Monday-morning scenario: naive vs sdk-default vs guarded against a simulated provider",
        description=(
            "Start OpenAI- and Pinecone-compatible simulators on loopback, ingest a knowledge base, then let N users "
            "at once embed a question, retrieve context from the index and ask a chat completion through the real "
            "openai and pinecone SDKs, three ways: naive (a new client per request, no retries), sdk-default (one "
            "shared client with the SDK's own retries) and guarded (ragguard.guard(AsyncOpenAI()) and "
            "ragguard.guard(index) with policies matched to the quotas)."
        ),
    )
    demo.add_argument("--users", type=int, default=1000, help="concurrent users (default: 1000)")
    demo.add_argument(
        "--rpm", type=float, default=5_000, help="provider quota, requests per minute per model (default: 5000)"
    )
    demo.add_argument(
        "--tpm", type=float, default=4_000_000, help="provider quota, tokens per minute per model (default: 4000000)"
    )
    demo.add_argument(
        "--faults",
        choices=["none", "flaky"],
        default="none",
        help="provider faults: none or flaky (5xx, drops, stalls)",
    )
    demo.add_argument(
        "--repeat-share",
        type=float,
        default=0.3,
        help="share of users asking a popular question word for word (0-1, default 0.3); the rest ask their own",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed for the simulator and the scenario")
    demo.add_argument(
        "--modes",
        default="naive,sdk-default,guarded",
        help="comma-separated modes to run (default: all three)",
    )
    demo.add_argument(
        "--rag",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the full RAG round trip: ingest a corpus into a Pinecone-compatible index, retrieve per user "
        "(default; --no-rag: embed and chat only)",
    )
    demo.add_argument(
        "--corpus", type=int, default=200, help="knowledge-base chunks to ingest before users arrive (default: 200)"
    )
    demo.add_argument("--workers", type=int, default=1, help="OS processes to split the users between (default: 1)")
    demo.add_argument(
        "--redis",
        metavar="URL",
        help="share the workers' limits, breakers and caches through this Redis (default: each process alone)",
    )
    health = commands.add_parser(
        "health",
        help="print liveness and readiness as JSON (exit status 1 when not ready)",
        description="Report ragguard's health as JSON: the process's guards and, with --redis, whether Redis answers.",
    )
    health.add_argument("--redis", metavar="URL", help="also check this Redis backend")
    health.add_argument(
        "--fail-closed", action="store_true", help="treat the Redis backend as fail_closed (unreachable = not ready)"
    )
    demo.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    demo.add_argument("--no-progress", action="store_true", help="no live progress bars (plain output)")
    add_loadtest_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ragguard`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        # the demo drives the real SDKs against the simulators: say what to install rather than fail on an import
        missing = missing_modules("openai", "starlette", "uvicorn", *(("pinecone",) if args.rag else ()))
        if missing:
            hint = " (or run it with --no-rag, which needs no index)" if missing == ["pinecone"] else ""
            print(f"ragguard demo needs {', '.join(missing)}: pip install 'ragguard[cli]'{hint}")
            return 2
        from .demo import DemoOptions, run_demo_cli

        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        options = DemoOptions(
            users=args.users,
            rpm=args.rpm,
            tpm=args.tpm,
            faults=args.faults,
            repeat_share=args.repeat_share,
            rag=args.rag,
            corpus=args.corpus,
            workers=args.workers,
            redis=args.redis,
            seed=args.seed,
            modes=modes,
        )
        return run_demo_cli(options, json_path=args.json, progress=not args.no_progress)
    if args.command == "loadtest":
        return run_from_args(args)
    if args.command == "health":
        return _health(args.redis, args.fail_closed)
    parser.print_help(sys.stderr)
    return 2


def _health(redis_url: str | None, fail_closed: bool) -> int:
    import json

    import anyio

    from .._health import ahealth
    from ..backends.memory import default_backend

    backends: list[Any] = [default_backend()]
    if redis_url is not None:
        from ..backends.redis import RedisBackend

        backends.append(RedisBackend(redis_url, on_unavailable="fail_closed" if fail_closed else "fail_open"))
    report = anyio.run(ahealth, backends)
    print(json.dumps(report.model_dump(mode="json"), indent=2))
    return 0 if report.ready else 1
