"""Bad input: invalid settings, malformed environment, hostile headers and broken provider responses.

* Every numeric field of every section of :class:`ragguard.Policy` (found by walking the model), given a wrong
  type, NaN, a negative number or an out-of-range infinity, raises :class:`pydantic.ValidationError` whose
  location is exactly that field; the same through ``RAGGUARD_*`` environment variables.
* Every public constructor with numeric settings (listed below; a completeness test checks the list against
  ``ragguard.__all__``) rejects the same values. Most raise ``ValidationError`` naming the field (an argument
  that is no field of the constructor's own model is checked by another model's rule, :data:`OTHER_RULES`); the
  exceptions to that rule are recorded in :data:`NOT_PYDANTIC` (a ``ValueError`` naming the field, or a
  ``TypeError`` for a wrong type); a bad value that is silently accepted is an ``xfail`` with the reason.
* The header parsers of ``ragguard._hints`` never raise, and never return a negative, NaN, infinite or
  over-long (``> MAX_HINT_SECONDS``) wait, whatever text or headers mapping they are given.
* The real ``openai`` SDK, guarded by :func:`ragguard.guard`, against a tiny Starlette app answering with
  malformed JSON, a wrong content type, a truncated or undecodable body, or a body that never ends: the call
  ends with a typed error (an ``openai`` or a ragguard error) within its total deadline, never a hang.
"""

from __future__ import annotations

import contextlib
import email.utils
import inspect
import json
import math
import os
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import annotated_types
import anyio
import httpx
import openai
import pydantic
import pydantic_settings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import ragguard
from ragguard._hints import MAX_HINT_SECONDS, rate_limit_wait_from_headers
from ragguard.testing import serve
from ragguard.testing._serve import CLOSE_CONNECTION_EXTENSION

# --- the numeric fields of the settings models ------------------------------------------------------------------


def _numeric_type(annotation: Any) -> type | None:
    """``int`` or ``float`` when the field holds one (possibly optional), else ``None``."""
    args = typing.get_args(annotation) or (annotation,)
    for kind in (float, int):
        if kind in args:
            return kind
    return None


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
            return arg
    return None


def bad_values(info: pydantic.fields.FieldInfo, kind: type) -> list[Any]:
    """Values the field must reject: wrong types, NaN, a non-integer (ints), a negative number when the field's
    lower bound is not negative, and infinity when the field is bounded above or refuses it."""
    values: list[Any] = ["abc", [1], math.nan]
    if kind is int:
        values.append(1.5)
    lower: Any = None
    upper: Any = None
    finite_only = False
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge | annotated_types.Gt):
            lower = meta.ge if isinstance(meta, annotated_types.Ge) else meta.gt
        if isinstance(meta, annotated_types.Le | annotated_types.Lt):
            upper = meta.le if isinstance(meta, annotated_types.Le) else meta.lt
        if getattr(meta, "allow_inf_nan", True) is False:
            finite_only = True
    if lower is not None and lower >= 0:
        values.append(-1)
    if kind is float and (upper is not None or finite_only):
        values.append(math.inf)
    return values


def numeric_fields(model: type[pydantic.BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """``(path, kind, field info)`` for every numeric field of ``model`` and of its sub-models."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        kind = _numeric_type(info.annotation)
        if kind is not None:
            yield path, kind, info
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from numeric_fields(sub, path)


def nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


POLICY_CASES = [
    pytest.param(path, bad, id=f"{'.'.join(path)}={bad!r}")
    for path, kind, info in numeric_fields(ragguard.Policy)
    for bad in bad_values(info, kind)
]

#: every settings model in ``ragguard.__all__`` (Policy's sections, RedisBackendOptions…)
SECTIONS = [
    obj
    for name in ragguard.__all__
    if isinstance(obj := getattr(ragguard, name), type)
    and issubclass(obj, pydantic.BaseModel)
    and obj is not ragguard.Policy
    # reports ragguard builds, not settings
    and obj.__module__ != ragguard.HealthReport.__module__
]

SECTION_CASES = [
    pytest.param(section, path[0], bad, id=f"{section.__name__}.{path[0]}={bad!r}")
    for section in SECTIONS
    for path, kind, info in numeric_fields(section)
    if len(path) == 1
    for bad in bad_values(info, kind)
]


def assert_names(error: pydantic.ValidationError, path: tuple[str, ...]) -> None:
    locations = [tuple(e["loc"]) for e in error.errors()]
    assert locations, error
    assert all(loc[: len(path)] == path for loc in locations), f"{locations} do not name {path}"


def test_every_policy_section_is_walked() -> None:
    paths = {path for path, _, _ in numeric_fields(ragguard.Policy)}
    # every section has numbers, and they are all checked below, nested models' included
    assert {path[0] for path in paths} == set(ragguard.Policy.model_fields)
    assert {("concurrency", "adaptive", "min_limit"), ("cache", "semantic", "max_distance")} <= paths


@pytest.mark.parametrize(("path", "bad"), POLICY_CASES)
def test_policy_rejects_bad_numbers_naming_the_field(path: tuple[str, ...], bad: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ragguard.Policy(**nested(path, bad))
    assert_names(info.value, path)


@pytest.mark.parametrize(("section", "field", "bad"), SECTION_CASES)
def test_sections_reject_bad_numbers_naming_the_field(section: type[pydantic.BaseModel], field: str, bad: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        section(**{field: bad})
    assert_names(info.value, (field,))


# --- the environment ---------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("RAGGUARD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def env_name(path: tuple[str, ...]) -> str:
    return "RAGGUARD_" + "__".join(part.upper() for part in path)


ENV_CASES = [
    pytest.param(path, text, id=f"{env_name(path)}={text}")
    for path, kind, info in numeric_fields(ragguard.Policy)
    for text in ["abc", "", "nan" if kind is float else "1.5", *(["-1"] if -1 in bad_values(info, kind) else [])]
]


@pytest.mark.parametrize(("path", "text"), ENV_CASES)
def test_malformed_environment_variables_name_the_field(
    clean_env: pytest.MonkeyPatch, path: tuple[str, ...], text: str
) -> None:
    clean_env.setenv(env_name(path), text)
    with pytest.raises(pydantic.ValidationError) as info:
        ragguard.Policy()
    assert_names(info.value, path)


@pytest.mark.parametrize(
    ("name", "value", "path"),
    [
        ("RAGGUARD_RATE_LIMIT__RPM", "abc", ("rate_limit", "rpm")),
        ("RAGGUARD_RETRY__ATTEMPTS", "-1", ("retry", "attempts")),
        ("RAGGUARD_RETRY__ATTEMPTS", "four", ("retry", "attempts")),
        ("RAGGUARD_BREAKER__ENABLED", "maybe", ("breaker", "enabled")),
        ("RAGGUARD_RATE_LIMIT__SCOPE", "planet", ("rate_limit", "scope")),
        ("RAGGUARD_RETRY__JITTER", "lots", ("retry", "jitter")),
        ("RAGGUARD_RETRY__NOPE", "1", ("retry", "nope")),  # a typo is an error, not silently ignored
        ("RAGGUARD_RETRY", '{"attempts": "x"}', ("retry", "attempts")),
        ("RAGGUARD_RETRY", "5", ("retry",)),
        ("RAGGUARD_TIMEOUT__TOTAL", "null", ("timeout", "total")),  # no way to write None: must be a number
    ],
)
def test_policy_from_bad_environment(
    clean_env: pytest.MonkeyPatch, name: str, value: str, path: tuple[str, ...]
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(pydantic.ValidationError) as info:
        ragguard.Policy()
    assert_names(info.value, path)


def test_a_section_given_as_broken_json_raises_a_settings_error_naming_it(clean_env: pytest.MonkeyPatch) -> None:
    """pydantic-settings decodes a whole section's JSON itself: a syntax error is its SettingsError (a
    ValueError), not a ValidationError; it still names the section."""
    clean_env.setenv("RAGGUARD_RETRY", '{"attempts": 3')
    with pytest.raises(pydantic_settings.SettingsError, match='"retry"'):
        ragguard.Policy()


def test_unrelated_environment_is_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RAGGUARD_NOT_A_SECTION", "1")
    clean_env.setenv("RAGGUARD_RATE_LIMIT__RPM", " 60 ")
    assert ragguard.Policy().rate_limit.rpm == 60.0


# --- the public constructors -------------------------------------------------------------------------------------


async def _dispatch(key: Hashable, items: list[Any]) -> list[Any]:
    return items


def _redis(**kwargs: Any) -> ragguard.RedisBackend:
    # never connected: validation happens at construction (port 9 is discard, on loopback)
    return ragguard.RedisBackend("redis://127.0.0.1:9/0", **kwargs)


#: constructor -> (how to call it with keyword arguments, the settings model its numeric arguments are checked
#: by, {argument: field of that model} where they differ)
CONSTRUCTORS: dict[str, tuple[Callable[..., Any], type[pydantic.BaseModel] | None, dict[str, str]]] = {
    "Retry": (ragguard.Retry, ragguard.RetryPolicy, {}),
    "CircuitBreaker": (lambda **kw: ragguard.CircuitBreaker("x", **kw), ragguard.BreakerPolicy, {}),
    "RateLimiter": (ragguard.RateLimiter, ragguard.RateLimitPolicy, {}),
    "ConcurrencyLimit": (ragguard.ConcurrencyLimit, ragguard.ConcurrencyPolicy, {}),
    "Timeout": (ragguard.Timeout, ragguard.TimeoutPolicy, {"seconds": "attempt"}),
    "Deadline": (ragguard.Deadline, ragguard.TimeoutPolicy, {"seconds": "total"}),
    "MicroBatcher": (lambda **kw: ragguard.MicroBatcher(_dispatch, **kw), ragguard.BatchingPolicy, {}),
    "Cache": (ragguard.Cache, ragguard.CachePolicy, {}),
    "Coalescer": (ragguard.Coalescer, ragguard.CoalescePolicy, {}),
    "RetryBudget": (ragguard.RetryBudget, ragguard.RetryBudgetPolicy, {}),
    "RedisBackend": (_redis, ragguard.RedisBackendOptions, {}),
    "SharedRateLimiter": (lambda **kw: ragguard.SharedRateLimiter(_redis(), **kw), ragguard.RateLimitPolicy, {}),
    "SharedCircuitBreaker": (
        lambda **kw: ragguard.SharedCircuitBreaker("x", store=_redis(), **kw),
        ragguard.BreakerPolicy,
        {},
    ),
    "MemoryCacheStore": (ragguard.MemoryCacheStore, ragguard.CachePolicy, {}),
    "InMemoryVectorIndex": (ragguard.InMemoryVectorIndex, ragguard.SemanticCachePolicy, {}),
    "AIMDLimit": (ragguard.AIMDLimit, ragguard.AdaptiveConcurrencyPolicy, {"timeout": "timeout_s"}),
    "GradientLimit": (ragguard.GradientLimit, ragguard.AdaptiveConcurrencyPolicy, {}),
    "Hedge": (ragguard.Hedge, ragguard.HedgePolicy, {}),
    "SharedRetryBudget": (
        lambda **kw: ragguard.SharedRetryBudget("x", store=_redis(), **kw),
        ragguard.RetryBudgetPolicy,
        {},
    ),
}

#: (constructor, argument) -> (the settings model whose field's rule checks it, that field), for arguments that
#: are no field of the constructor's own model
OTHER_RULES: dict[tuple[str, str], tuple[type[pydantic.BaseModel], str]] = {
    ("SharedRateLimiter", "expected_instances"): (ragguard.RedisBackendOptions, "expected_instances"),
}

#: public classes with numeric constructor arguments that are not settings (values, errors, clocks, reports)
NOT_SETTINGS = {
    "AttemptTimeout",
    "BatchItemTooLarge",
    "BreakerSnapshot",
    "CallContext",
    "CircuitOpenError",
    "DeadlineExceeded",
    "ManualClock",
    "Outcome",
    "RateLimitHeaders",
    "RateLimitTimeout",
    "RetryBudgetExhausted",
    "RetryBudgetStats",
    "RetryEvent",
    "RetryExhausted",
    "UpsertIncomplete",
}

#: (constructor, argument) -> what it raises instead of a ValidationError, as found (a ValueError names the
#: argument in its message; a TypeError, for a wrong type, does not)
NOT_PYDANTIC: dict[tuple[str, str], tuple[type[Exception], ...]] = {
    **{("RetryBudget", arg): (ragguard.ConfigError,) for arg in ("ratio", "min_retries_per_s", "window_s", "buckets")},
    **{
        ("SharedRetryBudget", arg): (ragguard.ConfigError,)
        for arg in ("expected_instances", "flush_interval", "reconnect_interval")
    },
    ("SharedRateLimiter", "backend_retry_after"): (ValueError, TypeError),
    ("SharedCircuitBreaker", "reconnect_interval"): (ValueError, TypeError),
}

#: bad values that are accepted without a word (bugs: see the reasons); none known
ACCEPTED: dict[tuple[str, str, str], str] = {}

#: the bad values every extra (non-model) numeric argument must reject (these are checked by hand, with no
#: integer check: 1.5 passes for the integer ones)
EXTRA_BAD: list[Any] = ["abc", math.nan, -1]


def _constructor_cases() -> Iterator[Any]:
    for ctor, (_, model, renamed) in CONSTRUCTORS.items():
        target = getattr(ragguard, ctor)
        fields = {path[0]: (kind, info) for path, kind, info in numeric_fields(model)} if model else {}
        for arg, param in inspect.signature(target).parameters.items():
            field = renamed.get(arg, arg)
            if field in fields:
                kind, info = fields[field]
                values = bad_values(info, kind)
            elif (ctor, arg) in OTHER_RULES:
                other, name = OTHER_RULES[ctor, arg]
                info = other.model_fields[name]
                kind = _numeric_type(info.annotation)
                assert kind is not None
                values = bad_values(info, kind)
            elif (ctor, arg) in NOT_PYDANTIC and arg != "store":
                values = EXTRA_BAD
            else:
                continue
            assert param.kind is not param.VAR_KEYWORD
            for bad in values:
                reason = ACCEPTED.get((ctor, arg, repr(bad)))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(ctor, arg, field, bad, marks=marks, id=f"{ctor}({arg}={bad!r})")


@pytest.mark.parametrize(("ctor", "arg", "field", "bad"), list(_constructor_cases()))
def test_constructors_reject_bad_numbers(ctor: str, arg: str, field: str, bad: Any) -> None:
    make = CONSTRUCTORS[ctor][0]
    with pytest.raises((ValueError, TypeError)) as info:  # pydantic's ValidationError is a ValueError
        make(**{arg: bad})
    error = info.value
    if isinstance(error, pydantic.ValidationError):
        assert_names(error, (field,))
        return
    allowed = NOT_PYDANTIC.get((ctor, arg))
    assert allowed is not None, f"{ctor}({arg}={bad!r}) raised {error!r}, not a ValidationError"
    assert isinstance(error, allowed), error
    if isinstance(error, ValueError):
        assert arg in str(error), f"{error!r} does not name {arg}"


def test_adaptive_concurrency_settings_are_validated_through_the_bulkhead() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ragguard.ConcurrencyLimit(max_in_flight=4, adaptive={"min_limit": 0})
    assert_names(info.value, ("adaptive", "min_limit"))
    with pytest.raises(pydantic.ValidationError) as info:
        ragguard.ConcurrencyLimit(max_in_flight=4, adaptive={"max_limit": 8})
    assert_names(info.value, ("adaptive",))


def test_every_public_constructor_with_numbers_is_covered() -> None:
    """A new public class with numeric arguments must be added to CONSTRUCTORS (or NOT_SETTINGS)."""
    missing = []
    for name in ragguard.__all__:
        obj = getattr(ragguard, name)
        if not isinstance(obj, type) or issubclass(obj, pydantic.BaseModel) or name in CONSTRUCTORS:
            continue
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            continue
        if any(_numeric_type(typing.get_type_hints(obj.__init__).get(p.name)) for p in params) and (
            name not in NOT_SETTINGS
        ):
            missing.append(name)
    assert missing == []


# --- header parsers ----------------------------------------------------------------------------------------------

HINT_HEADERS = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
]

header_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789.,eE+-_ hmsnuµμ:GMTSunMoDecNv\t", max_size=40),
    st.from_regex(r"\A-?[0-9]{1,25}(\.[0-9]{0,8})?(e[+-]?[0-9]{1,4})?\Z"),
    st.from_regex(r"\A-?([0-9]{1,12}(\.[0-9]{1,4})?(h|m|s|ms|us|µs|ns)){1,5}\Z"),
    st.floats().map(repr),
    st.integers().map(str),
)
header_name = st.one_of(
    st.sampled_from(HINT_HEADERS),
    st.sampled_from(HINT_HEADERS).map(str.upper),
    st.sampled_from(HINT_HEADERS).map(str.title),
    st.text(max_size=20),
)


def assert_wait(seconds: float | None) -> None:
    if seconds is not None:
        assert isinstance(seconds, float)
        assert not math.isnan(seconds)
        assert 0.0 <= seconds <= MAX_HINT_SECONDS


@settings(max_examples=300, deadline=None)
@given(value=header_text, now=st.floats())
def test_parsers_never_raise_nor_give_a_bad_wait(value: str, now: float) -> None:
    assert_wait(ragguard.parse_duration(value))
    assert_wait(ragguard.parse_retry_after(value, now=lambda: now))


@settings(max_examples=200, deadline=None)
@given(headers=st.dictionaries(header_name, header_text, max_size=8), now=st.floats(0, 4e9))
def test_header_mappings_never_raise_nor_give_a_bad_wait(headers: dict[str, str], now: float) -> None:
    mappings: list[Mapping[str, str]] = [headers]
    with contextlib.suppress(UnicodeEncodeError):  # (a lone surrogate: not something an HTTP client can hold)
        mappings.append(httpx.Headers(headers, encoding="utf-8"))  # case-insensitive, as the SDK's are
    for mapping in mappings:
        assert_wait(ragguard.retry_hint_from_headers(mapping, now=lambda: now))
        assert_wait(rate_limit_wait_from_headers(mapping, now=lambda: now))
        parsed = ragguard.parse_rate_limit_headers(mapping)
        if parsed is not None:
            for name in ragguard.RateLimitHeaders.__slots__:
                number = getattr(parsed, name)
                assert number is None or (math.isfinite(number) and number >= 0.0), (name, number)
            assert_wait(parsed.reset_requests)
            assert_wait(parsed.reset_tokens)


class Hostile(Mapping[str, str]):
    """A headers object that misbehaves on every access."""

    def __getitem__(self, key: str) -> str:
        raise RuntimeError("boom")

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1


def test_a_misbehaving_headers_object_gives_no_hint() -> None:
    assert ragguard.retry_hint_from_headers(Hostile()) is None
    assert ragguard.parse_rate_limit_headers(Hostile()) is None
    assert rate_limit_wait_from_headers(Hostile()) is None
    # values that are not text at all
    odd: Any = {"retry-after": 5, "retry-after-ms": None, "x-ratelimit-reset-tokens": b"1s"}
    assert ragguard.retry_hint_from_headers(odd) is None
    assert ragguard.parse_rate_limit_headers(odd) is None


NOW = 1_700_000_000.0


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "30"}, 30.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "1e400"}, MAX_HINT_SECONDS),
        ({"Retry-After": "99999999999"}, MAX_HINT_SECONDS),
        ({"Retry-After": http_date(NOW + 120)}, 120.0),
        ({"Retry-After": http_date(NOW - 120)}, 0.0),  # in the past: go now
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_HINT_SECONDS),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "Mon, 99 Foo 2024 99:99:99 GMT"}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "-20"}, 0.0),
        ({"retry-after-ms": "1e30"}, MAX_HINT_SECONDS),
        ({"retry-after-ms": "garbage", "Retry-After": "2"}, 2.0),  # a bad ms hint falls back to Retry-After
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the ms hint wins, as in the openai SDK
        ({"x-ratelimit-reset-tokens": "6m0s"}, None),  # a reset time is not a retry hint
    ],
)
def test_retry_hints(headers: dict[str, str], seconds: float | None) -> None:
    assert ragguard.retry_hint_from_headers(httpx.Headers(headers), now=lambda: NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1m30.5s", 90.5),
        ("250ms", 0.25),
        ("1h", 3600.0),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("500us", 0.0005),
        ("20ns", 2e-08),
        ("0s", 0.0),
        ("7", 7.0),  # a bare number is seconds
        ("-5s", 0.0),  # negative: go now
        ("-1h", 0.0),
        ("100000h", MAX_HINT_SECONDS),
        ("9" * 60 + "h", MAX_HINT_SECONDS),
        ("1e999", MAX_HINT_SECONDS),
        ("", None),
        ("s", None),
        ("1x", None),
        ("1h 2m", None),
        ("m5", None),
        ("nan", None),
        ("1" * 70 + "s", None),  # over-long: refused before any arithmetic
    ],
)
def test_durations(value: str, seconds: float | None) -> None:
    result = ragguard.parse_duration(value)
    assert result == (pytest.approx(seconds) if seconds else seconds)


def test_rate_limit_headers_with_durations_and_garbage() -> None:
    parsed = ragguard.parse_rate_limit_headers(
        httpx.Headers(
            {
                "X-RateLimit-Reset-Requests": "1m30.5s",
                "x-ratelimit-reset-tokens": "250ms",
                "x-ratelimit-remaining-requests": "-4",  # negative counts are garbage
                "x-ratelimit-remaining-tokens": "1e999",  # so are infinite ones
                "x-ratelimit-limit-requests": "lots",
                "x-ratelimit-limit-tokens": "90000",
            }
        )
    )
    assert parsed is not None
    assert (parsed.reset_requests, parsed.reset_tokens) == (90.5, 0.25)
    assert (parsed.remaining_requests, parsed.remaining_tokens, parsed.limit_requests) == (None, None, None)
    assert parsed.limit_tokens == 90_000.0
    # a 429 without Retry-After: the reset of the exhausted bucket (remaining unknown counts as exhausted)
    assert rate_limit_wait_from_headers({"x-ratelimit-reset-tokens": "6m0s"}) == 360.0


# --- provider responses the SDK cannot use ----------------------------------------------------------------------

EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}


class Broken(Response):
    """A response written as raw ASGI messages, to break HTTP in ways Starlette's own responses never do."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = json.dumps(EMBEDDING).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if self.mode == "bad_gzip":
            headers.append((b"content-encoding", b"gzip"))  # the body is not gzip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if self.mode == "bad_gzip":
            await send({"type": "http.response.body", "body": body})
        elif self.mode == "truncated":
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            scope["extensions"][CLOSE_CONNECTION_EXTENSION]()  # the connection drops mid-body
        else:  # "stalled": half the body, then nothing, until the client gives up
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass


async def endpoint(request: Request) -> Response:
    await request.body()
    mode = request.path_params["mode"]
    if mode == "malformed_json":
        return Response(b'{"object": "list", "data": [', media_type="application/json")
    if mode == "html":
        return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
    if mode == "wrong_shape":
        return Response(b"[1, 2, 3]", media_type="application/json")
    return Broken(mode)


APP = Starlette(routes=[Route("/{mode}/v1/{rest:path}", endpoint, methods=["POST"])])
DEADLINE = 3.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the openai SDK's async client is asyncio-first


@pytest.fixture(scope="module")
def broken_server() -> Iterator[str]:
    with serve(APP, shutdown_timeout=0.5) as served:
        yield served.url


@pytest.fixture
def no_waits() -> Iterator[None]:
    """Retries skip their backoff (deadlines still hold): each case ends fast."""
    ragguard.set_testing(True)
    yield
    ragguard.set_testing(False)


async def guarded_call(url: str, mode: str, kind: str) -> Any:
    sections: dict[str, Any] = {
        "timeout": {"total": DEADLINE},
        "cache": {"enabled": False},
        "coalesce": {"enabled": False},
    }
    policy = ragguard.Policy(**sections)
    client = ragguard.guard(
        AsyncOpenAI(base_url=f"{url}/{mode}/v1", api_key="sk-test-bad-input"), policy, backend=ragguard.MemoryBackend()
    )
    try:
        with anyio.fail_after(DEADLINE + 5):  # a hang is a failure, not a stuck suite
            if kind == "embeddings":
                return await client.embeddings.create(model="text-embedding-3-small", input="hello")
            return await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=8
            )
    finally:
        await client.close()


@pytest.mark.openai
@pytest.mark.anyio
@pytest.mark.usefixtures("no_waits")
@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        ("embeddings", "malformed_json"),
        ("embeddings", "html"),
        ("embeddings", "wrong_shape"),
        ("embeddings", "truncated"),
        ("embeddings", "bad_gzip"),
        ("embeddings", "stalled"),
        ("chat", "malformed_json"),
        ("chat", "html"),
        ("chat", "wrong_shape"),
        ("chat", "truncated"),
        ("chat", "bad_gzip"),
    ],
)
async def test_unusable_responses_end_in_a_typed_error_within_the_deadline(
    broken_server: str, kind: str, mode: str
) -> None:
    start = time.monotonic()
    with pytest.raises((openai.OpenAIError, ragguard.RagGuardError)) as info:
        await guarded_call(broken_server, mode, kind)
    elapsed = time.monotonic() - start
    assert elapsed < DEADLINE + 1.0
    if mode == "stalled":
        assert isinstance(info.value, ragguard.DeadlineExceeded)
        assert elapsed >= DEADLINE - 0.1
    else:
        assert elapsed < DEADLINE  # failed on its own, the deadline did not have to cut it
