"""pytest plugin (registered by entry point): fixtures for real PostgreSQL and Redis topologies.

Installing veritas-resilience makes these fixtures available in every test suite:

- ``pg_cluster``: a session-wide :class:`~veritas_resilience.testing.LocalPostgresCluster`
  (a primary and one streaming standby); do not break it.
- ``pg_cluster_factory``: builds fresh PostgreSQL clusters for destructive tests (module scope).
- ``fault_proxy_factory``: builds :class:`~veritas_resilience.testing.FaultProxy` objects, closed
  after the test.
- ``redis_sentinel``: a session-wide :class:`~veritas_resilience.testing.LocalRedisSentinel`;
- ``redis_sentinel_factory``: builds fresh Sentinel topologies for destructive tests;
- ``redis_cluster``: a session-wide :class:`~veritas_resilience.testing.LocalRedisCluster`.

The servers start only when a test asks for a fixture; the fixtures fail (never skip) when the
server binaries are missing, saying how to install them.
"""

from __future__ import annotations

from ._pytest_postgres import fault_proxy_factory, pg_cluster, pg_cluster_factory
from ._pytest_redis import redis_cluster, redis_sentinel, redis_sentinel_factory

__all__ = [
    "fault_proxy_factory",
    "pg_cluster",
    "pg_cluster_factory",
    "redis_cluster",
    "redis_sentinel",
    "redis_sentinel_factory",
]
