"""One node at run time: its asyncpg pool, its breaker, its monitor connection and its probe."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import asyncpg.pool

from ..circuit_breaker import CircuitBreaker
from ._config import Node
from ._errors import ConnectionGone, Kind, NodeFencedError, classify
from ._topology import NodeState, Observation

__all__ = [
    "EXPIRED",
    "AcquireExpired",
    "AcquireGuard",
    "ConnectSettings",
    "NodeRuntime",
    "RoleMismatch",
    "classify_on",
    "gone_error",
    "is_closed",
    "terminate",
]

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
       (SELECT status FROM pg_stat_wal_receiver) AS receiver_status,
       extract(epoch FROM pg_postmaster_start_time())::float8 AS started_at
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectSettings:
    """How every connection to a node is made (shared by all nodes of a client)."""

    user: str | None
    password: str | None = field(repr=False)
    database: str | None
    ssl: Any
    server_settings: Mapping[str, str]
    connect_kwargs: Mapping[str, Any]
    connect_timeout: float
    command_timeout: float
    tcp_keepalive: bool
    tcp_user_timeout: float | None


EXPIRED = -math.inf
"""The deadline of a wait that :class:`AcquireGuard` has cancelled."""


class AcquireExpired(Exception):
    """A wait for a pooled connection outlived ``acquire_timeout`` (internal)."""


class AcquireGuard:
    """Bounds waits for a pooled connection, without a timer per wait.

    ``asyncio.timeout()`` around every acquire costs more than the rest of the client's overhead
    put together (a timer handle scheduled and cancelled each time), asyncpg's own
    ``acquire(timeout=)`` runs every acquire in a task of its own (``wait_for``), and a queue of
    our own in front of the pool's adds a second wait and wake-up to every call. Instead, calls
    wait in the pool as usual and register their task here. Waits all have the same limit, so
    their deadlines come in the order they were registered: one watchdog task, alive only while
    someone waits, sleeps until the oldest deadline and cancels the waits that outlived it (the
    cancellation is then undone and turned into :class:`AcquireExpired`).

    The waits are kept in a dict, task to deadline, oldest first: registering one allocates
    nothing, and one that ends is forgotten at once, in O(1). (A queue of records could only be
    trimmed at its front, and the pool does not serve its waiters strictly in order: a call that
    comes just as a connection is given back can take it before the waiter woken for it, so
    finished records would pile up behind an older wait until the watchdog next woke.)

    The client inlines :meth:`acquire` (``enter``, ``expired``, ``leave``) on every call's path.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.waiting: dict[Any, float] = {}
        """The waiting tasks and their deadlines, oldest first; ``EXPIRED`` once cancelled."""
        self.watchdog: asyncio.Task[None] | None = None

    async def acquire(self, pool: asyncpg.Pool[Any]) -> Any:
        """``await pool.acquire()``, raising :class:`AcquireExpired` after ``timeout``."""
        task = self.enter()
        try:
            return await pool.acquire()
        except asyncio.CancelledError:
            if self.expired(task):
                raise AcquireExpired() from None
            raise
        finally:
            self.leave(task)

    def enter(self) -> Any:
        """Register the current task's wait and return the task; :meth:`leave` it once over."""
        task = asyncio.current_task()
        self.waiting[task] = time.monotonic() + self.timeout
        if self.watchdog is None:
            self.start_watchdog()
        return task

    def leave(self, task: Any) -> None:
        """The wait of ``task`` is over."""
        del self.waiting[task]

    def expired(self, task: Any) -> bool:
        """After a cancellation: whether the watchdog caused it (then it is undone)."""
        if self.waiting.get(task) != EXPIRED:
            return False
        if hasattr(task, "uncancel"):
            task.uncancel()
        return True

    def start_watchdog(self) -> None:
        """Start the task that cancels overdue waits; it stops once nobody waits."""
        self.watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        waiting = self.waiting
        try:
            while True:
                now = time.monotonic()
                overdue: list[Any] = []
                wake: float | None = None
                for task, deadline in waiting.items():
                    if deadline > now:
                        wake = deadline
                        break
                    if deadline != EXPIRED:  # else: cancelled already, not resumed yet
                        overdue.append(task)
                for task in overdue:
                    waiting[task] = EXPIRED  # the task forgets its wait itself, in leave()
                    task.cancel()
                if wake is None:
                    return
                await asyncio.sleep(wake - now)
        finally:
            self.watchdog = None

    def close(self) -> None:
        """Stop the watchdog."""
        if self.watchdog is not None:
            self.watchdog.cancel()


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
        acquire_timeout: float,
        on_role_mismatch: Callable[[NodeRuntime], None],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = state
        self.breaker = breaker
        self.settings = settings
        self.client = client
        self.max_size = max_size
        self.guard = AcquireGuard(acquire_timeout)
        self.in_use = 0
        """Calls that are acquiring or holding one of this node's pooled connections."""
        self.pool: asyncpg.Pool[Any] | None = None
        self.synced_generation = state.generation
        self.monitor_conn: asyncpg.Connection[Any] | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._pool_options: dict[str, Any] = {}
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
        connect: Any = asyncpg.connect  # typed overloads do not take a kwargs dict
        conn: asyncpg.Connection[Any] = await connect(
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
        """The ``connect=`` hook of this node's pool: per-node timeout and role check."""
        state = self.state
        if state.fenced is not None:
            raise NodeFencedError(client=self.client, node=self.name, reason=state.fenced)
        generation = state.generation
        conn = await self.connect(
            connection_class=kwargs.get("connection_class", asyncpg.Connection),
            record_class=kwargs.get("record_class"),
        )
        try:
            hot = conn.get_settings().in_hot_standby
        except AttributeError:  # before PostgreSQL 14: ask
            try:
                hot = "on" if await conn.fetchval("SELECT pg_is_in_recovery()") else "off"
            except BaseException:
                terminate(conn)
                raise
        if state.role == "primary" and hot == "on":
            # The node went into recovery since the last probe: not a connection for writes.
            terminate(conn)
            self._on_role_mismatch(self)
            raise RoleMismatch(self.name)
        if state.generation != generation:
            # The node changed while this connection was being made: it may belong to the old
            # state (asyncpg would keep it, as its pool generation was read before connecting).
            terminate(conn)
            raise RoleMismatch(self.name)
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
        options: dict[str, Any] = {
            # min_size stays 0: asyncpg would keep reconnecting a dead node in the background
            # (and log each failure); the client warms the pools of live nodes itself.
            "min_size": 0,
            "max_size": self.max_size,
            "max_queries": max_queries,
            "max_inactive_connection_lifetime": max_inactive_connection_lifetime,
            "connect": self.pool_connect,
            "init": init,
            "setup": setup,
        }
        if record_class is not None:
            options["record_class"] = record_class
        self._pool_options = options
        self.pool = await self._new_pool()

    async def _new_pool(self) -> asyncpg.Pool[Any]:
        create_pool: Any = asyncpg.create_pool  # typed overloads do not take a kwargs dict
        pool: asyncpg.Pool[Any] = create_pool(**self._pool_options)
        await pool
        return pool

    async def evict(self, *, terminate_active: bool) -> None:
        """Make every pooled connection of this node be replaced (after a role change).

        Args:
            terminate_active: Also kill the connections in use now (the node was fenced or
                demoted): the pool is replaced by a new one and the old one terminated, which
                costs nothing per call, unlike tracking the connections handed out.
        """
        self.synced_generation = self.state.generation
        pool = self.pool
        if pool is None:
            return
        if terminate_active:
            self.pool = await self._new_pool()
            pool.terminate()
        else:
            await pool.expire_connections()

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
                terminate(conn)
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
            started_at=row["started_at"],
        )

    async def promote(self, timeout: float) -> bool:
        """Run ``pg_promote()`` on this node, over a connection of its own."""
        wait = max(1, int(timeout))
        # Not the monitor's connection: the probe loop keeps using that one meanwhile.
        conn = await self.connect(command_timeout=wait + 5)
        try:
            return bool(await conn.fetchval("SELECT pg_promote(true, $1)", wait))
        finally:
            terminate(conn)

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self, timeout: float) -> None:
        """Close the pool and the monitor connection; terminate what does not close in time."""
        conn, self.monitor_conn = self.monitor_conn, None
        if conn is not None:
            terminate(conn)
        self.guard.close()
        pool, self.pool = self.pool, None
        if pool is None:
            return
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


def terminate(conn: Any) -> None:
    """Close a connection (or pooled proxy) at once; a no-op when it is already released or gone."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass  # a pooled proxy whose connection already went back or died: nothing to close


def is_closed(conn: Any) -> bool:
    """Whether a connection (or pooled proxy) is closed; a released proxy counts as closed."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def classify_on(exc: BaseException, conn: Any) -> Kind:
    """:func:`classify`, knowing the connection the error came from.

    Once the connection is closed, any error but the server's own is the connection's loss.
    """
    kind = classify(exc)
    if kind is Kind.SQL and not isinstance(exc, asyncpg.PostgresError) and is_closed(conn):
        return Kind.LOST
    return kind


def gone_error(exc: BaseException, conn: Any) -> BaseException:
    """``exc``, or a :class:`ConnectionGone` caused by it when it only says the connection is."""
    if classify(exc) is Kind.SQL and classify_on(exc, conn) is Kind.LOST:
        gone = ConnectionGone(f"connection closed under the call: {type(exc).__name__}: {exc}")
        gone.__cause__ = exc
        return gone
    return exc


class RoleMismatch(Exception):
    """A new connection found the node in another role than the topology says (internal)."""


def _tune_socket(
    conn: asyncpg.Connection[Any], keepalive: bool, user_timeout: float | None
) -> None:
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
