"""The PostgreSQL and Redis checks behind a real uvicorn, through real failures: a crashed
primary and its promoted standby, a killed Redis master. No password ever shows."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from _health_support import uvicorn_server, validate
from _pg_support import client, eventually, name, run

from veritas_resilience.health import HealthRegistry, checks
from veritas_resilience.redis import SentinelRedis
from veritas_resilience.testing import LocalRedisSentinel, PostgresClusterFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TOKEN = "health-tok-5d2e"
DSN_PASSWORD = "pg-Secret-41d8"
REDIS_PASSWORD = "redis-Secret-77aa"
SENTINEL_PASSWORD = "sentinel-Secret-0b3c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg and redis.asyncio run on asyncio only."""
    return "asyncio"


class Prober:
    """GETs probes with details and keeps every body and header it saw."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.seen: list[str] = []

    async def get(self, path: str) -> httpx.Response:
        response = await self.http.get(path, headers=AUTH)
        self.seen.append(response.text)
        self.seen.extend(f"{k}: {v}" for k, v in response.headers.items())
        if path != "/metrics":
            validate(response.json())
        return response

    async def status(self, path: str) -> int:
        return (await self.get(path)).status_code

    def assert_no_secret(self, *secrets: str) -> None:
        everything = "\n".join(self.seen)
        for secret in secrets:
            assert secret not in everything


async def test_ready_follows_the_postgres_primary_through_a_crash_and_promotion(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """Crashing the primary turns /ready 503 ("no writable primary") while /live stays 200;
    once the client sees the promoted standby, /ready is 200 again within 1 s plus the fail
    lifetime. The DSNs' password appears nowhere."""
    cluster = await run(lambda: pg_cluster_factory(1))
    new = cluster.standbys[0]
    dsns = [n.dsn.replace("postgres@", f"postgres:{DSN_PASSWORD}@") for n in cluster.nodes]
    fail_ttl = 0.5
    health = HealthRegistry(service="orders", hooks=[])
    async with client(dsns) as db:
        health.add("postgres", checks.postgres(db), critical=True, pass_ttl=0.2, fail_ttl=fail_ttl)
        async with (
            uvicorn_server(health.asgi(token=TOKEN)) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            probe = Prober(http)
            assert await probe.status("/ready") == 200
            await run(cluster.kill_primary)

            async def ready_is(code: int) -> bool:
                return await probe.status("/ready") == code

            await eventually(lambda: ready_is(503), what="/ready to fail")
            body = (await probe.get("/ready")).json()
            [item] = [i for i in body["checks"]["postgres"] if "output" in i]
            assert item["output"].startswith("no writable primary")
            assert await probe.status("/live") == 200
            await run(cluster.promote, new)
            await eventually(lambda: db.primary == name(new), what="the client to see it")
            seen = time.monotonic()
            await eventually(lambda: ready_is(200), what="/ready to pass again")
            assert time.monotonic() - seen <= 1.0 + fail_ttl
            await probe.get("/health")
            await probe.get("/metrics")
            probe.assert_no_secret(DSN_PASSWORD, TOKEN)


async def test_a_killed_redis_master_makes_health_warn_while_live_stays_up(
    redis_sentinel_factory: Any,
) -> None:
    """Killing the master of a non-critical Redis gives /health warn (200, with the reason)
    while /live stays 200; after Sentinel's failover /health passes again. Neither password
    appears in any answer."""
    kit: LocalRedisSentinel = await run(
        lambda: redis_sentinel_factory(
            num_replicas=1,
            password=REDIS_PASSWORD,
            sentinel_password=SENTINEL_PASSWORD,
            down_after_ms=2000,
        )
    )
    cache = SentinelRedis(
        kit.sentinels,
        kit.service_name,
        password=REDIS_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
        socket_timeout=0.5,
        hooks=[],
    )
    health = HealthRegistry(service="orders", hooks=[])
    health.add("redis", checks.redis(cache, timeout=0.5), pass_ttl=0.1, fail_ttl=0.1)
    try:
        async with (
            uvicorn_server(health.asgi(token=TOKEN)) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            probe = Prober(http)

            async def passes() -> bool:
                return bool((await probe.get("/health")).json()["status"] == "pass")

            await eventually(passes, what="the client to settle")
            first = (await probe.get("/health")).json()
            assert first["checks"]["redis:responseTime"][0]["observedUnit"] == "ms"
            await run(kit.kill_master)
            lives: list[int] = []

            async def warns() -> bool:
                lives.append(await probe.status("/live"))
                response = await probe.get("/health")
                return response.status_code == 200 and response.json()["status"] == "warn"

            await eventually(warns, what="/health to warn")
            [item] = (await probe.get("/health")).json()["checks"]["redis:responseTime"]
            assert item["status"] in ("fail", "warn") and item["output"]
            assert (await probe.get("/ready")).status_code == 200  # not critical

            async def passes_again() -> bool:
                lives.append(await probe.status("/live"))
                return await passes()

            await eventually(passes_again, limit=30.0, what="/health to pass after the failover")
            assert set(lives) == {200}
            await probe.get("/metrics")
            probe.assert_no_secret(REDIS_PASSWORD, SENTINEL_PASSWORD, TOKEN)
    finally:
        await cache.aclose()
