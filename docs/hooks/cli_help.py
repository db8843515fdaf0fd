"""An mkdocs hook: ``<!-- ragguard-cli-help -->`` in a page becomes the ``--help`` text of ``ragguard`` and of each
of its subcommands, taken from :func:`ragguard.cli.build_parser` at build time, so the reference never drifts
from the code (a new subcommand appears by itself).

``render_cli_help()`` is also what ``tests/test_docs.py`` checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

MARKER = "<!-- ragguard-cli-help -->"
#: the width the help is wrapped to (argparse reads it from $COLUMNS, minus 2)
WIDTH = 76


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width + 2)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands, by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_texts() -> dict[str, str]:
    """``{"ragguard": top-level help, "ragguard demo": ..., ...}``, wrapped to :data:`WIDTH` columns."""
    from ragguard.cli import build_parser

    with _columns(WIDTH):
        parser = build_parser()
        texts = {"ragguard": parser.format_help()}
        for name, sub in subcommands(parser).items():
            texts[f"ragguard {name}"] = sub.format_help()
    return texts


def render_cli_help() -> str:
    """The Markdown that replaces :data:`MARKER`: one section per command, its help in a ``text`` block."""
    sections = []
    for command, text in help_texts().items():
        sections.append(f"## `{command}`\n\n```text\n$ {command} --help\n{text.rstrip()}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render_cli_help())
    return markdown
