"""pytest fixtures for real PostgreSQL clusters and the TCP fault proxy.

- ``pg_cluster`` (session): one primary and one streaming standby, shared by the whole run. Tests
  must leave its topology as they found it; anything destructive belongs on a cluster of its own.
- ``pg_cluster_factory`` (module): makes fresh clusters, stopped when the module ends.
- ``fault_proxy_factory`` (function): makes :class:`FaultProxy` objects, closed after the test.

PostgreSQL must be installed: when it is not, these fixtures fail with a message saying how to
install it. They never skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ._postgres import LocalPostgresCluster, PostgresClusterFactory
from ._proxy import FaultProxy, FaultProxyFactory

__all__ = ["fault_proxy_factory", "pg_cluster", "pg_cluster_factory"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalPostgresCluster]:
    """A PostgreSQL primary with one streaming standby, shared by the whole test session.

    Do not kill, promote or rewind its nodes: use ``pg_cluster_factory`` for that.
    """
    with LocalPostgresCluster(standbys=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_cluster_factory() -> Iterator[PostgresClusterFactory]:
    """Start fresh clusters, for tests that break them; all are stopped when the module ends.

    Usage::

        def test_failover(pg_cluster_factory):
            cluster = pg_cluster_factory(standbys=2)
            cluster.kill_primary()

    Call ``cluster.stop()`` to free a cluster sooner.
    """
    clusters: list[LocalPostgresCluster] = []

    def make(standbys: int = 1, **kwargs: Any) -> LocalPostgresCluster:
        cluster = LocalPostgresCluster(standbys, **kwargs)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def fault_proxy_factory() -> Iterator[FaultProxyFactory]:
    """Start :class:`FaultProxy` objects in front of servers; all are closed after the test.

    Usage::

        def test_frozen_link(pg_cluster, fault_proxy_factory):
            proxy = fault_proxy_factory(pg_cluster.primary.host, pg_cluster.primary.port)
            proxy.freeze()
    """
    proxies: list[FaultProxy] = []

    def make(target_host: str, target_port: int, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(target_host, target_port, **kwargs)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()
