"""pytest plugin (registered by entry point): fixtures for real PostgreSQL and Redis topologies.

Installing veritas-resilience makes these fixtures available in every test suite:

- ``redis_sentinel``: a session-wide :class:`~veritas_resilience.testing.LocalRedisSentinel`;
- ``redis_sentinel_factory``: builds fresh Sentinel topologies for destructive tests;
- ``redis_cluster``: a session-wide :class:`~veritas_resilience.testing.LocalRedisCluster`.

The servers start only when a test asks for a fixture.
"""

from __future__ import annotations

from ._pytest_redis import redis_cluster, redis_sentinel, redis_sentinel_factory

__all__ = ["redis_cluster", "redis_sentinel", "redis_sentinel_factory"]
