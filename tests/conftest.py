from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the chaos suite's long tier (minutes of load per fault) instead of its fast tier",
    )


@pytest.fixture
def long_tier(request: pytest.FixtureRequest) -> bool:
    """Whether ``--long`` was given: chaos tests scale their load and duration up."""
    return bool(request.config.getoption("--long"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)
