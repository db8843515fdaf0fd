"""The OpenAI simulator's faults the chaos suite (tests/chaos) needed: slow answers, malformed JSON, wrong content
types, changing faults while it runs (``configure`` / ``POST /_sim/config``) and the ``in_flight`` gauge."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve
from ragguard.testing.openai_simulator import _parser, config_from_args

EMBED = {"model": "text-embedding-3-small", "input": "hello"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@contextlib.contextmanager
def instant(**fields: Any) -> Iterator[Served[OpenAISimulator]]:
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None, **fields))) as served:
        yield served


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def post(http: httpx.Client, served: Served[Any], path: str, body: Any) -> httpx.Response:
    return http.post(served.base_url + path, json=body, headers={"authorization": "Bearer sk-test"})


@pytest.mark.parametrize(("path", "body"), [("/embeddings", EMBED), ("/chat/completions", CHAT)])
def test_malformed_json_is_a_200_whose_json_is_cut(path: str, body: Any, http: httpx.Client) -> None:
    with instant(malformed_rate=1.0) as served:
        answer = post(http, served, path, body)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.text.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            answer.json()
        stats = served.stats()
        assert stats.faults["malformed"] == 1
        assert stats.responses_by_status == {200: 1}
        assert stats.faults_total == 1


def test_a_malformed_stream_cuts_its_first_event_and_ends(http: httpx.Client) -> None:
    with instant(malformed_rate=1.0) as served:
        answer = post(http, served, "/chat/completions", {**CHAT, "stream": True})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.text.split("\n\n") if line]
        assert len(events) == 1
        assert events[0].startswith("data: {")
        with pytest.raises(json.JSONDecodeError):
            json.loads(events[0].removeprefix("data: "))
        assert "[DONE]" not in answer.text


@pytest.mark.parametrize("stream", [False, True])
def test_wrong_content_type_is_a_200_html_page(stream: bool, http: httpx.Client) -> None:
    with instant(wrong_content_type_rate=1.0) as served:
        answer = post(http, served, "/chat/completions", {**CHAT, "stream": stream})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        assert answer.text.startswith("<!DOCTYPE html>")
        assert served.stats().faults["wrong_content_type"] == 1


def test_a_slow_answer_is_whole_and_late(http: httpx.Client) -> None:
    with instant(slow_rate=1.0, slow_s=0.3) as served:
        started = time.monotonic()
        answer = post(http, served, "/embeddings", EMBED)
        assert time.monotonic() - started >= 0.3
        assert answer.status_code == 200
        assert len(answer.json()["data"][0]["embedding"]) == 1536
        assert served.stats().faults["slow"] == 1


def test_new_fault_kinds_leave_a_seeds_older_faults_where_they_were(http: httpx.Client) -> None:
    def outcomes(**fields: Any) -> list[str]:
        found = []
        with instant(seed=5, error_rate=0.3, drop_rate=0.1, **fields) as served:
            for _ in range(40):
                try:
                    answer = post(http, served, "/embeddings", EMBED)
                except httpx.TransportError:
                    found.append("drop")
                    continue
                if answer.status_code != 200:
                    found.append(str(answer.status_code))
                elif not answer.headers["content-type"].startswith("application/json"):
                    found.append("html")
                else:
                    try:
                        answer.json()
                        found.append("ok")
                    except json.JSONDecodeError:
                        found.append("malformed")
        return found

    before = outcomes()
    after = outcomes(malformed_rate=0.2, wrong_content_type_rate=0.2)
    assert {"500", "503", "drop"} <= set(before)
    assert {"malformed", "html"} <= set(after)
    # every older fault is where it was; the new ones only take requests that were answered before
    for old, new in zip(before, after, strict=True):
        assert new == old or (old == "ok" and new in ("malformed", "html"))


def test_configure_changes_faults_while_running(http: httpx.Client) -> None:
    with instant(error_rate=1.0) as served:
        assert post(http, served, "/embeddings", EMBED).status_code in (500, 503)
        config = served.app.configure(error_rate=0.0, rpm=600)
        assert (config.error_rate, config.rpm) == (0.0, 600)
        assert served.app.config is config
        assert post(http, served, "/embeddings", EMBED).status_code == 200
        with pytest.raises(ValidationError, match="malformed_rate"):
            served.app.configure(malformed_rate=2.0)
        with pytest.raises(ValidationError, match="must be <= 1"):
            served.app.configure(error_rate=0.6, slow_rate=0.5)
        with pytest.raises(ValueError, match="seed"):
            served.app.configure(seed=3)
        # over HTTP, as a simulator in a child process is reconfigured
        answer = http.post(served.url + "/_sim/config", json={"error_rate": 1.0})
        assert answer.status_code == 200
        assert answer.json()["error_rate"] == 1.0
        assert post(http, served, "/embeddings", EMBED).status_code in (500, 503)
        bad = http.post(served.url + "/_sim/config", json={"no_such_field": 1})
        assert bad.status_code == 400
        assert "no_such_field" in bad.json()["error"]["message"]
        assert http.post(served.url + "/_sim/config", content=b"[1]").status_code == 400
        assert served.app.config.error_rate == 1.0


def test_in_flight_counts_requests_being_answered(http: httpx.Client) -> None:
    with instant(stall_rate=1.0, stall_s=30.0) as served:
        assert served.stats().in_flight == 0
        errors: list[BaseException] = []

        def stalled() -> None:
            try:
                with httpx.Client(timeout=0.5, trust_env=False) as client:
                    post(client, served, "/embeddings", EMBED)
            except httpx.TimeoutException as exc:
                errors.append(exc)

        thread = threading.Thread(target=stalled)
        thread.start()
        deadline = time.monotonic() + 5.0
        while served.stats().in_flight != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.stats().in_flight == 1
        thread.join()
        assert len(errors) == 1  # the client gave up on the stall...
        while served.stats().in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.stats().in_flight == 0  # ...and the simulator noticed


def test_the_new_faults_have_flags() -> None:
    args = _parser().parse_args(
        [
            "--slow-rate",
            "0.1",
            "--slow-s",
            "0.5",
            "--malformed-rate",
            "0.2",
            "--wrong-content-type-rate",
            "0.05",
            "--stream-break-style",
            "truncate",
        ]
    )
    config = config_from_args(args)
    assert (config.slow_rate, config.slow_s, config.malformed_rate, config.wrong_content_type_rate) == (
        0.1,
        0.5,
        0.2,
        0.05,
    )
    assert config.stream_break_style == "truncate"
    defaults = SimulatorConfig()
    assert (defaults.slow_rate, defaults.malformed_rate, defaults.wrong_content_type_rate) == (0.0, 0.0, 0.0)
