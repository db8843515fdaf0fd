"""Token estimation: offline always, exact when tiktoken's files are already cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import ragguard
from ragguard._tokens import _ENCODINGS, estimate_chat_tokens, estimate_text_tokens


def test_heuristic_is_four_characters_per_token_rounded_up() -> None:
    assert ragguard.heuristic_estimator("") == 0
    assert ragguard.heuristic_estimator("a") == 1
    assert ragguard.heuristic_estimator("abcd") == 1
    assert ragguard.heuristic_estimator("abcde") == 2
    assert estimate_text_tokens(["abcd", "abcdefgh", [1, 2, 3]]) == 1 + 2 + 3


def test_chat_estimate_counts_message_framing() -> None:
    messages = [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": [{"type": "text", "text": "ab"}]}]
    assert estimate_chat_tokens(messages) == 3 + (3 + 1) + (3 + 1)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken_load = pytest.importorskip("tiktoken.load")

    def refuse(*_: object, **__: object) -> bytes:
        raise AssertionError("tried to download a tokenizer file")

    monkeypatch.setattr(tiktoken_load, "read_file", refuse)


@pytest.mark.usefixtures("no_network")
def test_tiktoken_is_not_used_unless_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert ragguard.tiktoken_estimator("o200k_base") is None
    assert ragguard.tiktoken_estimator("no-such-encoding") is None


@pytest.mark.usefixtures("no_network")
def test_a_corrupt_cache_file_is_refused_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url, _ = _ENCODINGS["cl100k_base"]
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not an encoding")
    assert ragguard.tiktoken_estimator("cl100k_base") is None


def test_default_estimator_always_works_offline() -> None:
    estimator = ragguard.default_estimator()
    assert estimator("hello world") >= 1
