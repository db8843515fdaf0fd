"""The chaos suite's harness: a concurrent, mixed load through a guarded ``AsyncOpenAI`` (the real ``openai`` SDK,
real HTTP) against the OpenAI simulator, and the invariants every run must keep, written once here.

Invariants (docs/reliability.md lists which test proves each):

1. **Typed, in time.** Every call ends with its answer or a typed error within ``Policy.timeout.total`` plus
   :data:`TOLERANCE_S`. Typed means a :class:`ragguard.RagGuardError`, or the SDK's own typed error
   (``openai.APIStatusError``) for a provider answer that retrying cannot fix (a 4xx, ``insufficient_quota``):
   ragguard passes those through unchanged, by design. Anything else (a ``JSONDecodeError``, an
   ``AttributeError``, an ``httpx`` error) escaping to the caller is a violation.
2. **Exactly once, and the caller's own.** Every call issued is accounted exactly once; every answer is the one
   the simulator gives for that caller's own input (its content is deterministic), so nothing is lost, answered
   twice or crossed between callers; a stream either delivered its whole text and a finish reason or raised
   :class:`ragguard.StreamInterrupted`.
3. **Tasks back to baseline** (asyncio: ``asyncio.all_tasks()``; trio: the tasks under the root task).
4. **Connections back to baseline**: the SDK's connection pool holds no request and no busy connection, and no
   more idle ones than its keep-alive cap; the simulator is answering no request (its ``in_flight`` gauge).
5. **Memory bounded**: the cache store within ``max_entries``/``max_bytes``; no single-flight key in flight; every
   bulkhead with nothing in flight or queued; no rate-limiter sleeper; no half-open probe lease held; the
   micro-batcher with no open batch, no send slot taken and no slot waiter.
6. **Breakers close again** once the fault ends (a few calls after it, within the open interval plus a margin).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai
from openai import AsyncOpenAI

import ragguard
from ragguard.guards.batch import MicroBatcher
from ragguard.guards.breaker import CircuitBreaker
from ragguard.guards.bulkhead import ConcurrencyLimit
from ragguard.guards.cache import MemoryCacheStore
from ragguard.guards.coalesce import Coalescer
from ragguard.guards.limiter import RateLimiter
from ragguard.providers.openai import OpenAIGuard, classify_openai
from ragguard.testing import Served, SimulatorStats
from ragguard.testing._content import embedding_vector
from ragguard.testing.openai_simulator import _replies

KEY = "sk-test-chaos-0123456789abcdef"
EMBED_MODEL = "text-embedding-3-small"
CHAT_MODEL = "gpt-4o-mini"
MAX_TOKENS = 24
#: how far past ``Policy.timeout.total`` a call may end: event-loop lag on a loaded 2-core machine, the time to
#: close a cancelled connection, a stream's tail after its first chunk (outside the deadline, by design)
TOLERANCE_S = 1.0
#: the simulator settings every scenario starts from (everything a scenario may change, back to calm)
CALM: dict[str, Any] = {
    "rpm": None,
    "tpm": None,
    "burst_seconds": 1.0,
    "base_latency_s": 0.01,
    "per_token_latency_s": 0.0002,
    "per_input_token_latency_s": 0.0,
    "jitter": 0.2,
    "error_rate": 0.0,
    "drop_rate": 0.0,
    "stall_rate": 0.0,
    "stall_s": 30.0,
    "stream_break_rate": 0.0,
    "stream_break_style": "disconnect",
    "slow_rate": 0.0,
    "slow_s": 0.3,
    "malformed_rate": 0.0,
    "wrong_content_type_rate": 0.0,
    "outage_s": 0.0,
}
#: what every fault count, 429 and outage answer of the simulator adds up to
FAULT_NAMES = ("drop", "error_500", "error_503", "stall", "stream_break", "slow", "malformed", "wrong_content_type")

# --- the simulator, in this process or a child one ------------------------------------------------------------


def sim_configure(served: Served[Any], **fields: Any) -> None:
    """Change the simulator's settings while it runs (``POST /_sim/config`` in process mode)."""
    if served.mode == "thread":
        served.app.configure(**fields)
        return
    _post(served, "/_sim/config", json.dumps(fields).encode())


def sim_outage(served: Served[Any], seconds: float) -> None:
    """Answer every request 500 for ``seconds`` from now (0: end the outage under way)."""
    if served.mode == "thread":
        served.app.start_outage(seconds)
        return
    _post(served, f"/_sim/outage?seconds={seconds}", b"")


def sim_stats(served: Served[Any]) -> SimulatorStats:
    stats: SimulatorStats = served.stats()
    return stats


def _post(served: Served[Any], path: str, body: bytes) -> None:
    # served.url is the loopback address of the simulator this suite started
    request = urllib.request.Request(served.url + path, method="POST", data=body)
    request.add_header("content-type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10.0) as response:
        response.read()


async def asim(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking simulator control call without blocking the event loop."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


# --- calls and their expected answers -------------------------------------------------------------------------


_EXPECTED_VECTORS: dict[str, list[float]] = {}
_EXPECTED_TEXTS: dict[str, str] = {}


def expected_vector(text: str) -> list[float]:
    vector = _EXPECTED_VECTORS.get(text)
    if vector is None:
        vector = _EXPECTED_VECTORS[text] = embedding_vector(EMBED_MODEL, text, 1536)
    return vector


def expected_text(prompt: str) -> str:
    text = _EXPECTED_TEXTS.get(prompt)
    if text is None:
        text = _EXPECTED_TEXTS[prompt] = _replies(prompt, 1, MAX_TOKENS)[0][0]
    return text


@dataclass(slots=True)
class Call:
    """One planned call: its index (its identity in the ledger), kind and inputs."""

    index: int
    kind: str  # "embed", "chat" or "stream"
    texts: tuple[str, ...]


@dataclass(slots=True)
class Record:
    """How one call ended."""

    index: int
    kind: str
    seconds: float
    error: Exception | None = None
    #: what was wrong with an answer that came back (``None``: it was the caller's own, complete)
    problem: str | None = None
    chunks: int = 0
    #: the caller gave up (a cancel scope or ``task.cancel()``) before the call ended
    cancelled: bool = False

    @property
    def outcome(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.problem is not None:
            return "wrong"
        return "ok" if self.error is None else type(self.error).__name__


def plan_call(index: int, seed: int, mix: Sequence[str], pool: int, label: str) -> Call:
    """The ``index``-th call of a load: its kind cycles through ``mix``; its inputs are drawn (seeded) from a pool
    of ``pool`` texts, so some calls repeat others' inputs (cache hits, shared single-flight calls)."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = mix[index % len(mix)]
    first = f"{label} question {rng.randrange(pool)}"
    if kind == "embed" and index % 5 == 0:  # a two-input request: partly cached, partly sent
        return Call(index, kind, (first, f"{label} question {rng.randrange(pool)}"))
    return Call(index, kind, (first,))


async def make_call(client: Any, call: Call, record: Record | None = None) -> Record:
    """Make one call and fill in its record (``record``, or a new one); never raises an ``Exception`` (it is
    recorded), lets cancellation through (the record then says how far the call got)."""
    started = time.monotonic()
    if record is None:
        record = Record(call.index, call.kind, 0.0)
    try:
        if call.kind == "embed":
            inputs: Any = call.texts[0] if len(call.texts) == 1 else list(call.texts)
            reply = await client.embeddings.create(model=EMBED_MODEL, input=inputs)
            got = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
            if len(got) != len(call.texts):
                record.problem = f"{len(got)} vectors for {len(call.texts)} inputs"
            elif any(_differs(vector, expected_vector(text)) for vector, text in zip(got, call.texts, strict=True)):
                record.problem = "a vector that is not its input's"
        else:
            prompt = call.texts[0]
            messages = [{"role": "user", "content": prompt}]
            if call.kind == "chat":
                chat = await client.chat.completions.create(
                    model=CHAT_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
                )
                if chat.choices[0].message.content != expected_text(prompt):
                    record.problem = "an answer to another prompt"
            else:
                stream = await client.chat.completions.create(
                    model=CHAT_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
                )
                parts: list[str] = []
                finish = None
                async for chunk in stream:
                    record.chunks += 1
                    for choice in chunk.choices:
                        parts.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
                text = "".join(parts)
                if finish is None or text != expected_text(prompt):
                    record.problem = f"a stream that ended silently short ({record.chunks} chunks, finish={finish})"
    except Exception as exc:
        record.error = exc
    record.seconds = time.monotonic() - started
    return record


def _differs(got: Any, want: list[float]) -> bool:
    return (
        not isinstance(got, list)
        or len(got) != len(want)
        or any(abs(a - b) > 1e-6 for a, b in zip(got, want, strict=True))
    )


def typed(exc: BaseException) -> bool:
    """Invariant 1's notion of a typed error (see the module docstring)."""
    if isinstance(exc, ragguard.RagGuardError):
        return True
    return isinstance(exc, openai.APIStatusError) and not classify_openai(exc).retryable


# --- the load ---------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every call's record, by index: a second record for one index, or a missing one, is a violation."""

    #: the first index of this ledger's calls
    start: int = 0
    issued: int = 0
    records: dict[int, Record] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)

    def add(self, record: Record) -> None:
        if record.index in self.records:
            self.duplicates.append(record.index)
        else:
            self.records[record.index] = record

    def outcomes(self) -> Counter[str]:
        return Counter(record.outcome for record in self.records.values())


async def run_load(
    client: Any,
    ledger: Ledger,
    *,
    calls: int,
    concurrency: int,
    seed: int,
    mix: Sequence[str],
    label: str,
    duration: float | None = None,
    rate: float | None = None,
) -> None:
    """``concurrency`` workers make calls until ``calls`` were issued (with ``duration``: until that many seconds
    passed, ``calls`` being a cap). With ``rate``, call ``i`` starts no earlier than ``i / rate`` seconds after the
    load's start (an offered load: calls failed fast by an open breaker do not turn into a busy loop)."""
    pool = max(8, calls // 4) if duration is None else 400
    start = time.monotonic()
    stop_at = math.inf if duration is None else start + duration

    async def worker() -> None:
        while ledger.issued < calls and time.monotonic() < stop_at:
            index = ledger.issued
            ledger.issued += 1
            call = plan_call(index, seed, mix, pool, label)
            if rate is not None:
                await anyio.sleep(max(0.0, start + (index - ledger.start) / rate - time.monotonic()))
            ledger.add(await make_call(client, call))

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


# --- invariants ------------------------------------------------------------------------------------------------


def call_problems(ledger: Ledger, deadline: float) -> list[str]:
    """Invariants 1 and 2 over a ledger."""
    problems: list[str] = []
    missing = sorted(set(range(ledger.start, ledger.issued)) - set(ledger.records))
    if missing:
        problems.append(f"{len(missing)} calls never ended: {missing[:10]}")
    if ledger.duplicates:
        problems.append(f"calls answered twice: {ledger.duplicates[:10]}")
    for record in ledger.records.values():
        if record.problem is not None:
            problems.append(f"call {record.index} ({record.kind}) got {record.problem}")
        elif record.error is not None and not typed(record.error):
            problems.append(
                f"call {record.index} ({record.kind}) raised an untyped {type(record.error).__module__}."
                f"{type(record.error).__qualname__}: {record.error!r}"[:300]
            )
        if record.seconds > deadline + TOLERANCE_S:
            problems.append(f"call {record.index} ({record.kind}) took {record.seconds:.2f} s > {deadline} s deadline")
    return problems[:20]


def count_tasks() -> int | None:
    """Live tasks of the running event loop (trio: every task under the root task)."""
    if "trio" in sys.modules:
        trio: Any = sys.modules["trio"]
        try:
            root = trio.lowlevel.current_root_task()
        except RuntimeError:
            root = None
        if root is not None:
            count, todo = 0, [root]
            while todo:
                task = todo.pop()
                count += 1
                for nursery in task.child_nurseries:
                    todo.extend(nursery.child_tasks)
            return count
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None


def pool_problems(client: Any) -> list[str]:
    """Invariant 4, client side: the SDK's connection pool holds no request and no busy connection."""
    pool: Any = client._client._transport._pool
    problems = []
    if pool._requests:
        problems.append(f"{len(pool._requests)} requests still queued or active in the connection pool")
    busy = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
    if busy:
        problems.append(f"{len(busy)} connections still busy: {busy[:3]}")
    if len(pool.connections) > pool._max_keepalive_connections:
        problems.append(f"{len(pool.connections)} connections kept, more than the keep-alive cap")
    return problems


def state_problems(core: OpenAIGuard) -> list[str]:
    """Invariant 5: every bounded structure of a guarded client's core within its bound, nothing held."""
    problems: list[str] = []
    policy = core.policy
    if core.coalescer.in_flight:
        problems.append(f"{core.coalescer.in_flight} single-flight keys still in flight")
    store = core.store
    if isinstance(store, MemoryCacheStore) and (
        len(store) > policy.cache.max_entries or store.bytes > policy.cache.max_bytes
    ):
        problems.append(f"cache store over its bounds: {store!r}")
    if core.batcher is not None:
        problems += batcher_problems(core.batcher)
    if len(core._pipelines) > 3:  # one per (endpoint, model) the load uses
        problems.append(f"{len(core._pipelines)} pipelines for 2 models")
    for pipeline in core._pipelines.values():
        problems += guard_problems(pipeline.guards)
    return problems


def guard_problems(guards: Iterable[Any]) -> list[str]:
    """Nothing held by a pipeline's guards once every caller is gone."""
    problems: list[str] = []
    for guard in guards:
        if isinstance(guard, ConcurrencyLimit) and (guard.in_flight or guard.queued):
            problems.append(f"bulkhead {guard.name}: in_flight={guard.in_flight}, queued={guard.queued}")
        elif isinstance(guard, RateLimiter) and guard._sleepers:
            problems.append(f"rate limiter {guard.name}: {len(guard._sleepers)} waiters left")
        elif isinstance(guard, CircuitBreaker) and guard._leases:
            problems.append(f"breaker {guard.name}: {len(guard._leases)} probe leases held ({guard.snapshot()!r})")
        elif isinstance(guard, Coalescer) and guard.in_flight:
            problems.append(f"coalescer: {guard.in_flight} keys in flight")
    return problems


def batcher_problems(batcher: MicroBatcher[Any, Any]) -> list[str]:
    if batcher.open_batches or batcher.in_flight or batcher._slot_waiters:
        return [
            f"micro-batcher: {batcher.open_batches} open batches, {batcher.in_flight} send slots taken, "
            f"{len(batcher._slot_waiters)} slot waiters"
        ]
    return []


async def settle(check: Callable[[], Awaitable[list[str]]], within: float = 5.0) -> list[str]:
    """``check()`` until it finds nothing wrong, or its last findings after ``within`` seconds (cancelled
    connections, detached single-flight tasks and the simulator's handlers take a moment to wind down)."""
    end = time.monotonic() + within
    while True:
        found = await check()
        if not found or time.monotonic() > end:
            return found
        await anyio.sleep(0.05)


async def breakers_close(
    client: Any, backend: ragguard.MemoryBackend, *, within: float, label: str, ledger: Ledger
) -> list[str]:
    """Invariant 6: calls after the fault until every breaker of ``backend`` is closed (each call recorded in
    ``ledger``), or what is still not closed after ``within`` seconds."""
    end = time.monotonic() + within
    index = 0
    while True:
        report = await ragguard.ahealth(backends=[backend])
        still = [f"{b.name}: {b.state}" for b in report.breakers if b.state != "closed"]
        if not still:
            return []
        if time.monotonic() > end:
            return [f"breakers not closed {within:.1f} s after the fault: {still}"]
        for kind in ("embed", "chat", "stream"):
            call = Call(ledger.issued, kind, (f"{label} recovery {index}",))
            ledger.issued += 1
            index += 1
            ledger.add(await make_call(client, call))
        await anyio.sleep(0.05)


# --- a guarded client ---------------------------------------------------------------------------------------------


def guarded_client(served: Served[Any], policy: ragguard.Policy, backend: ragguard.MemoryBackend) -> Any:
    return ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=KEY), policy, backend=backend)


def core_of(client: Any) -> OpenAIGuard:
    core: OpenAIGuard = client.ragguard
    return core


# --- the suite's figures ------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """One run's figures, printed at the end of the session (tests/chaos/conftest.py)."""

    name: str
    calls: int
    outcomes: dict[str, int]
    faults: dict[str, int]
    rate_limited: int
    seconds: float
    leaks: int
    max_call_s: float

    def line(self) -> str:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items()) if v)
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: -kv[1]))
        return (
            f"{self.name}: {self.calls} calls in {self.seconds:.1f} s (slowest {self.max_call_s:.2f} s); "
            f"outcomes {outcomes}; injected {faults or '-'}; 429s {self.rate_limited}; leaks {self.leaks}"
        )


SUMMARIES: list[Summary] = []


def summarize(name: str, ledger: Ledger, stats: SimulatorStats | None, seconds: float, leaks: int) -> Summary:
    faults = dict(stats.faults) if stats is not None else {}
    summary = Summary(
        name=name,
        calls=ledger.issued,
        outcomes=dict(ledger.outcomes()),
        faults=faults,
        rate_limited=stats.rate_limited_total if stats is not None else 0,
        seconds=seconds,
        leaks=leaks,
        max_call_s=max((r.seconds for r in ledger.records.values()), default=0.0),
    )
    SUMMARIES.append(summary)
    return summary
