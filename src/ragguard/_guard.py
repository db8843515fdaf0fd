"""``ragguard.guard``: give an existing provider client production behaviour without changing how it is used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ._clock import SYSTEM_CLOCK, Clock
from ._tokens import TokenEstimator, default_estimator
from .backends.base import Backend
from .config import Policy
from .errors import ConfigError

__all__ = ["guard"]

C = TypeVar("C")


def guard(
    client: C,
    policy: Policy | None = None,
    *,
    backend: Backend | None = None,
    methods: Mapping[str, Policy | None] | None = None,
    estimator: TokenEstimator | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> C:
    """Wrap a provider client so its calls go through a ragguard pipeline; use the result exactly as before.

    Recognised clients: ``openai.AsyncOpenAI`` and ``openai.OpenAI`` (2.x and 3.x). The returned proxy has the
    client's own interface and return types; ``embeddings.create``, ``chat.completions.create`` and
    ``responses.create`` run through cache → single-flight → deadline → retry → circuit breaker → rate limit
    (requests and tokens) → concurrency limit → attempt timeout, and the SDK's own retries are switched off
    (``max_retries=0``) so attempts never multiply. Everything else passes through untouched.

    Pinecone 10.x index clients (``pc.Index(host=...)``, ``pc.IndexAsyncio(host=...)``): ``upsert`` is chunked by
    count and bytes and sent concurrently, ``query`` results are cached until a write through a guarded client,
    and every data-plane call runs through the pipeline with the SDK's own retries off (see
    :mod:`ragguard.providers.pinecone`).

    Any other object: name the methods to guard, ``ragguard.guard(obj, methods={"search": None, "upsert":
    write_policy})`` (a ``None`` policy means ``policy``); they run, sync or async, through deadline → retry →
    circuit breaker → rate limit → concurrency limit → attempt timeout, judged by the generic classifier.

    Args:
        client: the SDK client to wrap (it is not modified).
        policy: the guards' configuration; default ``Policy()``, which also reads ``RAGGUARD_*`` variables.
        backend: where shared state lives; default: the process-wide :class:`~ragguard.MemoryBackend`, so all
            guarded clients of one API key share one rate limit per model, as the provider does. A
            :class:`~ragguard.RedisBackend` makes several processes share rate limits, breakers and caches.
        methods: for any object: the names of the methods to guard and their policies (``None``: ``policy``).
        estimator: counts a text's tokens for the tokens-per-minute limit (default:
            :func:`~ragguard.default_estimator`: tiktoken if its files are cached locally, else ~4 chars/token;
            never downloads anything).
        clock: time source (tests inject :class:`~ragguard.ManualClock`).

    Returns:
        A proxy typed as the client's own type.

    Raises:
        ConfigError: ``client`` is of a kind ragguard does not know and ``methods`` is not given, or ``methods``
            names a missing method.
    """
    if methods is not None:
        from .providers.generic import guard_methods

        wrapped: Any = guard_methods(client, methods, policy, backend=backend, clock=clock)
        return wrapped  # type: ignore[no-any-return]
    module = type(client).__module__.split(".", 1)[0]
    if module == "openai":
        from .providers.openai import guard_openai, is_openai_client

        if is_openai_client(client):
            proxy: Any = guard_openai(
                client,  # type: ignore[arg-type]
                policy,
                backend=backend,
                estimator=estimator or default_estimator(),
                clock=clock,
            )
            return proxy  # type: ignore[no-any-return]
    if module == "pinecone":
        from .providers.pinecone import guard_pinecone, is_pinecone_index

        if is_pinecone_index(client):
            index: Any = guard_pinecone(client, policy, backend=backend, clock=clock)
            return index  # type: ignore[no-any-return]
    raise ConfigError(
        f"ragguard.guard does not know how to wrap {type(client).__module__}.{type(client).__qualname__}; "
        "supported: openai.OpenAI, openai.AsyncOpenAI, pinecone Index / AsyncIndex; for any other object pass "
        "methods={'name': policy, ...} "
        "(or decorate your calls with @ragguard.retry & co.)"
    )
