"""Any client, by method map: ``ragguard.guard(obj, methods={"search": policy, "upsert": write_policy})``.

The named methods (sync or async) run through a pipeline built from their policy; every other attribute is the
object's own, untouched. Errors are judged by the generic classifier (:func:`ragguard.classify_exception`):
HTTP status codes found on the exception (``status_code`` or ``response.status_code``) and
``Retry-After`` headers are honoured, connection errors and timeouts are retried, 400/401/403/404/422 never.

:func:`build_pipeline` is also the common part of the provider modules' pipelines (OpenAI, Pinecone).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from .. import _stateful, telemetry
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import Classifier, classify_exception
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import Policy
from ..errors import ConfigError
from ..guards.bulkhead import ConcurrencyLimit
from ..guards.hedge import Hedge
from ..guards.pipeline import Guard, GuardBase, Pipeline
from ..guards.retry import Retry
from ..guards.timeout import Deadline, Timeout
from ._proxy import AttributeProxy

__all__ = ["GuardedObject", "build_pipeline", "guard_methods"]

T = TypeVar("T")


class _ObservedCall(GuardBase):
    """Outermost: the call's span, metrics and events (:func:`ragguard.telemetry.observe_call`)."""

    stage: ClassVar[str] = "observe"
    __slots__ = ("clock", "operation", "system")

    def __init__(self, system: str, operation: str, clock: Clock) -> None:
        self.system, self.operation, self.clock = system, operation, clock

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        return await telemetry.observe_call(self.system, self.operation, "", "", call)


class _ObservedAttempt(GuardBase):
    """Innermost: one upstream attempt's span and counters."""

    stage: ClassVar[str] = "custom"
    __slots__ = ("clock",)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def run(self, call: Callable[[], Awaitable[T]], ctx: CallContext) -> T:
        with telemetry.attempt(ctx.tokens):
            return await call()


def build_pipeline(
    policy: Policy,
    backend: Backend,
    *,
    breaker: str,
    bucket: str,
    bulkhead: str,
    clock: Clock = SYSTEM_CLOCK,
    classify: Classifier = classify_exception,
    label: str = "",
    outer: Sequence[Guard] = (),
    hedge: bool = False,
) -> Pipeline:
    """The standard pipeline of ``policy``: deadline → retry (with its retry budget) → circuit breaker → rate
    limit → concurrency limit → attempt timeout, each section skipped when disabled. The retry budget is one per
    ``breaker`` name (so per endpoint and model for a provider): in this process, or shared by every process
    through a shared backend (:class:`~ragguard.SharedRetryBudget` on :class:`~ragguard.RedisBackend`).

    Args:
        policy: the sections to build from.
        backend: holds the stateful guards, so every pipeline naming the same ``breaker`` / ``bucket`` /
            ``bulkhead`` (with the same settings) shares one, in this process or, with a shared backend, across
            processes.
        breaker, bucket, bulkhead: the names of the circuit breaker, the rate-limit bucket and the bulkhead.
        clock: the clock of every guard.
        classify: turns an attempt's exception into an :class:`~ragguard.Outcome`.
        label: the breaker's name in errors (default: ``breaker``).
        outer: guards placed before the standard ones (e.g. a cache and a coalescer).
        hedge: the call is an idempotent read that may be hedged: when ``policy.hedge.enabled`` too, a
            :class:`~ragguard.guards.hedge.Hedge` (one per ``breaker`` name and settings, in this process) sits
            between the retry and the breaker and spends the retry's budget (built from ``policy.retry_budget``'s
            settings even when that section or the retry is disabled: hedges are always bounded).
    """
    guards: list[Guard] = list(outer)
    if policy.timeout.total is not None:
        guards.append(Deadline(policy.timeout.total, clock=clock))
    if policy.breaker.enabled:
        guards.append(_stateful.circuit_breaker(backend, breaker, policy.breaker, clock=clock, label=label or breaker))
    hedging = hedge and policy.hedge.enabled
    section = policy.retry_budget
    retry_budgeted = policy.retry.enabled and section.enabled
    budget = _stateful.retry_budget(backend, breaker, section, clock=clock) if retry_budgeted or hedging else None
    if policy.retry.enabled:
        guards.append(Retry.from_policy(policy.retry, clock=clock, budget=budget if retry_budgeted else None))
    if hedging:
        hedge_section = policy.hedge
        # the Retry deposits each call into the shared budget; without it the hedge must, or nothing would
        guards.append(
            backend.get_or_create(
                "hedge",
                f"{breaker}:{hedge_section.model_dump_json()}:{section.model_dump_json()}:{retry_budgeted}",
                lambda: Hedge.from_policy(hedge_section, budget=budget, deposit=not retry_budgeted, clock=clock),
            )
        )
    limits = policy.rate_limit
    if limits.rpm is not None or limits.tpm is not None or limits.share_retry_after:
        guards.append(_stateful.rate_limiter(backend, bucket, limits, clock=clock))
    if policy.concurrency.enabled:
        bulkhead_section = policy.concurrency
        guards.append(
            backend.get_or_create(
                "concurrency",
                f"{bulkhead}:{bulkhead_section.model_dump_json()}",
                lambda: ConcurrencyLimit.from_policy(bulkhead_section, clock=clock, name=bulkhead),
            )
        )
    if policy.timeout.attempt is not None:
        guards.append(Timeout(policy.timeout.attempt, clock=clock))
    return Pipeline(*guards, clock=clock, classify=classify)


class GuardedObject(AttributeProxy):
    """The proxy :func:`ragguard.guard` returns for ``methods=``: the object's interface, chosen methods guarded.

    Usable as a context manager when the object is one (``with`` / ``async with`` reach the object's own).
    """

    __slots__ = ()

    def __enter__(self) -> GuardedObject:
        object.__getattribute__(self, "_target").__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return object.__getattribute__(self, "_target").__exit__(*exc_info)

    async def __aenter__(self) -> GuardedObject:
        await object.__getattribute__(self, "_target").__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await object.__getattribute__(self, "_target").__aexit__(*exc_info)


def guard_methods(
    obj: Any,
    methods: Mapping[str, Policy | None],
    policy: Policy | None = None,
    *,
    backend: Backend | None = None,
    classify: Classifier = classify_exception,
    clock: Clock = SYSTEM_CLOCK,
) -> Any:
    """Wrap the methods named in ``methods`` of ``obj``; see :func:`ragguard.guard`.

    Each method gets its own pipeline (breaker, bucket and bulkhead named ``"{type}.{method}"``), from its
    policy, or ``policy`` (default ``Policy()``) where the map gives ``None``.

    Raises:
        ConfigError: ``methods`` is empty, or names an attribute that is missing or not callable.
    """
    from ..decorators import guarded

    if not methods:
        raise ConfigError("methods= must name at least one method to guard")
    backend = backend if backend is not None else default_backend()
    default = policy if policy is not None else Policy()
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    system = type(obj).__module__.split(".")[0]  # the client's package, e.g. qdrant_client
    overrides: dict[str, Any] = {}
    for name, method_policy in methods.items():
        method = getattr(obj, name, None)
        if method is None or not callable(method):
            raise ConfigError(f"{kind} has no method {name!r} to guard")
        label = f"{kind}.{name}"
        standard = build_pipeline(
            method_policy if method_policy is not None else default,
            backend,
            breaker=label,
            bucket=label,
            bulkhead=label,
            clock=clock,
            classify=classify,
            outer=[_ObservedCall(system, name, clock)],
        )
        # a span per call and a child span per attempt, as for the provider clients
        pipeline = Pipeline(*standard.guards, _ObservedAttempt(clock), clock=clock, classify=classify)
        overrides[name] = guarded(pipeline, method)
    return GuardedObject(obj, overrides)
