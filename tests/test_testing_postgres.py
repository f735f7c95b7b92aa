"""LocalPostgresCluster: real primaries and standbys, failover, rewind and split brain."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from veritas_resilience.testing import (
    LocalPostgresCluster,
    PostgresClusterFactory,
    PostgresNode,
    PostgresQueryError,
    free_port,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(pg_cluster_factory: PostgresClusterFactory) -> LocalPostgresCluster:
    """One primary and one standby, shared by the tests that leave the topology alone."""
    return pg_cluster_factory(standbys=1)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A temp folder the postgres user can enter (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="veritas-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server_pids(base: Path) -> list[int]:
    """Live, non-zombie processes whose command line mentions ``base``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(base).encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_free_port_returns_distinct_bindable_ports() -> None:
    """free_port() never repeats itself and returns ports that can be listened on."""
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert not {5432, 6379} & set(ports)
    for port in ports[:3]:
        with socket.create_server(("127.0.0.1", port)):
            pass


def test_missing_binaries_fail_loudly(scratch_dir: Path) -> None:
    """Without PostgreSQL binaries start() raises a RuntimeError that says how to install them."""
    with pytest.raises(RuntimeError, match="apt-get install -y postgresql-15"):
        LocalPostgresCluster(bindir=scratch_dir).start()


def test_invalid_arguments_are_rejected() -> None:
    """Impossible topologies are refused at construction."""
    with pytest.raises(ValueError, match="standbys"):
        LocalPostgresCluster(standbys=-1)
    with pytest.raises(ValueError, match="synchronous"):
        LocalPostgresCluster(standbys=0, synchronous=True)


def test_nodes_listen_on_free_loopback_ports(cluster: LocalPostgresCluster) -> None:
    """Each node has its own loopback port (never 5432), a DSN and a running postmaster."""
    primary, standby = cluster.nodes
    assert cluster.primary is primary
    assert cluster.standbys == (standby,)
    assert standby.upstream is primary
    assert len({primary.port, standby.port}) == 2
    assert 5432 not in (primary.port, standby.port)
    assert primary.dsn == f"postgresql://postgres@127.0.0.1:{primary.port}/postgres"
    assert cluster.dsn.endswith(f"@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres")
    assert primary.is_running
    assert standby.is_running
    assert cluster.server_version is not None
    assert cluster.server_version >= 13
    assert cluster.query(primary, "SHOW port") == str(primary.port)


def test_servers_run_as_an_unprivileged_user(cluster: LocalPostgresCluster) -> None:
    """As root, the postmasters run as the postgres user; otherwise as the current user."""
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    for node in cluster.nodes:
        assert node.pid is not None
        status = Path(f"/proc/{node.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert int(uid_line.split()[1]) == expected


def test_write_on_primary_is_read_on_standby(cluster: LocalPostgresCluster) -> None:
    """A row committed on the primary is on the standby once wait_replayed() returns."""
    primary, standby = cluster.primary, cluster.standbys[0]
    cluster.query(primary, "CREATE TABLE replicated (x int); INSERT INTO replicated VALUES (42)")
    cluster.wait_replayed(standby)
    assert cluster.query(standby, "SELECT x FROM replicated") == "42"
    assert cluster.is_in_recovery(standby)
    assert not cluster.is_in_recovery(primary)


def test_standby_rejects_writes(cluster: LocalPostgresCluster) -> None:
    """A write on the standby fails with SQLSTATE 25006 (read-only transaction)."""
    with pytest.raises(PostgresQueryError) as info:
        cluster.query(cluster.standbys[0], "CREATE TABLE nope (x int)")
    assert info.value.sqlstate == "25006"
    assert info.value.node == "n2"


@pytest.mark.anyio
async def test_standby_rejects_writes_through_asyncpg(cluster: LocalPostgresCluster) -> None:
    """asyncpg sees the standby as read-only too: ReadOnlySQLTransactionError."""
    conn = await asyncpg.connect(cluster.standbys[0].dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("CREATE TABLE nope (x int)")
    finally:
        await conn.close()


def test_apply_delay_makes_the_standby_lag(cluster: LocalPostgresCluster) -> None:
    """With recovery_min_apply_delay the standby shows a commit only after the delay."""
    primary, standby = cluster.primary, cluster.standbys[0]
    cluster.query(primary, "CREATE TABLE delayed (x int)")
    cluster.wait_replayed(standby)
    cluster.set_apply_delay(standby, "500ms")
    try:
        assert cluster.query(standby, "SHOW recovery_min_apply_delay") == "500ms"
        started = time.monotonic()
        cluster.query(primary, "INSERT INTO delayed VALUES (1)")
        assert cluster.query(standby, "SELECT count(*) FROM delayed") == "0"
        cluster.wait_replayed(standby)
        assert time.monotonic() - started >= 0.4
        assert cluster.query(standby, "SELECT count(*) FROM delayed") == "1"
    finally:
        cluster.set_apply_delay(standby, None)
    assert cluster.query(standby, "SHOW recovery_min_apply_delay") == "0"


def test_set_apply_delay_returns_only_once_the_standby_runs_with_it(
    cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_apply_delay() waits for the reload to take effect, however late the server takes it."""
    standby = cluster.standbys[0]
    query = cluster.query
    timers: list[threading.Timer] = []

    def late_reload(node: PostgresNode, sql: str) -> str:
        if sql != "SELECT pg_reload_conf()":
            return query(node, sql)
        # pg_reload_conf() only signals the server: here the signal lands 0.3 s later.
        timer = threading.Timer(0.3, query, (node, sql))
        timers.append(timer)
        timer.start()
        return "t"

    monkeypatch.setattr(cluster, "query", late_reload)
    try:
        for delay, shown in (("700ms", "700ms"), ("1.5s", "1500ms"), (None, "0")):
            started = time.monotonic()
            cluster.set_apply_delay(standby, delay)
            assert query(standby, "SHOW recovery_min_apply_delay") == shown
            assert time.monotonic() - started >= 0.3
    finally:
        monkeypatch.undo()
        for timer in timers:
            timer.join()
        cluster.set_apply_delay(standby, None)


def test_set_apply_delay_fails_clearly_when_the_standby_does_not_reload(
    cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that never lands raises TimeoutError naming the node; a bad delay, ValueError."""
    standby = cluster.standbys[0]
    query = cluster.query
    with pytest.raises(ValueError, match="duration"):
        cluster.set_apply_delay(standby, "soon")
    monkeypatch.setattr(
        cluster, "query", lambda node, sql: "t" if "pg_reload_conf" in sql else query(node, sql)
    )
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"{standby.name} to reload its configuration"):
            cluster.set_apply_delay(standby, "700ms", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 5.0
    finally:
        monkeypatch.undo()
        cluster.set_apply_delay(standby, None)
    assert query(standby, "SHOW recovery_min_apply_delay") == "0"


def test_alter_system_makes_a_read_only_primary(cluster: LocalPostgresCluster) -> None:
    """alter_system() applies a setting with a reload, and None resets it."""
    primary = cluster.primary
    cluster.alter_system(primary, "default_transaction_read_only", True)
    try:
        with pytest.raises(PostgresQueryError) as info:
            cluster.query(primary, "CREATE TABLE nope (x int)")
        assert info.value.sqlstate == "25006"
    finally:
        cluster.alter_system(primary, "default_transaction_read_only", None)
    assert cluster.query(primary, "SHOW default_transaction_read_only") == "off"
    with pytest.raises(ValueError, match="setting"):
        cluster.alter_system(primary, "x; DROP TABLE t", 1)


@pytest.mark.anyio
async def test_smart_shutdown_refuses_new_sessions(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """A smart shutdown with a session held open answers new connections with 57P03."""
    cluster = pg_cluster_factory(standbys=0)
    node = cluster.primary
    held = await asyncpg.connect(node.dsn)
    try:
        cluster.stop_node(node, "smart", wait=False)
        deadline = time.monotonic() + 5
        while True:  # the postmaster handles the signal asynchronously
            try:
                await (await asyncpg.connect(node.dsn)).close()
            except asyncpg.CannotConnectNowError:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert node.is_running
        assert await held.fetchval("SELECT 1") == 1
    finally:
        await held.close()
    cluster.stop_node(node)  # waits for the shutdown to end
    assert not cluster.node("n1").is_running
    cluster.start_node(node)
    assert cluster.query(node, "SELECT 1") == "1"
    cluster.stop()


def test_synchronous_standby_acknowledges_commits(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """With synchronous=True the primary counts the standby, by its application_name, as sync."""
    sync = pg_cluster_factory(standbys=1, synchronous=True)
    state = sync.query(sync.primary, "SELECT application_name, sync_state FROM pg_stat_replication")
    assert state == "n2|quorum"
    sync.query(sync.primary, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    sync.stop()


def test_failover_follow_and_rewind(pg_cluster_factory: PostgresClusterFactory) -> None:
    """Crash + promote moves writes to timeline 2; the others follow or are rewound as standbys."""
    cluster = pg_cluster_factory(standbys=2)
    n1, n2, n3 = cluster.nodes
    cluster.query(n1, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    cluster.wait_replayed(n2)
    cluster.wait_replayed(n3)

    assert cluster.kill_primary() is n1
    assert not cluster.node("n1").is_running
    with pytest.raises(PostgresQueryError) as info:
        cluster.query(n1, "SELECT 1")
    assert info.value.sqlstate is None  # nobody answered

    cluster.promote(n2)
    assert cluster.primary is n2
    assert not cluster.is_in_recovery(n2)
    assert cluster.query(n2, "SELECT timeline_id FROM pg_control_checkpoint()") == "2"
    assert cluster.timeline(n2) == 2
    cluster.query(n2, "INSERT INTO t VALUES (2)")

    cluster.follow(n3)
    assert n3.upstream is n2
    cluster.wait_replayed(n3)
    assert cluster.query(n3, "SELECT string_agg(x::text, ',' ORDER BY x) FROM t") == "1,2"

    cluster.rewind_as_standby(n1)
    assert n1.is_running
    assert n1.role == "standby"
    assert n1.upstream is n2
    assert cluster.is_in_recovery(n1)
    assert cluster.timeline(n1) == 2
    cluster.query(n2, "INSERT INTO t VALUES (3)")
    cluster.wait_replayed(n1)
    assert cluster.query(n1, "SELECT string_agg(x::text, ',' ORDER BY x) FROM t") == "1,2,3"
    assert cluster.standbys == (n1, n3)
    # The rewound node's replication settings are its own, not the ones pg_rewind copied.
    auto_conf = (n1.data_dir / "postgresql.auto.conf").read_text()
    assert auto_conf.count("primary_conninfo") == 1
    assert f"port={n2.port} user=postgres application_name=n1" in auto_conf
    cluster.stop()


def test_restart_as_primary_makes_a_split_brain(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """The old primary restarted without standby.signal takes writes on timeline 1 until rewound."""
    cluster = pg_cluster_factory(standbys=1)
    old, new = cluster.nodes
    cluster.kill_primary()
    cluster.promote(new)
    cluster.restart_as_primary(old)

    assert cluster.primary is new
    assert not cluster.is_in_recovery(old)
    assert not cluster.is_in_recovery(new)
    assert cluster.timeline(old) == 1
    assert cluster.timeline(new) == 2
    cluster.query(old, "CREATE TABLE lost (x int)")  # the stale side takes writes

    # Rewinding the stale side discards its writes; its own apply delay survives pg_rewind,
    # which replaces postgresql.auto.conf with the source's.
    cluster.set_apply_delay(old, "100ms")
    cluster.rewind_as_standby(old)
    assert cluster.timeline(old) == 2
    assert cluster.query(old, "SHOW recovery_min_apply_delay") == "100ms"
    assert cluster.query(new, "SHOW recovery_min_apply_delay") == "0"
    assert cluster.query(old, "SELECT to_regclass('lost') IS NULL") == "t"

    cluster.rebuild_as_standby(old)  # a fresh pg_basebackup clone keeps the kit's settings too
    assert cluster.is_in_recovery(old)
    assert cluster.query(old, "SHOW recovery_min_apply_delay") == "100ms"
    cluster.stop()


def test_stop_leaves_no_process_and_no_folder() -> None:
    """stop() kills every server and deletes the temporary folder; a second stop() is harmless."""
    with LocalPostgresCluster(standbys=1) as cluster:
        base = cluster.base_dir
        assert base is not None
        assert base.is_dir()
        assert len(_server_pids(base)) >= 2
    assert not base.exists()
    assert _server_pids(base) == []
    assert all(not node.is_running for node in cluster.nodes)
    cluster.stop()


def test_failed_start_cleans_up(scratch_dir: Path) -> None:
    """When a standby fails to start, the running primary is stopped and the folder deleted."""
    # Standbys refuse max_wal_senders below the primary's at its last checkpoint (initdb's 10).
    cluster = LocalPostgresCluster(
        standbys=1, base_dir=scratch_dir, settings={"max_wal_senders": 0}
    )
    with pytest.raises(RuntimeError, match="n2 log") as info:
        cluster.start()
    assert "max_wal_senders" in str(info.value)
    # Only the initdb template, kept for the next cluster until the interpreter exits, remains.
    assert [p.name[:20] for p in scratch_dir.iterdir()] == ["veritas-pg-template-"]
    assert _server_pids(scratch_dir) == []
