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

import array
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import openai
import pydantic
from opentelemetry import context as otel_context

from .. import _stateful, telemetry
from .._call_options import CallOptions, current_call_options
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._hints import parse_rate_limit_headers
from .._outcome import Outcome, classify_exception, classify_status, headers_of
from .._sync import run_in_worker
from .._tokens import TokenEstimator, estimate_chat_tokens, estimate_text_tokens, heuristic_estimator
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import Policy
from ..degrade import DEGRADED_FINGERPRINT, DEGRADED_ID_PREFIX, Degradation, Trigger, degradable, note, run_sync_noting
from ..errors import Degraded, RagGuardError, StreamInterrupted
from ..guards.batch import MicroBatcher
from ..guards.cache import AsyncCacheStore, Cache, CacheStore, cache_key
from ..guards.coalesce import FOLLOWER_EXTRA, Coalescer
from ..guards.pipeline import Guard, Pipeline
from ..guards.semantic import InMemoryVectorIndex, VectorIndex
from ._proxy import AttributeProxy
from .generic import build_pipeline

__all__ = ["GuardedOpenAIClient", "OpenAIGuard", "classify_openai", "guard_openai", "is_openai_client"]

#: the embeddings arguments the micro-batcher understands (anything else goes unbatched)
_BATCHABLE = frozenset({"model", "input", "dimensions", "encoding_format", "user"})

T = TypeVar("T")

#: each guarded endpoint's operation name in telemetry
_OPERATIONS = {"embeddings": "embeddings", "chat.completions": "chat", "responses": "responses"}

#: the endpoints that go through the pipeline, as attribute paths from the client
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


async def _async_rest(inner: Any, first: Any) -> AsyncIterator[Any]:
    tracker = _Completion()
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
    if not stream and not isinstance(result, pydantic.BaseModel):
        # a 200 whose body is not the documented object (an HTML page from a proxy, a JSON array, null) comes back
        # from the SDK's lenient parsing as a str, list or None: an error (retryable), never the caller's answer.
        # (The SDK's strict mode would do it, but it validates embeddings before decoding their base64.)
        raise openai.APIResponseValidationError(
            response=raw.http_response, body=result, message=f"expected a JSON object, got {type(result).__name__}"
        )
    if not stream:
        used = getattr(result, "usage", None)
        ctx.used_tokens = cost.charged(used)
        if used is not None:
            inputs = getattr(used, "prompt_tokens", None)
            outputs = getattr(used, "completion_tokens", None)
            if inputs is None:  # the Responses API's names
                inputs, outputs = getattr(used, "input_tokens", None), getattr(used, "output_tokens", None)
            ctx.output_tokens = float(outputs) if isinstance(outputs, int) else None  # breakers: slowness per token
            telemetry.note_usage(
                inputs if isinstance(inputs, int) else None, outputs if isinstance(outputs, int) else None
            )
    return result


def _omitted(value: Any) -> bool:
    """Whether ``value`` is the SDK's "argument not given" sentinel (``NOT_GIVEN`` / ``omit``)."""
    return isinstance(value, _SENTINELS)


_SENTINELS: tuple[type, ...] = tuple(t for t in (getattr(openai, "NotGiven", None), getattr(openai, "Omit", None)) if t)
#: arguments that change how the SDK sends a request, not what the provider answers: not part of a request's key
_UNKEYED = frozenset({"timeout", "stream"})


def _deterministic(kwargs: dict[str, Any]) -> bool:
    """A request the provider answers (near) identically every time: ``temperature == 0``."""
    temperature = kwargs.get("temperature")
    return isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0


def _encode_vector(vector: Any) -> Any:
    """An embedding as compact JSON: float lists as base64 of float64s (exact), base64 strings as they are."""
    if isinstance(vector, str):
        return {"s": vector}
    return {"d": base64.b64encode(array.array("d", vector).tobytes()).decode("ascii")}


def _decode_vector(value: Any) -> Any:
    if "s" in value:
        return str(value["s"])
    floats = array.array("d")
    floats.frombytes(base64.b64decode(value["d"], validate=True))
    return floats.tolist()


def _prompt_text(kwargs: dict[str, Any]) -> str | None:
    """The text a semantic cache embeds for a chat request: each message's role and text, one per line."""
    messages = kwargs.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        return None
    lines = []
    for message in messages:
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
        else:
            role, content = getattr(message, "role", None), getattr(message, "content", None)
        if isinstance(content, list):
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        if not isinstance(content, str):
            return None  # tool results, images…: not something a text embedding can stand for
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


def _embedding_response(vectors: list[Any], model: str, tokens: int) -> Any:
    # validating constructors: the SDK's model_construct walks every float (≈ 2.6 ms per 1,536-float vector,
    # 180× slower); a base64 string embedding is only valid unvalidated, as the SDK itself builds it
    data = [
        openai.types.Embedding.model_construct(embedding=vector, index=index, object="embedding")
        if isinstance(vector, str)
        else openai.types.Embedding(embedding=vector, index=index, object="embedding")
        for index, vector in enumerate(vectors)
    ]
    return openai.types.CreateEmbeddingResponse(
        data=data,
        model=model,
        object="list",
        usage=openai.types.create_embedding_response.Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _texts(inputs: Any) -> list[str] | None:
    """An embeddings ``input`` as a list of non-empty texts, or ``None`` (token arrays, empty texts…)."""
    texts = [inputs] if isinstance(inputs, str) else inputs
    if isinstance(texts, list) and texts and all(isinstance(text, str) and text for text in texts):
        return texts
    return None


class _Missing:
    __slots__ = ()


_MISSING = _Missing()
_RESPONSE_TYPES: dict[str, Callable[[Any], Any]] = {
    "chat.completions": openai.types.chat.ChatCompletion.model_validate,
    "responses": openai.types.responses.Response.model_validate,
}


def _dump(response: Any) -> Any:
    return response.model_dump(mode="json")


#: ``ctx.extras`` key of what the degraded path needs: ``(endpoint, kwargs, options)``
_DEGRADE_EXTRA = "ragguard.degrade"


def _degraded_answer(endpoint: str, kwargs: dict[str, Any], context: str) -> Any:
    """The answer ``skip_generation`` gives instead of calling the model: the SDK's own type, ``context`` as its
    text, no usage, marked by an id starting ``ragguard-degraded-`` and (chat) ``system_fingerprint``
    ``ragguard-degraded``."""
    import time
    import uuid

    model = kwargs.get("model")
    model = model if isinstance(model, str) else ""
    ident = DEGRADED_ID_PREFIX + uuid.uuid4().hex
    if endpoint == "chat.completions":
        n = kwargs.get("n")
        message = {"role": "assistant", "content": context}
        return openai.types.chat.ChatCompletion.model_validate(
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": DEGRADED_FINGERPRINT,
                "choices": [
                    {"index": i, "finish_reason": "stop", "logprobs": None, "message": message}
                    for i in range(n if isinstance(n, int) and n > 0 else 1)
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )
    return openai.types.responses.Response.model_validate(
        {
            "id": ident,
            "object": "response",
            "created_at": time.time(),
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": ident,
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": context, "annotations": []}],
                }
            ],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
        }
    )


class OpenAIGuard:
    """The shared core of one guarded OpenAI client: pipelines per (endpoint, model), cost rules, attempts,
    and the call-saving layers (caches, single-flight, micro-batching).

    Proxies made by :func:`guard_openai` are thin; their state lives here and in the backend, so every proxy of
    the same credential shares one rate limit and one breaker per endpoint and model, one cache store and one
    single-flight table. Sync clients run through the same async core (the sync bridge), attempts in a worker
    thread.
    """

    def __init__(
        self,
        client: openai.OpenAI | openai.AsyncOpenAI,
        policy: Policy,
        backend: Backend,
        *,
        estimator: TokenEstimator = heuristic_estimator,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.client = client
        self.is_async = isinstance(client, openai.AsyncOpenAI)
        #: the same client with the SDK's own retries switched off: one retry layer, ours
        self.raw = client.with_options(max_retries=0)
        self.policy = policy
        self.backend = backend
        self.estimator = estimator
        self.clock = clock
        #: the credential's fingerprint (sha256 of endpoint, organisation and key; never the key in clear)
        self.scope = _credential_scope(client)
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        #: ``Policy.degrade`` when a mode is on, else ``None`` (see :mod:`ragguard.degrade`)
        self.degrade = policy.degrade if policy.degrade.enabled else None
        caching = policy.cache
        self.store: CacheStore | AsyncCacheStore | None = None
        self.embedding_cache: Cache | None = None
        self.response_caches: dict[str, Cache] = {}
        self.semantic_index: VectorIndex | None = None
        #: chat completions answered by the semantic cache (telemetry)
        self.semantic_hits = 0
        if caching.enabled:
            self.store = _stateful.cache_store(backend, caching, clock=clock)
            if caching.embeddings:
                self.embedding_cache = Cache.from_policy(
                    caching, store=self.store, encode=_encode_vector, decode=_decode_vector, clock=clock
                )
            if caching.responses != "off":
                self.response_caches = {
                    endpoint: Cache.from_policy(caching, store=self.store, encode=_dump, decode=decode, clock=clock)
                    for endpoint, decode in _RESPONSE_TYPES.items()
                }
                if caching.semantic.enabled:
                    semantic = caching.semantic
                    self.semantic_index = backend.get_or_create(
                        "semantic_index",
                        f"openai:{semantic.max_entries}",
                        lambda: InMemoryVectorIndex(semantic.max_entries),
                    )
        coalescing = policy.coalesce
        #: shared by every guarded OpenAI client of the backend; keys include the credential fingerprint
        self.coalescer: Coalescer = backend.get_or_create(
            "coalescer", f"openai:{coalescing.max_keys}", lambda: Coalescer(max_keys=coalescing.max_keys, clock=clock)
        )
        #: cross-caller micro-batching of embeddings inputs
        self.batcher: MicroBatcher[str, tuple[Any, float]] | None = None
        if policy.batching.enabled:
            self.batcher = MicroBatcher.from_policy(
                policy.batching,
                self._dispatch_embeddings,
                cost=lambda text: float(estimator(text)),
                is_item_error=lambda exc: isinstance(exc, openai.BadRequestError),
                clock=clock,
            )

    def cache_stats(self) -> dict[str, int]:
        """Counters of the call-saving layers, for telemetry: cache hits, misses and evictions per layer,
        semantic hits, and single-flight leaders and followers (followers are calls that cost nothing)."""
        stats: dict[str, int] = {}
        caches = [("embeddings", self.embedding_cache), *self.response_caches.items()]
        for name, cache in caches:
            if cache is not None:
                stats[f"{name}.hits"] = cache.hits
                stats[f"{name}.misses"] = cache.misses
        stats["evictions"] = int(getattr(self.store, "evictions", 0))
        stats["semantic.hits"] = self.semantic_hits
        stats["coalesce.leaders"] = self.coalescer.leaders
        stats["coalesce.followers"] = self.coalescer.followers
        return stats

    def pipeline(self, endpoint: str, model: str) -> Pipeline:
        """The pipeline for one endpoint and model (built once, shared by every call)."""
        pipeline = self._pipelines.get((endpoint, model))
        if pipeline is None:
            pipeline = self._pipelines.setdefault(
                (endpoint, model), self._degradable(endpoint, self._build(endpoint, model))
            )
        return pipeline

    def _build(self, endpoint: str, model: str) -> Pipeline:
        scope = self.scope
        outer: list[Guard] = []
        cache = self.response_caches.get(endpoint)
        if cache is not None:
            outer.append(cache)
        if self.policy.coalesce.enabled:
            outer.append(self.coalescer)
        return build_pipeline(
            self.policy,
            self.backend,
            breaker=f"{scope}:{endpoint}:{model}",
            label=f"openai:{endpoint}:{model}",
            bucket=scope if self.policy.rate_limit.scope == "credential" else f"{scope}:{model}",
            bulkhead=scope,
            clock=self.clock,
            classify=classify_openai,
            outer=outer,
            hedge=endpoint == "embeddings",  # an idempotent read; chat answers are not (Policy.hedge, opt-in)
        )

    # degradation (Policy.degrade) --------------------------------------------------------------------------

    def _degradable(self, endpoint: str, pipeline: Pipeline) -> Pipeline:
        """``pipeline`` headed by a :class:`~ragguard.degrade.Degrader` when a degradation mode applies to the
        endpoint (``cache_only`` to all three, ``skip_generation`` to chat completions and responses)."""
        policy = self.degrade
        if policy is None or not (policy.cache_only or (policy.skip_generation and endpoint != "embeddings")):
            return pipeline
        return degradable(pipeline, policy, self._on_degraded)

    async def _on_degraded(self, call: Callable[[], Awaitable[Any]], ctx: CallContext, trigger: Trigger) -> Any:
        """Answer a degraded call without the provider: its exact cached answer, else (``skip_generation``) the
        app's context as a well-formed answer, else :class:`~ragguard.Degraded`."""
        extras = ctx.extras or {}
        stash = extras.get(_DEGRADE_EXTRA)
        if stash is None:  # a call made on the pipeline directly, not through the client: not degradable
            if trigger.cause is not None:
                raise trigger.cause
            return await call()
        endpoint, kwargs, options = stash
        policy = self.degrade
        if policy is None:  # a Degrader is only built with a policy
            raise RuntimeError("degraded call without a degradation policy")
        generation = policy.skip_generation and endpoint != "embeddings"
        stream = kwargs.get("stream") is True
        if not stream:
            cache, key = self.response_caches.get(endpoint), extras.get("cache_key")
            if cache is not None and key is not None:
                found = await cache.get(key, _MISSING)
                if found is not _MISSING:
                    extras["cache_hit"] = True
                    note(Degradation(trigger.reason, ("cache_only",), trigger.detail))
                    return found
            if generation and options.context is not None:
                note(Degradation(trigger.reason, ("skip_generation",), trigger.detail))
                return _degraded_answer(endpoint, kwargs, options.context)
        note(Degradation(trigger.reason, (), trigger.detail))
        if stream:
            why = "a streamed call cannot be answered degraded"
        elif generation:
            why = "no cached answer, and no context supplied with ragguard.call_options(context=...)"
        else:
            why = "no cached answer"
        raise Degraded(
            f"{endpoint} degraded ({trigger.detail}): {why}; the provider was not called",
            mode="skip_generation" if generation else "cache_only",
            reason=trigger.reason,
        ) from trigger.cause

    # keys ----------------------------------------------------------------------------------------------------

    def _key_scope(self, options: CallOptions) -> str | None:
        """The tenant scope of a call's keys: ``Policy.cache.scope`` and the call's own, joined."""
        policy_scope = self.policy.cache.scope
        if options.scope is None:
            return policy_scope
        return options.scope if policy_scope is None else f"{policy_scope}/{options.scope}"

    def _request_key(self, endpoint: str, kwargs: dict[str, Any], scope: str | None) -> str | None:
        """The key of a request's answer: namespace, scope, credential fingerprint and every argument that
        shapes the answer, hashed; ``None`` when an argument cannot be keyed (the call then runs unkeyed)."""
        keyed = {name: value for name, value in kwargs.items() if name not in _UNKEYED and not _omitted(value)}
        try:
            return cache_key(self.policy.cache.namespace, scope, self.scope, "openai", endpoint, keyed)
        except (TypeError, ValueError):
            return None

    def _keys(self, endpoint: str, kwargs: dict[str, Any], options: CallOptions) -> dict[str, Any] | None:
        """``ctx.extras`` holding the call's cache and single-flight keys (``None``: neither applies)."""
        if kwargs.get("stream") is True:
            return None  # a stream is consumed by one caller, and a partial one must never be cached
        caching, coalescing = self.policy.cache, self.policy.coalesce
        if endpoint == "embeddings":
            cacheable = False
            coalescable = coalescing.embeddings
        else:
            deterministic = _deterministic(kwargs)
            cacheable = (
                options.cache and endpoint in self.response_caches and (caching.responses == "all" or deterministic)
            )
            # with the cache on, a miss for a request already being fetched waits for it (stampede protection)
            coalescable = cacheable or (coalescing.completions and (deterministic or options.coalesce_key is not None))
        if not (coalescing.enabled and coalescable) and not cacheable:
            return None
        key = self._request_key(endpoint, kwargs, self._key_scope(options))
        if key is None:
            return None
        extras: dict[str, Any] = {}
        if cacheable:
            extras["cache_key"] = key
        if coalescing.enabled and coalescable:
            extras["coalesce_key"] = key if options.coalesce_key is None else f"{key}|{options.coalesce_key}"
        return extras

    # calls ---------------------------------------------------------------------------------------------------

    def _raw_create(self, endpoint: str) -> Callable[..., Any]:
        resource: Any = self.raw
        for part in _GUARDED[endpoint]:
            resource = getattr(resource, part)
        return resource.with_raw_response.create  # type: ignore[no-any-return]

    def _attempt(self, endpoint: str, kwargs: dict[str, Any], ctx: CallContext, cost: _Cost) -> Callable[[], Any]:
        """One attempt of the SDK call: parse the raw response, note rate-limit headers and usage, fetch a
        stream's first chunk (so a stream that fails before it is retried). Sync clients run in a worker."""
        create = self._raw_create(endpoint)
        stream = kwargs.get("stream") is True
        clock = self.clock  # times the attempt itself (ctx.attempt_s, ctx.first_token_s) for breakers

        def parse(raw: Any) -> Any:
            # a 200 body the SDK's own parser chokes on (an HTML page from a proxy, e.g. an AttributeError in the
            # embeddings base64 decoding) is a malformed answer, as the SDK's own error type: retried, and what a
            # RetryExhausted chains, never a bare AttributeError
            try:
                return _parsed(ctx, cost, raw, stream)
            except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
                raise openai.APIResponseValidationError(
                    response=raw.http_response, body=None, message=f"the response could not be parsed: {exc!r}"
                ) from exc

        def no_event(raw: Any) -> openai.APIResponseValidationError:
            # a streamed 200 without a single SSE event (an HTML page from a proxy): malformed, so retried like
            # one, never handed over as an empty stream that ends "successfully"
            return openai.APIResponseValidationError(
                response=raw.http_response, body=None, message="a streamed response without a single event"
            )

        if self.is_async:

            async def attempt() -> Any:
                ctx.used_tokens = ctx.output_tokens = ctx.first_token_s = ctx.attempt_s = None
                started = clock.now()
                with telemetry.attempt(ctx.tokens):
                    try:
                        raw = await create(**kwargs)
                    except Exception as exc:
                        ctx.attempt_s = clock.now() - started
                        _note_error(ctx, exc)
                        raise
                    result = parse(raw)
                    ctx.attempt_s = clock.now() - started
                    if not stream:
                        return result
                    try:
                        first = await result._iterator.__anext__()
                    except StopAsyncIteration:
                        await result.close()
                        raise no_event(raw) from None
                    except BaseException:
                        await result.close()
                        raise
                    ctx.first_token_s = ctx.attempt_s = clock.now() - started
                    return _adopt(type(result), result, _async_rest(result, first))

            return attempt

        def blocking_attempt() -> Any:
            ctx.used_tokens = ctx.output_tokens = ctx.first_token_s = ctx.attempt_s = None
            started = clock.now()
            try:
                raw = create(**kwargs)
            except Exception as exc:
                ctx.attempt_s = clock.now() - started
                _note_error(ctx, exc)
                raise
            result = parse(raw)
            ctx.attempt_s = clock.now() - started
            if not stream:
                return result
            try:
                first = next(result._iterator)
            except StopIteration:
                result.close()
                raise no_event(raw) from None
            except BaseException:
                result.close()
                raise
            ctx.first_token_s = ctx.attempt_s = clock.now() - started
            return _adopt(type(result), result, _sync_rest(result, first))

        async def threaded_attempt() -> Any:
            with telemetry.attempt(ctx.tokens):
                return await run_in_worker(blocking_attempt)

        return threaded_attempt

    async def acreate(self, endpoint: str, kwargs: dict[str, Any], options: CallOptions | None = None) -> Any:
        """``<endpoint>.create(**kwargs)`` through the pipeline: cache → single-flight → deadline → retry →
        breaker → rate limit → concurrency → attempt timeout → the SDK (the async core of both client kinds)."""
        if options is None:
            options = current_call_options()
        note(None)  # last_degradation() reports this call: set again if it is degraded
        model = kwargs.get("model")
        pipeline = self.pipeline(endpoint, model if isinstance(model, str) else "")
        cost = _estimate(endpoint, kwargs, self.estimator)
        ctx = pipeline.context(tokens=float(cost.reserved), operation=endpoint)
        extras = ctx.extras = self._keys(endpoint, kwargs, options)
        if self.degrade is not None:  # what the degraded path needs to answer this call
            extras = ctx.extras = {**(extras or {}), _DEGRADE_EXTRA: (endpoint, kwargs, options)}
        attempt = self._attempt(endpoint, kwargs, ctx, cost)
        index = self.semantic_index
        if index is not None and endpoint == "chat.completions" and extras and "cache_key" in extras:
            result = await self._semantic(index, pipeline, ctx, extras, attempt, kwargs, options)
        else:
            result = await pipeline.run(attempt, ctx)
        if extras:
            telemetry.note_result(cache_hit=bool(extras.get("cache_hit")), coalesced=bool(extras.get(FOLLOWER_EXTRA)))
        return result

    async def _semantic(
        self,
        index: VectorIndex,
        pipeline: Pipeline,
        ctx: CallContext,
        extras: dict[str, Any],
        attempt: Callable[[], Any],
        kwargs: dict[str, Any],
        options: CallOptions,
    ) -> Any:
        """A chat completion through the semantic cache: exact hit, else a near-enough cached prompt's answer,
        else the pipeline (whose exact cache fills), then the prompt joins the index."""
        cache, key = self.response_caches["chat.completions"], extras["cache_key"]
        found = await cache.get(key, _MISSING, record=False)
        text = _prompt_text(kwargs)
        if found is not _MISSING or text is None:
            return await pipeline.run(attempt, ctx)  # counts the exact hit, or runs unindexed
        semantic = self.policy.cache.semantic
        rest = {name: value for name, value in kwargs.items() if name != "messages"}
        partition = self._request_key("chat.completions.semantic", rest, self._key_scope(options))
        if partition is None:
            return await pipeline.run(attempt, ctx)
        lookup = {"model": semantic.embedding_model, "input": text}
        embedded = await self.observed("embeddings", lookup, lambda: self.aembed(lookup, options))
        vector = embedded.data[0].embedding
        near = await index.nearest(partition, vector, semantic.max_distance)
        if near is not None:
            answer = await cache.get(near[0], _MISSING)
            if answer is not _MISSING:
                self.semantic_hits += 1
                extras["cache_hit"] = "semantic"
                extras["semantic_distance"] = near[1]
                return answer
            await index.remove(partition, near[0])  # its answer expired or was evicted
        result = await pipeline.run(attempt, ctx)
        await index.add(partition, vector, key)
        return result

    def create(self, endpoint: str, kwargs: dict[str, Any]) -> Any:
        """``<endpoint>.create(**kwargs)`` for sync clients: the same async core, through the sync bridge."""
        # read here: the bridge's loop does not run in the caller's context
        options, parent = current_call_options(), telemetry.current_otel_context()
        if endpoint == "embeddings":
            call: Callable[[], Awaitable[Any]] = lambda: self.aembed(kwargs, options)  # noqa: E731
        else:
            call = lambda: self.acreate(endpoint, kwargs, options)  # noqa: E731
        return run_sync_noting(lambda: self.observed(endpoint, kwargs, call, parent))

    def observed(
        self,
        endpoint: str,
        kwargs: dict[str, Any],
        fn: Callable[[], Awaitable[T]],
        parent: otel_context.Context | None = None,
    ) -> Awaitable[T]:
        """``fn()`` as one observed call of ``endpoint``: a span, metrics, usage accounting, events."""
        model = kwargs.get("model")
        return telemetry.observe_call(
            "openai",
            _OPERATIONS[endpoint],
            model if isinstance(model, str) else "",
            self.scope,
            fn,
            parent=parent,
            genai_operation="chat" if endpoint == "responses" else None,
        )

    async def _dispatch_embeddings(self, key: Any, texts: list[str]) -> list[tuple[Any, float]]:
        """One upstream embeddings request for a batch; each text's vector and its share of ``usage``."""
        model, dimensions, encoding_format, user = key
        kwargs: dict[str, Any] = {"model": model, "input": texts}
        for name, value in (("dimensions", dimensions), ("encoding_format", encoding_format), ("user", user)):
            if value is not None:
                kwargs[name] = value

        async def send() -> Any:
            telemetry.note_result(batch_size=len(texts))
            return await self.acreate("embeddings", kwargs)

        # the batch is its own call (its own span), not one of the callers'
        response = await self.observed("embeddings", kwargs, send)
        vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
        if len(vectors) != len(texts):
            raise RagGuardError(f"the provider returned {len(vectors)} embeddings for {len(texts)} inputs")
        estimates = [max(1, self.estimator(text)) for text in texts]
        total = sum(estimates)
        prompt = float(response.usage.prompt_tokens) if response.usage is not None else float(total)
        return [(vector, prompt * estimate / total) for vector, estimate in zip(vectors, estimates, strict=True)]

    async def aembed(self, kwargs: dict[str, Any], options: CallOptions | None = None) -> Any:
        """``embeddings.create`` through the embedding cache and the micro-batcher.

        Each input is looked up in the cache (model, dimensions, encoding, sha256 of the text, credential,
        scope); only the missing ones go upstream, once each, micro-batched with concurrent callers' inputs
        when batching is on, or as one request (shared with identical concurrent requests) when it is not. The
        response is rebuilt for this caller, its ``usage`` counting only the tokens sent upstream for it.
        Requests the layers cannot take apart (token arrays, extra options) go through as they are.

        Raises (besides the pipeline's errors): :class:`~ragguard.DeadlineExceeded` when ``Policy.timeout.total``
        seconds, counted from this call's start, pass while its inputs wait in the micro-batcher (for the batch's
        timer, a send slot, or the batch's call).
        """
        if options is None:
            options = current_call_options()
        note(None)  # last_degradation() reports this call: set again if it is degraded
        # the call's total deadline (Policy.timeout.total), from its start, as the pipeline's Deadline counts it:
        # it bounds the micro-batch waits (the batch's timer, a send slot) as well as the call itself
        total = self.policy.timeout.total
        deadline = float("inf") if total is None else self.clock.now() + total
        inputs = kwargs.get("input")
        model = kwargs.get("model")
        texts = _texts(inputs)
        cache = self.embedding_cache if options.cache else None
        if (
            texts is None
            or not isinstance(model, str)
            or not set(kwargs) <= _BATCHABLE
            or (cache is None and self.batcher is None)
        ):
            return await self.acreate("embeddings", kwargs, options)
        dimensions, encoding_format = kwargs.get("dimensions"), kwargs.get("encoding_format")
        vectors: list[Any] = [_MISSING] * len(texts)
        keys: dict[str, str] = {}  # text -> its cache key
        if cache is not None:
            scope = self._key_scope(options)
            try:
                for text in texts:
                    if text not in keys:
                        digest = hashlib.sha256(text.encode()).hexdigest()
                        parts = ("openai.embeddings", model, dimensions, encoding_format, digest)
                        keys[text] = cache_key(cache.policy.namespace, scope, self.scope, *parts)
            except (TypeError, ValueError):  # a scope (or text) that cannot be keyed: this call goes uncached
                cache = None
                keys.clear()
        if cache is not None:
            for i, text in enumerate(texts):
                vectors[i] = await cache.get(keys[text], _MISSING)
        missing = [i for i, vector in enumerate(vectors) if vector is _MISSING]
        tokens = 0
        if not missing:
            telemetry.note_result(cache_hit=True)
        if missing:
            todo = list(dict.fromkeys(texts[i] for i in missing))  # each distinct text once
            if self.batcher is not None:
                batch_key = (model, dimensions, encoding_format, kwargs.get("user"))
                results = await self.batcher.submit(batch_key, todo, deadline=deadline)
                fetched = {text: vector for text, (vector, _) in zip(todo, results, strict=True)}
                tokens = round(sum(share for _, share in results))
            else:
                if len(todo) == len(texts) and cache is None:
                    return await self.acreate("embeddings", kwargs, options)
                request = dict(kwargs)
                request["input"] = inputs if len(todo) == len(texts) else todo
                response = await self.acreate("embeddings", request, options)
                got = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
                if len(got) != len(todo):
                    raise RagGuardError(f"the provider returned {len(got)} embeddings for {len(todo)} inputs")
                fetched = dict(zip(todo, got, strict=True))
                tokens = response.usage.prompt_tokens if response.usage is not None else 0
            for i in missing:
                vectors[i] = fetched[texts[i]]
            if cache is not None:
                for text, vector in fetched.items():
                    await cache.set(keys[text], vector)
        return _embedding_response(vectors, model, tokens)


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
            return await core.observed(endpoint, kwargs, lambda: core.aembed(kwargs))

        embed.__doc__ = "Guarded, cached, micro-batched ``embeddings.create``: same arguments and return type."
        return embed

    async def create(**kwargs: Any) -> Any:
        return await core.observed(endpoint, kwargs, lambda: core.acreate(endpoint, kwargs))

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
    backend: Backend | None = None,
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
