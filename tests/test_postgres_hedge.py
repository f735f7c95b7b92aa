"""Hedged reads of the PostgreSQL failover client, on a real primary with two standbys.

One node is made slow by the query itself: it sleeps only on the server listening on a given
port, so the slow attempt is a real statement that must be cancelled on the server.
"""

from __future__ import annotations

import asyncio

import pytest
from _pg_support import client, eventually, query, run

from veritas_resilience import Hedge
from veritas_resilience.postgres import FailoverClient, PostgresCallFailed, WriteToken
from veritas_resilience.testing import (
    LocalPostgresCluster,
    PostgresClusterFactory,
    RecordingHook,
)

pytestmark = pytest.mark.anyio

# Answers the port of the server it ran on, after sleeping $2 seconds on the one at port $1.
SLOW_ON = (
    "SELECT current_setting('port')::int FROM pg_sleep("
    "CASE WHEN current_setting('port')::int = $1 THEN $2::float8 ELSE 0 END)"
)
# On the server at port $1: drop its own connection after 0.2 s; elsewhere answer after 0.5 s.
DIES_ON = (
    "SELECT current_setting('port')::int FROM pg_sleep("
    "CASE WHEN current_setting('port')::int = $1 THEN 0.2 ELSE 0.5 END) "
    "WHERE CASE WHEN current_setting('port')::int = $1 "
    "THEN pg_terminate_backend(pg_backend_pid()) ELSE true END"
)
ACTIVE_SLEEPS = (
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
    "AND query LIKE '%pg_sleep(CASE%' AND pid <> pg_backend_pid()"
)


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(pg_cluster_factory: PostgresClusterFactory) -> LocalPostgresCluster:
    """A primary and two streaming standbys, shared by this module's tests."""
    return pg_cluster_factory(2)


def dsns(cluster: LocalPostgresCluster) -> list[str]:
    """The primary first, then the standbys in the kit's order."""
    return [cluster.primary.dsn, *(s.dsn for s in cluster.standbys)]


async def both_standbys_readable(db: FailoverClient) -> None:
    """Wait until the client routes reads to both standbys."""
    await eventually(lambda: len(db._topology.readable) == 2, what="two readable standbys")


async def settled(db: FailoverClient) -> None:
    """Wait until every cancelled statement's connection has gone back to its pool."""
    if db._background:
        await asyncio.wait(list(db._background), timeout=5)
    for rt in db._runtimes:
        size, idle = rt.pool_stats()
        assert rt.in_use == 0, rt
        assert size == idle, rt
        assert size <= rt.max_size, rt


async def test_hedged_read_wins_on_the_next_standby_and_cancels_the_slow_one(
    cluster: LocalPostgresCluster,
) -> None:
    """A read hedged away from a slow standby is answered by the next one; the slow statements
    are cancelled on the server, count as no failure and leave no connection behind."""
    slow, fast = cluster.standbys
    hedge = Hedge(idempotent=True, delay=0.05, max_attempts=3, budget_percent=100)
    async with client(dsns(cluster), hedge=hedge) as db:
        await both_standbys_readable(db)
        calls = 20
        for _ in range(calls):
            # Without the hedge every call would wait 30 s for the slow standby.
            port = await db.fetchval(SLOW_ON, slow.port, 30.0, route="prefer_standby")
            assert port == fast.port
        counts = hedge.counts()
        assert counts["hedge"] == calls and counts["cancelled"] == calls
        await settled(db)
        assert all(count == 0 for count in db._errors.values()), db._errors
        assert all(rt.breaker.state.value == "closed" for rt in db._runtimes)
        # The slow standby runs none of the cancelled statements any more.
        await eventually(lambda: _zero(cluster, slow), what="the slow statements to be cancelled")
        # Its pool still serves reads: the cancelled connections were reused, not lost.
        assert await db.fetchval(SLOW_ON, 0, 0.0, route="prefer_standby") == slow.port


async def _zero(cluster: LocalPostgresCluster, node: object) -> bool:
    return await query(cluster, node, ACTIVE_SLEEPS) == "0"  # type: ignore[arg-type]


async def test_a_failed_attempt_is_booked_against_its_own_node(
    cluster: LocalPostgresCluster,
) -> None:
    """When the first standby's connection dies while the hedge on the second is in flight, the
    second answers, and the failure is reported for the first standby only."""
    dying, answering = cluster.standbys
    recorder = RecordingHook()
    hedge = Hedge(idempotent=True, delay=0.05, max_attempts=2, budget_percent=100)
    async with client(dsns(cluster), hedge=hedge, hooks=[recorder]) as db:
        await both_standbys_readable(db)
        assert await db.fetchval(DIES_ON, dying.port, route="prefer_standby") == answering.port
        failed = recorder.of(PostgresCallFailed)
        assert [(e.node, e.retried) for e in failed] == [(f"{dying.host}:{dying.port}", True)]
        assert failed[0].error_kind in ("shutdown", "connection_lost")
        assert hedge.counts()["hedge"] == 1
        await settled(db)


async def test_hedging_stops_when_its_budget_is_spent(cluster: LocalPostgresCluster) -> None:
    """With a 1% budget only the first slow read is hedged; the next ones wait for the slow
    standby, and the refusals are counted."""
    slow, fast = cluster.standbys
    hedge = Hedge(idempotent=True, delay=0.02, max_attempts=2, budget_percent=1)
    async with client(dsns(cluster), hedge=hedge) as db:
        await both_standbys_readable(db)
        ports = [
            await db.fetchval(SLOW_ON, slow.port, 0.2, route="prefer_standby") for _ in range(4)
        ]
        assert ports == [fast.port, slow.port, slow.port, slow.port]
        counts = hedge.counts()
        assert counts["attempts"] == 1 and counts["skipped_budget"] == 3
        await settled(db)


async def test_writes_primary_reads_and_transactions_are_never_hedged(
    cluster: LocalPostgresCluster,
) -> None:
    """Writes, execute, reads routed to the primary, explicit non-idempotent reads and
    transactions never enter the hedge, however slow they are."""
    hedge = Hedge(idempotent=True, delay=0.001, max_attempts=3, budget_percent=100)
    primary = cluster.primary
    async with client(dsns(cluster), hedge=hedge) as db:
        await both_standbys_readable(db)
        await db.execute("SELECT pg_sleep(0.05)")
        await db.fetchval(SLOW_ON, primary.port, 0.05, write=True)
        await db.fetchval(SLOW_ON, primary.port, 0.05, route="primary")
        await db.fetch(SLOW_ON, 0, 0.05, route="prefer_standby", idempotent=False)
        async with db.transaction() as conn:
            await conn.fetchval(SLOW_ON, primary.port, 0.05)
        counts = hedge.counts()
        assert counts["primary"] == counts["hedge"] == counts["attempts"] == 0, counts


async def test_a_write_token_makes_lagging_standbys_ineligible(
    cluster: LocalPostgresCluster,
) -> None:
    """With a write token, a standby that has not replayed it is not a hedge target: the first
    attempt goes to the standby that has, not to the lagging one first in order."""
    lagging, caught_up = cluster.standbys
    hedge = Hedge(idempotent=True, delay=0.05, max_attempts=3, budget_percent=100)
    await run(cluster.set_apply_delay, lagging, "60s")
    try:
        async with client(dsns(cluster), hedge=hedge, ryw_timeout=5.0) as db:
            await both_standbys_readable(db)
            await db.execute("CREATE TABLE IF NOT EXISTS hedge_ryw (id int)")
            await db.execute("INSERT INTO hedge_ryw VALUES (1)")
            token = await db.write_token()
            await run(cluster.wait_replayed, caught_up)
            state = db._topology.nodes[2]
            await eventually(
                lambda: state.lsn is not None and state.lsn >= token.lsn,
                what="the client to see the token replayed",
            )
            port = await db.fetchval(SLOW_ON, 0, 0.0, route="prefer_standby", after=token)
            assert port == caught_up.port
            # Answered by the first attempt: the lagging standby was never tried.
            assert hedge.counts()["primary"] == 1 and hedge.counts()["attempts"] == 0
            # A token no standby has replayed leaves only the primary: no race at all.
            beyond = WriteToken(token.lsn + 10**12, token.timeline)
            assert db._hedge_targets(beyond) == [(db._primary_rt, False)]
            await settled(db)
    finally:
        await run(cluster.set_apply_delay, lagging, None)
