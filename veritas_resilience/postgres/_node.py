"""One node at run time: its asyncpg pool, its breaker, its monitor connection and its probe."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import asyncpg.pool

from ..circuit_breaker import CircuitBreaker
from ._config import Node
from ._errors import NodeFencedError
from ._topology import NodeState, Observation

__all__ = ["NodeConnection", "NodeRuntime", "ConnectSettings"]

# One round trip says everything the topology needs. The timeline of a primary comes from its
# current WAL file name, which is exact even before the first checkpoint after a promotion; a
# standby's is the one its WAL receiver gets (readable with pg_monitor / pg_read_all_stats),
# else the one of its last restartpoint.
PROBE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('default_transaction_read_only') = 'on' AS read_only,
       (SELECT system_identifier FROM pg_control_system()) AS system_identifier,
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END AS timeline,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
            ELSE pg_current_wal_lsn() END AS lsn,
       pg_last_wal_receive_lsn() AS receive_lsn,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver_status
"""


class NodeConnection(asyncpg.Connection):  # type: ignore[type-arg]
    """The connection class of the client's pools: remembers the node generation it was made in."""

    __slots__ = ("_vr_generation",)

    _vr_generation: int


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """How every connection to a node is made (shared by all nodes of a client)."""

    user: str | None
    password: str | None
    database: str | None
    ssl: Any
    server_settings: Mapping[str, str]
    connect_kwargs: Mapping[str, Any]
    connect_timeout: float
    command_timeout: float
    tcp_keepalive: bool
    tcp_user_timeout: float | None


class NodeRuntime:
    """The run-time side of one node: pool, breaker, monitor connection, bookkeeping."""

    def __init__(
        self,
        spec: Node,
        state: NodeState,
        breaker: CircuitBreaker,
        settings: ConnectSettings,
        *,
        client: str,
        max_size: int,
        on_role_mismatch: Callable[[NodeRuntime], None],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = state
        self.breaker = breaker
        self.settings = settings
        self.client = client
        self.max_size = max_size
        self.pool: asyncpg.Pool[Any] | None = None
        self.in_use = 0
        """Calls that are acquiring or holding one of this node's pooled connections."""
        self.active: set[Any] = set()
        """Connections handed out right now (terminated at once when the node is fenced)."""
        self.synced_generation = state.generation
        self.monitor_conn: asyncpg.Connection[Any] | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.promoting = False
        self._on_role_mismatch = on_role_mismatch

    # -- connections ---------------------------------------------------------------------------

    async def connect(
        self,
        *,
        command_timeout: float | None = None,
        connection_class: type[asyncpg.Connection[Any]] = asyncpg.Connection,
        record_class: type[Any] | None = None,
    ) -> asyncpg.Connection[Any]:
        """Open one connection to this node, within the node's own connect timeout."""
        s = self.settings
        kwargs: dict[str, Any] = dict(s.connect_kwargs)
        if s.ssl is not None:
            kwargs["ssl"] = s.ssl
        if record_class is not None:
            kwargs["record_class"] = record_class
        if self.spec.dsn is not None:
            kwargs["dsn"] = self.spec.dsn
        else:
            kwargs.update(host=self.spec.host, port=self.spec.port)
            if s.user is not None:
                kwargs["user"] = s.user
            if s.password is not None:
                kwargs["password"] = s.password
            if s.database is not None:
                kwargs["database"] = s.database
        # asyncpg's timeout covers its whole host walk (name lookup included); with one host it
        # is this node's own, which is the point: a silent node cannot eat the others' budget.
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            timeout=s.connect_timeout,
            command_timeout=s.command_timeout if command_timeout is None else command_timeout,
            server_settings=dict(s.server_settings),
            target_session_attrs="any",  # PGTARGETSESSIONATTRS must not filter our nodes
            connection_class=connection_class,
            **kwargs,
        )
        _tune_socket(conn, s.tcp_keepalive, s.tcp_user_timeout)
        return conn

    async def pool_connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection[Any]:
        """The ``connect=`` hook of this node's pool: per-node timeout, role check, tagging."""
        state = self.state
        if state.fenced is not None:
            raise NodeFencedError(client=self.client, node=self.name, reason=state.fenced)
        generation = state.generation
        conn = await self.connect(
            connection_class=kwargs.get("connection_class", NodeConnection),
            record_class=kwargs.get("record_class"),
        )
        try:
            hot = conn.get_settings().in_hot_standby
        except AttributeError:  # before PostgreSQL 14: ask
            try:
                hot = "on" if await conn.fetchval("SELECT pg_is_in_recovery()") else "off"
            except BaseException:
                conn.terminate()
                raise
        if state.role == "primary" and hot == "on":
            # The node went into recovery since the last probe: not a connection for writes.
            conn.terminate()
            self._on_role_mismatch(self)
            raise RoleMismatch(self.name)
        conn._vr_generation = generation  # type: ignore[attr-defined]
        return conn

    async def start_pool(
        self,
        *,
        max_queries: int,
        max_inactive_connection_lifetime: float,
        init: Callable[[asyncpg.Connection[Any]], Awaitable[None]] | None,
        setup: Callable[[Any], Awaitable[None]] | None,
        record_class: type[Any] | None,
    ) -> None:
        """Create the node's pool; it opens no connection until one is needed."""
        kwargs: dict[str, Any] = {}
        if record_class is not None:
            kwargs["record_class"] = record_class
        # min_size stays 0: asyncpg would keep reconnecting a dead node in the background (and
        # log each failure); the client warms the pools of live nodes itself.
        pool: asyncpg.Pool[Any] = asyncpg.create_pool(
            min_size=0,
            max_size=self.max_size,
            max_queries=max_queries,
            max_inactive_connection_lifetime=max_inactive_connection_lifetime,
            connect=self.pool_connect,
            init=init,
            setup=setup,
            connection_class=NodeConnection,
            **kwargs,
        )
        await pool
        self.pool = pool

    async def evict(self, *, terminate_active: bool) -> None:
        """Make every pooled connection of this node be replaced (after a role change)."""
        self.synced_generation = self.state.generation
        pool = self.pool
        if pool is None:
            return
        await pool.expire_connections()
        if terminate_active:
            for conn in list(self.active):
                conn.terminate()

    # -- probing -------------------------------------------------------------------------------

    async def probe(self, timeout: float) -> Observation:
        """Ask the node its role, timeline, identifier and WAL position (bounded by ``timeout``).

        Raises:
            Exception: Whatever connecting or querying raised; the monitor connection is then
                dropped and the next probe reconnects.
        """
        conn = self.monitor_conn
        try:
            if conn is None or conn.is_closed():
                self.monitor_conn = None
                conn = await self.connect(command_timeout=timeout)
                self.monitor_conn = conn
            row = await conn.fetchrow(PROBE_SQL, timeout=timeout)
        except BaseException:
            if conn is not None:
                conn.terminate()
            self.monitor_conn = None
            raise
        assert row is not None
        status = row["receiver_status"]
        return Observation(
            in_recovery=bool(row["in_recovery"]),
            read_only=bool(row["read_only"]),
            system_identifier=row["system_identifier"],
            timeline=row["timeline"],
            lsn=row["lsn"],
            receive_lsn=row["receive_lsn"],
            streaming=None if status is None else status == "streaming",
        )

    async def promote(self, timeout: float) -> bool:
        """Run ``pg_promote()`` on this node over its monitor connection."""
        conn = self.monitor_conn
        if conn is None or conn.is_closed():
            conn = await self.connect(command_timeout=timeout + 5)
            self.monitor_conn = conn
        wait = max(1, int(timeout))
        return bool(await conn.fetchval("SELECT pg_promote(true, $1)", wait, timeout=wait + 5))

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self, timeout: float) -> None:
        """Close the pool and the monitor connection; terminate what does not close in time."""
        conn, self.monitor_conn = self.monitor_conn, None
        if conn is not None:
            conn.terminate()
        pool, self.pool = self.pool, None
        if pool is None:
            return
        for c in list(self.active):
            c.terminate()
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except (Exception, asyncio.CancelledError):
            pool.terminate()
            raise

    def pool_stats(self) -> tuple[int, int]:
        """``(open connections, idle connections)`` of the pool."""
        pool = self.pool
        if pool is None:
            return 0, 0
        return pool.get_size(), pool.get_idle_size()

    @property
    def waiters(self) -> int:
        """Calls waiting for a free connection of this node's pool."""
        return max(0, self.in_use - self.max_size)

    def __repr__(self) -> str:
        return f"<NodeRuntime {self.name} {self.state!r}>"


class RoleMismatch(Exception):
    """A new connection found the node in another role than the topology says (internal)."""


def _tune_socket(conn: asyncpg.Connection[Any], keepalive: bool, user_timeout: float | None) -> None:
    # asyncpg sets only TCP_NODELAY: a peer that vanishes without a FIN or RST (dead host,
    # dropped link) then goes unnoticed on an idle connection. Keepalive probes and
    # TCP_USER_TIMEOUT make the kernel give up on it.
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        if user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(user_timeout * 1000))
            )
