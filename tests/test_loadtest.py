"""``ragguard loadtest`` at small scale: the user's own functions (``tests/_loadtest_app.py``) against the simulators
on loopback, through the real openai and pinecone SDKs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from ragguard.cli import main
from ragguard.cli.loadtest import LoadtestOptions, load_target
from ragguard.errors import ConfigError

pytestmark = pytest.mark.openai

APP = Path(__file__).with_name("_loadtest_app.py")


def run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "loadtest.json"
    code = main(["loadtest", *argv, "--no-progress", "--json", str(out)])
    assert code == 0
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_unguarded_and_guarded_code_under_the_same_quota(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1,200 RPM holds 20 requests at once: 40 users overrun an unguarded client, a guarded one paces them
    data = run(tmp_path, "_loadtest_app:unguarded", "_loadtest_app:guarded", "--users", "40", "--rpm", "1200")
    unguarded, guarded = data["targets"]
    assert [unguarded["target"], guarded["target"]] == ["_loadtest_app:unguarded", "_loadtest_app:guarded"]
    assert unguarded["calls"] == guarded["calls"] == 40
    assert unguarded["failed"] > 0
    assert unguarded["errors"] == {"RateLimitError": unguarded["failed"]}
    assert unguarded["upstream_429"] == unguarded["failed"]  # max_retries=0: one 429 per failed call
    assert unguarded["succeeded"] + unguarded["failed"] == 40
    # each target is measured on a fresh quota: the guarded client's figures do not include the first run's
    assert guarded["succeeded"] == 40
    assert guarded["errors"] == {}
    assert guarded["upstream_requests"] == 40
    assert guarded["upstream_429"] == 0
    assert guarded["theoretical_min_s"] == pytest.approx(1.0, abs=0.05)  # (40 - 20) / 20 per second
    assert guarded["wall_s"] >= guarded["theoretical_min_s"]
    assert 0 < guarded["p50_s"] <= guarded["p95_s"] <= guarded["p99_s"] <= guarded["wall_s"]
    assert (data["rpm"], data["users"], data["calls_per_user"], data["pinecone"]) == (1200, 40, 1, False)
    printed = capsys.readouterr().out
    assert "_loadtest_app:guarded" in printed
    assert "RateLimitError ×" in printed


def test_plain_functions_run_in_threads_and_failures_count_by_type(tmp_path: Path) -> None:
    # a file path works as well as a module name
    [result] = run(tmp_path, f"{APP}:sync_embed", "--users", "8", "--calls-per-user", "2")["targets"]
    assert result["calls"] == 16
    assert result["failed"] == 4  # users 3 and 7, twice each
    assert result["errors"] == {"ValueError": 4}
    assert result["succeeded"] == 12
    assert result["upstream_requests"] == 12


def test_the_environment_points_at_the_simulators_before_import_and_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a-real-key-must-never-be-used")
    monkeypatch.delenv("PINECONE_HOST", raising=False)
    run(tmp_path, "_loadtest_app:tick", "--users", "2")
    app = sys.modules["_loadtest_app"]
    assert app.SEEN["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    assert app.SEEN["OPENAI_API_KEY"] != "sk-a-real-key-must-never-be-used"
    assert app.SEEN["PINECONE_HOST"] is None  # no --pinecone
    assert os.environ["OPENAI_BASE_URL"] == "https://api.openai.com/v1"
    assert os.environ["OPENAI_API_KEY"] == "sk-a-real-key-must-never-be-used"
    # a module imported before is executed again, so its module-level state sees the new simulators
    app.SEEN.clear()
    run(tmp_path, "_loadtest_app:tick", "--users", "2")
    assert app.SEEN["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_duration_keeps_users_calling_until_it_ends(tmp_path: Path, backend: str) -> None:
    data = run(tmp_path, "_loadtest_app:tick", "--users", "5", "--duration", "0.3", "--backend", backend)
    [result] = data["targets"]
    assert data["calls_per_user"] is None
    assert result["calls"] > 5  # each user called again and again
    assert result["failed"] == 0
    assert result["upstream_requests"] == 0
    # with a call count too, whichever ends first
    [capped] = run(tmp_path, "_loadtest_app:tick", "--users", "5", "--calls-per-user", "2", "--duration", "30")[
        "targets"
    ]
    assert capped["calls"] == 10


def test_a_call_past_the_call_timeout_fails_with_timeout_error(tmp_path: Path) -> None:
    [result] = run(tmp_path, "_loadtest_app:stall", "--users", "3", "--call-timeout", "0.2")["targets"]
    assert result["errors"] == {"TimeoutError": 3}
    assert result["succeeded"] == 0


@pytest.mark.pinecone
def test_pinecone_index_with_a_setup_that_is_not_measured(tmp_path: Path) -> None:
    data = run(
        tmp_path,
        "_loadtest_app:search",
        "--pinecone",
        "--dimension",
        "8",
        "--setup",
        "_loadtest_app:ingest",
        "--users",
        "10",
    )
    [result] = data["targets"]
    assert data["pinecone"] is True
    assert result["errors"] == {}  # every query found the vectors the setup stored
    assert result["succeeded"] == 10
    assert result["index_requests"] == 10  # the queries only: the setup's upsert was not counted
    assert result["index_429"] == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_for_ragguard:fn", "ModuleNotFoundError"),
        ("_loadtest_app:no_such_function", "AttributeError"),
        ("_loadtest_app:NOT_CALLABLE", "not a function"),
    ],
)
def test_a_target_that_cannot_be_loaded_is_a_config_error(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"cannot load {target}: .*{message}"):
        load_target(target)


def test_the_command_reports_a_target_it_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "_loadtest_app:tick", "_loadtest_app:no_such_function", "--no-progress"]) == 2
    assert "cannot load _loadtest_app:no_such_function: AttributeError" in capsys.readouterr().out


def test_invalid_options_name_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "_loadtest_app:tick", "--users", "0"]) == 2
    assert "users" in capsys.readouterr().err
    assert main(["loadtest", "no_colon_here"]) == 2
    assert "package.module:function" in capsys.readouterr().err
    with pytest.raises(ValueError, match="calls_per_user"):
        LoadtestOptions(targets=("a:b",), calls_per_user=0)


def test_without_the_simulators_packages_the_commands_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: imports and lookups fail
    assert main(["loadtest", "_loadtest_app:tick", "--no-progress"]) == 2
    assert "pip install 'ragguard[testing]'" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "openai", None)
    assert main(["demo", "--users", "1"]) == 2
    out = capsys.readouterr().out
    assert "needs openai, uvicorn" in out
    assert "pip install 'ragguard[cli]'" in out
