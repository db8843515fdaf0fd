"""``ragguard demo``: the Monday-morning scenario, naive vs sdk-default vs guarded, on real HTTP.

A RAG app that worked on Friday meets N users at once. First its knowledge base is ingested (each chunk embedded
and upserted into a Pinecone-compatible index with a write limit); then each user embeds a question, queries the
index for the top chunks and asks a chat completion (``temperature=0``, as support bots do) with them as context,
through the real ``openai`` and ``pinecone`` SDKs, against :class:`ragguard.testing.OpenAISimulator` and
:class:`ragguard.testing.PineconeSimulator` served on loopback in child processes (so the load and the providers
use different cores), enforcing an OpenAI-style quota (requests and tokens per minute, per model, with a
one-second burst). 30 % of the users ask a popular question word for word (``repeat_share``), as FAQ traffic does.
``rag=False`` (``--no-rag``) leaves out the index: each user embeds and asks with a fixed context.

With ``faults="flaky"`` the guarded mode also degrades instead of failing (``Policy.degrade``, see
``docs/degradation.md``): a query that would wait for the index's bulkhead behind more than
:data:`DEGRADE_QUEUE` others retrieves :data:`DEGRADED_TOP_K` chunks instead of :data:`TOP_K`, and while the chat
breaker is open users get the retrieved chunks (passed with ``ragguard.call_options(context=...)``) instead of a
generated answer. ``ModeResult.degraded`` counts the users whose answer was degraded either way.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._call_options import call_options
from .._tokens import estimate_chat_tokens, estimate_text_tokens
from ..backends.memory import MemoryBackend
from ..config import (
    BreakerPolicy,
    ConcurrencyPolicy,
    DegradePolicy,
    Policy,
    RateLimitPolicy,
    RetryPolicy,
    TimeoutPolicy,
)
from ..degrade import last_degradation
from ._report import percentile as _percentile
from ._report import simulator_figures as _figures
from ._report import theoretical_min_s

__all__ = ["MODES", "DemoOptions", "DemoReport", "ModeResult", "WorkerResult", "run_demo", "run_demo_cli"]

MODES = ("naive", "sdk-default", "guarded")
EMBED_MODEL = "text-embedding-3-small"
CHAT_MODEL = "gpt-4o-mini"
MAX_TOKENS = 64
#: embedding size requested (``dimensions``) and the vector index's dimension
DIMENSIONS = 16
#: chunks retrieved per question
TOP_K = 3
#: ``--faults flaky``: chunks a degraded query retrieves, and the index queue depth beyond which it is degraded
DEGRADED_TOP_K = 2
DEGRADE_QUEUE = 50
#: texts per embeddings request when the guarded mode ingests
INGEST_BATCH = 256
NAMESPACE = "help-centre"
API_KEY = "sk-ragguard-demo-not-a-real-key"

_QUESTIONS = (
    "How do I reset my password if I no longer have access to my email?",
    "What is the refund policy for annual plans cancelled in the first month?",
    "Can I export my project history to CSV and keep the attachments?",
    "Why does the dashboard show yesterday's numbers until noon?",
    "How many seats does the team plan include and can I add more later?",
)
_CONTEXT = (
    "Passwords can be reset from the sign-in page; without email access, contact support with a recent invoice. "
    "Annual plans cancelled within 30 days are refunded in full; later cancellations are prorated monthly. "
    "Exports include history as CSV and attachments as a ZIP archive linked from the export email. "
    "Dashboards aggregate overnight and refresh at 12:00 UTC; live counters are on the activity tab. "
    "The team plan includes ten seats; more seats can be added at any time from the billing page."
)
_SYSTEM = "You are a helpful support assistant. Answer only from the context. Be brief."
#: how the popular questions are worded by different users (the same text, asked again and again)
_ASIDES = ("", " Thanks!", " Asking for my team.", " This is urgent.", " Sorry if this was asked before.")


class DemoOptions(BaseModel):
    """The scenario's knobs (validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(default=1000, ge=1, le=100_000)
    #: provider quota per model, requests per minute (with ``tpm``, about OpenAI's usage tier 3 for gpt-4o-mini)
    rpm: float = Field(default=5_000, gt=0)
    #: provider quota per model, tokens per minute
    tpm: float = Field(default=4_000_000, gt=0)
    faults: Literal["none", "flaky"] = "none"
    #: share of users asking one of the popular questions (asked word for word by several users, as FAQ traffic
    #: is); the others ask a question of their own
    repeat_share: float = Field(default=0.3, ge=0, le=1)
    seed: int = 7
    modes: tuple[str, ...] = MODES
    #: the full RAG round trip: ingest a corpus into a Pinecone-compatible index first, and each user retrieves
    #: context from it between the embedding and the chat call (``False``: a fixed context, no index)
    rag: bool = True
    #: chunks of the knowledge base ingested (embedded and upserted into the vector index) before users arrive
    corpus: int = Field(default=200, ge=1, le=100_000)
    #: the vector index's write limit, upsert requests per second (as a serverless index enforces)
    index_write_rps: float = Field(default=10.0, gt=0)
    #: OS processes the users are split between (each with its own guarded client)
    workers: int = Field(default=1, ge=1, le=64)
    #: a Redis URL the workers' guarded clients share their limits, breakers and caches through
    #: (``None``: each process keeps its own, in memory)
    redis: str | None = None

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, modes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ValueError(f"modes must be a non-empty subset of {', '.join(MODES)}; got {', '.join(unknown)}")
        return modes


class WorkerResult(BaseModel):
    """One worker process's share of a mode (``--workers``)."""

    worker: int
    users: int
    succeeded: int
    failed: int
    p50_s: float
    p95_s: float
    p99_s: float
    wall_s: float
    errors: dict[str, int] = Field(default_factory=dict)


class ModeResult(BaseModel):
    """The figures of one mode (the JSON keys of ``--json``; later versions add keys, never rename these)."""

    mode: str
    users: int
    succeeded: int
    failed: int
    upstream_requests: int
    upstream_429: int
    tokens: int
    p50_s: float
    p95_s: float
    p99_s: float
    wall_s: float
    theoretical_min_s: float
    goodput: float = Field(description="users served / the users the quota admits in the wall time (burst + refill)")
    errors: dict[str, int] = Field(default_factory=dict, description="failed users by error type")
    ingest_s: float = Field(default=0.0, description="seconds to embed and upsert the corpus")
    vectors_stored: int = Field(default=0, description="vectors in the index after ingestion")
    vector_requests: int = Field(default=0, description="requests the vector store received (ingestion + queries)")
    vector_429: int = Field(default=0, description="of which answered 429")
    workers: list[WorkerResult] = Field(default_factory=list, description="per worker process (--workers > 1)")
    degraded: int = Field(
        default=0, description="users served a degraded answer (fewer chunks retrieved, or no generation)"
    )


class DemoReport(BaseModel):
    """Everything ``ragguard demo`` measured."""

    rpm: float
    tpm: float
    faults: str
    seed: int
    modes: list[ModeResult]
    workers: int = 1
    redis: bool = False
    corpus: int = 0
    rag: bool = False


def _question(user: int, repeat_share: float = 0.3) -> str:
    """User ``user``'s question: one of the popular ones (``repeat_share`` of users, spread evenly) or their own."""
    popular = len(_QUESTIONS) * len(_ASIDES)
    if math.floor((user + 1) * repeat_share) > math.floor(user * repeat_share):
        pick = user % popular
        return _QUESTIONS[pick % len(_QUESTIONS)] + _ASIDES[pick // len(_QUESTIONS)]
    return f"{_QUESTIONS[user % len(_QUESTIONS)]} (ticket {user})"


_FACTS = tuple(sentence.strip() + "." for sentence in _CONTEXT.split(". ") if sentence.strip(". "))


def _chunk(i: int) -> str:
    """Chunk ``i`` of the knowledge base: one of the context's facts, as a page of the help centre says it."""
    return f"Help centre page {i}: {_FACTS[i % len(_FACTS)].rstrip('.')}."


def _messages(question: str, context: str = _CONTEXT) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
    ]


def guarded_policy(options: DemoOptions) -> Policy:
    """The guarded mode's policy: the provider's published quota, and timeouts that suit the scenario."""
    flaky = options.faults == "flaky"
    return Policy(
        # 0.7 s of burst against the provider's 1 s leaves room for arrival jitter (0.8 s showed ~1 % 429s)
        rate_limit=RateLimitPolicy(rpm=options.rpm, tpm=options.tpm, burst_seconds=0.7),
        retry=RetryPolicy(attempts=8, base=0.2, cap=5.0),
        timeout=TimeoutPolicy(attempt=2.0 if flaky else 30.0, total=110.0),
        # ~330 requests/s at ~30 ms each need ~10-20 in flight; a small bulkhead also keeps the HTTP pool small,
        # whose per-request bookkeeping grows with its connection count (measured: 256 slots cost ~1 s of wall)
        concurrency=ConcurrencyPolicy(max_in_flight=32),
        breaker=BreakerPolicy(failure_threshold=50, failure_rate=0.8, window=200, min_calls=100, open_duration=2.0),
        # flaky: while the chat breaker is open, answer with the retrieved chunks rather than an error
        degrade=DegradePolicy(skip_generation=True) if flaky else DegradePolicy(),
    )


def index_policy(options: DemoOptions, *, writes: bool = False) -> Policy:
    """The guarded mode's policy for the vector index: for the ingestion client, the index's write limit (one
    policy's ``rpm`` limits reads and writes alike, each in its own bucket, so queries use a client without it)."""
    return Policy(
        rate_limit=RateLimitPolicy(rpm=options.index_write_rps * 60 if writes else None, burst_seconds=0.7),
        retry=RetryPolicy(attempts=8, base=0.2, cap=5.0),
        timeout=TimeoutPolicy(attempt=2.0 if options.faults == "flaky" else 30.0, total=110.0),
        # the SDK keeps at most 10 idle connections (pool 20, keep-alive 10): more in flight churns connections
        # (measured: 32 in flight tripled the users' wall time)
        concurrency=ConcurrencyPolicy(max_in_flight=8),
        breaker=BreakerPolicy(failure_threshold=50, failure_rate=0.8, window=200, min_calls=100, open_duration=2.0),
        # flaky: stalled queries hold the index's slots; a query queued behind many others retrieves fewer chunks
        degrade=(
            DegradePolicy(when="overloaded", max_queue=DEGRADE_QUEUE, top_k=DEGRADED_TOP_K)
            if options.faults == "flaky" and not writes
            else DegradePolicy()
        ),
    )


def _user_costs(options: DemoOptions) -> tuple[float, float]:
    """Tokens all users need at the provider if each is sent: embeddings bucket, chat bucket (charged as OpenAI
    does)."""
    questions = [_question(u, options.repeat_share) for u in range(options.users)]
    embed = sum(estimate_text_tokens(q) for q in questions)
    chat = sum(estimate_chat_tokens(_messages(q)) + MAX_TOKENS for q in questions)
    return float(embed), float(chat)


async def _one_user(
    question: str,
    embed: Callable[..., Awaitable[Any]],
    search: Callable[..., Awaitable[Any]] | None,
    chat: Callable[..., Awaitable[Any]],
) -> bool:
    """One user's round trip: embed the question, retrieve the top chunks, answer from them. Returns whether the
    answer was degraded (fewer chunks retrieved, or the chunks instead of a generated answer)."""
    embedded = await embed(model=EMBED_MODEL, input=question, dimensions=DIMENSIONS)
    context = _CONTEXT
    degraded = False
    if search is not None:
        found = await search(vector=embedded.data[0].embedding, top_k=TOP_K, namespace=NAMESPACE, include_metadata=True)
        degraded = last_degradation() is not None
        context = "\n".join(str((match.metadata or {}).get("text", "")) for match in found.matches)
    with call_options(context=context):  # what a degraded chat answers with (unused otherwise)
        await chat(model=CHAT_MODEL, messages=_messages(question, context), max_tokens=MAX_TOKENS, temperature=0)
    return degraded or last_degradation() is not None


def _pinecone(host: str, account: Any = None) -> Any:
    """An asyncio index client for ``host``; ``account`` is a ``pinecone.Pinecone`` to reuse (making one loads the
    SDK's plugins and TLS settings, ~30 ms of CPU: even a first version makes it once, at import)."""
    return (account if account is not None else _account()).IndexAsyncio(host=host)


def _account() -> Any:
    from pinecone import Pinecone

    return Pinecone(api_key=API_KEY)


async def _ingest(mode: str, base_url: str, host: str, options: DemoOptions) -> float:
    """Embed and upsert the corpus as the mode would: naive and sdk-default one chunk per call (a typical first
    version, every chunk at once), guarded in batches; returns the seconds it took. Chunks that fail are lost."""
    from openai import AsyncOpenAI

    from .._guard import guard
    from ..providers.pinecone import stable_id

    chunks = [_chunk(i) for i in range(options.corpus)]
    started = time.perf_counter()
    if mode == "guarded":
        backend = _backend(options)
        client = guard(AsyncOpenAI(base_url=base_url, api_key=API_KEY), guarded_policy(options), backend=backend)
        index = guard(_pinecone(host), index_policy(options, writes=True), backend=backend)
        try:
            vectors: list[dict[str, Any]] = []

            async def embed_batch(batch: list[str]) -> None:
                response = await client.embeddings.create(model=EMBED_MODEL, input=batch, dimensions=DIMENSIONS)
                for text, item in zip(batch, response.data, strict=True):
                    vectors.append(
                        {
                            "id": stable_id(text, namespace=NAMESPACE),
                            "values": item.embedding,
                            "metadata": {"text": text},
                        }
                    )

            async with anyio.create_task_group() as tg:
                for start in range(0, len(chunks), INGEST_BATCH):
                    tg.start_soon(embed_batch, chunks[start : start + INGEST_BATCH])
            await index.upsert(vectors=vectors, namespace=NAMESPACE)
        finally:
            await client.close()
            await index.close()
            if hasattr(backend, "aclose"):
                await backend.aclose()
        return time.perf_counter() - started

    shared_client = AsyncOpenAI(base_url=base_url, api_key=API_KEY) if mode == "sdk-default" else None
    account = _account()
    shared_index = _pinecone(host, account) if mode == "sdk-default" else None

    async def one_chunk(text: str) -> None:
        try:
            if shared_client is not None and shared_index is not None:
                response = await shared_client.embeddings.create(model=EMBED_MODEL, input=text, dimensions=DIMENSIONS)
                vector = {"id": f"chunk-{text}", "values": response.data[0].embedding, "metadata": {"text": text}}
                await shared_index.upsert(vectors=[vector], namespace=NAMESPACE)
                return
            async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                response = await client.embeddings.create(model=EMBED_MODEL, input=text, dimensions=DIMENSIONS)
            index = _pinecone(host, account)  # a new index client (and connection) per chunk
            try:
                vector = {"id": f"chunk-{text}", "values": response.data[0].embedding, "metadata": {"text": text}}
                await index.upsert(vectors=[vector], namespace=NAMESPACE)
            finally:
                await index.close()
        except Exception:  # noqa: S110 - the naive "before" script: losing chunks silently is what it shows
            pass  # the chunk is lost: the first version of an ingestion script rarely notices

    try:
        async with anyio.create_task_group() as tg:
            for text in chunks:
                tg.start_soon(one_chunk, text)
    finally:
        if shared_client is not None:
            await shared_client.close()
        if shared_index is not None:
            await shared_index.close()
    return time.perf_counter() - started


def _backend(options: DemoOptions) -> Any:
    if options.redis is None:
        return MemoryBackend()
    from ..backends.redis import RedisBackend

    return RedisBackend(options.redis, expected_instances=options.workers, timeout=1.0)


async def _run_mode(
    mode: str,
    base_url: str,
    options: DemoOptions,
    on_done: Callable[[bool], None],
    users: Sequence[int] | None = None,
    host: str | None = None,
    degraded: list[int] | None = None,
) -> tuple[list[float], dict[str, int], float]:
    """One mode's users: their latencies, failures by error type and the wall time; ``degraded[0]`` (when
    given) counts the users served a degraded answer."""
    from openai import AsyncOpenAI

    from .._guard import guard

    latencies: list[float] = []
    errors: dict[str, int] = {}
    shared: Any = None
    index: Any = None
    backend: Any = None
    if mode == "sdk-default":
        shared = AsyncOpenAI(base_url=base_url, api_key=API_KEY)
        index = _pinecone(host) if host is not None else None
    elif mode == "guarded":
        backend = _backend(options)
        shared = guard(AsyncOpenAI(base_url=base_url, api_key=API_KEY), guarded_policy(options), backend=backend)
        index = guard(_pinecone(host), index_policy(options), backend=backend) if host is not None else None

    account = _account() if host is not None and mode == "naive" else None

    async def naive_search(**kwargs: Any) -> Any:
        one = _pinecone(host or "", account)  # a new index client (and connection) per request
        try:
            return await one.query(**kwargs)
        finally:
            await one.close()

    async def naive_embed(**kwargs: Any) -> Any:
        async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
            return await client.embeddings.create(**kwargs)

    async def naive_chat(**kwargs: Any) -> Any:
        async with AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
            return await client.chat.completions.create(**kwargs)

    if shared is None:
        embed, chat = naive_embed, naive_chat
    else:
        embed, chat = shared.embeddings.create, shared.chat.completions.create
    search: Callable[..., Awaitable[Any]] | None = None
    if host is not None:
        search = naive_search if index is None else index.query

    started = time.perf_counter()

    async def user_task(user: int) -> None:
        t0 = time.perf_counter()
        try:
            was_degraded = await _one_user(_question(user, options.repeat_share), embed, search, chat)
        except Exception as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            on_done(False)
            return
        latencies.append(time.perf_counter() - t0)
        if was_degraded and degraded is not None:
            degraded[0] += 1
        on_done(True)

    try:
        async with anyio.create_task_group() as tg:
            for user in range(options.users) if users is None else users:
                tg.start_soon(user_task, user)
    finally:
        if shared is not None:
            await shared.close()
        if index is not None:
            await index.close()
        if backend is not None and hasattr(backend, "aclose"):
            await backend.aclose()
    return latencies, errors, time.perf_counter() - started


def _worker_main(
    mode: str, base_url: str, host: str | None, options_json: str, index: int, counts: Any, go: Any, out: Any
) -> None:  # pragma: no cover - runs in a child process (the workers test checks its results)
    """One worker process of a ``--workers`` run: its share of the users, started when every worker is ready."""
    options = DemoOptions.model_validate_json(options_json)
    users = range(index, options.users, options.workers)

    def done(ok: bool) -> None:
        with counts.get_lock():
            counts[0 if ok else 1] += 1

    with counts.get_lock():
        counts[2] = 1  # ready: imports done
    go.wait()
    tally = [0]
    latencies, errors, wall = anyio.run(_run_mode, mode, base_url, options, done, users, host, tally)
    out.put((index, latencies, errors, wall, tally[0]))


async def _run_workers(
    mode: str,
    base_url: str,
    host: str | None,
    options: DemoOptions,
    on_done: Callable[[bool], None],
    degraded: list[int] | None = None,
) -> tuple[list[float], dict[str, int], float, list[tuple[list[float], dict[str, int], float]]]:
    """Run one mode in ``options.workers`` processes, started together once all are ready; the merged figures
    (wall time from the common start to the last worker's end), then each worker's. ``degraded[0]`` (when
    given) adds up the workers' degraded users."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    go = context.Event()
    counters = [context.Array("i", 3) for _ in range(options.workers)]  # served, failed, ready
    processes = [
        context.Process(
            target=_worker_main,
            args=(mode, base_url, host, options.model_dump_json(), index, counters[index], go, out),
            daemon=True,
        )
        for index in range(options.workers)
    ]
    for process in processes:
        process.start()
    reported = [0, 0]
    results: dict[int, tuple[list[float], dict[str, int], float]] = {}
    try:
        while len(results) < options.workers:
            await anyio.sleep(0.02)
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a demo worker process failed (exit code {dead[0].exitcode})")
            if not go.is_set():
                if all(c[2] for c in counters):
                    go.set()
                continue
            totals = [sum(c[0] for c in counters), sum(c[1] for c in counters)]
            for _ in range(totals[0] - reported[0]):
                on_done(True)
            for _ in range(totals[1] - reported[1]):
                on_done(False)
            reported = totals
            while not out.empty():
                index, latencies, errors, wall, worker_degraded = out.get()
                results[index] = (latencies, errors, wall)
                if degraded is not None:
                    degraded[0] += worker_degraded
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    wall = max(figures[2] for figures in results.values())  # every worker started at the same signal
    merged_latencies = [x for index in sorted(results) for x in results[index][0]]
    merged_errors: dict[str, int] = {}
    for _, errors, _ in results.values():
        for name, count in errors.items():
            merged_errors[name] = merged_errors.get(name, 0) + count
    return merged_latencies, merged_errors, wall, [results[index] for index in sorted(results)]


def _simulator(options: DemoOptions) -> Any:
    from ..testing import OpenAISimulator, SimulatorConfig

    if options.faults == "flaky":
        return OpenAISimulator(SimulatorConfig.flaky(rpm=options.rpm, tpm=options.tpm, seed=options.seed))
    return OpenAISimulator(SimulatorConfig(rpm=options.rpm, tpm=options.tpm, seed=options.seed))


def _index_simulator(options: DemoOptions) -> Any:
    from ..testing import PineconeSimulator, PineconeSimulatorConfig

    config: dict[str, Any] = {
        "dimension": DIMENSIONS,
        "write_rps": options.index_write_rps,
        "retry_after": "fractional",
        "seed": options.seed,
    }
    if options.faults == "flaky":
        return PineconeSimulator(PineconeSimulatorConfig.flaky(**config))
    return PineconeSimulator(PineconeSimulatorConfig(**config))


async def run_demo(
    options: DemoOptions,
    *,
    on_start: Callable[[str], None] | None = None,
    on_user: Callable[[str, bool], None] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> DemoReport:
    """Run the scenario for each mode in turn (the simulator's quota reset in between) and measure it.

    Args:
        options: the scenario.
        on_start: called with a mode's name when it starts.
        on_user: called with the mode and whether a user was served, as each user finishes.
        on_stage: called with the mode and what it is doing (``"ingesting"``, ``"users"``, ``"done"``).
    """
    from ..testing import serve

    if options.rag:
        try:
            import pinecone  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "the demo's RAG round trip needs the pinecone SDK: pip install 'ragguard[cli]' (or run it with "
                "rag=False, --no-rag)"
            ) from exc
    simulator = _simulator(options)
    burst_s = float(simulator.config.burst_seconds)
    embed_need, chat_need = _user_costs(options)
    # the quota's users per second: each user needs one request and some tokens in each model's buckets
    quota_users_per_s = min(
        options.rpm / 60,
        options.tpm / 60 / max(1.0, embed_need / options.users),
        options.tpm / 60 / max(1.0, chat_need / options.users),
    )
    results: list[ModeResult] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(simulator, mode="process"))
        index_server = stack.enter_context(serve(_index_simulator(options), mode="process")) if options.rag else None
        async with contextlib.AsyncExitStack() as clients:
            control = await clients.enter_async_context(httpx.AsyncClient(base_url=server.url, timeout=30))
            index_control: httpx.AsyncClient | None = None
            host: str | None = None
            if index_server is not None:
                host = index_server.url
                index_control = await clients.enter_async_context(httpx.AsyncClient(base_url=host, timeout=30))
            for mode in options.modes:
                (await control.post("/_sim/reset")).raise_for_status()
                if on_start is not None:
                    on_start(mode)
                ingest_s, stored = 0.0, 0
                if index_control is not None and host is not None:
                    if on_stage is not None:
                        on_stage(mode, "ingesting")
                    (await index_control.post("/_sim/reset")).raise_for_status()
                    ingest_s = await _ingest(mode, server.base_url, host, options)
                    stored = int((await index_control.get("/_sim/stats")).json().get("vectors_stored", 0))
                    # the users' figures are measured on a fresh quota: the ingestion's requests do not count there
                    (await control.post("/_sim/reset")).raise_for_status()

                def done(ok: bool, mode: str = mode) -> None:
                    if on_user is not None:
                        on_user(mode, ok)

                if on_stage is not None:
                    on_stage(mode, "users")
                per_worker: list[tuple[list[float], dict[str, int], float]] = []
                tally = [0]  # users served a degraded answer
                if options.workers > 1:
                    latencies, errors, wall, per_worker = await _run_workers(
                        mode, server.base_url, host, options, done, tally
                    )
                else:
                    latencies, errors, wall = await _run_mode(mode, server.base_url, options, done, None, host, tally)
                if on_stage is not None:
                    on_stage(mode, "done")
                index_stats: dict[str, Any] = {}
                if index_control is not None:
                    index_stats = (await index_control.get("/_sim/stats")).json()
                index_statuses = index_stats.get("responses_by_status", {})
                stats = (await control.get("/_sim/stats")).json()
                upstream, too_many, tokens, ok_by_model, tokens_by_model = _figures(stats)
                succeeded = len(latencies)
                results.append(
                    ModeResult(
                        mode=mode,
                        users=options.users,
                        succeeded=succeeded,
                        failed=options.users - succeeded,
                        upstream_requests=upstream,
                        upstream_429=too_many,
                        tokens=tokens,
                        p50_s=round(_percentile(latencies, 0.50), 4),
                        p95_s=round(_percentile(latencies, 0.95), 4),
                        p99_s=round(_percentile(latencies, 0.99), 4),
                        wall_s=round(wall, 4),
                        theoretical_min_s=round(
                            theoretical_min_s(ok_by_model, tokens_by_model, options.rpm, options.tpm, burst_s),
                            4,
                        ),
                        # the quota admits at most a full bucket plus the refill over the wall time
                        goodput=round(succeeded / (quota_users_per_s * (wall + burst_s)), 4),
                        errors=errors,
                        ingest_s=round(ingest_s, 4),
                        vectors_stored=stored,
                        vector_requests=int(index_stats.get("requests_total", 0)),
                        vector_429=int(index_statuses.get("429", index_statuses.get(429, 0))),
                        workers=[
                            _worker_result(index, len(range(index, options.users, options.workers)), *figures)
                            for index, figures in enumerate(per_worker)
                        ],
                        degraded=tally[0],
                    )
                )
    return DemoReport(
        rpm=options.rpm,
        tpm=options.tpm,
        faults=options.faults,
        seed=options.seed,
        modes=results,
        workers=options.workers,
        redis=options.redis is not None,
        corpus=options.corpus,
        rag=options.rag,
    )


def _worker_result(index: int, users: int, latencies: list[float], errors: dict[str, int], wall: float) -> WorkerResult:
    return WorkerResult(
        worker=index + 1,
        users=users,
        succeeded=len(latencies),
        failed=users - len(latencies),
        p50_s=round(_percentile(latencies, 0.50), 4),
        p95_s=round(_percentile(latencies, 0.95), 4),
        p99_s=round(_percentile(latencies, 0.99), 4),
        wall_s=round(wall, 4),
        errors=errors,
    )


def render_table(report: DemoReport) -> Any:
    """The results as a ``rich`` table (a *degraded* column only when some mode served degraded answers)."""
    from rich.table import Table

    degraded = int(any(m.degraded for m in report.modes))
    table = Table(
        caption=(
            "ingest = embed and upsert the corpus; vectors = stored afterwards; index reqs = vector-store requests "
            "(ingestion + queries) and their 429s; upstream … wall = the users' phase at the LLM provider; "
            if report.rag
            else ""
        )
        + "goodput = users served ÷ users the quota admits in that wall time (a full bucket + refill); "
        "min s = least wall time the quota allows for what the mode sent"
        + ("; degraded = served a degraded answer (fewer chunks, or no generation)" if degraded else ""),
        title=(
            f"Monday morning: {report.modes[0].users if report.modes else 0} users, quota {report.rpm:,.0f} RPM / "
            f"{report.tpm:,.0f} TPM per model"
            + (f", {report.corpus} chunks to ingest" if report.rag else "")
            + f", faults: {report.faults}"
            + (
                f", {report.workers} worker processes sharing "
                + ("one quota through Redis" if report.redis else "nothing (each its own limiter)")
                if report.workers > 1
                else ""
            )
        ),
    )
    index_headers = ("ingest s", "vectors", "index reqs (429s)") if report.rag else ()
    for header in (
        "mode",
        *index_headers,
        "served",
        *(("degraded",) if degraded else ()),
        "failed",
        "upstream",
        "429s",
        "tokens",
        "p50 s",
        "p95 s",
        "p99 s",
        "wall s",
        "min s",
        "goodput",
    ):
        table.add_column(header, justify="left" if header == "mode" else "right", no_wrap=True)
    for m in report.modes:
        share = m.succeeded / m.users if m.users else 0.0
        index_cells = (f"{m.ingest_s:.2f}", f"{m.vectors_stored}", f"{m.vector_requests} ({m.vector_429})")
        table.add_row(
            m.mode,
            *(index_cells if report.rag else ()),
            f"{m.succeeded} ({share:.0%})",
            *((str(m.degraded),) if degraded else ()),
            str(m.failed),
            str(m.upstream_requests),
            f"{m.upstream_429} ({m.upstream_429 / max(1, m.upstream_requests):.0%})",
            f"{m.tokens:,}",
            f"{m.p50_s:.2f}",
            f"{m.p95_s:.2f}",
            f"{m.p99_s:.2f}",
            f"{m.wall_s:.2f}",
            f"{m.theoretical_min_s:.2f}",
            f"{m.goodput:.0%}",
        )
        for w in m.workers:
            table.add_row(
                f"  worker {w.worker}",
                *("·" * len(index_headers)),
                f"{w.succeeded} ({w.succeeded / max(1, w.users):.0%})",
                *("·" * degraded),
                str(w.failed),
                *("·" * 3),
                f"{w.p50_s:.2f}",
                f"{w.p95_s:.2f}",
                f"{w.p99_s:.2f}",
                f"{w.wall_s:.2f}",
                *("·" * 2),
            )
    return table


def run_demo_cli(options: DemoOptions, *, json_path: str | None = None, progress: bool = True) -> int:
    """Run the demo with live progress bars and print the table; write JSON when asked. Returns 0, or 2 when an
    SDK the scenario needs is not installed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))  # pipes and CI logs: no wrapping of the table
    bars = Progress(
        TextColumn("{task.description:<12}"),
        TextColumn("{task.fields[stage]:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("served {task.fields[ok]} · failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    tasks = {
        mode: bars.add_task(mode, total=options.users, ok=0, failed=0, stage="", start=False) for mode in options.modes
    }
    counts = {mode: [0, 0] for mode in options.modes}

    def on_start(mode: str) -> None:
        bars.start_task(tasks[mode])

    def on_stage(mode: str, stage: str) -> None:
        bars.update(tasks[mode], stage=stage)

    def on_user(mode: str, ok: bool) -> None:
        counts[mode][0 if ok else 1] += 1
        bars.update(tasks[mode], advance=1, ok=counts[mode][0], failed=counts[mode][1])

    console.print(
        f"[bold]ragguard demo[/bold]: {options.users} users at once, quota {options.rpm:,.0f} RPM / "
        f"{options.tpm:,.0f} TPM per model"
        + (
            f", {options.corpus} chunks to ingest first (index limit {options.index_write_rps:g} writes/s)"
            if options.rag
            else ""
        )
        + f", faults: {options.faults}"
    )
    try:
        with bars:
            report = anyio.run(lambda: run_demo(options, on_start=on_start, on_user=on_user, on_stage=on_stage))
    except ImportError as exc:
        console.print(str(exc), style="red", markup=False)
        return 2
    console.print(render_table(report))
    for m in report.modes:
        if m.errors:
            console.print(f"  {m.mode} failures: " + ", ".join(f"{k} × {v}" for k, v in sorted(m.errors.items())))
    if json_path:
        payload = report.model_dump()
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        console.print(f"figures written to {json_path}")
    return 0
