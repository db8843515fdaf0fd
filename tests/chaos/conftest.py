"""Fixtures and tiers of the chaos suite.

The fast tier (default) keeps each fault's load small enough for CI; ``pytest tests/chaos --long`` scales every
test up (see the ``long_tier`` fixture in tests/conftest.py) and lifts the per-test timeout to fit minutes of load.
At the end of a session the figures of every provider-fault run are printed (calls, outcomes, faults injected,
leaks found, duration).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ragguard.testing import OpenAISimulator, Served, SimulatorConfig, serve

from ._harness import CALM, SUMMARIES

#: per-test timeout of the long tier, seconds (pyproject's 120 s is the fast tier's)
LONG_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--long"):
        return
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARIES:
        terminalreporter.section("chaos: provider-fault runs")
        for summary in SUMMARIES:
            terminalreporter.write_line(summary.line())


@pytest.fixture(scope="module")
def chaos_sim() -> Iterator[Served[OpenAISimulator]]:
    """One OpenAI simulator per module, in a child process (its own core, as a real provider is), reconfigured
    and reset by each test."""
    config = SimulatorConfig(**CALM)
    with serve(OpenAISimulator(config), mode="process") as served:
        yield served
