"""Redis clients that ride through Sentinel failovers and Redis Cluster failovers.

``SentinelRedis`` is a ``redis.asyncio.Redis`` for a master watched by Sentinels; ``ClusterRedis``
is a ``redis.asyncio.RedisCluster``. Both keep redis-py's command API and add what redis-py
lacks: discovery that follows the Sentinels' events and polls them, generation fencing of
connections, retries that know which commands are safe to repeat, an overall deadline, a circuit
breaker, metrics and ``await client.health()``::

    from veritas_resilience.redis import SentinelRedis

    cache = SentinelRedis([("s1", 26379), ("s2", 26379), ("s3", 26379)], "mymaster",
                          password="...", sentinel_password="...")
    await cache.set("k", "v")

Importing this module imports redis-py; importing ``veritas_resilience`` does not. See
docs/redis.md.
"""

from __future__ import annotations

from ._client import ReadFrom as ReadFrom
from ._client import RedisHealth as RedisHealth
from ._client import SentinelRedis as SentinelRedis
from ._cluster import ClusterRedis as ClusterRedis
from ._commands import IDEMPOTENT_COMMANDS as IDEMPOTENT_COMMANDS
from ._commands import retry_unknown_outcome as retry_unknown_outcome
from ._errors import NoMasterError as NoMasterError
from ._errors import NoReplicaError as NoReplicaError
from ._errors import NoSentinelAvailableError as NoSentinelAvailableError
from ._errors import NotASentinelError as NotASentinelError
from ._errors import OutcomeUnknownError as OutcomeUnknownError
from ._errors import PoolExhaustedError as PoolExhaustedError
from ._errors import RedisAuthenticationError as RedisAuthenticationError
from ._errors import RedisCircuitOpenError as RedisCircuitOpenError
from ._errors import RedisConfigurationError as RedisConfigurationError
from ._errors import RedisError as RedisError
from ._errors import RedisUnavailableError as RedisUnavailableError
from ._errors import UnknownServiceError as UnknownServiceError
from ._events import RedisCommandRetried as RedisCommandRetried
from ._events import RedisMasterLost as RedisMasterLost
from ._events import RedisMasterSwitched as RedisMasterSwitched
from ._events import RedisPubSubReconnected as RedisPubSubReconnected
from ._events import RedisReplicasChanged as RedisReplicasChanged
from ._events import RedisSentinelDisagreement as RedisSentinelDisagreement
from ._events import RedisSentinelStateChanged as RedisSentinelStateChanged
from ._retry import RetryPolicy as RetryPolicy

__all__ = [
    "ClusterRedis",
    "IDEMPOTENT_COMMANDS",
    "NoMasterError",
    "NoReplicaError",
    "NoSentinelAvailableError",
    "NotASentinelError",
    "OutcomeUnknownError",
    "PoolExhaustedError",
    "ReadFrom",
    "RedisAuthenticationError",
    "RedisCircuitOpenError",
    "RedisCommandRetried",
    "RedisConfigurationError",
    "RedisError",
    "RedisHealth",
    "RedisMasterLost",
    "RedisMasterSwitched",
    "RedisPubSubReconnected",
    "RedisReplicasChanged",
    "RedisSentinelDisagreement",
    "RedisSentinelStateChanged",
    "RedisUnavailableError",
    "RetryPolicy",
    "SentinelRedis",
    "UnknownServiceError",
    "retry_unknown_outcome",
]
