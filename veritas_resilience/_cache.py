"""Stores for the stale-if-error cache: the protocol, and the bounded in-memory store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

from ._clock import MONOTONIC, Clock
from ._validate import clock as _clock
from ._validate import positive_int as _positive_int

__all__ = ["MemoryStaleStore", "StaleStore", "default_key"]

_KWARGS = object()  # separates positional from keyword arguments in a default key


def default_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The cache key of a call from its arguments: the positional ones, then the sorted keywords.

    Raises:
        TypeError: If an argument is unhashable (pass ``key=`` to the cache then).
    """
    key: Hashable = (*args, _KWARGS, *sorted(kwargs.items())) if kwargs else args
    try:
        hash(key)
    except TypeError:
        raise TypeError(
            "the call's arguments are not hashable; give the cache a key= function that maps "
            "them to a hashable (and, for a shared store, stable) key"
        ) from None
    return key


@runtime_checkable
class StaleStore(Protocol):
    """Where a :class:`~veritas_resilience.StaleCache` keeps its last-known-good values.

    ``namespace`` is the cache's name, so that several caches can share one store. A store
    reports each value's age, in seconds, as measured by the store (the in-memory store by its
    clock; the Redis store by the Redis server's clock, the same for every process), and may drop
    values older than the ``ttl`` given when they were written.
    """

    async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
        """Return ``(value, age_in_seconds)``, or None when the store has no value."""
        ...

    async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
        """Store ``value``; it need not be kept longer than ``ttl`` seconds."""
        ...

    async def delete(self, namespace: str, key: Hashable) -> None:
        """Forget the value stored under ``key``, if any."""
        ...


class MemoryStaleStore:
    """A bounded in-process store: least recently written values are evicted first.

    Values are kept by reference (not copied), for at most ``ttl`` seconds of the clock, and at
    most ``max_size`` of them.

    Args:
        max_size: The most values (>= 1) kept.
        clock: Time source for ages; :class:`~veritas_resilience.testing.FakeClock` in tests.

    Raises:
        ValueError: If ``max_size`` is < 1.
    """

    def __init__(self, max_size: int = 1024, *, clock: Clock = MONOTONIC) -> None:
        self._max_size = _positive_int(max_size, "max_size")
        self._now = _clock(clock).monotonic
        # (namespace, key) -> (value, stored at, expires at)
        self._data: OrderedDict[tuple[str, Hashable], tuple[Any, float, float]] = OrderedDict()

    @property
    def max_size(self) -> int:
        """The most values kept."""
        return self._max_size

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<MemoryStaleStore {len(self._data)}/{self._max_size}>"

    # The stale cache calls these two directly: no coroutine for an in-memory dict.

    def get_now(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
        """Synchronous :meth:`get`."""
        entry = self._data.get((namespace, key))
        if entry is None:
            return None
        value, stored_at, expires_at = entry
        now = self._now()
        if now >= expires_at:
            self._data.pop((namespace, key), None)
            return None
        return value, now - stored_at

    def set_now(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
        """Synchronous :meth:`set`."""
        data = self._data
        full_key = (namespace, key)
        now = self._now()
        data[full_key] = (value, now, now + ttl)
        data.move_to_end(full_key)
        while len(data) > self._max_size:
            data.popitem(last=False)

    async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
        """Return ``(value, age_in_seconds)``, or None when absent or older than its ttl."""
        return self.get_now(namespace, key)

    async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
        """Store ``value`` for at most ``ttl`` seconds, evicting the oldest when full."""
        self.set_now(namespace, key, value, ttl)

    async def delete(self, namespace: str, key: Hashable) -> None:
        """Forget the value stored under ``key``."""
        self._data.pop((namespace, key), None)

    def clear(self) -> None:
        """Forget every value."""
        self._data.clear()
