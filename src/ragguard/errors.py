"""The ragguard exception tree.

Every error ragguard raises itself derives from :class:`RagGuardError`, so one ``except`` clause catches them
all. Provider errors that ragguard does not retry (a 400, a 401, an ``insufficient_quota`` 429…) are re-raised
unchanged: ragguard only wraps an error when it adds information (why it gave up, what it waited for).

::

    RagGuardError
    ├── CircuitOpenError        the circuit breaker is open (or its half-open probes are taken)
    ├── RateLimitTimeout        the rate limiter could not admit the call before its deadline
    ├── BulkheadFull            the concurrency limit's queue is full or its wait ran out
    ├── DeadlineExceeded        the call's total deadline passed
    │   └── AttemptTimeout      one attempt ran longer than the per-attempt timeout (retryable)
    ├── RetryExhausted          retries gave up; ``__cause__`` is the last provider error
    │   └── RetryBudgetExhausted  the retry budget refused a retry (guards/budget.py)
    ├── StreamInterrupted       a streamed response broke after its first chunk; ``__cause__`` is why
    ├── BackendUnavailable      the shared-state backend (e.g. Redis) cannot be reached
    ├── Degraded                a degraded call (``Policy.degrade``) had nothing to answer with
    ├── FallbackExhausted       the primary and every alternative failed; ``__cause__`` is the primary's error
    └── ConfigError             configuration pydantic's own ``ValidationError`` cannot express
"""

from __future__ import annotations

__all__ = [
    "AttemptTimeout",
    "BackendUnavailable",
    "BulkheadFull",
    "CircuitOpenError",
    "ConfigError",
    "DeadlineExceeded",
    "Degraded",
    "RagGuardError",
    "RateLimitTimeout",
    "RetryExhausted",
    "StreamInterrupted",
]


class RagGuardError(Exception):
    """Base class of every error ragguard raises itself."""


class CircuitOpenError(RagGuardError):
    """The circuit breaker refused the call without calling the provider.

    Attributes:
        name: the breaker's name.
        retry_at: the breaker clock's time (seconds) at which it will next admit a probe.
        retry_after: seconds from when the error was raised until then (``>= 0``).
    """

    def __init__(self, name: str, retry_at: float, retry_after: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; next probe in {retry_after:.3f} s")
        self.name = name
        self.retry_at = retry_at
        self.retry_after = max(0.0, retry_after)


class RateLimitTimeout(RagGuardError):
    """The rate limiter would have had to wait longer than the call's remaining deadline.

    Attributes:
        wait: seconds the limiter would have needed before admitting the call.
        remaining: seconds that were left before the deadline.
    """

    def __init__(self, message: str, *, wait: float, remaining: float) -> None:
        super().__init__(message)
        self.wait = wait
        self.remaining = remaining


class BulkheadFull(RagGuardError):
    """The concurrency limit (bulkhead) refused the call: its wait queue was full or the wait ran out."""


class DeadlineExceeded(RagGuardError):
    """The call's total deadline passed before it finished.

    Attributes:
        timeout: the deadline's length in seconds, when known.
    """

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class AttemptTimeout(DeadlineExceeded):
    """One attempt ran longer than the per-attempt timeout. Retryable: the next attempt may be faster."""


class RetryExhausted(RagGuardError):
    """Retries gave up. ``__cause__`` (and :attr:`last_error`) is the last error seen.

    Attributes:
        attempts: how many attempts were made.
        last_error: the last attempt's error.
    """

    def __init__(self, message: str, *, attempts: int, last_error: BaseException) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class StreamInterrupted(RagGuardError):
    """A streamed response failed after its first chunk was delivered, so it cannot be retried transparently.

    ``__cause__`` is the underlying error, whichever HTTP library raised it.
    """


class BackendUnavailable(RagGuardError):
    """The shared-state backend could not be reached and the policy says ``fail_closed``."""


class Degraded(RagGuardError):
    """A call was degraded (see :class:`~ragguard.DegradePolicy`) and its mode had nothing to answer with: a
    cache miss under ``cache_only``, no context supplied under ``skip_generation``, or a streamed call. The
    provider was not called. When the trigger was the breaker's refusal, ``__cause__`` is the
    :class:`CircuitOpenError`.

    Attributes:
        mode: the mode that could not answer: ``cache_only`` or ``skip_generation``.
        reason: why the call was degraded: ``breaker_open`` or ``overloaded``.
    """

    def __init__(self, message: str, *, mode: str, reason: str) -> None:
        super().__init__(message)
        self.mode = mode
        self.reason = reason


class ConfigError(RagGuardError, ValueError):
    """Invalid configuration that a pydantic ``ValidationError`` cannot express (e.g. an unknown client type)."""
