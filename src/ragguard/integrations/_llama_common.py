"""What the LlamaIndex wrappers share: the classifier, switching a model's own retries off, names and keys."""

from __future__ import annotations

import array
import base64
import warnings
from typing import Any

from .._context import CallContext
from .._hints import parse_rate_limit_headers
from .._outcome import Outcome, classify_exception, headers_of
from ..guards.cache import fingerprint
from ..guards.pipeline import Pipeline

__all__ = [
    "InnerRetriesWarning",
    "classify_llama",
    "credential_of",
    "decode_vector",
    "encode_vector",
    "note_error",
    "slot_before_permit",
    "switch_off_retries",
    "warn_retries",
]


class InnerRetriesWarning(UserWarning):
    """A wrapped LlamaIndex model's own retries could not be switched off: its attempts may multiply with
    ragguard's (LlamaIndex's OpenAI classes retry with tenacity *around* the SDK's own retries)."""


def classify_llama(exc: BaseException) -> Outcome:
    """Judge an exception raised by a LlamaIndex model: the OpenAI SDK's errors by
    :func:`~ragguard.providers.openai.classify_openai` (``insufficient_quota`` never retried, ``x-should-retry``
    honoured), anything else by the generic classifier (HTTP status and ``Retry-After`` found on the exception)."""
    if type(exc).__module__.partition(".")[0] == "openai":
        from ..providers.openai import classify_openai  # the exception's module is loaded, so openai is installed

        return classify_openai(exc)
    return classify_exception(exc)


def note_error(ctx: CallContext, exc: BaseException) -> None:
    """Keep the provider's rate-limit view from an error response, for the rate limiter."""
    headers = headers_of(exc)
    if headers is not None:
        ctx.rate_headers = parse_rate_limit_headers(headers)


def slot_before_permit(pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with its concurrency slot taken *before* its rate-limit permit (the standard order takes it
    after).

    A permit is charged when it is granted, but the request reaches the provider only when the event loop gets
    to it. LlamaIndex does milliseconds of synchronous work per query (prompt building, token counting — some of
    it on a thread with an event loop of its own), so when many queries resume at once — e.g. when the
    micro-batched query embeddings return — the loop stalls for up to a second: permits keep being granted on
    the clock, their requests wait behind the stall, then reach the provider in one burst larger than its
    bucket (measured: 5-20 % 429s with 150 concurrent ``aquery`` calls on two cores). Holding the slot first
    bounds the requests granted but not yet sent by ``Policy.concurrency.max_in_flight``; keep it within the
    provider's spare burst (the provider's burst minus ``rate_limit.burst_seconds`` worth of requests).
    """
    guards = list(pipeline.guards)
    slots = [guard for guard in guards if getattr(guard, "stage", None) == "concurrency"]
    rest = [guard for guard in guards if getattr(guard, "stage", None) != "concurrency"]
    at = next((i for i, guard in enumerate(rest) if getattr(guard, "stage", None) == "rate_limit"), None)
    if not slots or at is None:
        return pipeline
    ordered = [*rest[:at], *slots, *rest[at:]]
    return Pipeline(*ordered, clock=pipeline.clock, classify=pipeline.classify, ordered=False)


def credential_of(model: Any) -> str | None:
    """A fingerprint of the model's endpoint and API key (never the key in clear), or ``None`` when it has no key
    field (a local model)."""
    key = getattr(model, "api_key", None)
    if not isinstance(key, str) or not key:
        return None
    return fingerprint(f"{getattr(model, 'api_base', None)}|{key}")


def _is_sdk_client(value: Any) -> bool:
    """An OpenAI-style SDK client (``openai.OpenAI``/``AsyncOpenAI`` and look-alikes with ``with_options``)."""
    return isinstance(getattr(value, "max_retries", None), int) and callable(getattr(value, "with_options", None))


def _retry_free(model: Any) -> bool:
    """Models known to make no calls of their own to retry (LlamaIndex's mocks, ragguard's own wrappers)."""
    from llama_index.core.embeddings.mock_embed_model import MockEmbedding
    from llama_index.core.llms.mock import MockFunctionCallingLLM, MockLLM

    return isinstance(model, (MockEmbedding, MockLLM, MockFunctionCallingLLM))


def switch_off_retries(model: Any) -> str | None:
    """Set the model's ``max_retries`` to 0, and its SDK clients already made (private attributes) to
    ``max_retries=0`` too, so one retry layer remains: ragguard's. Returns ``None`` when done (or nothing needed
    doing), else why it could not be done."""
    if _retry_free(model):
        return None
    if not isinstance(getattr(model, "max_retries", None), int):
        return f"{type(model).__name__} has no max_retries setting"
    try:
        model.max_retries = 0
    except Exception as exc:  # a frozen or validating model: report, never fail the wrapping
        return f"setting {type(model).__name__}.max_retries = 0 failed: {exc!r}"
    if model.max_retries != 0:
        return f"{type(model).__name__}.max_retries did not accept 0"
    private = getattr(model, "__pydantic_private__", None) or {}
    for name, value in list(private.items()):
        if _is_sdk_client(value) and value.max_retries != 0:
            try:
                setattr(model, name, value.with_options(max_retries=0))
            except Exception as exc:
                return f"the SDK client {type(model).__name__}.{name} kept its retries: {exc!r}"
    return None


def warn_retries(model: Any, reason: str, *, stacklevel: int) -> None:
    warnings.warn(
        f"ragguard could not switch off the own retries of {type(model).__name__} ({reason}); if it retries on its "
        "own, attempts multiply with ragguard's. Switch them off yourself, or pass a policy with "
        "retry={'enabled': False} to keep only the model's.",
        InnerRetriesWarning,
        stacklevel=stacklevel + 1,
    )


def encode_vector(vector: Any) -> Any:
    """An embedding as compact JSON: base64 of its float64 values (exact)."""
    return {"d": base64.b64encode(array.array("d", vector).tobytes()).decode("ascii")}


def decode_vector(value: Any) -> list[float]:
    floats = array.array("d")
    floats.frombytes(base64.b64decode(value["d"], validate=True))
    return floats.tolist()
