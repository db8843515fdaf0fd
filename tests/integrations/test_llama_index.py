"""ragguard inside a LlamaIndex app: real llama-index-core and its OpenAI models, against the OpenAI simulator.

Offline: LlamaIndex's tokenizer is a local function here (its default, tiktoken, downloads its encoding on first
use) and the models only ever talk to the simulator on loopback.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.llms.openai")
pytest.importorskip("llama_index.embeddings.openai")

import llama_index.core
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage, CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.mock import MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.rate_limiter import BaseRateLimiter
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.core.tools import FunctionTool
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI

import ragguard
from ragguard._tokens import estimate_chat_tokens, heuristic_estimator
from ragguard.guards.limiter import RateLimiter
from ragguard.integrations.llama_index import (
    GuardedEmbedding,
    GuardedLLM,
    InnerRetriesWarning,
    RagguardRateLimiter,
    guard_settings,
)
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

pytestmark = pytest.mark.openai

KEY = "sk-test-llamaindex"
EMBED_MODEL = "text-embedding-3-small"
CHAT_MODEL = "gpt-4o-mini"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llamaindex_app.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LlamaIndex's async paths are asyncio-only


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture(autouse=True)
def offline_settings() -> Iterator[None]:
    """A local tokenizer for LlamaIndex, and its global settings restored after each test."""
    saved = (Settings._llm, Settings._embed_model, llama_index.core.global_tokenizer)
    Settings.tokenizer = words
    yield
    Settings._llm, Settings._embed_model, llama_index.core.global_tokenizer = saved


@pytest.fixture
def no_waits() -> Iterator[None]:
    """Retries' backoff skipped (rate-limiter and batcher waits too: only for tests that need neither)."""
    ragguard.set_testing(True)
    yield
    ragguard.set_testing(False)


@pytest.fixture
def sim() -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        yield served


def sim_with(**config: Any) -> Any:
    return serve(OpenAISimulator(SimulatorConfig.instant(**config)))


def policy(**sections: Any) -> ragguard.Policy:
    base: dict[str, Any] = {
        "retry": {"attempts": 3, "base": 0.01, "cap": 0.02},
        "breaker": {"failure_threshold": 100, "min_calls": 100, "window": 100},
        "timeout": {"attempt": 10.0, "total": 30.0},
    }
    base.update(sections)
    return ragguard.Policy(**base)


_MODELS: list[Any] = []


@pytest.fixture
async def close_clients() -> AsyncIterator[None]:
    """Close the async HTTP clients the test's models made, while the test's event loop still runs."""
    yield
    while _MODELS:
        client = getattr(_MODELS.pop(), "_aclient", None)
        if client is not None:
            await client.close()


def embedding(served: Served[Any], **kw: Any) -> OpenAIEmbedding:
    model = OpenAIEmbedding(model=EMBED_MODEL, api_base=served.base_url, api_key=KEY, **kw)
    _MODELS.append(model)
    return model


def llm(served: Served[Any], **kw: Any) -> OpenAI:
    model = OpenAI(model=CHAT_MODEL, api_base=served.base_url, api_key=KEY, **kw)
    _MODELS.append(model)
    return model


def requests(served: Served[OpenAISimulator], endpoint: str) -> int:
    return int(served.stats().requests_by_endpoint.get(endpoint, 0))


def documents() -> list[Document]:
    topics = ("retries", "rate limits", "circuit breakers", "caches", "bulkheads", "deadlines")
    return [
        Document(text=" ".join(f"Section {i} explains {topic}, sentence {j}." for j in range(40)))
        for i, topic in enumerate(topics)
    ]


# --- packaging ---------------------------------------------------------------------------------------------------


def test_import_ragguard_does_not_import_llama_index() -> None:
    code = (
        "import sys, ragguard, ragguard.integrations, ragguard.testing\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'llama_index')\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- the guarded models in a LlamaIndex app ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_ingestion_takes_the_sync_path_and_querying_the_async_path(sim: Served[OpenAISimulator]) -> None:
    backend = ragguard.MemoryBackend()
    embed = GuardedEmbedding(embedding(sim, embed_batch_size=10), policy(), backend)
    Settings.embed_model = embed
    Settings.llm = GuardedLLM(llm(sim), policy(), backend)

    splitter = SentenceSplitter(chunk_size=64, chunk_overlap=0, tokenizer=words)
    index = VectorStoreIndex.from_documents(documents(), transformations=[splitter])  # sync embeddings
    nodes = len(index.docstore.docs)
    assert nodes > 10
    assert requests(sim, "/v1/embeddings") == -(-nodes // 10)  # one request per embed_batch_size texts

    response = await index.as_query_engine(similarity_top_k=2).aquery("What do the sections say about caches?")
    assert str(response)
    assert len(response.source_nodes) == 2
    assert requests(sim, "/v1/chat/completions") == 1
    # the guarded vectors are the model's own
    plain = embedding(sim)
    assert await embed.aget_query_embedding("hello") == await plain.aget_query_embedding("hello")
    assert embed.get_text_embedding("world") == plain.get_text_embedding("world")


def test_the_wrappers_keep_what_llama_index_reads(sim: Served[OpenAISimulator]) -> None:
    inner_llm = llm(sim, max_tokens=64)
    guarded_llm = GuardedLLM(inner_llm, policy())
    assert guarded_llm.metadata == inner_llm.metadata
    assert guarded_llm.metadata.context_window == 128_000  # looked up offline from the model name
    assert guarded_llm.metadata.is_function_calling_model
    inner_embed = embedding(sim, embed_batch_size=42)
    guarded_embed = GuardedEmbedding(inner_embed, policy())
    assert (guarded_embed.model_name, guarded_embed.embed_batch_size) == (EMBED_MODEL, 42)
    assert guarded_embed.inner is inner_embed
    assert guarded_llm.inner is inner_llm
    with pytest.raises(ragguard.ConfigError):
        GuardedLLM(guarded_llm)  # type: ignore[arg-type]
    with pytest.raises(ragguard.ConfigError):
        GuardedEmbedding(guarded_embed)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_llm_calls_sync_async_and_streamed_give_the_models_own_answers(sim: Served[OpenAISimulator]) -> None:
    guarded = GuardedLLM(llm(sim, temperature=0.0), policy())
    plain = llm(sim, temperature=0.0)
    messages = [ChatMessage(role="user", content="Tell me about retries")]

    assert (await guarded.achat(messages)).message.content == (await plain.achat(messages)).message.content
    assert guarded.chat(messages).message.content == plain.chat(messages).message.content
    assert (await guarded.acomplete("Say hello")).text == plain.complete("Say hello").text
    assert guarded.complete("Say hello").text == plain.complete("Say hello").text

    chunks = [chunk.delta async for chunk in await guarded.astream_chat(messages)]
    assert len(chunks) > 1
    assert "".join(d or "" for d in chunks) == plain.chat(messages).message.content
    sent = requests(sim, "/v1/chat/completions")
    stream = guarded.stream_complete("Say hello")
    assert requests(sim, "/v1/chat/completions") == sent  # nothing is sent until the stream is iterated
    assert "".join(chunk.delta or "" for chunk in stream) == plain.complete("Say hello").text


# --- attempts never multiply ---------------------------------------------------------------------------------------


def test_unguarded_llama_index_multiplies_attempts() -> None:
    """The problem: LlamaIndex's tenacity retries wrap the SDK's own, so max_retries=2 is 3 x 2 = 6 attempts."""
    with sim_with(rpm=None, tpm=None, error_rate=1.0) as served:
        with pytest.raises(Exception, match="Error code: 50"):
            llm(served, max_retries=2).complete("hello")
        assert requests(served, "/v1/chat/completions") == 6


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
@pytest.mark.usefixtures("no_waits")
async def test_every_logical_call_makes_at_most_the_policys_attempts() -> None:
    with sim_with(rpm=None, tpm=None, error_rate=1.0) as served:
        guarded_llm = GuardedLLM(llm(served, max_retries=2), policy())
        guarded_embed = GuardedEmbedding(embedding(served, max_retries=2), policy())
        calls = [
            ("/v1/chat/completions", lambda: guarded_llm.achat([ChatMessage(role="user", content="hi")])),
            ("/v1/chat/completions", lambda: guarded_llm.acomplete("hi")),
            ("/v1/embeddings", lambda: guarded_embed.aget_query_embedding("a query")),
            ("/v1/embeddings", lambda: guarded_embed.aget_text_embedding_batch(["a", "b", "c"])),
        ]
        for endpoint, call in calls:
            before = requests(served, endpoint)
            with pytest.raises(ragguard.RetryExhausted):
                await call()
            assert requests(served, endpoint) - before == 3  # the policy's attempts, not 3 x 3 x 3
        for endpoint, sync_call in [
            ("/v1/chat/completions", lambda: guarded_llm.complete("hi")),
            ("/v1/embeddings", lambda: guarded_embed.get_text_embedding_batch(["d", "e"])),
        ]:
            before = requests(served, endpoint)
            with pytest.raises(ragguard.RetryExhausted):
                sync_call()
            assert requests(served, endpoint) - before == 3
        # a stream is retried until its first chunk
        before = requests(served, "/v1/chat/completions")

        async def consume() -> None:
            async for _ in await guarded_llm.astream_complete("hi"):
                pass

        with pytest.raises(ragguard.RetryExhausted):
            await consume()
        assert requests(served, "/v1/chat/completions") - before == 3


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_under_429s_and_faults_no_call_exceeds_the_policys_attempts() -> None:
    n = 30
    flaky = {"error_rate": 0.2, "drop_rate": 0.05, "seed": 11}
    with sim_with(rpm=600, tpm=None, **flaky) as served:  # a bucket of 10: most of the burst gets a 429
        # no client-side rate limit: the 429s reach the retry, which honours the provider's retry-after
        guarded = GuardedLLM(llm(served, max_retries=2), policy(retry={"attempts": 3, "base": 0.01, "cap": 0.05}))
        results: list[Any] = []

        async def ask(i: int) -> None:
            try:
                results.append(await guarded.acomplete(f"question {i}"))
            except ragguard.RetryExhausted as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(ask, i)
        stats = served.stats()
    assert len(results) == n
    assert stats.responses_by_status.get(429, 0) > 0
    assert stats.requests_by_endpoint["/v1/chat/completions"] <= 3 * n
    assert all(isinstance(r, CompletionResponse) or r.attempts <= 3 for r in results)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
@pytest.mark.usefixtures("no_waits")
async def test_a_stream_that_breaks_after_its_first_chunk_is_not_retried() -> None:
    with sim_with(rpm=None, tpm=None, stream_break_rate=1.0) as served:
        guarded = GuardedLLM(llm(served), policy())
        got: list[Any] = []

        async def consume() -> None:
            async for chunk in await guarded.astream_complete("Tell me a long story about retries"):
                got.append(chunk)

        with pytest.raises(ragguard.StreamInterrupted):
            await consume()
        assert len(got) == 1
        assert requests(served, "/v1/chat/completions") == 1


# --- fewer calls: batching and caching -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_concurrent_queries_share_one_embedding_request(sim: Served[OpenAISimulator]) -> None:
    n = 40
    # the batch closes when it holds embed_batch_size texts: one request, whatever the timing
    batching = {"enabled": True, "max_wait": 30.0}
    guarded = GuardedEmbedding(embedding(sim, embed_batch_size=n), policy(batching=batching))
    plain = embedding(sim)
    vectors: dict[int, list[float]] = {}

    async def query(i: int) -> None:
        vectors[i] = await guarded.aget_query_embedding(f"question number {i}")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(query, i)
    assert requests(sim, "/v1/embeddings") == 1
    assert guarded.stats()["batch.batches_sent"] == 1
    assert vectors[7] == await plain.aget_query_embedding("question number 7")  # each caller its own vector


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_concurrent_aquery_calls_are_batched_and_repeated_ones_hit_the_cache(
    sim: Served[OpenAISimulator],
) -> None:
    n = 12
    backend = ragguard.MemoryBackend()  # an ingestion job and a query service sharing one cache
    splitter = SentenceSplitter(chunk_size=64, chunk_overlap=0, tokenizer=words)
    Settings.llm = GuardedLLM(llm(sim), policy(), backend)
    Settings.embed_model = GuardedEmbedding(embedding(sim), policy(batching={"enabled": False}), backend)
    index = VectorStoreIndex.from_documents(documents(), transformations=[splitter])
    ingested = requests(sim, "/v1/embeddings")
    # the query service's model: a batch closes when it holds embed_batch_size texts, so n queries make one
    batching = {"enabled": True, "max_wait": 30.0}
    queries = GuardedEmbedding(embedding(sim, embed_batch_size=n), policy(batching=batching), backend)
    engine = index.as_query_engine(similarity_top_k=2, embed_model=queries)

    async def ask(i: int) -> None:
        assert str(await engine.aquery(f"What is said about topic {i}?"))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(ask, i)
    assert requests(sim, "/v1/embeddings") - ingested == 1  # n query embeddings, one request
    assert requests(sim, "/v1/chat/completions") == n

    await engine.aquery("What is said about topic 3?")  # asked before: its embedding is cached
    assert requests(sim, "/v1/embeddings") - ingested == 1
    assert queries.stats()["cache.hits"] == 1
    # re-ingesting the same chunks (sync path) through the query service's model: all cached, nothing sent
    Settings.embed_model = queries
    VectorStoreIndex.from_documents(documents(), transformations=[splitter])
    assert requests(sim, "/v1/embeddings") - ingested == 1


def test_sync_repeated_query_embeddings_are_cached(sim: Served[OpenAISimulator]) -> None:
    guarded = GuardedEmbedding(embedding(sim), policy())
    first = guarded.get_query_embedding("the same question")
    assert guarded.get_query_embedding("the same question") == first
    assert requests(sim, "/v1/embeddings") == 1
    assert guarded.stats()["cache.hits"] == 1


# --- token-aware limits ------------------------------------------------------------------------------------------


def _bucket(guarded: GuardedLLM) -> RateLimiter:
    return next(g for g in guarded._core.pipeline.guards if isinstance(g, RateLimiter))


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_tokens_are_charged_at_admission_and_settled_as_the_provider_counts(
    sim: Served[OpenAISimulator],
) -> None:
    clock = ragguard.ManualClock()  # no refill while the test runs: the bucket's level is the account
    tpm = policy(rate_limit={"tpm": 600_000, "burst_seconds": 1.0})  # a bucket of 10,000 tokens
    messages = [ChatMessage(role="user", content="Tell me about circuit breakers " * 20)]
    prompt = estimate_chat_tokens(messages, heuristic_estimator)

    capped = GuardedLLM(
        llm(sim, max_tokens=40), tpm, ragguard.MemoryBackend(), estimator=heuristic_estimator, clock=clock
    )
    response = await capped.achat(messages)
    assert response.raw.usage.prompt_tokens == prompt  # the simulator counts as ragguard estimates
    assert _bucket(capped).available_tokens == pytest.approx(10_000 - (prompt + 40))  # OpenAI: prompt + max

    uncapped = GuardedLLM(llm(sim), tpm, ragguard.MemoryBackend(), estimator=heuristic_estimator, clock=clock)
    response = await uncapped.achat(messages)
    # charged the prompt at admission, then the completion the provider reported
    assert _bucket(uncapped).available_tokens == pytest.approx(10_000 - response.raw.usage.total_tokens)


# --- LlamaIndex's own rate_limiter hook ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_the_rate_limiter_hook_paces_an_unguarded_model_to_the_account() -> None:
    n = 20
    with sim_with(rpm=600, tpm=None) as served:  # 10 requests a second, a bucket of 10
        hook = RagguardRateLimiter(rpm=600, name="account", backend=ragguard.MemoryBackend())
        assert isinstance(hook, BaseRateLimiter)
        model = llm(served, max_retries=0, rate_limiter=hook)

        async def ask(i: int) -> None:
            await model.acomplete(f"question {i}")

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(ask, i)
        assert served.stats().responses_by_status == {200: n}  # paced, no 429

        unpaced = llm(served, max_retries=0)
        served.reset()
        outcomes: list[BaseException | None] = []

        async def ask_unpaced(i: int) -> None:
            try:
                await unpaced.acomplete(f"question {i}")
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(ask_unpaced, i)
        assert served.stats().responses_by_status.get(429, 0) > 0  # the same burst, unpaced

        embed = embedding(served, rate_limiter=hook)  # the sync hook: through ragguard's sync bridge
        before = hook.limiter.available_requests
        embed.get_query_embedding("hello")
        assert hook.limiter.available_requests < before


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_the_rate_limiter_hook_charges_tokens_and_shares_its_bucket_by_name() -> None:
    clock = ragguard.ManualClock()
    backend = ragguard.MemoryBackend()
    hook = RagguardRateLimiter(rpm=60, tpm=6_000, burst_seconds=10.0, name="acct", backend=backend, clock=clock)
    same = RagguardRateLimiter(rpm=60, tpm=6_000, burst_seconds=10.0, name="acct", backend=backend, clock=clock)
    assert same.limiter is hook.limiter
    await hook.async_acquire(num_tokens=250)
    same.acquire(num_tokens=50)
    assert hook.limiter.available_requests == pytest.approx(10 - 2)
    assert hook.limiter.available_tokens == pytest.approx(1_000 - 300)
    with pytest.raises(TypeError):
        RagguardRateLimiter(rpm=60, policy=ragguard.RateLimitPolicy(rpm=60))


# --- guard_settings ----------------------------------------------------------------------------------------------


def test_guard_settings_wraps_both_models_and_switches_their_retries_off(sim: Served[OpenAISimulator]) -> None:
    inner_llm = llm(sim, max_retries=3)
    inner_llm.chat([ChatMessage(role="user", content="warm up")])  # the model has made its SDK client already
    assert inner_llm._client is not None
    assert inner_llm._client.max_retries == 3
    inner_embed = embedding(sim, max_retries=10)
    Settings.llm, Settings.embed_model = inner_llm, inner_embed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert guard_settings(Settings, policy()) is Settings
    assert isinstance(Settings.llm, GuardedLLM)
    assert Settings.llm.inner is inner_llm
    assert isinstance(Settings.embed_model, GuardedEmbedding)
    assert Settings.embed_model.inner is inner_embed
    assert (inner_llm.max_retries, inner_embed.max_retries) == (0, 0)
    assert inner_llm._client.max_retries == 0  # the SDK client it made before, too

    guarded = Settings.llm, Settings.embed_model
    guard_settings(Settings, policy())  # twice: harmless
    assert (Settings.llm, Settings.embed_model) == guarded
    # the callback manager LlamaIndex hands to Settings.llm reaches the wrapped model, which reports each attempt
    assert inner_llm.callback_manager is Settings.llm.callback_manager


class _OwnRetriesLLM(CustomLLM):
    """A custom model with no max_retries setting: ragguard cannot know whether it retries."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="own-retries")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="ok")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        yield CompletionResponse(text="ok", delta="ok")


def test_guard_settings_warns_when_it_cannot_switch_retries_off(monkeypatch: pytest.MonkeyPatch) -> None:
    Settings.llm = _OwnRetriesLLM()
    Settings.embed_model = GuardedEmbedding(MockEmbedding(embed_dim=4))
    with pytest.warns(InnerRetriesWarning, match="_OwnRetriesLLM"):
        guard_settings(Settings, policy())
    assert isinstance(Settings.llm, GuardedLLM)
    assert Settings.llm.complete("hi").text == "ok"  # still guarded and working

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuardedLLM(MockLLM())  # known not to retry: no warning

    # nothing set and no default to be had: skipped, with a warning
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("IS_TESTING", raising=False)
    Settings._llm = None
    with pytest.warns(UserWarning, match=r"Settings\.llm is not set"):
        guard_settings(Settings, policy(), embed_model=False)
    assert Settings._llm is None


# --- decorators on the app's own code ------------------------------------------------------------------------------


class FlakyRetriever(BaseRetriever):
    """An app's own retriever over a remote search service that fails now and then."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0
        self.threads: set[int] = set()

    def _search(self, query: str) -> list[NodeWithScore]:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.calls <= self.failures:
            raise ConnectionError("search service unavailable")
        return [NodeWithScore(node=TextNode(text=f"Retries are capped, query was {query!r}."), score=1.0)]

    @ragguard.retry(attempts=4, base=0.001, cap=0.002)
    @ragguard.timeout(5.0)
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._search(query_bundle.query_str)

    @ragguard.retry(attempts=4, base=0.001, cap=0.002)
    @ragguard.circuit_breaker("search-service", failure_threshold=20)
    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._search(query_bundle.query_str)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_decorators_on_a_custom_retriever_sync_and_async(sim: Served[OpenAISimulator]) -> None:
    retriever = FlakyRetriever(failures=2)
    engine = RetrieverQueryEngine.from_args(retriever, llm=GuardedLLM(llm(sim), policy()))
    response = await engine.aquery("how are retries capped?")
    assert str(response)
    assert retriever.calls == 3  # two failures retried inside LlamaIndex's own aquery

    retriever = FlakyRetriever(failures=1)
    nodes = retriever.retrieve("sync path")  # LlamaIndex's sync retrieve -> the decorated _retrieve
    assert nodes[0].node.get_content().endswith("'sync path'.")
    assert retriever.calls == 2
    assert threading.get_ident() not in retriever.threads  # the sync function ran in a worker of the bridge

    retriever = FlakyRetriever(failures=10)
    with pytest.raises(ragguard.RetryExhausted):
        await retriever.aretrieve("always down")
    assert retriever.calls == 4


def test_decorators_on_a_sync_function_used_as_a_llama_index_tool() -> None:
    calls: list[str] = []

    @ragguard.cached(ttl=60)
    @ragguard.retry(attempts=3, base=0.001, cap=0.002)
    @ragguard.rate_limit(rpm=6_000)
    def lookup_order(order_id: str) -> str:
        """Look an order up in the shop's backend."""
        calls.append(order_id)
        if len(calls) == 1:
            raise TimeoutError("backend slow")
        return f"order {order_id}: shipped"

    tool = FunctionTool.from_defaults(fn=lookup_order)
    assert tool.metadata.name == "lookup_order"
    assert "Look an order up" in tool.metadata.description
    assert tool.call(order_id="A-1").content == "order A-1: shipped"  # retried once
    assert tool.call(order_id="A-1").content == "order A-1: shipped"  # then from the cache
    assert calls == ["A-1", "A-1"]

    @ragguard.coalesce()
    @ragguard.concurrency_limit(1)
    def slow_report(day: str) -> str:
        calls.append(day)
        threading.Event().wait(0.2)
        return f"report {day}"

    threads = [threading.Thread(target=slow_report, args=("monday",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls.count("monday") == 1  # four concurrent identical calls, one run


# --- tool calling --------------------------------------------------------------------------------------------------


def test_tool_calls_are_formatted_by_the_wrapped_model(sim: Served[OpenAISimulator]) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    guarded = GuardedLLM(llm(sim), policy())
    prepared = guarded._prepare_chat_with_tools_compat([FunctionTool.from_defaults(fn=add)], user_msg="1 + 2?")
    assert prepared["tools"][0]["function"]["name"] == "add"
    response = guarded.chat_with_tools([FunctionTool.from_defaults(fn=add)], user_msg="1 + 2?")
    assert guarded.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    assert requests(sim, "/v1/chat/completions") == 1
    with pytest.raises(ragguard.ConfigError, match="function calling"):
        GuardedLLM(MockLLM()).get_tool_calls_from_response(response)


# --- the example ---------------------------------------------------------------------------------------------------


def test_the_example_app_before_and_after() -> None:
    spec = importlib.util.spec_from_file_location("llamaindex_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(example)
        before, after = example.compare(queries=40, rpm=600)
    finally:
        del sys.modules[spec.name]

    assert after.succeeded == after.queries == 40
    assert after.upstream_429 <= 0.02 * after.upstream_requests
    assert after.attempts_max <= ragguard.Policy().retry.attempts
    assert after.embedding_requests <= 4  # ingestion's one or two, the queries' micro-batched into one or two
    # before: the same burst meets the account's limits unpaced, and LlamaIndex's retries multiply the SDK's
    assert before.upstream_429 > 0
    assert before.succeeded < before.queries or before.attempts_max > ragguard.Policy().retry.attempts
    assert before.upstream_requests > after.upstream_requests
    table = example.table([before, after])
    assert "upstream 429s" in table
    assert "most HTTP attempts, one call" in table
