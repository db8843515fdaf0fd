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

from ._clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock, is_testing, set_testing
from ._context import CallContext
from ._hints import parse_duration, parse_rate_limit_headers, parse_retry_after, retry_hint_from_headers
from ._outcome import Classifier, Outcome, classify_exception
from .config import BreakerPolicy, ConcurrencyPolicy, Policy, RateLimitPolicy, RetryPolicy, TimeoutPolicy
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
from .guards.pipeline import Guard, Pipeline

# --- guards (each helper uncomments its own line when its module lands) ---
# from .guards.retry import Retry
# from .guards.breaker import CircuitBreaker, BreakerState
# from .guards.bulkhead import ConcurrencyLimit
# from .guards.timeout import Deadline, Timeout
# from .guards.limiter import RateLimiter

__version__ = "0.1.0"
