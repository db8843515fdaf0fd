"""ragguard: production hygiene for RAG code — retries, circuit breakers, rate limits, bulkheads and more,
wrapped around any LLM or vector-store client.

Three ways in::

    import ragguard
    client = ragguard.guard(AsyncOpenAI())          # 1. wrap a client, use it as before

    @ragguard.retry(attempts=5)                     # 2. decorate your own functions
    async def search(query: str) -> list[str]: ...

    pipeline = ragguard.Pipeline(ragguard.Retry(), ragguard.CircuitBreaker("search"))   # 3. compose primitives
"""

from __future__ import annotations

from . import events, telemetry, usage
from ._call_options import CallOptions, call_options
from ._clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock, is_testing, set_testing
from ._context import CallContext
from ._guard import guard
from ._health import BackendHealth, BreakerHealth, BulkheadHealth, HealthReport, LimiterHealth, ahealth, health
from ._hints import (
    RateLimitHeaders,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    retry_hint_from_headers,
)
from ._outcome import Classifier, Outcome, classify_exception
from ._tokens import TokenEstimator, default_estimator, heuristic_estimator, tiktoken_estimator
from .backends.base import Backend, SharedBackend
from .backends.memory import MemoryBackend, default_backend
from .backends.redis import RedisBackend, RedisBackendOptions
from .config import (
    AdaptiveConcurrencyPolicy,
    BatchingPolicy,
    BreakerPolicy,
    CachePolicy,
    CoalescePolicy,
    ConcurrencyPolicy,
    DegradePolicy,
    HedgePolicy,
    JitterKind,
    Policy,
    RateLimitPolicy,
    RetryBudgetPolicy,
    RetryPolicy,
    SemanticCachePolicy,
    TimeoutPolicy,
)
from .decorators import circuit_breaker, concurrency_limit, guarded, rate_limit, retry, timeout
from .degrade import DEGRADED_FINGERPRINT, Degradation, last_degradation
from .errors import (
    AttemptTimeout,
    BackendUnavailable,
    BulkheadFull,
    CircuitOpenError,
    ConfigError,
    DeadlineExceeded,
    Degraded,
    RagGuardError,
    RateLimitTimeout,
    RetryExhausted,
    StreamInterrupted,
)
from .guards.batch import BatchItemTooLarge, MicroBatcher, batched
from .guards.breaker import BreakerSnapshot, BreakerState, CircuitBreaker
from .guards.budget import BudgetStore, RetryBudget, RetryBudgetExhausted, RetryBudgetStats, SharedRetryBudget
from .guards.bulkhead import ConcurrencyLimit
from .guards.cache import (
    AsyncCacheStore,
    Cache,
    CacheStore,
    JsonSerializer,
    MemoryCacheStore,
    MsgpackSerializer,
    Serializer,
    cache_key,
    cached,
    fingerprint,
    retrieval_cache_key,
    vector_digest,
)
from .guards.coalesce import Coalescer, coalesce
from .guards.concurrency_limits import AIMDLimit, GradientLimit, LimitAlgorithm
from .guards.fallback import (
    Fallback,
    FallbackExhausted,
    FallbackResult,
    FallbackStats,
    capture_fallback,
    fallback,
    should_fall_back,
)
from .guards.hedge import Hedge, HedgeStats
from .guards.limiter import RateLimiter
from .guards.pipeline import STAGES, Guard, GuardBase, Pipeline
from .guards.retry import Retry, RetryEvent, backoff_delays
from .guards.semantic import InMemoryVectorIndex, VectorIndex, cosine_distance
from .guards.shared_breaker import BreakerStore, SharedCircuitBreaker
from .guards.shared_limiter import BucketStore, SharedRateLimiter
from .guards.timeout import Deadline, Timeout
from .providers.pinecone import UpsertIncomplete, stable_id

__version__ = "0.1.0"

__all__ = [
    "DEGRADED_FINGERPRINT",
    "STAGES",
    "SYSTEM_CLOCK",
    "AIMDLimit",
    "AdaptiveConcurrencyPolicy",
    "AsyncCacheStore",
    "AttemptTimeout",
    "Backend",
    "BackendHealth",
    "BackendUnavailable",
    "BatchItemTooLarge",
    "BatchingPolicy",
    "BreakerHealth",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStore",
    "BucketStore",
    "BudgetStore",
    "BulkheadFull",
    "BulkheadHealth",
    "Cache",
    "CachePolicy",
    "CacheStore",
    "CallContext",
    "CallOptions",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classifier",
    "Clock",
    "CoalescePolicy",
    "Coalescer",
    "ConcurrencyLimit",
    "ConcurrencyPolicy",
    "ConfigError",
    "Deadline",
    "DeadlineExceeded",
    "Degradation",
    "DegradePolicy",
    "Degraded",
    "Fallback",
    "FallbackExhausted",
    "FallbackResult",
    "FallbackStats",
    "GradientLimit",
    "Guard",
    "GuardBase",
    "HealthReport",
    "Hedge",
    "HedgePolicy",
    "HedgeStats",
    "InMemoryVectorIndex",
    "JitterKind",
    "JsonSerializer",
    "LimitAlgorithm",
    "LimiterHealth",
    "ManualClock",
    "MemoryBackend",
    "MemoryCacheStore",
    "MicroBatcher",
    "MsgpackSerializer",
    "Outcome",
    "Pipeline",
    "Policy",
    "RagGuardError",
    "RateLimitHeaders",
    "RateLimitPolicy",
    "RateLimitTimeout",
    "RateLimiter",
    "RedisBackend",
    "RedisBackendOptions",
    "Retry",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryBudgetPolicy",
    "RetryBudgetStats",
    "RetryEvent",
    "RetryExhausted",
    "RetryPolicy",
    "SemanticCachePolicy",
    "Serializer",
    "SharedBackend",
    "SharedCircuitBreaker",
    "SharedRateLimiter",
    "SharedRetryBudget",
    "StreamInterrupted",
    "SystemClock",
    "Timeout",
    "TimeoutPolicy",
    "TokenEstimator",
    "UpsertIncomplete",
    "VectorIndex",
    "__version__",
    "ahealth",
    "backoff_delays",
    "batched",
    "cache_key",
    "cached",
    "call_options",
    "capture_fallback",
    "circuit_breaker",
    "classify_exception",
    "coalesce",
    "concurrency_limit",
    "cosine_distance",
    "default_backend",
    "default_estimator",
    "events",
    "fallback",
    "fingerprint",
    "guard",
    "guarded",
    "health",
    "heuristic_estimator",
    "is_testing",
    "last_degradation",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "rate_limit",
    "retrieval_cache_key",
    "retry",
    "retry_hint_from_headers",
    "set_testing",
    "should_fall_back",
    "stable_id",
    "telemetry",
    "tiktoken_estimator",
    "timeout",
    "usage",
    "vector_digest",
]
