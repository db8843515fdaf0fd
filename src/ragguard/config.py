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
    "AdaptiveConcurrencyPolicy",
    "BatchingPolicy",
    "BreakerPolicy",
    "CachePolicy",
    "CoalescePolicy",
    "ConcurrencyPolicy",
    "DegradePolicy",
    "HedgePolicy",
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
    """A circuit breaker (closed → open → half-open), after resilience4j's count-based sliding window, with a
    size-aware slow-call rate (see :mod:`ragguard.guards.breaker`: per output token for completions, time to first
    token for streams, raw latency otherwise; all slow-call rules off by default)."""

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
    #: slow-call rule for calls of unknown size (embeddings, searches, any function): slower than this many
    #: seconds is slow (``None``: no raw-latency rule)
    slow_call_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: slow-call rule for completions whose output size is known: slower than ``slow_first_token_s`` (or 0)
    #: plus this many seconds per output token is slow (``None``: no per-token rule)
    slow_call_s_per_token: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: streams: a first chunk later than this many seconds is slow; also the fixed part of the per-token rule
    slow_first_token_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: share (0-1] of slow calls over the window (at least ``min_calls`` calls) that opens the breaker
    slow_call_rate: float = Field(default=1.0, gt=0, le=1)

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
    #: follow the provider's ``x-ratelimit-*`` headers: lower the levels to ``remaining``, cap the rate to
    #: ``limit``, back off on 429s that carry them (never above the configured quota)
    follow_headers: bool = True
    #: when the provider says "wait N s" on a 429, pause every caller of the bucket
    share_retry_after: bool = True
    #: longest the limiter waits for capacity, seconds (``None``: until the call's deadline)
    max_wait: float | None = Field(default=None, ge=0)
    #: shared backends only (:class:`~ragguard.RedisBackend`): lease mode, requests taken per round trip and
    #: spent locally (``None``: strict, one round trip per call). Over any window the instances together may
    #: exceed the quota by at most ``lease × instances`` requests (see :class:`~ragguard.SharedRateLimiter`).
    lease: int | None = Field(default=None, ge=1)


class AdaptiveConcurrencyPolicy(_Section):
    """An adaptive concurrency limit (Netflix concurrency-limits): the bulkhead's limit moves within
    ``[min_limit, max_limit]`` as calls report success (with their latency), drops (429, timeout, 503: shrink)
    or nothing useful (a 400: ignored). See :mod:`ragguard.guards.concurrency_limits`.

    Attributes:
        algorithm: ``aimd`` (additive increase, multiplicative decrease) or ``gradient`` (Gradient2: shrink as
            latency inflates over its long-term average).
        min_limit: the floor, calls (``>= 1``).
        max_limit: the ceiling, calls (``None``: the section's ``max_in_flight``; never above it).
        initial_limit: the limit before any sample (``None``: the ceiling, where a fixed bulkhead would be).
        backoff_ratio: the limit is multiplied by this on a drop, once per round, in ``[0.5, 1)``.
        timeout_s: ``aimd`` only: a success slower than this many seconds counts as a drop (``None``: never).
        smoothing: ``gradient`` only: weight of each new estimate, in ``(0, 1]``.
        rtt_tolerance: ``gradient`` only: latency may exceed its long-term average by this factor (``>= 1``)
            before the limit shrinks.
        queue_size: ``gradient`` only: calls allowed to queue at the provider, the growth allowance.
        long_window: ``gradient`` only: samples the long-term latency average spans.
    """

    algorithm: Literal["aimd", "gradient"] = "aimd"
    min_limit: int = Field(default=1, ge=1)
    max_limit: int | None = Field(default=None, ge=1)
    initial_limit: int | None = Field(default=None, ge=1)
    backoff_ratio: float = Field(default=0.9, ge=0.5, lt=1)
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    smoothing: float = Field(default=0.2, gt=0, le=1)
    rtt_tolerance: float = Field(default=1.5, ge=1, allow_inf_nan=False)
    queue_size: int = Field(default=4, ge=0)
    long_window: int = Field(default=600, ge=1)

    @field_validator("max_limit")
    @classmethod
    def _max_not_below_min(cls, max_limit: int | None, info: ValidationInfo) -> int | None:
        min_limit = info.data.get("min_limit")
        if max_limit is not None and min_limit is not None and max_limit < min_limit:
            raise ValueError(f"max_limit ({max_limit}) must be >= min_limit ({min_limit})")
        return max_limit

    @field_validator("initial_limit")
    @classmethod
    def _initial_within_bounds(cls, initial: int | None, info: ValidationInfo) -> int | None:
        low, high = info.data.get("min_limit"), info.data.get("max_limit")
        if initial is not None and ((low is not None and initial < low) or (high is not None and initial > high)):
            raise ValueError(f"initial_limit ({initial}) must lie within [min_limit, max_limit]")
        return initial


class ConcurrencyPolicy(_Section):
    """A bulkhead: at most ``max_in_flight`` calls at once, a bounded queue for the rest."""

    enabled: bool = True
    max_in_flight: int = Field(default=64, ge=1)
    #: callers allowed to wait for a slot; more are refused with BulkheadFull
    max_queue: int = Field(default=10_000, ge=0)
    #: longest wait for a slot, seconds (``None``: until the call's deadline)
    max_wait: float | None = Field(default=None, ge=0)
    #: adapt the limit to the provider's answers within ``[adaptive.min_limit, max_in_flight]`` (``None``: fixed)
    adaptive: AdaptiveConcurrencyPolicy | None = None

    @field_validator("adaptive")
    @classmethod
    def _adaptive_within_max(
        cls, adaptive: AdaptiveConcurrencyPolicy | None, info: ValidationInfo
    ) -> AdaptiveConcurrencyPolicy | None:
        ceiling = info.data.get("max_in_flight")
        if adaptive is not None and ceiling is not None:
            for name in ("min_limit", "max_limit", "initial_limit"):
                value = getattr(adaptive, name)
                if value is not None and value > ceiling:
                    raise ValueError(f"adaptive.{name} ({value}) must be <= max_in_flight ({ceiling})")
        return adaptive


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

    @field_validator("namespace", "scope")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        if value is not None:
            value.encode()  # a lone surrogate cannot be keyed: UnicodeEncodeError (a ValueError) names the field
        return value


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


class HedgePolicy(_Section):
    """Hedged requests (opt-in): when an attempt is slow, send another and keep whichever answers first.

    After "The Tail at Scale" (Dean & Barroso, CACM 2013: defer the backup request until the first has been
    outstanding longer than the 95th-percentile latency, which limits the extra load to about 5 %; in their
    BigTable test a 10 ms delay cut the 99.9th percentile from 1,800 ms to 74 ms for 2 % more requests) and
    Polly v8's hedging strategy.
    Only for idempotent reads (embeddings, vector queries): a hedged write may be applied twice. Every hedge is
    a retry in the retry budget's eyes (:class:`~ragguard.guards.budget.RetryBudget`), so the extra load stays
    within ``ratio`` × requests (+ the floor); guarded clients hedge embeddings and Pinecone query/fetch only.

    Attributes:
        enabled: hedge at all (``False`` by default).
        delay: seconds to wait before a hedge, when ``percentile`` is ``None``; with a percentile, the delay used
            until ``min_samples`` latencies are known (``None``: no hedging until then). ``>= 0``.
        percentile: hedge after this percentile (``(0, 100)``) of the last ``window`` attempts' latencies
            (``None``: always ``delay``).
        window: how many recent latencies the percentile is taken over (``>= 1``).
        min_samples: latencies needed before the percentile is used (``1..window``).
        max_hedges: extra attempts per call at most (``1..10``), sent ``delay`` apart.
        min_delay: floor of a percentile delay, seconds (``>= 0``).
        max_delay: cap of a percentile delay, seconds (``None``: none; ``>= min_delay``).
    """

    enabled: bool = False
    delay: float | None = Field(default=None, ge=0, le=3600)
    percentile: float | None = Field(default=90.0, gt=0, lt=100)
    window: int = Field(default=200, ge=1, le=100_000)
    min_samples: int = Field(default=20, ge=1)
    max_hedges: int = Field(default=1, ge=1, le=10)
    min_delay: float = Field(default=0.0, ge=0, le=3600)
    max_delay: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("percentile")
    @classmethod
    def _some_delay(cls, percentile: float | None, info: ValidationInfo) -> float | None:
        if percentile is None and info.data.get("delay") is None and "delay" in info.data:
            raise ValueError("set a fixed delay (seconds) or a latency percentile: both are None")
        return percentile

    @field_validator("min_samples")
    @classmethod
    def _min_samples_fit_window(cls, min_samples: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) must be <= window ({window})")
        return min_samples

    @field_validator("max_delay")
    @classmethod
    def _max_delay_not_below_min(cls, max_delay: float | None, info: ValidationInfo) -> float | None:
        floor = info.data.get("min_delay")
        if max_delay is not None and floor is not None and max_delay < floor:
            raise ValueError(f"max_delay ({max_delay} s) must be >= min_delay ({floor} s)")
        return max_delay


class DegradePolicy(_Section):
    """Degradation modes: degrade a call instead of failing (or queueing) it while its pipeline is in trouble.

    Off by default (no mode set). A call is *degraded* when its trigger (``when``) holds for the pipeline the
    call would use: ``breaker_open`` — that pipeline's circuit breaker is open, or refuses the call (half-open
    with its probes taken; a shared breaker's refusal); ``overloaded`` — the pipeline's bulkhead queue or its
    rate limiter's wait is beyond the thresholds below. What a degraded call does (each mode applies where it
    means something; see ``docs/degradation.md``):

    - ``cache_only``: served from the cache layers only, never upstream; a miss raises
      :class:`~ragguard.Degraded`.
    - ``top_k``: a guarded vector-store ``query`` asks for at most this many matches (never more than asked).
    - ``skip_generation``: a chat completion or response is not generated: it returns the retrieved context the
      app supplied with ``ragguard.call_options(context=...)``, marked degraded, or raises
      :class:`~ragguard.Degraded` when none was supplied.

    Attributes:
        when: the trigger: ``breaker_open``, ``overloaded`` or ``breaker_open_or_overloaded``.
        max_queue: ``overloaded`` when a call would wait for a concurrency slot behind more than this many
            callers (``0``: whenever every slot is taken); ``None``: the queue is not a trigger.
        max_limiter_wait: ``overloaded`` when the (local) rate limiter would hold the call longer than this,
            seconds (requests and tokens buckets, and a provider-requested pause); ``None``: not a trigger.
        cache_only: serve degraded calls from the cache only.
        top_k: the reduced ``top_k`` of degraded vector-store queries (``>= 1``); ``None``: unchanged.
        skip_generation: answer degraded chat completions and responses with the supplied context.
    """

    max_queue: int | None = Field(default=None, ge=0)
    max_limiter_wait: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_only: bool = False
    top_k: int | None = Field(default=None, ge=1)
    skip_generation: bool = False
    # last, so its check sees the thresholds above
    when: Literal["breaker_open", "overloaded", "breaker_open_or_overloaded"] = "breaker_open"

    @field_validator("when")
    @classmethod
    def _overload_needs_a_threshold(cls, when: str, info: ValidationInfo) -> str:
        if when != "breaker_open" and info.data.get("max_queue") is None and info.data.get("max_limiter_wait") is None:
            raise ValueError(f"when={when!r} needs a threshold: max_queue or max_limiter_wait")
        return when

    @property
    def enabled(self) -> bool:
        """Whether any mode is set (degradation is off otherwise)."""
        return self.cache_only or self.top_k is not None or self.skip_generation


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
    #: hedged requests for idempotent reads (opt-in; guarded clients hedge embeddings and Pinecone query/fetch)
    hedge: HedgePolicy = HedgePolicy()
    #: degradation modes (cache only, reduced ``top_k``, skip generation) under an open breaker or load; off
    degrade: DegradePolicy = DegradePolicy()
