"""The guarded OpenAI client, driven through the real openai SDK over real HTTP against the simulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

import ragguard
from ragguard.providers.openai import classify_openai
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

pytestmark = pytest.mark.openai

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the guards themselves are tested on trio too


def policy(**sections: Any) -> ragguard.Policy:
    base: dict[str, Any] = {
        "retry": {"attempts": 6, "base": 0.01, "cap": 0.05},
        "breaker": {"failure_threshold": 50, "min_calls": 20, "failure_rate": 0.9},
        "timeout": {"attempt": 5.0, "total": 30.0},
        # these tests count upstream attempts of repeated identical calls: the call-saving layers (tested in
        # test_openai_caching.py) would answer them without going upstream
        "cache": {"enabled": False},
        "coalesce": {"enabled": False},
    }
    base.update(sections)
    return ragguard.Policy(**base)


@pytest.fixture
def sim() -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        yield served


def sim_with(**config: Any) -> Any:
    return serve(OpenAISimulator(SimulatorConfig.instant(**config)))


@pytest.fixture
async def opened() -> Any:
    """Clients a test opens, closed while its event loop still runs."""
    clients: list[Any] = []
    yield clients
    for client in clients:
        await client.close()


@pytest.fixture
def aclient(opened: list[Any]) -> Any:
    """Make a guarded ``AsyncOpenAI`` for a served simulator (closed after the test)."""

    def make(served: Served[Any], p: ragguard.Policy | None = None, **kw: Any) -> AsyncOpenAI:
        client = ragguard.guard(
            AsyncOpenAI(base_url=served.base_url, api_key=KEY, **kw), p or policy(), backend=ragguard.MemoryBackend()
        )
        opened.append(client)
        return client

    return make


EMBED = {"model": "text-embedding-3-small", "input": "hello world"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}


@pytest.mark.anyio
async def test_guarded_client_keeps_the_sdk_interface_and_types(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim)
    emb = await client.embeddings.create(**EMBED)
    assert isinstance(emb, openai.types.CreateEmbeddingResponse)
    assert len(emb.data[0].embedding) == 1536
    chat = await client.chat.completions.create(**CHAT)
    assert isinstance(chat, openai.types.chat.ChatCompletion)
    assert chat.choices[0].message.content
    resp = await client.responses.create(model="gpt-4o-mini", input="Say hello", max_output_tokens=16)
    assert resp.output_text
    # untouched pass-through: the SDK's own resources and helpers
    assert client.embeddings.with_raw_response is not None
    assert client.base_url == sim.base_url + "/"
    # with_options stays guarded and keeps the SDK's retries off
    other = client.with_options(timeout=7.0)
    assert (await other.embeddings.create(**EMBED)).data
    assert other.ragguard.raw.max_retries == 0  # type: ignore[attr-defined]
    await client.close()


@pytest.mark.anyio
async def test_sdk_retries_are_switched_off(sim: Served[OpenAISimulator], aclient: Any) -> None:
    with sim_with(error_rate=1.0) as served:
        client = aclient(served, policy(retry={"attempts": 1}), max_retries=5)
        with pytest.raises(ragguard.RetryExhausted) as info:
            await client.embeddings.create(**EMBED)
        assert isinstance(info.value.__cause__, openai.InternalServerError)
        assert served.stats().requests_total == 1  # the SDK would have made 6


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["both", "retry-after", "retry-after-date", "reset-only", "none"])
async def test_rate_limit_429_is_retried_with_every_hint_form(style: str, aclient: Any) -> None:
    # 120 RPM, bucket of 4: a burst of 8 trips the limit; each wait is about 0.5 s
    with sim_with(rpm=120, tpm=None, burst_seconds=2.0, hint_style=style) as served:
        client = aclient(served, policy(retry={"attempts": 8, "base": 0.05, "cap": 1.0}))
        import anyio

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(lambda: client.embeddings.create(**EMBED))
        stats = served.stats()
        assert stats.responses_by_status.get(200) == 6
        assert stats.responses_by_status.get(429, 0) >= 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("style", "low", "high"),
    [("both", 0.2, 0.7), ("retry-after", 1.0, 1.0), ("retry-after-date", 0.0, 2.0), ("reset-only", 0.2, 0.7)],
)
async def test_classifier_reads_the_hint_from_the_sdk_error(
    style: str, low: float, high: float, opened: list[Any]
) -> None:
    with sim_with(rpm=120, tpm=None, burst_seconds=0.5, hint_style=style) as served:
        raw = AsyncOpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
        opened.append(raw)
        await raw.embeddings.create(**EMBED)
        with pytest.raises(openai.RateLimitError) as info:
            await raw.embeddings.create(**EMBED)
        outcome = classify_openai(info.value)
        assert outcome.rate_limited
        assert outcome.retryable
        assert not outcome.failure
        assert outcome.retry_after is not None
        assert low <= outcome.retry_after <= high


@pytest.mark.anyio
async def test_server_errors_and_dropped_connections_are_retried(aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None, error_rate=0.3, drop_rate=0.2, seed=3) as served:
        client = aclient(served)
        for _ in range(20):
            assert (await client.embeddings.create(**EMBED)).data
        stats = served.stats()
        assert stats.faults.get("drop", 0) >= 1
        assert stats.faults.get("error_500", 0) + stats.faults.get("error_503", 0) >= 1
        assert stats.requests_total > 20


@pytest.mark.anyio
async def test_a_stall_longer_than_the_attempt_timeout_is_retried(aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None, stall_rate=0.5, stall_s=30.0, seed=1) as served:
        client = aclient(served, policy(timeout={"attempt": 0.2, "total": 20.0}))
        started = time.monotonic()
        for _ in range(4):
            assert (await client.embeddings.create(**EMBED)).data
        assert time.monotonic() - started < 10
        assert served.stats().requests_total > 4


@pytest.mark.anyio
async def test_400_is_never_retried(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim)
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="text-embedding-3-small", input="")
    assert sim.stats().requests_total == 1


@pytest.mark.anyio
async def test_insufficient_quota_is_a_billing_failure_never_retried(aclient: Any) -> None:
    with sim_with(insufficient_quota=True) as served:
        client = aclient(served)
        with pytest.raises(openai.RateLimitError) as info:
            await client.embeddings.create(**EMBED)
        assert classify_openai(info.value).kind == "quota"
        assert served.stats().requests_total == 1


@pytest.mark.anyio
async def test_stream_is_retried_before_its_first_chunk(aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None, error_rate=0.5, seed=1) as served:
        client = aclient(served)
        for _ in range(5):
            stream = await client.chat.completions.create(**CHAT, stream=True)
            assert isinstance(stream, openai.AsyncStream)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
        assert served.stats().requests_total > 5


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["disconnect", "truncate"])
async def test_stream_broken_after_first_chunk_is_not_retried(style: str, aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None, stream_break_rate=1.0, stream_break_style=style) as served:
        client = aclient(served)
        stream = await client.chat.completions.create(**{**CHAT, "max_tokens": 40}, stream=True)
        chunks: list[Any] = []

        async def drain() -> None:
            async for chunk in stream:
                chunks.append(chunk)

        with pytest.raises(ragguard.StreamInterrupted):
            await drain()
        assert len(chunks) >= 1
        assert served.stats().requests_total == 1


@pytest.mark.anyio
async def test_local_rate_limit_paces_calls_to_the_quota(aclient: Any) -> None:
    with sim_with(rpm=6000, tpm=None) as served:  # 100 requests per second, bucket of 100
        client = aclient(served, policy(rate_limit={"rpm": 6000}))
        import anyio

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(150):
                tg.start_soon(lambda: client.embeddings.create(**EMBED))
        elapsed = time.monotonic() - started
        stats = served.stats()
        assert stats.responses_by_status.get(200) == 150
        assert stats.responses_by_status.get(429, 0) <= 3  # ≤ 2 %
        assert elapsed >= 0.4  # 50 requests beyond the burst at 100/s


@pytest.mark.anyio
async def test_token_cost_reserved_as_openai_counts_it(sim: Served[OpenAISimulator]) -> None:
    backend = ragguard.MemoryBackend()
    clock = ragguard.ManualClock()  # no refill while the test runs
    async with ragguard.guard(
        AsyncOpenAI(base_url=sim.base_url, api_key=KEY),
        policy(rate_limit={"tpm": 600_000}),
        backend=backend,
        clock=clock,
    ) as client:
        reply = await client.chat.completions.create(**{**CHAT, "max_tokens": 500, "n": 2})
    [(key, limiter)] = backend.items("rate_limit")
    assert KEY not in key  # credentials never appear in clear
    used = limiter.capacity_tokens - limiter.available_tokens
    assert reply.usage is not None
    # OpenAI's rule: prompt + max_tokens × n at admission, nothing refunded for the shorter answer
    assert used == pytest.approx(reply.usage.prompt_tokens + 1000, abs=2)


def test_sync_client_through_the_same_core() -> None:
    with sim_with(rpm=None, tpm=None, error_rate=0.3, seed=11) as served:
        client = ragguard.guard(
            OpenAI(base_url=served.base_url, api_key=KEY), policy(), backend=ragguard.MemoryBackend()
        )
        with client:
            _sync_calls(client)


def _sync_calls(client: OpenAI) -> None:
    if True:
        assert client.embeddings.create(**EMBED).data
        assert client.chat.completions.create(**CHAT).choices
        stream = client.chat.completions.create(**CHAT, stream=True)
        assert isinstance(stream, openai.Stream)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="text-embedding-3-small", input="")


def test_unknown_client_is_a_config_error() -> None:
    with pytest.raises(ragguard.ConfigError, match="does not know"):
        ragguard.guard(object())


@pytest.mark.anyio
async def test_concurrent_embeddings_are_micro_batched(aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None) as served:
        # one batch answers 2,048 inputs with 1,536 floats each: its simulation and parsing take seconds on a busy
        # 2-core machine, so the attempt timeout must not turn it into retries (which the bound would count)
        client = aclient(
            served,
            policy(batching={"enabled": True, "max_wait": 0.02}, timeout={"attempt": 60.0, "total": 120.0}),
        )
        raw = AsyncOpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
        texts = [f"question number {i}" for i in range(5000)]
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await client.embeddings.create(model="text-embedding-3-small", input=texts[i])

        import anyio

        async with anyio.create_task_group() as tg:
            for i in range(5000):
                tg.start_soon(one, i)
        stats = served.stats()
        assert stats.requests_total <= -(-5000 // 2048) + 2
        assert stats.responses_by_status == {200: stats.requests_total}
        for i in (0, 1, 2047, 2048, 4999):
            reply = results[i]
            assert isinstance(reply, openai.types.CreateEmbeddingResponse)
            assert [d.index for d in reply.data] == [0]
            expected = await raw.embeddings.create(model="text-embedding-3-small", input=texts[i])
            assert reply.data[0].embedding == expected.data[0].embedding
            assert reply.usage.prompt_tokens >= 1
        await raw.close()


@pytest.mark.anyio
async def test_one_bad_input_fails_only_its_caller(aclient: Any) -> None:
    with sim_with(rpm=None, tpm=None) as served:
        client = aclient(served, policy(batching={"enabled": True, "max_wait": 0.05}))
        outcomes: dict[int, Any] = {}
        too_long = "word " * 10_000  # > 8,192 tokens in one input: OpenAI's 400

        async def one(i: int, text: str) -> None:
            try:
                outcomes[i] = await client.embeddings.create(model="text-embedding-3-small", input=[text, f"ok {i}"])
            except openai.BadRequestError as exc:
                outcomes[i] = exc

        import anyio

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(one, i, too_long if i == 5 else f"text {i}")
        assert isinstance(outcomes[5], openai.BadRequestError)
        for i in range(16):
            if i != 5:
                assert len(outcomes[i].data) == 2
