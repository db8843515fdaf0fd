"""``ragguard loadtest``: load-test your own code against the OpenAI (and Pinecone) simulators on loopback.

::

    ragguard loadtest myapp.rag:answer --users 300 --calls-per-user 3 --rpm 3000 --tpm 1000000

starts an :class:`~ragguard.testing.OpenAISimulator` enforcing the quota (requests and tokens per minute, per
model, over a one-second burst), and with ``--pinecone`` a :class:`~ragguard.testing.PineconeSimulator` with a
write limit, each in a child process on 127.0.0.1 (:func:`ragguard.testing.serve`, ``mode="process"``). Then it
sets the environment your code reads its endpoints from, *before* importing your module (or re-importing it, when
it was already imported), so module-level clients are built against the simulators:

- ``OPENAI_BASE_URL``: the simulator's ``/v1`` URL (what ``AsyncOpenAI()`` and ``OpenAI()`` read);
- ``OPENAI_API_KEY``: a placeholder key, so no real key is ever sent anywhere;
- with ``--pinecone``, ``PINECONE_HOST`` and ``RAGGUARD_PINECONE_HOST``: the index's URL, for
  ``pc.IndexAsyncio(host=...)`` (the SDK reads neither), and ``PINECONE_API_KEY``: a placeholder key;
- ``NO_PROXY`` and ``no_proxy``: loopback added, so the load never goes through a proxy.

Each target (``package.module:function``, or ``path/to/file.py:function``; an attribute path such as
``module:obj.method`` works) is called as ``fn(user)`` by ``--users`` concurrent users, each making
``--calls-per-user`` calls one after the other (and, with ``--duration``, calling again until that many seconds
have passed). An ``async def`` runs on the event loop; a plain function runs in a worker thread per user. A call
that raises counts as failed, by exception type; one that runs past ``--call-timeout`` seconds fails with
``TimeoutError`` (a plain function's thread is then abandoned, not stopped: Python cannot stop a thread). The
return value is ignored. Several targets run one after the other, each on a fresh quota
(the simulators are reset in between), in one event loop, so module-level clients can be shared by them.

The environment is restored when the command returns. Cancellation (Ctrl-C) is never counted as a failure: it
stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ._report import (
    missing_modules,
    percentile,
    report_console,
    simulator_figures,
    theoretical_min_s,
    write_json,
)

__all__ = [
    "LoadtestOptions",
    "LoadtestReport",
    "TargetResult",
    "add_loadtest_parser",
    "load_target",
    "render_table",
    "run_loadtest",
    "run_loadtest_cli",
]

#: the API keys handed to the code under test (the simulators accept any key)
API_KEY = "sk-ragguard-loadtest-not-a-real-key"
PINECONE_API_KEY = "pc-ragguard-loadtest-not-a-real-key"
#: environment variables holding the Pinecone simulator's URL (``--pinecone``; the SDK itself reads neither)
PINECONE_HOST_VARIABLES = ("PINECONE_HOST", "RAGGUARD_PINECONE_HOST")


class LoadtestOptions(BaseModel):
    """What to run and against which simulated quota (validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``package.module:function`` or ``path/to/file.py:function``, run one after the other
    targets: tuple[str, ...] = Field(min_length=1)
    #: concurrent users, each calling the target one call after another
    users: int = Field(default=100, ge=1, le=100_000)
    #: calls each user makes (``None``: 1, or as many as ``duration`` allows)
    calls_per_user: int | None = Field(default=None, ge=1, le=1_000_000)
    #: seconds during which users keep calling (a call under way is finished; ``None``: ``calls_per_user`` only)
    duration: float | None = Field(default=None, gt=0, le=86_400)
    #: provider quota per model, requests per minute
    rpm: float = Field(default=5_000, gt=0)
    #: provider quota per model, tokens per minute
    tpm: float = Field(default=4_000_000, gt=0)
    faults: Literal["none", "flaky"] = "none"
    #: also serve a Pinecone-compatible index (its URL in ``PINECONE_HOST`` and ``RAGGUARD_PINECONE_HOST``)
    pinecone: bool = False
    #: the index's vector size (1536: ``text-embedding-3-small``'s default)
    dimension: int = Field(default=1536, ge=1, le=20_000)
    #: the index's write limit, upsert and delete requests per second (as a serverless index enforces)
    index_write_rps: float = Field(default=10.0, gt=0)
    #: seconds a single call may take before it fails with ``TimeoutError``
    call_timeout: float = Field(default=300.0, gt=0)
    #: ``package.module:function`` run (not measured) before each target's users, e.g. to ingest a corpus
    setup: str | None = None
    seed: int = 7
    backend: Literal["asyncio", "trio"] = "asyncio"

    @field_validator("targets")
    @classmethod
    def _well_formed(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        for target in targets:
            _split(target)
        return targets

    @field_validator("setup")
    @classmethod
    def _setup_well_formed(cls, setup: str | None) -> str | None:
        if setup is not None:
            _split(setup)
        return setup

    @property
    def calls_each(self) -> int | None:
        """Calls per user (``None``: unbounded, until ``duration``)."""
        if self.calls_per_user is not None:
            return self.calls_per_user
        return None if self.duration is not None else 1


class TargetResult(BaseModel):
    """The figures of one target (the JSON keys of ``--json``; later versions add keys, never rename these)."""

    target: str
    users: int
    calls: int = Field(description="calls made (served + failed)")
    succeeded: int
    failed: int
    errors: dict[str, int] = Field(default_factory=dict, description="failed calls by exception type")
    p50_s: float
    p95_s: float
    p99_s: float
    wall_s: float
    calls_per_s: float = Field(description="calls served per second of wall time")
    upstream_requests: int = Field(description="requests the OpenAI simulator received")
    upstream_429: int = Field(description="of which it answered 429")
    tokens: int = Field(description="tokens the OpenAI simulator charged")
    theoretical_min_s: float = Field(description="least wall time the quota allows for what was admitted")
    index_requests: int = Field(default=0, description="requests the Pinecone simulator received (--pinecone)")
    index_429: int = Field(default=0, description="of which it answered 429")


class LoadtestReport(BaseModel):
    """Everything ``ragguard loadtest`` measured."""

    rpm: float
    tpm: float
    faults: str
    seed: int
    users: int
    calls_per_user: int | None
    duration: float | None
    pinecone: bool
    targets: list[TargetResult]


# --- targets ---------------------------------------------------------------------------------------------------


def _split(target: str) -> tuple[str, str]:
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a target is 'package.module:function' or 'path/to/file.py:function', not {target!r}")
    return module, attr


def _import(module: str, fresh: set[str]) -> Any:
    """Import ``module`` (a dotted name, or a ``.py`` path) now that the environment is set: re-executed once per
    run when it was already imported, so module-level clients see the simulators' addresses."""
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module).resolve()
        name = "_ragguard_loadtest_" + path.stem
        if name in sys.modules and path.as_posix() in fresh:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module}: not a Python file")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[name]
            raise
        fresh.add(path.as_posix())
        return loaded
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # a console script's sys.path lacks the working directory; `python -m` has it
    if module in sys.modules and module not in fresh:
        loaded = importlib.reload(sys.modules[module])
    else:
        loaded = importlib.import_module(module)
    fresh.add(module)
    return loaded


def load_target(target: str) -> Callable[..., Any]:
    """The callable ``target`` names (``package.module:function``, ``path/to/file.py:function``, or an attribute
    path such as ``module:obj.method``), its module imported (or re-imported) now.

    Raises:
        ConfigError: the target is malformed, its module fails to import (the module's own error chained), it has
            no such attribute, or the attribute is not callable.
    """
    return _load(target, set())


def _load(target: str, fresh: set[str]) -> Callable[..., Any]:
    try:
        module_name, attr = _split(target)
        value: Any = _import(module_name, fresh)
        for part in attr.split("."):
            value = getattr(value, part)
    except Exception as exc:  # whatever the user's module raises on import: reported, chained
        raise ConfigError(f"cannot load {target}: {type(exc).__name__}: {exc}") from exc
    if not callable(value):
        raise ConfigError(f"cannot load {target}: it is a {type(value).__name__}, not a function")
    return value  # type: ignore[no-any-return]


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


# --- running ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _no_proxy() -> str:
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    hosts = [h for h in current.split(",") if h.strip()]
    for host in ("127.0.0.1", "localhost", "::1"):
        if host not in hosts:
            hosts.append(host)
    return ",".join(hosts)


async def _call(
    fn: Callable[..., Any], is_async: bool, arg: tuple[Any, ...], threads: anyio.CapacityLimiter | None
) -> None:
    if is_async:
        await fn(*arg)
        return
    result = await anyio.to_thread.run_sync(lambda: fn(*arg), limiter=threads, abandon_on_cancel=True)
    if inspect.isawaitable(result):  # a plain function that returned a coroutine
        await result


async def _drive(
    fn: Callable[..., Any], options: LoadtestOptions, on_call: Callable[[bool], None]
) -> tuple[list[float], dict[str, int], float]:
    """Run the users: each call's latency (served calls), failures by exception type, and the wall time."""
    is_async = _is_async(fn)
    threads = None if is_async else anyio.CapacityLimiter(options.users)  # a thread per user, as a web server has
    calls_each = options.calls_each
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    stop_at = None if options.duration is None else started + options.duration

    async def user(index: int) -> None:
        made = 0
        while (calls_each is None or made < calls_each) and (stop_at is None or time.perf_counter() < stop_at):
            made += 1
            t0 = time.perf_counter()
            try:
                with anyio.fail_after(options.call_timeout):
                    await _call(fn, is_async, (index,), threads)
            except Exception as exc:  # the code under test failed: counted by type (cancellation propagates)
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                on_call(False)
                continue
            latencies.append(time.perf_counter() - t0)
            on_call(True)

    async with anyio.create_task_group() as tg:
        for index in range(options.users):
            tg.start_soon(user, index)
    return latencies, errors, time.perf_counter() - started


def _openai_simulator(options: LoadtestOptions) -> Any:
    from ..testing import OpenAISimulator, SimulatorConfig

    if options.faults == "flaky":
        return OpenAISimulator(SimulatorConfig.flaky(rpm=options.rpm, tpm=options.tpm, seed=options.seed))
    return OpenAISimulator(SimulatorConfig(rpm=options.rpm, tpm=options.tpm, seed=options.seed))


def _index_simulator(options: LoadtestOptions) -> Any:
    from ..testing import PineconeSimulator, PineconeSimulatorConfig

    config: dict[str, Any] = {
        "dimension": options.dimension,
        "write_rps": options.index_write_rps,
        "seed": options.seed,
    }
    if options.faults == "flaky":
        return PineconeSimulator(PineconeSimulatorConfig.flaky(**config))
    return PineconeSimulator(PineconeSimulatorConfig(**config))


def run_loadtest(
    options: LoadtestOptions,
    *,
    on_start: Callable[[str], None] | None = None,
    on_call: Callable[[str, bool], None] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> LoadtestReport:
    """Serve the simulators, import the targets against them and load-test each in turn (synchronous: it runs
    its own event loop, ``options.backend``).

    Args:
        options: the run.
        on_start: called with a target's name when its users start.
        on_call: called with the target and whether the call was served, as each call finishes.
        on_stage: called with the target and what the run is doing (``"setup"``, ``"users"``, ``"done"``).

    Raises:
        ConfigError: a target or the setup cannot be loaded (see :func:`load_target`).
    """
    from ..testing import serve

    simulator = _openai_simulator(options)
    burst_s = float(simulator.config.burst_seconds)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(simulator, mode="process"))
        index = stack.enter_context(serve(_index_simulator(options), mode="process")) if options.pinecone else None
        env = {
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": API_KEY,
            "NO_PROXY": _no_proxy(),
            "no_proxy": _no_proxy(),
        }
        if index is not None:
            env.update(dict.fromkeys(PINECONE_HOST_VARIABLES, index.url))
            env["PINECONE_API_KEY"] = PINECONE_API_KEY
        stack.enter_context(_environment(env))
        fresh: set[str] = set()
        functions = [_load(target, fresh) for target in options.targets]
        setup = _load(options.setup, fresh) if options.setup is not None else None

        async def run_all() -> list[TargetResult]:
            import httpx

            results: list[TargetResult] = []
            async with contextlib.AsyncExitStack() as clients:
                control = await clients.enter_async_context(httpx.AsyncClient(base_url=server.url, timeout=30))
                index_control = None
                if index is not None:
                    index_control = await clients.enter_async_context(httpx.AsyncClient(base_url=index.url, timeout=30))
                for target, fn in zip(options.targets, functions, strict=True):
                    (await control.post("/_sim/reset")).raise_for_status()
                    if index_control is not None:
                        (await index_control.post("/_sim/reset")).raise_for_status()
                    if setup is not None:
                        if on_stage is not None:
                            on_stage(target, "setup")
                        await _call(setup, _is_async(setup), (), None)
                        # the users are measured on a fresh quota; the index keeps what the setup stored
                        (await control.post("/_sim/reset")).raise_for_status()
                        if index_control is not None:
                            (await index_control.post("/_sim/reset", params={"keep_data": "1"})).raise_for_status()
                    if on_start is not None:
                        on_start(target)
                    if on_stage is not None:
                        on_stage(target, "users")

                    def done(ok: bool, target: str = target) -> None:
                        if on_call is not None:
                            on_call(target, ok)

                    latencies, errors, wall = await _drive(fn, options, done)
                    if on_stage is not None:
                        on_stage(target, "done")
                    upstream, too_many, tokens, requests_by_model, tokens_by_model = simulator_figures(
                        (await control.get("/_sim/stats")).json()
                    )
                    index_requests = index_429 = 0
                    if index_control is not None:
                        index_stats = (await index_control.get("/_sim/stats")).json()
                        statuses = index_stats.get("responses_by_status", {})
                        index_requests = int(index_stats.get("requests_total", 0))
                        index_429 = int(statuses.get("429", statuses.get(429, 0)))
                    served = len(latencies)
                    failed = sum(errors.values())
                    results.append(
                        TargetResult(
                            target=target,
                            users=options.users,
                            calls=served + failed,
                            succeeded=served,
                            failed=failed,
                            errors=dict(sorted(errors.items())),
                            p50_s=round(percentile(latencies, 0.50), 4),
                            p95_s=round(percentile(latencies, 0.95), 4),
                            p99_s=round(percentile(latencies, 0.99), 4),
                            wall_s=round(wall, 4),
                            calls_per_s=round(served / wall, 2) if wall > 0 else 0.0,
                            upstream_requests=upstream,
                            upstream_429=too_many,
                            tokens=tokens,
                            theoretical_min_s=round(
                                theoretical_min_s(
                                    requests_by_model, tokens_by_model, options.rpm, options.tpm, burst_s
                                ),
                                4,
                            ),
                            index_requests=index_requests,
                            index_429=index_429,
                        )
                    )
            return results

        results = anyio.run(run_all, backend=options.backend)
    return LoadtestReport(
        rpm=options.rpm,
        tpm=options.tpm,
        faults=options.faults,
        seed=options.seed,
        users=options.users,
        calls_per_user=options.calls_each,
        duration=options.duration,
        pinecone=options.pinecone,
        targets=results,
    )


# --- the command -----------------------------------------------------------------------------------------------


def render_table(report: LoadtestReport) -> Any:
    """The results as a ``rich`` table, one row per target (index columns only with ``--pinecone``)."""
    from rich.table import Table

    calls = (
        f"{report.calls_per_user} call{'s' if report.calls_per_user != 1 else ''} each"
        if report.calls_per_user is not None
        else "calling"
    ) + (f" for up to {report.duration:g} s" if report.duration is not None else "")
    table = Table(
        title=(
            f"ragguard loadtest: {report.users} users, {calls}; quota {report.rpm:,.0f} RPM / {report.tpm:,.0f} TPM "
            f"per model, faults: {report.faults}" + (", with a Pinecone index" if report.pinecone else "")
        ),
        caption=(
            "p50 … p99 = latency of served calls; upstream / 429s / tokens = what the OpenAI simulator received, "
            "answered 429 and charged; min s = least wall time the quota allows for what it admitted"
            + ("; index reqs = Pinecone simulator requests (429s)" if report.pinecone else "")
        ),
    )
    headers = ["target", "calls", "served", "failed", "p50 s", "p95 s", "p99 s", "wall s", "calls/s"]
    headers += ["upstream", "429s", "tokens", "min s"]
    if report.pinecone:
        headers.append("index reqs (429s)")
    for header in headers:
        table.add_column(header, justify="left" if header == "target" else "right", no_wrap=header != "target")
    for t in report.targets:
        row = [
            t.target,
            str(t.calls),
            f"{t.succeeded} ({t.succeeded / max(1, t.calls):.0%})",
            str(t.failed),
            f"{t.p50_s:.2f}",
            f"{t.p95_s:.2f}",
            f"{t.p99_s:.2f}",
            f"{t.wall_s:.2f}",
            f"{t.calls_per_s:.1f}",
            str(t.upstream_requests),
            f"{t.upstream_429} ({t.upstream_429 / max(1, t.upstream_requests):.0%})",
            f"{t.tokens:,}",
            f"{t.theoretical_min_s:.2f}",
        ]
        if report.pinecone:
            row.append(f"{t.index_requests} ({t.index_429})")
        table.add_row(*row)
    return table


def run_loadtest_cli(options: LoadtestOptions, *, json_path: str | None = None, progress: bool = True) -> int:
    """Run the load test with live progress bars, print the table and write JSON when asked. Returns 0, or 2 when
    the simulators' packages are missing or a target cannot be loaded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = report_console()
    missing = missing_modules("starlette", "uvicorn")
    if missing:
        console.print(
            f"ragguard loadtest serves the simulators with starlette and uvicorn (missing: {', '.join(missing)}): "
            "pip install 'ragguard[testing]'",
            style="red",
            markup=False,
        )
        return 2
    total = None if options.calls_each is None else options.users * options.calls_each
    bars = Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[stage]:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("served {task.fields[ok]} · failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    tasks = {t: bars.add_task(t, total=total, ok=0, failed=0, stage="", start=False) for t in options.targets}
    counts = {t: [0, 0] for t in options.targets}

    def on_start(target: str) -> None:
        bars.start_task(tasks[target])

    def on_stage(target: str, stage: str) -> None:
        bars.update(tasks[target], stage=stage)

    def on_call(target: str, ok: bool) -> None:
        counts[target][0 if ok else 1] += 1
        bars.update(tasks[target], advance=1, ok=counts[target][0], failed=counts[target][1])

    console.print(
        f"[bold]ragguard loadtest[/bold]: {options.users} users, quota {options.rpm:,.0f} RPM / "
        f"{options.tpm:,.0f} TPM per model"
        + (", Pinecone index" if options.pinecone else "")
        + f", faults: {options.faults}"
    )
    try:
        with bars:
            report = run_loadtest(options, on_start=on_start, on_call=on_call, on_stage=on_stage)
    except ConfigError as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    console.print(render_table(report))
    for t in report.targets:
        if t.errors:
            console.print(
                f"  {t.target} failures: " + ", ".join(f"{k} × {v}" for k, v in t.errors.items()), markup=False
            )
    if json_path:
        write_json(json_path, report.model_dump())
        console.print(f"figures written to {json_path}", markup=False)
    return 0


def add_loadtest_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``loadtest`` sub-command to ``commands`` (what ``ArgumentParser.add_subparsers`` returned)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "loadtest",
        help="load-test your own function against rate-limited OpenAI (and Pinecone) simulators",
        description=(
            "Start an OpenAI-compatible simulator (and with --pinecone a Pinecone-compatible index) on loopback, "
            "point OPENAI_BASE_URL / OPENAI_API_KEY (and PINECONE_HOST / PINECONE_API_KEY) at it, import "
            "each TARGET and call it as fn(user) from --users concurrent users (async functions on the event loop, "
            "plain functions in threads); print served/failed, errors by type, latency percentiles and what the "
            "simulators saw."
        ),
    )
    parser.add_argument(
        "targets", nargs="+", metavar="TARGET", help="package.module:function or path/to/file.py:function"
    )
    parser.add_argument("--users", type=int, default=100, help="concurrent users (default: 100)")
    parser.add_argument(
        "--calls-per-user",
        type=int,
        help="calls each user makes one after another (default: 1; with --duration: no limit)",
    )
    parser.add_argument("--duration", type=float, help="seconds during which users keep calling")
    parser.add_argument(
        "--rpm", type=float, default=5_000, help="provider quota, requests per minute per model (default: 5000)"
    )
    parser.add_argument(
        "--tpm", type=float, default=4_000_000, help="provider quota, tokens per minute per model (default: 4000000)"
    )
    parser.add_argument(
        "--faults",
        choices=["none", "flaky"],
        default="none",
        help="provider faults: none or flaky (5xx, drops, stalls)",
    )
    parser.add_argument(
        "--pinecone", action="store_true", help="also serve a Pinecone-compatible index (its URL in PINECONE_HOST)"
    )
    parser.add_argument("--dimension", type=int, default=1536, help="--pinecone: the index's dimension (default: 1536)")
    parser.add_argument(
        "--index-write-rps",
        type=float,
        default=10.0,
        help="--pinecone: the index's write limit per second (default: 10)",
    )
    parser.add_argument(
        "--setup", metavar="TARGET", help="a function run before each target's users, not measured (e.g. ingestion)"
    )
    parser.add_argument(
        "--call-timeout", type=float, default=300.0, help="seconds before a call fails with TimeoutError (default: 300)"
    )
    parser.add_argument(
        "--backend", choices=["asyncio", "trio"], default="asyncio", help="event loop (default: asyncio)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed for the simulators' faults and latencies")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bars (plain output)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """``ragguard loadtest`` with parsed arguments; invalid values are reported (exit status 2), naming the field."""
    try:
        options = LoadtestOptions(
            targets=tuple(args.targets),
            users=args.users,
            calls_per_user=args.calls_per_user,
            duration=args.duration,
            rpm=args.rpm,
            tpm=args.tpm,
            faults=args.faults,
            pinecone=args.pinecone,
            dimension=args.dimension,
            index_write_rps=args.index_write_rps,
            call_timeout=args.call_timeout,
            setup=args.setup,
            seed=args.seed,
            backend=args.backend,
        )
    except ValidationError as exc:
        print(f"ragguard loadtest: {exc}", file=sys.stderr)
        return 2
    return run_loadtest_cli(options, json_path=args.json, progress=not args.no_progress)
