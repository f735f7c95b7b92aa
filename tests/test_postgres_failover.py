"""FailoverClient through real failovers: crash under load, switchover, split brain, promotion
next to a live primary, every node down, auto-promotion, ten failovers in a row.

Each test breaks its own fresh cluster (from the factory fixture), so none depends on another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from _pg_support import (
    HELD_PATHS,
    client,
    eventually,
    held_outcomes,
    name,
    query,
    readable,
    run,
)

from veritas_resilience import BreakerCallFailed
from veritas_resilience.postgres import (
    CommitOutcomeUnknownError,
    FileFencingRecord,
    Node,
    NodeFencedError,
    NoPrimaryError,
    PostgresFailoverDetected,
    PostgresNodeFenced,
    PostgresPromotionAttempted,
)
from veritas_resilience.testing import (
    FaultProxyFactory,
    LocalPostgresCluster,
    PostgresClusterFactory,
)
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


async def fresh(
    factory: PostgresClusterFactory, *, synchronous: bool = False
) -> LocalPostgresCluster:
    """A new cluster (primary and one standby) with a table ``w`` (id, port of the writer)."""
    cluster = await run(lambda: factory(1, synchronous=synchronous))
    await query(cluster, cluster.primary, "CREATE TABLE w (id bigint PRIMARY KEY, port int)")
    for standby in cluster.standbys:
        await run(cluster.wait_replayed, standby)
    return cluster


async def ids_on(cluster: LocalPostgresCluster, node: object) -> set[int]:
    out = await query(cluster, node, "SELECT id FROM w")  # type: ignore[arg-type]
    return {int(x) for x in out.split()}


async def test_crash_of_the_primary_under_100_writers(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """Crash + promotion with 100 concurrent writers: no write is ever sent to a standby, writes
    resume on the new primary, and every acknowledged write survives (synchronous standby)."""
    cluster = await fresh(pg_cluster_factory, synchronous=True)
    old, new = cluster.primary, cluster.standbys[0]
    recorder = Recorder()
    acked: list[int] = []
    unknown: list[int] = []
    other: list[BaseException] = []
    ids = itertools.count(1)
    stop = asyncio.Event()
    async with client([n.dsn for n in cluster.nodes], max_size=10, hooks=[recorder]) as db:

        async def writer() -> None:
            while not stop.is_set():
                i = next(ids)
                try:
                    await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", i)
                    acked.append(i)
                except CommitOutcomeUnknownError:
                    unknown.append(i)
                except Exception as exc:  # pragma: no cover - reported by the assertion below
                    other.append(exc)

        tasks = [asyncio.create_task(writer()) for _ in range(100)]
        await eventually(lambda: len(acked) > 300, what="writes before the crash")
        await run(cluster.kill_primary)
        await run(cluster.promote, new)
        # What an HA manager in non-strict synchronous mode does with no standby left.
        await run(cluster.alter_system, new, "synchronous_standby_names", "")
        resumed_from = len(acked)
        await eventually(lambda: len(acked) > resumed_from + 300, 15.0, "writes to resume")
        stop.set()
        await asyncio.gather(*tasks)
        assert db._errors["read_only"] == 0  # not one write reached a standby
        assert db.primary == name(new)
    assert other == []
    assert len(unknown) <= 10  # at most the statements in flight at the crash (max_size)
    assert set(acked) <= await ids_on(cluster, new)
    failovers = recorder.of(PostgresFailoverDetected)
    assert [(f.old_primary, f.new_primary) for f in failovers] == [(name(old), name(new))]


async def test_clean_switchover_then_old_primary_serves_reads_after_rewind(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """Switchover (fast stop, promote, pg_rewind): idempotent writers and readers see no error,
    and the rewound old primary serves reads without a single read-only error."""
    cluster = await fresh(pg_cluster_factory)
    old, new = cluster.primary, cluster.standbys[0]
    acked: list[int] = []
    errors: list[BaseException] = []
    read_ports: list[int] = []
    ids = itertools.count(1)
    stop = asyncio.Event()
    async with client([n.dsn for n in cluster.nodes], read_route="prefer_standby") as db:

        async def writer() -> None:
            while not stop.is_set():
                i = next(ids)
                try:
                    await db.execute(
                        "INSERT INTO w VALUES ($1, inet_server_port()) ON CONFLICT DO NOTHING",
                        i,
                        idempotent=True,
                    )
                    acked.append(i)
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

        async def reader() -> None:
            while not stop.is_set():
                try:
                    read_ports.append(await db.fetchval("SELECT inet_server_port()"))
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(writer()) for _ in range(20)]
        tasks += [asyncio.create_task(reader()) for _ in range(4)]
        await eventually(lambda: len(acked) > 100, what="writes before the switchover")
        await run(cluster.stop_node, old, "fast")
        await run(cluster.promote, new)
        resumed_from = len(acked)
        await eventually(lambda: len(acked) > resumed_from + 100, 10.0, "writes to resume")
        await run(cluster.rewind_as_standby, old)
        await eventually(readable(db, name(old)), 10.0, "the old primary to serve reads")
        served_before = read_ports.count(old.port)
        await eventually(lambda: read_ports.count(old.port) > served_before + 20, 5.0, "reads")
        stop.set()
        await asyncio.gather(*tasks)
        assert db._errors["read_only"] == 0
    assert errors == []
    assert set(acked) <= await ids_on(cluster, new)


async def test_promotion_while_the_old_primary_is_up_fences_it(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """A standby promoted next to a live primary wins on its higher timeline within one monitor
    interval; the old primary is fenced and gets no write that started after that."""
    cluster = await fresh(pg_cluster_factory)
    old, new = cluster.primary, cluster.standbys[0]
    recorder = Recorder()
    writes: list[tuple[float, int]] = []  # (started at, port that took it)
    unknown: list[CommitOutcomeUnknownError] = []
    ids = itertools.count(1)
    stop = asyncio.Event()
    interval = 0.2
    async with client(
        [n.dsn for n in cluster.nodes], monitor_interval=interval, hooks=[recorder]
    ) as db:

        async def writer() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    port = await db.fetchval(
                        "INSERT INTO w VALUES ($1, inet_server_port()) RETURNING port",
                        next(ids), write=True,
                    )  # fmt: skip
                except CommitOutcomeUnknownError as exc:
                    unknown.append(exc)  # in flight on the old primary when it was fenced
                else:
                    writes.append((started, port))

        tasks = [asyncio.create_task(writer()) for _ in range(5)]
        await eventually(lambda: len(writes) > 50, what="writes before the promotion")
        in_transaction = asyncio.Event()
        fenced = asyncio.Event()

        async def open_transaction() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO w VALUES (-1, inet_server_port())")
                in_transaction.set()
                await fenced.wait()

        transaction = asyncio.create_task(open_transaction())
        await in_transaction.wait()
        await run(cluster.promote, new)  # the old primary keeps running: two primaries
        promoted = time.monotonic()
        old_state = db._topology.nodes[0]
        await eventually(lambda: old_state.fenced is not None, 3.0, "the old primary fenced")
        fenced_at = time.monotonic()
        fenced.set()
        # A transaction open on the old primary is never committed there.
        with pytest.raises(NodeFencedError):
            await transaction
        assert fenced_at - promoted < interval + 0.5
        await eventually(lambda: db.primary == name(new), 2.0, "the new primary confirmed")
        count = len(writes)
        await eventually(lambda: len(writes) > count + 100, 5.0, "writes on the new primary")
        stop.set()
        await asyncio.gather(*tasks)
        assert [p for started, p in writes if started > fenced_at and p == old.port] == []
        assert len(unknown) <= 5 and all(e.node == name(old) for e in unknown)
        report = await db.health()
        assert report.nodes[0].fenced == "stale_timeline" and report.status == "degraded"
    assert -1 not in await ids_on(cluster, old) | await ids_on(cluster, new)
    fence = recorder.of(PostgresNodeFenced)
    assert fence and fence[0].node == name(old) and fence[0].reason == "stale_timeline"


async def test_connections_held_on_a_node_fenced_meanwhile_raise_node_fenced(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """Connections the caller holds on a primary that gets fenced (a standby promoted next to
    it): every path (transaction, prepared statement, cursor, acquire(), the caller's own
    transaction) raises NodeFencedError, inside the block and out of it, never an asyncpg
    error."""
    cluster = await fresh(pg_cluster_factory)
    new = cluster.standbys[0]
    async with client([n.dsn for n in cluster.nodes], max_size=10) as db:
        old_state = db._topology.nodes[0]

        async def fence() -> None:
            await run(cluster.promote, new)
            await eventually(lambda: old_state.fenced is not None, 5.0, "the old primary fenced")

        outcomes = await held_outcomes(db, fence)
        assert outcomes == dict.fromkeys(HELD_PATHS, "NodeFencedError")


async def test_split_brain_old_primary_restarted_on_the_old_timeline_gets_no_writes(
    pg_cluster_factory: PostgresClusterFactory, tmp_path: Path
) -> None:
    """The crashed primary restarted by mistake as a primary (TL1 next to TL2) is fenced; even
    with the real primary down, no write goes to it, not even from a client started then (told
    min_timeline, or reading the fencing record the first client kept)."""
    cluster = await fresh(pg_cluster_factory)
    old, new = cluster.primary, cluster.standbys[0]
    recorder = Recorder()
    ids = itertools.count(1)
    record = FileFencingRecord(tmp_path / "fence.json")
    async with client([n.dsn for n in cluster.nodes], hooks=[recorder], failover_timeout=1.0,
                      fencing_record=record) as db:  # fmt: skip
        await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", next(ids))
        await run(cluster.kill_primary)
        await run(cluster.promote, new)
        await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", next(ids))
        await run(cluster.restart_as_primary, old)  # split brain: TL1 and TL2
        old_state = db._topology.nodes[0]
        await eventually(lambda: old_state.reachable is True, 5.0, "the old primary to answer")
        assert old_state.fenced == "stale_timeline"
        on_old = await ids_on(cluster, old)
        for _ in range(50):
            port = await db.fetchval(
                "INSERT INTO w VALUES ($1, inet_server_port()) RETURNING port", next(ids),
                write=True,
            )  # fmt: skip
            assert port == new.port
        # The real primary goes away: the fenced one still gets nothing.
        await run(cluster.stop_node, new, "fast")
        with pytest.raises(NoPrimaryError):
            await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", next(ids))
        assert await ids_on(cluster, old) == on_old
        # A client started now reaches only the old timeline: min_timeline, or the record the
        # first client kept, keeps it fenced.
        for told in ({"min_timeline": 2}, {"fencing_record": record}):
            async with client([n.dsn for n in cluster.nodes], failover_timeout=0.5,
                              **told) as fresh_db:  # fmt: skip
                with pytest.raises(NoPrimaryError):
                    await fresh_db.execute("INSERT INTO w VALUES ($1, inet_server_port())", 0)
                assert fresh_db._topology.nodes[0].fenced == "stale_timeline", told
        sysid = await query(cluster, old, "SELECT system_identifier FROM pg_control_system()")
        assert await record.load(int(sysid)) == 2
        assert await ids_on(cluster, old) == on_old
        await run(cluster.start_node, new)
        await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", next(ids))
        assert db.primary == name(new)
    fenced = [e for e in recorder.of(PostgresNodeFenced) if e.fenced]
    assert fenced and fenced[0].node == name(old) and fenced[0].winner in (name(new), None)


async def test_one_server_under_two_names_keeps_writing_through_a_promotion(
    pg_cluster_factory: PostgresClusterFactory,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """A proxy in front of the primary (a pooler's address) listed next to the primary's own:
    one server, not a split brain. After a promotion the proxy is moved to the new primary: its
    two names are again one primary and writes go on, with no SplitBrainError."""
    cluster = await fresh(pg_cluster_factory)
    old, new = cluster.primary, cluster.standbys[0]
    proxy = fault_proxy_factory(old.host, old.port)
    nodes = [Node(host=proxy.host, port=proxy.port, name="pooler"), old.dsn, new.dsn]
    ids = itertools.count(1)
    insert = "INSERT INTO w VALUES ($1, inet_server_port())"
    async with client(nodes, user="postgres") as db:
        await db.execute(insert, next(ids))
        # The client starts writing as soon as one name answers as primary; the other name of
        # the same server then becomes its alias, not a second primary.
        direct = db._topology.nodes[1]
        await eventually(lambda: direct.alias_of is not None, 5.0, "the alias to be recognised")
        assert db.primary == "pooler" and db._topology.writes_blocked is None
        assert (await db.health()).nodes[1].alias_of == "pooler"
        await run(cluster.kill_primary)
        await run(cluster.promote, new)
        await run(proxy.retarget, new.host, new.port)
        await run(proxy.reset)
        await eventually(lambda: db.primary == "pooler", 5.0, "the pooler's name to be primary")
        promoted = db._topology.nodes[2]
        await eventually(lambda: promoted.role == "primary", 5.0, "the promotion confirmed")
        for _ in range(20):
            await db.execute(insert, next(ids))
        report = await db.health()
        assert report.writes_blocked is None and report.nodes[2].alias_of == "pooler"
        assert db._topology.failovers == 1  # old server to new, not one per name


async def test_all_nodes_down_fails_fast_with_the_breaker_open_then_recovers(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """A standby down: reads fall back to the primary. Everything down: calls fail at once with
    NoPrimaryError, the primary's breaker opens (its failure events name the driver's error);
    when the nodes return, calls succeed again."""
    cluster = await fresh(pg_cluster_factory)
    primary, standby = cluster.primary, cluster.standbys[0]
    hook = Recorder()
    nodes = [n.dsn for n in cluster.nodes]
    async with client(nodes, breaker_options={"reset_timeout": 1.0}, hooks=[hook]) as db:
        await run(cluster.stop_node, standby, "fast")
        for _ in range(20):
            assert await db.fetchval("SELECT inet_server_port()", route="prefer_standby") == (
                primary.port
            )
        await run(cluster.stop_node, primary, "fast")
        start = time.monotonic()
        results = await asyncio.gather(
            *(db.execute("SELECT 1") for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, NoPrimaryError) for r in results), results
        assert time.monotonic() - start < 2.0
        await eventually(lambda: db._topology.all_down, 2.0, "every node marked down")
        assert db.breaker(name(primary)).state.value == "open"
        failures = [str(e.error) for e in hook.of(BreakerCallFailed) if e.error is not None]
        assert failures, "the breaker reported no failure"
        # A connect failure says so, and which driver error it was (never a bare "connect").
        assert all(f.startswith("not sent (connect): ") for f in failures if "connect" in f)
        assert any("Error" in f.split(": ", 2)[1] for f in failures if f.startswith("not sent"))
        start = time.monotonic()
        for _ in range(100):
            with pytest.raises(NoPrimaryError) as info:
                await db.execute("SELECT 1")
        assert time.monotonic() - start < 0.5  # fast failure: no connect attempt, no wait
        assert info.value.reason == "all_nodes_down"
        report = await db.health()
        assert report.status == "down" and report.active is None
        await run(cluster.start_node, primary)
        await run(cluster.start_node, standby)

        async def write_ok() -> bool:
            try:
                await db.execute("SELECT 1")
            except NoPrimaryError:
                return False
            return True

        await eventually(write_ok, 10.0, "writes to succeed again")
        assert db.breaker(name(primary)).state.value == "closed"


async def test_auto_promote_promotes_the_standby_without_an_ha_manager(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """With auto_promote, the client promotes the standby itself once no primary is left."""
    cluster = await fresh(pg_cluster_factory)
    standby = cluster.standbys[0]
    recorder = Recorder()
    async with client(
        [n.dsn for n in cluster.nodes], auto_promote=True, promote_after=0.3, hooks=[recorder]
    ) as db:
        await db.execute("INSERT INTO w VALUES (1, inet_server_port())")
        await run(cluster.kill_primary)
        port = await db.fetchval(
            "INSERT INTO w VALUES (2, inet_server_port()) RETURNING port", write=True
        )
        assert port == standby.port
        await eventually(lambda: bool(recorder.of(PostgresPromotionAttempted)), 5.0, "the event")
        promoted = recorder.of(PostgresPromotionAttempted)
        assert promoted and promoted[0].succeeded and promoted[0].node == name(standby)
        assert await db.fetchval("SELECT pg_is_in_recovery()") is False


async def test_ten_failovers_in_a_row_leak_no_connection_and_no_task(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """Ten crash-and-promote cycles: each resumes writes quickly, pools stay bounded, and after
    close no task and no server connection of the client is left."""
    cluster = await fresh(pg_cluster_factory)
    before = {t for t in asyncio.all_tasks() if not t.done()}
    recorder = Recorder()
    resume_times: list[float] = []
    async with client(
        [n.dsn for n in cluster.nodes], name="ten", max_size=4, hooks=[recorder]
    ) as db:
        for k in range(10):
            old, new = cluster.primary, cluster.standbys[0]
            await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", 2 * k)
            await run(cluster.wait_replayed, new)  # asynchronous replication: lose nothing
            await run(cluster.kill_primary)
            await run(cluster.promote, new)
            promoted = time.monotonic()
            await db.execute("INSERT INTO w VALUES ($1, inet_server_port())", 2 * k + 1)
            resume_times.append(time.monotonic() - promoted)
            assert db.primary == name(new)
            await run(cluster.rewind_as_standby, old)
            await eventually(readable(db, name(old)), 5.0, "the old primary back as a standby")
            for rt in db._runtimes:
                size, _ = rt.pool_stats()
                assert size <= 4 and rt.in_use == 0
        assert len(db._background) == 0
        connections = await query(
            cluster, cluster.primary,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ten'",
        )  # fmt: skip
        assert int(connections) <= 4 + 1  # the pool, plus the monitor's connection
    assert len(recorder.of(PostgresFailoverDetected)) == 10
    assert max(resume_times) < 1.0, resume_times
    await asyncio.sleep(0)
    after = {t for t in asyncio.all_tasks() if not t.done()}
    assert after <= before

    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ten'"

    async def no_server_connections() -> bool:
        counts = [await query(cluster, n, sql) for n in cluster.nodes]
        return counts == ["0", "0"]

    await eventually(no_server_connections, 5.0, "the client's connections to be gone")
    rows = await ids_on(cluster, cluster.primary)
    assert rows == set(range(20))
