"""The call-saving layers of the guarded OpenAI client (caches, single-flight, micro-batching), through the real
SDK over real HTTP against the simulator: what reaches upstream, and that every caller still gets its own answer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

import ragguard
from ragguard._tokens import estimate_text_tokens
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve
from ragguard.testing._content import embedding_vector

pytestmark = pytest.mark.openai

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-test-fedcba9876543210"
EMBED_MODEL = "text-embedding-3-small"
CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "What is the refund policy?"}],
    "temperature": 0,
    "max_tokens": 32,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the guards themselves are tested on trio too


@pytest.fixture
def sim() -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        yield served


@pytest.fixture
async def opened() -> Any:
    clients: list[Any] = []
    yield clients
    for client in clients:
        await client.close()


@pytest.fixture
def aclient(opened: list[Any]) -> Any:
    def make(served: Served[Any], api_key: str = KEY, backend: Any = None, **sections: Any) -> AsyncOpenAI:
        client = ragguard.guard(
            AsyncOpenAI(base_url=served.base_url, api_key=api_key),
            ragguard.Policy(**sections),
            backend=backend or ragguard.MemoryBackend(),
        )
        opened.append(client)
        return client

    return make


def upstream(served: Served[OpenAISimulator], endpoint: str = "/v1/chat/completions") -> int:
    return served.stats().requests_by_endpoint.get(endpoint, 0)


# --- response cache and single-flight -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_thousand_identical_deterministic_chats_make_one_upstream_call_then_none(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(sim)
    answers: list[Any] = []

    async def ask() -> None:
        answers.append(await client.chat.completions.create(**CHAT))

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(ask)
    assert upstream(sim) == 1
    assert len(answers) == 1000
    assert len({a.choices[0].message.content for a in answers}) == 1

    answers.clear()
    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(ask)
    assert upstream(sim) == 1  # the second wave is served from the cache
    assert all(isinstance(a, openai.types.chat.ChatCompletion) for a in answers)
    assert answers[0].model_dump() == answers[-1].model_dump()
    stats = client.ragguard.cache_stats()
    assert stats["chat.completions.hits"] == 1000
    assert stats["coalesce.leaders"] == 1
    assert stats["coalesce.followers"] == 999


@pytest.mark.anyio
async def test_a_cached_answer_equals_the_original(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim)
    first = await client.chat.completions.create(**CHAT)
    second = await client.chat.completions.create(**CHAT)
    assert upstream(sim) == 1
    assert second is not first
    assert second.model_dump() == first.model_dump()
    response = await client.responses.create(model="gpt-4o-mini", input="hello", temperature=0)
    again = await client.responses.create(model="gpt-4o-mini", input="hello", temperature=0)
    assert upstream(sim, "/v1/responses") == 1
    assert again.model_dump() == response.model_dump()


@pytest.mark.anyio
async def test_sampled_requests_are_not_cached_unless_the_policy_says_all(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    sampled = {**CHAT, "temperature": 0.7}
    default = aclient(sim)
    await default.chat.completions.create(**sampled)
    await default.chat.completions.create(**{k: v for k, v in CHAT.items() if k != "temperature"})
    await default.chat.completions.create(**sampled)
    assert upstream(sim) == 3
    everything = aclient(sim, cache={"responses": "all"})
    await everything.chat.completions.create(**sampled)
    await everything.chat.completions.create(**sampled)
    assert upstream(sim) == 4
    off = aclient(sim, cache={"responses": "off"})
    await off.chat.completions.create(**CHAT)
    await off.chat.completions.create(**CHAT)
    assert upstream(sim) == 6


@pytest.mark.anyio
async def test_streams_and_errors_are_never_cached(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim)
    for _ in range(2):
        stream = await client.chat.completions.create(**CHAT, stream=True)
        assert [chunk async for chunk in stream]
    assert upstream(sim) == 2
    bad = {**CHAT, "messages": []}
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(**bad)
    assert upstream(sim) == 4


@pytest.mark.anyio
async def test_scopes_and_credentials_never_share_entries(sim: Served[OpenAISimulator], aclient: Any) -> None:
    backend = ragguard.MemoryBackend()  # one store: separation must come from the keys
    client = aclient(sim, backend=backend)
    other_key = aclient(sim, api_key=OTHER_KEY, backend=backend)
    await client.chat.completions.create(**CHAT)
    await other_key.chat.completions.create(**CHAT)
    assert upstream(sim) == 2
    with ragguard.call_options(scope="tenant-a"):
        await client.chat.completions.create(**CHAT)
        await client.chat.completions.create(**CHAT)
    with ragguard.call_options(scope="tenant-b"):
        await client.chat.completions.create(**CHAT)
    assert upstream(sim) == 4
    tenant = aclient(sim, backend=backend, cache={"scope": "tenant-a"})
    await tenant.chat.completions.create(**CHAT)  # Policy.cache.scope is its own scope too
    assert upstream(sim) == 5
    # the API keys never appear in a cache key, in clear or as a plain sha256
    store = client.ragguard.store
    keys = list(store._data)
    assert keys
    for secret in (KEY, OTHER_KEY):
        assert not any(secret in key or hashlib.sha256(secret.encode()).hexdigest() in key for key in keys)


@pytest.mark.anyio
async def test_call_options_can_bypass_the_cache(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim)
    await client.chat.completions.create(**CHAT)
    with ragguard.call_options(cache=False):
        await client.chat.completions.create(**CHAT)
    await client.chat.completions.create(**CHAT)
    assert upstream(sim) == 2
    with pytest.raises(TypeError, match="cache"), ragguard.call_options(cache="no"):  # type: ignore[arg-type]
        pass


@pytest.mark.anyio
async def test_completions_coalescing_is_opt_in_and_a_caller_key_covers_sampled_requests(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    sampled = {**CHAT, "temperature": 0.9}

    async def burst(client: Any, n: int = 20) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(lambda: client.chat.completions.create(**sampled))

    await burst(aclient(sim))
    assert upstream(sim) == 20  # default: sampled prompts each get their own sample
    opted = aclient(sim, coalesce={"completions": True})
    await burst(opted)
    assert upstream(sim) == 40  # opted in, but a sampled request still needs a caller's key
    with ragguard.call_options(coalesce_key="faq"):
        await burst(opted)
    assert upstream(sim) == 41


@pytest.mark.anyio
async def test_coalescing_off_sends_every_call(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim, coalesce={"enabled": False}, cache={"enabled": False})
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(lambda: client.chat.completions.create(**CHAT))
    assert upstream(sim) == 10


# --- embeddings -----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_identical_concurrent_embeddings_share_one_call_by_default(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(sim, cache={"enabled": False})
    vectors: list[list[float]] = []

    async def embed() -> None:
        response = await client.embeddings.create(model=EMBED_MODEL, input="hello world")
        vectors.append(response.data[0].embedding)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(embed)
    assert upstream(sim, "/v1/embeddings") == 1
    assert all(v == embedding_vector(EMBED_MODEL, "hello world", 1536) for v in vectors)


@pytest.mark.anyio
async def test_partly_cached_embeddings_send_only_the_missing_inputs(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(sim)
    texts = [f"document {i:03d}" for i in range(100)]
    await client.embeddings.create(model=EMBED_MODEL, input=texts[:90])
    tokens_before = sim.stats().tokens_admitted
    response = await client.embeddings.create(model=EMBED_MODEL, input=texts)
    assert upstream(sim, "/v1/embeddings") == 2
    # only the ten new texts were sent (and charged)
    assert sim.stats().tokens_admitted - tokens_before == sum(estimate_text_tokens(t) for t in texts[90:])
    assert response.usage.prompt_tokens == sum(estimate_text_tokens(t) for t in texts[90:])
    assert [item.index for item in response.data] == list(range(100))
    for text, item in zip(texts, response.data, strict=True):
        assert item.embedding == embedding_vector(EMBED_MODEL, text, 1536)
    again = await client.embeddings.create(model=EMBED_MODEL, input=texts)
    assert upstream(sim, "/v1/embeddings") == 2
    assert again.usage.prompt_tokens == 0  # nothing was sent for it
    assert [i.embedding for i in again.data] == [i.embedding for i in response.data]
    stats = client.ragguard.cache_stats()
    assert stats["embeddings.hits"] == 90 + 100


@pytest.mark.anyio
async def test_embedding_cache_keys_cover_dimensions_encoding_and_duplicates(
    sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(sim)
    full = await client.embeddings.create(model=EMBED_MODEL, input="same text")
    short = await client.embeddings.create(model=EMBED_MODEL, input="same text", dimensions=8)
    b64 = await client.embeddings.create(model=EMBED_MODEL, input="same text", encoding_format="base64")
    assert len(full.data[0].embedding) == 1536
    assert len(short.data[0].embedding) == 8
    assert isinstance(b64.data[0].embedding, str)
    assert upstream(sim, "/v1/embeddings") == 3
    b64_again = await client.embeddings.create(model=EMBED_MODEL, input="same text", encoding_format="base64")
    assert b64_again.data[0].embedding == b64.data[0].embedding
    dupes = await client.embeddings.create(model=EMBED_MODEL, input=["x one", "x two", "x one"])
    assert upstream(sim, "/v1/embeddings") == 4
    assert dupes.data[0].embedding == dupes.data[2].embedding != dupes.data[1].embedding


@pytest.mark.anyio
async def test_many_single_embeds_batch_and_cache_together(sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(sim, batching={"enabled": True})
    texts = [f"passage {i}" for i in range(300)]
    results: dict[str, list[float]] = {}

    async def embed(text: str) -> None:
        results[text] = (await client.embeddings.create(model=EMBED_MODEL, input=text)).data[0].embedding

    async with anyio.create_task_group() as tg:
        for text in texts:
            tg.start_soon(embed, text)
    batched = upstream(sim, "/v1/embeddings")
    assert batched <= 3
    assert all(results[t] == embedding_vector(EMBED_MODEL, t, 1536) for t in texts)
    async with anyio.create_task_group() as tg:
        for text in texts:
            tg.start_soon(embed, text)
    assert upstream(sim, "/v1/embeddings") == batched


def test_the_sync_client_uses_the_same_layers(sim: Served[OpenAISimulator]) -> None:
    with ragguard.guard(
        OpenAI(base_url=sim.base_url, api_key=KEY), ragguard.Policy(), backend=ragguard.MemoryBackend()
    ) as client:
        first = client.chat.completions.create(**CHAT)
        second = client.chat.completions.create(**CHAT)
        assert second.model_dump() == first.model_dump()
        client.embeddings.create(model=EMBED_MODEL, input=["a b", "c d"])
        mixed = client.embeddings.create(model=EMBED_MODEL, input=["c d", "e f"])
        with ragguard.call_options(cache=False):
            client.chat.completions.create(**CHAT)
    stats = sim.stats().requests_by_endpoint
    assert stats["/v1/chat/completions"] == 2
    assert stats["/v1/embeddings"] == 2
    assert mixed.data[1].embedding == embedding_vector(EMBED_MODEL, "e f", 1536)


# --- semantic cache -------------------------------------------------------------------------------------------


@pytest.fixture
def words_sim() -> Iterator[Served[OpenAISimulator]]:
    config = SimulatorConfig.instant(rpm=None, tpm=None, embedding_style="words")
    with serve(OpenAISimulator(config)) as served:
        yield served


def ask(question: str, **extra: Any) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": question}], **extra}


LONG = (
    "how do i reset my password if i no longer have access to the email address on my account "
    "and the recovery phone number is also out of date"
)


@pytest.mark.anyio
async def test_the_semantic_cache_is_off_by_default(words_sim: Served[OpenAISimulator], aclient: Any) -> None:
    client = aclient(words_sim)
    await client.chat.completions.create(**ask(LONG))
    await client.chat.completions.create(**ask(LONG + " please"))
    assert upstream(words_sim) == 2
    assert upstream(words_sim, "/v1/embeddings") == 0


@pytest.mark.anyio
async def test_the_semantic_cache_serves_a_paraphrase_and_never_a_different_question(
    words_sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(words_sim, cache={"semantic": {"enabled": True, "max_distance": 0.05}})
    original = await client.chat.completions.create(**ask(LONG))
    paraphrase = await client.chat.completions.create(**ask(LONG + " please"))
    assert upstream(words_sim) == 1
    assert paraphrase.model_dump() == original.model_dump()
    assert client.ragguard.cache_stats()["semantic.hits"] == 1
    await client.chat.completions.create(**ask("what is the refund policy for annual plans"))
    assert upstream(words_sim) == 2
    # other parameters, another scope: another partition, never served from this one
    await client.chat.completions.create(**ask(LONG + " please", max_tokens=16))
    with ragguard.call_options(scope="tenant-b"):
        await client.chat.completions.create(**ask(LONG + " please"))
    assert upstream(words_sim) == 4
    assert client.ragguard.cache_stats()["semantic.hits"] == 1


@pytest.mark.anyio
async def test_the_semantic_index_forgets_answers_the_cache_dropped(
    words_sim: Served[OpenAISimulator], aclient: Any
) -> None:
    client = aclient(words_sim, cache={"semantic": {"enabled": True}})
    await client.chat.completions.create(**ask(LONG))
    client.ragguard.response_caches["chat.completions"].invalidate()
    await client.chat.completions.create(**ask(LONG + " please"))
    assert upstream(words_sim) == 2
    assert client.ragguard.cache_stats()["semantic.hits"] == 0


def test_cache_and_coalesce_policies_validate_and_load_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="responses"):
        ragguard.Policy(cache={"responses": "sometimes"})
    with pytest.raises(ValidationError, match="max_distance"):
        ragguard.Policy(cache={"semantic": {"max_distance": 0}})
    with pytest.raises(ValidationError, match="max_keys"):
        ragguard.Policy(coalesce={"max_keys": 0})
    monkeypatch.setenv("RAGGUARD_CACHE__RESPONSES", "off")
    monkeypatch.setenv("RAGGUARD_COALESCE__COMPLETIONS", "true")
    monkeypatch.setenv("RAGGUARD_CACHE__SEMANTIC__ENABLED", "true")
    policy = ragguard.Policy()
    assert policy.cache.responses == "off"
    assert policy.coalesce.completions is True
    assert policy.cache.semantic.enabled is True
