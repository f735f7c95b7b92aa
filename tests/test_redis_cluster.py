"""ClusterRedis against a real Redis Cluster: failover and kill of a master under load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.exceptions as rex
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import PrometheusHook
from veritas_resilience.redis import ClusterRedis
from veritas_resilience.testing import LocalRedisCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def cluster(redis_cluster: LocalRedisCluster) -> AsyncIterator[ClusterRedis]:
    """A ClusterRedis on the session's cluster, with its own metrics registry."""
    client = ClusterRedis(
        redis_cluster.nodes,
        name="cache",
        password=redis_cluster.password,
        decode_responses=True,
        hooks=[PrometheusHook(CollectorRegistry())],
    )
    yield client
    await client.aclose()


class Writers:
    """Tasks writing unique keys; what was acknowledged and what failed."""

    def __init__(self, client: ClusterRedis, count: int, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.stop = False
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.tasks = [asyncio.ensure_future(self._run(i)) for i in range(count)]

    async def _run(self, index: int) -> None:
        seq = 0
        while not self.stop:
            seq += 1
            key = f"{self.prefix}:{index}:{seq}"
            try:
                await self.client.set(key, seq)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.acked.append(key)
            await asyncio.sleep(0.002)

    async def finish(self) -> None:
        self.stop = True
        await asyncio.gather(*self.tasks)


@pytest.mark.anyio
async def test_commands_pipelines_and_health_work_as_with_redis_py(
    redis_cluster: LocalRedisCluster, cluster: ClusterRedis
) -> None:
    """get/set across slots, a pipeline, and a health report naming every master."""
    assert await cluster.set("{user:1}:name", "ada") is True
    assert await cluster.get("{user:1}:name") == "ada"
    pipe: Any = cluster.pipeline()
    pipe.set("a", 1).set("b", 2).get("a").get("b")
    assert await pipe.execute() == [True, True, "1", "2"]
    with pytest.raises(rex.ResponseError):
        await cluster.hset("a", "f", "v")  # WRONGTYPE: the server's answer, not retried
    health = await cluster.health()
    assert health.status == "ok"
    assert health.details["cluster_state"] == "ok"
    assert sorted(health.details["masters"]) == sorted(
        f"{h}:{p}" for h, p in redis_cluster.masters()
    )
    assert cluster.retries() == {}


@pytest.mark.anyio
async def test_cluster_failover_of_one_master_under_load_loses_no_write_and_shows_no_error(
    redis_cluster: LocalRedisCluster, cluster: ClusterRedis
) -> None:
    """CLUSTER FAILOVER of a master under 50 writers: no caller error, every acknowledged write
    readable afterwards, the slot map reloaded without cutting other tasks' commands."""
    await cluster.initialize()
    refreshes = cluster.refreshes
    writers = Writers(cluster, 50, "cfo")
    await asyncio.sleep(0.3)
    master = redis_cluster.masters()[0]
    new = await asyncio.to_thread(redis_cluster.failover, master)
    await asyncio.sleep(0.5)
    await writers.finish()

    assert writers.errors == []
    assert len(writers.acked) > 500
    values = [await cluster.get(key) for key in writers.acked[-3000:]]
    assert None not in values
    health = await cluster.health()
    assert f"{new[0]}:{new[1]}" in health.details["masters"]
    assert f"{master[0]}:{master[1]}" not in health.details["masters"]
    assert cluster.refreshes - refreshes <= 10


@pytest.mark.anyio
async def test_kill_9_of_a_master_under_load_is_ridden_through_within_the_deadline(
    redis_cluster: LocalRedisCluster, cluster: ClusterRedis
) -> None:
    """kill -9 of a master: its replica takes over within the node timeout, callers writing
    (idempotent SETs) see no error, and metrics count the retries."""
    await cluster.initialize()
    writers = Writers(cluster, 30, "ckill")
    await asyncio.sleep(0.3)
    master = redis_cluster.masters()[1]
    try:
        await asyncio.to_thread(redis_cluster.kill, master)
        await asyncio.sleep(0.5)
        await writers.finish()
    finally:
        await asyncio.to_thread(redis_cluster.restart, master)
    assert writers.errors == []
    assert sum(cluster.retries().values()) > 0
    values = [await cluster.get(key) for key in writers.acked[-500:]]
    assert None not in values


def test_cluster_metrics_are_exported_with_bounded_labels(redis_cluster: LocalRedisCluster) -> None:
    """Retries, durations and slot-map reloads are exported under the client's name."""
    registry = CollectorRegistry()

    async def run() -> None:
        client = ClusterRedis(
            redis_cluster.nodes,
            name="m",
            password=redis_cluster.password,
            hooks=[PrometheusHook(registry)],
        )
        await client.set("metrics", 1)
        await client.aclose()

    asyncio.run(run())
    text = generate_latest(registry).decode()
    assert 'veritas_redis_command_duration_seconds_count{name="m"} 1.0' in text
    assert 'veritas_redis_cluster_refreshes_total{name="m"}' in text
    assert 'veritas_circuit_breaker_state{name="redis:m",state="closed"} 1.0' in text
