"""Pinecone metadata: validation of stored values and compiled metadata filters, for the Pinecone simulator.

Pinecone metadata maps string keys to a string, a number, a boolean or a list of strings
(https://docs.pinecone.io/guides/index-data/indexing-overview#metadata). A filter is a JSON object whose keys are
field names (each with an operator object, or a bare value meaning ``$eq``) or the logical operators ``$and`` /
``$or`` (each a list of filters); several keys in one object must all hold. Field operators:

* ``$eq`` / ``$ne``: equal / not equal to a string, number or boolean; against a list field, ``$eq`` holds when
  the list contains the value and ``$ne`` when it does not.
* ``$in`` / ``$nin``: the value (or, for a list field, any element) is / is not one of a list of strings or numbers.
* ``$gt`` ``$gte`` ``$lt`` ``$lte``: numeric comparisons; a field that is not a number never matches.
* ``$exists``: the field is present (``true``) or absent (``false``).

A field missing from a vector's metadata fails every operator except ``$ne``, ``$nin`` and ``$exists: false``.
Booleans are never equal to numbers (``true`` is not ``1``), and ``1`` equals ``1.0``.

A filter is compiled once into a predicate, so a query's linear scan pays one closure call per vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FilterError", "Predicate", "compile_filter", "metadata_error"]

#: a compiled filter: takes a vector's metadata (``None`` when it has none)
Predicate = Callable[[Mapping[str, Any] | None], bool]

_FIELD_OPERATORS = frozenset({"$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$exists"})
_MISSING = object()


class FilterError(ValueError):
    """A filter Pinecone would refuse with a 400 (the message says why)."""


def _is_number(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value)
    )


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, bool)) or _is_number(value)


def metadata_error(metadata: object) -> str | None:
    """Why ``metadata`` cannot be stored (``None`` when it can): an object of strings, numbers, booleans and lists
    of strings, never null or nested."""
    if not isinstance(metadata, dict):
        return f"metadata must be an object, not {_json_type(metadata)}"
    for key, value in metadata.items():
        if _is_scalar(value):
            continue
        if isinstance(value, list):
            if all(isinstance(item, str) for item in value):
                continue
            return f"metadata field {key!r} is a list with non-string elements; lists must hold only strings"
        return (
            f"metadata field {key!r} has a value of type {_json_type(value)}; metadata values must be a string, "
            "a number, a boolean or a list of strings"
        )
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _same(stored: object, wanted: object) -> bool:
    """Scalar equality with JSON types kept apart (``True`` is not ``1``)."""
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return isinstance(wanted, bool) and isinstance(stored, bool) and stored is wanted
    if isinstance(wanted, str):
        return isinstance(stored, str) and stored == wanted
    return _is_number(stored) and stored == wanted


class _Members:
    """A ``$in`` / ``$nin`` operand split by JSON type, for set lookups."""

    __slots__ = ("bools", "numbers", "strings")

    def __init__(self, values: list[Any]) -> None:
        self.strings = frozenset(v for v in values if isinstance(v, str))
        self.bools = frozenset(v for v in values if isinstance(v, bool))
        self.numbers = frozenset(v for v in values if _is_number(v))

    def contains(self, stored: object) -> bool:
        if isinstance(stored, str):
            return stored in self.strings
        if isinstance(stored, bool):
            return stored in self.bools
        if _is_number(stored):
            return stored in self.numbers
        if isinstance(stored, list):
            strings = self.strings
            return any(item in strings for item in stored)
        return False


def _operator(field: str, op: str, operand: Any) -> Predicate:
    if op == "$exists":
        if not isinstance(operand, bool):
            raise FilterError(f"$exists on {field!r} takes a boolean, not {_json_type(operand)}")
        want = operand

        def exists(md: Mapping[str, Any] | None) -> bool:
            return (md is not None and field in md) is want

        return exists
    if op in ("$eq", "$ne"):
        if not _is_scalar(operand):
            raise FilterError(f"{op} on {field!r} takes a string, number or boolean, not {_json_type(operand)}")
        negate = op == "$ne"

        def eq(md: Mapping[str, Any] | None) -> bool:
            stored = _MISSING if md is None else md.get(field, _MISSING)
            if stored is _MISSING:
                return negate
            hit = (
                (isinstance(operand, str) and operand in stored) if isinstance(stored, list) else _same(stored, operand)
            )
            return hit is not negate

        return eq
    if op in ("$in", "$nin"):
        if not isinstance(operand, list) or not all(_is_scalar(v) for v in operand):
            raise FilterError(f"{op} on {field!r} takes an array of strings or numbers, not {_json_type(operand)}")
        members = _Members(operand)
        negate = op == "$nin"

        def member(md: Mapping[str, Any] | None) -> bool:
            stored = _MISSING if md is None else md.get(field, _MISSING)
            if stored is _MISSING:
                return negate
            return members.contains(stored) is not negate

        return member
    # $gt $gte $lt $lte
    if not _is_number(operand):
        raise FilterError(f"{op} on {field!r} takes a number, not {_json_type(operand)}")
    bound = float(operand)
    compare: Callable[[float], bool]
    if op == "$gt":
        compare = bound.__lt__
    elif op == "$gte":
        compare = bound.__le__
    elif op == "$lt":
        compare = bound.__gt__
    else:
        compare = bound.__ge__

    def ordered(md: Mapping[str, Any] | None) -> bool:
        stored = None if md is None else md.get(field)
        return isinstance(stored, (int, float)) and not isinstance(stored, bool) and compare(stored)

    return ordered


def _all(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]

    def every(md: Mapping[str, Any] | None) -> bool:
        return all(p(md) for p in predicates)

    return every


def _field(field: str, condition: Any) -> Predicate:
    if isinstance(condition, dict):
        if not condition:
            raise FilterError(f"the condition on {field!r} is an empty object")
        parts = []
        for op, operand in condition.items():
            if op not in _FIELD_OPERATORS:
                if op.startswith("$"):
                    raise FilterError(f"{op} is not a valid operator")
                raise FilterError(f"the condition on {field!r} is a nested object; metadata is not nested")
            parts.append(_operator(field, op, operand))
        return _all(parts)
    if _is_scalar(condition):
        return _operator(field, "$eq", condition)
    raise FilterError(f"the condition on {field!r} must be an operator object or a string, number or boolean")


def compile_filter(spec: Any) -> Predicate:
    """Compile a Pinecone metadata filter into a predicate, or raise :class:`FilterError`."""
    if not isinstance(spec, dict):
        raise FilterError(f"a filter must be an object, not {_json_type(spec)}")
    parts: list[Predicate] = []
    for key, value in spec.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise FilterError(f"{key} takes a non-empty array of filters")
            subs = [compile_filter(item) for item in value]
            if key == "$and":
                parts.append(_all(subs))
            else:

                def either(md: Mapping[str, Any] | None, subs: list[Predicate] = subs) -> bool:
                    return any(p(md) for p in subs)

                parts.append(either)
        elif key.startswith("$"):
            raise FilterError(f"{key} is not a valid operator")
        else:
            parts.append(_field(key, value))
    if not parts:
        return lambda md: True
    return _all(parts)
