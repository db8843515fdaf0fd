"""Parsing of the wait hints providers put in HTTP headers.

Sources:
- ``Retry-After``: RFC 9110 §10.2.3 — either delay-seconds or an HTTP-date.
- ``retry-after-ms``: OpenAI / Azure OpenAI, milliseconds (non-standard; the openai SDK prefers it).
- ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``: OpenAI's rate-limit headers, Go-style
  durations such as ``6m0s``, ``1s``, ``250ms``, ``1m30.5s`` (https://platform.openai.com/docs/guides/rate-limits).

Every parser here is total: it never raises, and never returns a negative, NaN or infinite number of seconds.
Garbage gives ``None``; a date in the past gives ``0.0``; anything longer than :data:`MAX_HINT_SECONDS` is
clamped to it (callers compare the hint with their deadline and fail fast when it is too long).
"""

from __future__ import annotations

import calendar
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping

__all__ = [
    "MAX_HINT_SECONDS",
    "RateLimitHeaders",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "rate_limit_wait_from_headers",
    "retry_hint_from_headers",
]

#: Upper bound on any parsed hint, in seconds (one day): keeps arithmetic finite whatever a server sends.
MAX_HINT_SECONDS = 86_400.0

# ASCII digits only: float() alone would also accept "inf", "nan", "1_000" and non-ASCII digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Go's time.ParseDuration units; it accepts both micro signs (U+00B5 and U+03BC).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _clamp(seconds: float) -> float | None:
    if math.isnan(seconds):
        return None
    if seconds <= 0.0:
        return 0.0  # also turns -0.0 into 0.0
    return min(seconds, MAX_HINT_SECONDS)


def _number(text: str) -> float | None:
    """A plain decimal number (optional sign, fraction, exponent), or ``None``."""
    if _NUMBER.fullmatch(text) is None:
        return None
    return float(text)  # cannot fail on what the pattern admits; a huge exponent gives inf, clamped later


def parse_duration(value: str | None) -> float | None:
    """Parse a Go-style duration (``6m0s``, ``250ms``, ``1m30.5s``, ``2h``) or a bare number of seconds.

    Returns:
        seconds in ``[0, MAX_HINT_SECONDS]``, or ``None`` when ``value`` is missing or malformed.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    number = _number(text)
    if number is not None:
        return _clamp(number)
    negative = text[0] == "-"
    if text[0] in "+-":
        text = text[1:]
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return _clamp(-total if negative else total)


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Parse a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).

    Non-standard fractional seconds (``1.5``) are accepted, as the openai SDK does.

    Args:
        value: the header value.
        now: wall-clock time in seconds since the epoch, for HTTP-dates.

    Returns:
        seconds in ``[0, MAX_HINT_SECONDS]`` (a date in the past gives ``0.0``), or ``None`` when malformed.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 128:
        return None
    number = _number(text)
    if number is not None:
        return _clamp(number)
    try:
        parsed = email.utils.parsedate_tz(text)
        if parsed is None:
            return None
        if parsed[0] > 9999:  # beyond what calendar.timegm handles: certainly later than the clamp
            return MAX_HINT_SECONDS
        # HTTP-dates are always GMT (RFC 9110 §5.6.7): a missing zone means UTC, never local time
        # (email.utils.mktime_tz would use local time for it).
        timestamp = calendar.timegm(parsed[:6]) - (parsed[9] or 0)
        return _clamp(float(timestamp) - now())
    except (TypeError, ValueError, OverflowError, OSError, IndexError):
        return None


def retry_hint_from_headers(headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """How long the provider asked us to wait before retrying, in seconds, or ``None`` if it did not say.

    Looks at, in order: ``retry-after-ms`` (milliseconds), ``Retry-After`` (seconds or HTTP-date). The
    ``x-ratelimit-reset-*`` headers are *not* a retry hint on their own (they say when a bucket is full again,
    not when one request fits); see :func:`parse_rate_limit_headers`.

    ``headers`` must look up names case-insensitively (httpx/httpx2 ``Headers`` do); a plain ``dict`` is
    searched with lower-case names.
    """
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            number = _number(ms.strip())
            if number is not None:
                hint = _clamp(number / 1000.0)
                if hint is not None:
                    return hint
        return parse_retry_after(headers.get("retry-after"), now=now)
    except Exception:  # a foreign headers object misbehaving must not turn into a new failure
        return None


class RateLimitHeaders:
    """The provider's view of a rate-limit bucket, from OpenAI-style ``x-ratelimit-*`` headers.

    Every attribute is ``None`` when its header was missing or malformed.

    Attributes:
        limit_requests: requests per minute allowed (``x-ratelimit-limit-requests``).
        limit_tokens: tokens per minute allowed (``x-ratelimit-limit-tokens``).
        remaining_requests: requests left now (``x-ratelimit-remaining-requests``).
        remaining_tokens: tokens left now (``x-ratelimit-remaining-tokens``).
        reset_requests: seconds until the request bucket is full again (``x-ratelimit-reset-requests``).
        reset_tokens: seconds until the token bucket is full again (``x-ratelimit-reset-tokens``).
    """

    __slots__ = (
        "limit_requests",
        "limit_tokens",
        "remaining_requests",
        "remaining_tokens",
        "reset_requests",
        "reset_tokens",
    )

    def __init__(
        self,
        *,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        reset_requests: float | None = None,
        reset_tokens: float | None = None,
    ) -> None:
        self.limit_requests = limit_requests
        self.limit_tokens = limit_tokens
        self.remaining_requests = remaining_requests
        self.remaining_tokens = remaining_tokens
        self.reset_requests = reset_requests
        self.reset_tokens = reset_tokens

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RateLimitHeaders({fields})"


def _count(value: str | None) -> float | None:
    if value is None:
        return None
    number = _number(value.strip())
    if number is None or math.isinf(number) or number < 0:
        return None
    return number


def parse_rate_limit_headers(headers: Mapping[str, str] | None) -> RateLimitHeaders | None:
    """Read OpenAI's ``x-ratelimit-*`` headers; ``None`` when none of them is present."""
    if headers is None:
        return None
    try:
        get = headers.get
        parsed = RateLimitHeaders(
            limit_requests=_count(get("x-ratelimit-limit-requests")),
            limit_tokens=_count(get("x-ratelimit-limit-tokens")),
            remaining_requests=_count(get("x-ratelimit-remaining-requests")),
            remaining_tokens=_count(get("x-ratelimit-remaining-tokens")),
            reset_requests=parse_duration(get("x-ratelimit-reset-requests")),
            reset_tokens=parse_duration(get("x-ratelimit-reset-tokens")),
        )
    except Exception:
        return None
    if all(getattr(parsed, name) is None for name in RateLimitHeaders.__slots__):
        return None
    return parsed


def rate_limit_wait_from_headers(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """How long to wait after a 429, in seconds: the explicit hint, else what the rate-limit headers imply.

    Uses :func:`retry_hint_from_headers` first. Without one, OpenAI's ``x-ratelimit-reset-*`` headers say when a
    bucket is full again: the wait is the reset of the exhausted bucket(s) (``remaining`` 0 or missing), or, when
    neither reports itself exhausted, the shorter reset. ``None`` when the headers say nothing usable.
    """
    hint = retry_hint_from_headers(headers, now=now)
    if hint is not None:
        return hint
    limits = parse_rate_limit_headers(headers)
    if limits is None:
        return None
    pairs = [
        (limits.remaining_requests, limits.reset_requests),
        (limits.remaining_tokens, limits.reset_tokens),
    ]
    exhausted = [reset for remaining, reset in pairs if reset is not None and (remaining is None or remaining < 1)]
    if exhausted:
        return max(exhausted)
    resets = [reset for _, reset in pairs if reset is not None]
    return min(resets) if resets else None
