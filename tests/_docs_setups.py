"""Setups for the documentation's examples (not a test module).

A page that starts with ``<!-- docs-setup: NAME -->`` gets the names that setup ``NAME`` returns
in the namespace its examples run in. Each setup takes the running test's ``request`` (so it can
use the testing kit's pytest fixtures) and returns the names to inject. Servers are started per
page and stopped when the page's test ends, so a page may break them freely.

- ``postgres``: a primary and one streaming standby. Names: ``cluster`` (the
  :class:`~veritas_resilience.testing.LocalPostgresCluster`), ``dsns`` (both nodes' DSNs, primary
  first), ``primary_dsn``, ``standby_dsn``.
- ``redis_sentinel``: a Redis master, two replicas and three Sentinels. Names: ``redis_kit``
  (the :class:`~veritas_resilience.testing.LocalRedisSentinel`), ``sentinels`` (the Sentinels'
  ``(host, port)`` pairs), ``service_name``.
- ``redis_cluster``: a six-node Redis Cluster. Names: ``redis_cluster_kit``, ``cluster_nodes``
  (its startup ``(host, port)`` pairs).
- ``redis``: a single Redis server (the Sentinel kit's master). Names: ``redis_url``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def postgres(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh primary and standby for a page that may crash and promote them."""
    cluster = request.getfixturevalue("pg_cluster_factory")(standbys=1)
    dsns = [node.dsn for node in cluster.nodes]
    return {
        "cluster": cluster,
        "dsns": dsns,
        "primary_dsn": cluster.primary.dsn,
        "standby_dsn": cluster.standbys[0].dsn,
    }


def redis_sentinel(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh Sentinel topology for a page that may fail it over."""
    kit = request.getfixturevalue("redis_sentinel_factory")()
    return {"redis_kit": kit, "sentinels": list(kit.sentinels), "service_name": kit.service_name}


def redis_cluster(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The session's Redis Cluster (pages must not break it)."""
    kit = request.getfixturevalue("redis_cluster")
    return {"redis_cluster_kit": kit, "cluster_nodes": list(kit.startup_nodes)}


def redis(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One Redis server to use as a plain cache or store."""
    kit = request.getfixturevalue("redis_sentinel")
    host, port = kit.master
    return {"redis_url": f"redis://{host}:{port}/0"}


SETUPS: dict[str, Callable[[pytest.FixtureRequest], dict[str, Any]]] = {
    "postgres": postgres,
    "redis": redis,
    "redis_cluster": redis_cluster,
    "redis_sentinel": redis_sentinel,
}
