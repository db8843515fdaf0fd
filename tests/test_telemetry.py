"""OpenTelemetry spans and metrics, event hooks, usage accounting, and the promise that no secret is emitted:
through the real openai and pinecone SDKs against the simulators, read back with the OpenTelemetry SDK's
in-memory span exporter and metric reader."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI, OpenAI
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ragguard
from ragguard import events, telemetry, usage
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

pytestmark = pytest.mark.openai

KEY = "sk-ragguard-telemetry-SECRET-5f2c9a17d3"
EMBED = {"model": "text-embedding-3-small", "input": "hello world"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}

_EXPORTER = InMemorySpanExporter()
_READER = InMemoryMetricReader()
_installed = False


def _install_sdk() -> None:
    """The OpenTelemetry SDK, installed once for the process (a provider can be set only once)."""
    global _installed
    if not _installed:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
        _installed = True
    telemetry._next_check = 0.0  # look again now rather than within the second


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def otel() -> InMemorySpanExporter:
    _install_sdk()
    _EXPORTER.clear()
    usage.reset()
    return _EXPORTER


def policy(**sections: Any) -> ragguard.Policy:
    base: dict[str, Any] = {
        "retry": {"attempts": 8, "base": 0.01, "cap": 0.05},
        "breaker": {"enabled": False},
        "timeout": {"attempt": 5.0, "total": 30.0},
        "cache": {"enabled": False},
        "coalesce": {"enabled": False},
        "retry_budget": {"enabled": False},
    }
    base.update(sections)
    return ragguard.Policy(**base)


def sim_with(**config: Any) -> Any:
    return serve(OpenAISimulator(SimulatorConfig.instant(**config)))


def guarded(served: Served[Any], p: ragguard.Policy | None = None) -> Any:
    return ragguard.guard(
        AsyncOpenAI(base_url=served.base_url, api_key=KEY), p or policy(), backend=ragguard.MemoryBackend()
    )


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _metric_points(name: str) -> list[Any]:
    data = _READER.get_metrics_data()
    points: list[Any] = []
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


@pytest.mark.anyio
async def test_a_span_per_call_and_a_child_span_per_attempt(otel: InMemorySpanExporter) -> None:
    with sim_with(rpm=None, tpm=None, error_rate=0.5, seed=11) as served:
        client = guarded(served)
        for _ in range(12):
            await client.embeddings.create(**EMBED)
        await client.chat.completions.create(**CHAT)
        await client.close()
    spans = list(otel.get_finished_spans())
    calls = [s for s in spans if s.name == "embeddings text-embedding-3-small"]
    assert len(calls) == 12
    retried = [c for c in calls if c.attributes["ragguard.attempts"] > 1]
    assert retried, "with 50% 5xx some call must have been retried"
    call = retried[0]
    attrs = call.attributes
    assert attrs["gen_ai.system"] == "openai"
    assert attrs["gen_ai.operation.name"] == "embeddings"
    assert attrs["gen_ai.request.model"] == "text-embedding-3-small"
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["ragguard.backoff_s"] > 0
    assert call.kind == trace.SpanKind.CLIENT
    attempts = _children(spans, call)
    assert [a.name for a in attempts] == ["ragguard.attempt"] * attrs["ragguard.attempts"]
    assert sorted(a.attributes["ragguard.attempt"] for a in attempts) == list(range(1, len(attempts) + 1))
    failed = [a for a in attempts if "error.type" in a.attributes]
    assert failed
    assert all(a.attributes["http.response.status_code"] in (500, 503) for a in failed)
    # backoff is an event on the call span, one per retry (openinference#3664: never hidden in one span)
    retries = [e for e in call.events if e.name == "ragguard.retry"]
    assert len(retries) == attrs["ragguard.attempts"] - 1
    chat = next(s for s in spans if s.name == "chat gpt-4o-mini")
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0


@pytest.mark.anyio
async def test_failures_and_cache_hits_are_on_the_span(otel: InMemorySpanExporter) -> None:
    with sim_with(rpm=None, tpm=None) as served:
        client = guarded(served, policy(cache={"enabled": True}))
        chat = {**CHAT, "temperature": 0}
        await client.chat.completions.create(**chat)
        await client.chat.completions.create(**chat)
        await client.close()
    with sim_with(rpm=None, tpm=None, error_rate=1.0) as served:
        client = guarded(served, policy(retry={"attempts": 2, "base": 0.01, "cap": 0.01}))
        with pytest.raises(ragguard.RetryExhausted):
            await client.embeddings.create(**EMBED)
        await client.close()
    spans = list(otel.get_finished_spans())
    first, second = (s for s in spans if s.name == "chat gpt-4o-mini")
    assert first.attributes["ragguard.cache_hit"] is False
    assert first.attributes["ragguard.attempts"] == 1
    assert second.attributes["ragguard.cache_hit"] is True
    assert second.attributes["ragguard.attempts"] == 0
    failed = next(s for s in spans if s.name.startswith("embeddings"))
    assert failed.attributes["error.type"] == "RetryExhausted"
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert not failed.events or all(e.name != "exception" for e in failed.events)  # no exception message


def test_a_sync_client_parents_its_span_on_the_callers(otel: InMemorySpanExporter) -> None:
    with sim_with(rpm=None, tpm=None) as served:
        client = ragguard.guard(
            OpenAI(base_url=served.base_url, api_key=KEY), policy(), backend=ragguard.MemoryBackend()
        )
        with trace.get_tracer("app").start_as_current_span("handle request") as outer:
            client.embeddings.create(**EMBED)
        client.close()
    spans = list(otel.get_finished_spans())
    call = next(s for s in spans if s.name.startswith("embeddings"))
    assert call.parent is not None
    assert call.parent.span_id == outer.get_span_context().span_id
    assert len(_children(spans, call)) == 1


@pytest.mark.anyio
async def test_metrics_cover_calls_attempts_retries_and_tokens(otel: InMemorySpanExporter) -> None:
    # the reader's sums are cumulative over the process: compare before and after
    attempts0 = sum(p.value for p in _metric_points("ragguard.attempts"))
    retries0 = sum(p.value for p in _metric_points("ragguard.retries"))
    calls0 = sum(p.count for p in _metric_points("gen_ai.client.operation.duration"))
    with sim_with(rpm=None, tpm=None, error_rate=0.4, seed=5) as served:
        client = guarded(served)
        for _ in range(10):
            await client.embeddings.create(**EMBED)
        await client.chat.completions.create(**CHAT)
        await client.close()
    durations = _metric_points("gen_ai.client.operation.duration")
    assert sum(p.count for p in durations) - calls0 == 11
    assert {p.attributes["gen_ai.operation.name"] for p in durations} >= {"embeddings", "chat"}
    attempts = sum(p.value for p in _metric_points("ragguard.attempts")) - attempts0
    retries = sum(p.value for p in _metric_points("ragguard.retries")) - retries0
    assert attempts >= 11
    assert retries >= 1
    assert attempts == pytest.approx(11 + retries)
    tokens = _metric_points("gen_ai.client.token.usage")
    assert {p.attributes["gen_ai.token.type"] for p in tokens} == {"input", "output"}
    assert sum(p.value for p in _metric_points("ragguard.tokens.reserved")) > 0


@pytest.mark.anyio
async def test_event_hooks_see_retries_rate_limits_attempts_and_calls(otel: InMemorySpanExporter) -> None:
    seen: dict[str, list[Any]] = {"retry": [], "rate": [], "attempt": [], "call": []}
    subscriptions = [
        events.on_retry(seen["retry"].append),
        events.on_rate_limited(seen["rate"].append),
        events.on_attempt(seen["attempt"].append),
        events.on_call(seen["call"].append),
        events.on_call(lambda e: 1 / 0),  # a broken hook is logged and ignored
    ]
    try:
        # 120 RPM with a bucket of 2 and no local limiter: a burst of 6 meets provider 429s
        with sim_with(rpm=120, tpm=None, burst_seconds=1.0, hint_style="both") as served:
            client = guarded(served, policy(retry={"attempts": 10, "base": 0.05, "cap": 0.6}))
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(lambda: client.embeddings.create(**EMBED))
            await client.close()
    finally:
        for subscription in subscriptions:
            subscription.close()
    assert len(seen["call"]) == 6
    assert all(e.error_type is None and e.system == "openai" for e in seen["call"])
    assert sum(e.attempts for e in seen["call"]) == len(seen["attempt"])
    assert any(e.status_code == 429 for e in seen["attempt"])
    provider = [e for e in seen["rate"] if e.source == "provider"]
    assert len(provider) == sum(1 for e in seen["attempt"] if e.status_code == 429)
    assert seen["retry"]
    assert all(e.reason == "rate_limit" and e.name == "openai:embeddings:text-embedding-3-small" for e in seen["retry"])
    # closed subscriptions hear nothing more
    assert not events.has_subscribers(events.CallFinished)


def test_subscribe_rejects_what_is_not_an_event() -> None:
    with pytest.raises(TypeError, match="kind"):
        events.subscribe(dict, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn"):
        events.subscribe(events.CallFinished, "print")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_usage_and_cost_from_the_users_price_table(otel: InMemorySpanExporter) -> None:
    cost0 = sum(p.value for p in _metric_points("ragguard.usage.cost"))
    usage.set_prices({"gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60}})
    try:
        with sim_with(rpm=None, tpm=None, error_rate=0.3, seed=2) as served:
            client = guarded(served)
            answers = [await client.chat.completions.create(**CHAT) for _ in range(8)]
            await client.embeddings.create(**EMBED)
            await client.close()
    finally:
        usage.set_prices({})
    report = usage.report()
    chat = next(line for line in report.lines if line.model == "gpt-4o-mini")
    assert chat.system == "openai"
    assert chat.scope.startswith("openai:")
    assert chat.calls == 8
    assert chat.input_tokens == sum(a.usage.prompt_tokens for a in answers)
    assert chat.output_tokens == sum(a.usage.completion_tokens for a in answers)
    assert chat.cost == pytest.approx((chat.input_tokens * 0.15 + chat.output_tokens * 0.60) / 1e6)
    assert chat.retries == chat.attempts - chat.calls
    assert chat.retries >= 1
    assert chat.retry_tokens > 0  # the quota the retried attempts reserved
    embed = next(line for line in report.lines if line.model == "text-embedding-3-small")
    assert embed.cost is None  # not priced: no invented prices
    assert report.total_cost == pytest.approx(chat.cost)
    health = ragguard.health()
    assert any(line.model == "gpt-4o-mini" for line in health.usage.lines)
    assert sum(p.value for p in _metric_points("ragguard.usage.cost")) - cost0 == pytest.approx(chat.cost)
    with pytest.raises(ValueError, match="input_per_1m"):
        usage.set_prices({"m": {"input_per_1m": -1}})


@pytest.mark.anyio
@pytest.mark.pinecone
async def test_a_pinecone_call_is_a_database_client_span(otel: InMemorySpanExporter) -> None:
    from pinecone import Pinecone

    from ragguard.testing import PineconeSimulator, PineconeSimulatorConfig

    with serve(PineconeSimulator(PineconeSimulatorConfig.instant(dimension=4))) as served:
        index = ragguard.guard(Pinecone(api_key=KEY).IndexAsyncio(host=served.url), backend=ragguard.MemoryBackend())
        await index.upsert(vectors=[{"id": "a", "values": [1.0, 0.0, 0.0, 0.0]}], namespace="n")
        await index.query(vector=[1.0, 0.0, 0.0, 0.0], top_k=1, namespace="n")
        await index.close()
    spans = list(otel.get_finished_spans())
    query = next(s for s in spans if s.name == "query pinecone")
    assert query.attributes["db.system.name"] == "pinecone"
    assert query.attributes["db.operation.name"] == "query"
    assert "gen_ai.system" not in query.attributes
    assert len(_children(spans, query)) == 1


@pytest.mark.anyio
async def test_no_secret_in_spans_metrics_events_or_logs(
    otel: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    emitted: list[str] = []
    kinds = [
        events.CallFinished,
        events.AttemptFinished,
        events.RetryScheduled,
        events.RateLimited,
        events.BreakerStateChanged,
        events.CacheAccessed,
        events.BatchFlushed,
        events.FallbackUsed,
    ]
    subscriptions = [events.subscribe(kind, lambda e: emitted.append(repr(e))) for kind in kinds]
    caplog.set_level(logging.DEBUG)
    try:
        # 429s, 5xx, drops, retries, a breaker that opens, the caches, the batcher and a failing call
        with sim_with(rpm=300, tpm=None, burst_seconds=0.5, error_rate=0.3, drop_rate=0.1, seed=4) as served:
            p = policy(
                breaker={"failure_threshold": 3, "min_calls": 3, "open_duration": 0.05},
                cache={"enabled": True},
                coalesce={"enabled": True},
                batching={"enabled": True, "max_wait": 0.01},
            )
            client = guarded(served, p)

            async def one(i: int) -> None:
                try:
                    await client.embeddings.create(model="text-embedding-3-small", input=f"text {i % 5}")
                    await client.chat.completions.create(**{**CHAT, "temperature": 0})
                except ragguard.RagGuardError:
                    pass

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
            await client.close()
    finally:
        for subscription in subscriptions:
            subscription.close()
    spans = [span.to_json() for span in otel.get_finished_spans()]
    data = _READER.get_metrics_data()
    everything = "\n".join([*spans, data.to_json() if data is not None else "", *emitted, caplog.text])
    assert spans
    assert emitted
    for secret in (KEY, KEY[3:], hashlib.sha256(KEY.encode()).hexdigest(), "Bearer"):
        assert secret not in everything
    assert "Authorization" not in everything
    json.loads(spans[0])  # what was searched is the real serialised telemetry


@pytest.mark.anyio
async def test_breaker_transitions_are_events_metrics_and_span_events(otel: InMemorySpanExporter) -> None:
    changes: list[events.BreakerStateChanged] = []
    with events.on_breaker_state_change(changes.append), sim_with(rpm=None, tpm=None, error_rate=1.0) as served:
        p = policy(
            retry={"attempts": 1},
            breaker={"failure_threshold": 3, "min_calls": 3, "open_duration": 60},
        )
        client = guarded(served, p)
        for _ in range(5):
            with pytest.raises(ragguard.RagGuardError):
                await client.embeddings.create(**EMBED)
        await client.close()
    assert [(c.old, c.new) for c in changes] == [("closed", "open")]
    assert changes[0].name == "openai:embeddings:text-embedding-3-small"
    opened = [
        p for p in _metric_points("ragguard.breaker.state_changes") if p.attributes["ragguard.breaker.state"] == "open"
    ]
    assert sum(p.value for p in opened) >= 1
    spans = [s for s in otel.get_finished_spans() if s.name.startswith("embeddings")]
    assert [s.attributes["error.type"] for s in spans[-2:]] == ["CircuitOpenError", "CircuitOpenError"]
    assert all(s.attributes["ragguard.attempts"] == 0 for s in spans[-2:])  # refused before any attempt
    assert any(e.name == "ragguard.breaker_state_change" for s in spans for e in s.events)


class _Store:
    """A client of any kind, guarded by method map."""

    def __init__(self) -> None:
        self.calls = 0

    async def search(self, query: str) -> list[str]:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("the first attempt drops")
        return [query]


@pytest.mark.anyio
async def test_a_method_map_call_is_a_span_with_a_child_per_attempt(otel: InMemorySpanExporter) -> None:
    store = ragguard.guard(
        _Store(),
        methods={"search": policy(retry={"attempts": 3, "base": 0.01, "cap": 0.01})},
        backend=ragguard.MemoryBackend(),
    )
    assert await store.search("q") == ["q"]
    spans = list(otel.get_finished_spans())
    system = _Store.__module__.split(".")[0]  # the client's package
    call = next(s for s in spans if s.name == f"search {system}")
    assert call.attributes["db.operation.name"] == "search"
    assert call.attributes["ragguard.attempts"] == 2
    attempts = _children(spans, call)
    assert [a.attributes.get("error.type") for a in attempts] == ["ConnectionError", None]
