"""Shared fixtures: every core test runs under asyncio and trio unless a module narrows it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from veritas_resilience import PrometheusHook
from veritas_resilience.testing import FakeClock

if TYPE_CHECKING:  # the Redis kit imports redis; test runs that do not use it stay light
    from veritas_resilience.testing import LocalRedisSentinel

# The property tests with a fifth of their examples, for the runs on other CPythons in
# tests/run.sh (`--hypothesis-profile=other-pythons`): the main run keeps the full count.
settings.register_profile("other-pythons", max_examples=20)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test once per backend (integration modules override it)."""
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at 1000 s."""
    return FakeClock(1000.0)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A Prometheus registry of the test's own."""
    return CollectorRegistry()


@pytest.fixture
def prometheus(registry: CollectorRegistry) -> PrometheusHook:
    """A Prometheus hook exporting to the test's own registry."""
    return PrometheusHook(registry)


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_loopback(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        loopback = ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise OSError(f"the tests connect only to loopback addresses, not to {host!r}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check_loopback(self, address)
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check_loopback(self, address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Every connection a test opens from this process goes to a loopback address."""
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


@pytest.fixture
async def redis_client(redis_sentinel: LocalRedisSentinel) -> AsyncIterator[Any]:
    """A redis.asyncio client on the session Redis kit's master, database 9, flushed first."""
    from redis.asyncio import Redis

    host, port = redis_sentinel.master
    client = Redis(host=host, port=port, db=9)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
