"""OpenTelemetry spans and metrics for guarded calls, through ``opentelemetry-api`` only (the SDK, its exporters
and its sampling stay your choice: configure a ``TracerProvider`` / ``MeterProvider`` and ragguard's telemetry
appears; configure none and it costs next to nothing).

**Spans.** A guarded client call (OpenAI, Pinecone, method map) is one ``CLIENT`` span named as the GenAI
semantic conventions say (``"{gen_ai.operation.name} {gen_ai.request.model}"``, e.g. ``chat gpt-4o-mini``),
with a child ``ragguard.attempt`` span per upstream attempt, so retries are never hidden inside one span
(openinference#3664); each backoff is a ``ragguard.retry`` span event on the call span. Attributes:

- GenAI conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/): ``gen_ai.system``,
  ``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``, ``error.type``; on attempts ``http.response.status_code``.
- ragguard's own: ``ragguard.attempt`` / ``ragguard.attempts``, ``ragguard.backoff_s`` (total backoff waited),
  ``ragguard.limiter_wait_s``, ``ragguard.breaker_state`` (on a refusal), ``ragguard.cache_hit``,
  ``ragguard.coalesced``, ``ragguard.batch_size``, ``ragguard.scope`` (credential fingerprint).

**Metrics** (meter ``ragguard``): ``gen_ai.client.operation.duration`` (s) and ``gen_ai.client.token.usage``
({token}, ``gen_ai.token.type`` input/output) for LLM calls; ``ragguard.call.duration`` (s) for every guarded
call; ``ragguard.attempts``, ``ragguard.retries`` (by ``ragguard.retry.reason``), ``ragguard.rate_limited`` (by
``ragguard.source``: provider 429s and limiter waits), ``ragguard.limiter.wait`` (s),
``ragguard.bulkhead.queue_depth``, ``ragguard.breaker.state_changes`` (by ``ragguard.breaker.state``),
``ragguard.cache.operations`` (by ``ragguard.cache.result``: hit / miss / evicted), ``ragguard.batch.size``,
``ragguard.coalesced``, ``ragguard.fallbacks`` (by ``ragguard.fallback.served``),
``ragguard.tokens.reserved`` / ``ragguard.tokens.used`` and ``ragguard.usage.cost``
(from your price table, :mod:`ragguard.usage`).

**Never recorded**: API keys, ``Authorization`` headers, request or response bodies, exception messages (only
the exception's type name: provider error messages can echo parts of a key).

The same facts reach :mod:`ragguard.events` hooks.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from . import events, usage

__all__ = ["CallRecord", "current_record", "is_live", "observe_call"]

T = TypeVar("T")

_NAME = "ragguard"
#: systems whose calls are GenAI calls (get the gen_ai.* metrics)
_GENAI = frozenset({"openai"})


def _version() -> str:
    from . import __version__

    return __version__


class _Instruments:
    """The metric instruments, created on first use (through the API's proxy meter, so a provider configured
    later still receives them)."""

    def __init__(self) -> None:
        meter = metrics.get_meter(_NAME, _version())
        self.genai_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration"
        )
        self.genai_tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per GenAI operation"
        )
        self.call_duration = meter.create_histogram(
            "ragguard.call.duration", unit="s", description="Guarded call duration, waits and retries included"
        )
        self.attempts = meter.create_counter("ragguard.attempts", unit="{attempt}", description="Upstream attempts")
        self.retries = meter.create_counter("ragguard.retries", unit="{retry}", description="Retries scheduled")
        self.rate_limited = meter.create_counter(
            "ragguard.rate_limited", unit="{event}", description="Provider 429s and local limiter waits"
        )
        self.limiter_wait = meter.create_histogram(
            "ragguard.limiter.wait", unit="s", description="Time the rate limiter held a call back"
        )
        self.queue_depth = meter.create_up_down_counter(
            "ragguard.bulkhead.queue_depth", unit="{call}", description="Callers waiting for a concurrency slot"
        )
        self.breaker_changes = meter.create_counter(
            "ragguard.breaker.state_changes", unit="{transition}", description="Circuit breaker transitions"
        )
        self.cache = meter.create_counter(
            "ragguard.cache.operations", unit="{operation}", description="Cache hits, misses and evictions"
        )
        self.batch_size = meter.create_histogram(
            "ragguard.batch.size", unit="{item}", description="Items per micro-batch sent upstream"
        )
        self.fallbacks = meter.create_counter(
            "ragguard.fallbacks", unit="{call}", description="Calls a fallback chain answered (or could not)"
        )
        self.coalesced = meter.create_counter(
            "ragguard.coalesced", unit="{call}", description="Calls answered by an identical in-flight call"
        )
        self.tokens_reserved = meter.create_counter(
            "ragguard.tokens.reserved", unit="{token}", description="Tokens reserved against a TPM quota"
        )
        self.tokens_used = meter.create_counter(
            "ragguard.tokens.used", unit="{token}", description="Tokens the provider reported using"
        )
        self.cost = meter.create_counter(
            "ragguard.usage.cost", unit="1", description="Cost from the user's price table (ragguard.usage)"
        )


_instruments: _Instruments | None = None


def _metrics() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_NAME, _version())


# -- is anyone listening? ----------------------------------------------------------------------------------------

_sdk_seen = False
_next_check = 0.0


def _sdk_configured() -> bool:
    """Whether an OpenTelemetry SDK (anything but the API's own proxy / no-op providers) is installed; checked at
    most once a second until one is (a provider can be set only once per process)."""
    global _sdk_seen, _next_check
    if _sdk_seen:
        return True
    now = time.monotonic()
    if now < _next_check:
        return False
    _next_check = now + 1.0
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider())
    _sdk_seen = any(
        not type(p).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics")) for p in providers
    )
    return _sdk_seen


def is_live() -> bool:
    """Whether telemetry is recorded: an OpenTelemetry SDK is configured or an event hook is subscribed."""
    return bool(events._hooks) or _sdk_configured()


# -- the per-call record ------------------------------------------------------------------------------------------


class CallRecord:
    """What one guarded client call did, filled by the guards and the provider layer while it runs (read it
    with :func:`current_record` inside the call, e.g. from a custom guard)."""

    __slots__ = (
        "attempts",
        "backoff_s",
        "batch_size",
        "cache_hit",
        "coalesced",
        "input_tokens",
        "limiter_wait_s",
        "model",
        "operation",
        "output_tokens",
        "reserved_tokens",
        "scope",
        "span",
        "system",
    )

    def __init__(self, system: str, operation: str, model: str, scope: str) -> None:
        self.system = system
        self.operation = operation
        self.model = model
        self.scope = scope
        self.attempts = 0
        self.backoff_s = 0.0
        self.limiter_wait_s = 0.0  # of the attempt about to be sent
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.reserved_tokens = 0.0
        self.cache_hit = False
        self.coalesced = False
        self.batch_size: int | None = None
        self.span: trace.Span | None = None

    @property
    def name(self) -> str:
        return f"{self.system}:{self.operation}:{self.model}" if self.model else f"{self.system}:{self.operation}"


_RECORD: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("ragguard_call_record", default=None)


def current_record() -> CallRecord | None:
    """The record of the guarded client call running in this task, if any."""
    return _RECORD.get()


def current_otel_context() -> otel_context.Context:
    """The caller's OpenTelemetry context, to hand to :func:`observe_call` across the sync bridge."""
    return otel_context.get_current()


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return type(exc).__name__


async def observe_call(
    system: str,
    operation: str,
    model: str,
    scope: str,
    fn: Callable[[], Awaitable[T]],
    *,
    parent: otel_context.Context | None = None,
    genai_operation: str | None = None,
) -> T:
    """Run one guarded client call ``fn`` as a span with its metrics, usage accounting and events.

    Args:
        system, operation, model: ``gen_ai.system`` (or the vector store), the operation, the requested model.
        scope: the credential fingerprint (never a key).
        fn: the call.
        parent: the OpenTelemetry context to parent the span on (a sync caller's, across the sync bridge).
        genai_operation: the ``gen_ai.operation.name`` (default: ``operation``).
    """
    record = CallRecord(system, operation, model, scope)
    token = _RECORD.set(record)
    live = is_live()
    attached = otel_context.attach(parent) if parent is not None else None
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        if not live:
            return await fn()
        op = genai_operation or operation
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "ragguard.scope": scope,
        }
        if system in _GENAI:
            attributes["gen_ai.system"] = system
        else:
            attributes["db.system.name"] = system
            attributes["db.operation.name"] = operation
        if model:
            attributes["gen_ai.request.model"] = model
        with _tracer().start_as_current_span(
            f"{op} {model}" if model else f"{op} {system}",
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,  # exception messages may echo secrets; error.type says enough
            set_status_on_exception=False,
        ) as span:
            record.span = span
            try:
                return await fn()
            except BaseException as exc:
                error = exc
                span.set_attribute("error.type", _error_type(exc))
                span.set_status(trace.StatusCode.ERROR)
                raise
            finally:
                _finish_span(span, record)
    except BaseException as exc:
        error = exc
        raise
    finally:
        duration = time.perf_counter() - started
        if attached is not None:
            otel_context.detach(attached)
        _RECORD.reset(token)
        _finish(record, duration, error, live)


def _finish_span(span: trace.Span, record: CallRecord) -> None:
    span.set_attribute("ragguard.attempts", record.attempts)
    span.set_attribute("ragguard.backoff_s", record.backoff_s)
    span.set_attribute("ragguard.cache_hit", record.cache_hit)
    span.set_attribute("ragguard.coalesced", record.coalesced)
    if record.batch_size is not None:
        span.set_attribute("ragguard.batch_size", record.batch_size)
    if record.input_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", record.input_tokens)
    if record.output_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", record.output_tokens)


def _finish(record: CallRecord, duration: float, error: BaseException | None, live: bool) -> None:
    ok = error is None
    cost: float | None = None
    if record.attempts:
        # retried attempts reserved the same estimate again (each attempt pays for its own permit)
        per_attempt = record.reserved_tokens / record.attempts
        cost = usage.record(
            record.system,
            record.model,
            record.scope,
            ok=ok,
            attempts=record.attempts,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            retry_tokens=per_attempt * (record.attempts - 1),
        )
    if not live:
        return
    error_type = None if error is None else _error_type(error)
    attributes: dict[str, Any] = {"ragguard.system": record.system, "ragguard.operation": record.operation}
    if record.model:
        attributes["gen_ai.request.model"] = record.model
    if error_type is not None:
        attributes["error.type"] = error_type
    m = _metrics()
    m.call_duration.record(duration, attributes)
    if record.system in _GENAI:
        genai: dict[str, Any] = {"gen_ai.system": record.system, "gen_ai.operation.name": record.operation}
        if record.model:
            genai["gen_ai.request.model"] = record.model
        if error_type is not None:
            genai["error.type"] = error_type
        m.genai_duration.record(duration, genai)
        if record.input_tokens is not None:
            m.genai_tokens.record(record.input_tokens, {**genai, "gen_ai.token.type": "input"})
        if record.output_tokens is not None:
            m.genai_tokens.record(record.output_tokens, {**genai, "gen_ai.token.type": "output"})
    used = (record.input_tokens or 0) + (record.output_tokens or 0)
    if used:
        m.tokens_used.add(used, attributes)
    if cost is not None:
        m.cost.add(cost, attributes)
    if record.coalesced:
        m.coalesced.add(1, attributes)
    if events.has_subscribers(events.CallFinished):
        events.emit(
            events.CallFinished(
                system=record.system,
                operation=record.operation,
                model=record.model,
                duration_s=duration,
                attempts=record.attempts,
                error_type=error_type,
                input_tokens=record.input_tokens,
                output_tokens=record.output_tokens,
                cache_hit=record.cache_hit,
                coalesced=record.coalesced,
                scope=record.scope,
                cost=cost,
            )
        )


@contextmanager
def attempt(reserved_tokens: float = 0.0) -> Iterator[CallRecord | None]:
    """Wrap one upstream attempt of the current call: a child span, the attempt counters, an event."""
    record = _RECORD.get()
    if record is None:
        yield None
        return
    record.attempts += 1
    record.reserved_tokens += reserved_tokens
    number = record.attempts
    waited, record.limiter_wait_s = record.limiter_wait_s, 0.0
    if not is_live():
        yield record
        return
    started = time.perf_counter()
    error: BaseException | None = None
    attributes: dict[str, Any] = {"ragguard.attempt": number, "ragguard.limiter_wait_s": waited}
    with _tracer().start_as_current_span(
        "ragguard.attempt",
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield record
        except BaseException as exc:
            error = exc
            span.set_attribute("error.type", _error_type(exc))
            status = getattr(exc, "status_code", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
            span.set_status(trace.StatusCode.ERROR)
            raise
        finally:
            _attempt_done(record, number, waited, time.perf_counter() - started, error, reserved_tokens)


def _attempt_done(
    record: CallRecord, number: int, waited: float, duration: float, error: BaseException | None, reserved: float
) -> None:
    status = getattr(error, "status_code", None) if error is not None else None
    status = status if isinstance(status, int) else None
    error_type = None if error is None else _error_type(error)
    attributes: dict[str, Any] = {"ragguard.system": record.system, "ragguard.operation": record.operation}
    if record.model:
        attributes["gen_ai.request.model"] = record.model
    m = _metrics()
    m.attempts.add(1, attributes if error_type is None else {**attributes, "error.type": error_type})
    if reserved:
        m.tokens_reserved.add(reserved, attributes)
    if status == 429:
        m.rate_limited.add(1, {**attributes, "ragguard.source": "provider"})
        if events.has_subscribers(events.RateLimited):
            events.emit(events.RateLimited(name=record.name, source="provider", wait_s=0.0))
    if events.has_subscribers(events.AttemptFinished):
        events.emit(
            events.AttemptFinished(
                system=record.system,
                operation=record.operation,
                model=record.model,
                attempt=number,
                duration_s=duration,
                error_type=error_type,
                status_code=status,
                limiter_wait_s=waited,
            )
        )


def note_usage(input_tokens: int | None, output_tokens: int | None) -> None:
    """The provider's ``usage`` of the current call's successful attempt."""
    record = _RECORD.get()
    if record is not None:
        record.input_tokens = input_tokens
        record.output_tokens = output_tokens


def note_result(*, cache_hit: bool = False, coalesced: bool = False, batch_size: int | None = None) -> None:
    """How the current call was answered (set by the call-saving layers)."""
    record = _RECORD.get()
    if record is None:
        return
    record.cache_hit = record.cache_hit or cache_hit
    record.coalesced = record.coalesced or coalesced
    if batch_size is not None:
        record.batch_size = batch_size


# -- guard-level facts (cheap when nobody listens) ------------------------------------------------------------


def retry_scheduled(attempt: int, delay: float, reason: str, retry_after: float | None, error: BaseException) -> None:
    """A :class:`~ragguard.Retry` is about to wait ``delay`` seconds."""
    record = _RECORD.get()
    if record is not None:
        record.backoff_s += delay
    if not is_live():
        return
    name = record.name if record is not None else ""
    _metrics().retries.add(1, {"ragguard.name": name, "ragguard.retry.reason": reason})
    span = record.span if record is not None else trace.get_current_span()
    if span is not None and span.is_recording():
        span.add_event(
            "ragguard.retry",
            {"ragguard.attempt": attempt, "ragguard.backoff_s": delay, "ragguard.retry.reason": reason},
        )
    if events.has_subscribers(events.RetryScheduled):
        events.emit(
            events.RetryScheduled(
                name=name,
                attempt=attempt,
                delay_s=delay,
                reason=reason,
                retry_after_s=retry_after,
                error_type=type(error).__name__,
            )
        )


def limiter_waited(name: str, wait: float) -> None:
    """A rate limiter held a call back ``wait`` seconds before admitting it."""
    record = _RECORD.get()
    if record is not None:
        record.limiter_wait_s += wait
    if wait <= 0 or not is_live():
        return
    m = _metrics()
    m.limiter_wait.record(wait, {"ragguard.name": name})
    m.rate_limited.add(1, {"ragguard.name": name, "ragguard.source": "limiter"})
    if events.has_subscribers(events.RateLimited):
        events.emit(events.RateLimited(name=name, source="limiter", wait_s=wait))


def queue_changed(name: str, delta: int) -> None:
    """A caller joined (``+1``) or left (``-1``) a bulkhead's queue."""
    if is_live():
        _metrics().queue_depth.add(delta, {"ragguard.name": name})


def breaker_changed(name: str, old: str, new: str) -> None:
    """A circuit breaker moved from ``old`` to ``new``."""
    if not is_live():
        return
    _metrics().breaker_changes.add(1, {"ragguard.name": name, "ragguard.breaker.state": new})
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event("ragguard.breaker_state_change", {"ragguard.name": name, "ragguard.breaker_state": new})
    if events.has_subscribers(events.BreakerStateChanged):
        events.emit(events.BreakerStateChanged(name=name, old=old, new=new))


def cache_accessed(layer: str, result: str) -> None:
    """A cache lookup hit or missed, or an entry was evicted."""
    if not is_live():
        return
    _metrics().cache.add(1, {"ragguard.cache.layer": layer, "ragguard.cache.result": result})
    if events.has_subscribers(events.CacheAccessed) and result in ("hit", "miss", "evicted"):
        events.emit(events.CacheAccessed(layer=layer, result=result))  # type: ignore[arg-type]


def fallback_used(name: str, served: str | None, index: int, reason: BaseException) -> None:
    """A fallback chain's primary failed with ``reason``; alternative ``served`` answered (``None``: none did)."""
    if not is_live():
        return
    _metrics().fallbacks.add(1, {"ragguard.name": name, "ragguard.fallback.served": served or "none"})
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "ragguard.fallback", {"ragguard.fallback.served": served or "none", "ragguard.fallback.index": index}
        )
    if events.has_subscribers(events.FallbackUsed):
        events.emit(events.FallbackUsed(name=name, served=served, index=index, reason=type(reason).__name__))


def batch_flushed(name: str, size: int, callers: int) -> None:
    """A micro-batch of ``size`` items from ``callers`` callers went upstream."""
    if not is_live():
        return
    _metrics().batch_size.record(size, {"ragguard.name": name})
    if events.has_subscribers(events.BatchFlushed):
        events.emit(events.BatchFlushed(name=name, size=size, callers=callers))
