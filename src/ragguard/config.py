"""Validated configuration: one pydantic model per guard, gathered in :class:`Policy`.

Invalid values raise :class:`pydantic.ValidationError` naming the field (a negative ``rpm``, a ``cap`` below
``base``, an unknown ``jitter`` kind…). :class:`Policy` is a ``pydantic-settings`` model, so every field can
also come from ``RAGGUARD_*`` environment variables, sections separated by a double underscore::

    RAGGUARD_RETRY__ATTEMPTS=6
    RAGGUARD_RATE_LIMIT__RPM=3000
    RAGGUARD_RATE_LIMIT__TPM=250000
    RAGGUARD_BREAKER__ENABLED=false

Units: every duration is in seconds, rates are per minute (as providers publish them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "BatchingPolicy",
    "BreakerPolicy",
    "CachePolicy",
    "CoalescePolicy",
    "ConcurrencyPolicy",
    "JitterKind",
    "Policy",
    "RateLimitPolicy",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "SemanticCachePolicy",
    "TimeoutPolicy",
]

JitterKind = Literal["full", "equal", "decorrelated", "none"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RetryPolicy(_Section):
    """Retries with jittered exponential backoff that honour the provider's wait hints.

    Backoff follows the AWS Architecture Blog, "Exponential Backoff And Jitter" (Marc Brooker, 2015), with
    ``t = min(cap, base·2ⁿ)`` for retry ``n`` (from 0): ``full`` sleeps ``uniform(0, t)``, ``equal`` sleeps
    ``t/2 + uniform(0, t/2)``, ``decorrelated`` sleeps ``min(cap, uniform(base, 3·previous))``, ``none`` sleeps ``t``.
    """

    enabled: bool = True
    #: total attempts, the first one included (1 = no retry)
    attempts: int = Field(default=4, ge=1, le=100)
    #: backoff base, seconds
    base: float = Field(default=0.5, gt=0, le=3600)
    #: backoff cap, seconds (must be >= base)
    cap: float = Field(default=20.0, gt=0, le=3600)
    jitter: JitterKind = "full"
    #: the retries' own total deadline, seconds from the first attempt (``None``: only the call's deadline)
    deadline: float | None = Field(default=None, gt=0)
    #: wait as long as the provider says (``retry-after-ms``, ``Retry-After``) instead of the backoff
    respect_retry_after: bool = True
    #: a provider hint longer than this (seconds) is not waited for: the call fails fast with the error chained
    max_retry_after: float = Field(default=60.0, gt=0)
    #: upward-only jitter added to a provider hint, as a fraction of it (0.1 = up to +10 %)
    retry_after_jitter: float = Field(default=0.1, ge=0, le=1)

    @field_validator("cap")
    @classmethod
    def _cap_not_below_base(cls, cap: float, info: ValidationInfo) -> float:
        base = info.data.get("base")
        if base is not None and cap < base:
            raise ValueError(f"cap ({cap} s) must be >= base ({base} s)")
        return cap


class RetryBudgetPolicy(_Section):
    """A retry budget (Finagle's ``RetryBudget``, Envoy's retry budgets): over the last ``window_s`` seconds, the
    retries of one pipeline may be at most ``ratio`` × its requests plus ``min_retries_per_s`` × ``window_s``, so
    an outage never turns into a retry storm. A retry the budget refuses fails fast with
    :class:`~ragguard.RetryBudgetExhausted`, the provider's error chained."""

    enabled: bool = True
    #: retries allowed per request in the window
    ratio: float = Field(default=0.2, ge=0, le=10)
    #: retries per second always allowed (the floor, so light traffic can still retry)
    min_retries_per_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    #: the sliding window, seconds (Finagle's ``ttl``)
    window_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    #: time buckets the window is kept in
    buckets: int = Field(default=10, ge=1, le=1000)


class BreakerPolicy(_Section):
    """A circuit breaker (closed → open → half-open), after resilience4j's count-based sliding window."""

    enabled: bool = True
    #: consecutive failures that open the breaker
    failure_threshold: int = Field(default=5, ge=1)
    #: failure rate (0-1] over the sliding window that opens the breaker
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    #: size of the sliding count window (calls)
    window: int = Field(default=20, ge=1, le=100_000)
    #: calls the window must hold before the failure rate counts
    min_calls: int = Field(default=10, ge=1)
    #: how long the breaker stays open before admitting probes, seconds
    open_duration: float = Field(default=30.0, gt=0)
    #: probe calls admitted while half-open
    half_open_probes: int = Field(default=1, ge=1)
    #: a probe that has not reported after this long (seconds) frees its lease (resilience4j#903)
    half_open_max_wait: float = Field(default=60.0, gt=0)
    #: whether a 429 counts as a failure (by default it is flow control, not the provider being down)
    count_rate_limits: bool = False

    @field_validator("min_calls")
    @classmethod
    def _min_calls_fit_window(cls, min_calls: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and min_calls > window:
            raise ValueError(f"min_calls ({min_calls}) must be <= window ({window})")
        return min_calls


class RateLimitPolicy(_Section):
    """Requests-per-minute and tokens-per-minute token buckets, as OpenAI publishes its limits.

    Each bucket refills continuously at ``rate/60`` per second and holds at most ``rate/60 · burst_seconds``
    (providers enforce a per-minute limit over shorter periods: OpenAI's 60,000 RPM is about 1,000 per second,
    so the default keeps half a second of refill and leaves the rest of the provider's burst as a jitter buffer).
    """

    #: requests per minute (``None``: no request limit)
    rpm: float | None = Field(default=None, gt=0)
    #: tokens per minute (``None``: no token limit)
    tpm: float | None = Field(default=None, gt=0)
    #: bucket capacity, in seconds of refill. Keep it below the provider's own burst (OpenAI enforces a minute's
    #: quota over about a second): the provider's unused headroom then absorbs network jitter, so pacing at the
    #: full rate does not trip 429s when requests arrive a little bunched.
    burst_seconds: float = Field(default=0.5, gt=0, le=60)
    #: ``model``: one bucket per credential and model (OpenAI's rule); ``credential``: one pool across models
    scope: Literal["model", "credential"] = "model"
    #: ``openai``: charge prompt estimate + max_tokens·n at admission, never refund, debit under-estimates;
    #: ``reconcile``: settle to the provider's ``usage`` both ways
    accounting: Literal["openai", "reconcile"] = "openai"
    #: trust the provider's ``x-ratelimit-remaining-*`` headers when they say less is left than we think
    follow_headers: bool = True
    #: when the provider says "wait N s" on a 429, pause every caller of the bucket
    share_retry_after: bool = True
    #: longest the limiter waits for capacity, seconds (``None``: until the call's deadline)
    max_wait: float | None = Field(default=None, ge=0)
    #: shared backends only (:class:`~ragguard.RedisBackend`): lease mode, requests taken per round trip and
    #: spent locally (``None``: strict, one round trip per call). Over any window the instances together may
    #: exceed the quota by at most ``lease × instances`` requests (see :class:`~ragguard.SharedRateLimiter`).
    lease: int | None = Field(default=None, ge=1)


class ConcurrencyPolicy(_Section):
    """A bulkhead: at most ``max_in_flight`` calls at once, a bounded queue for the rest."""

    enabled: bool = True
    max_in_flight: int = Field(default=64, ge=1)
    #: callers allowed to wait for a slot; more are refused with BulkheadFull
    max_queue: int = Field(default=10_000, ge=0)
    #: longest wait for a slot, seconds (``None``: until the call's deadline)
    max_wait: float | None = Field(default=None, ge=0)


class TimeoutPolicy(_Section):
    """Per-attempt timeout and total deadline, seconds (``None`` disables one)."""

    attempt: float | None = Field(default=30.0, gt=0)
    total: float | None = Field(default=120.0, gt=0)


class BatchingPolicy(_Section):
    """Settings of a :class:`MicroBatcher`.

    Defaults follow OpenAI's embeddings endpoint: at most 2048 inputs and 300,000 tokens per request.
    """

    enabled: bool = True
    #: items per upstream call (OpenAI embeddings: 2048 inputs)
    max_items: int = Field(default=2048, ge=1)
    #: total cost per upstream call, in the unit of the ``cost`` function (e.g. tokens); ``None``: no cap
    max_cost: float | None = Field(default=300_000, gt=0)
    #: seconds a batch waits for more items after its first one
    max_wait: float = Field(default=0.005, ge=0)
    #: batches of one batcher sent at once; further closed batches wait for a slot
    max_in_flight: int = Field(default=8, ge=1)


class SemanticCachePolicy(_Section):
    """The semantic response cache (opt-in): reuse a cached chat answer for a prompt that *means* the same.

    A new prompt's embedding is compared with the cached prompts' embeddings of the same model, parameters and
    scope; the nearest within ``max_distance`` (cosine distance, ``1 - cos θ``) is served, marked as a semantic
    hit. Unsafe when answers depend on exact wording (numbers, names, negations: "can I" vs "can't I"), so it
    is off by default and its threshold is strict.

    Attributes:
        enabled: use it (``False`` by default).
        max_distance: largest cosine distance counted as the same prompt (``(0, 1]``; 0.05 ≈ near-paraphrases).
        embedding_model: the embeddings model the prompts are embedded with (through the guarded client, so the
            embedding cache and the rate limits apply).
        max_entries: most prompts the in-process index keeps per model and parameter set (oldest dropped first).
    """

    enabled: bool = False
    max_distance: float = Field(default=0.05, gt=0, le=1)
    embedding_model: str = Field(default="text-embedding-3-small", min_length=1)
    max_entries: int = Field(default=2_000, ge=1)


class CachePolicy(_Section):
    """Settings of a :class:`Cache`, and of the cache layers of a guarded client.

    Attributes:
        enabled: whether caches are used at all (``False``: every call passes through).
        ttl: seconds an entry lives (``> 0``); ``None``: no expiry (still bounded by LRU eviction).
        max_entries: most entries the in-memory store holds (``>= 1``).
        max_bytes: most bytes of serialised values the in-memory store holds (``>= 1``; default 64 MiB).
        namespace: the first part of every key (non-empty); :meth:`Cache.invalidate` clears one at once.
        scope: an app-supplied tenant id added to every key, so tenants never share entries.
        embeddings: guarded clients cache embeddings per input (key: model, dimensions, encoding, sha256 of the
            text, credential fingerprint, scope), so a request whose inputs are partly cached sends only the rest.
        responses: guarded clients' exact-match cache of chat completions and responses: ``"deterministic"``
            (default) caches only requests with ``temperature == 0``; ``"all"`` caches any non-streamed request
            (a repeated prompt then gets the same sample); ``"off"`` never. Streams and errors are never cached.
        semantic: the opt-in semantic cache, see :class:`SemanticCachePolicy`.
    """

    enabled: bool = True
    ttl: float | None = Field(default=3600.0, gt=0)
    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 2**20, ge=1)
    namespace: str = Field(default="ragguard", min_length=1)
    scope: str | None = None
    embeddings: bool = True
    responses: Literal["deterministic", "all", "off"] = "deterministic"
    semantic: SemanticCachePolicy = SemanticCachePolicy()


class CoalescePolicy(_Section):
    """Request coalescing (single-flight) settings.

    Attributes:
        enabled: ``False`` turns coalescing off (every call runs on its own).
        max_keys: most keys tracked in flight at once (``>= 1``); a call with a new key beyond it runs
            uncoalesced, so a flood of distinct keys cannot grow the map without bound.
        embeddings: guarded clients share one upstream call among identical concurrent ``embeddings.create``
            requests (same credential, same arguments).
        completions: guarded clients do the same for chat completions and responses, for deterministic requests
            only (``temperature == 0``) or those given a key with :func:`ragguard.call_options`. Off by default:
            identical concurrent prompts then get one shared answer. (With the response cache on, a miss for a
            request being fetched already waits for that fetch anyway: stampede protection.)
    """

    enabled: bool = True
    max_keys: int = Field(default=100_000, ge=1)
    embeddings: bool = True
    completions: bool = False


# --- serialisation -------------------------------------------------------------------------------------------


class Policy(BaseSettings):
    """Everything a guarded client or decorator needs, validated, loadable from ``RAGGUARD_*`` variables.

    Example::

        policy = ragguard.Policy(rate_limit={"rpm": 3_000, "tpm": 250_000}, retry={"attempts": 6})
        client = ragguard.guard(AsyncOpenAI(), policy)
    """

    model_config = SettingsConfigDict(
        env_prefix="RAGGUARD_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    retry: RetryPolicy = RetryPolicy()
    retry_budget: RetryBudgetPolicy = RetryBudgetPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    rate_limit: RateLimitPolicy = RateLimitPolicy()
    concurrency: ConcurrencyPolicy = ConcurrencyPolicy()
    timeout: TimeoutPolicy = TimeoutPolicy()
    #: micro-batching of concurrent callers' embeddings inputs. Opt-in: in the demo it cuts upstream requests
    #: from 1,430 to 716 with no 429, but every user's next call waits for the big batch, so wall time rises
    #: from ≈ 3.9 s to ≈ 4.6 s.
    batching: BatchingPolicy = BatchingPolicy(enabled=False)
    cache: CachePolicy = CachePolicy()
    coalesce: CoalescePolicy = CoalescePolicy()
