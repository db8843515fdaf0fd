"""A 200 the SDK cannot use (an HTML page from a proxy, with ``text/html``) is a malformed answer: the attempt fails
with the SDK's own ``APIResponseValidationError`` and is retried; once retries are spent, the caller gets
:class:`~ragguard.RetryExhausted` chaining it. Through the real openai SDK, over real HTTP, against the simulator."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

import ragguard
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

pytestmark = pytest.mark.openai

KEY = "sk-test-0123456789abcdef"
ATTEMPTS = 3
EMBED = {"model": "text-embedding-3-small", "input": "hello world"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the guards themselves are tested on trio too


def policy(*, batching: bool = False) -> ragguard.Policy:
    return ragguard.Policy(
        retry={"attempts": ATTEMPTS, "base": 0.001, "cap": 0.005},
        breaker={"enabled": False},
        cache={"enabled": False},
        coalesce={"enabled": False},
        batching={"enabled": batching, "max_wait": 0.001},
    )


def html_only() -> Any:
    """A simulator whose every answer is a 200 with an HTML page."""
    return serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None, wrong_content_type_rate=1.0)))


def assert_malformed(error: ragguard.RetryExhausted, served: Served[OpenAISimulator]) -> None:
    assert error.attempts == ATTEMPTS
    assert isinstance(error.__cause__, openai.APIResponseValidationError)
    assert error.__cause__.status_code == 200
    assert served.stats().faults.get("wrong_content_type") == ATTEMPTS  # each attempt went upstream


@pytest.mark.anyio
async def test_a_stream_without_any_event_is_retried_then_fails_typed() -> None:
    with html_only() as served:
        async with ragguard.guard(
            AsyncOpenAI(base_url=served.base_url, api_key=KEY), policy(), backend=ragguard.MemoryBackend()
        ) as client:
            with pytest.raises(ragguard.RetryExhausted) as info:
                await client.chat.completions.create(**CHAT, stream=True)
        assert_malformed(info.value, served)


def test_a_sync_stream_without_any_event_is_retried_then_fails_typed() -> None:
    with html_only() as served:
        with (
            ragguard.guard(
                OpenAI(base_url=served.base_url, api_key=KEY), policy(), backend=ragguard.MemoryBackend()
            ) as client,
            pytest.raises(ragguard.RetryExhausted) as info,
        ):
            client.chat.completions.create(**CHAT, stream=True)
        assert_malformed(info.value, served)


@pytest.mark.anyio
@pytest.mark.parametrize("batching", [False, True], ids=["unbatched", "batched"])
async def test_an_html_embeddings_answer_fails_as_a_validation_error(batching: bool) -> None:
    with html_only() as served:
        async with ragguard.guard(
            AsyncOpenAI(base_url=served.base_url, api_key=KEY),
            policy(batching=batching),
            backend=ragguard.MemoryBackend(),
        ) as client:
            with pytest.raises(ragguard.RetryExhausted) as info:
                await client.embeddings.create(**EMBED)
        assert_malformed(info.value, served)
        # the SDK's parser choked on the page (its embeddings decoding reads ``.data`` of a str): kept as the cause
        assert isinstance(info.value.__cause__.__cause__, AttributeError)


@pytest.mark.anyio
async def test_a_stream_answered_after_an_html_page_is_whole() -> None:
    # half the answers are the HTML page: an attempt that got one is retried, so every stream handed over has text
    config = SimulatorConfig.instant(rpm=None, tpm=None, wrong_content_type_rate=0.5, seed=3)
    with serve(OpenAISimulator(config)) as served:
        async with ragguard.guard(
            AsyncOpenAI(base_url=served.base_url, api_key=KEY), policy(), backend=ragguard.MemoryBackend()
        ) as client:
            ok = 0
            for _ in range(4):
                try:
                    stream = await client.chat.completions.create(**CHAT, stream=True)
                except ragguard.RetryExhausted:
                    continue
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert text  # never an empty stream that ends "successfully"
                ok += 1
        stats = served.stats()
        assert stats.faults.get("wrong_content_type", 0) > 0  # the page was served (and never reached a caller)
        assert ok > 0
        assert stats.requests_total > ok  # the attempts that got it were retried
