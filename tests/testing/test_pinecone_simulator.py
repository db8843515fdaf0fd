"""The Pinecone simulator, driven by the real ``pinecone`` SDK (sync ``Index`` and ``IndexAsyncio``) over real HTTP
on loopback."""

from __future__ import annotations

import dataclasses
import random
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pinecone
import pytest
from pinecone import (
    ApiError,
    PayloadTooLargeError,
    Pinecone,
    PineconeConnectionError,
    PineconeTimeoutError,
    RateLimitError,
    ServiceError,
    UnauthorizedError,
    Vector,
)
from pinecone._internal import http_client as pinecone_http
from pinecone._internal.bulk import get_registry
from pydantic import ValidationError

from ragguard.testing import Served, aserve, serve
from ragguard.testing.pinecone_simulator import (
    DEFAULT_NAMESPACE,
    PineconeSimulator,
    PineconeSimulatorConfig,
    PineconeSimulatorStats,
    _parser,
    config_from_args,
)

pytestmark = pytest.mark.pinecone  # drives the real SDK

API_VERSION = "2026-07"  # what pinecone 10.2's data plane sends as X-Pinecone-Api-Version


class FakeClock:
    """A settable clock for the buckets (read from uvicorn's thread, moved by the test)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_sdk_retries(index: Any) -> Any:
    """Switch off the SDK's own data-plane retries (3 by default, not configurable through its public API), so
    each call is exactly one HTTP request. Works for ``Index`` and ``AsyncIndex`` (whose client is built lazily)."""
    http = index._http
    client = http._ensure_client() if hasattr(http, "_ensure_client") else http._client
    transport = client._transport
    assert isinstance(transport, (pinecone_http._RetryTransport, pinecone_http._AsyncRetryTransport))
    transport._config = dataclasses.replace(transport._config, max_retries=0)
    return index


def sync_index(served: Served[PineconeSimulator], api_key: str = "test") -> pinecone.Index:
    return no_sdk_retries(Pinecone(api_key=api_key).Index(host=served.url))  # type: ignore[no-any-return]


def async_index(served: Served[PineconeSimulator]) -> Any:
    return no_sdk_retries(Pinecone(api_key="test").IndexAsyncio(host=served.url))


@pytest.fixture(autouse=True)
def _fresh_sdk_host_state() -> Iterator[None]:
    """The SDK keeps a process-wide retry budget and admission gate per host name ("127.0.0.1" for every
    simulator): the failures these tests provoke must not switch retries off for later tests."""
    yield
    pinecone_http.get_budget_registry()._reset()
    get_registry()._reset()


@pytest.fixture(scope="module")
def shared() -> Iterator[Served[PineconeSimulator]]:
    """One latency-free 4-dimensional cosine index, served once."""
    with serve(PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4))) as served:
        yield served


@pytest.fixture
def served(shared: Served[PineconeSimulator]) -> Served[PineconeSimulator]:
    shared.reset()
    return shared


# --- round trips ---


def test_every_endpoint_round_trips_through_the_sync_sdk(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    response = index.upsert(
        vectors=[
            Vector(id="a", values=[1.0, 0.0, 0.0, 0.0], metadata={"genre": "drama"}),
            ("b", [0.0, 1.0, 0.0, 0.0]),
            ("c", [1, 1, 0, 0], {"tags": ["x", "y"], "year": 2001}),
            {"id": "d", "values": [0.0, 0.0, 1.0, 0.0], "metadata": {"genre": "comedy"}},
        ],
        namespace="films",
    )
    assert response.upserted_count == 4

    fetched = index.fetch(ids=["a", "c", "missing"], namespace="films")
    assert set(fetched.vectors) == {"a", "c"}
    assert fetched.namespace == "films"
    assert fetched.vectors["c"].values == [1.0, 1.0, 0.0, 0.0]
    assert fetched.vectors["c"].metadata == {"tags": ["x", "y"], "year": 2001}
    assert fetched.vectors["a"].metadata == {"genre": "drama"}

    plain = index.query(vector=[1.0, 0.1, 0.0, 0.0], top_k=2, namespace="films")
    assert [m.id for m in plain.matches] == ["a", "c"]
    assert plain.matches[0].score == pytest.approx(1 / (1.01**0.5))
    assert plain.matches[0].values == []
    assert plain.matches[0].metadata is None
    full = index.query(
        vector=[1.0, 0.1, 0.0, 0.0], top_k=2, namespace="films", include_values=True, include_metadata=True
    )
    assert full.matches[0].values == [1.0, 0.0, 0.0, 0.0]
    assert full.matches[0].metadata == {"genre": "drama"}
    assert full.namespace == "films"

    by_id = index.query(id="c", top_k=3, namespace="films")
    assert [m.id for m in by_id.matches] == ["c", "a", "b"]  # a and b tie at 0.707: insertion order
    assert by_id.matches[0].score == pytest.approx(1.0)
    assert index.query(id="nowhere", top_k=3, namespace="films").matches == []

    stats = index.describe_index_stats()
    assert stats.dimension == 4
    assert stats.metric == "cosine"
    assert stats.total_vector_count == 4
    assert {name: ns.vector_count for name, ns in stats.namespaces.items()} == {"films": 4}

    index.delete(ids=["a", "missing"], namespace="films")
    index.delete(filter={"genre": "comedy"}, namespace="films")
    assert set(index.fetch(ids=["a", "b", "c", "d"], namespace="films").vectors) == {"b", "c"}
    index.delete(delete_all=True, namespace="films")
    assert index.describe_index_stats().total_vector_count == 0

    sim = served.stats()
    assert sim.api_versions == {API_VERSION: sim.requests_total}
    assert sim.vectors_upserted == 4
    assert sim.vectors_deleted == 4
    assert sim.responses_by_status == {200: sim.requests_total}


@pytest.mark.anyio
async def test_every_endpoint_round_trips_through_index_asyncio(served: Served[PineconeSimulator]) -> None:
    index = async_index(served)
    try:
        assert (await index.upsert(vectors=[("a", [1, 0, 0, 0], {"n": 1}), ("b", [0, 1, 0, 0])])).upserted_count == 2
        result = await index.query(vector=[0.9, 0.1, 0, 0], top_k=1, include_metadata=True)
        assert [(m.id, m.metadata) for m in result.matches] == [("a", {"n": 1})]
        assert result.namespace == ""
        assert set((await index.fetch(ids=["a", "b", "c"])).vectors) == {"a", "b"}
        await index.delete(ids=["a"])
        stats = await index.describe_index_stats()
        assert stats.total_vector_count == 1
        assert set(stats.namespaces) == {DEFAULT_NAMESPACE}
    finally:
        await index.close()
    assert served.stats().requests_by_endpoint == {
        "/vectors/upsert": 1,
        "/query": 1,
        "/vectors/fetch": 1,
        "/vectors/delete": 1,
        "/describe_index_stats": 1,
    }


def test_namespaces_are_isolated(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    index.upsert(vectors=[("same", [1, 0, 0, 0], {"ns": "one"})], namespace="one")
    index.upsert(vectors=[("same", [0, 1, 0, 0], {"ns": "two"}), ("other", [0, 0, 1, 0])], namespace="two")
    index.upsert(vectors=[("same", [0, 0, 0, 1])])  # the default namespace
    assert index.fetch(ids=["same"], namespace="one").vectors["same"].metadata == {"ns": "one"}
    assert index.fetch(ids=["same"], namespace="two").vectors["same"].values == [0.0, 1.0, 0.0, 0.0]
    assert index.fetch(ids=["same"], namespace="__default__").vectors["same"].values == [0.0, 0.0, 0.0, 1.0]
    assert index.fetch(ids=["other"], namespace="one").vectors == {}
    assert [m.id for m in index.query(vector=[0, 0, 1, 0], top_k=5, namespace="one").matches] == ["same"]

    index.delete(delete_all=True, namespace="one")
    stats = index.describe_index_stats()
    assert {name: ns.vector_count for name, ns in stats.namespaces.items()} == {"two": 2, DEFAULT_NAMESPACE: 1}
    assert stats.total_vector_count == 3


@pytest.mark.parametrize(
    ("metric", "order", "best_score"),
    [
        ("cosine", ["a", "b", "c"], 1.0),
        ("dotproduct", ["a", "c", "b"], 3.0),
        ("euclidean", ["b", "a", "c"], 0.04),  # squared distance, lowest first
    ],
)
def test_each_metric_orders_matches_its_own_way(metric: str, order: list[str], best_score: float) -> None:
    # Against q = (1, 0): a is aligned and long, b is short and close, c is long and off-axis.
    with serve(PineconeSimulator(PineconeSimulatorConfig.instant(dimension=2, metric=metric))) as served:  # type: ignore[arg-type]
        index = sync_index(served)
        index.upsert(vectors=[("c", [2.0, 2.0]), ("b", [1.0, 0.2]), ("a", [3.0, 0.0])])
        matches = index.query(vector=[1.0, 0.0], top_k=3).matches
        assert index.describe_index_stats().metric == metric
    assert [m.id for m in matches] == order
    assert matches[0].score == pytest.approx(best_score)


def test_dot_is_accepted_for_dotproduct_and_bad_configs_are_refused() -> None:
    assert PineconeSimulatorConfig(metric="dot").metric == "dotproduct"  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="must be <= 1"):
        PineconeSimulatorConfig(error_rate=0.6, drop_rate=0.3, stall_rate=0.2)
    with pytest.raises(ValidationError):
        PineconeSimulatorConfig(dimension=0)
    with pytest.raises(ValidationError):
        PineconeSimulatorConfig(write_rps=0)
    args = _parser().parse_args(["--config-json", '{"dimension": 16}', "--write-rps", "5", "--metric", "euclidean"])
    assert config_from_args(args) == PineconeSimulatorConfig(dimension=16, write_rps=5, metric="euclidean")
    with pytest.raises(ValueError, match="clock"):
        PineconeSimulator(clock=FakeClock()).subprocess_argv("127.0.0.1", 0)


# --- metadata filters ---

FILMS: list[tuple[str, list[float], dict[str, Any] | None]] = [
    ("m1", [1, 0, 0, 0], {"genre": "drama", "year": 2001, "rating": 7.5, "tags": ["x", "y"], "flag": True}),
    ("m2", [0, 1, 0, 0], {"genre": "comedy", "year": 2002, "rating": 6.0, "tags": ["y"], "flag": False}),
    ("m3", [0, 0, 1, 0], {"genre": "drama", "year": 2003, "rating": 8.1, "flag": 1}),
    ("m4", [0, 0, 0, 1], {"genre": "horror", "year": "2004"}),  # a string year: never a number
    ("m5", [1, 1, 0, 0], None),
    ("m6", [0, 1, 1, 0], {"genre": "comedy", "year": 2001.0, "tags": ["z"]}),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"genre": "drama"}, {"m1", "m3"}),
        ({"genre": {"$eq": "drama"}}, {"m1", "m3"}),
        ({"genre": {"$ne": "drama"}}, {"m2", "m4", "m5", "m6"}),
        ({"year": {"$in": [2001, 2003]}}, {"m1", "m3", "m6"}),
        ({"genre": {"$in": ["comedy", "horror"]}}, {"m2", "m4", "m6"}),
        ({"genre": {"$nin": ["drama", "comedy"]}}, {"m4", "m5"}),
        ({"year": {"$gt": 2001}}, {"m2", "m3"}),
        ({"year": {"$gte": 2001}}, {"m1", "m2", "m3", "m6"}),
        ({"year": {"$lt": 2002}}, {"m1", "m6"}),
        ({"year": {"$lte": 2002}}, {"m1", "m2", "m6"}),
        ({"year": {"$gte": 2001, "$lt": 2003}}, {"m1", "m2", "m6"}),
        ({"year": 2001}, {"m1", "m6"}),  # 2001 == 2001.0
        ({"tags": "y"}, {"m1", "m2"}),  # a list field holds the value
        ({"tags": {"$in": ["z", "x"]}}, {"m1", "m6"}),
        ({"tags": {"$nin": ["y"]}}, {"m3", "m4", "m5", "m6"}),
        ({"tags": {"$ne": "y"}}, {"m3", "m4", "m5", "m6"}),
        ({"flag": True}, {"m1"}),  # true is not 1
        ({"flag": {"$eq": 1}}, {"m3"}),
        ({"$and": [{"genre": "drama"}, {"rating": {"$gt": 8}}]}, {"m3"}),
        ({"$or": [{"genre": "horror"}, {"rating": {"$lt": 7}}]}, {"m2", "m4"}),
        ({"genre": "comedy", "year": {"$lt": 2002}}, {"m6"}),  # keys side by side: all must hold
        ({"$or": [{"$and": [{"genre": "drama"}, {"year": 2001}]}, {"tags": "z"}]}, {"m1", "m6"}),
        ({"tags": {"$exists": False}}, {"m3", "m4", "m5"}),
        ({"rating": {"$exists": True}}, {"m1", "m2", "m3"}),
    ],
)
def test_each_filter_operator_selects_what_pinecone_would(
    served: Served[PineconeSimulator], spec: dict[str, Any], expected: set[str]
) -> None:
    index = sync_index(served)
    index.upsert(vectors=FILMS, namespace="f")
    matches = index.query(vector=[1, 1, 1, 1], top_k=10, namespace="f", filter=spec).matches
    assert {m.id for m in matches} == expected
    assert index.describe_index_stats(filter=spec).total_vector_count == len(expected)


def test_delete_by_filter_removes_exactly_the_matches(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    index.upsert(vectors=FILMS, namespace="f")
    index.delete(filter={"$or": [{"genre": "drama"}, {"tags": "z"}]}, namespace="f")
    remaining = index.fetch(ids=[vid for vid, _, _ in FILMS], namespace="f").vectors
    assert set(remaining) == {"m2", "m4", "m5"}
    assert served.stats().vectors_deleted == 3


@pytest.mark.parametrize(
    "spec",
    [
        {"genre": {"$regex": "dr.*"}},
        {"year": {"$gt": "2001"}},
        {"year": {"$in": "2001"}},
        {"$or": []},
        {"$not": {"genre": "drama"}},
        {"genre": {"nested": "object"}},
        {"tags": ["x"]},
    ],
)
def test_invalid_filters_are_400s(served: Served[PineconeSimulator], spec: dict[str, Any]) -> None:
    index = sync_index(served)
    with pytest.raises(ApiError) as caught:
        index.query(vector=[1, 0, 0, 0], top_k=1, filter=spec)
    assert caught.value.status_code == 400
    assert "Invalid filter" in str(caught.value)


# --- Pinecone's limits ---


def test_more_than_1000_vectors_is_a_plain_400(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    vectors = [(f"v{i}", [1.0, 0.0, 0.0, float(i)]) for i in range(1001)]
    with pytest.raises(ApiError) as caught:
        index.upsert(vectors=vectors)
    assert type(caught.value) is ApiError
    assert caught.value.status_code == 400
    assert "1001 vectors" in str(caught.value)
    assert index.upsert(vectors=vectors[:1000]).upserted_count == 1000
    stats = served.stats()
    assert stats.limit_rejections["vector_count"] == 1
    assert stats.max_upsert_vectors == 1001
    assert stats.vectors_stored == 1000


def test_a_body_over_2_mib_is_a_413_payload_too_large(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    vectors = [(f"v{i}", [1.0, 0.0, 0.0, 0.0], {"text": "a" * 39_000}) for i in range(60)]  # ~2.3 MB
    with pytest.raises(PayloadTooLargeError) as caught:
        index.upsert(vectors=vectors)
    assert caught.value.status_code == 413
    assert index.upsert(vectors=vectors[:50]).upserted_count == 50  # ~1.95 MB: fits
    stats = served.stats()
    assert stats.limit_rejections["request_bytes"] == 1
    assert stats.max_upsert_bytes > 2 * 1024 * 1024
    assert stats.vectors_stored == 50


def test_dimension_mismatch_and_oversized_metadata_are_400s(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    with pytest.raises(ApiError, match="dimension 3 does not match the dimension of the index 4") as caught:
        index.upsert(vectors=[("ok", [1, 0, 0, 0]), ("short", [1, 0, 0])])
    assert caught.value.status_code == 400
    with pytest.raises(ApiError, match="Query vector dimension 5"):
        index.query(vector=[1, 0, 0, 0, 0], top_k=1)
    with pytest.raises(ApiError, match="exceeds the limit of 40960 bytes per vector") as caught:
        index.upsert(vectors=[("big", [1, 0, 0, 0], {"text": "a" * 41_000})])
    assert caught.value.status_code == 400
    nested = {"vectors": [{"id": "nested", "values": [1, 0, 0, 0], "metadata": {"a": {"b": 1}}}]}
    answer = httpx.post(served.url + "/vectors/upsert", json=nested, headers={"Api-Key": "test"})  # the SDK refuses it
    assert answer.status_code == 400
    assert answer.json()["code"] == 3
    assert "metadata values must be a string" in answer.json()["message"]
    with pytest.raises(ApiError, match="non-zero"):
        index.upsert(vectors=[("zero", [0, 0, 0, 0])])  # cosine cannot rank an all-zero vector
    stats = served.stats()
    assert stats.limit_rejections == {"vector_count": 0, "request_bytes": 0, "metadata_bytes": 1, "dimension": 2}
    assert stats.vectors_stored == 0  # a refused request writes nothing, not even its valid vectors
    assert stats.responses_by_status == {400: 5}


def test_api_key_is_required_and_checked() -> None:
    config = PineconeSimulatorConfig.instant(dimension=4, api_key="secret")
    with serve(PineconeSimulator(config)) as served:
        with pytest.raises(UnauthorizedError):
            sync_index(served, api_key="wrong").describe_index_stats()
        assert sync_index(served, api_key="secret").describe_index_stats().total_vector_count == 0
        bare = httpx.post(served.url + "/query", json={"topK": 1, "vector": [1, 0, 0, 0]})
        assert bare.status_code == 401
        unknown = httpx.get(served.url + "/vectors/list", headers={"Api-Key": "secret"})
        assert unknown.status_code == 404
        assert served.stats().requests_by_endpoint["other"] == 1


# --- rate limits ---


def test_a_write_limit_answers_429_with_retry_after_and_spares_reads() -> None:
    clock = FakeClock()
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4, write_rps=2), clock=clock)
    with serve(sim) as served:
        index = sync_index(served)
        index.upsert(vectors=[("a", [1, 0, 0, 0])])
        index.upsert(vectors=[("b", [0, 1, 0, 0])])
        with pytest.raises(RateLimitError) as caught:
            index.upsert(vectors=[("c", [0, 0, 1, 0])])
        assert caught.value.status_code == 429
        assert caught.value.retry_after == 1.0  # 0.5 s to the next token, rounded up to whole seconds
        assert caught.value.headers is not None
        assert caught.value.headers["retry-after"] == "1"
        assert index.describe_index_stats().total_vector_count == 2  # reads have their own (unlimited) bucket
        clock.advance(0.5)
        index.upsert(vectors=[("c", [0, 0, 1, 0])])
    stats = sim.stats()
    assert stats.rate_limited == {"read_requests": 0, "write_requests": 1, "write_vectors": 0}
    assert stats.responses_by_endpoint["/vectors/upsert"] == {200: 3, 429: 1}
    assert stats.max_writes_per_s == 3  # two at once, and one more half a second later
    assert stats.vectors_stored == 3


def test_vector_and_read_limits_with_fractional_retry_after() -> None:
    config = PineconeSimulatorConfig.instant(dimension=4, write_vectors_per_s=10, read_rps=1, retry_after="fractional")
    sim = PineconeSimulator(config, clock=FakeClock())
    with serve(sim) as served:
        index = sync_index(served)
        index.upsert(vectors=[(f"v{i}", [1, 0, 0, float(i)]) for i in range(10)])
        with pytest.raises(RateLimitError) as caught:
            index.upsert(vectors=[("x", [1, 0, 0, 0]), ("y", [0, 1, 0, 0])])
        assert caught.value.retry_after == pytest.approx(0.2)
        index.fetch(ids=["v1"])
        with pytest.raises(RateLimitError) as caught:
            index.query(vector=[1, 0, 0, 0], top_k=1)
        assert caught.value.retry_after == pytest.approx(1.0)
    stats = sim.stats()
    assert stats.rate_limited == {"read_requests": 1, "write_requests": 0, "write_vectors": 1}
    assert stats.max_vectors_per_s == 10
    assert stats.vectors_stored == 10


@pytest.mark.anyio
async def test_index_asyncio_surfaces_429_as_rate_limit_error() -> None:
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4, read_rps=1), clock=FakeClock())
    async with aserve(sim) as served:
        index = async_index(served)
        try:
            await index.describe_index_stats()
            with pytest.raises(RateLimitError) as caught:
                await index.describe_index_stats()
        finally:
            await index.close()
    assert caught.value.retry_after == 1.0
    assert sim.stats().rate_limited_total == 1


# --- faults ---


def _outcome(call: Any) -> str:
    try:
        call()
    except ServiceError as exc:
        return str(exc.status_code)
    except PineconeConnectionError:
        return "drop"
    return "ok"


def test_faults_are_seeded_reproducible_and_counted() -> None:
    config = PineconeSimulatorConfig.instant(dimension=4, error_rate=0.4, drop_rate=0.2, seed=11)
    with serve(PineconeSimulator(config)) as served:
        index = sync_index(served)
        first = [_outcome(index.describe_index_stats) for _ in range(25)]
        stats = served.stats()
        served.reset()
        second = [_outcome(index.describe_index_stats) for _ in range(25)]
    assert first == second
    assert {"ok", "500", "503", "drop"} <= set(first)
    assert stats.faults == {
        "drop": first.count("drop"),
        "error_500": first.count("500"),
        "error_503": first.count("503"),
        "stall": 0,
    }
    assert stats.requests_total == 25
    assert stats.responses_by_status.get(200, 0) == first.count("ok")


@pytest.mark.parametrize("applied", [0.0, 1.0])
def test_a_faulted_write_may_have_been_applied(applied: float) -> None:
    config = PineconeSimulatorConfig.instant(dimension=4, error_rate=1.0, applied_before_fault=applied)
    sim = PineconeSimulator(config)
    with serve(sim) as served, pytest.raises(ServiceError):
        sync_index(served).upsert(vectors=[("a", [1, 0, 0, 0]), ("b", [0, 1, 0, 0])])
    stats = sim.stats()
    assert stats.vectors_stored == (2 if applied else 0)
    assert stats.faulted_writes_applied == (1 if applied else 0)


def test_a_stall_outlasts_the_client_timeout_and_may_still_apply() -> None:
    config = PineconeSimulatorConfig.instant(dimension=4, stall_rate=1.0, stall_s=60.0, applied_before_fault=1.0)
    sim = PineconeSimulator(config)
    with serve(sim) as served:
        index = sync_index(served)
        with pytest.raises(PineconeTimeoutError):
            index.upsert(vectors=[("a", [1, 0, 0, 0])], timeout=0.3)
        deadline = time.monotonic() + 10.0  # the server applies it when it notices the client left
        while sim.stats().vectors_stored == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    stats = sim.stats()
    assert stats.faults["stall"] == 1
    assert stats.vectors_stored == 1
    assert stats.faulted_writes_applied == 1


def test_the_sdk_retries_data_plane_requests_itself_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins pinecone 10.2's transport behaviour that a guard must account for: 3 retries of 429/5xx and of
    connection errors, honouring Retry-After (plus up to 50 % jitter); 4xx never retried."""
    slept: list[float] = []
    monkeypatch.setattr(pinecone_http, "_retry_sleep", slept.append)
    pinecone_http.get_budget_registry()._reset()
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4, error_rate=1.0))
    with serve(sim) as served:
        index = Pinecone(api_key="test").Index(host=served.url)  # SDK defaults
        with pytest.raises(ServiceError):
            index.describe_index_stats()
    assert sim.stats().requests_total == 4
    assert len(slept) == 3

    slept.clear()
    pinecone_http.get_budget_registry()._reset()
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4, write_rps=1), clock=FakeClock())
    with serve(sim) as served:
        index = Pinecone(api_key="test").Index(host=served.url)
        index.upsert(vectors=[("a", [1, 0, 0, 0])])
        with pytest.raises(RateLimitError):
            index.upsert(vectors=[("b", [0, 1, 0, 0])])
        with pytest.raises(ApiError):
            index.upsert(vectors=[("c", [0, 1, 0])])  # a 400: one request
    assert sim.stats().responses_by_endpoint["/vectors/upsert"] == {200: 1, 429: 4, 400: 1}
    assert len(slept) == 3
    assert all(1.0 <= s <= 1.5 for s in slept)


# --- stats, reset, scale, process mode ---


def test_stats_and_reset_over_http(served: Served[PineconeSimulator]) -> None:
    index = sync_index(served)
    index.upsert(vectors=[("a", [1, 0, 0, 0], {"t": "x" * 100}), ("b", [0, 1, 0, 0])], namespace="n")
    index.query(vector=[1, 0, 0, 0], top_k=1, namespace="n")
    stats = PineconeSimulator.parse_stats(urllib.request.urlopen(served.url + "/_sim/stats").read())
    assert stats.requests_by_endpoint == {"/vectors/upsert": 1, "/query": 1}
    assert stats.upsert_requests == 1
    assert stats.max_upsert_vectors == 2
    assert stats.max_metadata_bytes == len('{"t":""}') + 100
    assert stats.namespaces == {"n": 2}
    assert stats.first_request_at is not None
    assert stats.last_request_at is not None

    urllib.request.urlopen(urllib.request.Request(served.url + "/_sim/reset?keep_data=1", method="POST", data=b""))
    kept = served.stats()
    assert kept.requests_total == 0
    assert kept.vectors_stored == 2
    served.reset()
    cleared = served.stats()
    assert cleared.requests_total == 0
    assert cleared.vectors_stored == 0
    assert cleared.max_upsert_vectors == 0
    assert index.describe_index_stats().total_vector_count == 0


def test_twenty_thousand_vectors_with_metadata_ingest_and_reingest_idempotently() -> None:
    rng = random.Random(5)
    vectors = [
        {
            "id": f"doc{i // 10}-chunk{i % 10}",
            "values": [rng.uniform(-1, 1) for _ in range(32)],
            "metadata": {"doc": i // 10, "lang": "en" if i % 3 else "fr", "text": f"chunk {i} " * 8},
        }
        for i in range(20_000)
    ]
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=32))
    with serve(sim) as served:
        index = sync_index(served)
        for start in range(0, len(vectors), 1000):
            index.upsert(vectors=vectors[start : start + 1000], namespace="docs")
        again = index.upsert(vectors=vectors, namespace="docs", batch_size=1000, show_progress=False)
        assert again.upserted_count == 20_000
        assert not again.has_errors
        assert index.describe_index_stats().total_vector_count == 20_000
        hits = index.query(
            vector=vectors[123]["values"], top_k=5, namespace="docs", filter={"doc": 12}, include_metadata=True
        ).matches
        assert hits[0].id == "doc12-chunk3"
        assert len(hits) == 5
        assert all(m.metadata is not None and m.metadata["doc"] == 12 for m in hits)
        assert index.query(vector=vectors[0]["values"], top_k=1, namespace="docs").matches[0].id == "doc0-chunk0"
    stats = sim.stats()
    assert stats.upsert_requests == 40
    assert stats.vectors_upserted == 40_000
    assert stats.vectors_stored == 20_000
    assert stats.max_upsert_vectors <= 1000
    assert stats.max_upsert_bytes <= 2 * 1024 * 1024


def test_process_mode_serves_from_a_child_process() -> None:
    sim = PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4, metric="euclidean"))
    with serve(sim, mode="process") as served:
        assert served.mode == "process"
        index = sync_index(served)
        index.upsert(vectors=[("a", [1, 0, 0, 0]), ("b", [0, 3, 0, 0])])
        assert [m.id for m in index.query(vector=[0, 2, 0, 0], top_k=2).matches] == ["b", "a"]
        stats = served.stats()
        assert isinstance(stats, PineconeSimulatorStats)
        assert stats.vectors_stored == 2
        assert stats.requests_total == 2
        served.reset()
        assert served.stats().vectors_stored == 0
    assert sim.stats().requests_total == 0  # the parent's copy never saw a request
