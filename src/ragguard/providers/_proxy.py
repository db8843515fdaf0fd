"""A transparent attribute proxy: chosen attributes replaced, everything else read from the wrapped object."""

from __future__ import annotations

from typing import Any

__all__ = ["AttributeProxy"]


class AttributeProxy:
    """Looks like ``target`` except for the attributes in ``overrides``.

    Used to give a guarded client the SDK's own interface: ``client.embeddings.create`` is replaced, while
    ``client.embeddings.with_raw_response`` or ``client.models.list`` are the SDK's own, untouched.
    """

    __slots__ = ("_overrides", "_target")

    def __init__(self, target: Any, overrides: dict[str, Any]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_target"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_target"), name, value)

    def __dir__(self) -> list[str]:
        target = object.__getattribute__(self, "_target")
        return sorted(set(dir(target)) | set(object.__getattribute__(self, "_overrides")))

    def __repr__(self) -> str:
        return f"<guarded {object.__getattribute__(self, '_target')!r}>"
