"""Security properties that need no Redis (the Redis ones are in ``tests/with_redis/test_redis_security.py``).

- No deserialiser that can run code (pickle and its relatives) anywhere in the package source.
- The Lua scripts sent to Redis are module constants, passed to Redis by ``EVALSHA`` with every variable part
  in ``KEYS``/``ARGV``: no Python formatting builds or alters script text, and no script builds a key name.
- Hostile cache namespaces and scopes (glob characters, separators, newlines, unicode, 10 kB) never address
  another cache's entries, for reads or invalidation, in the in-memory store.
- Guarded OpenAI clients with different API keys never share cached answers (in-memory backend).
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pydantic
import pytest
from openai import AsyncOpenAI

import ragguard
from ragguard.guards.cache import Cache, MemoryCacheStore

PACKAGE = Path(ragguard.__file__).resolve().parent

# --- no pickle -------------------------------------------------------------------------------------------------

#: modules whose loading of data can run code (or, for marshal, crash the interpreter on crafted input)
UNSAFE_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle", "joblib", "pickletools"}
)


def unsafe_uses(source: str) -> list[str]:
    """Where ``source`` names a code-running deserialiser: ``import``/``from`` of one, a name or attribute
    spelled like one (``pickle.loads``, ``marshal.loads``), or a string naming one (``import_module("dill")``).

    Tokens, not text: docstrings and comments may say "never pickle"; code may not mention it at all.
    """
    found: list[str] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        text = None
        if token.type == tokenize.NAME and token.string in UNSAFE_MODULES:
            text = token.string
        elif token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):  # an f-string part or a bytes literal: not a module name
                continue
            if isinstance(value, str) and value.split(".")[0] in UNSAFE_MODULES:
                text = value
        if text is not None:
            found.append(f"line {token.start[0]}: {token.line.strip()}")
    return found


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scanner_finds_each_way_of_reaching_pickle() -> None:
    planted = [
        "import pickle",
        "import cPickle as p",
        "from pickle import loads",
        "x = pickle.loads(b'')",
        "import cloudpickle",
        "import dill",
        "marshal.loads(data)",
        "import shelve",
        "importlib.import_module('dill')",
        '__import__("pickle")',
        "importlib.import_module('pickle.something')",
    ]
    for line in planted:
        assert unsafe_uses(line + "\n"), line
    innocent = '"""Values are JSON: never pickle, never dill."""\n# pickle would be unsafe\nx = "pickled cucumber"\n'
    assert unsafe_uses(innocent) == []


def test_no_code_running_deserialiser_anywhere_in_the_package() -> None:
    sources = package_sources()
    names = {path.relative_to(PACKAGE).as_posix() for path in sources}
    # the scan really covers the package: the cache and every Redis store among many modules
    assert len(sources) >= 30
    assert {"guards/cache.py", "backends/_redis_cache.py", "backends/redis.py", "providers/openai.py"} <= names
    offenders = {
        path.relative_to(PACKAGE).as_posix(): uses for path in sources if (uses := unsafe_uses(path.read_text()))
    }
    assert offenders == {}


# --- Redis scripts: constants, run with KEYS and ARGV ----------------------------------------------------------

SCRIPT_MODULES = ("_redis_bucket", "_redis_breaker", "_redis_budget", "_redis_cache")


def script_module(name: str) -> ModuleType:
    return importlib.import_module(f"ragguard.backends.{name}")


def lua_constants(module: ModuleType) -> dict[str, str]:
    """The module's Lua sources: its module-level strings that call Redis."""
    return {name: value for name, value in vars(module).items() if isinstance(value, str) and "redis.call(" in value}


def all_lua_names() -> set[str]:
    return {name for module in SCRIPT_MODULES for name in lua_constants(script_module(module))}


def parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def enclosing_function(node: ast.AST, up: dict[ast.AST, ast.AST]) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    while node in up:
        node = up[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def is_literal_text(node: ast.AST, constants: set[str]) -> bool:
    """A string literal, a module-level Lua constant, or ``+`` of those: text fixed at import time."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name):
        return node.id in constants
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return is_literal_text(node.left, constants) and is_literal_text(node.right, constants)
    return False


@pytest.mark.parametrize("name", SCRIPT_MODULES)
def test_lua_sources_are_module_constants_never_formatted(name: str) -> None:
    module = script_module(name)
    path = Path(module.__file__ or "")
    tree = ast.parse(path.read_text())
    up = parents(tree)
    constants = lua_constants(module)
    if name != "_redis_cache":  # the cache store runs plain commands (GET, SET, UNLINK, SCAN), no script
        assert constants, f"{name} has no Lua constant: the test no longer sees its scripts"
    # each constant is literal text (or literal text joined with another constant) assigned at module level
    assigned: set[str] = set()
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name) and target.id in constants:
                    assert is_literal_text(statement.value, set(constants)), f"{target.id} is computed"
                    assigned.add(target.id)
    assert assigned == set(constants)
    for node in ast.walk(tree):
        # no Lua inside a function (built at run time), nor in an f-string anywhere
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "redis.call(" in node.value:
            assert enclosing_function(node, up) is None, f"Lua text inside a function at line {node.lineno}"
            assert not isinstance(up.get(node), ast.JoinedStr), f"Lua in an f-string at line {node.lineno}"
        # inside functions a constant is only ever passed as an argument: never formatted, sliced, joined
        if isinstance(node, ast.Name) and node.id in constants and enclosing_function(node, up) is not None:
            parent = up[node]
            misuse = f"{node.id} used as {type(parent).__name__} at line {node.lineno}, not passed as an argument"
            assert isinstance(parent, ast.Call), misuse
            assert node in parent.args, misuse


def _calls(tree: ast.AST, attr: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            yield node


def _param_index(function: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> int | None:
    names = [arg.arg for arg in (*function.args.posonlyargs, *function.args.args)]
    return names.index(name) if name in names else None


def test_every_script_run_in_the_package_is_a_lua_constant() -> None:
    """Follows each ``register_script``/``script`` call in ``src`` back to a module constant (through at most one
    forwarding parameter, e.g. ``_run(self, source, ...)``); ``EVALSHA`` only ever sends a registered script's
    ``sha``, and nothing calls ``EVAL`` with text of its own."""
    lua = all_lua_names()
    assert {"BUCKET_SCRIPT", "BUDGET_SCRIPT"} <= lua
    seen = 0
    for path in package_sources():
        tree = ast.parse(path.read_text())
        up = parents(tree)
        where = path.relative_to(PACKAGE).as_posix()
        assert not list(_calls(tree, "eval")), f"{where}: EVAL with a script body"
        for call in _calls(tree, "evalsha"):
            first = call.args[0] if call.args else None
            assert isinstance(first, ast.Attribute), f"{where}:{call.lineno}"
            assert first.attr == "sha", f"{where}:{call.lineno}"
        for call in [*_calls(tree, "script"), *_calls(tree, "register_script")]:
            seen += 1
            source = call.args[0] if call.args else None
            assert isinstance(source, ast.Name), f"{where}:{call.lineno}: the script is an expression"
            if source.id in lua:
                continue
            function = enclosing_function(call, up)
            assert function is not None, f"{where}:{call.lineno}"
            index = _param_index(function, source.id)
            assert index is not None, f"{where}:{call.lineno}: {source.id} is neither a constant nor a parameter"
            if function.name == "script" and where == "backends/redis.py":
                continue  # RedisBackend.script: its callers are the `.script(...)` calls checked here
            forwarded = list(_calls(tree, function.name))
            assert forwarded, f"{where}: {function.name} is never called"
            for outer in forwarded:
                given = outer.args[index - 1] if len(outer.args) >= index else None  # ``self`` is not passed
                assert isinstance(given, ast.Name), f"{where}:{outer.lineno}"
                assert given.id in lua, f"{where}:{outer.lineno}"
    assert seen >= 4  # the bucket, breaker and budget stores, and the backend's registration


#: ``redis.call('CMD', first_argument`` in Lua
_REDIS_CALL = re.compile(r"redis\.p?call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?")


@pytest.mark.parametrize("name", ["_redis_bucket", "_redis_breaker", "_redis_budget"])
def test_lua_scripts_address_only_the_keys_they_are_given(name: str) -> None:
    """Every key a script touches comes from ``KEYS`` (directly, ``unpack(KEYS, …)``, or a local bound to a
    ``KEYS`` entry): a script never builds a key name from an argument, so a hostile name cannot reach another
    key, and Redis Cluster routes every script to the slot of its keys."""
    for constant, source in lua_constants(script_module(name)).items():
        key_locals = set(re.findall(r"local (\w+) = KEYS\[", source))
        calls = _REDIS_CALL.findall(source)
        assert calls
        for command, first in calls:
            if command.upper() == "TIME":
                continue
            first = first.strip()
            assert first.startswith(("KEYS[", "unpack(KEYS")) or first in key_locals, (
                f"{constant}: redis.call('{command}', {first}, ...) addresses a key not taken from KEYS"
            )


# --- hostile cache namespaces and scopes (in-memory store) -----------------------------------------------------

HOSTILE = [
    "app*",
    "app:",
    "ap",
    "app?",
    "ap[p]",
    "app[a-z]",
    "{app}",
    "app}",
    "a:pp",
    "app:-",
    "app\n",
    "app with spaces",
    "äpp✓ 🚀",
    "app\\*",
    "app%3A",
    "-",
    "*",
    "a" * 10_240,
]


def hostile_caches(store: Any) -> tuple[Cache, list[Cache]]:
    """``Cache(namespace="app")`` and caches whose namespace or scope is hostile, all over ``store``."""
    base = Cache(store=store, namespace="app")
    others = [Cache(store=store, namespace=text) for text in HOSTILE]
    others += [Cache(store=store, namespace="app", scope=text) for text in HOSTILE]
    return base, others


async def fill(caches: list[Cache], start: int = 0) -> None:
    """Store ``start + i`` in cache ``i`` under a raw key (``"k"``, prefixed by the cache) and a hashed one."""
    for i, cache in enumerate(caches, start):
        assert await cache.set("k", i)
        assert await cache.set(cache.key_for(None, "question"), i)


async def contents(caches: list[Cache]) -> list[tuple[Any, Any]]:
    return [(await cache.get("k"), await cache.get(cache.key_for(None, "question"))) for cache in caches]


@pytest.mark.anyio
async def test_hostile_namespaces_and_scopes_never_read_or_invalidate_each_other_in_memory() -> None:
    store = MemoryCacheStore()
    base, others = hostile_caches(store)
    caches = [base, *others]
    await fill(caches)
    assert await contents(caches) == [(i, i) for i in range(len(caches))]
    for victim in range(len(caches)):
        assert await caches[victim].ainvalidate() == 2
        expected = [(None, None) if i == victim else (i, i) for i in range(len(caches))]
        assert await contents(caches) == expected
        await fill([caches[victim]], victim)  # the same keys as before: restore for the next round
        assert len(store) == 2 * len(caches)


@pytest.mark.anyio
@pytest.mark.parametrize("prefix", ["*", "?", "[", "k*", "%", ":", "-", "\n", ""])
async def test_an_invalidation_prefix_is_literal_text_in_memory(prefix: str) -> None:
    store = MemoryCacheStore()
    base, others = hostile_caches(store)
    await fill([base, *others])
    removed = await base.ainvalidate(prefix)
    # only base's entries starting with `prefix`: "" removes both, "k*" none (no key starts with it literally)
    expected = sum(key.startswith(prefix) for key in ("k", base.key_for(None, "question").split(":")[-1]))
    assert removed == expected
    assert await contents(others) == [(i, i) for i in range(1, len(others) + 1)]


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("namespace", ""),
        ("namespace", "a\ud800"),
        ("scope", "a\ud800"),
    ],
    ids=["empty-namespace", "surrogate-namespace", "surrogate-scope"],
)
def test_namespaces_and_scopes_that_cannot_be_keys_are_refused(field: str, text: str) -> None:
    """A text that cannot be encoded as UTF-8 (a lone surrogate, e.g. from JSON's ``"\\ud800"``) cannot be a
    Redis key or a hashed key part: refused when the cache is made, naming the field."""
    options: dict[str, Any] = {field: text}
    with pytest.raises(pydantic.ValidationError, match=field):
        Cache(**options)


# --- two API keys never share answers (in-memory backend) --------------------------------------------------------


@pytest.mark.openai
@pytest.mark.anyio
async def test_two_api_keys_with_the_same_prompt_never_share_a_cached_answer_in_memory() -> None:
    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    chat: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "the same prompt for two tenants"}],
        "temperature": 0,
        "max_tokens": 8,
    }
    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        backend = ragguard.MemoryBackend()  # one backend: one cache store shared by both clients
        first, second = (
            ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key=key), backend=backend)
            for key in ("sk-tenant-one-0000000000", "sk-tenant-two-1111111111")
        )
        try:
            await first.chat.completions.create(**chat)
            await first.embeddings.create(model="text-embedding-3-small", input="shared text")
            assert served.stats().requests_total == 2
            await second.chat.completions.create(**chat)
            await second.embeddings.create(model="text-embedding-3-small", input="shared text")
            assert served.stats().requests_total == 4  # the second key went upstream for both
            await first.chat.completions.create(**chat)
            await second.embeddings.create(model="text-embedding-3-small", input="shared text")
            assert served.stats().requests_total == 4  # each key's own entries are hits
        finally:
            await first.close()
            await second.close()


@pytest.mark.openai
@pytest.mark.anyio
async def test_a_tenant_scope_that_cannot_be_a_key_never_fails_a_guarded_call() -> None:
    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    with serve(OpenAISimulator(SimulatorConfig.instant(rpm=None, tpm=None))) as served:
        client = ragguard.guard(AsyncOpenAI(base_url=served.base_url, api_key="sk-tenant-0000000000"))
        try:
            with ragguard.call_options(scope="tenant-\ud800"):  # what json.loads makes of "tenant-\\ud800"
                chat = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=4
                )
                assert chat.choices
                embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
                assert embedding.data
        finally:
            await client.close()
