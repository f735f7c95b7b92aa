"""Tools for testing code that uses veritas-resilience, and for testing the library itself.

- :class:`FakeClock` makes time-based behaviour instant and exact (timeouts included: its
  :meth:`~FakeClock.call_at` timers are :class:`FakeTimer` objects).
- :class:`RecordingHook` keeps the events a component sends, for assertions.
- :class:`LocalPostgresCluster` starts a real PostgreSQL primary and streaming standbys on
  loopback ports in a temporary folder (as an unprivileged user when run as root), with methods to
  crash, promote, rewind and split-brain them.
- :class:`LocalRedisSentinel` and :class:`LocalRedisCluster` start real Redis topologies on
  loopback ports in a temporary folder, with methods to fail them over, kill and pause nodes.
- :class:`FaultProxy` is a TCP proxy on loopback that delays, freezes, cuts, resets or blackholes
  connections, or cuts one right after a given client message (a lost COMMIT).

The pytest plugin (``veritas_resilience.testing.pytest_plugin``, registered by entry point) turns
them into fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import FakeClock as FakeClock
from ._clock import FakeTimer as FakeTimer
from ._hooks import RecordingHook as RecordingHook

if TYPE_CHECKING:
    from ._ports import free_port as free_port
    from ._postgres import LocalPostgresCluster as LocalPostgresCluster
    from ._postgres import PostgresClusterFactory as PostgresClusterFactory
    from ._postgres import PostgresNode as PostgresNode
    from ._postgres import PostgresQueryError as PostgresQueryError
    from ._proxy import FaultProxy as FaultProxy
    from ._proxy import FaultProxyFactory as FaultProxyFactory
    from ._redis import LocalRedisCluster as LocalRedisCluster
    from ._redis import LocalRedisSentinel as LocalRedisSentinel

__all__ = [
    "FakeClock",
    "FakeTimer",
    "FaultProxy",
    "FaultProxyFactory",
    "LocalPostgresCluster",
    "LocalRedisCluster",
    "LocalRedisSentinel",
    "PostgresClusterFactory",
    "PostgresNode",
    "PostgresQueryError",
    "RecordingHook",
    "free_port",
]

# The server kits import the drivers; load them only when asked for, so that importing this
# package (as the pytest plugin does in every test run) stays light.
_LAZY = {
    "FaultProxy": "._proxy",
    "FaultProxyFactory": "._proxy",
    "LocalPostgresCluster": "._postgres",
    "LocalRedisCluster": "._redis",
    "LocalRedisSentinel": "._redis",
    "PostgresClusterFactory": "._postgres",
    "PostgresNode": "._postgres",
    "PostgresQueryError": "._postgres",
    "free_port": "._ports",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
