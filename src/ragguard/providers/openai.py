"""Guarded OpenAI clients: ``ragguard.guard(AsyncOpenAI())`` and ``ragguard.guard(OpenAI())``.

What this module knows about OpenAI (everything else is in the domain-free guards):

- **Which errors to retry**, from the SDK's own exception classes (so it works on openai 2.x over ``httpx`` and
  3.x over ``httpx2`` alike): ``RateLimitError`` (429), ``InternalServerError`` (5xx), ``APIConnectionError``,
  ``APITimeoutError`` and ``APIStatusError`` with 408/409 are retryable; the server's ``x-should-retry`` header
  overrides that, as in the SDK. A 429 whose code is ``insufficient_quota`` is a billing failure and is never
  retried (the SDK retries it). 400/401/403/404/422 are never retried.
- **How long to wait**: ``retry-after-ms`` / ``Retry-After`` from ``error.response.headers``; the
  ``x-ratelimit-remaining-*`` headers keep the local limiter honest.
- **What a request costs**, as OpenAI's rate limiter counts it at admission: the prompt estimate plus
  ``max_tokens`` (or ``max_completion_tokens`` / ``max_output_tokens``) × ``n``, never refunded; only an
  under-estimate of the prompt is debited afterwards from ``usage``
  (https://platform.openai.com/docs/guides/rate-limits).
- **Retries never multiply**: the wrapped client is used through ``with_options(max_retries=0)``.

``embeddings.create``, ``chat.completions.create`` (``stream=True`` included) and ``responses.create`` go through
the pipeline; every other attribute is the SDK's own, untouched. A streamed call is retried only until its first
chunk arrives; a stream that breaks later, or ends without its final chunk, raises
:class:`~ragguard.StreamInterrupted` chaining the cause.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai

from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._hints import parse_rate_limit_headers
from .._outcome import Outcome, classify_exception, classify_status, headers_of
from .._sync import run_in_worker, run_sync
from .._tokens import TokenEstimator, estimate_chat_tokens, estimate_text_tokens, heuristic_estimator
from ..backends.memory import MemoryBackend, default_backend
from ..config import Policy
from ..errors import RagGuardError, StreamInterrupted
from ..guards.batch import MicroBatcher
from ..guards.breaker import CircuitBreaker
from ..guards.bulkhead import ConcurrencyLimit
from ..guards.limiter import RateLimiter
from ..guards.pipeline import Guard, Pipeline
from ..guards.retry import Retry
from ..guards.timeout import Deadline, Timeout
from ._proxy import AttributeProxy

__all__ = ["GuardedOpenAIClient", "OpenAIGuard", "classify_openai", "guard_openai", "is_openai_client"]

#: the endpoints that go through the pipeline, as attribute paths from the client
#: the embeddings arguments the micro-batcher understands (anything else goes unbatched)
_BATCHABLE = frozenset({"model", "input", "dimensions", "encoding_format", "user"})

_GUARDED = {
    "embeddings": ("embeddings",),
    "chat.completions": ("chat", "completions"),
    "responses": ("responses",),
}


def is_openai_client(obj: object) -> bool:
    """Whether ``obj`` is an ``openai.OpenAI`` / ``openai.AsyncOpenAI`` client (Azure's included)."""
    return isinstance(obj, (openai.OpenAI, openai.AsyncOpenAI))


def classify_openai(exc: BaseException) -> Outcome:
    """Classify an exception raised by the openai SDK (2.x or 3.x); other exceptions get the generic verdict."""
    if isinstance(exc, openai.APIStatusError):
        headers = exc.response.headers
        status = exc.status_code
        if status == 429 and "insufficient_quota" in (exc.code, exc.type):
            return Outcome("quota", retryable=False, failure=False, status=429)
        outcome = classify_status(status, headers)
        should_retry = headers.get("x-should-retry")
        if should_retry in ("true", "false"):
            outcome.retryable = should_retry == "true"
        return outcome
    if isinstance(exc, openai.APITimeoutError):
        return Outcome("timeout", retryable=True, failure=True)
    if isinstance(exc, openai.APIConnectionError):
        return Outcome("connection", retryable=True, failure=True)
    if isinstance(exc, openai.APIResponseValidationError):
        # a body the SDK could not read (a proxy's error page, a cut response): likely transient
        return Outcome("server", retryable=True, failure=True, status=exc.status_code)
    return classify_exception(exc)


def _credential_scope(client: Any) -> str:
    """A stable, non-reversible name for the client's credential and endpoint (never the key in clear)."""
    api_key = getattr(client, "api_key", "")
    key = api_key if isinstance(api_key, str) else f"callable:{id(api_key)}"
    material = f"{client.base_url}|{getattr(client, 'organization', None)}|{key}"
    return "openai:" + hashlib.sha256(material.encode()).hexdigest()[:16]


def _max_output(kwargs: dict[str, Any], *names: str) -> int:
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _response_input_tokens(kwargs: dict[str, Any], estimator: TokenEstimator) -> int:
    tokens = 0
    instructions = kwargs.get("instructions")
    if isinstance(instructions, str):
        tokens += estimator(instructions)
    value = kwargs.get("input")
    if isinstance(value, str):
        return tokens + estimator(value)
    if isinstance(value, list):
        return tokens + estimate_chat_tokens(value, estimator)
    return tokens


class _Cost:
    """Token accounting for one request: what to reserve at admission and what OpenAI charged in the end."""

    __slots__ = ("completion_max", "n", "prompt")

    def __init__(self, prompt: int, completion_max: int, n: int) -> None:
        self.prompt = prompt
        self.completion_max = completion_max
        self.n = n

    @property
    def reserved(self) -> int:
        return self.prompt + self.completion_max * self.n

    def charged(self, usage: Any) -> float | None:
        """OpenAI's charge, from ``usage``: real prompt + max output × n, or real total when no max was set."""
        if usage is None:
            return None
        prompt = getattr(usage, "prompt_tokens", None)
        if prompt is None:
            prompt = getattr(usage, "input_tokens", None)
        if not isinstance(prompt, int):
            return None
        if self.completion_max:
            return float(prompt + self.completion_max * self.n)
        total = getattr(usage, "total_tokens", None)
        return float(total) if isinstance(total, int) else float(prompt)


def _estimate(endpoint: str, kwargs: dict[str, Any], estimator: TokenEstimator) -> _Cost:
    n = kwargs.get("n")
    n = n if isinstance(n, int) and n > 0 else 1
    if endpoint == "embeddings":
        return _Cost(estimate_text_tokens(kwargs.get("input", ""), estimator), 0, 1)
    if endpoint == "chat.completions":
        prompt = estimate_chat_tokens(kwargs.get("messages", ()), estimator)
        return _Cost(prompt, _max_output(kwargs, "max_completion_tokens", "max_tokens"), n)
    return _Cost(_response_input_tokens(kwargs, estimator), _max_output(kwargs, "max_output_tokens"), 1)


class _Completion:
    """Tracks whether a stream reached its natural end (detects truncated streams)."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete: bool | None = None  # None: shape unknown, no verdict

    def see(self, item: Any) -> None:
        choices = getattr(item, "choices", None)
        if isinstance(choices, list):
            if self.complete is None:
                self.complete = False
            if any(getattr(choice, "finish_reason", None) for choice in choices):
                self.complete = True
            return
        kind = getattr(item, "type", None)
        if isinstance(kind, str) and kind.startswith("response."):
            if self.complete is None:
                self.complete = False
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.complete = True

    def check(self) -> None:
        if self.complete is False:
            raise StreamInterrupted("the stream ended before its final chunk (truncated response)")


_EMPTY: Any = object()


async def _async_rest(inner: Any, first: Any) -> AsyncIterator[Any]:
    tracker = _Completion()
    if first is not _EMPTY:
        tracker.see(first)
        yield first
    iterator = inner._iterator
    while True:
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            break
        except Exception as exc:
            raise StreamInterrupted("the stream broke after its first chunk") from exc
        tracker.see(item)
        yield item
    tracker.check()


def _sync_rest(inner: Any, first: Any) -> Iterator[Any]:
    tracker = _Completion()
    if first is not _EMPTY:
        tracker.see(first)
        yield first
    iterator = inner._iterator
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except Exception as exc:
            raise StreamInterrupted("the stream broke after its first chunk") from exc
        tracker.see(item)
        yield item
    tracker.check()


def _adopt(stream_cls: type[Any], inner: Any, iterator: Any) -> Any:
    """A stream of the SDK's own class whose items come from ``iterator`` (first chunk already fetched)."""
    stream = object.__new__(stream_cls)
    stream.__dict__.update(inner.__dict__)
    stream._iterator = iterator
    return stream


def _note_error(ctx: CallContext, exc: BaseException) -> None:
    """Keep the provider's rate-limit view from an error response (the limiter reads it)."""
    ctx.rate_headers = parse_rate_limit_headers(headers_of(exc))


def _parsed(ctx: CallContext, cost: _Cost, raw: Any, stream: bool) -> Any:
    """The SDK's own parsed result of a raw response, noting its rate-limit headers and (unless streamed) the
    tokens OpenAI charged for it."""
    ctx.rate_headers = parse_rate_limit_headers(raw.headers)
    result = raw.parse()
    if not stream:
        ctx.used_tokens = cost.charged(getattr(result, "usage", None))
    return result


class OpenAIGuard:
    """The shared core of one guarded OpenAI client: pipelines per (endpoint, model), cost rules, attempts.

    Proxies made by :func:`guard_openai` are thin; their state lives here and in the backend, so every proxy of
    the same credential shares one rate limit and one breaker per endpoint and model.
    """

    def __init__(
        self,
        client: openai.OpenAI | openai.AsyncOpenAI,
        policy: Policy,
        backend: MemoryBackend,
        *,
        estimator: TokenEstimator = heuristic_estimator,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.client = client
        #: the same client with the SDK's own retries switched off: one retry layer, ours
        self.raw = client.with_options(max_retries=0)
        self.policy = policy
        self.backend = backend
        self.estimator = estimator
        self.clock = clock
        self.scope = _credential_scope(client)
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        #: cross-caller micro-batching of embeddings inputs (async clients)
        self.batcher: MicroBatcher[str, tuple[Any, float]] | None = None
        if policy.batching.enabled and isinstance(client, openai.AsyncOpenAI):
            self.batcher = MicroBatcher.from_policy(
                policy.batching,
                self._dispatch_embeddings,
                cost=lambda text: float(estimator(text)),
                is_item_error=lambda exc: isinstance(exc, openai.BadRequestError),
                clock=clock,
            )

    def pipeline(self, endpoint: str, model: str) -> Pipeline:
        """The pipeline for one endpoint and model (built once, shared by every call)."""
        pipeline = self._pipelines.get((endpoint, model))
        if pipeline is None:
            pipeline = self._pipelines.setdefault((endpoint, model), self._build(endpoint, model))
        return pipeline

    def _build(self, endpoint: str, model: str) -> Pipeline:
        policy, backend, clock, scope = self.policy, self.backend, self.clock, self.scope
        guards: list[Guard] = []
        if policy.timeout.total is not None:
            guards.append(Deadline(policy.timeout.total, clock=clock))
        if policy.breaker.enabled:
            name = f"openai:{endpoint}:{model}"
            section = policy.breaker
            guards.append(
                backend.get_or_create(
                    "breaker",
                    f"{scope}:{endpoint}:{model}:{section.model_dump_json()}",
                    lambda: CircuitBreaker.from_policy(section, name=name, clock=clock),
                )
            )
        if policy.retry.enabled:
            guards.append(Retry.from_policy(policy.retry, clock=clock))
        limits = policy.rate_limit
        if limits.rpm is not None or limits.tpm is not None or limits.share_retry_after:
            bucket = scope if limits.scope == "credential" else f"{scope}:{model}"
            guards.append(
                backend.get_or_create(
                    "rate_limit",
                    f"{bucket}:{limits.model_dump_json()}",
                    lambda: RateLimiter.from_policy(limits, clock=clock, name=bucket),
                )
            )
        if policy.concurrency.enabled:
            section_c = policy.concurrency
            guards.append(
                backend.get_or_create(
                    "concurrency",
                    f"{scope}:{section_c.model_dump_json()}",
                    lambda: ConcurrencyLimit.from_policy(section_c, clock=clock, name=scope),
                )
            )
        if policy.timeout.attempt is not None:
            guards.append(Timeout(policy.timeout.attempt, clock=clock))
        return Pipeline(*guards, clock=clock, classify=classify_openai)

    def _prepare(self, endpoint: str, kwargs: dict[str, Any]) -> tuple[Pipeline, CallContext, _Cost]:
        model = kwargs.get("model")
        pipeline = self.pipeline(endpoint, model if isinstance(model, str) else "")
        cost = _estimate(endpoint, kwargs, self.estimator)
        ctx = pipeline.context(tokens=float(cost.reserved), operation=endpoint)
        return pipeline, ctx, cost

    def _raw_create(self, endpoint: str) -> Callable[..., Any]:
        resource: Any = self.raw
        for part in _GUARDED[endpoint]:
            resource = getattr(resource, part)
        return resource.with_raw_response.create  # type: ignore[no-any-return]

    async def acreate(self, endpoint: str, kwargs: dict[str, Any]) -> Any:
        """``await <endpoint>.create(**kwargs)`` through the pipeline (async clients)."""
        pipeline, ctx, cost = self._prepare(endpoint, kwargs)
        create = self._raw_create(endpoint)
        stream = kwargs.get("stream") is True

        async def attempt() -> Any:
            ctx.used_tokens = None
            try:
                raw = await create(**kwargs)
            except Exception as exc:
                _note_error(ctx, exc)
                raise
            result = _parsed(ctx, cost, raw, stream)
            if not stream:
                return result
            try:
                first = await result._iterator.__anext__()
            except StopAsyncIteration:
                first = _EMPTY
            except BaseException:
                await result.close()
                raise
            return _adopt(type(result), result, _async_rest(result, first))

        return await pipeline.run(attempt, ctx)

    async def _dispatch_embeddings(self, key: Any, texts: list[str]) -> list[tuple[Any, float]]:
        """One upstream embeddings request for a batch; each text's vector and its share of ``usage``."""
        model, dimensions, encoding_format, user = key
        kwargs: dict[str, Any] = {"model": model, "input": texts}
        for name, value in (("dimensions", dimensions), ("encoding_format", encoding_format), ("user", user)):
            if value is not None:
                kwargs[name] = value
        response = await self.acreate("embeddings", kwargs)
        vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
        if len(vectors) != len(texts):
            raise RagGuardError(f"the provider returned {len(vectors)} embeddings for {len(texts)} inputs")
        estimates = [max(1, self.estimator(text)) for text in texts]
        total = sum(estimates)
        prompt = float(response.usage.prompt_tokens) if response.usage is not None else float(total)
        return [(vector, prompt * estimate / total) for vector, estimate in zip(vectors, estimates, strict=True)]

    async def aembed(self, kwargs: dict[str, Any]) -> Any:
        """``embeddings.create`` through the micro-batcher: this caller's inputs share upstream requests with
        concurrent callers' (same model, dimensions, encoding and user); the response is rebuilt per caller."""
        batcher = self.batcher
        inputs = kwargs.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if (
            batcher is None
            or not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text for text in texts)
            or not set(kwargs) <= _BATCHABLE
            or not isinstance(kwargs.get("model"), str)
        ):
            return await self.acreate("embeddings", kwargs)  # token arrays, extra options, empty input: as is
        key = (kwargs["model"], kwargs.get("dimensions"), kwargs.get("encoding_format"), kwargs.get("user"))
        results = await batcher.submit(key, texts)
        tokens = round(sum(share for _, share in results))
        # plain constructors: the SDK's model_construct walks every float (≈ 2.6 ms per 1,536-float vector,
        # 180× slower than validating)
        return openai.types.CreateEmbeddingResponse(
            data=[
                openai.types.Embedding(embedding=vector, index=index, object="embedding")
                for index, (vector, _) in enumerate(results)
            ],
            model=kwargs["model"],
            object="list",
            usage=openai.types.create_embedding_response.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    def create(self, endpoint: str, kwargs: dict[str, Any]) -> Any:
        """``<endpoint>.create(**kwargs)`` through the pipeline (sync clients, via the sync bridge)."""
        pipeline, ctx, cost = self._prepare(endpoint, kwargs)
        create = self._raw_create(endpoint)
        stream = kwargs.get("stream") is True

        def attempt() -> Any:
            ctx.used_tokens = None
            try:
                raw = create(**kwargs)
            except Exception as exc:
                _note_error(ctx, exc)
                raise
            result = _parsed(ctx, cost, raw, stream)
            if not stream:
                return result
            try:
                first = next(result._iterator)
            except StopIteration:
                first = _EMPTY
            except BaseException:
                result.close()
                raise
            return _adopt(type(result), result, _sync_rest(result, first))

        return run_sync(lambda: pipeline.run(lambda: run_in_worker(attempt), ctx))


class GuardedOpenAIClient(AttributeProxy):
    """The proxy :func:`ragguard.guard` returns for an OpenAI client: the SDK's interface, guarded.

    Usable as a context manager like the SDK client itself (``async with`` for ``AsyncOpenAI``, ``with`` for
    ``OpenAI``); leaving it closes the wrapped client's HTTP connections.
    """

    __slots__ = ()

    async def __aenter__(self) -> GuardedOpenAIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __enter__(self) -> GuardedOpenAIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _async_method(core: OpenAIGuard, endpoint: str) -> Callable[..., Any]:
    if endpoint == "embeddings":

        async def embed(**kwargs: Any) -> Any:
            return await core.aembed(kwargs)

        embed.__doc__ = "Guarded, micro-batched ``embeddings.create``: same arguments and return type as the SDK's."
        return embed

    async def create(**kwargs: Any) -> Any:
        return await core.acreate(endpoint, kwargs)

    create.__doc__ = f"Guarded ``{endpoint}.create``: same arguments and return type as the SDK's."
    return create


def _sync_method(core: OpenAIGuard, endpoint: str) -> Callable[..., Any]:
    def create(**kwargs: Any) -> Any:
        return core.create(endpoint, kwargs)

    create.__doc__ = f"Guarded ``{endpoint}.create``: same arguments and return type as the SDK's."
    return create


def guard_openai(
    client: openai.OpenAI | openai.AsyncOpenAI,
    policy: Policy | None = None,
    *,
    backend: MemoryBackend | None = None,
    estimator: TokenEstimator = heuristic_estimator,
    clock: Clock = SYSTEM_CLOCK,
) -> Any:
    """Wrap an OpenAI client; see :func:`ragguard.guard`."""
    core = OpenAIGuard(
        client,
        policy if policy is not None else Policy(),
        backend or default_backend(),
        estimator=estimator,
        clock=clock,
    )
    make = _async_method if isinstance(client, openai.AsyncOpenAI) else _sync_method

    def with_options(**options: Any) -> Any:
        return guard_openai(
            client.with_options(**options),
            core.policy,
            backend=core.backend,
            estimator=estimator,
            clock=clock,
        )

    chat = AttributeProxy(
        client.chat,
        {"completions": AttributeProxy(client.chat.completions, {"create": make(core, "chat.completions")})},
    )
    return GuardedOpenAIClient(
        client,
        {
            "embeddings": AttributeProxy(client.embeddings, {"create": make(core, "embeddings")}),
            "chat": chat,
            "responses": AttributeProxy(client.responses, {"create": make(core, "responses")}),
            "with_options": with_options,
            "copy": with_options,
            "ragguard": core,
        },
    )
