"""Hedged reads of a Sentinel replica client, on a real master with two replicas."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

from veritas_resilience import Hedge
from veritas_resilience.redis import SentinelRedis
from veritas_resilience.testing import LocalRedisSentinel

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client runs on asyncio only."""
    return "asyncio"


def make(kit: LocalRedisSentinel, **kwargs: Any) -> SentinelRedis:
    """A master client for the kit's service."""
    return SentinelRedis(kit.sentinels, kit.service_name, password=kit.password, hooks=[], **kwargs)


async def pause(address: tuple[str, int], password: str | None, ms: int) -> None:
    """Make a node answer nothing for ``ms`` milliseconds (``CLIENT PAUSE ... ALL``)."""
    admin = redis.asyncio.Redis(host=address[0], port=address[1], password=password)
    try:
        await admin.execute_command("CLIENT", "PAUSE", ms, "ALL")  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()


async def both_replicas(reader: SentinelRedis) -> tuple[tuple[str, int], ...]:
    """Wait until discovery sees both replicas fit for reads (a paused one may be missing)."""
    for _ in range(100):
        await reader.refresh()
        if len(reader._topology.replicas) == 2:
            return reader._topology.replicas
        await asyncio.sleep(0.05)
    raise AssertionError(f"replicas seen: {reader._topology.replicas}")


def in_use(reader: SentinelRedis) -> int:
    """Connections of the reader's per-node pools that are in use."""
    assert reader._node_pools is not None
    return sum(used for _, used in reader._node_pools.counts().values())


async def test_a_read_hedged_away_from_a_paused_replica_is_answered_by_the_next(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """While the first replica answers nothing, hedged reads are answered by the second one;
    the stalled attempts are cancelled, their connections closed, the pools stay bounded."""
    kit = redis_sentinel
    client = make(kit, max_connections=4)
    hedge = Hedge(idempotent=True, delay=0.05, max_attempts=3, budget_percent=100)
    reader = client.replica(hedge=hedge)
    try:
        await client.set("hedge:key", "v")
        await reader.get("hedge:key")  # discovery
        slow, fast = await both_replicas(reader)
        await pause(slow, kit.password, 1500)
        calls = 10
        for _ in range(calls):
            server = await reader.info("server")
            assert server["tcp_port"] == fast[1]
        assert hedge.counts()["hedge"] == calls and hedge.counts()["cancelled"] == calls
        assert in_use(reader) == 0
        health = await reader.health()
        pools = health.details["hedge_pools"]
        assert f"{fast[0]}:{fast[1]}" in pools  # the node that answered, by its address
        for pool in pools.values():
            assert pool["idle"] + pool["in_use"] <= 4  # max_connections, per node
        assert health.connections >= sum(p["idle"] + p["in_use"] for p in pools.values())
    finally:
        await reader.aclose()
        await client.aclose()
    assert reader._node_pools is not None and reader._node_pools.counts() == {}


async def test_writes_are_never_hedged_and_a_master_client_refuses_a_hedge(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """Writes through a hedged replica client go the usual way (never raced); a hedge on a
    master client is refused at construction."""
    kit = redis_sentinel
    client = make(kit)
    hedge = Hedge(idempotent=True, delay=0.001, max_attempts=3, budget_percent=100)
    reader = client.replica(hedge=hedge)
    try:
        with pytest.raises(ValueError, match="hedge needs a replica client"):
            client.replica("master", hedge=hedge)
        await reader.get("hedge:key")
        before = hedge.counts()
        await client.set("hedge:w", "1")
        with pytest.raises(redis.exceptions.ReadOnlyError):
            await reader.set("hedge:w", "2")  # a replica refuses it: it was sent once, unraced
        counts = hedge.counts()
        assert counts["primary"] + counts["hedge"] == before["primary"] + before["hedge"]
    finally:
        await reader.aclose()
        await client.aclose()


async def test_the_pool_of_a_replica_that_leaves_the_set_is_closed(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """A replica that stops answering drops out of the replica set at the next discovery, and
    its pool is closed with it; reads go on, hedged over the nodes left."""
    kit = redis_sentinel
    client = make(kit, sentinel_timeout=0.2)
    hedge = Hedge(idempotent=True, delay=0.05, max_attempts=3, budget_percent=100)
    reader = client.replica(hedge=hedge)
    try:
        await client.set("hedge:gone", "v")
        await reader.get("hedge:gone")
        gone, kept = await both_replicas(reader)
        pools = reader._node_pools
        assert pools is not None
        assert await reader.get("hedge:gone") == b"v"  # opens a connection to the first replica
        assert f"{gone[0]}:{gone[1]}" in pools.counts()
        await pause(gone, kit.password, 1500)
        await reader.refresh()  # asks every replica ROLE: the paused one does not answer
        assert reader._topology.replicas == (kept,)
        assert f"{gone[0]}:{gone[1]}" not in pools.counts()
        assert pools.closed >= 1
        assert await reader.get("hedge:gone") == b"v"
        assert in_use(reader) == 0
    finally:
        await reader.aclose()
        await client.aclose()
