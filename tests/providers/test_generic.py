"""``ragguard.guard(obj, methods=...)``: any client's named methods through a pipeline, the rest untouched."""

from __future__ import annotations

from typing import Any

import pytest

import ragguard

FAST = ragguard.Policy(retry={"attempts": 3, "base": 0.001, "cap": 0.002}, cache={"enabled": False})


class Flaky:
    """A hand-made client: ``search`` fails ``failures`` times with a connection error, then answers."""

    def __init__(self, failures: int = 0, status: int | None = None) -> None:
        self.failures = failures
        self.status = status
        self.calls = 0
        self.untouched = "the object's own attribute"

    async def search(self, query: str, *, top_k: int = 3) -> list[str]:
        self.calls += 1
        if self.status is not None:
            error = RuntimeError(f"HTTP {self.status}")
            error.status_code = self.status  # type: ignore[attr-defined]
            raise error
        if self.calls <= self.failures:
            raise ConnectionError("connection reset")
        return [f"{query}-{i}" for i in range(top_k)]

    def rerank(self, hits: list[str]) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise TimeoutError("slow")
        return sorted(hits, reverse=True)


@pytest.mark.anyio
async def test_named_async_methods_are_retried_and_the_rest_is_untouched() -> None:
    client = Flaky(failures=2)
    guarded = ragguard.guard(client, FAST, methods={"search": None}, backend=ragguard.MemoryBackend())
    assert await guarded.search("q", top_k=2) == ["q-0", "q-1"]
    assert client.calls == 3
    assert guarded.untouched == "the object's own attribute"
    assert guarded.rerank(["a", "b"]) == ["b", "a"]  # not named: the object's own method, unguarded


@pytest.mark.anyio
async def test_non_retryable_statuses_are_never_retried() -> None:
    for status in (400, 401, 403, 404, 422):
        client = Flaky(status=status)
        guarded = ragguard.guard(client, FAST, methods={"search": None}, backend=ragguard.MemoryBackend())
        with pytest.raises(RuntimeError, match=str(status)):
            await guarded.search("q")
        assert client.calls == 1


def test_sync_methods_go_through_the_same_core() -> None:
    client = Flaky(failures=1)
    guarded = ragguard.guard(client, FAST, methods={"rerank": None}, backend=ragguard.MemoryBackend())
    assert guarded.rerank(["a", "c", "b"]) == ["c", "b", "a"]
    assert client.calls == 2


@pytest.mark.anyio
async def test_each_method_has_its_own_policy() -> None:
    write = ragguard.Policy(rate_limit={"rpm": 60, "burst_seconds": 1.0, "max_wait": 0}, retry={"attempts": 1})
    guarded = ragguard.guard(Flaky(), FAST, methods={"search": write, "rerank": None}, backend=ragguard.MemoryBackend())
    await guarded.search("q")  # the bucket holds one request (60/min × 1 s)
    with pytest.raises(ragguard.RateLimitTimeout):
        await guarded.search("q")
    assert guarded.rerank(["x"]) == ["x"]  # another method, another policy


def test_bad_method_maps_are_refused() -> None:
    with pytest.raises(ragguard.ConfigError, match="nope"):
        ragguard.guard(Flaky(), methods={"nope": None})
    with pytest.raises(ragguard.ConfigError, match="untouched"):
        ragguard.guard(Flaky(), methods={"untouched": None})
    with pytest.raises(ragguard.ConfigError, match="at least one"):
        ragguard.guard(Flaky(), methods={})
    with pytest.raises(ragguard.ConfigError, match="methods="):
        ragguard.guard(Flaky())


@pytest.mark.anyio
async def test_qdrant_embedded_client_by_method_map() -> None:
    from qdrant_client import AsyncQdrantClient, models

    client = AsyncQdrantClient(location=":memory:")
    write = ragguard.Policy(concurrency={"max_in_flight": 4}, retry={"attempts": 5})
    guarded: Any = ragguard.guard(
        client, methods={"query_points": None, "upsert": write}, backend=ragguard.MemoryBackend()
    )
    # create_collection is not named: it passes through to the client itself
    await guarded.create_collection("docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    points = [models.PointStruct(id=i, vector=[float(i == j) for j in range(4)], payload={"n": i}) for i in range(4)]
    result = await guarded.upsert("docs", points=points)
    assert result.status == models.UpdateStatus.COMPLETED
    found = await guarded.query_points("docs", query=[0.0, 0.0, 1.0, 0.0], limit=1)
    assert [p.id for p in found.points] == [2]
    assert guarded.query_points.__name__ == "query_points"  # the wrapper keeps the method's identity
    await client.close()


@pytest.mark.anyio
async def test_a_retryable_status_is_retried() -> None:
    client = Flaky(status=503)
    guarded = ragguard.guard(client, FAST, methods={"search": None}, backend=ragguard.MemoryBackend())
    with pytest.raises(ragguard.RetryExhausted):
        await guarded.search("q")
    assert client.calls == 3  # every attempt of the policy


@pytest.mark.anyio
async def test_the_retry_budget_keeps_an_outage_from_becoming_a_retry_storm() -> None:
    import anyio

    client = Flaky(status=503)
    policy = ragguard.Policy(
        retry={"attempts": 4, "base": 0.001, "cap": 0.002},
        retry_budget={"ratio": 0.2, "min_retries_per_s": 0.0},
        breaker={"enabled": False},
    )
    guarded = ragguard.guard(client, policy, methods={"search": None}, backend=ragguard.MemoryBackend())
    refusals: list[BaseException] = []

    async def one() -> None:
        try:
            await guarded.search("q")
        except ragguard.RetryBudgetExhausted as exc:
            refusals.append(exc)
        except ragguard.RetryExhausted:
            pass

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(one)
    assert client.calls <= 120  # (1 + ratio) × offered load; without a budget: 400
    assert refusals
    assert all(isinstance(exc.__cause__, RuntimeError) for exc in refusals)  # the provider's error, chained
