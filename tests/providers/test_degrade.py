"""Degradation modes (``Policy.degrade``): the guarded OpenAI client through the real openai SDK against the
OpenAI simulator, the guarded Pinecone index through the real pinecone SDK against the Pinecone simulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pydantic
import pytest
from openai import AsyncOpenAI, OpenAI
from pinecone import Pinecone, QueryResponse

import ragguard
from ragguard.config import DegradePolicy
from ragguard.degrade import DEGRADED_FINGERPRINT, DEGRADED_ID_PREFIX, Degrader, last_degradation
from ragguard.errors import CircuitOpenError, Degraded
from ragguard.guards.breaker import CircuitBreaker
from ragguard.guards.bulkhead import ConcurrencyLimit
from ragguard.providers.pinecone import guard_pinecone
from ragguard.testing import OpenAISimulator, PineconeSimulator, Served, SimulatorConfig, serve
from ragguard.testing.pinecone_simulator import PineconeSimulatorConfig

KEY = "sk-test-0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
EMBED = {"model": "text-embedding-3-small", "input": "hello world"}
CONTEXT = "Passwords are reset from the sign-in page."
DIM = 8


def policy(**sections: Any) -> ragguard.Policy:
    base: dict[str, Any] = {
        "retry": {"attempts": 2, "base": 0.01, "cap": 0.05},
        "timeout": {"attempt": 5.0, "total": 30.0},
    }
    base.update(sections)
    return ragguard.Policy(**base)


def breaker_of(pipeline: Any) -> CircuitBreaker:
    return next(guard for guard in pipeline.guards if isinstance(guard, CircuitBreaker))


# --- configuration -------------------------------------------------------------------------------------------


def test_degradation_is_off_by_default_and_validated() -> None:
    assert ragguard.Policy().degrade == DegradePolicy()
    assert not DegradePolicy().enabled
    assert DegradePolicy(top_k=2).enabled
    with pytest.raises(pydantic.ValidationError, match="when"):
        DegradePolicy(when="overloaded", cache_only=True)  # a load trigger needs a threshold
    for bad in ({"top_k": 0}, {"max_queue": -1}, {"max_limiter_wait": -0.5}, {"when": "sometimes"}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            DegradePolicy(**bad)
    with pytest.raises(TypeError, match="context"), ragguard.call_options(context=5):  # type: ignore[arg-type]
        pass


# --- OpenAI --------------------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the Pinecone tests below run on trio too


@pytest.fixture
def sim() -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        yield served


@pytest.fixture
async def aclient() -> Any:
    clients: list[Any] = []

    def make(served: Served[Any], p: ragguard.Policy) -> Any:
        client = ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=KEY), p, backend=ragguard.MemoryBackend())
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.mark.anyio
async def test_off_by_default_an_open_breaker_still_fails(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim, policy())
    pipeline = client.ragguard.pipeline("chat.completions", "gpt-4o-mini")
    assert not any(isinstance(guard, Degrader) for guard in pipeline.guards)
    breaker_of(pipeline).force_open()
    with ragguard.call_options(context=CONTEXT), pytest.raises(CircuitOpenError):
        await client.chat.completions.create(**CHAT)
    assert sim.stats().requests_total == 0


@pytest.mark.anyio
async def test_open_breaker_skips_generation_and_returns_the_supplied_context(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(sim, policy(degrade={"skip_generation": True}))
    assert (await client.chat.completions.create(**CHAT)).system_fingerprint != DEGRADED_FINGERPRINT
    assert last_degradation() is None
    assert sim.stats().requests_total == 1
    breaker_of(client.ragguard.pipeline("chat.completions", "gpt-4o-mini")).force_open()
    breaker_of(client.ragguard.pipeline("responses", "gpt-4o-mini")).force_open()

    with ragguard.call_options(context=CONTEXT):
        answer = await client.chat.completions.create(**CHAT, n=2)
        response = await client.responses.create(model="gpt-4o-mini", input="Say hello")
    assert isinstance(answer, openai.types.chat.ChatCompletion)
    assert [choice.message.content for choice in answer.choices] == [CONTEXT, CONTEXT]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.system_fingerprint == DEGRADED_FINGERPRINT
    assert answer.id.startswith(DEGRADED_ID_PREFIX)
    assert answer.model == "gpt-4o-mini"
    assert answer.usage is not None
    assert answer.usage.total_tokens == 0
    assert isinstance(response, openai.types.responses.Response)
    assert response.output_text == CONTEXT
    assert response.id.startswith(DEGRADED_ID_PREFIX)
    seen = last_degradation()
    assert seen is not None
    assert seen.modes == ("skip_generation",)
    assert sim.stats().requests_total == 1  # nothing reached the provider while the breaker was open

    # without a context, or streamed, there is nothing to answer with: a typed error, still no request
    with pytest.raises(Degraded) as caught:
        await client.chat.completions.create(**CHAT)
    assert (caught.value.mode, caught.value.reason) == ("skip_generation", "breaker_open")
    with ragguard.call_options(context=CONTEXT), pytest.raises(Degraded):
        await client.chat.completions.create(**CHAT, stream=True)
    # embeddings are not generation: they go upstream as usual (their breaker is closed)
    assert (await client.embeddings.create(**EMBED)).data
    assert sim.stats().requests_total == 2


@pytest.mark.anyio
async def test_breaker_refusal_while_half_open_degrades_the_call(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim, policy(degrade={"skip_generation": True}))
    breaker = breaker_of(client.ragguard.pipeline("chat.completions", "gpt-4o-mini"))
    breaker.force_open(0.0)  # half-open at once: one probe may go
    probe = breaker.acquire()  # ...and someone else holds it
    with ragguard.call_options(context=CONTEXT):
        answer = await client.chat.completions.create(**CHAT)
    probe.release()
    assert answer.choices[0].message.content == CONTEXT
    seen = last_degradation()
    assert seen is not None
    assert seen.reason == "breaker_open"
    assert sim.stats().requests_total == 0
    # the probe place is free again: the next call is the probe, reaches the provider and closes the breaker
    with ragguard.call_options(context=CONTEXT):
        answer = await client.chat.completions.create(**CHAT)
    assert answer.system_fingerprint != DEGRADED_FINGERPRINT
    assert last_degradation() is None
    assert sim.stats().requests_total == 1


@pytest.mark.anyio
async def test_cache_only_serves_hits_and_raises_on_misses(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim, policy(degrade={"cache_only": True}))
    ask = {**CHAT, "temperature": 0}  # deterministic: cached by default
    first = await client.chat.completions.create(**ask)
    await client.embeddings.create(**EMBED)
    assert sim.stats().requests_total == 2
    core = client.ragguard
    breaker_of(core.pipeline("chat.completions", "gpt-4o-mini")).force_open()
    breaker_of(core.pipeline("embeddings", "text-embedding-3-small")).force_open()

    again = await client.chat.completions.create(**ask)
    assert again == first
    seen = last_degradation()
    assert seen is not None
    assert (seen.reason, seen.modes) == ("breaker_open", ("cache_only",))
    with pytest.raises(Degraded) as caught:
        await client.chat.completions.create(**{**ask, "max_tokens": 17})  # never asked: not cached
    assert (caught.value.mode, caught.value.reason) == ("cache_only", "breaker_open")
    assert (await client.embeddings.create(**EMBED)).data  # each input is cached
    with pytest.raises(Degraded):
        await client.embeddings.create(**{**EMBED, "input": ["hello world", "not cached"]})
    assert sim.stats().requests_total == 2


@pytest.mark.anyio
async def test_limiter_overload_skips_generation(sim: Served[OpenAISimulator], aclient: Any) -> None:
    # 6 RPM with a 10 s burst holds one request: the second call would wait ~10 s for the limiter
    p = policy(
        rate_limit={"rpm": 6, "burst_seconds": 10},
        degrade={"when": "overloaded", "max_limiter_wait": 1.0, "skip_generation": True},
    )
    client = aclient(sim, p)
    with ragguard.call_options(context=CONTEXT):
        assert (await client.chat.completions.create(**CHAT)).system_fingerprint != DEGRADED_FINGERPRINT
        answer = await client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == CONTEXT
    seen = last_degradation()
    assert seen is not None
    assert seen.reason == "overloaded"
    assert "would wait" in seen.detail
    assert sim.stats().requests_total == 1


def test_sync_client_degrades_and_reports_it(sim: Served[OpenAISimulator]) -> None:
    p = policy(degrade={"skip_generation": True})
    with ragguard.guard(OpenAI(base_url=sim.base_url, api_key=KEY), p, backend=ragguard.MemoryBackend()) as client:
        breaker_of(client.ragguard.pipeline("chat.completions", "gpt-4o-mini")).force_open()
        with ragguard.call_options(context=CONTEXT):
            answer = client.chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == CONTEXT
        seen = last_degradation()  # carried back across the sync bridge
        assert seen is not None
        assert seen.modes == ("skip_generation",)
    assert sim.stats().requests_total == 0


# --- Pinecone ------------------------------------------------------------------------------------------------


def vec(i: int) -> list[float]:
    return [float((i * 7 + j) % 11 + 1) for j in range(DIM)]


async def _indexed(served: Served[Any], p: ragguard.Policy) -> Any:
    index = guard_pinecone(
        Pinecone(api_key="pc-test-key").IndexAsyncio(host=served.url), p, backend=ragguard.MemoryBackend()
    )
    await index.upsert(vectors=[(f"v{i}", vec(i)) for i in range(10)], namespace="n")
    return index


def _pinecone_sim() -> Any:
    return serve(PineconeSimulator(PineconeSimulatorConfig.instant(dimension=DIM)))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_overload_reduces_top_k_never_raises_it(anyio_backend: str) -> None:
    p = policy(concurrency={"max_in_flight": 1}, degrade={"when": "overloaded", "max_queue": 0, "top_k": 2})
    with _pinecone_sim() as served:
        index = await _indexed(served, p)
        try:
            assert len((await index.query(vector=vec(1), top_k=5, namespace="n")).matches) == 5
            assert last_degradation() is None
            bulkhead = next(g for g in index.ragguard.pipeline("query").guards if isinstance(g, ConcurrencyLimit))
            release = anyio.Event()
            results: dict[int, tuple[QueryResponse, Any]] = {}

            async def ask(top_k: int) -> None:
                found = await index.query(vector=vec(2), top_k=top_k, namespace="n")
                results[top_k] = (found, last_degradation())

            async with anyio.create_task_group() as tg:
                tg.start_soon(bulkhead.call, release.wait)  # the only slot is taken: queries must queue
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(ask, 5)
                tg.start_soon(ask, 1)
                await anyio.wait_all_tasks_blocked()
                release.set()
            found, seen = results[5]
            assert len(found.matches) == 2  # the simulator was asked for top_k=2
            assert seen is not None
            assert (seen.reason, seen.modes) == ("overloaded", ("top_k",))
            found, seen = results[1]
            assert len(found.matches) == 1  # already below the reduced top_k: unchanged, not degraded
            assert seen is None
            # the reduced answer was cached under its own key: a normal query gets all 5 matches again
            assert len((await index.query(vector=vec(2), top_k=5, namespace="n")).matches) == 5
        finally:
            await index.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_pinecone_cache_only_under_an_open_breaker(anyio_backend: str) -> None:
    p = policy(degrade={"cache_only": True, "top_k": 3})
    with _pinecone_sim() as served:
        index = await _indexed(served, p)
        try:
            full = await index.query(vector=vec(4), top_k=6, namespace="n")
            queries = served.stats().requests_by_endpoint["/query"]
            breaker_of(index.ragguard.pipeline("query")).force_open()
            cut = await index.query(vector=vec(4), top_k=6, namespace="n")
            assert [m.id for m in cut.matches] == [m.id for m in full.matches][:3]  # cached, cut to top_k 3
            seen = last_degradation()
            assert seen is not None
            assert seen.modes == ("top_k", "cache_only")
            with pytest.raises(Degraded) as caught:
                await index.query(vector=vec(5), top_k=6, namespace="n")
            assert (caught.value.mode, caught.value.reason) == ("cache_only", "breaker_open")
            assert served.stats().requests_by_endpoint["/query"] == queries
        finally:
            await index.close()


# --- the demo (belongs with tests/test_demo.py; kept here with the feature) -----------------------------------


def test_demo_degrades_only_in_flaky_runs_and_shows_a_column_then() -> None:
    from rich.console import Console

    from ragguard.cli.demo import (
        DEGRADED_TOP_K,
        TOP_K,
        DemoOptions,
        DemoReport,
        ModeResult,
        guarded_policy,
        index_policy,
        render_table,
    )

    default, flaky = DemoOptions(), DemoOptions(faults="flaky")
    assert not guarded_policy(default).degrade.enabled
    assert not index_policy(default).degrade.enabled
    assert guarded_policy(flaky).degrade.skip_generation
    assert index_policy(flaky).degrade.top_k == DEGRADED_TOP_K < TOP_K
    assert not index_policy(flaky, writes=True).degrade.enabled

    def rendered(degraded: int) -> str:
        figures = {"users": 10, "succeeded": 10, "failed": 0, "upstream_requests": 20, "upstream_429": 0}
        times = {"p50_s": 0.1, "p95_s": 0.2, "p99_s": 0.3, "wall_s": 1.0, "theoretical_min_s": 0.5}
        mode = ModeResult(mode="guarded", tokens=100, goodput=1.0, degraded=degraded, **figures, **times)
        console = Console(width=250, record=True)
        console.print(render_table(DemoReport(rpm=60, tpm=600, faults="flaky", seed=1, modes=[mode])))
        return console.export_text()

    assert "degraded" not in rendered(0)
    assert "degraded" in rendered(7)
    assert ModeResult.model_fields["degraded"].default == 0
