"""A stale-if-error store in Redis, shared by every process of a service (redis.asyncio)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # redis is imported by the caller who builds the client, never by us
    from redis.asyncio import Redis

__all__ = ["RedisStaleStore"]


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class RedisStaleStore:
    """Keep last-known-good values in Redis, so every process can serve them when the source fails.

    Each value is written with ``SET ... PX ttl`` under
    ``{prefix}{cache name}:{sha256 of repr(key)}``: keys are hashed so that call arguments (which
    may hold personal data) never appear in Redis, and the TTL bounds both staleness and memory.
    A value's age is read from the Redis server's clock (the TTL it was written with minus the TTL
    left), so processes whose clocks disagree still agree on ages.

    Build it around a ``redis.asyncio.Redis`` client you own (asyncio only; this module never
    imports redis)::

        from redis.asyncio import Redis

        store = RedisStaleStore(Redis(host="cache", port=6379))
        cache = StaleCache(name="catalog", max_staleness=600, store=store)

    Use a ``key=`` function on the cache when arguments have no stable ``repr`` (objects whose
    repr shows a memory address would never match across processes).

    Args:
        client: A ``redis.asyncio.Redis`` (or cluster) client with ``decode_responses=False``.
        prefix: Prepended to every key.
        dumps: Serializes a value to bytes; JSON by default.
        loads: Deserializes what ``dumps`` wrote; ``json.loads`` by default.

    Raises:
        TypeError: If ``client`` is not a redis.asyncio client, or another argument has the wrong
            type.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "veritas:stale:",
        dumps: Callable[[Any], bytes] = _json_dumps,
        loads: Callable[[bytes], Any] = json.loads,
    ) -> None:
        missing = [
            m for m in ("pipeline", "set", "delete") if not callable(getattr(client, m, None))
        ]
        if missing:
            raise TypeError(
                "client must be a redis.asyncio client (Redis or RedisCluster, "
                f"decode_responses=False), got {client!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        if not callable(dumps) or not callable(loads):
            raise TypeError("dumps and loads must be functions (value -> bytes, bytes -> value)")
        self._client = client
        self._prefix = prefix
        self._dumps = dumps
        self._loads = loads

    def __repr__(self) -> str:
        return f"<RedisStaleStore prefix={self._prefix!r}>"

    def redis_key(self, namespace: str, key: Hashable) -> str:
        """The Redis key a value of cache ``namespace`` is stored under."""
        digest = hashlib.sha256(repr(key).encode()).hexdigest()
        return f"{self._prefix}{namespace}:{digest}"

    async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
        """Return ``(value, age_in_seconds)`` read in one round trip, or None when absent."""
        name = self.redis_key(namespace, key)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(name)
            pipe.pttl(name)
            raw, left_ms = await pipe.execute()
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = raw.encode()
        header, _, payload = raw.partition(b":")
        ttl_ms = int(header)
        age = max(0, ttl_ms - left_ms) / 1000 if left_ms >= 0 else 0.0
        return self._loads(payload), age

    async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
        """Write ``value`` with a TTL of ``ttl`` seconds (at least 1 ms)."""
        ttl_ms = max(1, int(ttl * 1000))
        payload = b"%d:" % ttl_ms + self._dumps(value)
        await self._client.set(self.redis_key(namespace, key), payload, px=ttl_ms)

    async def delete(self, namespace: str, key: Hashable) -> None:
        """Delete the value stored under ``key``."""
        await self._client.delete(self.redis_key(namespace, key))
