"""The guarded Pinecone index, driven through the real pinecone SDK over real HTTP against the simulator."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import anyio.lowlevel
import anyio.to_thread
import pytest
from pinecone import AsyncIndex, Index, Pinecone, QueryResponse, UpsertResponse, Vector
from pinecone.errors import (
    ApiError,
    PayloadTooLargeError,
    PaymentRequiredError,
    PineconeConnectionError,
    PineconeTimeoutError,
    PineconeValueError,
    RateLimitError,
    ServiceError,
)

import ragguard
from ragguard._clock import SystemClock
from ragguard.providers.pinecone import (
    MAX_REQUEST_BYTES,
    UpsertIncomplete,
    classify_pinecone,
    guard_pinecone,
    is_pinecone_index,
    stable_id,
)
from ragguard.testing import Served, serve
from ragguard.testing.pinecone_simulator import PineconeSimulator, PineconeSimulatorConfig

pytestmark = pytest.mark.pinecone

KEY = "pc-test-key"
DIM = 8


def policy(**sections: Any) -> ragguard.Policy:
    base: dict[str, Any] = {
        "retry": {"attempts": 4, "base": 0.01, "cap": 0.05},
        "breaker": {"failure_threshold": 50, "min_calls": 20, "failure_rate": 0.9},
        "timeout": {"attempt": 5.0, "total": 30.0},
    }
    base.update(sections)
    return ragguard.Policy(**base)


def sim(**config: Any) -> AbstractContextManager[Served[PineconeSimulator]]:
    config.setdefault("dimension", DIM)
    return serve(PineconeSimulator(PineconeSimulatorConfig.instant(**config)))


def vec(i: int, dim: int = DIM) -> list[float]:
    return [float((i * 7 + j) % 11 + 1) for j in range(dim)]


@pytest.fixture
def pc() -> Pinecone:
    return Pinecone(api_key=KEY)


@pytest.fixture
async def opened() -> Any:
    """Async guarded indexes a test opens, closed while its event loop still runs."""
    indexes: list[Any] = []
    yield indexes
    for index in indexes:
        await index.close()


@pytest.fixture
def aindex(pc: Pinecone, opened: list[Any]) -> Any:
    """Make a guarded ``AsyncIndex`` for a served simulator (closed after the test)."""

    def make(served: Served[Any], p: ragguard.Policy | None = None, **kw: Any) -> Any:
        guarded = guard_pinecone(
            pc.IndexAsyncio(host=served.url), p or policy(), backend=ragguard.MemoryBackend(), **kw
        )
        opened.append(guarded)
        return guarded

    return make


@pytest.fixture
def sindex(pc: Pinecone) -> Iterator[Any]:
    """Make a guarded sync ``Index`` for a served simulator (closed after the test)."""
    made: list[Any] = []

    def make(served: Served[Any], p: ragguard.Policy | None = None, **kw: Any) -> Any:
        guarded = guard_pinecone(pc.Index(host=served.url), p or policy(), backend=ragguard.MemoryBackend(), **kw)
        made.append(guarded)
        return guarded

    yield make
    for guarded in made:
        guarded.close()


class RecordingClock(SystemClock):
    """Real time, remembering every wait a guard asked for."""

    __slots__ = ("slept",)

    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await super().sleep(seconds)


# --- stable ids, classification, detection ----------------------------------------------------------------------


def test_stable_id_is_a_content_hash() -> None:
    first = stable_id("hello", namespace="docs", metadata={"source": "a.md", "chunk": 3})
    assert first == stable_id("hello", namespace="docs", metadata={"chunk": 3, "source": "a.md"})  # order-free
    assert len(first) == 64  # sha256 hex: a valid, ASCII Pinecone ID
    assert int(first, 16) >= 0
    assert first != stable_id("hello!", namespace="docs", metadata={"source": "a.md", "chunk": 3})
    assert first != stable_id("hello", namespace="other", metadata={"source": "a.md", "chunk": 3})
    assert first != stable_id("hello", namespace="docs", metadata={"source": "a.md", "chunk": 4})
    assert stable_id("hello") != stable_id("hello", namespace="")
    with pytest.raises(TypeError):
        stable_id("hello", metadata={"when": object()})
    with pytest.raises(ValueError, match="JSON"):
        stable_id("hello", metadata={"x": float("nan")})


def test_classify_pinecone_reads_the_sdk_exceptions() -> None:
    limited = classify_pinecone(RateLimitError("slow down", retry_after=2.5, headers={"retry-after": "2.5"}))
    assert (limited.kind, limited.retryable, limited.rate_limited, limited.retry_after) == (
        "rate_limit",
        True,
        True,
        2.5,
    )
    assert not limited.failure
    server = classify_pinecone(ServiceError("unavailable", status_code=503, headers={}))
    assert (server.kind, server.retryable, server.failure, server.status) == ("server", True, True, 503)
    transient: list[Exception] = [PineconeTimeoutError("timed out"), PineconeConnectionError("reset")]
    for error in transient:
        outcome = classify_pinecone(error)
        assert outcome.retryable
        assert outcome.failure
    never: list[Exception] = [
        PayloadTooLargeError("too big"),
        ApiError("bad dimension", 400),
        ApiError("conflict", 409),
        ApiError("unprocessable", 422),
        PaymentRequiredError("pay"),
        PineconeValueError("top_k must be positive"),
    ]
    for error in never:
        outcome = classify_pinecone(error)
        assert not outcome.retryable, error
        assert not outcome.failure, error
    assert classify_pinecone(PaymentRequiredError("pay")).kind == "quota"
    assert classify_pinecone(ValueError("not pinecone")).kind == "other"  # the generic verdict


def test_ragguard_guard_recognises_both_index_kinds(pc: Pinecone) -> None:
    sync_index = pc.Index(host="http://127.0.0.1:1")
    guarded = ragguard.guard(sync_index, policy(), backend=ragguard.MemoryBackend())
    assert guarded.ragguard.index is sync_index
    assert not guarded.ragguard.is_async
    guarded.close()
    async_guarded = ragguard.guard(pc.IndexAsyncio(host="http://127.0.0.1:1"), backend=ragguard.MemoryBackend())
    assert async_guarded.ragguard.is_async


def test_guard_pinecone_refuses_other_objects(pc: Pinecone) -> None:
    with pytest.raises(ragguard.ConfigError):
        guard_pinecone(pc)


def test_is_pinecone_index(pc: Pinecone) -> None:
    index = pc.Index(host="http://127.0.0.1:1")
    assert is_pinecone_index(index)
    assert is_pinecone_index(pc.IndexAsyncio(host="http://127.0.0.1:1"))
    assert not is_pinecone_index(pc)
    assert not is_pinecone_index(object())
    index.close()


# --- the SDK's interface ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_guarded_async_index_keeps_the_sdk_interface_and_types(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        assert isinstance(index.ragguard.index, AsyncIndex)
        assert index.host == index.ragguard.index.host  # unguarded attributes are the SDK's own
        response = await index.upsert(vectors=[("a", vec(1), {"genre": "drama"}), ("b", vec(2))], namespace="n")
        assert isinstance(response, UpsertResponse)
        assert response.upserted_count == 2
        result = await index.query(vector=vec(1), top_k=1, namespace="n", include_metadata=True)
        assert isinstance(result, QueryResponse)
        assert [(m.id, m.metadata) for m in result.matches] == [("a", {"genre": "drama"})]
        fetched = await index.fetch(ids=["a", "b"], namespace="n")
        assert set(fetched.vectors) == {"a", "b"}
        with pytest.raises(TypeError):
            await index.query(vec(1), 1)  # keyword-only, like the SDK
        assert "top_k" in inspect.signature(index.query).parameters
        assert "self" not in inspect.signature(index.upsert).parameters


def test_guarded_sync_index_keeps_the_sdk_interface_and_types(sindex: Any) -> None:
    with sim() as served:
        index = sindex(served)
        assert isinstance(index.ragguard.index, Index)
        response = index.upsert(vectors=[Vector(id="a", values=vec(1), metadata={"k": "v"})], namespace="n")
        assert isinstance(response, UpsertResponse)
        assert response.upserted_count == 1
        result = index.query(vector=vec(1), top_k=1, namespace="n", include_metadata=True)
        assert isinstance(result, QueryResponse)
        assert result.matches[0].metadata == {"k": "v"}
        assert index.describe_index_stats().total_vector_count == 1
        index.delete(ids=["a"], namespace="n")
        assert index.describe_index_stats().total_vector_count == 0
        with pytest.raises(TypeError):
            index.fetch(["a"])


# --- the SDK's own retries are off --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sdk_retries_are_off_async(pc: Pinecone, aindex: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request answered 5xx: the simulator must see exactly the attempts ragguard's Retry makes. If an SDK
    upgrade brings the SDK's data-plane retries back, each attempt becomes four requests and this fails."""

    async def no_wait(_: float) -> None:
        await anyio.lowlevel.checkpoint()

    # the SDK's own backoff seams (its unit tests no-op them too): the baselines below then cost no wall time
    monkeypatch.setattr("pinecone._internal.http_client._retry_sleep", lambda _: None, raising=False)
    monkeypatch.setattr("pinecone._internal.http_client._async_retry_sleep", no_wait, raising=False)
    with sim(error_rate=1.0) as served:
        # the baseline: the bare SDK does retry data-plane requests, so the check below can tell the difference
        bare = pc.Index(host=served.url)
        with pytest.raises(ServiceError):
            await anyio.to_thread.run_sync(lambda: bare.describe_index_stats())
        bare.close()
        sdk_attempts = served.stats().requests_total
        assert sdk_attempts > 1
        served.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "could not switch off" warning
            index = aindex(served, policy(retry={"attempts": 3, "base": 0.01, "cap": 0.02}))
        assert index.ragguard.sdk_retries_off
        with pytest.raises(ragguard.RetryExhausted) as caught:
            await index.describe_index_stats()
        assert isinstance(caught.value.__cause__, ServiceError)
        assert served.stats().requests_total == 3
        # the user's own index is untouched: it still has the SDK's retries
        served.reset()
        with pytest.raises(ServiceError):
            await index.ragguard.index.describe_index_stats()
        assert served.stats().requests_total == sdk_attempts


def test_sdk_retries_are_off_sync(sindex: Any) -> None:
    with sim(error_rate=1.0) as served:
        index = sindex(served, policy(retry={"attempts": 2, "base": 0.01, "cap": 0.02}))
        with pytest.raises(ragguard.RetryExhausted):
            index.fetch(ids=["a"], namespace="n")
        assert served.stats().requests_total == 2


# --- error classes through the SDK ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_429_is_retried_after_the_servers_retry_after(aindex: Any) -> None:
    clock = RecordingClock()
    # one read per second, a bucket of one, a whole-second Retry-After: the second read in a row is refused once
    with sim(read_rps=1.0, burst_seconds=1.0, retry_after="seconds") as served:
        index = aindex(served, clock=clock)
        for _ in range(2):
            stats = await index.describe_index_stats()
            assert stats.total_vector_count == 0
        seen = served.stats()
        assert seen.rate_limited["read_requests"] == 1
        assert seen.requests_total == 3  # two calls, one retry
        # the retry waited the server's 1 s (plus upward jitter), not the 10-50 ms backoff
        assert any(1.0 <= wait <= 1.1 + 1e-9 for wait in clock.slept), clock.slept


@pytest.mark.anyio
async def test_5xx_is_retried_and_each_fault_costs_one_more_attempt(aindex: Any) -> None:
    with sim(error_rate=0.4, seed=7) as served:
        index = aindex(served, policy(retry={"attempts": 10, "base": 0.001, "cap": 0.005}))
        await index.upsert(vectors=[(f"v{i}", vec(i)) for i in range(10)], namespace="n")
        for _ in range(20):
            assert (await index.describe_index_stats()).total_vector_count == 10
        seen = served.stats()
        errors = seen.responses_by_status.get(500, 0) + seen.responses_by_status.get(503, 0)
        assert errors > 0
        assert seen.faulted_writes_applied <= seen.faults_total
        # 21 calls, and each 5xx cost exactly one more request: ragguard's retry, never the SDK's on top
        assert seen.requests_total == 21 + errors


@pytest.mark.anyio
async def test_400_is_never_retried(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        with pytest.raises(ApiError) as caught:
            await index.query(vector=[1.0] * (DIM + 1), top_k=1, namespace="n")  # wrong dimension
        assert caught.value.status_code == 400
        assert served.stats().requests_total == 1


@pytest.mark.anyio
async def test_timeouts_and_dropped_connections_are_retried(aindex: Any) -> None:
    with sim(stall_rate=1.0, stall_s=5.0) as served:
        index = aindex(served, policy(retry={"attempts": 2, "base": 0.01, "cap": 0.02}))
        with pytest.raises(ragguard.RetryExhausted) as caught:
            await index.fetch(ids=["a"], namespace="n", timeout=0.2)  # the SDK's own per-request timeout
        assert isinstance(caught.value.last_error, PineconeTimeoutError)
        assert served.stats().requests_total == 2
    with sim(drop_rate=1.0) as served:
        index = aindex(served, policy(retry={"attempts": 3, "base": 0.01, "cap": 0.02}))
        with pytest.raises(ragguard.RetryExhausted) as caught:
            await index.describe_index_stats()
        assert isinstance(caught.value.last_error, PineconeConnectionError)
        assert served.stats().requests_total == 3


# --- upsert: chunking, splitting, reporting ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_upsert_chunks_by_vector_count(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        response = await index.upsert(vectors=[(f"v{i}", vec(i)) for i in range(2_500)], namespace="n")
        assert response.upserted_count == 2_500
        seen = served.stats()
        assert seen.upsert_requests == 3
        assert seen.max_upsert_vectors == 1_000
        assert seen.vectors_stored == 2_500
        assert sum(seen.limit_rejections.values()) == 0


@pytest.mark.anyio
async def test_upsert_chunks_by_encoded_bytes_metadata_included(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        text = "x" * 5_000  # ≈ 5 kB of metadata per vector: 900 vectors ≈ 4.6 MB, far under 1,000 vectors
        vectors = [{"id": f"v{i}", "values": vec(i), "metadata": {"text": text, "i": i}} for i in range(900)]
        response = await index.upsert(vectors=vectors, namespace="n")
        assert response.upserted_count == 900
        seen = served.stats()
        assert seen.upsert_requests == 3
        assert seen.max_upsert_vectors < 1_000
        # the requests are filled up to the measured budget: the measurement is what the SDK sends
        assert MAX_REQUEST_BYTES - 6_000 < seen.max_upsert_bytes <= MAX_REQUEST_BYTES
        assert seen.limit_rejections["request_bytes"] == 0
        assert seen.vectors_stored == 900


@pytest.mark.anyio
async def test_payload_too_large_splits_the_request_in_halves(aindex: Any) -> None:
    # the server takes far less than Pinecone's 2 MiB: every 413 halves the request until it fits
    with sim(max_request_bytes=20_000) as served:
        index = aindex(served)
        vectors = [(f"v{i}", vec(i), {"text": "y" * 100}) for i in range(1_000)]
        response = await index.upsert(vectors=vectors, namespace="n")
        assert response.upserted_count == 1_000
        seen = served.stats()
        assert seen.limit_rejections["request_bytes"] > 0
        assert seen.responses_by_status[413] == seen.limit_rejections["request_bytes"]
        assert index.ragguard.splits == seen.responses_by_status[413]
        assert seen.vectors_stored == 1_000


@pytest.mark.anyio
async def test_a_vector_too_large_alone_is_reported(aindex: Any) -> None:
    with sim(max_request_bytes=2_000) as served:
        index = aindex(served)
        vectors = [(f"v{i}", vec(i)) for i in range(6)] + [("huge", vec(9), {"text": "z" * 3_000})]
        with pytest.raises(UpsertIncomplete) as caught:
            await index.upsert(vectors=vectors, namespace="n")
        assert caught.value.failed_ids == ["huge"]
        assert caught.value.upserted_count == 6
        assert isinstance(caught.value.__cause__, PayloadTooLargeError)
        assert served.stats().vectors_stored == 6


@pytest.mark.anyio
async def test_a_failed_chunk_is_reported_with_its_ids_never_dropped(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        vectors = [(f"v{i}", vec(i)) for i in range(2_500)]
        vectors[1_500] = ("v1500", [1.0] * (DIM + 2))  # a wrong dimension: its whole request gets a 400
        with pytest.raises(UpsertIncomplete) as caught:
            await index.upsert(vectors=vectors, namespace="n")
        error = caught.value
        assert error.failed_ids == [f"v{i}" for i in range(1_000, 2_000)]
        assert error.upserted_count == 1_500
        assert isinstance(error.__cause__, ApiError)
        assert error.__cause__.status_code == 400
        assert len(error.errors) == 1
        seen = served.stats()
        assert seen.upsert_requests == 3  # the 400 was not retried
        assert seen.vectors_stored == 1_500


@pytest.mark.anyio
async def test_upsert_accepts_every_vector_form_and_keeps_the_last_duplicate(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        vectors: list[Any] = [
            ("t2", vec(1)),
            ("t3", vec(2), {"form": "tuple"}),
            {"id": "d", "values": vec(3), "metadata": {"form": "dict"}},
            Vector(id="o", values=vec(4), metadata={"form": "object"}),
            ("t3", vec(5), {"form": "tuple", "version": 2}),  # a second version of t3: it wins
        ]
        response = await index.upsert(vectors=vectors, namespace="n")
        assert response.upserted_count == 4
        fetched = await index.fetch(ids=["t2", "t3", "d", "o"], namespace="n")
        assert fetched.vectors["t3"].metadata == {"form": "tuple", "version": 2}
        assert fetched.vectors["t3"].values == vec(5)
        assert fetched.vectors["d"].metadata == {"form": "dict"}
        assert fetched.vectors["o"].metadata == {"form": "object"}
        with pytest.raises(PineconeValueError):
            await index.upsert(vectors=[{"values": vec(1)}], namespace="n")  # malformed: nothing is sent
        assert served.stats().upsert_requests == 1


def test_sync_upsert_chunks_concurrently_through_the_same_core(sindex: Any) -> None:
    with sim() as served:
        index = sindex(served)
        response = index.upsert(vectors=[(f"v{i}", vec(i)) for i in range(2_100)], namespace="n")
        assert response.upserted_count == 2_100
        assert served.stats().upsert_requests == 3
        assert index.describe_index_stats().namespaces["n"].vector_count == 2_100


# --- the retrieval cache ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_query_results_are_cached_and_decoded_faithfully(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        await index.upsert(vectors=[(f"v{i}", vec(i), {"i": i, "tags": ["a", "b"]}) for i in range(20)], namespace="n")
        ask = {"vector": vec(3), "top_k": 5, "namespace": "n", "include_metadata": True, "include_values": True}
        first = await index.query(**ask)
        again = await index.query(**dict(reversed(list(ask.items()))))  # argument order does not matter
        assert again == first  # scores, values, metadata, usage, response info: all as the SDK parsed them
        assert isinstance(again, QueryResponse)
        assert served.stats().requests_by_endpoint["/query"] == 1
        assert index.ragguard.query_cache.hits == 1
        # a different filter, top_k, namespace or include flag is a different entry
        await index.query(**{**ask, "top_k": 4})
        await index.query(**{**ask, "filter": {"i": {"$gte": 10}}})
        await index.query(**{**ask, "include_values": False})
        await index.query(**{**ask, "namespace": "other"})
        assert served.stats().requests_by_endpoint["/query"] == 5
        with ragguard.call_options(cache=False):
            await index.query(**ask)
        assert served.stats().requests_by_endpoint["/query"] == 6


@pytest.mark.anyio
async def test_writes_invalidate_their_namespace_only(aindex: Any) -> None:
    with sim() as served:
        index = aindex(served)
        await index.upsert(vectors=[("a", vec(1)), ("b", vec(2))], namespace="n")
        await index.upsert(vectors=[("a", vec(1))], namespace="m")

        async def queries() -> int:
            await index.query(vector=vec(1), top_k=10, namespace="n")
            await index.query(vector=vec(1), top_k=10, namespace="m")
            return int(served.stats().requests_by_endpoint.get("/query", 0))

        assert await queries() == 2
        assert await queries() == 2  # both cached
        await index.upsert(vectors=[("c", vec(3))], namespace="n")
        assert await queries() == 3  # "n" was invalidated, "m" was not
        result = await index.query(vector=vec(1), top_k=10, namespace="n")
        assert {m.id for m in result.matches} == {"a", "b", "c"}  # the fresh answer sees the write
        await index.delete(ids=["c"], namespace="n")
        result = await index.query(vector=vec(1), top_k=10, namespace="n")
        assert {m.id for m in result.matches} == {"a", "b"}
        await index.delete(delete_all=True, namespace="m")
        assert await queries() == 5  # "n" cached since the last query, "m" invalidated by delete_all


@pytest.mark.anyio
async def test_a_write_through_another_guarded_client_of_the_backend_invalidates(pc: Pinecone) -> None:
    backend = ragguard.MemoryBackend()
    with sim() as served:
        reader = guard_pinecone(pc.IndexAsyncio(host=served.url), policy(), backend=backend)
        writer = guard_pinecone(pc.IndexAsyncio(host=served.url), policy(), backend=backend)
        try:
            await writer.upsert(vectors=[("a", vec(1))], namespace="n")
            assert len((await reader.query(vector=vec(1), top_k=5, namespace="n")).matches) == 1
            assert len((await reader.query(vector=vec(1), top_k=5, namespace="n")).matches) == 1  # cached
            assert served.stats().requests_by_endpoint["/query"] == 1
            await writer.upsert(vectors=[("b", vec(2))], namespace="n")
            assert len((await reader.query(vector=vec(1), top_k=5, namespace="n")).matches) == 2
        finally:
            await reader.close()
            await writer.close()


def test_sync_index_caches_and_invalidates(sindex: Any) -> None:
    with sim() as served:
        index = sindex(served)
        index.upsert(vectors=[("a", vec(1))], namespace="n")
        index.query(vector=vec(1), top_k=5, namespace="n")
        index.query(vector=vec(1), top_k=5, namespace="n")
        assert served.stats().requests_by_endpoint["/query"] == 1
        index.upsert(vectors=[("b", vec(2))], namespace="n")
        assert len(index.query(vector=vec(1), top_k=5, namespace="n").matches) == 2


# --- the done criterion -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ingesting_20k_vectors_under_a_write_limit_and_faults_lands_each_exactly_once(aindex: Any) -> None:
    """Issue 5's done criterion: 20,000 vectors with metadata, a write rate limit and flaky faults (5xx, dropped
    connections, stalls, writes applied before their fault): every vector present exactly once, no request over
    Pinecone's limits, no 429, and a second identical ingestion leaves the count unchanged."""
    write_rps = 20.0
    config = {
        "write_rps": write_rps,
        "error_rate": 0.15,
        "drop_rate": 0.05,
        "stall_rate": 0.03,
        "stall_s": 3.0,
        "seed": 5,
        "base_latency_s": 0.002,
        "per_vector_latency_s": 0.000002,
    }
    documents: list[tuple[str, dict[str, Any]]] = [
        (f"document {d} chunk {c}: " + "lorem ipsum " * 20, {"doc": d, "chunk": c})
        for d in range(2_000)
        for c in range(10)
    ]
    vectors: list[dict[str, Any]] = [
        {"id": stable_id(text, namespace="corpus", metadata=meta), "values": vec(i), "metadata": {**meta, "text": text}}
        for i, (text, meta) in enumerate(documents)
    ]
    distinct = len({v["id"] for v in vectors})
    assert distinct == 20_000
    p = policy(
        retry={"attempts": 8, "base": 0.02, "cap": 0.2},
        rate_limit={"rpm": write_rps * 60},
        timeout={"attempt": 1.5, "total": 60.0},
        breaker={"enabled": False},
    )
    with sim(**config) as served:
        index = aindex(served, p)
        first = await index.upsert(vectors=vectors, namespace="corpus")
        assert first.upserted_count == 20_000
        stats = await index.describe_index_stats()
        assert stats.total_vector_count == distinct
        assert stats.namespaces["corpus"].vector_count == distinct
        again = await index.upsert(vectors=vectors, namespace="corpus")
        assert again.upserted_count == 20_000
        assert (await index.describe_index_stats()).total_vector_count == distinct
        seen = served.stats()
    assert seen.faults_total > 0  # the faults really happened…
    assert seen.faulted_writes_applied > 0  # …including writes applied although the client saw them fail
    assert seen.max_upsert_vectors <= 1_000
    assert seen.max_upsert_bytes <= 2 * 1024 * 1024
    assert sum(seen.limit_rejections.values()) == 0
    assert seen.rate_limited_total == 0  # the guard paced the writes under the limit
    assert seen.vectors_stored == distinct
