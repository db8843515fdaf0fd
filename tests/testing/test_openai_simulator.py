"""The OpenAI simulator, driven by the real ``openai`` SDK over real HTTP on loopback (and in-process)."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ragguard._hints import parse_duration, parse_retry_after
from ragguard._tokens import estimate_chat_tokens, estimate_text_tokens
from ragguard.testing import (
    ModelLimits,
    OpenAISimulator,
    Served,
    SimulatedConnectionDrop,
    SimulatorConfig,
    SimulatorStats,
    aserve,
    serve,
)
from ragguard.testing._content import embedding_vector, reply_text
from ragguard.testing._ratelimit import Account, WindowCounter, format_go_duration
from ragguard.testing.openai_simulator import _parser, config_from_args

pytestmark = pytest.mark.openai  # drives the real SDK: CI runs these on both SDK majors

EMBED = "text-embedding-3-small"
CHAT = "gpt-4o-mini"
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


class FakeClock:
    """A settable clock for buckets and windows (read from uvicorn's thread, moved by the test)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def frozen() -> float:
    """A clock that never moves: buckets never refill, so admissions are exact."""
    return 1000.0


def sync_client(base_url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, **options)


def async_client(base_url: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, **options)


def ask(text: str) -> Any:  # a messages list, typed loosely for the SDK's TypedDict parameters
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def shared() -> Iterator[Served[OpenAISimulator]]:
    """One latency-free simulator, served once for the tests of bodies and validation."""
    with serve(OpenAISimulator(SimulatorConfig.instant())) as served:
        yield served


@pytest.fixture
def served(shared: Served[OpenAISimulator]) -> Served[OpenAISimulator]:
    shared.reset()
    return shared


# --- pure parts ---


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0004, "1ms"),
        (0.006, "6ms"),
        (0.25, "250ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (90.5, "1m30.5s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
    ],
)
def test_go_durations_look_like_openais(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@given(st.floats(min_value=0, max_value=80_000, allow_nan=False))
def test_go_durations_parse_back_never_early(seconds: float) -> None:
    parsed = parse_duration(format_go_duration(seconds))
    assert parsed is not None
    assert seconds - 1e-9 <= parsed <= seconds + 0.001 + 1e-9


@settings(max_examples=60)
@given(
    rpm=st.integers(min_value=60, max_value=6000),
    burst=st.sampled_from([0.5, 1.0, 5.0]),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_request_bucket_never_admits_more_than_capacity_plus_refill(rpm: int, burst: float, gaps: list[float]) -> None:
    account = Account(rpm, None, burst, now=0.0)
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        if account.admit(0, now) is None:
            admitted += 1
    capacity = max(rpm / 60 * burst, 1)
    assert admitted <= capacity + rpm / 60 * now + 1e-6


@given(st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 50)), min_size=1, max_size=80))
def test_window_peak_is_the_largest_sixty_second_sum(events: list[tuple[int, int]]) -> None:
    arrivals = sorted((hundredths / 100, amount) for hundredths, amount in events)
    counter = WindowCounter()
    for t, amount in arrivals:
        counter.add(t, amount)
    brute = max(sum(a for u, a in arrivals if t - 60 < u <= t) for t, _ in arrivals)
    assert counter.peak == pytest.approx(brute)


def test_a_request_larger_than_the_token_limit_is_refused_as_too_large() -> None:
    account = Account(None, 600, 1.0, now=0.0)
    rejection = account.admit(601, 0.0)
    assert rejection is not None
    assert rejection.kind == "tokens"
    assert rejection.too_large
    assert account.admit(600, 0.0) is None  # bigger than the burst (10) but within the limit: a debt
    assert account.tokens is not None
    assert account.tokens.level == pytest.approx(10 - 600)
    late = account.admit(1, 1.0)
    assert late is not None
    assert late.wait == pytest.approx((1 - (10 - 600 + 10)) / 10)


@given(prompt=st.text(max_size=40), index=st.integers(0, 5), tokens=st.integers(1, 300))
def test_reply_text_is_exactly_the_token_count_the_clients_estimate(prompt: str, index: int, tokens: int) -> None:
    text = reply_text(prompt, index, tokens)
    assert estimate_text_tokens(text) == tokens
    assert text == reply_text(prompt, index, tokens)


def test_embedding_vectors_are_deterministic_unit_vectors_and_shorten_like_openais() -> None:
    full = embedding_vector(EMBED, "hello", 1536)
    assert full == embedding_vector(EMBED, "hello", 1536)
    assert math.fsum(v * v for v in full) == pytest.approx(1.0, abs=1e-5)
    assert full != embedding_vector(EMBED, "hello!", 1536)
    assert full != embedding_vector("text-embedding-3-large", "hello", 1536)
    short = embedding_vector(EMBED, "hello", 256)
    norm = math.sqrt(math.fsum(v * v for v in full[:256]))
    assert short == pytest.approx([v / norm for v in full[:256]], abs=1e-6)


def test_config_is_validated_and_frozen() -> None:
    with pytest.raises(ValidationError, match="must be <= 1"):
        SimulatorConfig(error_rate=0.6, drop_rate=0.5)
    with pytest.raises(ValidationError, match="scope='model'"):
        SimulatorConfig(scope="pooled", per_model={"m": ModelLimits(rpm=1)})
    with pytest.raises(ValidationError, match="rpm"):
        SimulatorConfig(rpm=-1)
    with pytest.raises(ValidationError, match="hint_style"):
        SimulatorConfig(hint_style="sometimes")
    config = SimulatorConfig.flaky(seed=3)
    assert (config.error_rate, config.drop_rate, config.stall_rate, config.stream_break_rate) == (
        0.05,
        0.01,
        0.01,
        0.01,
    )
    assert config.stall_s == 10.0
    assert config.seed == 3
    with pytest.raises(ValidationError):
        config.rpm = 5  # type: ignore[misc]
    assert OpenAISimulator(config, rpm=60).config.rpm == 60


def test_command_line_flags_override_the_config_json() -> None:
    base = SimulatorConfig(rpm=100, seed=9, per_model={"m": ModelLimits(tpm=50)})
    args = _parser().parse_args(["--config-json", base.model_dump_json(), "--rpm", "600", "--hint-style", "none"])
    config = config_from_args(args)
    assert (config.rpm, config.seed, config.hint_style) == (600, 9, "none")
    assert config.per_model["m"].tpm == 50
    assert config_from_args(_parser().parse_args(["--flaky"])).error_rate == 0.05


def test_set_testing_imports_without_starlette_or_uvicorn() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "from ragguard.testing import set_testing\n"
        "import ragguard.testing as t\n"
        "assert 'ragguard.testing.openai_simulator' not in sys.modules\n"
        "try:\n    t.OpenAISimulator\nexcept ImportError:\n    print('lazy')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"


# --- embeddings ---


@pytest.mark.anyio
async def test_embeddings_float_and_base64_carry_the_same_vectors(served: Served[OpenAISimulator]) -> None:
    client = async_client(served.base_url)
    texts = ["hello world", "retrieval augmented generation"]
    floats = await client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    encoded = await client.embeddings.create(model=EMBED, input=texts, encoding_format="base64")
    assert [item.index for item in floats.data] == [0, 1]
    for as_float, as_b64 in zip(floats.data, encoded.data, strict=True):
        assert isinstance(as_b64.embedding, str)
        raw = base64.b64decode(as_b64.embedding)
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert decoded == as_float.embedding
        assert len(decoded) == 1536
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == estimate_text_tokens(texts)
    again = await client.embeddings.create(model=EMBED, input=texts)
    assert again.data[1].embedding == floats.data[1].embedding  # deterministic
    await client.close()


@pytest.mark.anyio
async def test_embeddings_dimensions_models_and_token_arrays(served: Served[OpenAISimulator]) -> None:
    client = async_client(served.base_url)
    short = await client.embeddings.create(model=EMBED, input="hello", dimensions=256)
    assert len(short.data[0].embedding) == 256
    assert short.data[0].embedding == pytest.approx(embedding_vector(EMBED, "hello", 256))
    large = await client.embeddings.create(model="text-embedding-3-large", input="hello")
    assert len(large.data[0].embedding) == 3072
    ada = await client.embeddings.create(model="text-embedding-ada-002", input=[[1, 2, 3], [4, 5]])
    assert [len(d.embedding) for d in ada.data] == [1536, 1536]
    assert ada.usage.prompt_tokens == 5
    single = await client.embeddings.create(model=EMBED, input=[1, 2, 3])
    assert len(single.data) == 1
    assert single.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        await client.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=8)
    await client.close()


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (["x"] * 2049, r"'\$.input' is invalid"),
        ("", r"'\$.input' is invalid"),
        ([], r"'\$.input' is invalid"),
        (["ok", ""], r"'\$.input' is invalid"),
        (["a" * (4 * 8192 + 4)], "maximum context length is 8192 tokens"),
        (["a" * (4 * 8000)] * 38, "max 300000 tokens per request"),
    ],
    ids=["2049-inputs", "empty-string", "empty-list", "one-empty", "8193-tokens", "304000-tokens"],
)
def test_embeddings_limits_are_openai_shaped_400s(served: Served[OpenAISimulator], inputs: Any, match: str) -> None:
    client = sync_client(served.base_url)
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        client.embeddings.create(model=EMBED, input=inputs)
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    assert caught.value.type in ("invalid_request_error", "max_tokens_per_request")
    for header in RATE_HEADERS:
        assert header in caught.value.response.headers
    assert caught.value.request_id is not None
    assert served.stats().requests_admitted == 0  # validation errors are not charged


# --- chat / responses ---


@pytest.mark.anyio
async def test_chat_completion_is_deterministic_and_bounded_by_max_tokens(served: Served[OpenAISimulator]) -> None:
    client = async_client(served.base_url)
    messages = ask("What is RAG?")
    reply = await client.chat.completions.create(model=CHAT, messages=messages)
    again = await client.chat.completions.create(model=CHAT, messages=messages)
    text = reply.choices[0].message.content
    assert text
    assert text == again.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == estimate_chat_tokens(messages)
    assert reply.usage.completion_tokens == estimate_text_tokens(text)
    assert 20 <= reply.usage.completion_tokens <= 40

    capped = await client.chat.completions.create(
        model=CHAT,
        messages=messages,
        n=3,
        max_completion_tokens=5,
    )
    assert len(capped.choices) == 3
    assert [c.index for c in capped.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in capped.choices)
    assert all(estimate_text_tokens(c.message.content or "") == 5 for c in capped.choices)
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 15
    await client.close()


@pytest.mark.anyio
async def test_chat_stream_is_parsed_by_the_sdk_with_usage(served: Served[OpenAISimulator]) -> None:
    client = async_client(served.base_url)
    messages = ask("Stream me something")
    plain = await client.chat.completions.create(model=CHAT, messages=messages)
    stream = await client.chat.completions.create(
        model=CHAT,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish = None
    usage = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) > 3
    assert finish == "stop"
    assert usage is not None
    assert plain.usage is not None
    assert usage.total_tokens == plain.usage.total_tokens
    await client.close()


def test_responses_create_and_stream(served: Served[OpenAISimulator]) -> None:
    client = sync_client(served.base_url)
    response = client.responses.create(model=CHAT, input="Tell me about vectors", instructions="Be brief.")
    assert response.status == "completed"
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens == estimate_text_tokens(response.output_text)
    assert response.usage.input_tokens == estimate_chat_tokens(
        [{"role": "user", "content": "Tell me about vectors"}]
    ) + estimate_text_tokens("Be brief.")
    short = client.responses.create(model=CHAT, input="Tell me about vectors", max_output_tokens=4)
    assert short.status == "incomplete"
    assert short.incomplete_details is not None
    assert estimate_text_tokens(short.output_text) == 4

    with client.responses.stream(model=CHAT, input="Tell me about vectors", instructions="Be brief.") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == response.output_text


def test_unknown_paths_and_bad_json_get_openai_errors(served: Served[OpenAISimulator]) -> None:
    with httpx.Client(base_url=served.url) as http:
        missing = http.post("/v1/nothing", json={})
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"
        assert all(name in missing.headers for name in (*RATE_HEADERS, "x-request-id"))
        bad = http.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
    client = sync_client(served.base_url)
    with pytest.raises(openai.BadRequestError, match="empty array"):
        client.chat.completions.create(model=CHAT, messages=[])
    with pytest.raises(openai.BadRequestError, match="below minimum") as caught:
        client.chat.completions.create(model=CHAT, messages=ask("hi"), max_tokens=0)
    assert caught.value.param == "max_tokens"


# --- rate limits ---


@pytest.mark.anyio
async def test_a_concurrent_burst_trips_the_request_bucket(anyio_backend: str) -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=180, burst_seconds=1.0), clock=frozen)  # capacity 3
    async with aserve(sim) as served:
        client = async_client(served.base_url)
        outcomes: list[Any] = []

        async def one(i: int) -> None:
            try:
                raw = await client.embeddings.with_raw_response.create(model=EMBED, input=f"text {i}")
                outcomes.append(raw.headers)
            except openai.RateLimitError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        await client.close()

    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(limited) == 5
    assert len(outcomes) == 8
    for exc in limited:
        headers = exc.response.headers
        assert exc.code == "rate_limit_exceeded"
        assert exc.type == "requests"
        assert "on requests per min (RPM): Limit 180, Used 3, Requested 1" in exc.message
        assert headers["retry-after"] == "1"
        assert int(headers["retry-after-ms"]) == 334  # (1 - 0) / 3 per second, rounded up
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1s"
    for outcome in outcomes:
        headers = outcome.response.headers if isinstance(outcome, openai.RateLimitError) else outcome
        assert all(name in headers for name in RATE_HEADERS)
        assert headers["x-ratelimit-limit-requests"] == "180"
        assert headers["x-request-id"].startswith("req_")
    stats = sim.stats()
    assert stats.rate_limited["requests"] == 5
    assert stats.requests_admitted == 3
    assert stats.responses_by_status == {200: 3, 429: 5}


@pytest.mark.parametrize("style", ["both", "retry-after", "retry-after-date", "reset-only", "none"])
def test_each_hint_style(style: str) -> None:
    # 40 RPM over a 3 s burst: 2 requests of capacity refilled at 2/3 per second.
    config = SimulatorConfig.instant(rpm=40, burst_seconds=3.0, hint_style=style)
    with serve(OpenAISimulator(config, clock=frozen)) as served:
        client = sync_client(served.base_url)
        client.embeddings.create(model=EMBED, input="one")
        client.embeddings.create(model=EMBED, input="two")
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(model=EMBED, input="three")
    headers = caught.value.response.headers
    present = {name for name in ("retry-after", "retry-after-ms") if name in headers}
    if style == "both":
        assert present == {"retry-after", "retry-after-ms"}
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
    elif style == "retry-after":
        assert present == {"retry-after"}
        assert headers["retry-after"] == "2"
    elif style == "retry-after-date":
        assert present == {"retry-after"}
        assert headers["retry-after"].endswith(" GMT")
        parsed = parse_retry_after(headers["retry-after"])
        assert parsed is not None
        assert 0.4 <= parsed <= 2.6
    else:
        assert present == set()
    assert headers["x-ratelimit-remaining-requests"] == "0"
    if style == "none":
        assert "x-ratelimit-reset-requests" not in headers
        assert "x-ratelimit-reset-tokens" not in headers
    else:
        assert headers["x-ratelimit-reset-requests"] == "3s"


def test_the_token_bucket_trips_on_a_large_max_tokens() -> None:
    # 6,000 TPM: 100 tokens of capacity, 100 per second.
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=6000), clock=frozen)
    messages = ask("hi")
    prompt = estimate_chat_tokens(messages)
    with serve(sim) as served:
        client = sync_client(served.base_url)
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT,
            messages=messages,
            max_tokens=80,
        )
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100 - (prompt + 80)  # charged max, no refund
        assert "x-ratelimit-limit-requests" not in raw.headers  # rpm=None: no request limit
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=CHAT, messages=messages, max_tokens=80)
        assert caught.value.type == "tokens"
        assert caught.value.code == "rate_limit_exceeded"
        assert f"Requested {prompt + 80}" in caught.value.message
        charge = prompt + 80
        wait_ms = (charge - (100 - charge)) * 1000 / 100  # the missing tokens at 100 per second
        assert caught.value.response.headers["retry-after-ms"] == str(math.ceil(wait_ms))
        with pytest.raises(openai.RateLimitError, match="Request too large") as too_large:
            client.chat.completions.create(model=CHAT, messages=messages, max_tokens=7000)
        assert "retry-after" not in too_large.value.response.headers  # waiting cannot help
    stats = sim.stats()
    assert stats.rate_limited["tokens"] == 2
    assert stats.tokens_admitted == prompt + 80


def test_without_max_tokens_the_completion_is_debited_after_the_prompt() -> None:
    clock = FakeClock()
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=600_000), clock=clock)
    messages = ask("count me")
    with serve(sim) as served:
        reply = sync_client(served.base_url).chat.completions.create(model=CHAT, messages=messages)
    assert reply.usage is not None
    assert sim.stats().tokens_admitted == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_insufficient_quota_is_a_billing_429() -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(insufficient_quota=True))
    with serve(sim) as served, pytest.raises(openai.RateLimitError) as caught:
        sync_client(served.base_url).embeddings.create(model=EMBED, input="x")
    exc = caught.value
    assert exc.code == "insufficient_quota"
    assert exc.type == "insufficient_quota"
    assert "exceeded your current quota" in exc.message
    assert "retry-after" not in exc.response.headers
    assert all(name in exc.response.headers for name in RATE_HEADERS)
    stats = sim.stats()
    assert stats.rate_limited["insufficient_quota"] == 1
    assert stats.requests_admitted == 0


def test_model_scope_keeps_separate_buckets_and_pooled_shares_one() -> None:
    overrides = {"gpt-slow": ModelLimits(rpm=60, tpm=None)}
    for scope, expect_second in (("model", True), ("pooled", False)):
        limits: dict[str, Any] = {"per_model": overrides} if scope == "model" else {}
        sim = OpenAISimulator(SimulatorConfig.instant(rpm=60, scope=scope, **limits), clock=frozen)
        with serve(sim) as served:
            client = sync_client(served.base_url)
            client.embeddings.create(model=EMBED, input="a")
            try:
                raw = client.embeddings.with_raw_response.create(model="text-embedding-3-large", input="a")
                second_ok = True
                assert raw.headers["x-ratelimit-limit-requests"] == "60"
            except openai.RateLimitError:
                second_ok = False
            if scope == "model":
                raw = client.embeddings.with_raw_response.create(model="gpt-slow", input="a")
                assert "x-ratelimit-limit-tokens" not in raw.headers
        assert second_ok is expect_second
        assert set(sim.stats().buckets) == (
            {EMBED, "text-embedding-3-large", "gpt-slow"} if scope == "model" else {"*"}
        )


# --- faults ---


def _outcome(client: openai.OpenAI) -> str:
    try:
        client.embeddings.create(model=EMBED, input="x")
    except openai.APIConnectionError:
        return "drop"
    except openai.InternalServerError as exc:
        missing = [name for name in RATE_HEADERS if name not in exc.response.headers]
        return f"{exc.status_code} missing {missing}" if missing else str(exc.status_code)
    return "ok"


def test_faults_are_seeded_and_reproducible() -> None:
    config = SimulatorConfig.instant(error_rate=0.3, drop_rate=0.2, seed=7)
    sim = OpenAISimulator(config)
    with serve(sim) as served:
        client = sync_client(served.base_url)
        first = [_outcome(client) for _ in range(30)]
        stats = served.stats()
        served.reset()
        second = [_outcome(client) for _ in range(30)]
    with serve(OpenAISimulator(config, seed=8)) as served:
        other_client = sync_client(served.base_url)
        other = [_outcome(other_client) for _ in range(30)]
    assert first == second
    assert other != first
    assert set(first) == {"ok", "500", "503", "drop"}
    assert stats.faults["drop"] == first.count("drop")
    assert stats.faults["error_500"] == first.count("500") == stats.responses_by_status.get(500, 0)
    assert stats.faults["error_503"] == first.count("503")
    assert stats.requests_admitted == 30  # faulted requests still count against the limits


def test_a_stall_outlasts_the_client_timeout() -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(stall_rate=1.0, stall_s=30.0))
    started = time.monotonic()
    with serve(sim) as served:
        client = sync_client(served.base_url, timeout=0.3)
        with pytest.raises(openai.APITimeoutError):
            client.embeddings.create(model=EMBED, input="x")
        client.close()
    assert time.monotonic() - started < 10  # the stall ended when the client went away
    stats = sim.stats()
    assert stats.faults["stall"] == 1
    assert stats.requests_admitted == 1
    assert stats.responses_by_status == {}


async def drain(stream: Any, into: list[Any]) -> None:
    async for chunk in stream:
        into.append(chunk)


@pytest.mark.anyio
async def test_a_broken_stream_fails_after_its_first_chunk(anyio_backend: str) -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(stream_break_rate=1.0))
    async with aserve(sim) as served:
        client = async_client(served.base_url)
        stream = await client.chat.completions.create(model=CHAT, messages=ask("hi"), stream=True)
        received = []
        # openai 3.x wraps the cut as APIConnectionError; 2.x lets httpx's RemoteProtocolError through
        with pytest.raises((openai.APIConnectionError, httpx.TransportError)):
            await drain(stream, received)
        # A non-streamed request is never "broken".
        whole = await client.chat.completions.create(model=CHAT, messages=ask("hi"))
        await client.close()
    assert len(received) == 1
    assert received[0].choices[0].delta.role == "assistant"
    assert whole.choices[0].finish_reason == "stop"
    assert sim.stats().faults["stream_break"] == 1


def test_a_truncated_stream_ends_without_a_finish_reason() -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(stream_break_rate=1.0, stream_break_style="truncate"))
    with serve(sim) as served:
        stream = sync_client(served.base_url).chat.completions.create(
            model=CHAT,
            messages=ask("hi"),
            stream=True,
        )
        chunks = list(stream)
    assert len(chunks) == 1
    assert chunks[0].choices[0].finish_reason is None


@pytest.mark.anyio
async def test_in_process_mount_with_asgi_transport(anyio_backend: str) -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=60, drop_rate=0.5, seed=1), clock=frozen)
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))
    client = async_client("http://simulator/v1", http_client=http_client)
    outcomes = []
    for _ in range(3):
        try:
            reply = await client.embeddings.create(model=EMBED, input="x")
            outcomes.append(len(reply.data[0].embedding))
        except openai.RateLimitError:
            outcomes.append("429")
        except (SimulatedConnectionDrop, openai.APIConnectionError):
            outcomes.append("drop")
    await client.close()
    # One admission at 60 RPM on a frozen clock, and seed 1's first draw (0.13) is a drop: with no socket to
    # close in-process, the drop surfaces as SimulatedConnectionDrop (openai 2.x wraps it in APIConnectionError).
    assert outcomes == ["drop", "429", "429"]
    stats = sim.stats()
    assert stats.requests_admitted == 1
    assert stats.faults["drop"] == 1


# --- stats ---


def test_stats_count_what_was_sent(served: Served[OpenAISimulator]) -> None:
    client = sync_client(served.base_url)
    for text in ("a", "bb", "ccc"):
        client.embeddings.create(model=EMBED, input=text)
    reply = client.chat.completions.create(model=CHAT, messages=ask("hi"), max_tokens=10)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input="")
    with pytest.raises(openai.NotFoundError):
        client.post("/nothing", cast_to=object, body={})
    stats = served.stats()
    assert isinstance(stats, SimulatorStats)
    assert stats.requests_total == 6
    assert stats.requests_by_endpoint == {"/v1/embeddings": 4, "/v1/chat/completions": 1, "other": 1}
    assert stats.requests_by_model == {EMBED: 4, CHAT: 1}
    assert stats.responses_by_status == {200: 4, 400: 1, 404: 1}
    assert stats.requests_admitted == 4
    assert reply.usage is not None
    assert stats.tokens_admitted == 3 + reply.usage.prompt_tokens + 10  # max_tokens charged, not the real use
    assert stats.buckets[EMBED].tokens_admitted == 3
    assert stats.first_request_at is not None
    assert stats.last_request_at is not None
    assert stats.first_request_at <= stats.last_request_at
    with urllib.request.urlopen(served.url + "/_sim/stats") as response:
        assert SimulatorStats.model_validate(json.load(response)) == stats
    urllib.request.urlopen(urllib.request.Request(served.url + "/_sim/reset", method="POST", data=b"")).close()
    cleared = served.stats()
    assert cleared.requests_total == 0
    assert cleared.buckets == {}
    assert cleared.first_request_at is None


def test_max_admitted_in_any_sixty_second_window() -> None:
    clock = FakeClock()
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=100_000, tpm=None), clock=clock)
    with serve(sim) as served:
        client = sync_client(served.base_url)

        def send(n: int) -> None:
            for _ in range(n):
                client.embeddings.create(model=EMBED, input="four")  # 1 token each

        send(5)
        clock.advance(30)
        send(3)
        clock.advance(31)  # the first 5 leave the window
        send(1)
        clock.advance(100)
        send(2)
    bucket = sim.stats().buckets[EMBED]
    assert bucket.requests_admitted == 11
    assert bucket.tokens_admitted == 11
    assert bucket.max_requests_per_60s == 8
    assert bucket.max_tokens_per_60s == 8


# --- serving ---


def test_process_mode_serves_from_a_child_process() -> None:
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=120))
    with serve(sim, mode="process") as served:
        assert served.mode == "process"
        assert served.base_url == served.url + "/v1"
        client = sync_client(served.base_url)
        first = client.embeddings.create(model=EMBED, input="same text")
        assert first.data[0].embedding == embedding_vector(EMBED, "same text", 1536)
        client.chat.completions.create(model=CHAT, messages=ask("hi"))
        stats = served.stats()
        assert isinstance(stats, SimulatorStats)
        assert stats.requests_total == 2
        assert stats.responses_by_status == {200: 2}
        assert served.get_json("/_sim/config")["rpm"] == 120
        served.reset()
        assert served.stats().requests_total == 0
    assert sim.stats().requests_total == 0  # the parent's copy never served anything


@pytest.mark.anyio
async def test_aserve_in_thread_mode(anyio_backend: str) -> None:
    sim = OpenAISimulator(SimulatorConfig.instant())
    async with aserve(sim) as served:
        assert served.url.startswith("http://127.0.0.1:")
        client = async_client(served.base_url)
        response = await client.responses.create(model=CHAT, input="hello")
        await client.close()
    assert response.output_text
    assert sim.stats().requests_by_endpoint == {"/v1/responses": 1}


def test_serve_refuses_non_loopback_and_unservable_apps() -> None:
    with pytest.raises(ValueError, match="loopback"), serve(OpenAISimulator(), host="0.0.0.0"):
        pass
    with pytest.raises(ValueError, match="clock"), serve(OpenAISimulator(clock=frozen), mode="process"):
        pass

    async def plain_app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        raise NotImplementedError

    with pytest.raises(TypeError, match="cannot be served in a process"), serve(plain_app, mode="process"):
        pass
