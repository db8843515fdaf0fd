from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterator, Mapping

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ragguard
from ragguard._hints import (
    MAX_HINT_SECONDS,
    RateLimitHeaders,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    retry_hint_from_headers,
)

NOW = 1_700_000_000.0  # a fixed wall-clock "now" for HTTP-dates


def fixed_now() -> float:
    return NOW


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def assert_valid(seconds: float | None) -> None:
    if seconds is not None:
        assert isinstance(seconds, float)
        assert math.isfinite(seconds)
        assert 0.0 <= seconds <= MAX_HINT_SECONDS
        assert math.copysign(1.0, seconds) == 1.0  # not -0.0


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  7 ", 7.0),
        ("1.5", 1.5),  # non-standard, accepted as the openai SDK does
        ("-5", 0.0),
        ("-0", 0.0),
        ("99999999", MAX_HINT_SECONDS),
        ("1e400", MAX_HINT_SECONDS),
    ],
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    result = parse_retry_after(value, now=fixed_now)
    assert result == seconds
    assert_valid(result)


@pytest.mark.parametrize("offset", [1.0, 30.0, 3600.0])
def test_retry_after_http_date_in_the_future(offset: float) -> None:
    assert parse_retry_after(http_date(NOW + offset), now=fixed_now) == offset


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after(http_date(NOW - 3600), now=fixed_now) == 0.0


def test_retry_after_http_date_far_future_is_clamped() -> None:
    assert parse_retry_after(http_date(NOW + 10 * 86_400), now=fixed_now) == MAX_HINT_SECONDS
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=fixed_now) == MAX_HINT_SECONDS
    assert parse_retry_after("Sun, 06 Nov 99999 08:49:37 GMT", now=fixed_now) == MAX_HINT_SECONDS


# RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms, all GMT.
EXAMPLE = 784_111_777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_retry_after_http_date_forms(value: str) -> None:
    assert parse_retry_after(value, now=lambda: EXAMPLE - 60) == 60.0


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is Unix-only")
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no DST
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
def test_a_date_without_zone_is_gmt_not_local_time() -> None:
    # asctime dates carry no zone; HTTP says they are GMT whatever the machine's local time zone is
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", now=lambda: EXAMPLE - 60) == 60.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37", now=lambda: EXAMPLE - 60) == 60.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "12abc",
        "inf",
        "Infinity",
        "nan",
        "1_000",
        "\u0661\u0662",
        "0x10",
        "5, 5",
        "Mon",
    ],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=fixed_now) is None


def test_retry_after_uses_the_wall_clock_by_default() -> None:
    hint = parse_retry_after(http_date(time.time() + 100))
    assert hint is not None
    assert 98.0 <= hint <= 100.0


# ---------------------------------------------------------------- retry_hint_from_headers


def test_retry_after_ms_is_milliseconds_and_preferred() -> None:
    assert retry_hint_from_headers({"retry-after-ms": "250"}) == 0.25
    assert retry_hint_from_headers({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_hint_from_headers({"retry-after-ms": "-3"}) == 0.0
    assert retry_hint_from_headers({"retry-after-ms": "1e12"}) == MAX_HINT_SECONDS


def test_garbage_retry_after_ms_falls_back_to_retry_after() -> None:
    assert retry_hint_from_headers({"retry-after-ms": "soon", "retry-after": "4"}) == 4.0
    assert retry_hint_from_headers({"retry-after-ms": "nan", "retry-after": "4"}) == 4.0
    assert retry_hint_from_headers({"retry-after-ms": "soon"}) is None


def test_hint_headers_are_case_insensitive_with_httpx() -> None:
    assert retry_hint_from_headers(httpx.Headers({"Retry-After-Ms": "100"})) == 0.1
    assert retry_hint_from_headers(httpx.Headers({"RETRY-AFTER": "2"})) == 2.0
    assert retry_hint_from_headers(httpx.Headers({"Retry-After": http_date(NOW + 5)}), now=fixed_now) == 5.0


def test_no_hint() -> None:
    assert retry_hint_from_headers(None) is None
    assert retry_hint_from_headers({}) is None
    assert retry_hint_from_headers(httpx.Headers({"x-ratelimit-reset-requests": "1s"})) is None


class Broken(Mapping[str, str]):
    def __getitem__(self, key: str) -> str:
        raise RuntimeError("broken headers")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 1

    def get(self, key: str, default: object = None) -> str:  # type: ignore[override]
        raise RuntimeError("broken headers")


def test_misbehaving_headers_give_no_hint() -> None:
    assert retry_hint_from_headers(Broken()) is None
    assert parse_rate_limit_headers(Broken()) is None


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("250ms", 0.25),
        ("1m30.5s", 90.5),
        ("2h", 7200.0),
        ("1h2m3s", 3723.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("20ns", 20e-9),
        ("3us", 3e-6),
        ("3\u00b5s", 3e-6),  # micro sign
        ("3\u03bcs", 3e-6),  # Greek mu, which Go also accepts
        ("+2h", 7200.0),
        (" 7s ", 7.0),
    ],
)
def test_durations(value: str, seconds: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds)
    assert_valid(result)


@pytest.mark.parametrize("value", ["-1s", "-2m30s", "-5", "-0"])
def test_negative_durations_are_clamped_to_zero(value: str) -> None:
    result = parse_duration(value)
    assert result == 0.0
    assert_valid(result)


@pytest.mark.parametrize("value", ["9999h", "100000000", "1e400", "99999999999999999999h"])
def test_huge_durations_are_clamped(value: str) -> None:
    assert parse_duration(value) == MAX_HINT_SECONDS


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "s",
        "ms",
        "1x",
        "1s2",
        "1 s",
        "1s 2s",
        "abc",
        "1d",
        "inf",
        "nan",
        "NaNs",
        "1_000s",
        "\u0661s",
        "--1s",
        "-",
        "+",
        "1" * 70 + "s",
    ],
)
def test_duration_garbage_is_none(value: str | None) -> None:
    assert parse_duration(value) is None


# ---------------------------------------------------------------- fuzz

HEADER_LIKE = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.eE+-hmsnuµμ :,GMTSunNovDec", max_size=40),
    st.from_regex(r"\A[+-]?[0-9]{0,12}(\.[0-9]{0,6})?(ns|us|ms|s|m|h)?([0-9]{1,4}(ms|s|m|h))*\Z"),
    st.from_regex(
        r"\A(Mon|Sun|Fri), [0-9]{1,2} (Jan|Nov|Feb) [0-9]{1,6} "
        r"[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}( [A-Z+\-0-9]{1,5})?\Z"
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(max_examples=500, deadline=None)
@given(value=HEADER_LIKE, now=st.floats(min_value=-1e12, max_value=1e12))
def test_parsers_are_total(value: str, now: float) -> None:
    assert_valid(parse_duration(value))
    assert_valid(parse_retry_after(value, now=lambda: now))
    assert_valid(retry_hint_from_headers({"retry-after-ms": value}, now=lambda: now))
    assert_valid(retry_hint_from_headers({"retry-after": value}, now=lambda: now))


@settings(max_examples=150, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(RateLimitHeaders.__slots__)), HEADER_LIKE))
def test_rate_limit_parser_is_total(values: dict[str, str]) -> None:
    headers = {f"x-ratelimit-{name.replace('_', '-')}": value for name, value in values.items()}
    parsed = parse_rate_limit_headers(headers)
    if parsed is None:
        return
    for name in RateLimitHeaders.__slots__:
        number = getattr(parsed, name)
        if number is not None:
            assert math.isfinite(number)
            assert number >= 0.0


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(min_value=0, max_value=86_400))
def test_whole_seconds_round_trip(seconds: int) -> None:
    assert parse_retry_after(str(seconds)) == float(seconds)
    assert parse_retry_after(http_date(NOW + seconds), now=fixed_now) == float(seconds)
    assert parse_duration(f"{seconds // 3600}h{seconds % 3600 // 60}m{seconds % 60}s") == float(seconds)


# ---------------------------------------------------------------- x-ratelimit-* headers


def test_openai_rate_limit_headers() -> None:
    # the example from https://platform.openai.com/docs/guides/rate-limits
    headers = httpx.Headers(
        {
            "X-RateLimit-Limit-Requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    parsed = parse_rate_limit_headers(headers)
    assert parsed is not None
    assert parsed.limit_requests == 60.0
    assert parsed.limit_tokens == 150_000.0
    assert parsed.remaining_requests == 59.0
    assert parsed.remaining_tokens == 149_984.0
    assert parsed.reset_requests == 1.0
    assert parsed.reset_tokens == 360.0
    assert "limit_tokens=150000.0" in repr(parsed)


def test_rate_limit_headers_absent_or_partial() -> None:
    assert parse_rate_limit_headers(None) is None
    assert parse_rate_limit_headers(httpx.Headers({"content-type": "application/json"})) is None
    assert parse_rate_limit_headers(httpx.Headers({"x-ratelimit-limit-requests": "garbage"})) is None
    parsed = parse_rate_limit_headers(
        httpx.Headers(
            {
                "x-ratelimit-remaining-tokens": "12",
                "x-ratelimit-remaining-requests": "-1",
                "x-ratelimit-limit-tokens": "inf",
                "x-ratelimit-reset-tokens": "soon",
            }
        )
    )
    assert parsed is not None
    assert parsed.remaining_tokens == 12.0
    assert parsed.remaining_requests is None
    assert parsed.limit_tokens is None
    assert parsed.reset_tokens is None
    assert parsed.limit_requests is None


def test_rate_limit_wait_prefers_explicit_hint_then_exhausted_bucket_reset() -> None:
    from ragguard._hints import rate_limit_wait_from_headers

    both = httpx.Headers({"retry-after-ms": "250", "x-ratelimit-reset-requests": "6s"})
    assert rate_limit_wait_from_headers(both) == pytest.approx(0.25)
    tokens_out = httpx.Headers(
        {
            "x-ratelimit-remaining-requests": "40",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "1m30.5s",
        }
    )
    assert rate_limit_wait_from_headers(tokens_out) == pytest.approx(90.5)
    neither = httpx.Headers({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "500ms"})
    assert rate_limit_wait_from_headers(neither) == pytest.approx(2.0)  # remaining unknown: both may be out
    assert rate_limit_wait_from_headers(httpx.Headers({})) is None


def test_classifier_reads_reset_headers_on_a_429_only() -> None:
    headers = httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
    assert ragguard.classify_exception(_StatusError(429, headers)).retry_after == pytest.approx(360)
    assert ragguard.classify_exception(_StatusError(503, headers)).retry_after is None


class _StatusError(Exception):
    def __init__(self, status: int, headers: httpx.Headers) -> None:
        super().__init__(status)
        self.status_code = status
        self.response = type("Response", (), {"headers": headers, "status_code": status})()
