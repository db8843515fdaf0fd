"""``GuardedEmbedding``: any LlamaIndex ``BaseEmbedding`` behind the embedding cache, the micro-batcher and the
pipeline, sync and async paths alike."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr

from .. import _stateful
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import status_code_of
from .._sync import run_in_worker, run_sync
from .._tokens import TokenEstimator, default_estimator
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import BatchingPolicy, Policy
from ..errors import ConfigError, RagGuardError
from ..guards.batch import MicroBatcher
from ..guards.cache import Cache, cache_key
from ..guards.coalesce import Coalescer
from ..guards.pipeline import Guard, Pipeline
from ..providers.generic import build_pipeline
from ._llama_common import (
    classify_llama,
    credential_of,
    decode_vector,
    encode_vector,
    note_error,
    slot_before_permit,
    switch_off_retries,
    warn_retries,
)

__all__ = ["GuardedEmbedding"]


class _Missing:
    __slots__ = ()


_MISSING = _Missing()


def _overrides(model: BaseEmbedding, name: str) -> bool:
    """Whether the model's class implements ``name`` itself rather than inheriting BaseEmbedding's fallback."""
    return getattr(type(model), name, None) is not getattr(BaseEmbedding, name)


def _queries_embed_as_texts(model: BaseEmbedding) -> bool:
    """Whether a query's embedding is the text embedding of the same string, so queries can share text batches:
    OpenAI-style models with one engine for both (``text-embedding-3-*``, ``ada-002``), and LlamaIndex's mock."""
    query_engine = getattr(model, "_query_engine", None)
    if isinstance(query_engine, str) and query_engine == getattr(model, "_text_engine", None):
        return True
    from llama_index.core.embeddings.mock_embed_model import MockEmbedding

    return isinstance(model, MockEmbedding)


def embedding_policy(policy: Policy | None) -> Policy:
    """The policy of a :class:`GuardedEmbedding`: ``policy`` (default ``Policy()``), with micro-batching switched
    on unless the policy sets its ``batching`` section itself (as an argument or through ``RAGGUARD_BATCHING__*``).
    """
    if policy is None:
        policy = Policy()
    if "batching" in policy.model_fields_set:
        return policy
    return policy.model_copy(update={"batching": BatchingPolicy(enabled=True)})


class _EmbeddingCore:
    """The state of one guarded embedding model: its pipeline, cache, batchers and single-flight table.

    Async callers use the model's async methods on their own event loop; sync callers use its sync methods in a
    worker thread, driven from the sync bridge's loop. Each path has its own micro-batcher (a batch belongs to
    one event loop); the pipeline's limiter, breaker and cache are shared by both.
    """

    def __init__(
        self,
        model: BaseEmbedding,
        policy: Policy,
        backend: Backend,
        *,
        estimator: TokenEstimator,
        clock: Clock,
        query_as_text: bool,
    ) -> None:
        self.model = model
        self.policy = policy
        self.estimator = estimator
        self.query_as_text = query_as_text
        self.credential = credential_of(model)
        name = model.model_name
        tag = self.credential or "-"
        #: identity of the vectors this model makes: part of every cache key
        self.identity = (model.class_name(), name, getattr(model, "dimensions", None))
        self.coalescer: Coalescer | None = None
        outer: list[Guard] = []
        if policy.coalesce.enabled and policy.coalesce.embeddings:
            self.coalescer = backend.get_or_create(
                "coalescer",
                f"llama_index:{policy.coalesce.max_keys}",
                lambda: Coalescer(max_keys=policy.coalesce.max_keys, clock=clock),
            )
            outer.append(self.coalescer)
        self.pipeline: Pipeline = slot_before_permit(
            build_pipeline(
                policy,
                backend,
                breaker=f"llama_index.embedding:{tag}:{name}",
                label=f"llama_index:embedding:{name}",
                bucket=f"llama_index:{tag}" if policy.rate_limit.scope == "credential" else f"llama_index:{tag}:{name}",
                bulkhead=f"llama_index:{tag}",
                clock=clock,
                classify=classify_llama,
                outer=outer,
            )
        )
        caching = policy.cache
        self.cache: Cache | None = None
        if caching.enabled and caching.embeddings:
            store = _stateful.cache_store(backend, caching, clock=clock)
            self.cache = Cache.from_policy(
                caching, store=store, encode=encode_vector, decode=decode_vector, clock=clock
            )
        # one batcher per path (async callers' loop, the sync bridge's loop); none for a path whose model method
        # has no batch call of its own (BaseEmbedding's fallback loops one request per text: nothing to save)
        self.batchers: dict[bool, MicroBatcher[str, Embedding]] = {}
        if policy.batching.enabled:
            section = policy.batching.model_copy(
                update={"max_items": min(policy.batching.max_items, model.embed_batch_size)}
            )
            for sync, method in ((False, "_aget_text_embeddings"), (True, "_get_text_embeddings")):
                if _overrides(model, method):
                    self.batchers[sync] = MicroBatcher.from_policy(
                        section,
                        self._dispatcher(sync),
                        cost=lambda text: float(estimator(text)),
                        is_item_error=lambda exc: status_code_of(exc) == 400,
                        clock=clock,
                    )

    def _dispatcher(self, sync: bool) -> Callable[[Hashable, list[str]], Awaitable[Sequence[Embedding]]]:
        async def dispatch(kind: Hashable, texts: list[str]) -> Sequence[Embedding]:
            return await self.fetch(str(kind), texts, sync=sync)

        return dispatch

    # telemetry -----------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = {}
        if self.cache is not None:
            stats["cache.hits"] = self.cache.hits
            stats["cache.misses"] = self.cache.misses
        batchers = self.batchers.values()
        stats["batch.batches_sent"] = sum(b.batches_sent for b in batchers)
        stats["batch.items_sent"] = sum(b.items_sent for b in batchers)
        stats["batch.items_submitted"] = sum(b.items_submitted for b in batchers)
        stats["batch.duplicates_merged"] = sum(b.duplicates_merged for b in batchers)
        if self.coalescer is not None:
            stats["coalesce.leaders"] = self.coalescer.leaders
            stats["coalesce.followers"] = self.coalescer.followers
        return stats

    # calls ---------------------------------------------------------------------------------------------------

    def _attempt(
        self, kind: str, texts: list[str], ctx: CallContext, sync: bool
    ) -> Callable[[], Awaitable[list[Embedding]]]:
        """One attempt: the model's own call, for the texts as one request (or each query on its own)."""
        model = self.model
        limiter = model.rate_limiter  # LlamaIndex's own hook, when the app set one on the model: once per attempt
        if sync:

            def blocking() -> list[Embedding]:
                if limiter is not None:
                    limiter.acquire()
                try:
                    if kind == "query":
                        return [model._get_query_embedding(text) for text in texts]
                    return list(model._get_text_embeddings(texts))
                except Exception as exc:
                    note_error(ctx, exc)
                    raise

            return lambda: run_in_worker(blocking)

        async def attempt() -> list[Embedding]:
            if limiter is not None:
                await limiter.async_acquire()
            try:
                if kind == "query":
                    return [await model._aget_query_embedding(text) for text in texts]
                return list(await model._aget_text_embeddings(texts))
            except Exception as exc:
                note_error(ctx, exc)
                raise

        return attempt

    async def fetch(self, kind: str, texts: list[str], *, sync: bool) -> list[Embedding]:
        """Embed ``texts`` upstream through the pipeline (deadline → retry → breaker → concurrency → rate limit →
        attempt timeout), identical concurrent requests sharing one call."""
        method = "_get_text_embeddings" if sync else "_aget_text_embeddings"
        batch_api = kind == "text" and _overrides(self.model, method)
        ctx = self.pipeline.context(
            tokens=float(sum(self.estimator(text) for text in texts)),
            requests=1.0 if batch_api else float(len(texts)),
            operation="embeddings",
        )
        if self.coalescer is not None:
            ctx.extras = {"coalesce_key": ("llama_index.embedding", id(self), kind, sync, tuple(texts))}
        vectors = await self.pipeline.run(self._attempt(kind, texts, ctx, sync), ctx)
        if len(vectors) != len(texts):
            raise RagGuardError(f"the embedding model returned {len(vectors)} vectors for {len(texts)} texts")
        return vectors

    def _key(self, kind: str, text: str) -> str:
        if self.cache is None:  # only called when caching is on
            raise RuntimeError("embedding cache keys asked for without a cache")
        digest = hashlib.sha256(text.encode()).hexdigest()
        caching = self.cache.policy
        parts = ("llama_index.embedding", *self.identity, kind, digest)
        return cache_key(caching.namespace, caching.scope, self.credential, *parts)

    async def embed(self, texts: list[str], kind: str, *, sync: bool) -> list[Embedding]:
        """Each text's vector: from the cache, else upstream once per distinct text (micro-batched with
        concurrent callers' texts when batching is on), then cached."""
        if not texts:
            return []
        if kind == "query" and self.query_as_text:
            kind = "text"
        cache = self.cache
        vectors: list[Any] = [_MISSING] * len(texts)
        keys: dict[str, str] = {}
        if cache is not None:
            for i, text in enumerate(texts):
                key = keys.get(text)
                if key is None:
                    key = keys[text] = self._key(kind, text)
                vectors[i] = await cache.get(key, _MISSING)
        todo = list(dict.fromkeys(text for text, vector in zip(texts, vectors, strict=True) if vector is _MISSING))
        if todo:
            batcher = self.batchers.get(sync) if kind == "text" else None
            if batcher is not None:
                got = await batcher.submit(kind, todo)
            else:
                got = await self.fetch(kind, todo, sync=sync)
            fetched = dict(zip(todo, got, strict=True))
            for i, text in enumerate(texts):
                if vectors[i] is _MISSING:
                    vectors[i] = fetched[text]
            if cache is not None:
                for text, vector in fetched.items():
                    await cache.set(keys[text], vector)
        return vectors


class GuardedEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model with production behaviour; use it wherever the wrapped one was used.

    Every call — sync (``get_text_embedding_batch`` during ingestion) or async (``aget_query_embedding`` during
    ``aquery``), query or text — goes through:

    1. the **embedding cache** (per text: model, dimensions, sha256 of the text, credential fingerprint, scope;
       ``Policy.cache``): a repeated query or chunk costs no request;
    2. the **micro-batcher** (``Policy.batching``; on unless the policy sets that section): concurrent callers'
       texts — e.g. the query embeddings of many concurrent ``aquery`` calls — share one upstream request of at
       most ``embed_batch_size`` texts; identical texts are sent once;
    3. the **pipeline**: deadline → retry → circuit breaker → concurrency limit → rate limit (requests and
       tokens) → attempt timeout, judged by the OpenAI SDK's error classes when the model uses it. The
       concurrency slot comes before the rate-limit permit here (see ``Policy.concurrency.max_in_flight`` in
       the LlamaIndex docs): a busy event loop cannot then release a backlog of permitted requests at once.

    The wrapped model's own retries are switched off (``max_retries = 0``, on the model and on any SDK client it
    already made), so attempts never multiply; :class:`~ragguard.integrations.llama_index.InnerRetriesWarning`
    says when that cannot be done. LlamaIndex's own ``rate_limiter`` on the wrapped model, if set, is still
    acquired once per attempt.

    Args:
        embed_model: any ``BaseEmbedding`` (``OpenAIEmbedding``, a local model…).
        policy: the guards' configuration (default ``Policy()``, which reads ``RAGGUARD_*`` variables). Unlike
            ``Policy``'s own default, micro-batching is on unless the policy sets its ``batching`` section.
        backend: where shared state lives (default: the process-wide memory backend): every guarded model of one
            backend, credential and model name shares one rate limit and one breaker; a
            :class:`~ragguard.RedisBackend` shares them, and the cache, across processes.
        estimator: counts a text's tokens for the tokens-per-minute limit (default: :func:`ragguard.default_estimator`).
        clock: time source (tests inject :class:`~ragguard.ManualClock`).
        query_as_text: whether a query's embedding equals the text embedding of the same string, so queries can
            join text batches and share cache entries (default: detected — OpenAI models with one engine for
            both, LlamaIndex's ``MockEmbedding``; otherwise each query is a request of its own).
        inner_retries: keep the wrapped model's own retries (default ``False``: switch them off).

    Raises:
        ConfigError: ``embed_model`` is not a ``BaseEmbedding`` or is already guarded.
    """

    _inner: BaseEmbedding = PrivateAttr()
    _core: _EmbeddingCore = PrivateAttr()

    def __init__(
        self,
        embed_model: BaseEmbedding,
        policy: Policy | None = None,
        backend: Backend | None = None,
        *,
        estimator: TokenEstimator | None = None,
        clock: Clock = SYSTEM_CLOCK,
        query_as_text: bool | None = None,
        inner_retries: bool = False,
    ) -> None:
        if not isinstance(embed_model, BaseEmbedding):
            raise ConfigError(f"GuardedEmbedding wraps a llama_index BaseEmbedding, not {type(embed_model).__name__}")
        if isinstance(embed_model, GuardedEmbedding):
            raise ConfigError("this embedding model is guarded already")
        super().__init__(
            model_name=embed_model.model_name,
            embed_batch_size=embed_model.embed_batch_size,
            callback_manager=embed_model.callback_manager,
            num_workers=embed_model.num_workers,
        )
        if not inner_retries:
            reason = switch_off_retries(embed_model)
            if reason is not None:
                warn_retries(embed_model, reason, stacklevel=2)
        self._inner = embed_model
        self._core = _EmbeddingCore(
            embed_model,
            embedding_policy(policy),
            backend if backend is not None else default_backend(),
            estimator=estimator or default_estimator(),
            clock=clock,
            query_as_text=_queries_embed_as_texts(embed_model) if query_as_text is None else query_as_text,
        )

    @classmethod
    def class_name(cls) -> str:
        return "GuardedEmbedding"

    @property
    def inner(self) -> BaseEmbedding:
        """The wrapped model."""
        return self._inner

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._core.policy

    def stats(self) -> dict[str, int]:
        """Counters of the call-saving layers: cache hits and misses, batches and items sent, texts merged,
        single-flight leaders and followers."""
        return self._core.stats()

    # BaseEmbedding's hooks: LlamaIndex's public methods (events, callbacks, embed_batch_size) call these --------

    def _get_query_embedding(self, query: str) -> Embedding:
        return run_sync(lambda: self._core.embed([query], "query", sync=True))[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._core.embed([query], "query", sync=False))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return run_sync(lambda: self._core.embed([text], "text", sync=True))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._core.embed([text], "text", sync=False))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return run_sync(lambda: self._core.embed(list(texts), "text", sync=True))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._core.embed(list(texts), "text", sync=False)
