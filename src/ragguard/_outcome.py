"""How a failed attempt is judged: the :class:`Outcome` every guard reads, and the generic classifier.

Guards know nothing of any provider. A *classifier* turns an exception into an :class:`Outcome`; provider
modules (``ragguard.providers.openai``…) supply classifiers that know their SDK's exception classes, and
:func:`classify_exception` is the generic default used by the decorators: it reads an HTTP status code and
headers from the common shapes (``exc.status_code``, ``exc.response.status_code``, ``exc.response.headers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._hints import rate_limit_wait_from_headers, retry_hint_from_headers
from .errors import AttemptTimeout, RagGuardError

__all__ = [
    "NON_RETRYABLE_STATUS",
    "Classifier",
    "Outcome",
    "classify_exception",
    "classify_status",
    "headers_of",
    "status_code_of",
]

#: Client errors that a retry cannot fix: bad request, unauthenticated, forbidden, not found, unprocessable.
NON_RETRYABLE_STATUS = frozenset({400, 401, 403, 404, 422})


class Outcome:
    """The verdict on one failed attempt.

    Attributes:
        kind: a short reason, one of ``rate_limit``, ``quota`` (billing: never retried), ``server``,
            ``timeout``, ``connection``, ``client`` (a 4xx the caller must fix), ``guard`` (a ragguard refusal)
            or ``other``.
        retryable: whether another attempt may succeed.
        failure: whether it says the provider is unhealthy (counts against a circuit breaker).
        rate_limited: whether the provider said "too many requests" (drives shared Retry-After pauses).
        retry_after: the provider's own wait hint in seconds, or ``None``.
        status: the HTTP status code, when there was one.
    """

    __slots__ = ("failure", "kind", "rate_limited", "retry_after", "retryable", "status")

    def __init__(
        self,
        kind: str,
        *,
        retryable: bool,
        failure: bool,
        rate_limited: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        self.kind = kind
        self.retryable = retryable
        self.failure = failure
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.status = status

    def __repr__(self) -> str:
        return (
            f"Outcome({self.kind!r}, retryable={self.retryable}, failure={self.failure}, "
            f"rate_limited={self.rate_limited}, retry_after={self.retry_after}, status={self.status})"
        )


Classifier = Callable[[BaseException], Outcome]


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status code an exception carries (``exc.status_code`` or ``exc.response.status_code``)."""
    status: Any = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) and 100 <= status <= 599 else None


def headers_of(exc: BaseException) -> Mapping[str, str] | None:
    """The response headers an exception carries (``exc.response.headers``), if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return headers if headers is not None and hasattr(headers, "get") else None


def classify_status(status: int, headers: Mapping[str, str] | None = None) -> Outcome:
    """Classify an HTTP error status the way HTTP says: 408/409/429/5xx retryable, other 4xx not.

    A 429's wait comes from ``retry-after-ms`` / ``Retry-After``, else from OpenAI-style ``x-ratelimit-reset-*``
    headers (see :func:`~ragguard._hints.rate_limit_wait_from_headers`).
    """
    if status == 429:
        wait = rate_limit_wait_from_headers(headers)
        return Outcome("rate_limit", retryable=True, failure=False, rate_limited=True, retry_after=wait, status=429)
    hint = retry_hint_from_headers(headers)
    if status >= 500:
        return Outcome("server", retryable=True, failure=True, retry_after=hint, status=status)
    if status in (408, 409):
        return Outcome("timeout" if status == 408 else "server", retryable=True, failure=True, status=status)
    return Outcome("client", retryable=False, failure=False, status=status)


def classify_exception(exc: BaseException) -> Outcome:
    """The generic classifier, for code ragguard knows nothing about.

    - :class:`~ragguard.AttemptTimeout`, :class:`TimeoutError`, :class:`ConnectionError` and other
      :class:`OSError`: retryable, count as failures.
    - other ragguard errors (open breaker, full bulkhead, rate-limit timeout…): not retried, not failures.
    - an exception carrying an HTTP status: :func:`classify_status` (400/401/403/404/422 never retried).
    - any other :class:`Exception`: retryable and a failure (as stamina and tenacity do by default).
    - anything that is not an :class:`Exception` (cancellation, ``KeyboardInterrupt``…): never retried.
    """
    if isinstance(exc, AttemptTimeout):
        return Outcome("timeout", retryable=True, failure=True)
    if isinstance(exc, RagGuardError):
        return Outcome("guard", retryable=False, failure=False)
    if not isinstance(exc, Exception):
        return Outcome("other", retryable=False, failure=False)
    status = status_code_of(exc)
    if status is not None:
        return classify_status(status, headers_of(exc))
    if isinstance(exc, TimeoutError):
        return Outcome("timeout", retryable=True, failure=True)
    if isinstance(exc, OSError):
        return Outcome("connection", retryable=True, failure=True)
    return Outcome("other", retryable=True, failure=True)
