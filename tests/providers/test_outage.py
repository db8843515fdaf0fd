"""An outage (every request answered 500 for a while) through the real openai SDK against the simulator.

The simulator's outage fault first, then the issue's measurement scaled down (a 2.5 s outage): a guarded client
with a retry budget sends at most ``(1 + ratio) ×`` the offered load upstream while the SDK's default client
multiplies it, and the guarded client recovers within one breaker open interval of the outage's end.
``benchmarks/outage.py`` is the full-size version (a 20 s outage under the default policy).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import ValidationError

import ragguard
from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve
from ragguard.testing.openai_simulator import _parser, config_from_args

pytestmark = pytest.mark.openai

KEY = "sk-test-0123456789abcdef"
MODEL = "text-embedding-3-small"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's async client is asyncio-first; the guards themselves are tested on trio too


class FakeClock:
    """A settable clock for the simulator (read from uvicorn's thread, moved by the test)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def post(served: Served[Any], path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(served.url + path, method="POST", data=b"")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10.0) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def embed_status(client: OpenAI) -> int:
    """The HTTP status of one embeddings call (the SDK's retries are off)."""
    try:
        client.embeddings.create(model=MODEL, input="hello")
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


@pytest.fixture
def clocked() -> Iterator[tuple[Served[OpenAISimulator], FakeClock, OpenAI]]:
    clock = FakeClock()
    sim = OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None, outage_s=5.0), clock=clock)
    with serve(sim) as served:
        client = OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
        yield served, clock, client
        client.close()


# --- the simulator's outage fault ------------------------------------------------------------------------------


def test_an_outage_answers_every_request_500_for_its_length_and_counts_them(
    clocked: tuple[Served[OpenAISimulator], FakeClock, OpenAI],
) -> None:
    served, clock, client = clocked
    assert embed_status(client) == 200
    status, body = post(served, "/_sim/outage?seconds=2")
    assert status == 200
    assert b'"ends_at":1002.0' in body
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as info:
            client.embeddings.create(model=MODEL, input="hello")
        assert info.value.body == {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    # any /v1 request, even an invalid one, and nothing consumed from the quota
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    clock.now += 1.999
    assert embed_status(client) == 500
    clock.now += 0.001
    assert embed_status(client) == 200
    stats = served.stats()
    assert stats.faults["outage"] == 5
    assert stats.responses_by_status == {200: 2, 500: 5}
    assert stats.requests_admitted == 2
    assert (stats.outage_started_at, stats.outage_ends_at) == (1000.0, 1002.0)


def test_an_outage_can_be_ended_early_and_defaults_to_the_configured_length(
    clocked: tuple[Served[OpenAISimulator], FakeClock, OpenAI],
) -> None:
    served, clock, client = clocked
    assert post(served, "/_sim/outage")[0] == 200  # no seconds: config.outage_s (5 s)
    clock.now += 4.9
    assert embed_status(client) == 500
    assert post(served, "/_sim/outage?seconds=0")[0] == 200
    assert embed_status(client) == 200
    for bad in ("-1", "nan", "inf", "soon"):
        status, _body = post(served, f"/_sim/outage?seconds={bad}")
        assert status == 400, bad
    assert embed_status(client) == 200
    served.app.start_outage(1.0)  # the same from Python
    assert embed_status(client) == 500
    served.reset()  # a reset ends it
    assert embed_status(client) == 200


def test_a_scheduled_outage_starts_after_start_and_again_after_a_reset() -> None:
    clock = FakeClock()
    sim = OpenAISimulator(SimulatorConfig.instant(outage_start_s=10.0, outage_s=3.0), clock=clock)
    with serve(sim) as served, OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0) as client:
        seen = []
        for at in (9.99, 10.0, 12.99, 13.0):
            clock.now = 1000.0 + at
            seen.append(embed_status(client))
        assert seen == [200, 500, 500, 200]
        served.reset()  # at 1013: the outage is 10 s from now again
        clock.now = 1022.99
        assert embed_status(client) == 200
        clock.now = 1023.0
        assert embed_status(client) == 500
        assert served.stats().faults["outage"] == 1


def test_outage_settings_are_validated_and_have_command_line_flags() -> None:
    with pytest.raises(ValidationError, match="outage_s"):
        SimulatorConfig(outage_start_s=5.0)  # scheduled, but of no length
    with pytest.raises(ValidationError, match="outage_s"):
        SimulatorConfig(outage_s=-1.0)
    with pytest.raises(ValidationError, match="outage_start_s"):
        SimulatorConfig(outage_start_s=-1.0, outage_s=1.0)
    config = config_from_args(_parser().parse_args(["--outage-start", "10", "--outage", "20"]))
    assert (config.outage_start_s, config.outage_s) == (10.0, 20.0)
    assert config_from_args(_parser().parse_args([])).outage_start_s is None
    with pytest.raises(ValueError, match="length"):
        OpenAISimulator(SimulatorConfig.instant()).start_outage()  # no length given, none configured


# --- the measurement, scaled down ------------------------------------------------------------------------------

RATE = 30.0  # offered calls per second
BEFORE, OUTAGE, AFTER = 1.0, 2.5, 2.5  # seconds of the timeline
OPEN = 1.0  # the guarded breaker's open interval, seconds
TOLERANCE = 0.5  # seconds of slack on the recovery (an arrival, a round trip, a busy machine)
RATIO, FLOOR_PER_S, WINDOW = 0.2, 10.0, 2.0  # the guarded retry budget (the default, its window scaled down)


@dataclass
class Run:
    """What one client saw: each call's start, end and success, on ``time.monotonic``."""

    calls: list[tuple[float, float, bool]] = field(default_factory=list)

    def offered(self, start: float, end: float) -> int:
        return sum(1 for began, _, _ in self.calls if start <= began < end)


async def offer(client: AsyncOpenAI, run: Run, t0: float) -> None:
    """``RATE`` calls per second from ``t0`` for the whole timeline, open loop (no call waits for another)."""

    async def one(i: int) -> None:
        began = time.monotonic()
        try:
            await client.embeddings.create(model=MODEL, input=f"call {i}")  # distinct: no cache, no coalescing
            ok = True
        except Exception:
            ok = False
        run.calls.append((began, time.monotonic(), ok))

    async with anyio.create_task_group() as tg:
        for i in range(int(RATE * (BEFORE + OUTAGE + AFTER))):
            await anyio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
            tg.start_soon(one, i)


@pytest.mark.anyio
async def test_under_an_outage_the_guarded_client_bounds_upstream_load_and_recovers_within_one_open_interval() -> None:
    guarded_policy = ragguard.Policy(
        retry={"base": 0.05, "cap": 0.5},  # four attempts, full jitter, the backoff scaled down
        retry_budget={"ratio": RATIO, "min_retries_per_s": FLOOR_PER_S, "window_s": WINDOW},
        breaker={"open_duration": OPEN},
    )
    sims = [OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None)) for _ in range(2)]
    with serve(sims[0]) as sdk_sim, serve(sims[1]) as guarded_sim:
        sdk = AsyncOpenAI(base_url=sdk_sim.base_url, api_key=KEY)  # the SDK's defaults: two retries
        guarded = ragguard.guard(
            AsyncOpenAI(base_url=guarded_sim.base_url, api_key=KEY), guarded_policy, backend=ragguard.MemoryBackend()
        )
        runs = {"sdk": Run(), "guarded": Run()}
        t0 = time.monotonic() + 0.05
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(offer, sdk, runs["sdk"], t0)
                tg.start_soon(offer, guarded, runs["guarded"], t0)
                await anyio.sleep(max(0.0, t0 + BEFORE - time.monotonic()))
                starts = [sim.start_outage(OUTAGE)[0] for sim in sims]
        await sdk.close()
        await guarded.close()
    start, end = min(starts), min(starts) + OUTAGE

    upstream = {"sdk": sims[0].stats().faults["outage"], "guarded": sims[1].stats().faults["outage"]}
    offered = {name: run.offered(start, end) for name, run in runs.items()}
    assert offered["guarded"] >= 0.8 * RATE * OUTAGE  # the load really was offered through the outage

    # guarded: at most (1 + ratio) × the offered load, plus the floor, reached the provider during the outage
    assert upstream["guarded"] <= (1 + RATIO) * offered["guarded"] + FLOOR_PER_S * OUTAGE
    # the SDK's defaults multiply it
    assert upstream["sdk"] > offered["sdk"]
    assert upstream["sdk"] > upstream["guarded"]

    # recovery: the first success after the outage within one open interval of its end, and from one open
    # interval on every call succeeds
    first = min(ended for began, ended, ok in runs["guarded"].calls if ok and ended >= end)
    assert first - end <= OPEN + TOLERANCE
    late = [ok for began, _, ok in runs["guarded"].calls if began >= end + OPEN + TOLERANCE]
    assert late
    assert all(late)
