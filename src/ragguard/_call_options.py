"""Per-call options for guarded clients, set around the call with :func:`call_options` (no change to the SDK call).

The options live in a :class:`contextvars.ContextVar`, so they follow the code that sets them into every task it
awaits and never leak into other tasks or threads; leaving the ``with`` block restores the previous options.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

__all__ = ["CallOptions", "call_options", "current_call_options"]


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What :func:`call_options` sets; see there."""

    cache: bool = True
    scope: str | None = None
    coalesce_key: str | None = None
    context: str | None = None


_DEFAULT = CallOptions()
_OPTIONS: contextvars.ContextVar[CallOptions] = contextvars.ContextVar("ragguard_call_options", default=_DEFAULT)


def current_call_options() -> CallOptions:
    """The options in force for calls made from here (the defaults outside any :func:`call_options` block)."""
    return _OPTIONS.get()


_UNSET: object = object()


@contextmanager
def call_options(
    *,
    cache: bool | None = None,
    scope: str | object | None = _UNSET,
    coalesce_key: str | object | None = _UNSET,
    context: str | object | None = _UNSET,
) -> Iterator[CallOptions]:
    """Options for the guarded calls made inside the ``with`` block (nested blocks override what they set).

    Example::

        with ragguard.call_options(scope=f"tenant:{tenant_id}"):
            answer = await client.chat.completions.create(...)   # cached apart from other tenants

        with ragguard.call_options(cache=False):                  # a "regenerate" button: fresh answer
            answer = await client.chat.completions.create(...)

    Args:
        cache: ``False`` bypasses the cache layers for these calls (no lookup, no fill; coalescing still works).
        scope: a tenant (or user) id added to these calls' cache and coalescing keys, on top of
            ``Policy.cache.scope``, so different scopes never share an entry or an in-flight call.
        coalesce_key: declare identical requests made under this key interchangeable, so concurrent ones share
            one upstream call even when they are not deterministic (``temperature != 0``). The key is combined
            with the request itself and the credential, so unrelated requests never merge.
        context: the retrieved context (text) of these calls. A chat completion or response degraded with
            ``Policy.degrade.skip_generation`` returns it as its answer instead of calling the model (see
            :class:`~ragguard.DegradePolicy`); otherwise it is unused, and never sent anywhere by ragguard.

    Yields:
        The options in force inside the block.

    Raises:
        TypeError: a value of the wrong type (``cache`` must be a bool, ``scope``/``coalesce_key``/``context``
            non-empty strings).
    """
    current = _OPTIONS.get()
    changes: dict[str, object] = {}
    if cache is not None:
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        changes["cache"] = cache
    for name, value in (("scope", scope), ("coalesce_key", coalesce_key), ("context", context)):
        if value is _UNSET:
            continue
        if value is not None and not (isinstance(value, str) and value):
            raise TypeError(f"{name} must be a non-empty string or None, got {value!r}")
        changes[name] = value
    options = replace(current, **changes)  # type: ignore[arg-type]
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)
