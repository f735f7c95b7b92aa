"""pytest fixtures that start real Redis topologies (Sentinel and Cluster) on loopback.

``veritas_resilience.testing.pytest_plugin`` imports these, so any test suite with
veritas-resilience installed can ask for them by name:

- ``redis_sentinel``: one :class:`LocalRedisSentinel` for the whole session.
- ``redis_sentinel_factory``: starts fresh Sentinel topologies for one test, stopped after it.
- ``redis_cluster``: one :class:`LocalRedisCluster` for the whole session.

The session-wide topologies are shared by every test that asks for them, so a test must not
assume which node is the master (ask ``kit.master`` or ``kit.masters()``), and a test that kills
or pauses a node must bring it back (``restart_node()``, ``restart()``, ``resume_master()``)
before it ends. Tests that need a topology of their own, or other settings (passwords, timers),
use ``redis_sentinel_factory``.

The fixtures never skip: without ``redis-server`` (and ``redis-cli`` for the cluster) they fail
with a RuntimeError saying how to install Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported in the fixtures, so loading the plugin does not import redis
    from ._redis import LocalRedisCluster, LocalRedisSentinel

__all__ = ["redis_cluster", "redis_sentinel", "redis_sentinel_factory"]


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalRedisSentinel]:
    """A started :class:`LocalRedisSentinel` (a master, 2 replicas, 3 Sentinels), shared by the
    whole session and stopped at its end.

    Example::

        def test_reads_its_writes(redis_sentinel):
            sentinel = redis.Sentinel(redis_sentinel.sentinels)
            sentinel.master_for(redis_sentinel.service_name).set("k", "v")
    """
    from ._redis import LocalRedisSentinel

    with LocalRedisSentinel() as kit:
        yield kit


@pytest.fixture
def redis_sentinel_factory() -> Iterator[Callable[..., LocalRedisSentinel]]:
    """A function that starts a new :class:`LocalRedisSentinel` and returns it.

    It takes the same keyword arguments as :class:`LocalRedisSentinel`. Every topology it
    started is stopped when the test ends. A topology starts in well under a second.

    Example::

        def test_with_passwords(redis_sentinel_factory):
            kit = redis_sentinel_factory(password="s3cret", sentinel_password="other")
            ...
    """
    from ._redis import LocalRedisSentinel

    started: list[LocalRedisSentinel] = []

    def factory(**kwargs: Any) -> LocalRedisSentinel:
        kit = LocalRedisSentinel(**kwargs)
        started.append(kit)
        kit.start()
        return kit

    try:
        yield factory
    finally:
        for kit in started:
            kit.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A started :class:`LocalRedisCluster` (3 masters, 3 replicas), shared by the whole session
    and stopped at its end.

    Example::

        async def test_cluster(redis_cluster):
            client = redis.asyncio.RedisCluster(startup_nodes=redis_cluster.startup_nodes)
            await client.set("k", "v")
    """
    from ._redis import LocalRedisCluster

    with LocalRedisCluster() as kit:
        yield kit
