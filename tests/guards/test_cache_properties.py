"""Property tests of the response cache: keys never cross scopes, and the in-memory store is a bounded LRU.

* ``cache_key`` is injective: differing (namespace, scope, credential, parts) give differing keys, dict order
  never matters, and a :func:`fingerprint`-ed credential never appears in a key in clear.
* Caches of several namespaces and scopes sharing one store, driven by random ``set``/``get``/``invalidate``
  sequences (raw keys, and :meth:`Cache.key_for` keys of any of the caches), behave like one dictionary per
  (namespace, scope): a ``get`` never returns a value stored under another scope, namespace or key.
* :class:`MemoryCacheStore` under random ``set``/``get``/``delete``/``delete_prefix``/``clear`` sequences with
  random sizes and TTLs on a :class:`ManualClock` matches a reference model (an ``OrderedDict`` in recency
  order): same values, same entries in the same LRU order (so evictions take the least recently used entries),
  same counters, and never more than ``max_entries`` entries or ``max_bytes`` bytes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ragguard import ManualClock
from ragguard.guards.cache import Cache, MemoryCacheStore, _prefix, cache_key, fingerprint

# --- cache_key -------------------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)  # no lone surrogates (not UTF-8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
key_args = st.tuples(
    st.sampled_from(["ragguard", "emb", "a:b"]),  # namespace
    st.one_of(st.none(), text),  # scope
    st.one_of(st.none(), text),  # credential (fingerprint)
    st.lists(json_values, max_size=3),  # parts
)


def tagged(value: Any) -> Any:
    """``value`` with its JSON type made explicit, so ``1``, ``1.0`` and ``True`` (equal in Python) differ."""
    if isinstance(value, bool) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))  # repr keeps 0.0 and -0.0 apart, as JSON does
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(tagged(v) for v in value))
    return ("dict", tuple(sorted((k, tagged(v)) for k, v in value.items())))


def reordered(value: Any) -> Any:
    """The same value with every dict's keys in reverse insertion order."""
    if isinstance(value, list):
        return [reordered(v) for v in value]
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    return value


@settings(max_examples=300, deadline=None)
@given(first=key_args, second=key_args)
def test_cache_key_is_injective_and_ignores_dict_order(
    first: tuple[str, str | None, str | None, list[Any]], second: tuple[str, str | None, str | None, list[Any]]
) -> None:
    ns, scope, cred, parts = first
    key = cache_key(ns, scope, cred, *parts)
    escaped = [p.replace("%", "%25").replace(":", "%3A") for p in (ns, scope or "")]
    shown = "-" if scope is None else ("%2D" if escaped[1] == "-" else escaped[1])
    assert key.startswith(f"{'%2D' if escaped[0] == '-' else escaped[0]}:{shown}:")
    assert key == cache_key(ns, scope, cred, *reordered(parts))
    same = (ns, scope, cred, tagged(parts)) == (second[0], second[1], second[2], tagged(second[3]))
    assert (key == cache_key(second[0], second[1], second[2], *second[3])) == same


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(st.characters(exclude_categories=["Cs"]), min_size=4, max_size=40).map(lambda s: "sk-" + s),
    other=st.text(max_size=5),
    args=key_args,
)
def test_a_fingerprinted_credential_never_appears_in_a_key(
    secret: str, other: str, args: tuple[str, str | None, str | None, list[Any]]
) -> None:
    ns, scope, _, parts = args
    fp = fingerprint(secret)
    assert len(fp) == 16
    assert secret not in fp
    for key in (cache_key(ns, scope, fp, secret, *parts), Cache(namespace=ns, scope=scope).key_for(fp, secret)):
        # the key holds the namespace and scope in clear, the rest is a hex digest
        assert secret not in key.removeprefix(_prefix(ns, scope))
        if secret not in _prefix(ns, scope):
            assert secret not in key
    if other != secret:
        assert cache_key(ns, scope, fingerprint(other), *parts) != cache_key(ns, scope, fp, *parts)


# --- caches of several scopes sharing a store ------------------------------------------------------------------

#: namespaces and scopes without the separator ":" and other than the placeholder "-" of no scope
PLAIN_NAMESPACES = ["ragguard", "emb"]
PLAIN_SCOPES: list[str | None] = [None, "t", "t1", "t-1", "T1"]
#: ... and with them (the prefix escapes them)
TRICKY_NAMESPACES = [*PLAIN_NAMESPACES, "emb:t"]
TRICKY_SCOPES: list[str | None] = [*PLAIN_SCOPES, "-", "t:x", "t1:"]


@dataclass(frozen=True)
class KeyFor:
    """A :meth:`Cache.key_for` key of cache ``cache`` (possibly used on another cache)."""

    cache: int
    credential: str | None
    part: str


@dataclass(frozen=True)
class Forged:
    """A raw key written with the full prefix of cache ``cache`` (possibly used on another cache)."""

    cache: int
    rest: str


#: few raw keys, so that reads often meet earlier writes; some look like a namespace or scope and a separator
RAW_KEYS = ["k", "q", "t:k", "t1:k", "-:k", "x:", "emb:t:k", "ragguard:-:k"]


@st.composite
def shared_store_runs(
    draw: st.DrawFn, namespaces: list[str], scopes: list[str | None]
) -> tuple[list[tuple[str, str | None]], list[tuple[Any, ...]]]:
    """Caches (namespace, scope) and operations on them, over a small pool of keys so reads meet writes."""
    caches = draw(
        st.lists(st.tuples(st.sampled_from(namespaces), st.sampled_from(scopes)), min_size=2, max_size=4, unique=True)
    )
    cache = st.integers(0, len(caches) - 1)
    raw = st.sampled_from(RAW_KEYS)
    key_spec = st.one_of(
        raw,
        st.builds(Forged, cache, raw),
        st.builds(KeyFor, cache, st.sampled_from([None, "fp1"]), st.sampled_from(["q", "r"])),
    )
    pool = draw(st.lists(key_spec, min_size=1, max_size=5))
    key = st.sampled_from(pool)
    kinds: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
        "set": st.tuples(st.just("set"), cache, key),
        "get": st.tuples(st.just("get"), cache, key),
        "invalidate": st.tuples(st.just("invalidate"), cache, st.sampled_from(["", "t", "k", "t1:", "-"])),
    }
    kind = st.sampled_from(["set"] * 4 + ["get"] * 5 + ["invalidate"])
    return caches, draw(st.lists(kind.flatmap(lambda k: kinds[k]), max_size=40))


def run_shared_store(caches: list[tuple[str, str | None]], ops: list[tuple[Any, ...]]) -> None:
    clock = ManualClock()
    store = MemoryCacheStore(max_entries=10_000, clock=clock)
    guards = [Cache(namespace=ns, scope=scope, ttl=None, store=store, clock=clock) for ns, scope in caches]
    # the model: one dictionary per (namespace, scope), keyed by the key without the cache's own prefix
    model: dict[tuple[str, str | None], dict[str, int]] = {pair: {} for pair in caches}

    def resolve(key: str | KeyFor | Forged) -> str:
        if isinstance(key, KeyFor):
            return guards[key.cache].key_for(key.credential, key.part)
        if isinstance(key, Forged):
            ns, scope = caches[key.cache]
            return _prefix(ns, scope) + key.rest
        return key

    def logical(c: int, key: str) -> str:
        ns, scope = caches[c]
        return key.removeprefix(_prefix(ns, scope))

    async def main() -> None:
        for n, (op, c, arg) in enumerate(ops):
            entries = model[caches[c]]
            if op == "set":
                key = resolve(arg)
                assert await guards[c].set(key, n)
                entries[logical(c, key)] = n
            elif op == "get":
                key = resolve(arg)
                assert await guards[c].get(key) == entries.get(logical(c, key)), f"{caches[c]} read {key!r}"
            else:
                removed = [k for k in entries if k.startswith(logical(c, arg))]
                assert guards[c].invalidate(arg) == len(removed), f"{caches[c]} invalidated {arg!r}"
                for k in removed:
                    del entries[k]
        assert len(store) == sum(len(entries) for entries in model.values())

    anyio.run(main)


@settings(max_examples=200, deadline=None)
@given(run=shared_store_runs(PLAIN_NAMESPACES, PLAIN_SCOPES))
def test_caches_sharing_a_store_never_read_another_scopes_entry(
    run: tuple[list[tuple[str, str | None]], list[tuple[Any, ...]]],
) -> None:
    run_shared_store(*run)


# was a bug (prefixes were ambiguous); parts are now percent-escaped
@settings(max_examples=200, deadline=None)
@given(run=shared_store_runs(TRICKY_NAMESPACES, TRICKY_SCOPES))
@example(run=([("ragguard", None), ("ragguard", "-")], [("set", 0, "k"), ("get", 1, "k")]))
def test_caches_sharing_a_store_never_read_another_scopes_entry_with_separators_in_scopes(
    run: tuple[list[tuple[str, str | None]], list[tuple[Any, ...]]],
) -> None:
    run_shared_store(*run)


# --- the store: a bounded LRU with TTLs ------------------------------------------------------------------------


class ModelStore:
    """The reference: an OrderedDict in recency order (least recent first) of key -> (value, expiry)."""

    def __init__(self, max_entries: int, max_bytes: int, clock: ManualClock) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.hits = self.misses = self.evictions = self.expirations = 0

    @property
    def bytes(self) -> int:
        return sum(len(value) for value, _ in self.data.values())

    def get(self, key: str) -> bytes | None:
        entry = self.data.get(key)
        if entry is None or entry[1] <= self.clock.now():
            if entry is not None:  # expired: dropped when read
                del self.data[key]
                self.expirations += 1
            self.misses += 1
            return None
        self.data.move_to_end(key)
        self.hits += 1
        return entry[0]

    def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        self.data.pop(key, None)
        if len(value) > self.max_bytes:
            return False  # never stored, and the older value is gone
        # evict least recently used entries until the new one fits both bounds
        while self.data and (len(self.data) + 1 > self.max_entries or self.bytes + len(value) > self.max_bytes):
            _, (_, expiry) = self.data.popitem(last=False)
            if expiry <= self.clock.now():
                self.expirations += 1
            else:
                self.evictions += 1
        self.data[key] = (value, math.inf if ttl is None else self.clock.now() + ttl)
        return True

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def delete_prefix(self, prefix: str) -> int:
        doomed = [key for key in self.data if key.startswith(prefix)]
        for key in doomed:
            del self.data[key]
        return len(doomed)

    def clear(self) -> None:
        self.data.clear()
        self.hits = self.misses = self.evictions = self.expirations = 0


store_keys = st.sampled_from(["a0", "a1", "a2", "b0", "b1", "c"])
op_kinds: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "set": st.tuples(st.just("set"), store_keys, st.integers(0, 9), st.sampled_from([None, None, None, 0.0, 1.0, 2.5])),
    "get": st.tuples(st.just("get"), store_keys),
    "delete": st.tuples(st.just("delete"), store_keys),
    "advance": st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0])),
    "delete_prefix": st.tuples(st.just("delete_prefix"), st.sampled_from(["a", "b1", "x"])),
    "clear": st.tuples(st.just("clear")),
}
#: mostly sets and gets
store_ops = st.lists(
    st.sampled_from(["set"] * 6 + ["get"] * 6 + ["delete", "advance", "delete_prefix", "clear"]).flatmap(
        lambda kind: op_kinds[kind]
    ),
    min_size=5,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(max_entries=st.integers(1, 5), max_bytes=st.integers(1, 40), ops=store_ops)
def test_memory_store_is_a_bounded_lru_matching_the_model(
    max_entries: int, max_bytes: int, ops: list[tuple[Any, ...]]
) -> None:
    clock = ManualClock()
    store = MemoryCacheStore(max_entries, max_bytes, clock=clock)
    model = ModelStore(max_entries, max_bytes, clock)
    for n, (op, *args) in enumerate(ops):
        if op == "set":
            key, size, ttl = args
            value = (f"{n}." * size).encode()[:size]  # tells the sets apart (above 2 bytes)
            assert store.set(key, value, ttl) == model.set(key, value, ttl)
        elif op == "get":
            assert store.get(args[0]) == model.get(args[0])
        elif op == "delete":
            assert store.delete(args[0]) == model.delete(args[0])
        elif op == "delete_prefix":
            assert store.delete_prefix(args[0]) == model.delete_prefix(args[0])
        elif op == "advance":
            clock.advance(args[0])
        else:
            store.clear()
            model.clear()
        # the bounds, and the same entries in the same recency order: evictions took the least recently used
        assert len(store) <= max_entries
        assert store.bytes <= max_bytes
        assert store.bytes == model.bytes
        assert list(store._data.items()) == list(model.data.items())
        assert (store.hits, store.misses, store.evictions, store.expirations) == (
            model.hits,
            model.misses,
            model.evictions,
            model.expirations,
        )
