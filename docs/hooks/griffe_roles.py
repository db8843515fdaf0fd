"""A griffe extension for the API reference: ragguard's docstrings use Sphinx roles, mkdocstrings reads Markdown.

- ``:class:`~ragguard.Retry``` (and ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``) becomes a
  link to the reference entry when the target is public (a name in ``ragguard.__all__`` or
  ``ragguard.testing.__all__``, whatever module path the docstring names it by), else a code span. ``~`` keeps
  only the last part of the name, as in Sphinx.
- A reST literal-block marker (a paragraph ending in ``::``) loses one colon; the indented block after it is a
  Markdown code block already.
- An attribute documented by ``#:`` comments right above it (the Sphinx convention the policy models use for
  their fields) gets those comments as its docstring.

Loaded by mkdocstrings (``extensions:`` in mkdocs.yml); it changes nothing in the source.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`<>]+)`")
_LITERAL = re.compile(r"(?m)(\S)::$")


def _public_names() -> dict[int, str]:
    """id(object) → its public dotted name, for everything the two public namespaces export."""
    names: dict[int, str] = {}
    for module_name in ("ragguard.testing", "ragguard"):  # ragguard last: its names win
        module = importlib.import_module(module_name)
        for name in module.__all__:
            try:
                value = getattr(module, name)
            except (AttributeError, ImportError):  # an optional extra that is not installed
                continue
            if not isinstance(value, (str, int, float, dict, tuple, type(None))):
                names[id(value)] = f"{module_name}.{name}"
    return names


def _resolve(target: str) -> Any:
    """The object a dotted name refers to, or ``None``."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                value = getattr(value, attr)
        except AttributeError:
            return None
        return value
    return None


def _comment_above(obj: griffe.Object) -> str:
    """The ``#:`` comment lines right above an attribute's first line, joined."""
    if obj.filepath is None or obj.lineno is None or isinstance(obj.filepath, list):
        return ""
    lines = obj.lines_collection[obj.filepath]
    found: list[str] = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.append(lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(reversed(found))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._public: dict[int, str] | None = None

    def _link(self, match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target
        if self._public is None:
            self._public = _public_names()
        candidates = [target] if "." in target else [f"ragguard.{target}", f"ragguard.testing.{target}"]
        for candidate in candidates:
            value = _resolve(candidate) if candidate.startswith("ragguard") else None
            public = self._public.get(id(value)) if value is not None else None
            if public is not None:
                return f"[`{shown}`][{public}]"
        return f"`{shown}`"

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is None and obj.is_attribute:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            text = _ROLE.sub(self._link, obj.docstring.value)
            obj.docstring.value = _LITERAL.sub(r"\1:", text)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member)  # type: ignore[arg-type]

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._rewrite(pkg)
