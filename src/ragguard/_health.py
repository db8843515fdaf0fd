"""``ragguard.health()``: liveness and readiness data for a ``/health`` or ``/ready`` endpoint.

It reads the guards a backend holds (every guarded client and decorator built on that backend registers its
breakers, limiters and bulkheads there): each circuit breaker's state, each rate limiter's headroom, each
bulkhead's queue depth, and, for a shared backend, whether Redis answers and how fast. Nothing here calls a
provider.

Example (Starlette / FastAPI)::

    @app.get("/ready")
    async def ready() -> JSONResponse:
        report = await ragguard.ahealth(backends=[redis_backend])
        return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.ready else 503)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from ._sync import run_sync
from .backends.base import Backend, SharedBackend
from .backends.memory import default_backend
from .guards.breaker import BreakerState, CircuitBreaker
from .guards.bulkhead import ConcurrencyLimit
from .guards.limiter import RateLimiter
from .usage import UsageReport
from .usage import report as usage_report

__all__ = ["BackendHealth", "BreakerHealth", "BulkheadHealth", "HealthReport", "LimiterHealth", "ahealth", "health"]


class BreakerHealth(BaseModel):
    """One circuit breaker: ``closed`` (calls flow), ``open`` (calls refused until ``retry_after_s``) or
    ``half_open`` (probing)."""

    name: str
    state: Literal["closed", "open", "half_open"]
    shared: bool = Field(description="state kept in a shared backend (every instance sees the same)")
    failure_rate: float | None = None
    consecutive_failures: int | None = None
    retry_after_s: float | None = Field(default=None, description="seconds until an open breaker admits a probe")


class LimiterHealth(BaseModel):
    """One rate limiter's headroom: requests and tokens it could admit now (``None``: no such limit, or kept
    in a shared backend)."""

    name: str
    shared: bool
    rpm: float | None
    tpm: float | None
    available_requests: float | None = None
    available_tokens: float | None = None
    paused_s: float = Field(default=0.0, description="seconds left of a provider-requested pause (Retry-After)")
    effective_rpm: float | None = Field(
        default=None, description="the rate in force: the configured rpm capped by the provider's and backed off"
    )
    effective_tpm: float | None = None
    provider_rpm: float | None = Field(default=None, description="the provider's x-ratelimit-limit-requests")
    provider_tpm: float | None = None
    backoff: float | None = Field(default=None, description="the 429 backoff factor in force (1.0: none)")


class BulkheadHealth(BaseModel):
    """One concurrency limit: calls running and callers queued for a slot."""

    name: str
    in_flight: int
    max_in_flight: int
    queued: int
    limit: int | None = Field(
        default=None, description="the current limit of an adaptive bulkhead (between its min and max_in_flight)"
    )


class BackendHealth(BaseModel):
    """A backend: reachable or not, and the round trip of one ``PING`` (seconds) for a shared one."""

    kind: str
    reachable: bool
    latency_s: float | None = None
    error: str | None = None


class HealthReport(BaseModel):
    """Liveness and readiness, JSON-serialisable (``report.model_dump(mode="json")``).

    ``live`` is always true when the process can answer. ``ready`` is false when a breaker is open or a shared
    backend is unreachable with ``on_unavailable="fail_closed"`` (calls would fail); ``status`` is ``ok``,
    ``degraded`` (something is open, half-open, paused or unreachable but calls still flow) or ``down``.
    """

    status: Literal["ok", "degraded", "down"]
    live: bool = True
    ready: bool
    breakers: list[BreakerHealth] = Field(default_factory=list)
    limiters: list[LimiterHealth] = Field(default_factory=list)
    bulkheads: list[BulkheadHealth] = Field(default_factory=list)
    backends: list[BackendHealth] = Field(default_factory=list)
    usage: UsageReport = Field(
        default_factory=UsageReport, description="tokens, retries and cost per model and credential (ragguard.usage)"
    )


_STATES: dict[BreakerState, Literal["closed", "open", "half_open"]] = {
    BreakerState.CLOSED: "closed",
    BreakerState.OPEN: "open",
    BreakerState.HALF_OPEN: "half_open",
}


def _state(state: BreakerState) -> Literal["closed", "open", "half_open"]:
    return _STATES[state]


async def _breakers(backend: Backend) -> list[BreakerHealth]:
    found: list[BreakerHealth] = []
    for _, breaker in backend.items("breaker"):
        if isinstance(breaker, CircuitBreaker):
            snap = breaker.snapshot()
            retry_after = None if snap.retry_at is None else max(0.0, snap.retry_at - breaker.clock.now())
            found.append(
                BreakerHealth(
                    name=snap.name,
                    state=_state(snap.state),
                    shared=False,
                    failure_rate=snap.failure_rate,
                    consecutive_failures=snap.consecutive_failures,
                    retry_after_s=retry_after,
                )
            )
    for key, breaker in backend.items("shared_breaker"):
        try:
            snap = await breaker.snapshot()
        except Exception:  # the store is down: the fallback's view, if it has one, else unknown
            state = _state(breaker.local.state) if hasattr(breaker, "local") else "closed"
            found.append(BreakerHealth(name=str(getattr(breaker, "name", key)), state=state, shared=True))
            continue
        retry_after = None if snap.retry_at is None else max(0.0, snap.retry_at - breaker.clock.now())
        found.append(
            BreakerHealth(
                name=snap.name,
                state=_state(snap.state),
                shared=True,
                failure_rate=snap.failure_rate,
                consecutive_failures=snap.consecutive_failures,
                retry_after_s=retry_after,
            )
        )
    return found


def _limiters(backend: Backend) -> list[LimiterHealth]:
    found: list[LimiterHealth] = []
    for _, limiter in backend.items("rate_limit"):
        if isinstance(limiter, RateLimiter):
            paused = limiter.paused_until - limiter.clock.now()
            found.append(
                LimiterHealth(
                    name=limiter.name,
                    shared=False,
                    rpm=limiter.rpm,
                    tpm=limiter.tpm,
                    available_requests=limiter.available_requests if limiter.rpm is not None else None,
                    available_tokens=limiter.available_tokens if limiter.tpm is not None else None,
                    paused_s=max(0.0, paused) if math.isfinite(paused) else 0.0,
                    effective_rpm=limiter.effective_rpm,
                    effective_tpm=limiter.effective_tpm,
                    provider_rpm=limiter.provider_rpm,
                    provider_tpm=limiter.provider_tpm,
                    backoff=limiter.backoff,
                )
            )
    for key, limiter in backend.items("shared_rate_limit"):
        found.append(
            LimiterHealth(
                name=str(getattr(limiter, "name", key)),
                shared=True,
                rpm=getattr(limiter, "rpm", None),
                tpm=getattr(limiter, "tpm", None),
            )
        )
    return found


def _bulkheads(backend: Backend) -> list[BulkheadHealth]:
    return [
        BulkheadHealth(
            name=bulkhead.name,
            in_flight=bulkhead.in_flight,
            max_in_flight=bulkhead.policy.max_in_flight,
            queued=bulkhead.queued,
            limit=bulkhead.limit if bulkhead.policy.adaptive is not None else None,
        )
        for _, bulkhead in backend.items("concurrency")
        if isinstance(bulkhead, ConcurrencyLimit)
    ]


async def _backend_health(backend: Backend) -> BackendHealth:
    if not isinstance(backend, SharedBackend):
        return BackendHealth(kind=type(backend).__name__, reachable=True)
    started = time.perf_counter()
    ping: Any = getattr(backend, "ping", None)
    reachable = bool(await ping()) if ping is not None else True
    error = getattr(backend, "last_error", None)
    return BackendHealth(
        kind=type(backend).__name__,
        reachable=reachable,
        latency_s=round(time.perf_counter() - started, 6) if reachable else None,
        error=None if reachable or error is None else f"{type(error).__name__}: {error}",
    )


async def ahealth(backends: Sequence[Backend] | None = None) -> HealthReport:
    """The health of the guards held by ``backends`` (default: the process-wide default backend).

    Returns:
        A :class:`HealthReport`; never raises because a backend is down (that is reported).
    """
    report = HealthReport(status="ok", ready=True, usage=usage_report())
    for backend in backends if backends is not None else [default_backend()]:
        report.backends.append(await _backend_health(backend))
        report.breakers.extend(await _breakers(backend))
        report.limiters.extend(_limiters(backend))
        report.bulkheads.extend(_bulkheads(backend))
    open_breakers = any(b.state == "open" for b in report.breakers)
    closed_backend = any(
        not health.reachable and getattr(getattr(backend, "options", None), "on_unavailable", "") == "fail_closed"
        for health, backend in zip(report.backends, backends or [], strict=False)
    )
    report.ready = not (open_breakers or closed_backend)
    degraded = (
        any(b.state != "closed" for b in report.breakers)
        or any(not b.reachable for b in report.backends)
        or any(limiter.paused_s > 0 for limiter in report.limiters)
    )
    report.status = "down" if not report.ready else "degraded" if degraded else "ok"
    return report


def health(backends: Sequence[Backend] | None = None) -> HealthReport:
    """:func:`ahealth` for sync code (through the sync bridge). Do not call it from async code: use
    ``await ragguard.ahealth()``."""
    return run_sync(lambda: ahealth(backends))
