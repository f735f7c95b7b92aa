"""FailoverClient on a live primary and standby: routing, transactions, faults on the link,
lost COMMITs, read-your-writes, lag-aware reads, health and metrics.

These tests leave the cluster's topology as they found it; the destructive scenarios (crash,
switchover, split brain, ...) are in test_postgres_failover.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import types
from collections.abc import AsyncIterator

import asyncpg
import pytest
from _pg_support import HELD_PATHS, client, eventually, held_outcomes, name, query, run
from prometheus_client import CollectorRegistry, generate_latest

import veritas_resilience.postgres as vpg
from veritas_resilience import PrometheusHook, StructlogHook
from veritas_resilience.postgres import (
    AcquireTimeoutError,
    CommitOutcomeUnknownError,
    FailoverClient,
    Node,
    NoPrimaryError,
    PostgresCallFailed,
    QueryTimeoutError,
    WriteToken,
)
from veritas_resilience.testing import (
    FaultProxyFactory,
    LocalPostgresCluster,
    PostgresClusterFactory,
)
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SECRET = "Sup3r-Secret-pw"
_ids = itertools.count(1)


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(pg_cluster_factory: PostgresClusterFactory) -> LocalPostgresCluster:
    """One primary and one standby for the whole module, with the tables the tests use."""
    c = pg_cluster_factory(standbys=1)
    c.query(c.primary, "CREATE TABLE items (id bigint PRIMARY KEY, note text)")
    c.wait_replayed(c.standbys[0])
    return c


@pytest.fixture
async def db(cluster: LocalPostgresCluster) -> AsyncIterator[FailoverClient]:
    """A client over both nodes, primary listed first, with a password in the DSN."""
    nodes = [n.dsn.replace("postgres@", f"postgres:{SECRET}@") for n in cluster.nodes]
    async with client(nodes, name="it") as c:
        await eventually(lambda: len(c._topology.readable) == 1, what="the standby to be readable")
        yield c


def new_id() -> int:
    return next(_ids) + int(time.time() * 1000) % 1_000_000 * 1000


async def test_calls_route_writes_to_the_primary_and_reads_where_asked(db: FailoverClient) -> None:
    """execute/executemany/fetch* go to the primary; route='prefer_standby' reads a standby."""
    i = new_id()
    assert await db.execute("INSERT INTO items VALUES ($1, 'a')", i) == "INSERT 0 1"
    await db.executemany("INSERT INTO items VALUES ($1, $2)", [(i + 1, "b"), (i + 2, "c")])
    rows = await db.fetch("SELECT id FROM items WHERE id >= $1 AND id < $2 ORDER BY id", i, i + 3)
    assert [r["id"] for r in rows] == [i, i + 1, i + 2]
    assert (await db.fetchrow("SELECT note FROM items WHERE id = $1", i + 1))["note"] == "b"
    assert await db.fetchval("SELECT pg_is_in_recovery()") is False
    assert await db.fetchval("SELECT pg_is_in_recovery()", route="prefer_standby") is True
    new = await db.fetchval(
        "INSERT INTO items VALUES ($1, 'w') RETURNING id", i + 3, write=True,
        route="prefer_standby",
    )  # fmt: skip
    assert new == i + 3
    assert db.primary == db.nodes[0].name


async def test_a_write_sent_as_a_read_to_a_standby_gets_asyncpg_error(db: FailoverClient) -> None:
    """A write routed to a standby by mistake raises asyncpg's 25006 unchanged, and no retry."""
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await db.fetchval("INSERT INTO items VALUES ($1) RETURNING id", new_id(),
                          route="prefer_standby")  # fmt: skip


async def test_sql_errors_pass_through(db: FailoverClient) -> None:
    """Constraint violations and syntax errors are the caller's: asyncpg raises them as they are."""
    i = new_id()
    await db.execute("INSERT INTO items VALUES ($1)", i)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO items VALUES ($1)", i)
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await db.fetch("SELEC 1")
    assert db.breaker(db.nodes[0].name).state.value == "closed"


async def test_transaction_commits_or_rolls_back(db: FailoverClient) -> None:
    """transaction() commits a clean block and rolls back one that raised, re-raising its error."""
    i = new_id()
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO items VALUES ($1)", i)
        async with conn.transaction():  # nested: a savepoint
            await conn.execute("INSERT INTO items VALUES ($1)", i + 1)

    async def failing_block() -> None:
        async with db.transaction(isolation="repeatable_read") as conn:
            await conn.execute("INSERT INTO items VALUES ($1)", i + 2)
            raise RuntimeError("boom")

    async def duplicate() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO items VALUES ($1)", i + 3)
            await conn.execute("INSERT INTO items VALUES ($1)", i)

    with pytest.raises(RuntimeError, match="boom"):
        await failing_block()
    with pytest.raises(asyncpg.UniqueViolationError):
        await duplicate()
    found = await db.fetch("SELECT id FROM items WHERE id BETWEEN $1 AND $2 ORDER BY id", i, i + 3)
    assert [r["id"] for r in found] == [i, i + 1]
    async with db.acquire(route="prefer_standby") as conn:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True


async def test_health_reports_roles_and_never_a_password(db: FailoverClient) -> None:
    """health(): active node, roles, reachability and lag; no password in it or in repr."""
    report = await db.health(refresh=True)
    primary, standby = report.nodes
    assert report.status == "ok" and report.active == primary.name
    assert (primary.role, primary.active, primary.reachable) == ("primary", True, True)
    assert (standby.role, standby.readable, standby.breaker) == ("standby", True, "closed")
    assert standby.lag_bytes is not None and primary.timeline == standby.timeline == 1
    text = json.dumps(report.as_dict()) + repr(report) + repr(db) + repr(db.nodes)
    assert SECRET not in text
    assert report.as_dict()["nodes"][standby.name]["role"] == "standby"


async def test_metrics_and_logs_carry_no_secret(cluster: LocalPostgresCluster) -> None:
    """Gauges, counters and histograms are exported per node and role; no password anywhere."""
    registry = CollectorRegistry()
    lines: list[tuple[str, dict[str, object]]] = []

    class Logger:
        def __getattr__(self, level: str) -> object:
            return lambda message, **fields: lines.append((message, fields))

    recorder = Recorder()
    nodes = [n.dsn.replace("postgres@", f"postgres:{SECRET}@") for n in cluster.nodes]
    nodes.append(f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres")  # refuses connections
    hooks = [PrometheusHook(registry), StructlogHook(Logger()), recorder]
    async with client(nodes, name="metrics", hooks=hooks) as db:
        await db.execute("SELECT 1")
        await eventually(lambda: len(db._topology.readable) == 1, what="a readable standby")
        await db.fetchval("SELECT 1", route="prefer_standby")
        text = generate_latest(registry).decode()
    assert SECRET not in text and SECRET not in repr(recorder.events) and SECRET not in repr(lines)
    p, s = name(cluster.primary), name(cluster.standbys[0])
    for needle in (
        f'veritas_postgres_node_up{{client="metrics",node="{p}"}} 1.0',
        'veritas_postgres_node_up{client="metrics",node="127.0.0.1:1"} 0.0',
        f'veritas_postgres_node_role{{client="metrics",node="{s}",role="standby"}} 1.0',
        f'veritas_postgres_node_timeline{{client="metrics",node="{p}"}} 1.0',
        f'veritas_postgres_node_fenced{{client="metrics",node="{p}"}} 0.0',
        f'veritas_postgres_replication_lag_bytes{{client="metrics",node="{s}"}}',
        'veritas_postgres_primary_available{client="metrics"} 1.0',
        'veritas_postgres_failovers_total{client="metrics"} 0.0',
        'veritas_postgres_query_duration_seconds_count{client="metrics",role="primary"} 1.0',
        'veritas_postgres_query_duration_seconds_count{client="metrics",role="standby"} 1.0',
        f'veritas_postgres_pool_connections{{client="metrics",node="{p}"}}',
        'veritas_postgres_errors_total{client="metrics",kind="commit_unknown"} 0.0',
        'veritas_circuit_breaker_state{name="metrics/127.0.0.1:1",state="closed"} 1.0',
    ):
        assert needle in text, needle
    assert any(m == "postgres_node_changed" and f["node"] == "127.0.0.1:1" for m, f in lines)


async def test_read_your_writes_is_never_stale_with_a_delayed_standby(
    cluster: LocalPostgresCluster,
) -> None:
    """With recovery_min_apply_delay, a read after a write waits on the standby or goes to the
    primary: it always sees the write, even a new table."""
    standby = cluster.standbys[0]
    await run(cluster.set_apply_delay, standby, "300ms")
    try:
        async with client(
            [n.dsn for n in cluster.nodes], read_your_writes=True, ryw_timeout=2.0,
            read_route="prefer_standby",
        ) as db:  # fmt: skip
            await eventually(lambda: len(db._topology.readable) == 1, what="a readable standby")
            for _ in range(4):
                i = new_id()
                await db.execute("INSERT INTO items VALUES ($1)", i)
                row = await db.fetchrow(
                    "SELECT pg_is_in_recovery() AS standby, count(*) AS n FROM items "
                    "WHERE id = $1", i,
                )  # fmt: skip
                assert row["n"] == 1
                assert row["standby"] is True  # waited on the standby rather than fall back
            table = f"ddl_{new_id()}"
            await db.execute(f"CREATE TABLE {table} (x int)")
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0
            assert db._ryw_counts["waited"] >= 4
            assert db.last_write_token is not None

        async with client(
            [n.dsn for n in cluster.nodes], read_your_writes=True, ryw_timeout=0.05,
        ) as db:  # fmt: skip
            await eventually(lambda: len(db._topology.readable) == 1, what="a readable standby")
            for _ in range(4):
                i = new_id()
                await db.execute("INSERT INTO items VALUES ($1)", i)
                n = await db.fetchval(
                    "SELECT count(*) FROM items WHERE id = $1", i, route="prefer_standby"
                )
                assert n == 1
            assert db._ryw_counts["fallback"] >= 1
    finally:
        await run(cluster.set_apply_delay, standby, None)
        await run(cluster.wait_replayed, standby)


async def test_explicit_write_token_makes_a_later_read_fresh(
    cluster: LocalPostgresCluster,
) -> None:
    """write_token() after a write, passed as after=, gives a fresh read on a delayed standby."""
    standby = cluster.standbys[0]
    await run(cluster.set_apply_delay, standby, "200ms")
    try:
        async with client([n.dsn for n in cluster.nodes], ryw_timeout=2.0) as db:
            await eventually(lambda: len(db._topology.readable) == 1, what="a readable standby")
            i = new_id()
            await db.execute("INSERT INTO items VALUES ($1)", i)
            token = await db.write_token()
            assert isinstance(token, WriteToken) and token.timeline == 1 and "/" in str(token)
            n = await db.fetchval(
                "SELECT count(*) FROM items WHERE id = $1", i, route="prefer_standby", after=token
            )
            assert n == 1
    finally:
        await run(cluster.set_apply_delay, standby, None)
        await run(cluster.wait_replayed, standby)


@pytest.mark.parametrize("limit", ["bytes", "seconds"])
async def test_a_lagging_standby_gets_no_reads_until_it_catches_up(
    cluster: LocalPostgresCluster, limit: str
) -> None:
    """Over the lag limit (bytes or seconds) the standby serves no reads; once it has caught up
    it serves them again."""
    standby = cluster.standbys[0]
    options = {"max_lag_bytes": 4096} if limit == "bytes" else {
        "max_lag_bytes": None, "max_lag_seconds": 0.3
    }  # fmt: skip
    async with client(
        [n.dsn for n in cluster.nodes], read_route="prefer_standby", monitor_interval=0.05,
        **options,
    ) as db:  # fmt: skip
        await eventually(lambda: len(db._topology.readable) == 1, what="a readable standby")
        assert await db.fetchval("SELECT pg_is_in_recovery()") is True
        await run(cluster.set_apply_delay, standby, "1500ms")
        try:
            # recovery_min_apply_delay holds replay at the first commit record: the WAL of the
            # second batch piles up behind it (a byte lag), and time passes (a time lag).
            base = new_id()
            batches = 2
            for batch in range(batches):
                await db.execute(
                    "INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series($1::bigint,"
                    " $1::bigint + 99) g", base + 100 * batch,
                )  # fmt: skip
            await eventually(lambda: db._topology.readable == (), 5.0, "the standby to lag")
            served_by_standby = 0
            while db._topology.readable == ():
                served_by_standby += await db.fetchval("SELECT pg_is_in_recovery()")
                await asyncio.sleep(0.01)
            assert served_by_standby == 0
        finally:
            await run(cluster.set_apply_delay, standby, None)
        # It came back on its own once it caught up: reads land on it again.
        assert await db.fetchval("SELECT pg_is_in_recovery()") is True
        await run(cluster.wait_replayed, standby)
        # Between the bounds: new_id() wraps every 1,000 s, older tests' ids may lie above base.
        count = "SELECT count(*) FROM items WHERE id BETWEEN $1 AND $1 + $2 - 1"
        assert await db.fetchval(count, base, 100 * batches) == 100 * batches


async def test_frozen_link_mid_query_fails_within_command_timeout(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """A link that freezes mid-query gives an error within command_timeout, never a hang."""
    p = cluster.primary
    proxy = fault_proxy_factory(p.host, p.port)
    async with client([Node(host=proxy.host, port=proxy.port, name="proxied")],
                      command_timeout=1.0, user="postgres") as db:  # fmt: skip
        assert await db.fetchval("SELECT 1") == 1

        async def freeze_soon() -> None:
            await asyncio.sleep(0.2)
            await run(proxy.freeze)

        freezer = asyncio.create_task(freeze_soon())
        start = time.monotonic()
        with pytest.raises(QueryTimeoutError) as info:
            await db.fetchval("SELECT pg_sleep(0.5)")
        elapsed = time.monotonic() - start
        await freezer
        assert elapsed < 1.0 + 0.5, elapsed
        assert isinstance(info.value, TimeoutError) and info.value.node == "proxied"

        # A write caught by the freeze: its outcome is unknown, and it says so.
        start = time.monotonic()
        with pytest.raises((CommitOutcomeUnknownError, NoPrimaryError)):
            await db.execute("INSERT INTO items VALUES ($1)", new_id())
        assert time.monotonic() - start < 1.0 + 0.5
        await run(proxy.heal)
        await eventually(lambda: db.primary == "proxied", 5.0, "the node to come back")
        assert await db.fetchval("SELECT 2") == 2


async def test_frozen_link_while_idle_fails_within_command_timeout(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """Idle pooled connections on a link that froze: the next query errors in time, no hang."""
    p = cluster.primary
    proxy = fault_proxy_factory(p.host, p.port)
    async with client([(proxy.host, proxy.port)], command_timeout=1.0, user="postgres") as db:
        assert await db.fetchval("SELECT 1") == 1  # a warm, idle connection is pooled
        await run(proxy.freeze)
        start = time.monotonic()
        with pytest.raises(QueryTimeoutError):
            await db.fetchval("SELECT 1")
        assert time.monotonic() - start < 1.0 + 0.5
        await run(proxy.heal)


async def test_first_node_blackholed_the_next_one_answers_within_its_own_timeout(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """A silent first node costs nothing: the primary, listed second, serves at once."""
    p, s = cluster.primary, cluster.standbys[0]
    hole = fault_proxy_factory(p.host, p.port)
    await run(hole.blackhole)
    nodes = [Node(host=hole.host, port=hole.port, name="hole"), p.dsn, s.dsn]
    start = time.monotonic()
    async with client(nodes, connect_timeout=1.5) as db:
        assert await db.fetchval("SELECT 1") == 1
        assert time.monotonic() - start < 1.0, "waited on the blackholed node"
        await eventually(lambda: db._topology.nodes[0].reachable is False, 3.0, "hole marked down")
        report = await db.health()
        assert report.nodes[0].reachable is False and report.active == name(p)


async def test_lost_commit_is_reported_as_outcome_unknown(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """COMMIT reaches the server but its answer is lost: CommitOutcomeUnknownError, no retry."""
    p = cluster.primary
    proxy = fault_proxy_factory(p.host, p.port)
    recorder = Recorder()
    async with client([(proxy.host, proxy.port)], user="postgres", hooks=[recorder]) as db:
        i = new_id()
        await run(proxy.cut_after_client_message, b"COMMIT")
        with pytest.raises(CommitOutcomeUnknownError) as info:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO items VALUES ($1, 'lost-commit')", i)
        assert not info.value.safe_to_retry and info.value.reason == "connection_lost"
        assert isinstance(info.value.__cause__, asyncpg.PostgresError | OSError)
        assert proxy.triggers_fired == 1
        # The server did commit: exactly once, because nothing retried it.
        assert await query(cluster, p, f"SELECT count(*) FROM items WHERE id = {i}") == "1"
        kinds = [e.error_kind for e in recorder.of(PostgresCallFailed)]
        assert "connection_lost" in kinds

        # An autocommit write is its own COMMIT: the same, unless declared idempotent.
        j = new_id()
        marker = f"lost-autocommit-{j}"
        await run(proxy.cut_after_client_message, marker.encode())
        with pytest.raises(CommitOutcomeUnknownError):
            await db.execute(f"INSERT INTO items VALUES ($1, '{marker}')", j)
        k = new_id()
        marker = f"idempotent-{k}"
        await run(proxy.cut_after_client_message, marker.encode())
        await db.execute(
            f"INSERT INTO items VALUES ($1, '{marker}') ON CONFLICT DO NOTHING", k, idempotent=True
        )
        assert await db.fetchval("SELECT count(*) FROM items WHERE id = $1", k) == 1
        assert proxy.triggers_fired == 3


async def test_read_only_primary_gets_no_writes_and_no_25006_reaches_callers(
    cluster: LocalPostgresCluster,
) -> None:
    """A primary that answers 'read-only transaction' is re-probed and skipped: callers get
    NoPrimaryError (reason read_only), and writes resume once it is writable again."""
    p = cluster.primary
    async with client([n.dsn for n in cluster.nodes], failover_timeout=1.0) as db:
        await db.execute("INSERT INTO items VALUES ($1)", new_id())
        await run(cluster.alter_system, p, "default_transaction_read_only", True)

        async def keep_writing() -> None:
            for _ in range(50):
                await db.execute("INSERT INTO items VALUES ($1)", new_id())

        try:
            with pytest.raises(NoPrimaryError) as info:
                await keep_writing()
            assert info.value.reason == "read_only" and info.value.node == name(p)
        finally:
            await run(cluster.alter_system, p, "default_transaction_read_only", None)
        await eventually(lambda: db.primary == name(p), 5.0, "the primary to be writable")
        await db.execute("INSERT INTO items VALUES ($1)", new_id())


async def test_full_pool_raises_acquire_timeout(cluster: LocalPostgresCluster) -> None:
    """When every connection is held, a call waits at most acquire_timeout, then fails."""
    async with client([cluster.primary.dsn], max_size=1, acquire_timeout=0.3) as db:
        async with db.acquire() as conn:
            start = time.monotonic()
            with pytest.raises(AcquireTimeoutError):
                await db.fetchval("SELECT 1")
            assert 0.25 < time.monotonic() - start < 1.0
            assert await conn.fetchval("SELECT 1") == 1
        assert await db.fetchval("SELECT 3") == 3  # the pool works again


async def test_cancelled_calls_give_their_connections_back(cluster: LocalPostgresCluster) -> None:
    """A cancelled call frees its pooled connection (the statement is cancelled server-side)."""
    async with client([cluster.primary.dsn], max_size=2) as db:
        tasks = [asyncio.create_task(db.fetchval("SELECT pg_sleep(5)")) for _ in range(2)]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runtime = db._runtimes[0]
        await eventually(lambda: runtime.in_use == 0, 3.0, "the connections to go back")
        assert await db.fetchval("SELECT 4") == 4


def test_public_names_are_exactly_all_and_documented() -> None:
    """The postgres subpackage exports exactly its sorted __all__, each name documented."""
    public = {
        n
        for n, value in vars(vpg).items()
        if n.isidentifier() and not n.startswith("_") and n != "annotations"
        and not isinstance(value, types.ModuleType)
    }  # fmt: skip
    assert sorted(vpg.__all__) == vpg.__all__
    assert public == set(vpg.__all__)
    for n in vpg.__all__:
        obj = getattr(vpg, n)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), n


async def test_callers_waiting_for_the_primary_wait_for_its_breaker_trial(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """Callers that waited out an outage of the primary are not failed by its breaker when it
    heals: they wait for the breaker's open time and its half-open trial, then all succeed."""
    p, s = cluster.primary, cluster.standbys[0]
    proxy = fault_proxy_factory(p.host, p.port)
    nodes = [Node(host=proxy.host, port=proxy.port, name="proxied"), s.dsn]
    options = {"failure_threshold": 2, "reset_timeout": 0.6}
    async with client(nodes, user="postgres", breaker_options=options) as db:
        assert await db.fetchval("SELECT 1") == 1
        await run(proxy.refuse)
        await run(proxy.reset)
        calls = [asyncio.create_task(db.fetchval("SELECT 1")) for _ in range(20)]
        await eventually(lambda: db.breaker("proxied").state.value == "open", 5.0, "the breaker")
        await eventually(lambda: db.primary is None, 5.0, "the primary marked down")
        await run(proxy.heal)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results == [1] * 20
        assert db.breaker("proxied").state.value == "closed"


async def test_a_lost_link_under_held_connections_raises_the_library_errors(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """The link dies under connections the caller holds (transaction, prepared statement,
    cursor, acquire(), the caller's own transaction): every path raises ConnectionLostError,
    inside the block and out of it, never an asyncpg error; the client keeps working."""
    p = cluster.primary
    proxy = fault_proxy_factory(p.host, p.port)
    async with client([(proxy.host, proxy.port)], user="postgres", max_size=10) as db:

        async def cut() -> None:
            await run(proxy.reset)
            await asyncio.sleep(0.1)

        outcomes = await held_outcomes(db, cut)
        assert outcomes == dict.fromkeys(HELD_PATHS, "ConnectionLostError")
        await eventually(lambda: db.primary is not None, 5.0, "the node to come back")
        assert await db.fetchval("SELECT 5") == 5


async def test_a_statement_timeout_in_a_held_connection_is_a_query_timeout(
    db: FailoverClient,
) -> None:
    """A timed-out statement in a transaction or an acquired connection raises QueryTimeoutError
    (a TimeoutError), inside the block and out of it; a read-only transaction's 25006 is the
    caller's own and passes unchanged; a connection used after its block is refused."""
    for session in (db.transaction(), db.acquire()):
        with pytest.raises(QueryTimeoutError) as info:
            async with session as conn:
                await conn.execute("SELECT pg_sleep(2)", timeout=0.1)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value.__cause__, (TimeoutError, asyncio.TimeoutError))
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        async with db.transaction(readonly=True) as conn:
            await conn.execute("INSERT INTO items VALUES ($1)", new_id())
    with pytest.raises(RuntimeError, match="went back to the pool"):
        await conn.fetchval("SELECT 1")  # used after its block: refused, whoever has it now
    assert await db.fetchval("SELECT 6") == 6
