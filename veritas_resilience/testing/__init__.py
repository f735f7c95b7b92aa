"""Tools for testing code that uses veritas-resilience, and for testing the library itself.

- :class:`FakeClock` makes time-based behaviour instant and exact.
- :class:`LocalRedisSentinel` and :class:`LocalRedisCluster` start real Redis topologies on
  loopback ports in a temporary folder, with methods to fail them over, kill and pause nodes.

The pytest plugin (``veritas_resilience.testing.pytest_plugin``, registered by entry point) turns
them into fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import FakeClock as FakeClock

if TYPE_CHECKING:
    from ._redis import LocalRedisCluster as LocalRedisCluster
    from ._redis import LocalRedisSentinel as LocalRedisSentinel

__all__ = ["FakeClock", "LocalRedisCluster", "LocalRedisSentinel"]

# The server kits import the drivers; load them only when asked for, so that importing this
# package (as the pytest plugin does in every test run) stays light.
_LAZY = {
    "LocalRedisCluster": "._redis",
    "LocalRedisSentinel": "._redis",
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
