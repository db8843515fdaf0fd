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

from ._call_options import CallOptions, call_options
from ._clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock, is_testing, set_testing
from ._context import CallContext
from ._guard import guard
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
    BatchingPolicy,
    BreakerPolicy,
    CachePolicy,
    CoalescePolicy,
    ConcurrencyPolicy,
    JitterKind,
    Policy,
    RateLimitPolicy,
    RetryBudgetPolicy,
    RetryPolicy,
    SemanticCachePolicy,
    TimeoutPolicy,
)
from .decorators import circuit_breaker, concurrency_limit, guarded, rate_limit, retry, timeout
from .errors import (
    AttemptTimeout,
    BackendUnavailable,
    BulkheadFull,
    CircuitOpenError,
    ConfigError,
    DeadlineExceeded,
    RagGuardError,
    RateLimitTimeout,
    RetryExhausted,
    StreamInterrupted,
)
from .guards.batch import BatchItemTooLarge, MicroBatcher, batched
from .guards.breaker import BreakerSnapshot, BreakerState, CircuitBreaker
from .guards.budget import RetryBudget, RetryBudgetExhausted, RetryBudgetStats
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
from .guards.limiter import RateLimiter
from .guards.pipeline import STAGES, Guard, GuardBase, Pipeline
from .guards.retry import Retry, RetryEvent, backoff_delays
from .guards.semantic import InMemoryVectorIndex, VectorIndex, cosine_distance
from .guards.shared_breaker import BreakerStore, SharedCircuitBreaker
from .guards.shared_limiter import BucketStore, SharedRateLimiter
from .guards.timeout import Deadline, Timeout
from .health import HealthReport, ahealth, health
from .providers.pinecone import UpsertIncomplete, stable_id

__version__ = "0.1.0"

__all__ = [
    "STAGES",
    "SYSTEM_CLOCK",
    "AsyncCacheStore",
    "AttemptTimeout",
    "Backend",
    "BackendUnavailable",
    "BatchItemTooLarge",
    "BatchingPolicy",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStore",
    "BucketStore",
    "BulkheadFull",
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
    "Guard",
    "GuardBase",
    "HealthReport",
    "InMemoryVectorIndex",
    "JitterKind",
    "JsonSerializer",
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
    "circuit_breaker",
    "classify_exception",
    "coalesce",
    "concurrency_limit",
    "cosine_distance",
    "default_backend",
    "default_estimator",
    "fingerprint",
    "guard",
    "guarded",
    "health",
    "heuristic_estimator",
    "is_testing",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "rate_limit",
    "retrieval_cache_key",
    "retry",
    "retry_hint_from_headers",
    "set_testing",
    "stable_id",
    "tiktoken_estimator",
    "timeout",
    "vector_digest",
]
