"""An OpenAI-compatible HTTP API simulator, for tests and load tests of code that calls OpenAI.

:class:`OpenAISimulator` is an ASGI app answering ``POST /v1/embeddings``, ``POST /v1/chat/completions`` and
``POST /v1/responses`` with bodies and headers the ``openai`` SDK (2.x and 3.x) parses, deterministically
(the same request always gets the same vectors and text). It enforces OpenAI-style rate limits, injects seeded
faults and keeps stats::

    from openai import AsyncOpenAI
    from ragguard.testing import OpenAISimulator, SimulatorConfig, aserve

    sim = OpenAISimulator(SimulatorConfig(rpm=600, tpm=100_000))
    async with aserve(sim) as served:
        client = AsyncOpenAI(base_url=served.base_url, api_key="sk-test", max_retries=0)
        await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    print(sim.stats().responses_by_status)

Serve it with :func:`~ragguard.testing.serve` / :func:`~ragguard.testing.aserve` (uvicorn on loopback, in a
thread or a child process), from the command line (``python -m ragguard.testing.openai_simulator --rpm 600``),
or mount it in-process with ``httpx.ASGITransport(app=sim)`` (or ``httpx2.ASGITransport``) and no server at
all. In-process mounting has no connection to drop: a *drop* or a *stream break* (``disconnect`` style) then
raises :class:`SimulatedConnectionDrop` out of the transport instead of closing a socket (the SDK passes it
through unwrapped), and client timeouts depend on the transport.

Rate limits (https://platform.openai.com/docs/guides/rate-limits)
    A request bucket and a token bucket per model (``scope="model"``, OpenAI's rule) or one pair for all
    models (``scope="pooled"``). Each refills continuously at ``limit / 60`` per second and holds
    ``limit / 60 · burst_seconds``: OpenAI enforces per-minute limits over shorter periods, so 60,000 RPM is
    about 1,000 per second and 1,000 simultaneous callers trip it. A request is charged at admission
    ``prompt estimate + max_tokens · n`` tokens (``max_completion_tokens``/``max_output_tokens`` likewise),
    never refunded; with no maximum, the prompt is charged at admission and the real completion debited when
    the answer is produced. A request larger than the bucket's capacity is admitted when the bucket is full
    and leaves a debt; one larger than the per-minute limit itself gets OpenAI's "Request too large" 429.
    Requests refused with 429 consume nothing; admitted requests that then fail (500/503, drop, stall) count.
    Prompt tokens are counted with :func:`ragguard._tokens.estimate_text_tokens` /
    :func:`~ragguard._tokens.estimate_chat_tokens`, the estimator ragguard's clients use, so both sides agree.

Headers
    Every ``/v1`` response carries ``x-request-id`` and
    ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (limit: per minute; remaining: what the bucket
    holds now; reset: Go-style duration until it is full again, e.g. ``6m0s``, ``1s``, ``250ms``,
    ``1m30.5s``). A rate-limit 429 adds ``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``
    (milliseconds, rounded up), according to ``hint_style``.

Faults (seeded: the same seed gives the same sequence of outcomes for the same sequence of requests)
    ``error_rate`` (half 500, half 503), ``drop_rate`` (the connection is closed without a response: the
    client sees a connection error), ``stall_rate`` (the answer is held ``stall_s`` seconds, past a client's
    attempt timeout), ``stream_break_rate`` (a streamed answer is cut after its first chunk: the connection
    closed mid-body with ``stream_break_style="disconnect"``, or a truncated SSE stream, ended cleanly without
    its final chunk and ``[DONE]``, with ``"truncate"``), ``slow_rate`` (the right answer, ``slow_s`` seconds
    late: slower than usual, yet within a client's attempt timeout), ``malformed_rate`` (a 200 whose JSON body
    is cut in half; for a stream, its first event's JSON is cut and the body ends there),
    ``wrong_content_type_rate`` (a 200 with a ``text/html`` page, as a misbehaving proxy sends, instead of
    JSON or an event stream). :meth:`OpenAISimulator.configure` (``POST /_sim/config``) changes the rates
    while the simulator runs, e.g. to end a burst of errors.

Outage (not random: a period of time)
    For ``outage_s`` seconds every ``/v1`` request is answered 500 with OpenAI's ``server_error`` body after
    ``base_latency_s``, before any validation, rate limit or seeded fault (it consumes no quota and draws no
    number from the seeded sequences). It starts ``outage_start_s`` seconds after the simulator starts or is
    reset, or whenever :meth:`OpenAISimulator.start_outage` (``POST /_sim/outage?seconds=20``) says: now, for
    that long (``seconds=0`` ends the outage under way). Outage answers count in ``faults["outage"]``.

Stats
    :meth:`OpenAISimulator.stats` (and ``GET /_sim/stats``) returns a :class:`SimulatorStats`;
    :meth:`OpenAISimulator.reset` (and ``POST /_sim/reset``) empties buckets and stats, rewinds the seeds and
    ends any outage (re-arming the scheduled one).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import math
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from .._tokens import estimate_chat_tokens, estimate_text_tokens
from ._content import (
    embedding_dimensions,
    embedding_vector,
    natural_reply_tokens,
    reply_text,
    split_stream_pieces,
    vector_to_base64,
    words_embedding_vector,
)
from ._faults import ALL_FAULT_KINDS, FaultKind, FaultRoller, LatencyModel
from ._ratelimit import Account, Rejection, format_go_duration
from ._serve import CLOSE_CONNECTION_EXTENSION, config_from_flags, simulator_main

__all__ = [
    "BucketStats",
    "HintStyle",
    "ModelLimits",
    "OpenAISimulator",
    "SimulatedConnectionDrop",
    "SimulatorConfig",
    "SimulatorStats",
    "main",
]

HintStyle = Literal["both", "retry-after", "retry-after-date", "reset-only", "none"]

#: OpenAI's embeddings limits (https://platform.openai.com/docs/api-reference/embeddings/create)
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_INPUT_TOKENS = 8192
MAX_EMBEDDING_REQUEST_TOKENS = 300_000
MAX_CHOICES = 128

_EMBEDDINGS = "/v1/embeddings"
_CHAT = "/v1/chat/completions"
_RESPONSES = "/v1/responses"
_ENDPOINTS = (_EMBEDDINGS, _CHAT, _RESPONSES)
_POOLED_KEY = "*"
_ORGANIZATION = "org-simulator"
_FINGERPRINT = "fp_ragguard_sim"
_RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
_INVALID_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."


class SimulatedConnectionDrop(ConnectionResetError):
    """A simulated connection drop or stream break, raised when the server gives the app no way to close the
    connection (in-process mounting through ``httpx.ASGITransport``)."""


class ModelLimits(BaseModel):
    """Per-minute limits of one model, overriding the defaults in ``scope="model"`` (``None``: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: requests per minute
    rpm: float | None = Field(default=None, gt=0)
    #: tokens per minute
    tpm: float | None = Field(default=None, gt=0)


class SimulatorConfig(BaseModel):
    """How the simulator behaves: limits, latency, faults, hints. Validated and frozen.

    Invalid values raise :class:`pydantic.ValidationError` naming the field (e.g. fault rates adding up to
    more than 1, per-model limits with ``scope="pooled"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- rate limits ---
    #: requests per minute of each bucket (``None``: no request limit)
    rpm: float | None = Field(default=10_000, gt=0)
    #: tokens per minute of each bucket (``None``: no token limit)
    tpm: float | None = Field(default=2_000_000, gt=0)
    #: bucket capacity in seconds of refill: ``rate / 60 · burst_seconds``
    burst_seconds: float = Field(default=1.0, gt=0, le=60)
    #: ``model``: separate buckets per model (OpenAI's rule); ``pooled``: one pair of buckets for all models
    scope: Literal["model", "pooled"] = "model"
    #: per-model limits replacing ``rpm``/``tpm`` for that model (``scope="model"`` only)
    per_model: dict[str, ModelLimits] = Field(default_factory=dict)
    #: which wait hints a rate-limit 429 carries: ``both`` (``retry-after`` + ``retry-after-ms``),
    #: ``retry-after`` (whole seconds only), ``retry-after-date`` (an HTTP-date), ``reset-only`` (only the
    #: ``x-ratelimit-reset-*`` headers), ``none`` (no ``retry-after*`` and no ``x-ratelimit-reset-*`` at all)
    hint_style: HintStyle = "both"
    #: answer every request with OpenAI's 429 ``insufficient_quota`` (billing), which retrying cannot fix
    insufficient_quota: bool = False
    #: how texts become vectors: ``hash`` (each text its own pseudo-random direction) or ``words`` (texts
    #: sharing words lie near each other, as paraphrases do with real embeddings; for semantic caches)
    embedding_style: Literal["hash", "words"] = "hash"

    # --- latency: (base + per-token · tokens) · (1 ± jitter) ---
    #: seconds before any answer (for a stream: before its first chunk)
    base_latency_s: float = Field(default=0.02, ge=0, le=600)
    #: seconds per output token (chat and responses; between stream chunks)
    per_token_latency_s: float = Field(default=0.0002, ge=0, le=10)
    #: seconds per input token (embeddings)
    per_input_token_latency_s: float = Field(default=0.0, ge=0, le=10)
    #: relative jitter: each latency is multiplied by ``uniform(1 - jitter, 1 + jitter)``
    jitter: float = Field(default=0.1, ge=0, le=1)
    #: seed of the fault and jitter sequences
    seed: int = 0

    # --- faults (shares of admitted requests) ---
    #: answered 500 or 503 (half each)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    #: connection closed without a response
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    #: answer held for ``stall_s`` seconds first
    stall_rate: float = Field(default=0.0, ge=0, le=1)
    #: how long a stall lasts, seconds (ends early when the client goes away)
    stall_s: float = Field(default=10.0, ge=0, le=3600)
    #: streamed answers cut after the first chunk
    stream_break_rate: float = Field(default=0.0, ge=0, le=1)
    #: how a stream is cut: ``disconnect`` closes the connection mid-body (the client sees a connection
    #: error); ``truncate`` ends the body cleanly without ``[DONE]`` or a finish reason (silently short)
    stream_break_style: Literal["disconnect", "truncate"] = "disconnect"
    #: answered correctly, ``slow_s`` seconds late (before the first chunk of a stream)
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    #: how late a slow answer is, seconds (meant to stay under a client's attempt timeout, unlike a stall)
    slow_s: float = Field(default=1.0, ge=0, le=3600)
    #: answered 200 with a truncated, invalid JSON body (a stream: its first event's JSON cut, then the end)
    malformed_rate: float = Field(default=0.0, ge=0, le=1)
    #: answered 200 with a ``text/html`` page instead of JSON or an event stream
    wrong_content_type_rate: float = Field(default=0.0, ge=0, le=1)

    # --- outage: every /v1 request answered 500 for a period ---
    #: seconds after the simulator starts (or is reset) at which an outage of ``outage_s`` begins (``None``: none
    #: scheduled; ``POST /_sim/outage`` starts one at any moment)
    outage_start_s: float | None = Field(default=None, ge=0, le=86_400)
    #: how long an outage lasts, seconds: the scheduled one, and one started without a duration
    outage_s: float = Field(default=0.0, ge=0, le=86_400)

    @model_validator(mode="after")
    def _check(self) -> SimulatorConfig:
        total = (
            self.error_rate
            + self.drop_rate
            + self.stall_rate
            + self.stream_break_rate
            + self.slow_rate
            + self.malformed_rate
            + self.wrong_content_type_rate
        )
        if total > 1.0 + 1e-9:
            raise ValueError(
                "error_rate + drop_rate + stall_rate + stream_break_rate + slow_rate + malformed_rate + "
                f"wrong_content_type_rate must be <= 1, not {total:g}"
            )
        if self.outage_start_s is not None and self.outage_s <= 0:
            raise ValueError("outage_s must be > 0 seconds when outage_start_s schedules an outage")
        if self.per_model and self.scope == "pooled":
            raise ValueError("per_model limits need scope='model' (a pooled bucket has one limit)")
        return self

    @classmethod
    def flaky(cls, **overrides: Any) -> SimulatorConfig:
        """A provider on a bad day: 5 % 5xx, 1 % dropped connections, 1 % stalls of 10 s, 1 % broken streams.

        Keyword arguments override any field.
        """
        values: dict[str, Any] = {
            "error_rate": 0.05,
            "drop_rate": 0.01,
            "stall_rate": 0.01,
            "stall_s": 10.0,
            "stream_break_rate": 0.01,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def instant(cls, **overrides: Any) -> SimulatorConfig:
        """No simulated latency at all (fast unit tests). Keyword arguments override any field."""
        values: dict[str, Any] = {"base_latency_s": 0.0, "per_token_latency_s": 0.0, "jitter": 0.0}
        values.update(overrides)
        return cls(**values)

    def limits_for(self, model: str) -> tuple[float | None, float | None]:
        """``(rpm, tpm)`` of ``model``'s bucket."""
        if self.scope == "model":
            override = self.per_model.get(model)
            if override is not None:
                return override.rpm, override.tpm
        return self.rpm, self.tpm


class BucketStats(BaseModel):
    """Admissions of one bucket key (a model, or ``"*"`` when pooled)."""

    model_config = ConfigDict(frozen=True)

    requests_admitted: int = 0
    #: tokens charged (at admission, plus completions debited afterwards)
    tokens_admitted: int = 0
    #: most requests admitted within any 60-second window
    max_requests_per_60s: int = 0
    #: most tokens charged within any 60-second window
    max_tokens_per_60s: int = 0


class SimulatorStats(BaseModel):
    """What the simulator saw and did since it started (or was reset). Times are the simulator's clock
    readings in seconds (``time.monotonic`` unless a clock was injected)."""

    model_config = ConfigDict(frozen=True)

    #: every ``/v1`` request received (rate-limited, invalid and faulted ones included)
    requests_total: int = 0
    #: by path, e.g. ``{"/v1/embeddings": 3}``; unknown paths count under ``"other"``
    requests_by_endpoint: dict[str, int] = Field(default_factory=dict)
    #: by the request's ``model`` (``""`` when it had none)
    requests_by_model: dict[str, int] = Field(default_factory=dict)
    #: responses started, by HTTP status (dropped connections have none)
    responses_by_status: dict[int, int] = Field(default_factory=dict)
    #: 429s by type: ``requests``, ``tokens``, ``insufficient_quota``
    rate_limited: dict[str, int] = Field(default_factory=dict)
    #: faults injected by kind: ``drop``, ``error_500``, ``error_503``, ``stall``, ``stream_break``, ``slow``,
    #: ``malformed``, ``wrong_content_type``, and ``outage`` (requests answered 500 because an outage was under
    #: way)
    faults: dict[str, int] = Field(default_factory=dict)
    requests_admitted: int = 0
    tokens_admitted: int = 0
    #: per bucket key
    buckets: dict[str, BucketStats] = Field(default_factory=dict)
    first_request_at: float | None = None
    last_request_at: float | None = None
    #: when the current, last or next scheduled outage starts and ends (``None``: there is none)
    outage_started_at: float | None = None
    outage_ends_at: float | None = None
    #: ``/v1`` requests being answered at the moment of the snapshot (a gauge: a load test that has finished
    #: and still sees some here left connections open, e.g. stalled requests whose client never went away)
    in_flight: int = 0

    @property
    def faults_total(self) -> int:
        """Every fault injected, outage answers included."""
        return sum(self.faults.values())

    @property
    def rate_limited_total(self) -> int:
        return sum(self.rate_limited.values())


class _Counters:
    """The mutable stats (guarded by the simulator's lock)."""

    __slots__ = (
        "by_endpoint",
        "by_model",
        "by_status",
        "faults",
        "first",
        "last",
        "rate_limited",
        "total",
    )

    def __init__(self) -> None:
        self.total = 0
        self.by_endpoint: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.rate_limited = {"requests": 0, "tokens": 0, "insufficient_quota": 0}
        self.faults: dict[str, int] = {**dict.fromkeys(ALL_FAULT_KINDS, 0), "outage": 0}
        self.first: float | None = None
        self.last: float | None = None


class _HTTPError(Exception):
    """An OpenAI-shaped error answer, raised while validating a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Job:
    """A validated request: what it costs and what to answer."""

    __slots__ = (
        "charge",
        "completion_tokens",
        "endpoint",
        "include_usage",
        "model",
        "params",
        "prompt_tokens",
        "settle",
        "stream",
    )

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        charge: int,
        settle: int,
        stream: bool = False,
        include_usage: bool = False,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.charge = charge  # tokens charged at admission
        self.settle = settle  # tokens debited when the answer is produced (no max given)
        self.stream = stream
        self.include_usage = include_usage
        self.params = params or {}


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _int_param(body: dict[str, Any], name: str, *, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _HTTPError(
            400,
            f"Invalid type for '{name}': expected an integer, but got {type(value).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    if value < minimum:
        raise _HTTPError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise _HTTPError(
            400,
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    last = messages[-1] if messages else None
    return _text_of(last.get("content")) if isinstance(last, dict) else ""


def _require_model(model: str) -> None:
    if not model:
        raise _HTTPError(400, "you must provide a model parameter")


def _replies(prompt: str, n: int, max_tokens: int | None) -> list[tuple[str, int, bool]]:
    """``(text, tokens, truncated)`` for each of ``n`` choices."""
    replies = []
    for index in range(n):
        natural = natural_reply_tokens(prompt, index)
        tokens = natural if max_tokens is None else min(natural, max_tokens)
        replies.append((reply_text(prompt, index, tokens), tokens, tokens < natural))
    return replies


def _prepare_embeddings(body: dict[str, Any], model: str) -> _Job:
    _require_model(model)
    raw = body.get("input")
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list) and raw:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            items = [list(raw)]
        elif all(isinstance(x, str) for x in raw):
            items = list(raw)
        elif all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            items = [list(x) for x in raw]
        else:
            raise _HTTPError(400, _INVALID_INPUT)
    else:
        raise _HTTPError(400, _INVALID_INPUT)
    if len(items) > MAX_EMBEDDING_INPUTS or any(len(item) == 0 for item in items):
        raise _HTTPError(400, _INVALID_INPUT)
    counts = [estimate_text_tokens(item) if isinstance(item, str) else len(item) for item in items]
    longest = max(counts)
    if longest > MAX_EMBEDDING_INPUT_TOKENS:
        raise _HTTPError(
            400,
            f"This model's maximum context length is {MAX_EMBEDDING_INPUT_TOKENS} tokens, however you "
            f"requested {longest} tokens ({longest} in your prompt; 0 for the completion). "
            "Please reduce your prompt; or completion length.",
        )
    total = sum(counts)
    if total > MAX_EMBEDDING_REQUEST_TOKENS:
        # OpenAI's own body for this one has this type and code (not invalid_request_error).
        raise _HTTPError(
            400,
            f"Requested {total} tokens, max {MAX_EMBEDDING_REQUEST_TOKENS} tokens per request",
            type="max_tokens_per_request",
            code="max_tokens_per_request",
        )
    full = embedding_dimensions(model)
    dimensions = _int_param(body, "dimensions", minimum=1)
    if dimensions is not None:
        if model == "text-embedding-ada-002":
            raise _HTTPError(400, "This model does not support specifying dimensions.")
        if dimensions > full:
            raise _HTTPError(
                400,
                f"Invalid value for 'dimensions' = {dimensions}. Must be less than or equal to {full}.",
                param="dimensions",
            )
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise _HTTPError(
            400,
            f"Invalid value: '{encoding}'. Supported values are: 'float' and 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    return _Job(
        _EMBEDDINGS,
        model,
        prompt_tokens=total,
        completion_tokens=0,
        charge=total,
        settle=0,
        params={"items": items, "dimensions": dimensions or full, "encoding": encoding},
    )


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


def _prepare_chat(body: dict[str, Any], model: str) -> _Job:
    _require_model(model)
    messages = body.get("messages")
    if messages is None:
        raise _HTTPError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise _HTTPError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    n = _int_param(body, "n", minimum=1, maximum=MAX_CHOICES) or 1
    max_tokens = _int_param(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _int_param(body, "max_tokens", minimum=1)
    stream, include_usage = _stream_flags(body)
    prompt_tokens = estimate_chat_tokens(messages)
    replies = _replies(_last_user_text(messages), n, max_tokens)
    completion = sum(tokens for _, tokens, _ in replies)
    return _Job(
        _CHAT,
        model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        charge=prompt_tokens + (max_tokens * n if max_tokens is not None else 0),
        settle=completion if max_tokens is None else 0,
        stream=stream,
        include_usage=include_usage,
        params={"replies": replies},
    )


def _prepare_responses(body: dict[str, Any], model: str) -> _Job:
    _require_model(model)
    raw = body.get("input")
    if isinstance(raw, str) and raw:
        prompt_tokens = estimate_chat_tokens([{"role": "user", "content": raw}])
        prompt = raw
    elif isinstance(raw, list) and raw:
        prompt_tokens = estimate_chat_tokens(raw)
        prompt = _last_user_text(raw)
    else:
        raise _HTTPError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        prompt_tokens += estimate_text_tokens(instructions)
    max_output = _int_param(body, "max_output_tokens", minimum=1)
    stream, _ = _stream_flags(body)
    ((text, tokens, truncated),) = _replies(prompt, 1, max_output)
    return _Job(
        _RESPONSES,
        model,
        prompt_tokens=prompt_tokens,
        completion_tokens=tokens,
        charge=prompt_tokens + (max_output or 0),
        settle=tokens if max_output is None else 0,
        stream=stream,
        params={"text": text, "truncated": truncated, "max_output_tokens": max_output},
    )


_PREPARE: dict[str, Callable[[dict[str, Any], str], _Job]] = {
    _EMBEDDINGS: _prepare_embeddings,
    _CHAT: _prepare_chat,
    _RESPONSES: _prepare_responses,
}


#: what a misconfigured proxy or captive portal answers with a 200 (``wrong_content_type``)
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service Temporarily Unavailable</title></head>\n"
    b"<body><h1>Service Temporarily Unavailable</h1><p>Please try again later.</p></body></html>\n"
)


def _sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(payload) + b"\n\n"


class OpenAISimulator:
    """An ASGI app that behaves like the OpenAI API (see the module docs for the rules it follows).

    Args:
        config: the behaviour; defaults to :class:`SimulatorConfig` ``()``.
        clock: monotonic time in seconds for buckets, windows and stats (inject a fake one in tests; latency
            and stalls still sleep for real).
        **fields: :class:`SimulatorConfig` fields overriding ``config`` (``OpenAISimulator(rpm=60)``).

    Thread safety: all shared state is guarded by one ``threading.Lock`` that is never held across an
    ``await``, so :meth:`stats` and :meth:`reset` may be called from any thread while uvicorn serves the app
    in another.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        /,
        *,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        if config is None:
            config = SimulatorConfig(**fields)
        elif fields:
            config = SimulatorConfig.model_validate({**config.model_dump(), **fields})
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = {}
        self._counters = _Counters()
        #: ``/v1`` requests being answered (a gauge: not zeroed by reset, those requests are still running)
        self._in_flight = 0
        self._faults = self._fault_roller(config)
        self._latency = LatencyModel(
            seed=config.seed,
            base=config.base_latency_s,
            per_token=config.per_token_latency_s,
            per_input_token=config.per_input_token_latency_s,
            jitter=config.jitter,
        )
        self._outage = self._scheduled_outage(clock())

    @staticmethod
    def _fault_roller(config: SimulatorConfig) -> FaultRoller:
        return FaultRoller(
            seed=config.seed,
            drop_rate=config.drop_rate,
            error_rate=config.error_rate,
            stall_rate=config.stall_rate,
            stream_break_rate=config.stream_break_rate,
            slow_rate=config.slow_rate,
            malformed_rate=config.malformed_rate,
            wrong_content_type_rate=config.wrong_content_type_rate,
        )

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, **fields: Any) -> SimulatorConfig:
        """Change settings while the simulator runs (e.g. a burst of errors that ends, a quota that shrinks).

        Fault rates and latency apply to requests admitted from now on; the seeded sequences carry on where they
        were (``seed`` itself is not changed here: :meth:`reset` rewinds to it). Changing a rate limit
        (``rpm``, ``tpm``, ``burst_seconds``, ``scope``, ``per_model``) starts every bucket afresh, full.
        Outage settings apply to the next :meth:`reset` or :meth:`start_outage`. Safe to call from any thread
        (``POST /_sim/config`` with a JSON object of fields does the same over HTTP).

        Returns:
            the new config.

        Raises:
            pydantic.ValidationError: an invalid value or an unknown field, naming it; nothing is changed.
            ValueError: ``seed`` was given.
        """
        if "seed" in fields:
            raise ValueError("the seed cannot change while the simulator runs: make a new one, or reset() it")
        config = SimulatorConfig.model_validate({**self._config.model_dump(), **fields})
        limits = ("rpm", "tpm", "burst_seconds", "scope", "per_model")
        roller = self._fault_roller(config)
        with self._lock:
            old = self._config
            roller.continue_from(self._faults)
            self._faults = roller
            latency = self._latency
            latency.base = config.base_latency_s
            latency.per_token = config.per_token_latency_s
            latency.per_input_token = config.per_input_token_latency_s
            latency.jitter = config.jitter
            if any(getattr(old, name) != getattr(config, name) for name in limits):
                self._accounts.clear()
            self._config = config
        return config

    def __repr__(self) -> str:
        return f"OpenAISimulator({self._config!r})"

    # ------------------------------------------------------------------ stats

    def stats(self) -> SimulatorStats:
        """A snapshot of the stats (safe to call from any thread)."""
        with self._lock:
            c = self._counters
            buckets = {
                key: BucketStats(
                    requests_admitted=account.requests_admitted,
                    tokens_admitted=account.tokens_admitted,
                    max_requests_per_60s=round(account.requests_window.peak),
                    max_tokens_per_60s=round(account.tokens_window.peak),
                )
                for key, account in self._accounts.items()
                if account.requests_admitted or account.tokens_admitted
            }
            return SimulatorStats(
                requests_total=c.total,
                requests_by_endpoint=dict(c.by_endpoint),
                requests_by_model=dict(c.by_model),
                responses_by_status=dict(sorted(c.by_status.items())),
                rate_limited=dict(c.rate_limited),
                faults=dict(c.faults),
                requests_admitted=sum(b.requests_admitted for b in buckets.values()),
                tokens_admitted=sum(b.tokens_admitted for b in buckets.values()),
                buckets=buckets,
                first_request_at=c.first,
                last_request_at=c.last,
                outage_started_at=self._outage[0] if self._outage is not None else None,
                outage_ends_at=self._outage[1] if self._outage is not None else None,
                in_flight=self._in_flight,
            )

    def reset(self) -> None:
        """Refill every bucket, zero the stats, rewind the fault and jitter sequences to the seed, and end any
        outage (the one ``outage_start_s`` schedules starts again that long from now)."""
        with self._lock:
            self._accounts.clear()
            self._counters = _Counters()
            self._faults.reset()
            self._latency.reset()
            self._outage = self._scheduled_outage(self._clock())

    # ------------------------------------------------------------------ outage

    def _scheduled_outage(self, now: float) -> tuple[float, float] | None:
        start = self._config.outage_start_s
        if start is None:
            return None
        return now + start, now + start + self._config.outage_s

    def start_outage(self, seconds: float | None = None) -> tuple[float, float]:
        """Answer every ``/v1`` request with 500 from now for ``seconds`` (default: ``config.outage_s``).

        Replaces any outage scheduled or under way; ``seconds=0`` ends the one under way. Safe to call from any
        thread (``POST /_sim/outage?seconds=S`` does the same over HTTP).

        Returns:
            ``(start, end)`` of the outage on the simulator's clock, seconds.

        Raises:
            ValueError: ``seconds`` is negative, not finite, or missing with ``config.outage_s`` 0.
        """
        if seconds is None:
            seconds = self._config.outage_s
            if seconds <= 0:
                raise ValueError("give the outage's length in seconds (config.outage_s is 0)")
        if not (isinstance(seconds, (int, float)) and 0.0 <= seconds <= 86_400.0):
            raise ValueError(f"an outage lasts 0 to 86400 seconds, not {seconds!r}")
        with self._lock:
            now = self._clock()
            self._outage = (now, now + float(seconds))
            return self._outage

    def _in_outage(self, now: float) -> bool:
        """Whether an outage is under way at ``now`` (hold the lock)."""
        outage = self._outage
        return outage is not None and outage[0] <= now < outage[1]

    # ------------------------------------------------------------------ process mode (ProcessServable)

    def subprocess_argv(self, host: str, port: int) -> list[str]:
        """The command that serves this simulator's config in a child process (see :func:`serve`)."""
        if self._clock is not time.monotonic:
            raise ValueError("a simulator with an injected clock cannot run in a child process")
        return [
            sys.executable,
            "-m",
            "ragguard.testing.openai_simulator",
            "--host",
            host,
            "--port",
            str(port),
            "--config-json",
            self._config.model_dump_json(),
            "--managed",
        ]

    @staticmethod
    def parse_stats(payload: bytes) -> SimulatorStats:
        """Decode the body of ``GET /_sim/stats``."""
        return SimulatorStats.model_validate_json(payload)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith("/_sim/"):
                await self._admin(scope, path, receive, send)
            else:
                with self._lock:
                    self._in_flight += 1
                try:
                    await self._api(scope, path, receive, send)
                finally:
                    with self._lock:
                        self._in_flight -= 1
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _admin(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        query: bytes = scope.get("query_string", b"")
        if method == "POST" and path == "/_sim/config":
            await self._admin_configure(scope, receive, send)
        elif method == "POST" and path == "/_sim/outage":
            values = urllib.parse.parse_qs(query.decode("latin-1")).get("seconds")
            try:
                seconds = float(values[-1]) if values else None
                start, end = self.start_outage(seconds)
            except ValueError as exc:
                await self._send(send, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}, [])
                return
            await self._send(send, 200, {"outage": {"started_at": start, "ends_at": end, "seconds": end - start}}, [])
        elif method == "GET" and path == "/_sim/stats":
            await self._send(send, 200, self.stats().model_dump(mode="json"), [])
        elif method == "POST" and path == "/_sim/reset":
            self.reset()
            await self._send(send, 200, {"reset": True}, [])
        elif method == "GET" and path == "/_sim/config":
            await self._send(send, 200, self._config.model_dump(mode="json"), [])
        else:
            await self._send(send, 404, {"error": {"message": f"Invalid URL ({method} {path})"}}, [])

    async def _admin_configure(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /_sim/config`` with a JSON object of fields: :meth:`configure`; answers the new config."""
        try:
            raw = await Request(scope, receive).body()
        except ClientDisconnect:
            return
        try:
            fields = json.loads(raw) if raw else {}
            if not isinstance(fields, dict):
                raise ValueError("the body must be a JSON object of SimulatorConfig fields")
            config = self.configure(**fields)
        except ValueError as exc:  # pydantic's ValidationError and json's JSONDecodeError are ValueErrors
            await self._send(send, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}, [])
            return
        await self._send(send, 200, config.model_dump(mode="json"), [])

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

    def _key(self, model: str) -> str:
        return model if self._config.scope == "model" else _POOLED_KEY

    def _account(self, key: str, model: str, now: float) -> Account:
        account = self._accounts.get(key)
        if account is None:
            rpm, tpm = self._config.limits_for(model)
            account = Account(rpm, tpm, self._config.burst_seconds, now)
            self._accounts[key] = account
        return account

    def _rate_headers(self, account: Account, now: float) -> list[tuple[bytes, bytes]]:
        account.refill(now)
        with_reset = self._config.hint_style != "none"
        headers: list[tuple[bytes, bytes]] = []
        for name, bucket in (("requests", account.requests), ("tokens", account.tokens)):
            if bucket is None:
                continue
            headers.append((f"x-ratelimit-limit-{name}".encode(), _number(bucket.per_minute).encode()))
            headers.append((f"x-ratelimit-remaining-{name}".encode(), str(bucket.remaining).encode()))
            if with_reset:
                headers.append((f"x-ratelimit-reset-{name}".encode(), format_go_duration(bucket.reset_after).encode()))
        return headers

    def _retry_headers(self, wait: float) -> list[tuple[bytes, bytes]]:
        style = self._config.hint_style
        if style in ("reset-only", "none") or not math.isfinite(wait):
            return []
        seconds = str(max(1, math.ceil(wait - 1e-9))).encode()
        if style == "retry-after":
            return [(b"retry-after", seconds)]
        if style == "retry-after-date":
            when = email.utils.formatdate(math.ceil(time.time() + wait), usegmt=True)
            return [(b"retry-after", when.encode())]
        return [
            (b"retry-after", seconds),
            (b"retry-after-ms", str(max(1, math.ceil(wait * 1000 - 1e-6))).encode()),
        ]

    def _status(self, status: int) -> None:
        by_status = self._counters.by_status
        by_status[status] = by_status.get(status, 0) + 1

    def _answer_headers(self, account: Account, request_id: bytes) -> list[tuple[bytes, bytes]]:
        """Rate-limit headers as of now, plus the request id (takes the lock)."""
        with self._lock:
            headers = self._rate_headers(account, self._clock())
        headers.append((b"x-request-id", request_id))
        headers.append((b"openai-organization", _ORGANIZATION.encode()))
        headers.append((b"openai-version", b"2020-10-01"))
        return headers

    async def _api(self, scope: Scope, path: str, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        request_id = f"req_{uuid.uuid4().hex}".encode()
        prepare = _PREPARE.get(path.rstrip("/"))
        endpoint = path.rstrip("/") if prepare is not None else "other"
        if prepare is None or method != "POST":
            with self._lock:
                now = self._clock()
                self._count(endpoint, None, now)
                account = self._account(self._key(""), "", now)  # no model: the default limits' view
                outage = self._outage_answer(now)
                if not outage:
                    self._status(404)
            if outage:
                await self._send_outage(send, account, request_id)
                return
            error = _HTTPError(404, f"Invalid URL ({method} {path})")
            await self._send(send, 404, error.body, self._answer_headers(account, request_id))
            return
        try:
            raw = await Request(scope, receive).body()
        except ClientDisconnect:
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            body = None
        model_value = body.get("model") if body is not None else None
        model = model_value if isinstance(model_value, str) else ""
        key = self._key(model)

        with self._lock:
            now = self._clock()
            self._count(endpoint, model, now)
            account = self._account(key, model, now)
            outage = self._outage_answer(now)
            if outage:
                quota = False
            elif self._config.insufficient_quota:
                self._counters.rate_limited["insufficient_quota"] += 1
                self._status(429)
                quota = True
            else:
                quota = False
        if outage:
            await self._send_outage(send, account, request_id)
            return
        if quota:
            error = _HTTPError(
                429,
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
            await self._send(send, 429, error.body, self._answer_headers(account, request_id))
            return

        try:
            if body is None:
                raise _HTTPError(
                    400,
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
                    "sent was not valid JSON.)",
                )
            job = prepare(body, model)
        except _HTTPError as exc:
            with self._lock:
                self._status(exc.status)
            await self._send(send, exc.status, exc.body, self._answer_headers(account, request_id))
            return

        with self._lock:
            now = self._clock()
            rejection = account.admit(job.charge, now)
            if rejection is not None:
                self._counters.rate_limited[rejection.kind] += 1
                self._status(429)
                fault: FaultKind | None = None
                factor = 1.0
            else:
                fault = self._faults.roll(streaming=job.stream)
                factor = self._latency.factor()
                if fault is not None:
                    self._counters.faults[fault] += 1
        if rejection is not None:
            await self._send_rate_limited(send, job, account, rejection, request_id)
            return
        await self._serve_admitted(scope, receive, send, job, account, fault, factor, request_id)

    def _outage_answer(self, now: float) -> bool:
        """Whether this request gets the outage's 500 (counted here; hold the lock)."""
        if not self._in_outage(now):
            return False
        self._counters.faults["outage"] += 1
        self._status(500)
        return True

    async def _send_outage(self, send: Send, account: Account, request_id: bytes) -> None:
        # the base latency without a jitter draw: the seeded sequences of the other requests stay as they were
        if self._latency.base > 0:
            await anyio.sleep(self._latency.base)
        error = _HTTPError(
            500, "The server had an error while processing your request. Sorry about that!", type="server_error"
        )
        await self._send(send, 500, error.body, self._answer_headers(account, request_id))

    def _count(self, endpoint: str, model: str | None, now: float) -> None:
        c = self._counters
        c.total += 1
        c.by_endpoint[endpoint] = c.by_endpoint.get(endpoint, 0) + 1
        if model is not None:
            c.by_model[model] = c.by_model.get(model, 0) + 1
        if c.first is None:
            c.first = now
        c.last = now

    async def _send_rate_limited(
        self, send: Send, job: _Job, account: Account, rejection: Rejection, request_id: bytes
    ) -> None:
        unit = "requests per min (RPM)" if rejection.kind == "requests" else "tokens per min (TPM)"
        where = f"for {job.model} in organization {_ORGANIZATION} on {unit}: Limit {_number(rejection.limit)}"
        requested = _number(rejection.requested)
        if rejection.too_large:
            message = (
                f"Request too large {where}, Requested {requested}. The input or output tokens must be "
                f"reduced in order to run successfully. Visit {_RATE_LIMITS_URL} to learn more."
            )
        else:
            message = (
                f"Rate limit reached {where}, Used {_number(round(rejection.used))}, Requested {requested}. "
                f"Please try again in {format_go_duration(rejection.wait)}. "
                f"Visit {_RATE_LIMITS_URL} to learn more."
            )
        error = _HTTPError(429, message, type=rejection.kind, code="rate_limit_exceeded")
        headers = self._answer_headers(account, request_id) + self._retry_headers(rejection.wait)
        await self._send(send, 429, error.body, headers)

    async def _serve_admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        job: _Job,
        account: Account,
        fault: FaultKind | None,
        factor: float,
        request_id: bytes,
    ) -> None:
        latency = self._latency
        if fault == "drop":
            await anyio.sleep(latency.base * factor)
            await self._close_connection(scope, receive)
            return
        if fault in ("error_500", "error_503"):
            await anyio.sleep(latency.base * factor)
            if fault == "error_500":
                status = 500
                error = _HTTPError(
                    500,
                    "The server had an error while processing your request. Sorry about that!",
                    type="server_error",
                )
            else:
                status = 503
                error = _HTTPError(
                    503,
                    "The server is overloaded or not ready yet.",
                    type="server_error",
                    code="service_unavailable",
                )
            with self._lock:
                self._status(status)
            await self._send(send, status, error.body, self._answer_headers(account, request_id))
            return
        if fault == "stall" and await self._stall(self._config.stall_s, receive):
            return  # the client gave up
        if fault == "slow" and await self._stall(self._config.slow_s, receive):
            return
        if job.settle:
            with self._lock:
                account.debit(job.settle, self._clock())
        if job.stream:
            if fault == "malformed" or fault == "wrong_content_type":
                await anyio.sleep(latency.base * factor)
                await self._send_bad_body(send, job, account, request_id, fault)
                return
            await self._stream(scope, receive, send, job, account, factor, request_id, fault == "stream_break")
            return
        if job.endpoint == _EMBEDDINGS:
            delay = latency.base + latency.per_input_token * job.prompt_tokens
        else:
            delay = latency.base + latency.per_token * job.completion_tokens
        if delay > 0:
            await anyio.sleep(delay * factor)
        if fault == "malformed" or fault == "wrong_content_type":
            await self._send_bad_body(send, job, account, request_id, fault)
            return
        payload = self._render(job)
        with self._lock:
            self._status(200)
        headers = self._answer_headers(account, request_id)
        headers.append((b"openai-processing-ms", str(round(delay * factor * 1000)).encode()))
        await self._send(send, 200, payload, headers)

    async def _send_bad_body(
        self, send: Send, job: _Job, account: Account, request_id: bytes, fault: FaultKind
    ) -> None:
        """A 200 the client cannot use: JSON cut in half (``malformed``), or an HTML page (``wrong_content_type``)."""
        if fault == "malformed":
            if job.stream:
                first = self._stream_events(job, 0.0)[0][1]
                # the first event's JSON cut in half, then the end of the body
                body = first[: len(first) // 2] + b"\n\n"
                content_type = b"text/event-stream; charset=utf-8"
            else:
                whole = _dumps(self._render(job))
                body = whole[: len(whole) // 2]
                content_type = b"application/json"
        else:
            body = _HTML_PAGE
            content_type = b"text/html; charset=utf-8"
        with self._lock:
            self._status(200)
        headers = self._answer_headers(account, request_id)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _stall(self, seconds: float, receive: Receive) -> bool:
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

    @staticmethod
    async def _close_connection(scope: Scope, receive: Receive) -> None:
        close = (scope.get("extensions") or {}).get(CLOSE_CONNECTION_EXTENSION)
        if close is None:
            raise SimulatedConnectionDrop("simulated connection drop (no connection to close in-process)")
        close()
        # Returning before the server notices would make it answer 500 or log an error.
        with anyio.move_on_after(5.0):
            while (await receive())["type"] != "http.disconnect":
                pass

    # ------------------------------------------------------------------ bodies

    def _render(self, job: _Job) -> dict[str, Any]:
        if job.endpoint == _EMBEDDINGS:
            return self._render_embeddings(job)
        if job.endpoint == _CHAT:
            return self._render_chat(job)
        return self._render_response(job, status="completed")

    def _render_embeddings(self, job: _Job) -> dict[str, Any]:
        dims: int = job.params["dimensions"]
        as_base64 = job.params["encoding"] == "base64"
        words = self.config.embedding_style == "words"
        data = []
        for index, item in enumerate(job.params["items"]):
            if words and isinstance(item, str):
                vector = words_embedding_vector(job.model, item, dims)
            else:
                vector = embedding_vector(job.model, item, dims)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": vector_to_base64(vector) if as_base64 else vector,
                }
            )
        return {
            "object": "list",
            "data": data,
            "model": job.model,
            "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
        }

    @staticmethod
    def _chat_usage(job: _Job) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _render_chat(self, job: _Job) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if truncated else "stop",
            }
            for index, (text, _, truncated) in enumerate(job.params["replies"])
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            "usage": self._chat_usage(job),
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }

    @staticmethod
    def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if text or status != "in_progress"
            else []
        )
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _render_response(
        self, job: _Job, *, status: str, response_id: str | None = None, item_id: str | None = None
    ) -> dict[str, Any]:
        response_id = response_id or f"resp_{uuid.uuid4().hex}"
        item_id = item_id or f"msg_{uuid.uuid4().hex}"
        truncated: bool = job.params["truncated"]
        done = status != "in_progress"
        final_status = "incomplete" if truncated and done else status
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": final_status,
            "model": job.model,
            "output": [self._message_item(item_id, job.params["text"], "completed")] if done else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated and done else None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "max_output_tokens": job.params["max_output_tokens"],
            "previous_response_id": None,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": {
                "input_tokens": job.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": job.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": job.prompt_tokens + job.completion_tokens,
            }
            if done
            else None,
        }

    def _stream_events(self, job: _Job, factor: float) -> list[tuple[float, bytes]]:
        """The stream as ``(delay before it, SSE bytes)`` pieces."""
        latency = self._latency
        first = latency.base * factor
        per_token = latency.per_token * factor
        if job.endpoint == _CHAT:
            return self._chat_stream(job, first, per_token)
        return self._response_stream(job, first, per_token)

    def _chat_stream(self, job: _Job, first: float, per_token: float) -> list[tuple[float, bytes]]:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": job.model,
                "service_tier": "default",
                "system_fingerprint": _FINGERPRINT,
                "choices": choices,
            }
            if job.include_usage:
                payload["usage"] = None
            payload.update(extra)
            return _sse(payload)

        replies: list[tuple[str, int, bool]] = job.params["replies"]
        events: list[tuple[float, bytes]] = []
        for index in range(len(replies)):
            delta = {"role": "assistant", "content": "", "refusal": None}
            events.append(
                (
                    first if index == 0 else 0.0,
                    chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]),
                )
            )
        pieces = [split_stream_pieces(text) for text, _, _ in replies]
        for position in range(max((len(p) for p in pieces), default=0)):
            for index, choice_pieces in enumerate(pieces):
                if position < len(choice_pieces):
                    piece = choice_pieces[position]
                    delay = per_token * math.ceil(len(piece) / 4)
                    events.append(
                        (
                            delay,
                            chunk(
                                [
                                    {
                                        "index": index,
                                        "delta": {"content": piece},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ]
                            ),
                        )
                    )
        for index, (_, _, truncated) in enumerate(replies):
            finish = "length" if truncated else "stop"
            events.append((0.0, chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}])))
        if job.include_usage:
            events.append((0.0, chunk([], usage=self._chat_usage(job))))
        events.append((0.0, b"data: [DONE]\n\n"))
        return events

    def _response_stream(self, job: _Job, first: float, per_token: float) -> list[tuple[float, bytes]]:
        response_id = f"resp_{uuid.uuid4().hex}"
        item_id = f"msg_{uuid.uuid4().hex}"
        text: str = job.params["text"]
        events: list[tuple[float, bytes]] = []
        sequence = 0

        def add(delay: float, kind: str, **fields: Any) -> None:
            nonlocal sequence
            events.append((delay, _sse({"type": kind, "sequence_number": sequence, **fields}, event=kind)))
            sequence += 1

        pending = self._render_response(job, status="in_progress", response_id=response_id, item_id=item_id)
        add(first, "response.created", response=pending)
        add(0.0, "response.in_progress", response=pending)
        add(
            0.0,
            "response.output_item.added",
            output_index=0,
            item=self._message_item(item_id, "", "in_progress"),
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        add(0.0, "response.content_part.added", part=part, **where)
        for piece in split_stream_pieces(text):
            add(
                per_token * math.ceil(len(piece) / 4),
                "response.output_text.delta",
                delta=piece,
                logprobs=[],
                **where,
            )
        add(0.0, "response.output_text.done", text=text, logprobs=[], **where)
        add(0.0, "response.content_part.done", part={**part, "text": text}, **where)
        add(
            0.0,
            "response.output_item.done",
            output_index=0,
            item=self._message_item(item_id, text, "completed"),
        )
        final = self._render_response(job, status="completed", response_id=response_id, item_id=item_id)
        add(
            0.0,
            "response.incomplete" if final["status"] == "incomplete" else "response.completed",
            response=final,
        )
        return events

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        job: _Job,
        account: Account,
        factor: float,
        request_id: bytes,
        cut: bool,
    ) -> None:
        events = self._stream_events(job, factor)
        with self._lock:
            self._status(200)
        headers = self._answer_headers(account, request_id)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    *headers,
                ],
            }
        )
        for delay, data in events:
            if delay > 0:
                await anyio.sleep(delay)
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if cut:
                if self._config.stream_break_style == "disconnect":
                    await self._close_connection(scope, receive)
                    return
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ragguard.testing.openai_simulator",
        description="Serve an OpenAI-compatible API simulator on loopback (point base_url at http://HOST:PORT/v1).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind, 0 for a free one (default 8080)")
    parser.add_argument("--config-json", help="a full SimulatorConfig as JSON (flags below override it)")
    parser.add_argument("--flaky", action="store_true", help="start from SimulatorConfig.flaky()")
    parser.add_argument("--rpm", type=float, help="requests per minute per bucket")
    parser.add_argument("--tpm", type=float, help="tokens per minute per bucket")
    parser.add_argument("--burst-seconds", type=float, help="bucket capacity in seconds of refill")
    parser.add_argument("--scope", choices=["model", "pooled"], help="buckets per model or pooled")
    parser.add_argument(
        "--hint-style",
        choices=["both", "retry-after", "retry-after-date", "reset-only", "none"],
        help="429 hints",
    )
    parser.add_argument("--insufficient-quota", action="store_true", default=None, help="answer 429 insufficient_quota")
    parser.add_argument("--base-latency", dest="base_latency_s", type=float, help="seconds before each answer")
    parser.add_argument("--per-token-latency", dest="per_token_latency_s", type=float, help="seconds per output token")
    parser.add_argument("--jitter", type=float, help="relative latency jitter (0-1)")
    parser.add_argument("--seed", type=int, help="seed of the fault and jitter sequences")
    parser.add_argument("--error-rate", type=float, help="share of 500/503 answers")
    parser.add_argument("--drop-rate", type=float, help="share of dropped connections")
    parser.add_argument("--stall-rate", type=float, help="share of stalled answers")
    parser.add_argument("--stall-s", type=float, help="stall length, seconds")
    parser.add_argument("--stream-break-rate", type=float, help="share of streams cut after the first chunk")
    parser.add_argument(
        "--stream-break-style", choices=["disconnect", "truncate"], help="how a stream is cut (default disconnect)"
    )
    parser.add_argument("--slow-rate", type=float, help="share of answers sent late (within a client's timeout)")
    parser.add_argument("--slow-s", type=float, help="how late a slow answer is, seconds")
    parser.add_argument("--malformed-rate", type=float, help="share of 200s with truncated, invalid JSON")
    parser.add_argument("--wrong-content-type-rate", type=float, help="share of 200s with an HTML page")
    parser.add_argument(
        "--outage-start", dest="outage_start_s", type=float, help="seconds after start at which an outage begins"
    )
    parser.add_argument(
        "--outage", dest="outage_s", type=float, help="outage length, seconds (every /v1 request answered 500)"
    )
    parser.add_argument("--managed", action="store_true", help=argparse.SUPPRESS)
    return parser


_FLAG_FIELDS = (
    "rpm",
    "tpm",
    "burst_seconds",
    "scope",
    "hint_style",
    "insufficient_quota",
    "base_latency_s",
    "per_token_latency_s",
    "jitter",
    "seed",
    "error_rate",
    "drop_rate",
    "stall_rate",
    "stall_s",
    "stream_break_rate",
    "stream_break_style",
    "slow_rate",
    "slow_s",
    "malformed_rate",
    "wrong_content_type_rate",
    "outage_start_s",
    "outage_s",
)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Build the config the command-line flags describe."""
    return config_from_flags(SimulatorConfig, args, _FLAG_FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ragguard.testing.openai_simulator``: serve in the foreground until interrupted."""
    return simulator_main(_parser(), lambda args: OpenAISimulator(config_from_args(args)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
