"""Test helpers: the testing switch, and provider simulators served on loopback for tests and load tests.

``set_testing`` is always available. The simulators need the ``testing`` extra (``starlette``, ``uvicorn``)
and are imported on first use, so ``from ragguard.testing import set_testing`` works without it::

    from ragguard.testing import OpenAISimulator, SimulatorConfig, serve

    with serve(OpenAISimulator(SimulatorConfig(rpm=600))) as served:
        client = OpenAI(base_url=served.base_url, api_key="sk-test", max_retries=0)

Nothing in ragguard's core imports this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .._clock import set_testing

if TYPE_CHECKING:
    from ._serve import ProcessServable, Served, ServeMode, aserve, serve
    from .openai_simulator import (
        BucketStats,
        HintStyle,
        ModelLimits,
        OpenAISimulator,
        SimulatedConnectionDrop,
        SimulatorConfig,
        SimulatorStats,
    )
    from .pinecone_simulator import PineconeSimulator, PineconeSimulatorConfig, PineconeSimulatorStats
    from .redis_server import RedisCluster, RedisServer, redis_cluster_url_or_start, redis_url_or_start

__all__ = [
    "BucketStats",
    "HintStyle",
    "ModelLimits",
    "OpenAISimulator",
    "PineconeSimulator",
    "PineconeSimulatorConfig",
    "PineconeSimulatorStats",
    "ProcessServable",
    "RedisCluster",
    "RedisServer",
    "ServeMode",
    "Served",
    "SimulatedConnectionDrop",
    "SimulatorConfig",
    "SimulatorStats",
    "aserve",
    "redis_cluster_url_or_start",
    "redis_url_or_start",
    "serve",
    "set_testing",
]

_LAZY = {
    "BucketStats": ".openai_simulator",
    "HintStyle": ".openai_simulator",
    "ModelLimits": ".openai_simulator",
    "OpenAISimulator": ".openai_simulator",
    "SimulatedConnectionDrop": ".openai_simulator",
    "SimulatorConfig": ".openai_simulator",
    "SimulatorStats": ".openai_simulator",
    "ProcessServable": "._serve",
    "ServeMode": "._serve",
    "Served": "._serve",
    "aserve": "._serve",
    "serve": "._serve",
    "RedisServer": ".redis_server",
    "PineconeSimulator": ".pinecone_simulator",
    "PineconeSimulatorConfig": ".pinecone_simulator",
    "PineconeSimulatorStats": ".pinecone_simulator",
    "RedisCluster": ".redis_server",
    "redis_url_or_start": ".redis_server",
    "redis_cluster_url_or_start": ".redis_server",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
