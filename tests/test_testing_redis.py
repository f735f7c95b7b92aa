"""The Redis testing kit: real Sentinel and Cluster topologies on loopback, and their fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from veritas_resilience.testing import LocalRedisCluster, LocalRedisSentinel

pytestmark = pytest.mark.integration

Address = tuple[str, int]


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only."""
    return "asyncio"


def _client(address: Address, password: str | None = None, **kwargs: Any) -> redis.asyncio.Redis:
    """A client that fails at once instead of retrying, so tests of outages stay fast."""
    return redis.asyncio.Redis(
        host=address[0],
        port=address[1],
        password=password,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


async def _role(address: Address, password: str | None = None) -> list[Any]:
    async with _client(address, password) as client:
        return await client.role()


async def _master_according_to(sentinel: Address, service_name: str) -> Address:
    async with _client(sentinel) as client:
        reply: Any = await client.sentinel_get_master_addr_by_name(service_name)
        return (str(reply[0]), int(reply[1]))


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Await ``check()`` until it returns True (errors count as not yet), for up to 15 s."""
    with anyio.move_on_after(15):
        while True:
            try:
                if await check():
                    return
            except (redis.RedisError, OSError):
                pass
            await anyio.sleep(0.05)
    pytest.fail(f"{what} did not happen within 15 s")


def _pids_working_in(folder: Path) -> set[int]:
    """Processes whose working directory is inside ``folder`` (the kit starts each server in
    its own subfolder; redis-server rewrites its command line, so that cannot be used)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(folder)):
                pids.add(int(entry.name))
    return pids


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_master_takes_writes_that_reach_every_replica(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """A write on the master is readable on every replica, and replicas refuse writes."""
    kit = redis_sentinel
    assert len(kit.nodes) == 3
    assert len(kit.sentinels) == 3
    master = kit.master
    assert sorted(kit.replicas) == sorted(n for n in kit.nodes if n != master)
    async with _client(master) as client:
        assert await client.set("kit:greeting", "hello")
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)
    for replica in kit.replicas:
        assert (await _role(replica))[:3] == ["slave", master[0], master[1]]
        async with _client(replica) as client:
            assert await client.get("kit:greeting") == "hello"
            with pytest.raises(redis.ReadOnlyError):
                await client.set("kit:greeting", "nope")


@pytest.mark.anyio
async def test_sentinels_agree_on_the_master(redis_sentinel: LocalRedisSentinel) -> None:
    """Every Sentinel names the same master, and that node says it is the master."""
    kit = redis_sentinel
    master = kit.master
    for sentinel in kit.sentinels:
        assert await _master_according_to(sentinel, kit.service_name) == master
    sentinel_client = redis.asyncio.Sentinel(kit.sentinels, socket_timeout=1)  # type: ignore[no-untyped-call, unused-ignore]
    assert await sentinel_client.discover_master(kit.service_name) == master
    assert (await _role(master))[0] == "master"


@pytest.mark.anyio
async def test_failover_switches_the_master_and_demotes_the_old_one(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """failover() returns once all Sentinels name a new master; the old one becomes a replica."""
    kit = redis_sentinel
    old = kit.master
    async with _client(old) as client:
        await client.set("kit:before-failover", "kept")
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)

    started = time.monotonic()
    new = await anyio.to_thread.run_sync(kit.failover)
    elapsed = time.monotonic() - started

    assert new != old
    assert elapsed < 5, f"failover took {elapsed:.1f} s"
    assert kit.master == new
    assert (await _role(new))[0] == "master"
    async with _client(new) as client:
        assert await client.get("kit:before-failover") == "kept"
        assert await client.set("kit:after-failover", "ok")

    async def old_follows_new() -> bool:
        return (await _role(old))[:4] == ["slave", new[0], new[1], "connected"]

    await _eventually(old_follows_new, f"{old} becoming a replica of {new}")
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)


@pytest.mark.anyio
async def test_killed_master_is_replaced_in_time_and_rejoins_as_replica(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """kill_master() leads to a promotion within down-after + failover time; the restarted
    node replicates the new master."""
    kit = redis_sentinel
    started = time.monotonic()
    old = await anyio.to_thread.run_sync(kit.kill_master)
    with pytest.raises(redis.ConnectionError):
        await _role(old)
    new = await anyio.to_thread.run_sync(kit.wait_for_master_change, old, 10.0)
    elapsed = time.monotonic() - started
    assert new != old
    assert elapsed < 1.0 + 3.0 + 1.0, f"promotion took {elapsed:.1f} s"
    assert old not in kit.replicas

    await anyio.to_thread.run_sync(kit.restart_node, old)
    assert (await _role(old))[:3] == ["slave", new[0], new[1]]
    assert old in kit.replicas
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)


@pytest.mark.anyio
async def test_paused_master_stops_answering_until_resumed(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """pause_master() freezes the master (commands time out); resume_master() and the timed
    pause wake it up."""
    kit = redis_sentinel
    paused = kit.pause_master()
    try:
        async with _client(paused, socket_timeout=0.2) as client:
            with pytest.raises(redis.TimeoutError):
                await client.ping()
    finally:
        kit.resume_master()
    async with _client(paused) as client:
        assert await client.ping()

    paused = kit.pause_master(seconds=0.3)
    async with _client(paused, socket_timeout=5) as client:
        started = time.monotonic()
        assert await client.ping()
        assert 0.1 < time.monotonic() - started < 2
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)


@pytest.mark.anyio
async def test_stopped_sentinel_comes_back_knowing_the_master(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """stop_sentinel() takes one Sentinel away (the others still answer); start_sentinel()
    brings it back on the same port."""
    kit = redis_sentinel
    address = kit.sentinels[0]
    await anyio.to_thread.run_sync(kit.stop_sentinel, 0)
    try:
        with pytest.raises(redis.ConnectionError):
            await _role(address)
        assert kit.master in kit.nodes  # answered by the remaining Sentinels
    finally:
        await anyio.to_thread.run_sync(kit.start_sentinel, 0)
    assert await _master_according_to(address, kit.service_name) == kit.master


@pytest.mark.anyio
async def test_passwords_protect_both_tiers_and_stop_cleans_up(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
) -> None:
    """password and sentinel_password are enforced and used by the Sentinels themselves (a
    failover works); stop() leaves no process and no folder behind."""
    kit = await anyio.to_thread.run_sync(
        lambda: redis_sentinel_factory(
            num_replicas=1, password="data-secret", sentinel_password="sentinel-secret"
        )
    )
    assert kit.password == "data-secret"
    assert kit.sentinel_password == "sentinel-secret"
    for address in (kit.master, kit.sentinels[0]):
        async with _client(address) as client:
            with pytest.raises(redis.AuthenticationError):
                await client.ping()

    sentinel = redis.asyncio.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        kit.sentinels,
        sentinel_kwargs={"password": "sentinel-secret", "socket_timeout": 1},
        password="data-secret",
        decode_responses=True,
    )
    master = sentinel.master_for(kit.service_name)
    try:
        assert await master.set("kit:secret", "1")
        old = kit.master
        assert await anyio.to_thread.run_sync(kit.failover) != old
    finally:
        await master.aclose()

    folder = kit.directory
    assert folder is not None
    pids = _pids_working_in(folder)
    assert len(pids) == 2 + 3
    kit.stop()
    assert kit.directory is None
    assert not folder.exists()
    assert not _pids_working_in(folder)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_forgotten_kit_is_stopped_at_interpreter_exit() -> None:
    """A kit that is never stopped is stopped by its atexit hook: no process, no folder."""
    script = (
        "from veritas_resilience.testing._redis import LocalRedisSentinel\n"
        "kit = LocalRedisSentinel(num_replicas=1)\n"
        "kit.start()\n"
        "print(kit.directory)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    folder = Path(result.stdout.strip())
    assert folder.name.startswith("veritas-redis-sentinel-")
    assert not folder.exists()
    assert not _pids_working_in(folder)


def test_missing_binaries_fail_loudly_and_start_nothing(tmp_path: Path) -> None:
    """Without redis-server or redis-cli, start() raises a RuntimeError saying how to install
    Redis, and leaves nothing running."""
    missing = str(tmp_path / "absent")
    with pytest.raises(RuntimeError, match="apt-get install redis-server"):
        LocalRedisSentinel(redis_server=missing).start()
    cluster = LocalRedisCluster(redis_cli=missing)
    with pytest.raises(RuntimeError, match="redis-cli not found"):
        cluster.start()
    assert cluster.directory is None


def test_invalid_settings_are_rejected() -> None:
    """Out-of-range settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match="quorum"):
        LocalRedisSentinel(num_sentinels=3, quorum=4)
    with pytest.raises(ValueError, match="num_replicas"):
        LocalRedisSentinel(num_replicas=0)
    with pytest.raises(ValueError, match="num_masters"):
        LocalRedisCluster(num_masters=2)


def test_methods_need_a_started_kit() -> None:
    """Asking a stopped kit about its topology raises a RuntimeError, not a connection error."""
    with pytest.raises(RuntimeError, match="not started"):
        _ = LocalRedisSentinel().master
    with pytest.raises(RuntimeError, match="not started"):
        LocalRedisCluster().masters()


# -- Cluster ----------------------------------------------------------------------------------

KEYS = [f"kit:key:{i}" for i in range(60)]


@pytest.mark.anyio
async def test_cluster_serves_keys_on_every_master(redis_cluster: LocalRedisCluster) -> None:
    """RedisCluster writes and reads keys across all slots; every master owns some of them."""
    kit = redis_cluster
    assert len(kit.nodes) == 6
    masters = kit.masters()
    assert len(masters) == 3
    for master in masters:
        assert len(kit.replicas_of(master)) == 1
    async with RedisCluster(startup_nodes=kit.startup_nodes, decode_responses=True) as client:
        for key in KEYS:
            assert await client.set(key, key.upper())
        assert [await client.get(key) for key in KEYS] == [key.upper() for key in KEYS]
        owners = {getattr(client.get_node_from_key(key), "name", None) for key in KEYS}
    assert owners == {f"{host}:{port}" for host, port in masters}


@pytest.mark.anyio
async def test_cluster_failover_swaps_master_and_replica(redis_cluster: LocalRedisCluster) -> None:
    """failover(master) promotes its replica and demotes the master; clients follow."""
    kit = redis_cluster
    master = kit.masters()[0]
    [replica] = kit.replicas_of(master)

    started = time.monotonic()
    new = await anyio.to_thread.run_sync(kit.failover, master)
    elapsed = time.monotonic() - started

    assert new == replica
    assert elapsed < 5, f"cluster failover took {elapsed:.1f} s"
    assert (await _role(new))[0] == "master"
    assert (await _role(master))[:3] == ["slave", new[0], new[1]]
    assert new in kit.masters()
    assert kit.replicas_of(new) == [master]
    async with RedisCluster(startup_nodes=kit.startup_nodes, decode_responses=True) as client:
        assert [await client.get(key) for key in KEYS] == [key.upper() for key in KEYS]


@pytest.mark.anyio
async def test_cluster_kill_promotes_replica_and_restart_rejoins(
    redis_cluster: LocalRedisCluster,
) -> None:
    """kill(master) returns once its replica owns the slots; restart() brings the old master
    back as that replica's replica."""
    kit = redis_cluster
    master = kit.masters()[1]
    [replica] = kit.replicas_of(master)

    started = time.monotonic()
    new = await anyio.to_thread.run_sync(kit.kill, master)
    elapsed = time.monotonic() - started

    assert new == replica
    assert elapsed < 1.0 + 4.0, f"promotion took {elapsed:.1f} s"
    assert master not in kit.masters()
    async with RedisCluster(startup_nodes=kit.startup_nodes, decode_responses=True) as client:
        assert [await client.get(key) for key in KEYS] == [key.upper() for key in KEYS]

    await anyio.to_thread.run_sync(kit.restart, master)
    assert (await _role(master))[:3] == ["slave", new[0], new[1]]
    assert kit.replicas_of(new) == [master]


@pytest.mark.anyio
async def test_cluster_with_password_and_clean_stop() -> None:
    """A password-protected cluster refuses anonymous clients and serves authenticated ones;
    stop() leaves no process and no folder behind."""
    kit = LocalRedisCluster(password="cluster-secret")
    await anyio.to_thread.run_sync(kit.start)
    try:
        async with _client(kit.nodes[0]) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                await anonymous.ping()
        async with RedisCluster(
            startup_nodes=kit.startup_nodes, password=kit.password, decode_responses=True
        ) as client:
            assert await client.set("kit:secret", "1")
            assert await client.get("kit:secret") == "1"
        folder = kit.directory
        assert folder is not None
        pids = _pids_working_in(folder)
        assert len(pids) == 6
    finally:
        kit.stop()
    assert kit.directory is None
    assert not folder.exists()
    assert not _pids_working_in(folder)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
