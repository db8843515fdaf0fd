"""A Pinecone data-plane simulator, for tests and load tests of code that calls a Pinecone index.

:class:`PineconeSimulator` is an ASGI app answering the REST data plane of one dense index the way the
``pinecone`` SDK (10.x, API version ``2026-07``) calls it, so ``Pinecone(api_key=...).Index(host=served.url)``
and ``.IndexAsyncio(host=served.url)`` work against it unchanged::

    from pinecone import Pinecone
    from ragguard.testing import PineconeSimulator, PineconeSimulatorConfig, serve

    with serve(PineconeSimulator(PineconeSimulatorConfig(dimension=8, metric="cosine"))) as served:
        index = Pinecone(api_key="test").Index(host=served.url)
        index.upsert(vectors=[("a", [0.1] * 8, {"genre": "drama"})], namespace="films")
        index.query(vector=[0.1] * 8, top_k=3, namespace="films", filter={"genre": "drama"})

Endpoints
    ``POST /vectors/upsert`` (``{"vectors": [{"id", "values", "metadata"?, "sparseValues"?}], "namespace"?}`` →
    ``{"upsertedCount"}``; a vector whose ID exists is overwritten), ``POST /query`` (``topK``, ``vector`` or
    ``id``, ``filter``, ``includeValues``, ``includeMetadata``, ``namespace`` → ``{"matches": [{"id", "score",
    "values", "metadata"?}], "namespace", "usage"}``; a linear scan, ties kept in insertion order),
    ``GET /vectors/fetch`` (``?ids=a&ids=b&namespace=ns`` → ``{"vectors": {id: vector}, "namespace", "usage"}``;
    unknown IDs are left out), ``POST /vectors/delete`` (``ids``, ``deleteAll`` or ``filter``, ``namespace`` →
    ``{}``), ``POST /describe_index_stats`` (optional ``filter`` → ``{"namespaces": {name: {"vectorCount"}},
    "dimension", "totalVectorCount", "metric", ...}``; ``GET`` too). The default namespace is addressed as ``""``
    (or ``"__default__"``) and listed as ``"__default__"``; a namespace disappears when its last vector is deleted.
    Every request must carry an ``Api-Key`` header (the configured key, when one is set), else 401.

Scores (metric and dimension are set in the config)
    ``cosine``: cosine similarity, highest first (an all-zero vector is refused); ``dotproduct``: dot product,
    highest first; ``euclidean``: squared Euclidean distance, *lowest* first, as Pinecone reports it. Values are
    kept as the float64 the JSON carried (Pinecone stores float32). Pure Python over lists of floats (no numpy):
    upsert is linear in the vectors sent, a query is one scan of its namespace.

Limits (Pinecone's, https://docs.pinecone.io/reference/api/database-limits)
    At most ``max_upsert_vectors`` (1,000) vectors per upsert → 400 (the SDK raises ``ApiError``); a request body
    over ``max_request_bytes`` (2 MiB) → 413 (``PayloadTooLargeError``); a vector whose dimension differs from the
    index's → 400; metadata over ``max_metadata_bytes`` (40 KiB, compact JSON) per vector → 400; ``topK`` over
    10,000, more than 1,000 IDs in a fetch or delete, IDs over 512 characters, invalid metadata or filters → 400.
    Error bodies have the data plane's gRPC-gateway shape, ``{"code": 3, "message": ..., "details": []}``.

Rate limits (none by default)
    Reads (query, fetch, describe_index_stats) and writes (upsert, delete) each get a request bucket of
    ``read_rps`` / ``write_rps`` requests per second holding ``burst_seconds`` of refill; upserts can also be
    limited in vectors per second (``write_vectors_per_s``, Pinecone's write units). For a per-minute limit use
    ``rps = rpm / 60`` and ``burst_seconds=60``. A refused request gets 429 (``RateLimitError``) with a
    ``Retry-After`` header (whole seconds rounded up, or ``retry_after="fractional"`` for milliseconds, or
    ``"none"``), consumes nothing, and is never applied.

Faults (seeded, like :class:`~ragguard.testing.OpenAISimulator`)
    ``error_rate`` (half 500, half 503), ``drop_rate`` (connection closed without a response), ``stall_rate``
    (answer held ``stall_s`` seconds). Writes are ambiguous as on a real network: a faulted upsert or delete was
    nonetheless applied with probability ``applied_before_fault`` (its own seeded sequence), which is what makes
    idempotent vector IDs matter when a client retries.

Stats
    :meth:`PineconeSimulator.stats` (and ``GET /_sim/stats``) returns :class:`PineconeSimulatorStats`, including the
    largest upsert seen in vectors and bytes, so a test can assert no request ever exceeded the limits;
    :meth:`PineconeSimulator.reset` (and ``POST /_sim/reset``; ``?keep_data=1`` keeps the vectors) empties buckets,
    stats and (by default) the index, and rewinds the seeds. Serve it with :func:`~ragguard.testing.serve` /
    :func:`~ragguard.testing.aserve` in a thread or a child process, or ``python -m
    ragguard.testing.pinecone_simulator --dimension 64``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import operator
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from ._faults import FAULT_KINDS, FaultKind, FaultRoller, LatencyModel
from ._pinecone_filter import FilterError, Predicate, compile_filter, metadata_error
from ._ratelimit import Account, Rejection, WindowCounter
from ._serve import CLOSE_CONNECTION_EXTENSION, config_from_flags, simulator_main
from .openai_simulator import SimulatedConnectionDrop

__all__ = [
    "PineconeMetric",
    "PineconeSimulator",
    "PineconeSimulatorConfig",
    "PineconeSimulatorStats",
    "RetryAfterStyle",
    "main",
]

PineconeMetric = Literal["cosine", "dotproduct", "euclidean"]
RetryAfterStyle = Literal["seconds", "fractional", "none"]

#: Pinecone's hard limits (https://docs.pinecone.io/reference/api/database-limits)
MAX_UPSERT_VECTORS = 1000
MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_METADATA_BYTES = 40 * 1024
MAX_TOP_K = 10_000
MAX_IDS_PER_REQUEST = 1000
MAX_ID_LENGTH = 512
MAX_DIMENSION = 20_000
#: how the default namespace is listed by describe_index_stats (requests may also say "")
DEFAULT_NAMESPACE = "__default__"

_UPSERT = "/vectors/upsert"
_QUERY = "/query"
_FETCH = "/vectors/fetch"
_DELETE = "/vectors/delete"
_STATS = "/describe_index_stats"
_ROUTES: dict[tuple[str, str], str] = {
    ("POST", _UPSERT): _UPSERT,
    ("POST", _QUERY): _QUERY,
    ("GET", _FETCH): _FETCH,
    ("POST", _DELETE): _DELETE,
    ("POST", _STATS): _STATS,
    ("GET", _STATS): _STATS,
}
_WRITES = frozenset({_UPSERT, _DELETE})
#: the fault kinds that apply to a non-streaming API
_KINDS: tuple[FaultKind, ...] = tuple(kind for kind in FAULT_KINDS if kind != "stream_break")

# gRPC status codes, as the data plane's error bodies carry them
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_RESOURCE_EXHAUSTED = 8
_INTERNAL = 13
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
_OUT_OF_RANGE = 11


class PineconeSimulatorConfig(BaseModel):
    """The simulated index (dimension, metric), its limits, rate limits, latency and faults. Validated, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- the index ---
    #: length of every dense vector
    dimension: int = Field(default=8, ge=1, le=MAX_DIMENSION)
    #: ``cosine``, ``dotproduct`` (``dot`` is accepted) or ``euclidean``
    metric: PineconeMetric = "cosine"
    #: the API key requests must carry (``None``: any non-empty ``Api-Key`` header)
    api_key: str | None = None

    # --- Pinecone's request limits ---
    max_upsert_vectors: int = Field(default=MAX_UPSERT_VECTORS, ge=1)
    #: bytes of one request body (2 MiB)
    max_request_bytes: int = Field(default=MAX_REQUEST_BYTES, ge=1)
    #: bytes of one vector's metadata as compact JSON (40 KiB)
    max_metadata_bytes: int = Field(default=MAX_METADATA_BYTES, ge=1)

    # --- rate limits (None: no limit) ---
    #: query / fetch / describe_index_stats requests per second
    read_rps: float | None = Field(default=None, gt=0)
    #: upsert / delete requests per second
    write_rps: float | None = Field(default=None, gt=0)
    #: vectors upserted per second (write units)
    write_vectors_per_s: float | None = Field(default=None, gt=0)
    #: bucket capacity in seconds of refill (``rate · burst_seconds``)
    burst_seconds: float = Field(default=1.0, gt=0, le=3600)
    #: the ``Retry-After`` of a 429: whole ``seconds`` (rounded up, RFC 9110), ``fractional`` seconds to the
    #: millisecond (the SDK parses floats), or ``none``
    retry_after: RetryAfterStyle = "seconds"

    # --- latency: (base + per_vector · vectors written or fetched) · (1 ± jitter) ---
    base_latency_s: float = Field(default=0.005, ge=0, le=600)
    per_vector_latency_s: float = Field(default=0.00001, ge=0, le=10)
    jitter: float = Field(default=0.1, ge=0, le=1)
    #: seed of the fault, jitter and applied-before-fault sequences
    seed: int = 0

    # --- faults (shares of admitted requests) ---
    #: answered 500 or 503 (half each)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    #: connection closed without a response
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    #: answer held for ``stall_s`` seconds first
    stall_rate: float = Field(default=0.0, ge=0, le=1)
    stall_s: float = Field(default=10.0, ge=0, le=3600)
    #: probability that a faulted write (500, 503, drop, stall the client gave up on) was applied anyway
    applied_before_fault: float = Field(default=0.5, ge=0, le=1)

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_alias(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("dot", "dot_product", "dotproduct"):
            return "dotproduct"
        return value

    @model_validator(mode="after")
    def _check(self) -> PineconeSimulatorConfig:
        total = self.error_rate + self.drop_rate + self.stall_rate
        if total > 1.0 + 1e-9:
            raise ValueError(f"error_rate + drop_rate + stall_rate must be <= 1, not {total:g}")
        return self

    @classmethod
    def flaky(cls, **overrides: Any) -> PineconeSimulatorConfig:
        """An index on a bad day: 5 % 5xx, 1 % dropped connections, 1 % stalls of 10 s. Keyword arguments
        override any field."""
        values: dict[str, Any] = {"error_rate": 0.05, "drop_rate": 0.01, "stall_rate": 0.01, "stall_s": 10.0}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def instant(cls, **overrides: Any) -> PineconeSimulatorConfig:
        """No simulated latency at all (fast unit tests). Keyword arguments override any field."""
        values: dict[str, Any] = {"base_latency_s": 0.0, "per_vector_latency_s": 0.0, "jitter": 0.0}
        values.update(overrides)
        return cls(**values)


class PineconeSimulatorStats(BaseModel):
    """What the simulator saw and did since it started (or was reset). Times are the simulator's clock
    readings in seconds."""

    model_config = ConfigDict(frozen=True)

    #: every data-plane request received (refused, invalid and faulted ones included; ``/_sim`` not)
    requests_total: int = 0
    #: by path, e.g. ``{"/vectors/upsert": 3}``; unknown paths count under ``"other"``
    requests_by_endpoint: dict[str, int] = Field(default_factory=dict)
    #: responses started, by HTTP status (dropped connections have none)
    responses_by_status: dict[int, int] = Field(default_factory=dict)
    #: responses by path, then status
    responses_by_endpoint: dict[str, dict[int, int]] = Field(default_factory=dict)
    #: 429s by bucket: ``read_requests``, ``write_requests``, ``write_vectors``
    rate_limited: dict[str, int] = Field(default_factory=dict)
    #: faults injected by kind: ``drop``, ``error_500``, ``error_503``, ``stall``
    faults: dict[str, int] = Field(default_factory=dict)
    #: faulted writes that were applied anyway (see ``applied_before_fault``)
    faulted_writes_applied: int = 0
    #: requests refused for a Pinecone limit: ``vector_count`` (400), ``request_bytes`` (413),
    #: ``metadata_bytes`` (400), ``dimension`` (400)
    limit_rejections: dict[str, int] = Field(default_factory=dict)
    #: the ``X-Pinecone-Api-Version`` headers seen, with counts
    api_versions: dict[str, int] = Field(default_factory=dict)
    upsert_requests: int = 0
    #: vectors written by applied upserts (an overwrite counts again)
    vectors_upserted: int = 0
    vectors_deleted: int = 0
    #: the most vectors in any upsert request received (refused ones included)
    max_upsert_vectors: int = 0
    #: the largest upsert request body received, in bytes (refused ones included)
    max_upsert_bytes: int = 0
    #: the largest metadata of any vector received, in bytes of compact JSON
    max_metadata_bytes: int = 0
    #: the most read / write requests, and upserted vectors, admitted within any one-second window
    max_reads_per_s: int = 0
    max_writes_per_s: int = 0
    max_vectors_per_s: int = 0
    #: vectors stored now, in total and by namespace (as describe_index_stats lists them)
    vectors_stored: int = 0
    namespaces: dict[str, int] = Field(default_factory=dict)
    first_request_at: float | None = None
    last_request_at: float | None = None

    @property
    def rate_limited_total(self) -> int:
        return sum(self.rate_limited.values())

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


class _Counters:
    """The mutable stats (guarded by the simulator's lock)."""

    __slots__ = (
        "api_versions",
        "by_endpoint",
        "by_endpoint_status",
        "by_status",
        "faulted_writes_applied",
        "faults",
        "first",
        "last",
        "limits",
        "max_metadata_bytes",
        "max_upsert_bytes",
        "max_upsert_vectors",
        "rate_limited",
        "reads_per_s",
        "total",
        "upsert_requests",
        "vectors_deleted",
        "vectors_per_s",
        "vectors_upserted",
        "writes_per_s",
    )

    def __init__(self) -> None:
        self.total = 0
        self.by_endpoint: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.by_endpoint_status: dict[str, dict[int, int]] = {}
        self.rate_limited = {"read_requests": 0, "write_requests": 0, "write_vectors": 0}
        self.faults: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self.faulted_writes_applied = 0
        self.limits = {"vector_count": 0, "request_bytes": 0, "metadata_bytes": 0, "dimension": 0}
        self.api_versions: dict[str, int] = {}
        self.upsert_requests = 0
        self.vectors_upserted = 0
        self.vectors_deleted = 0
        self.max_upsert_vectors = 0
        self.max_upsert_bytes = 0
        self.max_metadata_bytes = 0
        self.reads_per_s = WindowCounter(1.0)
        self.writes_per_s = WindowCounter(1.0)
        self.vectors_per_s = WindowCounter(1.0)
        self.first: float | None = None
        self.last: float | None = None


class _HTTPError(Exception):
    """A data-plane error answer (gRPC-gateway body), raised while validating a request."""

    def __init__(self, status: int, message: str, *, code: int = _INVALID_ARGUMENT, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "message": message, "details": []}
        self.limit = limit


class _Record:
    """One stored vector."""

    __slots__ = ("metadata", "norm", "sparse", "values")

    def __init__(
        self, values: list[float], norm: float, metadata: dict[str, Any] | None, sparse: dict[str, Any] | None
    ) -> None:
        self.values = values
        self.norm = norm
        self.metadata = metadata
        self.sparse = sparse

    def to_json(self, vector_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": vector_id, "values": self.values}
        if self.sparse is not None:
            out["sparseValues"] = self.sparse
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


_Store = dict[str, dict[str, _Record]]


class _Job:
    """A validated request: which buckets it costs and what applying it does (run under the lock)."""

    __slots__ = ("apply", "endpoint", "items", "write")

    def __init__(self, endpoint: str, apply: Callable[[_Store], dict[str, Any]], items: int = 0) -> None:
        self.endpoint = endpoint
        self.apply = apply
        self.items = items  # vectors upserted (charged to the vector bucket) or fetched (latency)
        self.write = endpoint in _WRITES


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _namespace(value: Any) -> str:
    if value is None:
        return DEFAULT_NAMESPACE
    if not isinstance(value, str):
        raise _HTTPError(400, "namespace must be a string")
    return value or DEFAULT_NAMESPACE


def _echo(value: Any) -> str:
    """The namespace as responses name it: what was asked, ``""`` for the default."""
    return value if isinstance(value, str) and value != DEFAULT_NAMESPACE else ""


def _check_id(value: Any, what: str = "vector ID") -> str:
    if not isinstance(value, str) or not value:
        raise _HTTPError(400, f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise _HTTPError(400, f"{what} must be at most {MAX_ID_LENGTH} characters, not {len(value)}")
    return value


def _check_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _HTTPError(400, "ids must be a non-empty array of strings")
    if len(value) > MAX_IDS_PER_REQUEST:
        raise _HTTPError(400, f"at most {MAX_IDS_PER_REQUEST} ids per request, not {len(value)}")
    return [_check_id(item) for item in value]


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _HTTPError(400, f"{name} must be a boolean")
    return value


def _filter(value: Any) -> Predicate:
    try:
        return compile_filter(value)
    except FilterError as exc:
        raise _HTTPError(400, f"Invalid filter: {exc}") from None


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(map(operator.mul, a, b)))


class PineconeSimulator:
    """An ASGI app that behaves like one Pinecone index's REST data plane (see the module docs for its rules).

    Args:
        config: the behaviour; defaults to :class:`PineconeSimulatorConfig` ``()``.
        clock: monotonic time in seconds for buckets and stats (inject a fake one in tests; latency and stalls
            still sleep for real).
        **fields: :class:`PineconeSimulatorConfig` fields overriding ``config``
            (``PineconeSimulator(dimension=64)``).

    Thread safety: all shared state (the vectors included) is guarded by one ``threading.Lock`` never held across
    an ``await``, so :meth:`stats` and :meth:`reset` may be called from any thread while uvicorn serves the app.
    """

    def __init__(
        self,
        config: PineconeSimulatorConfig | None = None,
        /,
        *,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        if config is None:
            config = PineconeSimulatorConfig(**fields)
        elif fields:
            config = PineconeSimulatorConfig.model_validate({**config.model_dump(), **fields})
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._store: _Store = {}
        self._counters = _Counters()
        now = clock()
        self._reads = Account(self._per_minute(config.read_rps), None, config.burst_seconds, now)
        self._writes = Account(
            self._per_minute(config.write_rps),
            self._per_minute(config.write_vectors_per_s),
            config.burst_seconds,
            now,
        )
        self._faults = FaultRoller(
            seed=config.seed,
            drop_rate=config.drop_rate,
            error_rate=config.error_rate,
            stall_rate=config.stall_rate,
            stream_break_rate=0.0,
        )
        self._latency = LatencyModel(
            seed=config.seed,
            base=config.base_latency_s,
            per_token=config.per_vector_latency_s,
            per_input_token=0.0,
            jitter=config.jitter,
        )
        self._applied = random.Random(config.seed ^ 0xA991_1ED)

    @staticmethod
    def _per_minute(per_second: float | None) -> float | None:
        return None if per_second is None else per_second * 60.0

    @property
    def config(self) -> PineconeSimulatorConfig:
        return self._config

    def __repr__(self) -> str:
        return f"PineconeSimulator({self._config!r})"

    # ------------------------------------------------------------------ stats

    def stats(self) -> PineconeSimulatorStats:
        """A snapshot of the stats (safe to call from any thread)."""
        with self._lock:
            c = self._counters
            namespaces = {name: len(records) for name, records in self._store.items() if records}
            return PineconeSimulatorStats(
                requests_total=c.total,
                requests_by_endpoint=dict(c.by_endpoint),
                responses_by_status=dict(sorted(c.by_status.items())),
                responses_by_endpoint={k: dict(sorted(v.items())) for k, v in c.by_endpoint_status.items()},
                rate_limited=dict(c.rate_limited),
                faults=dict(c.faults),
                faulted_writes_applied=c.faulted_writes_applied,
                limit_rejections=dict(c.limits),
                api_versions=dict(c.api_versions),
                upsert_requests=c.upsert_requests,
                vectors_upserted=c.vectors_upserted,
                vectors_deleted=c.vectors_deleted,
                max_upsert_vectors=c.max_upsert_vectors,
                max_upsert_bytes=c.max_upsert_bytes,
                max_metadata_bytes=c.max_metadata_bytes,
                max_reads_per_s=round(c.reads_per_s.peak),
                max_writes_per_s=round(c.writes_per_s.peak),
                max_vectors_per_s=round(c.vectors_per_s.peak),
                vectors_stored=sum(namespaces.values()),
                namespaces=namespaces,
                first_request_at=c.first,
                last_request_at=c.last,
            )

    def reset(self, *, keep_data: bool = False) -> None:
        """Refill the buckets, zero the stats, rewind the seeded sequences and, unless ``keep_data``, empty the
        index."""
        config = self._config
        with self._lock:
            now = self._clock()
            if not keep_data:
                self._store.clear()
            self._counters = _Counters()
            self._reads = Account(self._per_minute(config.read_rps), None, config.burst_seconds, now)
            self._writes = Account(
                self._per_minute(config.write_rps),
                self._per_minute(config.write_vectors_per_s),
                config.burst_seconds,
                now,
            )
            self._faults.reset()
            self._latency.reset()
            self._applied = random.Random(config.seed ^ 0xA991_1ED)

    # ------------------------------------------------------------------ process mode (ProcessServable)

    def subprocess_argv(self, host: str, port: int) -> list[str]:
        """The command that serves this simulator's config in a child process (see :func:`serve`)."""
        if self._clock is not time.monotonic:
            raise ValueError("a simulator with an injected clock cannot run in a child process")
        return [
            sys.executable,
            "-m",
            "ragguard.testing.pinecone_simulator",
            "--host",
            host,
            "--port",
            str(port),
            "--config-json",
            self._config.model_dump_json(),
            "--managed",
        ]

    @staticmethod
    def parse_stats(payload: bytes) -> PineconeSimulatorStats:
        """Decode the body of ``GET /_sim/stats``."""
        return PineconeSimulatorStats.model_validate_json(payload)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith("/_sim/"):
                await self._admin(scope, path, send)
            else:
                await self._api(scope, path, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _admin(self, scope: Scope, path: str, send: Send) -> None:
        method: str = scope["method"]
        if method == "GET" and path == "/_sim/stats":
            await self._send(send, 200, self.stats().model_dump(mode="json"), [])
        elif method == "POST" and path == "/_sim/reset":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            keep = query.get("keep_data", ["0"])[-1].lower() in ("1", "true", "yes")
            self.reset(keep_data=keep)
            await self._send(send, 200, {"reset": True, "keep_data": keep}, [])
        elif method == "GET" and path == "/_sim/config":
            await self._send(send, 200, self._config.model_dump(mode="json"), [])
        else:
            await self._send(send, 404, {"code": _NOT_FOUND, "message": f"Not Found: {method} {path}"}, [])

    @staticmethod
    async def _send(send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]]) -> None:
        body = _dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _status(self, endpoint: str, status: int) -> None:
        c = self._counters
        c.by_status[status] = c.by_status.get(status, 0) + 1
        per = c.by_endpoint_status.setdefault(endpoint, {})
        per[status] = per.get(status, 0) + 1

    async def _answer(self, send: Send, endpoint: str, status: int, payload: Any, request_id: bytes) -> None:
        with self._lock:
            self._status(endpoint, status)
        await self._send(send, status, payload, [(b"x-pinecone-request-id", request_id)])

    async def _api(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        endpoint = _ROUTES.get((method, path.rstrip("/") or "/"))
        label = endpoint or "other"
        request_id = uuid.uuid4().hex.encode()
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        try:
            raw = await Request(scope, receive).body()
        except ClientDisconnect:
            return
        version = headers.get(b"x-pinecone-api-version", b"").decode("latin-1")
        with self._lock:
            self._count(label, version, self._clock())
        if endpoint is None:
            error = _HTTPError(404, f"Not Found: {method} {path}", code=_NOT_FOUND)
            await self._answer(send, label, 404, error.body, request_id)
            return
        key = headers.get(b"api-key", b"").decode("latin-1")
        if not key or (self._config.api_key is not None and key != self._config.api_key):
            error = _HTTPError(401, "Invalid API Key", code=_UNAUTHENTICATED)
            await self._answer(send, endpoint, 401, error.body, request_id)
            return
        try:
            job = self._prepare(endpoint, raw, scope.get("query_string", b""))
        except _HTTPError as exc:
            if exc.limit is not None:
                with self._lock:
                    self._counters.limits[exc.limit] += 1
            await self._answer(send, endpoint, exc.status, exc.body, request_id)
            return

        applied_anyway = False
        with self._lock:
            now = self._clock()
            account = self._writes if job.write else self._reads
            rejection = account.admit(job.items if endpoint == _UPSERT else 0, now)
            fault: FaultKind | None = None
            factor = 1.0
            if rejection is None:
                c = self._counters
                (c.writes_per_s if job.write else c.reads_per_s).add(now, 1)
                if endpoint == _UPSERT:
                    c.vectors_per_s.add(now, job.items)
                fault = self._faults.roll(streaming=False)
                factor = self._latency.factor()
                if fault is not None:
                    c.faults[fault] += 1
                    if job.write:
                        applied_anyway = self._applied.random() < self._config.applied_before_fault
        if rejection is not None:
            await self._send_rate_limited(send, endpoint, rejection, request_id)
            return
        await self._serve_admitted(scope, receive, send, job, fault, factor, applied_anyway, request_id)

    def _count(self, label: str, version: str, now: float) -> None:
        c = self._counters
        c.total += 1
        c.by_endpoint[label] = c.by_endpoint.get(label, 0) + 1
        if version:
            c.api_versions[version] = c.api_versions.get(version, 0) + 1
        if c.first is None:
            c.first = now
        c.last = now

    def _retry_after(self, wait: float) -> list[tuple[bytes, bytes]]:
        style = self._config.retry_after
        if style == "none" or not math.isfinite(wait):
            return []
        if style == "fractional":
            value = f"{max(0.001, math.ceil(wait * 1000 - 1e-6) / 1000):.3f}"
        else:
            value = str(max(1, math.ceil(wait - 1e-9)))
        return [(b"retry-after", value.encode())]

    async def _send_rate_limited(self, send: Send, endpoint: str, rejection: Rejection, request_id: bytes) -> None:
        write = endpoint in _WRITES
        if rejection.kind == "tokens":
            bucket, what = "write_vectors", f"vectors upserted per second ({rejection.limit / 60:g})"
        elif write:
            bucket, what = "write_requests", f"write requests per second ({rejection.limit / 60:g})"
        else:
            bucket, what = "read_requests", f"read requests per second ({rejection.limit / 60:g})"
        if rejection.too_large:
            message = (
                f"Request failed. The request needs {rejection.requested:g} of the {what}, more than the limit; "
                "send fewer vectors per request."
            )
        else:
            message = (
                f"Request failed. You've reached the max {what} for this index. "
                f"Try again in {math.ceil(rejection.wait * 1000)} ms."
            )
        body = {"code": _RESOURCE_EXHAUSTED, "message": message, "details": []}
        with self._lock:
            self._counters.rate_limited[bucket] += 1
            self._status(endpoint, 429)
        await self._send(
            send,
            429,
            body,
            [(b"x-pinecone-request-id", request_id), *self._retry_after(rejection.wait)],
        )

    async def _serve_admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        job: _Job,
        fault: FaultKind | None,
        factor: float,
        applied_anyway: bool,
        request_id: bytes,
    ) -> None:
        latency = self._latency
        if fault in ("drop", "error_500", "error_503"):
            await anyio.sleep(latency.base * factor)
            if applied_anyway:
                self._apply(job, faulted=True)
            if fault == "drop":
                await _close_connection(scope, receive)
                return
            if fault == "error_500":
                status, code, message = 500, _INTERNAL, "Internal server error"
            else:
                status, code, message = 503, _UNAVAILABLE, "Service unavailable, please try again"
            body = {"code": code, "message": message, "details": []}
            await self._answer(send, job.endpoint, status, body, request_id)
            return
        if fault == "stall" and await _stall(self._config.stall_s, receive):
            if applied_anyway:  # the client gave up on a write the server went on to apply
                self._apply(job, faulted=True)
            return
        delay = (latency.base + latency.per_token * job.items) * factor
        if delay > 0:
            await anyio.sleep(delay)
        await self._answer(send, job.endpoint, 200, self._apply(job, faulted=False), request_id)

    def _apply(self, job: _Job, *, faulted: bool) -> dict[str, Any]:
        with self._lock:
            if faulted:
                self._counters.faulted_writes_applied += 1
            return job.apply(self._store)

    # ------------------------------------------------------------------ requests

    def _prepare(self, endpoint: str, raw: bytes, query_string: bytes) -> _Job:
        if endpoint == _FETCH:
            return self._prepare_fetch(query_string)
        body: Any
        if not raw.strip():
            body = {}
        else:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if endpoint == _UPSERT:
            vectors = body.get("vectors") if isinstance(body, dict) else None
            with self._lock:
                c = self._counters
                c.upsert_requests += 1
                c.max_upsert_bytes = max(c.max_upsert_bytes, len(raw))
                if isinstance(vectors, list):
                    c.max_upsert_vectors = max(c.max_upsert_vectors, len(vectors))
            if len(raw) > self._config.max_request_bytes:
                limit = self._config.max_request_bytes
                raise _HTTPError(
                    413,
                    f"Request size {len(raw) / 1048576:.1f}MB ({len(raw)} bytes) exceeds the maximum supported "
                    f"size of {limit / 1048576:g}MB ({limit} bytes)",
                    code=_OUT_OF_RANGE,
                    limit="request_bytes",
                )
        if not isinstance(body, dict):
            raise _HTTPError(400, "Invalid request body: expected a JSON object")
        if endpoint == _UPSERT:
            return self._prepare_upsert(body)
        if endpoint == _QUERY:
            return self._prepare_query(body)
        if endpoint == _DELETE:
            return self._prepare_delete(body)
        return self._prepare_stats(body)

    def _values(self, raw: Any, label: str, where: str = "") -> tuple[list[float], float]:
        """Checked dense values and their Euclidean norm (``label``: ``Vector`` or ``Query vector``)."""
        if not isinstance(raw, list):
            raise _HTTPError(400, f"{label} values must be an array of numbers{where}")
        dimension = self._config.dimension
        if len(raw) != dimension:
            raise _HTTPError(
                400,
                f"{label} dimension {len(raw)} does not match the dimension of the index {dimension}{where}",
                limit="dimension",
            )
        if not all(type(x) is float or type(x) is int for x in raw):
            raise _HTTPError(400, f"{label} values must be an array of numbers{where}")
        values = [float(x) for x in raw]
        norm = math.hypot(*values)
        if not math.isfinite(norm):
            raise _HTTPError(400, f"{label} values must be finite numbers{where}")
        if norm == 0.0 and self._config.metric == "cosine":
            raise _HTTPError(400, f"Dense vectors must contain at least one non-zero value for cosine{where}")
        return values, norm

    def _prepare_upsert(self, body: dict[str, Any]) -> _Job:
        raw_vectors = body.get("vectors")
        if not isinstance(raw_vectors, list) or not raw_vectors:
            raise _HTTPError(400, "vectors must be a non-empty array")
        limit = self._config.max_upsert_vectors
        if len(raw_vectors) > limit:
            raise _HTTPError(
                400,
                f"Invalid request: {len(raw_vectors)} vectors in one upsert request; the maximum is {limit}. "
                "Split the vectors into batches.",
                limit="vector_count",
            )
        namespace = _namespace(body.get("namespace"))
        max_metadata = self._config.max_metadata_bytes
        largest_metadata = 0
        records: list[tuple[str, _Record]] = []
        for position, item in enumerate(raw_vectors):
            if not isinstance(item, dict):
                raise _HTTPError(400, f"vectors[{position}] must be an object")
            vector_id = _check_id(item.get("id"), f"vectors[{position}].id")
            values, norm = self._values(item.get("values"), "Vector", f" (vector {vector_id!r})")
            metadata = item.get("metadata")
            if metadata is not None:
                problem = metadata_error(metadata)
                if problem is not None:
                    raise _HTTPError(400, f"Invalid metadata of vector {vector_id!r}: {problem}")
                size = len(_dumps(metadata))
                largest_metadata = max(largest_metadata, size)
                if size > max_metadata:
                    with self._lock:
                        c = self._counters
                        c.max_metadata_bytes = max(c.max_metadata_bytes, largest_metadata)
                    raise _HTTPError(
                        400,
                        f"Metadata size is {size} bytes, which exceeds the limit of {max_metadata} bytes per vector",
                        limit="metadata_bytes",
                    )
            sparse = item.get("sparseValues")
            if sparse is not None and not (
                isinstance(sparse, dict)
                and isinstance(sparse.get("indices"), list)
                and isinstance(sparse.get("values"), list)
                and len(sparse["indices"]) == len(sparse["values"])
            ):
                raise _HTTPError(400, f"sparseValues of vector {vector_id!r} must have indices and values alike")
            records.append((vector_id, _Record(values, norm, metadata, sparse)))
        with self._lock:
            c = self._counters
            c.max_metadata_bytes = max(c.max_metadata_bytes, largest_metadata)
        count = len(records)

        def apply(store: _Store) -> dict[str, Any]:
            target = store.setdefault(namespace, {})
            target.update(records)
            self._counters.vectors_upserted += count
            return {"upsertedCount": count}

        return _Job(_UPSERT, apply, items=count)

    def _prepare_query(self, body: dict[str, Any]) -> _Job:
        top_k = body.get("topK")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise _HTTPError(400, f"topK must be an integer from 1 to {MAX_TOP_K}, not {top_k!r}")
        include_values = _flag(body, "includeValues")
        include_metadata = _flag(body, "includeMetadata")
        namespace = _namespace(body.get("namespace"))
        echo = _echo(body.get("namespace"))
        vector, by_id = body.get("vector"), body.get("id")
        if vector is not None and by_id is not None:
            raise _HTTPError(400, "Cannot provide both 'id' and 'vector' in a query")
        if vector is None and by_id is None:
            if body.get("sparseVector") is not None:
                raise _HTTPError(400, "The simulator ranks dense vectors only: give 'vector' or 'id'")
            raise _HTTPError(400, "No query provided: give 'vector' or 'id'")
        query: tuple[list[float], float] | None = None
        anchor = ""
        if vector is not None:
            query = self._values(vector, "Query vector")
        else:
            anchor = _check_id(by_id, "id")
        predicate = _filter(body["filter"]) if body.get("filter") is not None else None
        metric = self._config.metric

        def apply(store: _Store) -> dict[str, Any]:
            records = store.get(namespace, {})
            if query is not None:
                q_values, q_norm = query
            else:
                found = records.get(anchor)
                if found is None:
                    return {"matches": [], "namespace": echo, "usage": {"readUnits": 1}}
                q_values, q_norm = found.values, found.norm
            items: Iterator[tuple[str, _Record]] = iter(records.items())
            if predicate is not None:
                items = ((i, r) for i, r in items if predicate(r.metadata))
            scored: Iterator[tuple[float, str, _Record]]
            if metric == "euclidean":
                scored = ((math.dist(q_values, r.values) ** 2, i, r) for i, r in items)
                best = heapq.nsmallest(top_k, scored, key=operator.itemgetter(0))
            else:
                if metric == "cosine":
                    scored = ((_dot(q_values, r.values) / (q_norm * r.norm), i, r) for i, r in items)
                else:
                    scored = ((_dot(q_values, r.values), i, r) for i, r in items)
                best = heapq.nlargest(top_k, scored, key=operator.itemgetter(0))
            matches = []
            for score, vector_id, record in best:
                match: dict[str, Any] = {
                    "id": vector_id,
                    "score": score,
                    "values": record.values if include_values else [],
                }
                if include_values and record.sparse is not None:
                    match["sparseValues"] = record.sparse
                if include_metadata and record.metadata is not None:
                    match["metadata"] = record.metadata
                matches.append(match)
            return {
                "matches": matches,
                "namespace": echo,
                "usage": {"readUnits": max(1, math.ceil(len(records) / 10_000))},
            }

        return _Job(_QUERY, apply)

    def _prepare_fetch(self, query_string: bytes) -> _Job:
        query = parse_qs(query_string.decode("utf-8", "replace"), keep_blank_values=True)
        ids = _check_ids(query.get("ids"))
        raw_namespace = query.get("namespace", [""])[-1]
        namespace = _namespace(raw_namespace)
        echo = _echo(raw_namespace)

        def apply(store: _Store) -> dict[str, Any]:
            records = store.get(namespace, {})
            vectors = {i: records[i].to_json(i) for i in ids if i in records}
            return {"vectors": vectors, "namespace": echo, "usage": {"readUnits": 1}}

        return _Job(_FETCH, apply, items=len(ids))

    def _prepare_delete(self, body: dict[str, Any]) -> _Job:
        namespace = _namespace(body.get("namespace"))
        delete_all = _flag(body, "deleteAll")
        raw_ids, raw_filter = body.get("ids"), body.get("filter")
        chosen = sum((raw_ids is not None, delete_all, raw_filter is not None))
        if chosen == 0:
            raise _HTTPError(400, "Must specify one of ids, deleteAll or filter")
        if delete_all and chosen > 1:
            raise _HTTPError(400, "deleteAll cannot be combined with ids or filter")
        ids = _check_ids(raw_ids) if raw_ids is not None else None
        predicate: Predicate | None = None
        if raw_filter is not None:
            if raw_filter == {}:
                raise _HTTPError(400, "Delete with empty metadata filter is not allowed")
            predicate = _filter(raw_filter)

        def apply(store: _Store) -> dict[str, Any]:
            records = store.get(namespace)
            if not records:
                return {}
            before = len(records)
            if delete_all:
                records.clear()
            elif predicate is not None:
                for vector_id in [i for i, r in records.items() if predicate(r.metadata)]:
                    del records[vector_id]
            else:
                for vector_id in ids or ():
                    records.pop(vector_id, None)
            self._counters.vectors_deleted += before - len(records)
            if not records:
                del store[namespace]
            return {}

        return _Job(_DELETE, apply, items=len(ids) if ids is not None else 0)

    def _prepare_stats(self, body: dict[str, Any]) -> _Job:
        predicate = _filter(body["filter"]) if body.get("filter") is not None else None
        config = self._config

        def apply(store: _Store) -> dict[str, Any]:
            namespaces: dict[str, dict[str, int]] = {}
            for name, records in store.items():
                count = len(records) if predicate is None else sum(1 for r in records.values() if predicate(r.metadata))
                if count:
                    namespaces[name] = {"vectorCount": count}
            return {
                "namespaces": namespaces,
                "dimension": config.dimension,
                "indexFullness": 0.0,
                "totalVectorCount": sum(n["vectorCount"] for n in namespaces.values()),
                "metric": config.metric,
                "vectorType": "dense",
            }

        return _Job(_STATS, apply)


async def _stall(seconds: float, receive: Receive) -> bool:
    """Wait ``seconds``; return ``True`` early if the client disconnects meanwhile."""
    gone = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()
    return gone


async def _close_connection(scope: Scope, receive: Receive) -> None:
    close = (scope.get("extensions") or {}).get(CLOSE_CONNECTION_EXTENSION)
    if close is None:
        raise SimulatedConnectionDrop("simulated connection drop (no connection to close in-process)")
    close()
    # Returning before the server notices would make it answer 500 or log an error.
    with anyio.move_on_after(5.0):
        while (await receive())["type"] != "http.disconnect":
            pass


# ---------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ragguard.testing.pinecone_simulator",
        description="Serve a Pinecone data-plane simulator on loopback (point the SDK's host at http://HOST:PORT).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to bind, 0 for a free one (default 8081)")
    parser.add_argument("--config-json", help="a full PineconeSimulatorConfig as JSON (flags below override it)")
    parser.add_argument("--flaky", action="store_true", help="start from PineconeSimulatorConfig.flaky()")
    parser.add_argument("--dimension", type=int, help="dimension of the index")
    parser.add_argument("--metric", choices=["cosine", "dotproduct", "dot", "euclidean"], help="similarity metric")
    parser.add_argument("--api-key", help="the API key requests must carry")
    parser.add_argument("--read-rps", type=float, help="read requests per second")
    parser.add_argument("--write-rps", type=float, help="write requests per second")
    parser.add_argument("--write-vectors-per-s", type=float, help="upserted vectors per second")
    parser.add_argument("--burst-seconds", type=float, help="bucket capacity in seconds of refill")
    parser.add_argument("--retry-after", choices=["seconds", "fractional", "none"], help="Retry-After style of a 429")
    parser.add_argument("--base-latency", dest="base_latency_s", type=float, help="seconds before each answer")
    parser.add_argument("--per-vector-latency", dest="per_vector_latency_s", type=float, help="seconds per vector")
    parser.add_argument("--jitter", type=float, help="relative latency jitter (0-1)")
    parser.add_argument("--seed", type=int, help="seed of the fault and jitter sequences")
    parser.add_argument("--error-rate", type=float, help="share of 500/503 answers")
    parser.add_argument("--drop-rate", type=float, help="share of dropped connections")
    parser.add_argument("--stall-rate", type=float, help="share of stalled answers")
    parser.add_argument("--stall-s", type=float, help="stall length, seconds")
    parser.add_argument("--applied-before-fault", type=float, help="probability a faulted write was applied")
    parser.add_argument("--managed", action="store_true", help=argparse.SUPPRESS)
    return parser


_FLAG_FIELDS = (
    "dimension",
    "metric",
    "api_key",
    "read_rps",
    "write_rps",
    "write_vectors_per_s",
    "burst_seconds",
    "retry_after",
    "base_latency_s",
    "per_vector_latency_s",
    "jitter",
    "seed",
    "error_rate",
    "drop_rate",
    "stall_rate",
    "stall_s",
    "applied_before_fault",
)


def config_from_args(args: argparse.Namespace) -> PineconeSimulatorConfig:
    """Build the config the command-line flags describe."""
    return config_from_flags(PineconeSimulatorConfig, args, _FLAG_FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ragguard.testing.pinecone_simulator``: serve in the foreground until interrupted."""
    return simulator_main(_parser(), lambda args: PineconeSimulator(config_from_args(args)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
