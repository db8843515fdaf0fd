"""LlamaIndex: give an existing app production behaviour without restructuring it (``ragguard[llamaindex]``).

One call guards the models every index, retriever and query engine uses::

    from llama_index.core import Settings
    from ragguard.integrations.llama_index import guard_settings

    Settings.embed_model = OpenAIEmbedding(model="text-embedding-3-small")
    Settings.llm = OpenAI(model="gpt-4o-mini")
    guard_settings(Settings, ragguard.Policy(rate_limit={"rpm": 3_000, "tpm": 1_000_000}))

or wrap models one by one: :class:`GuardedEmbedding` (cache → micro-batcher → pipeline, for any
``BaseEmbedding``) and :class:`GuardedLLM` (pipeline with token-aware limits, for any ``LLM``). Both switch the
wrapped model's own retries off — LlamaIndex's OpenAI classes retry with tenacity *around* the SDK's own retries
(``max_retries=2`` is up to 6 HTTP attempts per call) — so a call makes at most ``Policy.retry.attempts``.

For apps that prefer LlamaIndex's own hook, :class:`RagguardRateLimiter` is a ``BaseRateLimiter`` backed by
ragguard's bucket (local, or shared through Redis). The app's own functions — tools, retrievers, query functions,
sync or async — take ragguard's decorators (``@ragguard.retry``, ``circuit_breaker``, ``rate_limit``,
``concurrency_limit``, ``timeout``, ``cached``, ``coalesce``).

This module imports ``llama_index.core``; ``import ragguard`` never does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol, cast

from llama_index.core.rate_limiter import BaseRateLimiter

from .. import _stateful
from .._clock import SYSTEM_CLOCK, Clock
from .._sync import run_sync
from .._tokens import TokenEstimator
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import Policy, RateLimitPolicy
from ._llama_common import InnerRetriesWarning
from ._llama_embedding import GuardedEmbedding
from ._llama_llm import GuardedLLM

__all__ = ["GuardedEmbedding", "GuardedLLM", "InnerRetriesWarning", "RagguardRateLimiter", "guard_settings"]


class _Bucket(Protocol):
    async def acquire(self, requests: float = 1.0, tokens: float = 0.0, *, deadline: float = math.inf) -> Any: ...


class RagguardRateLimiter(BaseRateLimiter):
    """LlamaIndex's ``rate_limiter`` hook backed by a ragguard bucket: ``OpenAI(..., rate_limiter=limiter)``.

    Each ``acquire`` / ``async_acquire`` takes one request and ``num_tokens`` tokens from a
    :class:`~ragguard.RateLimiter` (FIFO, no polling) or, with a :class:`~ragguard.RedisBackend`, a
    :class:`~ragguard.SharedRateLimiter` that several processes share. Instances with the same ``name``,
    settings and backend share one bucket, so an LLM and an embedding model can share a quota. The sync
    ``acquire`` waits on ragguard's sync bridge (the same async core).

    The hook only paces: LlamaIndex does not tell it about 429s, so it cannot pause everyone on a provider's
    ``Retry-After``, and the models' own retries still multiply. :class:`GuardedLLM` / :class:`GuardedEmbedding`
    (or :func:`guard_settings`) do both.

    Args:
        rpm: requests per minute.
        tpm: tokens per minute (LlamaIndex passes ``num_tokens`` only where it knows them).
        name: the bucket's name (with a shared backend: across processes).
        backend: where the bucket lives (default: the process-wide memory backend).
        policy: a whole :class:`~ragguard.RateLimitPolicy` instead of ``rpm``/``tpm``/``options``.
        clock: time source.
        **options: other :class:`~ragguard.RateLimitPolicy` fields (``burst_seconds``, ``max_wait``, ``lease``…).

    Raises:
        pydantic.ValidationError: an invalid setting, naming the field.
        TypeError: both ``policy`` and ``rpm``/``tpm``/``options`` given.
        RateLimitTimeout: (from ``acquire``) the wait would exceed ``max_wait``.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        name: str = "llama_index",
        backend: Backend | None = None,
        policy: RateLimitPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        **options: Any,
    ) -> None:
        if policy is None:
            policy = RateLimitPolicy(rpm=rpm, tpm=tpm, **options)
        elif rpm is not None or tpm is not None or options:
            raise TypeError("pass either policy= or rpm=/tpm=/options, not both")
        #: the bucket's settings
        self.policy = policy
        #: the ragguard limiter behind the hook (a RateLimiter, or a SharedRateLimiter on a shared backend)
        self.limiter: Any = _stateful.rate_limiter(backend or default_backend(), name, policy, clock=clock)

    def acquire(self, num_tokens: int = 0) -> None:
        """Block until one request (and ``num_tokens`` tokens) may go."""
        bucket = cast(_Bucket, self.limiter)
        run_sync(lambda: bucket.acquire(1.0, float(max(num_tokens, 0))))

    async def async_acquire(self, num_tokens: int = 0) -> None:
        """Wait until one request (and ``num_tokens`` tokens) may go."""
        bucket = cast(_Bucket, self.limiter)
        await bucket.acquire(1.0, float(max(num_tokens, 0)))

    def __repr__(self) -> str:
        return f"RagguardRateLimiter({self.limiter!r})"


def _current(settings: Any, private: str, public: str) -> Any:
    """The model set on ``settings``, or LlamaIndex's default for it; ``None`` (with a warning) when there is
    none and the default cannot be made (no API key, package missing)."""
    value = getattr(settings, private, None)
    if value is not None:
        return value
    try:
        return getattr(settings, public)
    except (ImportError, ValueError) as exc:
        warnings.warn(
            f"ragguard: Settings.{public} is not set and LlamaIndex could not make its default ({exc}); "
            "it is not guarded",
            UserWarning,
            stacklevel=3,
        )
        return None


def guard_settings(
    settings: Any = None,
    policy: Policy | None = None,
    backend: Backend | None = None,
    *,
    estimator: TokenEstimator | None = None,
    clock: Clock = SYSTEM_CLOCK,
    embed_model: bool = True,
    llm: bool = True,
) -> Any:
    """Wrap ``Settings.embed_model`` in :class:`GuardedEmbedding` and ``Settings.llm`` in :class:`GuardedLLM`,
    in place, switching the wrapped models' own retries off (``max_retries = 0``) so attempts never multiply.

    Everything that reads ``Settings`` afterwards — ``VectorStoreIndex``, retrievers, query and chat engines,
    ingestion pipelines — uses the guarded models. Models already guarded are left as they are, so calling it
    twice is harmless. A model whose retries cannot be switched off is still wrapped, with an
    :class:`InnerRetriesWarning`. A model not set is LlamaIndex's default, made now (skipped with a warning when
    it cannot be made). Components given a model explicitly (``index.as_query_engine(llm=...)``) keep it: wrap
    those with :class:`GuardedLLM` / :class:`GuardedEmbedding`.

    Args:
        settings: LlamaIndex's ``Settings`` (default: ``llama_index.core.Settings``).
        policy: the guards' configuration for both models (default: ``Policy()``); the embedding model
            micro-batches unless the policy sets its ``batching`` section.
        backend: where shared state lives (default: the process-wide memory backend; a
            :class:`~ragguard.RedisBackend` shares limits, breakers and the embedding cache across processes).
        estimator: counts tokens for tokens-per-minute limits (default: :func:`ragguard.default_estimator`).
        clock: time source.
        embed_model: guard ``Settings.embed_model`` (default ``True``).
        llm: guard ``Settings.llm`` (default ``True``).

    Returns:
        ``settings``.
    """
    if settings is None:
        from llama_index.core import Settings

        settings = Settings
    if embed_model:
        current = _current(settings, "_embed_model", "embed_model")
        if current is not None and not isinstance(current, GuardedEmbedding):
            settings.embed_model = GuardedEmbedding(current, policy, backend, estimator=estimator, clock=clock)
    if llm:
        current = _current(settings, "_llm", "llm")
        if current is not None and not isinstance(current, GuardedLLM):
            settings.llm = GuardedLLM(current, policy, backend, estimator=estimator, clock=clock)
    return settings
