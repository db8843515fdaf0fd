"""Per-call state that travels down a pipeline: one :class:`CallContext` per logical call, never shared."""

from __future__ import annotations

import math
from typing import Any

from ._clock import SYSTEM_CLOCK, Clock
from ._hints import RateLimitHeaders
from ._outcome import Classifier, classify_exception

__all__ = ["CallContext"]

_INF = math.inf


class CallContext:
    """What the guards of one logical call share. Created per call (tenacity#93: shared retry state corrupts
    concurrent calls), filled by the guards and by the provider's attempt function.

    Attributes:
        clock: the clock deadlines are measured on.
        classify: turns an attempt's exception into an :class:`~ragguard.Outcome`.
        deadline: absolute ``clock`` time (seconds) by which the call must end; ``math.inf`` when none.
        requests: how many requests the call costs against a requests-per-minute bucket (usually 1).
        tokens: the estimated token cost charged at admission against a tokens-per-minute bucket.
        attempt: the current attempt number, from 1 (set by :class:`~ragguard.Retry`).
        used_tokens: tokens the provider says the call really used (from ``usage``), set after a success.
        output_tokens: tokens the provider generated for the last attempt (``usage.completion_tokens`` /
            ``output_tokens``), set by the provider layer after a success; ``None`` when unknown (embeddings,
            streams before their end, other calls). Circuit breakers judge slowness per output token with it.
        first_token_s: seconds from sending the last attempt to its first streamed chunk, set by the provider
            layer for streams; ``None`` otherwise.
        attempt_s: seconds the last attempt's provider call took (to its response, or a stream's first chunk),
            set by the provider layer; ``None`` when unknown. Unlike a time measured by an outer guard it leaves
            out rate-limit waits and bulkhead queueing.
        rate_headers: the provider's rate-limit view from the last response, set by the provider layer.
        operation: a label for telemetry and errors (e.g. ``"embeddings"``).
        extras: free-form per-call data for custom guards.
    """

    __slots__ = (
        "attempt",
        "attempt_s",
        "classify",
        "clock",
        "deadline",
        "extras",
        "first_token_s",
        "operation",
        "output_tokens",
        "rate_headers",
        "requests",
        "tokens",
        "used_tokens",
    )

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        classify: Classifier = classify_exception,
        deadline: float = math.inf,
        requests: float = 1.0,
        tokens: float = 0.0,
        operation: str = "call",
    ) -> None:
        self.clock = clock
        self.classify = classify
        self.deadline = deadline
        self.requests = requests
        self.tokens = tokens
        self.operation = operation
        self.attempt = 1
        self.used_tokens: float | None = None
        self.output_tokens: float | None = None
        self.first_token_s: float | None = None
        self.attempt_s: float | None = None
        self.rate_headers: RateLimitHeaders | None = None
        self.extras: dict[str, Any] | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (``math.inf`` when there is none; may be negative)."""
        deadline = self.deadline
        if deadline == _INF:
            return _INF
        return deadline - self.clock.now()


_new = object.__new__


def fresh_context(clock: Clock, classify: Classifier, requests: float, tokens: float, operation: str) -> CallContext:
    """``CallContext(clock=…, classify=…, requests=…, tokens=…, operation=…)``, made faster (no deadline).

    Calling a class with keyword arguments packs them into a dict for ``__init__`` (about 0.2 µs of the 0.55 µs
    such a call costs); this positional function sets the same slots to the same values as ``__init__`` does
    (a test compares every slot), for :meth:`ragguard.Pipeline.context` on every call.
    """
    ctx: CallContext = _new(CallContext)
    ctx.clock = clock
    ctx.classify = classify
    ctx.deadline = _INF
    ctx.requests = requests
    ctx.tokens = tokens
    ctx.operation = operation
    ctx.attempt = 1
    ctx.used_tokens = None
    ctx.output_tokens = None
    ctx.first_token_s = None
    ctx.attempt_s = None
    ctx.rate_headers = None
    ctx.extras = None
    return ctx
