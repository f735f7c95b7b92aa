"""The drill pointed at servers it did not start: it faults them only through its own proxies."""

from __future__ import annotations

import json

import pytest

from veritas_resilience.cli import main
from veritas_resilience.testing import LocalPostgresCluster, LocalRedisSentinel

pytestmark = pytest.mark.integration


def test_on_servers_it_did_not_start_the_drill_runs_only_proxy_faults_and_stops_nothing(
    pg_cluster: LocalPostgresCluster,
    redis_sentinel: LocalRedisSentinel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`drill --postgres ... --redis-sentinel ...` partitions and slows both stores through its
    proxies, skips every scenario that would stop, pause or promote a server, loses no
    acknowledged write, and leaves every server running in the role it had."""
    primary, master = pg_cluster.primary.name, redis_sentinel.master
    replicas = sorted(redis_sentinel.replicas)
    args = ["drill", "--json", "--html", "", "--redis-service", redis_sentinel.service_name]
    for node in pg_cluster.nodes:
        args += ["--postgres", node.dsn]
    for host, port in redis_sentinel.sentinels:
        args += ["--redis-sentinel", f"{host}:{port}"]

    status = main(args)

    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["mode"] == "external"
    ran = {s["name"]: s for s in data["scenarios"] if s["skipped"] is None}
    skipped = {s["name"]: s["skipped"] for s in data["scenarios"] if s["skipped"] is not None}
    assert set(ran) == {"pg-partition", "pg-latency", "redis-partition", "redis-latency"} | (
        {"disk-full"} & {s["name"] for s in data["scenarios"]}
    )
    assert skipped == {
        "pg-primary-crash": "needs PostgreSQL started by the drill",
        "redis-master-kill": "needs Redis started by the drill",
        "redis-master-pause": "needs Redis started by the drill",
    }
    for name, scenario in ran.items():
        assert (scenario["lost"], scenario["unexpected"]) == (0, 0), (name, scenario)
        assert scenario["writes_ok"] > 0, name
        assert scenario["passed"], (name, [h for h in scenario["hypotheses"] if not h["held"]])
    assert ran["redis-partition"]["detection_seconds"] is not None  # the fault reached the client
    assert status == 0
    assert all(node.is_running for node in pg_cluster.nodes)
    assert pg_cluster.primary.name == primary
    assert redis_sentinel.master == master
    assert sorted(redis_sentinel.replicas) == replicas  # every replica still running
