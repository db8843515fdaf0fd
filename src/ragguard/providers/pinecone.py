"""Guarded Pinecone indexes: ``ragguard.guard(pc.Index(host=...))`` and ``ragguard.guard(pc.IndexAsyncio(host=...))``.

For the ``pinecone`` 10.x REST data-plane clients, sync :class:`pinecone.Index` and asyncio
:class:`pinecone.AsyncIndex`. The proxy keeps the SDK's interface, keyword-only methods and return types.
``upsert``, ``query``, ``fetch``, ``delete``, ``update``, ``delete_namespace`` and ``describe_index_stats`` go
through the pipeline (deadline → retry → circuit breaker → rate limit → concurrency → attempt timeout; ``query``
also through the retrieval cache and single-flight); every other attribute is the SDK's own, untouched (and
unguarded: ``query_namespaces``, ``list``, ``search``… keep the SDK's behaviour).

What this module knows about Pinecone (everything else is in the domain-free guards):

- **Which errors to retry** (:func:`classify_pinecone`), from the SDK's own exception classes
  (``pinecone.errors``): ``RateLimitError`` (429) waits ``.retry_after`` (the ``Retry-After`` header) and pauses
  the bucket; ``ServiceError`` (5xx), ``PineconeTimeoutError`` and ``PineconeConnectionError`` are retried and
  count against the breaker; every other 4xx (``PayloadTooLargeError`` included) and the SDK's local
  validation errors (``PineconeValueError``, ``PineconeTypeError``) are never retried. 402 is a billing failure.
- **Bulk upserts**: ``upsert`` splits ``vectors`` into requests of at most 1,000 vectors **and** at most
  :data:`MAX_REQUEST_BYTES` of encoded JSON (2 MiB less a 5 % safety margin, metadata included: each vector is
  encoded with ``orjson`` exactly as the SDK will send it, plus the body's envelope). The requests run
  concurrently (an anyio task group of ``max_concurrency`` workers: the call's, else the SDK's default of 8,
  capped by ``Policy.concurrency.max_in_flight``), each one through the pipeline, so each is paced by the rate
  limiter and retried on its own: only failed requests are retried. A request answered ``413``
  (``PayloadTooLargeError``) is split in halves and both are sent. The call returns one SDK ``UpsertResponse``
  whose ``upserted_count`` is the sum of what the server acknowledged; if any request still fails after its
  retries, :class:`UpsertIncomplete` is raised carrying every vector ID that did not land (``.failed_ids``), the
  true ``.upserted_count``, and the first failure as ``__cause__``: nothing is dropped silently. Vectors are
  accepted in every form the SDK accepts (``Vector``, ``(id, values)``, ``(id, values, metadata)``, dicts) and
  normalised by the SDK's own ``VectorFactory``; a vector ID given twice in one call is sent once, its last
  version winning (concurrent requests could otherwise apply an older version last).
- **Idempotent ingestion**: an upsert overwrites a vector with the same ID, so a retried (or repeated) ingestion
  writes nothing twice as long as IDs depend on the content, not on when or in which order it was ingested. Use
  :func:`stable_id` (sha256 of a canonical JSON of namespace, text and metadata) as the vector ID.
- **Retrieval cache**: ``query`` results are cached (``Policy.cache``) under
  :func:`~ragguard.retrieval_cache_key` (index host, namespace, sha256 of the query vector, ``top_k``, filter,
  ``include_*`` flags, tenant scope, credential fingerprint), encoded as the SDK's ``QueryResponse`` JSON and
  decoded back to a ``QueryResponse``. Every key of one (index, namespace) starts with the same prefix, so an
  ``upsert``, ``delete``, ``update`` or ``delete_namespace`` through any guarded client of the same backend and
  cache namespace invalidates exactly that namespace (``Cache.ainvalidate(prefix)``, shared store included). A
  per-namespace generation number in the keys (per backend) also retires answers of queries that were in flight
  during the write. A write is invalidated after it ends, failed or cancelled too (part of it may have landed);
  a cache store that cannot be reached then is logged at warning level, never turned into a failed write.
- **Retries never multiply**: Pinecone's REST transport retries data-plane requests itself (``_RetryTransport``:
  up to 3 retries of 408/429/5xx and connection errors, with a process-wide retry budget), and its public
  ``retry_config`` reaches only the control plane: ``Index`` / ``AsyncIndex`` build their ``PineconeConfig``
  without it. The guard therefore calls the SDK through a shallow copy of the index whose data-plane HTTP client
  is rebuilt with the SDK's own constructor (``HTTPClient`` / ``AsyncHTTPClient(config, DATA_PLANE_API_VERSION)``)
  from ``dataclasses.replace(index._config, retry_config=RetryConfig(max_retries=0))``. Chosen as the least
  fragile option: it relies on one frozen dataclass field and one constructor that every 10.x client uses, changes
  neither the user's index nor any global (no patched transport, no monkeypatched sleep), and the SDK's public
  methods (called on the copy, resolved on the class) still build requests and parse responses. If an SDK
  upgrade changes those internals, the guard warns (``RuntimeWarning``) and falls back to the index as given
  (SDK retries then stack under ours); ``tests/providers/test_pinecone.py`` fails in that case (with every
  request answered 5xx, the server must see exactly the attempts ragguard's ``Retry`` makes). A side benefit: the
  SDK's retry backoff sleeps with ``asyncio.sleep``, so a bare ``AsyncIndex`` fails on trio at its first retry;
  the guarded one never reaches that code and works on trio too.

The rate limiter counts requests (``Policy.rate_limit.rpm``) and, in its token bucket, vectors upserted
(``Policy.rate_limit.tpm`` reads as *vectors per minute* here: Pinecone has no tokens, it limits write units);
an upsert request then never holds more vectors than that bucket does (``tpm / 60 · burst_seconds``). With
``rate_limit.scope == "model"`` (the default) reads (``query``, ``fetch``, ``describe_index_stats``) and writes
(``upsert``, ``delete``, ``update``, ``delete_namespace``) have their own bucket and breaker per index and
credential, as Pinecone limits them separately; ``"credential"`` pools them.

This module imports the ``pinecone`` SDK lazily: :func:`stable_id` and :class:`UpsertIncomplete` work without it.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import inspect
import json
import logging
import math
import re
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from opentelemetry import context as otel_context

from .. import _stateful, telemetry
from .._call_options import CallOptions, current_call_options
from .._clock import SYSTEM_CLOCK, Clock
from .._context import CallContext
from .._outcome import Outcome, classify_exception, classify_status
from .._shielded import run_shielded
from .._sync import run_in_worker
from ..backends.base import Backend
from ..backends.memory import default_backend
from ..config import Policy
from ..degrade import Degradation, Trigger, degradable, note, run_sync_noting
from ..errors import ConfigError, DeadlineExceeded, Degraded, RagGuardError
from ..guards.cache import AsyncCacheStore, Cache, CacheStore, _escape, fingerprint, retrieval_cache_key
from ..guards.coalesce import Coalescer
from ..guards.pipeline import Guard, Pipeline
from ._proxy import AttributeProxy
from .generic import build_pipeline

T = TypeVar("T")

if TYPE_CHECKING:
    from pinecone import AsyncIndex, Index

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_VECTORS_PER_REQUEST",
    "GuardedPineconeIndex",
    "PineconeGuard",
    "UpsertIncomplete",
    "classify_pinecone",
    "guard_pinecone",
    "is_pinecone_index",
    "stable_id",
]

logger = logging.getLogger("ragguard.pinecone")

#: Pinecone's limit on vectors per upsert request
MAX_VECTORS_PER_REQUEST = 1_000
#: Pinecone's limit on an upsert request's size ("2 MB"), read as 2 MiB
PINECONE_MAX_REQUEST_BYTES = 2 * 1024 * 1024
#: the size the guard keeps each upsert body under: 5 % below the limit (1,992,294 bytes, also < 2,000,000)
MAX_REQUEST_BYTES = int(PINECONE_MAX_REQUEST_BYTES * 0.95)

_READS = frozenset({"query", "fetch", "describe_index_stats"})
_WRITES = frozenset({"upsert", "delete", "update", "delete_namespace"})
_UPSERT_ARGS = frozenset(
    {"vectors", "namespace", "batch_size", "show_progress", "max_concurrency", "timeout", "total_timeout"}
)
#: the SDK's default ``max_concurrency`` of a batched upsert (``DEFAULT_MAX_CONCURRENCY``), used when the call
#: gives none
_DEFAULT_WIDTH = 8
#: how long an invalidation may take while the call is being cancelled (it runs shielded)
_SHIELDED_INVALIDATION = 5.0
#: a 400 whose message says the request was too big is handled like a 413 (some deployments answer so)
_TOO_LARGE_MESSAGE = re.compile(r"request size|exceeds the maximum supported size|payload too large", re.I)
_DEFAULT_NAMESPACES = ("", "__default__")


# --- stable ids ----------------------------------------------------------------------------------------------


def stable_id(text: str, *, namespace: str | None = None, metadata: Mapping[str, Any] | None = None) -> str:
    """A content-hash vector ID: the same chunk always gets the same ID, so re-ingesting it overwrites it.

    The ID is the sha256 (64 hex digits, valid as a Pinecone ID) of a canonical JSON (sorted keys, no
    whitespace, UTF-8 kept) of ``[namespace, text, metadata]``. A retried upsert, a re-run of an ingestion job
    after a crash, or the same document ingested twice therefore overwrites its vectors instead of adding
    duplicates; a chunk whose text or metadata changed gets a new ID (delete the old one if it must go). Pass
    ``metadata`` only when it is part of the chunk's identity (source URL, chunk number…), not for volatile
    fields such as an ingestion timestamp, or every run would write new vectors.

    Args:
        text: the chunk's text.
        namespace: the vector namespace (or any partition of your own); ``None`` and ``""`` differ.
        metadata: JSON-serialisable values that identify the chunk (dict order does not matter).

    Raises:
        TypeError: ``text`` is not a string, or ``metadata`` is not JSON-serialisable.
        ValueError: ``metadata`` holds NaN or an infinity.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    payload = json.dumps(
        [namespace, text, dict(metadata) if metadata is not None else None],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --- errors --------------------------------------------------------------------------------------------------


class UpsertIncomplete(RagGuardError):
    """A guarded ``upsert`` could not write every vector: some requests still failed after their retries.

    The vectors of the requests that succeeded are written; the others are listed, never dropped silently.
    Upserting the listed vectors again is safe (an upsert overwrites by ID). ``__cause__`` is the first
    request's error (e.g. :class:`~ragguard.RetryExhausted` chaining a ``ServiceError``).

    Attributes:
        failed_ids: the IDs of every vector that may not have been written, in input order.
        upserted_count: how many vectors the server acknowledged.
        errors: each failed request's vector IDs and error.
    """

    def __init__(
        self,
        message: str,
        *,
        failed_ids: list[str],
        upserted_count: int,
        errors: list[tuple[list[str], BaseException]],
    ) -> None:
        super().__init__(message)
        self.failed_ids = failed_ids
        self.upserted_count = upserted_count
        self.errors = errors


# --- the SDK, imported lazily ----------------------------------------------------------------------------------


def is_pinecone_index(obj: object) -> bool:
    """Whether ``obj`` is a ``pinecone`` 10.x REST index client (``pinecone.Index`` or ``pinecone.AsyncIndex``)."""
    if not type(obj).__module__.startswith("pinecone"):
        return False  # never import the SDK for an object that cannot be one of its clients
    from pinecone import AsyncIndex, Index

    return isinstance(obj, (Index, AsyncIndex))


def _too_large(exc: BaseException) -> bool:
    """Whether the server refused a request for its size (413, or a 400 saying so)."""
    from pinecone.errors import ApiError, PayloadTooLargeError

    if isinstance(exc, PayloadTooLargeError):
        return True
    return isinstance(exc, ApiError) and exc.status_code == 400 and bool(_TOO_LARGE_MESSAGE.search(str(exc)))


def classify_pinecone(exc: BaseException) -> Outcome:
    """Classify an exception raised by the pinecone SDK; other exceptions get the generic verdict.

    - ``RateLimitError`` (429): retryable, rate-limited, waiting ``exc.retry_after`` (``Retry-After``).
    - ``ServiceError`` (5xx): retryable, a failure (any ``Retry-After`` it carries is honoured).
    - ``PineconeTimeoutError``, ``PineconeConnectionError``: retryable failures (except a connection error
      whose request could not even be encoded: an illegal header value is not transient).
    - ``PaymentRequiredError`` (402): ``quota``, never retried.
    - any other ``ApiError`` (400, 401, 403, 404, 409, 412, 413…): a client error, never retried (408 excepted).
    - other SDK errors (``PineconeValueError``, ``PineconeTypeError``, ``ResponseParsingError``): never retried.
    """
    if not type(exc).__module__.startswith("pinecone"):
        return classify_exception(exc)
    from pinecone.errors import (
        ApiError,
        PaymentRequiredError,
        PineconeConnectionError,
        PineconeError,
        PineconeTimeoutError,
        RateLimitError,
        ServiceError,
    )

    if isinstance(exc, ApiError):
        headers = exc.headers or {}
        status = exc.status_code
        if isinstance(exc, RateLimitError) or status == 429:
            outcome = classify_status(429, headers)
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(retry_after, (int, float)) and retry_after >= 0:
                outcome.retry_after = float(retry_after)
            return outcome
        if isinstance(exc, ServiceError) or 500 <= status <= 599:
            return classify_status(status if 500 <= status <= 599 else 500, headers)
        if isinstance(exc, PaymentRequiredError):
            return Outcome("quota", retryable=False, failure=False, status=status)
        if status == 408:
            return Outcome("timeout", retryable=True, failure=True, status=status)
        return Outcome("client", retryable=False, failure=False, status=status)
    if isinstance(exc, PineconeTimeoutError):
        return Outcome("timeout", retryable=True, failure=True)
    if isinstance(exc, PineconeConnectionError):
        import httpx

        if isinstance(exc.__cause__, httpx.LocalProtocolError):
            return Outcome("client", retryable=False, failure=False)
        return Outcome("connection", retryable=True, failure=True)
    if isinstance(exc, PineconeError):
        return Outcome("client", retryable=False, failure=False)
    return classify_exception(exc)


def _without_sdk_retries(index: Any, is_async: bool) -> tuple[Any, bool]:
    """A shallow copy of ``index`` whose data-plane HTTP client never retries, and whether that worked.

    See the module docstring for why this is the least fragile way. The user's index is left as it is.
    """
    try:
        from dataclasses import replace

        from pinecone._internal.config import PineconeConfig, RetryConfig
        from pinecone._internal.constants import DATA_PLANE_API_VERSION
        from pinecone._internal.http_client import AsyncHTTPClient, HTTPClient

        config = index._config
        if not isinstance(config, PineconeConfig) or not hasattr(index, "_http"):
            raise TypeError("the index has no PineconeConfig / HTTP client where pinecone 10.x keeps them")
        config = replace(config, retry_config=RetryConfig(max_retries=0))
        http_class: Any = AsyncHTTPClient if is_async else HTTPClient
        http = http_class(config, DATA_PLANE_API_VERSION)
        raw = copy.copy(index)
        raw._config = config
        raw._http = http
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        warnings.warn(
            f"ragguard could not switch off the pinecone SDK's own data-plane retries ({exc}); its retries "
            "will stack under ragguard's. Please report this with your pinecone version.",
            RuntimeWarning,
            stacklevel=4,
        )
        return index, False
    return raw, True


# --- upsert bodies ----------------------------------------------------------------------------------------------


def _wire(vector: Any) -> dict[str, Any]:
    """A ``Vector`` as the SDK puts it on the wire (its ``_vector_to_dict``)."""
    body: dict[str, Any] = {"id": vector.id, "values": vector.values}
    sparse = vector.sparse_values
    if sparse is not None:
        body["sparseValues"] = {"indices": sparse.indices, "values": sparse.values}
    if vector.metadata is not None:
        body["metadata"] = vector.metadata
    return body


def _encoded_size(vector: Any, dumps: Callable[[Any], bytes]) -> int:
    """Bytes ``vector`` takes in the JSON body the SDK sends (``dumps``: orjson's, as the SDK encodes it)."""
    from pinecone.errors import PineconeTypeError

    try:
        return len(dumps(_wire(vector)))
    except TypeError as exc:
        raise PineconeTypeError(f"vector {vector.id!r} cannot be JSON-encoded: {exc}") from exc


def _envelope_size(namespace: str) -> int:
    """Bytes of the upsert body around its vectors: ``{"vectors":[...],"namespace":"…"}``."""
    import orjson

    size = len(b'{"vectors":[]}')
    if namespace:
        size += len(b',"namespace":') + len(orjson.dumps(namespace))
    return size


def _chunks(vectors: Sequence[Any], namespace: str, max_count: int, max_bytes: int) -> list[list[Any]]:
    """``vectors`` in order, cut into requests of at most ``max_count`` vectors and ``max_bytes`` of JSON body.

    A vector too large to fit any request goes alone (the server decides; a 413 then reports it).
    """
    import orjson

    envelope = _envelope_size(namespace)
    chunks: list[list[Any]] = []
    current: list[Any] = []
    size = envelope
    for vector in vectors:
        item = _encoded_size(vector, orjson.dumps) + (1 if current else 0)  # the comma before all but the first
        if current and (len(current) >= max_count or size + item > max_bytes):
            chunks.append(current)
            current, size = [], envelope
            item -= 1
        current.append(vector)
        size += item
    if current:
        chunks.append(current)
    return chunks


def _merged_info(responses: Iterable[Any]) -> Any:
    """One ``ResponseInfo`` for several upsert responses: the highest LSNs seen (as the SDK's batched upsert)."""
    from pinecone.models.response_info import ResponseInfo

    headers: dict[str, str] = {}
    for name in ("x-pinecone-lsn-committed", "x-pinecone-lsn-reconciled"):
        best: int | None = None
        for response in responses:
            info = response.response_info
            raw = info.raw_headers.get(name) if info is not None else None
            try:
                value = int(raw) if raw is not None else None
            except ValueError:
                value = None
            if value is not None and (best is None or value > best):
                best = value
        if best is not None:
            headers[name] = str(best)
    return ResponseInfo(raw_headers=headers) if headers else None


# --- the retrieval cache ----------------------------------------------------------------------------------------


def _encode_query(response: Any) -> Any:
    """A ``QueryResponse`` as JSON-able builtins (the SDK's own camelCase field names)."""
    import msgspec

    return msgspec.to_builtins(response)


def _decode_query(value: Any) -> Any:
    import msgspec
    from pinecone.models.vectors.responses import QueryResponse

    return msgspec.convert(value, QueryResponse)


#: ``ctx.extras`` key of what a degraded query needs: ``(kwargs, options)``
_DEGRADE_EXTRA = "ragguard.degrade"
_NOT_CACHED: Any = object()


def _key_value(value: Any) -> Any:
    """An argument as it enters a cache key: the SDK's ``SparseValues`` as its dict."""
    if hasattr(value, "indices") and hasattr(value, "values") and not isinstance(value, Mapping):
        return {"indices": list(value.indices), "values": list(value.values)}
    return value


class _Generations:
    """A counter per (index, namespace), bumped by every write: part of each query key, so a query that was in
    flight during a write fills an entry no later query reads. One per backend (shared by its guarded clients)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def get(self, tag: str) -> int:
        return self._counts.get(tag, 0)

    def bump(self, tag: str) -> None:
        with self._lock:
            self._counts[tag] = self._counts.get(tag, 0) + 1

    def bump_prefix(self, prefix: str) -> None:
        """Bump every counter whose tag starts with ``prefix``."""
        with self._lock:
            for tag in [tag for tag in self._counts if tag.startswith(prefix)]:
                self._counts[tag] += 1


@dataclass
class _UpsertState:
    """What one guarded upsert has done so far."""

    queue: collections.deque[list[Any]]
    responses: list[Any]
    failures: list[tuple[list[Any], Exception]]
    deadline: float
    splits: int = 0
    sent: bool = False


# --- the core ----------------------------------------------------------------------------------------------------


class PineconeGuard:
    """The async core shared by the guarded sync and async index proxies: pipelines, chunked upserts, the
    retrieval cache and its invalidation.

    Attributes:
        index: the index given (its own methods still have the SDK's retries; the guard does not use them).
        raw: the copy the guard calls, with the SDK's data-plane retries off.
        sdk_retries_off: whether switching the SDK's retries off worked (see the module docstring).
        query_cache: the retrieval cache, or ``None`` when ``Policy.cache`` is off.
        splits: upsert requests split in halves after a 413 (telemetry).
    """

    def __init__(self, index: Index | AsyncIndex, policy: Policy, backend: Backend, *, clock: Clock) -> None:
        from pinecone import AsyncIndex

        self.index = index
        self.is_async = isinstance(index, AsyncIndex)
        self.cls: type[Any] = type(index)
        self.raw, self.sdk_retries_off = _without_sdk_retries(index, self.is_async)
        self.policy = policy
        self.backend = backend
        self.clock = clock
        self.host: str = str(index.host)
        api_key = getattr(getattr(index, "_config", None), "api_key", "")
        #: the credential's fingerprint (never the key in clear)
        self.credential = fingerprint(api_key if isinstance(api_key, str) else "")
        #: the index and credential, for guard names: sha256 of host and key fingerprint
        self.scope = "pinecone:" + hashlib.sha256(f"{self.host}|{self.credential}".encode()).hexdigest()[:16]
        #: the index alone (cache prefixes: invalidation reaches every credential's entries)
        self.index_tag = hashlib.sha256(self.host.encode()).hexdigest()[:16]
        self.splits = 0
        self._pipelines: dict[str, Pipeline] = {}
        #: ``Policy.degrade`` when a mode is on, else ``None`` (see :mod:`ragguard.degrade`)
        self.degrade = policy.degrade if policy.degrade.enabled else None
        caching = policy.cache
        self.store: CacheStore | AsyncCacheStore | None = None
        self.query_cache: Cache | None = None
        if caching.enabled:
            self.store = _stateful.cache_store(backend, caching, clock=clock)
            # the tenant scope goes into each key, not the cache's prefix, so one prefix selects a namespace's
            # entries of every tenant (a write changes what all of them would read)
            self.query_cache = Cache.from_policy(
                caching.model_copy(update={"scope": None}),
                store=self.store,
                encode=_encode_query,
                decode=_decode_query,
                clock=clock,
            )
        self.generations: _Generations = backend.get_or_create("pinecone_generations", caching.namespace, _Generations)
        coalescing = policy.coalesce
        self.coalescer: Coalescer | None = None
        if coalescing.enabled:
            self.coalescer = backend.get_or_create(
                "coalescer",
                f"pinecone:{coalescing.max_keys}",
                lambda: Coalescer(max_keys=coalescing.max_keys, clock=clock),
            )

    # pipelines -------------------------------------------------------------------------------------------------

    def pipeline(self, operation: str) -> Pipeline:
        """The pipeline of one operation (built once, shared by every call)."""
        pipeline = self._pipelines.get(operation)
        if pipeline is None:
            pipeline = self._pipelines.setdefault(operation, self._degradable(operation, self._build(operation)))
        return pipeline

    def _build(self, operation: str) -> Pipeline:
        scope = self.scope
        family = "write" if operation in _WRITES else "read"
        outer: list[Guard] = []
        if operation == "query":
            if self.query_cache is not None:
                outer.append(self.query_cache)
            if self.coalescer is not None:
                outer.append(self.coalescer)
        return build_pipeline(
            self.policy,
            self.backend,
            breaker=f"{scope}:{family}",
            label=f"pinecone:{self.host}:{family}",
            bucket=scope if self.policy.rate_limit.scope == "credential" else f"{scope}:{family}",
            bulkhead=scope,
            clock=self.clock,
            classify=classify_pinecone,
            outer=outer,
            hedge=operation in ("query", "fetch"),  # idempotent reads only (Policy.hedge, opt-in)
        )

    def _attempt(self, method: str, kwargs: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        """One attempt: the SDK's own method (resolved on the class) called on the retry-less copy."""
        function = getattr(self.cls, method)
        raw = self.raw
        if self.is_async:

            async def attempt() -> Any:
                with telemetry.attempt():
                    return await function(raw, **kwargs)

            return attempt

        async def threaded_attempt() -> Any:
            with telemetry.attempt():
                return await run_in_worker(function, raw, **kwargs)

        return threaded_attempt

    async def acall(self, method: str, kwargs: dict[str, Any], options: CallOptions | None = None) -> Any:
        """``index.<method>(**kwargs)`` through its pipeline; a write then invalidates its namespace."""
        note(None)  # last_degradation() reports this call: set again if it is degraded
        if method == "upsert":
            return await self.aupsert(kwargs)
        if method == "query":
            return await self.aquery(kwargs, options)
        pipeline = self.pipeline(method)
        ctx = pipeline.context(operation=method)
        attempt = self._attempt(method, kwargs)
        if method not in _WRITES:
            return await pipeline.run(attempt, ctx)
        namespace = kwargs.get("namespace", "") if method != "delete_namespace" else _deleted_namespace(kwargs)
        try:
            return await pipeline.run(attempt, ctx)
        finally:
            await self._after_write(namespace if isinstance(namespace, str) else None)

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        """The sync clients' entry: the same async core, through the sync bridge."""
        # read here: the bridge's loop does not run in the caller's context
        options, parent = current_call_options(), telemetry.current_otel_context()
        return run_sync_noting(lambda: self.observed(method, lambda: self.acall(method, kwargs, options), parent))

    def observed(
        self, method: str, fn: Callable[[], Awaitable[T]], parent: otel_context.Context | None = None
    ) -> Awaitable[T]:
        """``fn()`` as one observed call of ``method``: a span (``db.system.name`` pinecone), metrics, events."""
        return telemetry.observe_call("pinecone", method, "", self.scope, fn, parent=parent)

    # the retrieval cache ----------------------------------------------------------------------------------------

    def _tag(self, namespace: str) -> str:
        return f"pinecone.{self.index_tag}.{namespace}"

    def _key_scope(self, options: CallOptions) -> str | None:
        policy_scope = self.policy.cache.scope
        if options.scope is None:
            return policy_scope
        return options.scope if policy_scope is None else f"{policy_scope}/{options.scope}"

    def query_key(self, kwargs: Mapping[str, Any], options: CallOptions | None = None) -> str | None:
        """The retrieval-cache key of a query (``None``: not cacheable, e.g. an argument JSON cannot hold)."""
        if options is None:
            options = current_call_options()
        namespace = kwargs.get("namespace", "") or ""
        top_k = kwargs.get("top_k")
        if not isinstance(namespace, str) or not isinstance(top_k, int):
            return None
        vector = kwargs.get("vector")
        extras: dict[str, Any] = {
            "include_values": bool(kwargs.get("include_values", False)),
            "include_metadata": bool(kwargs.get("include_metadata", False)),
        }
        for name in ("id", "sparse_vector", "scan_factor", "max_candidates"):
            value = kwargs.get(name)
            if value is not None:
                extras[name] = _key_value(value)
        filter_ = kwargs.get("filter")
        try:
            return retrieval_cache_key(
                self._tag(namespace),
                self._key_scope(options),
                self.credential,
                index=self.host,
                vector=vector if vector is not None else (),
                top_k=top_k,
                vector_namespace=namespace,
                filter=dict(filter_) if isinstance(filter_, Mapping) else filter_,
                generation=self.generations.get(self._tag(namespace)),
                **extras,
            )
        except (TypeError, ValueError):
            return None

    async def aquery(self, kwargs: dict[str, Any], options: CallOptions | None = None) -> Any:
        """``query`` through cache → single-flight → the pipeline."""
        if options is None:
            options = current_call_options()
        pipeline = self.pipeline("query")
        ctx = pipeline.context(operation="query")
        if self.query_cache is not None and options.cache:
            key = self.query_key(kwargs, options)
            if key is not None:
                ctx.extras = {"cache_key": key, "coalesce_key": key}
        if self.degrade is not None:  # the degraded path may lower this call's top_k: its own copy
            kwargs = dict(kwargs)
            ctx.extras = {**(ctx.extras or {}), _DEGRADE_EXTRA: (kwargs, options)}
        return await pipeline.run(self._attempt("query", kwargs), ctx)

    # degradation (Policy.degrade) ------------------------------------------------------------------------------

    def _degradable(self, operation: str, pipeline: Pipeline) -> Pipeline:
        """``pipeline`` headed by a :class:`~ragguard.degrade.Degrader` for ``query`` when ``top_k`` or
        ``cache_only`` is set (other operations are never degraded)."""
        policy = self.degrade
        if policy is None or operation != "query" or not (policy.cache_only or policy.top_k is not None):
            return pipeline
        return degradable(pipeline, policy, self._on_degraded)

    async def _on_degraded(self, call: Callable[[], Awaitable[Any]], ctx: CallContext, trigger: Trigger) -> Any:
        """Answer a degraded query: from the retrieval cache only (``cache_only``; a cached answer of the full
        ``top_k`` is cut to the reduced one), else through the pipeline with the reduced ``top_k``."""
        extras = ctx.extras or {}
        stash = extras.get(_DEGRADE_EXTRA)
        if stash is None:  # a call made on the pipeline directly, not through the index: not degradable
            if trigger.cause is not None:
                raise trigger.cause
            return await call()
        request, options = stash
        policy = self.degrade
        if policy is None:  # a Degrader is only built with a policy
            raise RuntimeError("degraded query without a degradation policy")
        asked = request.get("top_k")
        top_k = policy.top_k if policy.top_k is not None and isinstance(asked, int) and asked > policy.top_k else None
        modes = ("top_k",) if top_k is not None else ()
        if policy.cache_only:
            found = await self._cached_query(request, options, top_k)
            if found is _NOT_CACHED:
                note(Degradation(trigger.reason, (), trigger.detail))
                raise Degraded(
                    f"query degraded ({trigger.detail}): no cached result; the index was not called",
                    mode="cache_only",
                    reason=trigger.reason,
                ) from trigger.cause
            extras["cache_hit"] = True
            note(Degradation(trigger.reason, (*modes, "cache_only"), trigger.detail))
            return found
        if top_k is None or trigger.reason == "breaker_open":
            # nothing to make smaller, or the breaker is open: a smaller query would be refused as well
            note(None)
            if trigger.cause is not None:
                raise trigger.cause
            return await call()
        request["top_k"] = top_k  # the attempt reads this dict when it runs
        if "cache_key" in extras:
            key = self.query_key(request, options)
            if key is None:
                del extras["cache_key"], extras["coalesce_key"]
            else:
                extras["cache_key"] = extras["coalesce_key"] = key
        note(Degradation(trigger.reason, modes, trigger.detail))
        return await call()

    async def _cached_query(self, request: dict[str, Any], options: CallOptions, top_k: int | None) -> Any:
        """A cached result of the query with ``top_k`` (when given), else as asked, cut to ``top_k`` matches;
        ``_NOT_CACHED`` when neither is cached."""
        cache = self.query_cache
        if cache is None or not options.cache:
            return _NOT_CACHED
        for size in (top_k, None) if top_k is not None else (None,):
            key = self.query_key(request if size is None else {**request, "top_k": size}, options)
            if key is None:
                continue
            found = await cache.get(key, _NOT_CACHED)
            if found is not _NOT_CACHED:
                if top_k is not None and len(found.matches) > top_k:
                    import msgspec

                    found = msgspec.structs.replace(found, matches=found.matches[:top_k])
                return found
        return _NOT_CACHED

    async def invalidate(self, namespace: str | None = None) -> int:
        """Forget cached query results of one namespace of this index (``None``: of every namespace), for every
        guarded client of this backend and cache namespace. Returns how many entries were deleted."""
        cache = self.query_cache
        if namespace is None:
            self.generations.bump_prefix(self._tag(""))
            # "pinecone.<index>." starts the prefix of every namespace of the index
            return await cache.ainvalidate(_escape(self._tag(""))) if cache is not None else 0
        deleted = 0
        for name in _DEFAULT_NAMESPACES if namespace in _DEFAULT_NAMESPACES else (namespace,):
            tag = self._tag(name)
            self.generations.bump(tag)
            if cache is not None:
                deleted += await cache.ainvalidate(_escape(tag) + ":")
        return deleted

    async def _after_write(self, namespace: str | None) -> None:
        """Invalidate after a write (also after a failed one: part of it may have landed). Shielded, so a
        cancelled write still invalidates (also when asyncio's own ``task.cancel()`` cancels it); bounded, so a
        hung store cannot hold the cancellation forever."""

        async def invalidate() -> None:
            with anyio.move_on_after(_SHIELDED_INVALIDATION) as scope:
                try:
                    await self.invalidate(namespace)
                except Exception:
                    # the write itself is done: a cache store that cannot be reached must not turn it into a
                    # failure (nor hide an UpsertIncomplete), but stale answers may be served until they expire
                    logger.warning(
                        "ragguard: could not invalidate cached Pinecone queries of namespace %r after a write; "
                        "they may be served until they expire",
                        namespace,
                        exc_info=True,
                    )
            if scope.cancelled_caught:
                logger.warning("ragguard: invalidating cached Pinecone queries of namespace %r timed out", namespace)

        await run_shielded(invalidate)

    # upsert -----------------------------------------------------------------------------------------------------

    async def aupsert(self, kwargs: dict[str, Any]) -> Any:
        """``upsert(**kwargs)``: chunked, concurrent, each request through the pipeline, failed ones reported.

        Raises:
            UpsertIncomplete: some vectors were not written (their IDs attached).
            PineconeValueError, PineconeTypeError: a vector is malformed (raised before anything is sent).
        """
        from pinecone.errors import PineconeValueError
        from pinecone.models.vectors.responses import UpsertResponse

        unknown = set(kwargs) - _UPSERT_ARGS
        if unknown:
            raise TypeError(f"upsert() got unexpected keyword arguments: {sorted(unknown)!r}")
        if "vectors" not in kwargs:
            raise TypeError("upsert() missing required keyword-only argument: 'vectors'")
        namespace = kwargs.get("namespace", "")
        if not isinstance(namespace, str):
            raise PineconeValueError(f"namespace must be a str, got {type(namespace).__name__}")
        timeout = kwargs.get("timeout")
        width = self._width(kwargs.get("max_concurrency"))
        max_count = MAX_VECTORS_PER_REQUEST
        batch_size = kwargs.get("batch_size")
        if batch_size is not None:
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
                raise PineconeValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            max_count = min(max_count, batch_size)
        deadline = math.inf
        total_timeout = kwargs.get("total_timeout")
        if total_timeout is not None:
            if not isinstance(total_timeout, (int, float)) or not total_timeout > 0:
                raise PineconeValueError(f"total_timeout must be a positive number, got {total_timeout!r}")
            deadline = self.clock.now() + float(total_timeout)

        from pinecone._internal.vector_factory import VectorFactory

        built = [VectorFactory.build(v) for v in kwargs["vectors"]]
        unique = list({vector.id: vector for vector in built}.values())  # one per id, the last version winning
        limits = self.policy.rate_limit
        if limits.tpm is not None:  # a request never costs more vectors than the bucket holds
            max_count = min(max_count, max(1, int(limits.tpm / 60.0 * limits.burst_seconds)))
        chunks = _chunks(unique, namespace, max_count, MAX_REQUEST_BYTES) if unique else [[]]
        state = _UpsertState(collections.deque(chunks), [], [], deadline)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(min(width, len(chunks))):
                    tg.start_soon(self._upsert_worker, state, namespace, timeout)
        finally:
            self.splits += state.splits
            if state.sent:
                await self._after_write(namespace)
        if state.failures:
            raise self._incomplete(unique, state)
        if len(state.responses) == 1 and state.splits == 0:
            return state.responses[0]  # one request: the SDK's own response, as it returned it
        count = sum(response.upserted_count for response in state.responses)
        return UpsertResponse(
            upserted_count=count,
            response_info=_merged_info(state.responses),
            total_item_count=len(unique),
            total_batch_count=len(state.responses),
            successful_batch_count=len(state.responses),
        )

    def _width(self, max_concurrency: Any) -> int:
        """How many upsert requests of one call may be in flight: the call's ``max_concurrency`` (the SDK's
        default, 8, when not given), never more than the policy's concurrency limit."""
        from pinecone.errors import PineconeValueError

        width = _DEFAULT_WIDTH
        if max_concurrency is not None:
            if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
                raise PineconeValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
            width = max_concurrency
        section = self.policy.concurrency
        if section.enabled:
            width = min(width, section.max_in_flight)
        return width

    async def _upsert_worker(self, state: _UpsertState, namespace: str, sdk_timeout: Any) -> None:
        """Send requests from the shared queue until it is empty (a 413's halves go back to its front)."""
        pipeline = self.pipeline("upsert")
        queue = state.queue
        while queue:
            chunk = queue.popleft()
            if state.deadline != math.inf and self.clock.now() >= state.deadline:
                state.failures.append((chunk, DeadlineExceeded("upsert: total_timeout passed before this request")))
                continue
            ctx = pipeline.context(operation="upsert", tokens=float(len(chunk)))  # tokens: vectors (write units)
            ctx.deadline = state.deadline
            kwargs: dict[str, Any] = {"vectors": chunk, "namespace": namespace}
            if sdk_timeout is not None:
                kwargs["timeout"] = sdk_timeout  # the SDK's per-request timeout, passed through
            state.sent = True
            try:
                response = await pipeline.run(self._attempt("upsert", kwargs), ctx)
            except Exception as exc:
                if len(chunk) > 1 and _too_large(exc):
                    half = len(chunk) // 2
                    queue.appendleft(chunk[half:])
                    queue.appendleft(chunk[:half])
                    state.splits += 1
                    continue
                state.failures.append((chunk, exc))
                continue
            state.responses.append(response)

    @staticmethod
    def _incomplete(unique: list[Any], state: _UpsertState) -> UpsertIncomplete:
        failed = {vector.id for chunk, _ in state.failures for vector in chunk}
        failed_ids = [vector.id for vector in unique if vector.id in failed]
        count = sum(response.upserted_count for response in state.responses)
        first = state.failures[0][1]
        error = UpsertIncomplete(
            f"upsert incomplete: {len(failed_ids)} of {len(unique)} vectors not written "
            f"({len(state.failures)} failed requests; first error: {type(first).__name__}: {first})",
            failed_ids=failed_ids,
            upserted_count=count,
            errors=[([vector.id for vector in chunk], exc) for chunk, exc in state.failures],
        )
        error.__cause__ = first
        return error

    # lifecycle --------------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the guard's HTTP client and the index's own."""
        if self.raw is not self.index:
            await self.raw._http.close()
        await self.index.close()  # type: ignore[misc]

    def close(self) -> None:
        if self.raw is not self.index:
            self.raw._http.close()
        self.index.close()


def _deleted_namespace(kwargs: Mapping[str, Any]) -> str | None:
    """The namespace ``delete_namespace`` removes (it takes ``name``, or the legacy ``namespace``)."""
    name = kwargs.get("name")
    if name is None:
        name = kwargs.get("namespace")
    return name if isinstance(name, str) else None


# --- the proxy ---------------------------------------------------------------------------------------------------


class GuardedPineconeIndex(AttributeProxy):
    """The proxy :func:`ragguard.guard` returns for a Pinecone index: the SDK's interface, guarded.

    A context manager like the SDK index (``with`` for ``Index``, ``async with`` for ``AsyncIndex``); leaving it
    closes the guard's HTTP client and the index's own. ``.ragguard`` is the :class:`PineconeGuard` core.
    """

    __slots__ = ()

    def __enter__(self) -> GuardedPineconeIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> GuardedPineconeIndex:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


_GUARDED = ("upsert", "query", "fetch", "delete", "update", "delete_namespace", "describe_index_stats")


def _signature_of(cls: type[Any], method: str) -> inspect.Signature | None:
    try:
        signature = inspect.signature(getattr(cls, method))
    except (TypeError, ValueError):
        return None
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without ``self``


def _method(core: PineconeGuard, method: str) -> Callable[..., Any]:
    """The guarded method: keyword arguments only, like the SDK's."""
    if core.is_async:

        async def guarded_async(**kwargs: Any) -> Any:
            return await core.observed(method, lambda: core.acall(method, kwargs))

        function: Callable[..., Any] = guarded_async
    else:

        def guarded_sync(**kwargs: Any) -> Any:
            return core.call(method, kwargs)

        function = guarded_sync
    function.__name__ = function.__qualname__ = method
    function.__doc__ = f"Guarded ``{method}``: same keyword arguments and return type as the SDK's."
    signature = _signature_of(core.cls, method)
    if signature is not None:
        function.__signature__ = signature  # type: ignore[attr-defined]
    return function


def guard_pinecone(
    index: Any,
    policy: Policy | None = None,
    *,
    backend: Backend | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Any:
    """Wrap a Pinecone index client (``pc.Index(host=...)`` or ``pc.IndexAsyncio(host=...)``); see
    :func:`ragguard.guard` and this module's docstring.

    ``index`` is typed ``Any`` because ``Pinecone.Index`` is annotated ``Index | GrpcIndex``; a gRPC index (or
    anything else) is refused.

    Raises:
        ConfigError: ``index`` is not a ``pinecone.Index`` / ``pinecone.AsyncIndex``.
    """
    if not is_pinecone_index(index):
        raise ConfigError(
            f"guard_pinecone wraps pinecone.Index and pinecone.AsyncIndex (REST), not {type(index).__qualname__}"
        )
    core = PineconeGuard(index, policy if policy is not None else Policy(), backend or default_backend(), clock=clock)
    overrides: dict[str, Any] = {name: _method(core, name) for name in _GUARDED if hasattr(index, name)}
    overrides["close"] = core.aclose if core.is_async else core.close
    overrides["ragguard"] = core
    return GuardedPineconeIndex(index, overrides)
