"""The failover client: routing, retries, transactions, read-your-writes, monitor, health."""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import math
import time
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import asyncpg

from .._clock import MONOTONIC, Clock
from .._hooks import Instrumented
from .._validate import Seconds
from ..circuit_breaker import DEFAULT_BUCKETS, CircuitBreaker
from ..errors import CircuitOpenError
from ..events import CircuitState, Hook
from ..instrumentation.prometheus import HistogramValue, cumulative_buckets, define_metric
from ._config import Node, NodeSpec, Route, coerce_nodes
from ._errors import (
    NODE_FAILURES,
    AcquireTimeoutError,
    CommitOutcomeUnknownError,
    Kind,
    NodeFencedError,
    NoPrimaryError,
    NotSent,
    QueryTimeoutError,
    SplitBrainError,
    SystemIdentifierMismatchError,
    breaker_failure,
    breaker_ignored,
    classify,
    sent_nothing,
)
from ._events import PostgresCallFailed, PostgresFencingRecordFailed, PostgresPromotionAttempted
from ._fencing import FencingRecord
from ._node import (
    AcquireExpired,
    NodeRuntime,
    RoleMismatch,
    classify_on,
    gone_error,
    terminate,
)
from ._session import Session, add_tried
from ._settings import ClientSettings
from ._topology import Role, Topology

__all__ = ["FailoverClient", "NodeHealth", "PostgresHealth", "WriteToken"]

_MAX_LSN = 2**64 - 1
_bisect = bisect.bisect_left
_current_task = asyncio.current_task
_monotonic = time.monotonic
_ROLES: tuple[Role, ...] = ("primary", "standby", "unknown")
_ERROR_KINDS = (
    "connect", "connection_lost", "shutdown", "timeout", "read_only", "commit_unknown",
    "no_primary", "fenced", "split_brain", "acquire_timeout",
)  # fmt: skip
_RYW_OUTCOMES = ("replayed", "waited", "fallback")

_STARTING, _RUNNING, _CLOSED = "starting", "running", "closed"
_NOT_SETTINGS = frozenset({"self", "nodes", "clock", "hooks"})

define_metric("veritas_postgres_node_up", "gauge", "Whether the node answers probes.",
              ("client", "node"))  # fmt: skip
define_metric(
    "veritas_postgres_node_role",
    "gauge",
    "The node's role as probed (one-hot: 1 for the current role).",
    ("client", "node", "role"),
)
define_metric("veritas_postgres_node_timeline", "gauge", "The node's timeline (0 when unknown).",
              ("client", "node"))  # fmt: skip
define_metric(
    "veritas_postgres_node_fenced",
    "gauge",
    "Whether the node is fenced (no writes, no reads): a split-brain loser or a foreign node.",
    ("client", "node"),
)
define_metric(
    "veritas_postgres_replication_lag_bytes",
    "gauge",
    "Replay lag of a standby behind the primary, in bytes.",
    ("client", "node"),
)
define_metric(
    "veritas_postgres_replication_lag_seconds",
    "gauge",
    "Replay lag of a standby behind the primary, in seconds (estimated).",
    ("client", "node"),
)
define_metric("veritas_postgres_pool_connections", "gauge", "Open connections of the node's pool.",
              ("client", "node"))  # fmt: skip
define_metric("veritas_postgres_pool_idle", "gauge", "Idle connections of the node's pool.",
              ("client", "node"))  # fmt: skip
define_metric(
    "veritas_postgres_pool_waiters",
    "gauge",
    "Calls waiting for a free connection of the node's pool.",
    ("client", "node"),
)
define_metric(
    "veritas_postgres_primary_available",
    "gauge",
    "Whether a writable primary is known (1) or not (0).",
    ("client",),
)
define_metric("veritas_postgres_failovers", "counter",
              "Failovers detected: the primary moved to another node.", ("client",))  # fmt: skip
define_metric("veritas_postgres_fencings", "counter", "Nodes fenced.", ("client",))
define_metric(
    "veritas_postgres_no_primary_seconds",
    "counter",
    "Seconds spent without a writable primary.",
    ("client",),
)
define_metric(
    "veritas_postgres_query_duration_seconds",
    "histogram",
    "Duration of calls (acquire and statement), by the role of the node that served them.",
    ("client", "role"),
)
define_metric("veritas_postgres_errors", "counter", "Errors seen on nodes or raised, by kind.",
              ("client", "kind"))  # fmt: skip
define_metric("veritas_postgres_retries", "counter", "Calls tried again on a node.", ("client",))
define_metric(
    "veritas_postgres_read_your_writes",
    "counter",
    "Reads that carried a write token, by outcome: replayed (no wait), waited, fallback "
    "(served by the primary).",
    ("client", "outcome"),
)
define_metric("veritas_postgres_promotions", "counter",
              "Standbys promoted by the client itself (auto_promote).", ("client",))  # fmt: skip
define_metric(
    "veritas_postgres_writes_blocked",
    "gauge",
    "Whether writes are stopped altogether (one-hot by reason: split_brain, system_identifier,"
    " fencing_record).",
    ("client", "reason"),
)
define_metric(
    "veritas_postgres_replication_lag_limit_bytes",
    "gauge",
    "The client's max_lag_bytes: a standby further behind serves no reads (absent: no limit).",
    ("client",),
)
define_metric(
    "veritas_postgres_replication_lag_limit_seconds",
    "gauge",
    "The client's max_lag_seconds: a standby further behind serves no reads (absent: no limit).",
    ("client",),
)


@dataclass(frozen=True, slots=True)
class WriteToken:
    """A position in the primary's WAL, taken after a write: a read that carries it sees the write.

    Get one from :meth:`FailoverClient.write_token` (or automatically with
    ``read_your_writes=True``) and pass it as ``after=`` to a read routed to standbys: a standby
    serves the read only once it has replayed up to ``lsn``, else the primary does.

    Attributes:
        lsn: ``pg_current_wal_insert_lsn()`` after the write, as an integer.
        timeline: The primary's timeline then; a standby on another timeline is not used.
    """

    lsn: int
    timeline: int | None = None

    def __str__(self) -> str:
        return f"{self.lsn >> 32:X}/{self.lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """What :meth:`FailoverClient.health` says about one node. No addresses beyond its name.

    Attributes:
        name: The node's name.
        reachable: Whether it answers probes (``None`` before the first probe).
        role: ``"primary"``, ``"standby"`` or ``"unknown"``.
        active: Whether it takes the writes now.
        readable: Whether it serves reads routed to standbys now.
        fenced: Why it is fenced, or ``None``.
        timeline: Its timeline, when known.
        lag_bytes: Replay lag behind the primary in bytes (standbys).
        lag_seconds: Replay lag in seconds, estimated (standbys).
        breaker: The state of its circuit breaker.
        pool_size: Open connections in its pool.
        pool_idle: Idle connections in its pool.
        pool_waiters: Calls waiting for one of its connections.
        last_error: The type of the last probe error, when the last probe failed.
        alias_of: When this node is the same server as another one reached under another name
            (a pooler and the server behind it), the name of the node that takes its writes.
    """

    name: str
    reachable: bool | None
    role: Role
    active: bool
    readable: bool
    fenced: str | None
    timeline: int | None
    lag_bytes: int | None
    lag_seconds: float | None
    breaker: str
    pool_size: int
    pool_idle: int
    pool_waiters: int
    last_error: str | None
    alias_of: str | None = None


@dataclass(frozen=True, slots=True)
class PostgresHealth:
    """The client's health: which node is active, and each node's state.

    Attributes:
        name: The client's name.
        status: ``"ok"`` (a writable primary, every node well), ``"degraded"`` (a writable
            primary, but a node is down, fenced, lagging or its breaker is not closed) or
            ``"down"`` (no writable primary).
        active: The node that takes writes now (the guide's ``active``), or ``None``.
        writes_blocked: Why writes are stopped altogether (``"split_brain"``,
            ``"system_identifier"``, or ``"fencing_record"`` until the fencing record is
            read), or ``None``.
        nodes: Every node, in the configured order (for two nodes: the guide's ``primary`` and
            ``secondary``).
    """

    name: str
    status: Literal["ok", "degraded", "down"]
    active: str | None
    writes_blocked: str | None
    nodes: tuple[NodeHealth, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"status", "active", "writes_blocked", "nodes": {name: ...}}``."""
        return {
            "name": self.name,
            "status": self.status,
            "active": self.active,
            "writes_blocked": self.writes_blocked,
            "nodes": {
                n.name: {
                    "reachable": n.reachable,
                    "role": n.role,
                    "active": n.active,
                    "readable": n.readable,
                    "fenced": n.fenced,
                    "timeline": n.timeline,
                    "lag_bytes": n.lag_bytes,
                    "lag_seconds": n.lag_seconds,
                    "breaker": n.breaker,
                    "pool": {"size": n.pool_size, "idle": n.pool_idle, "waiters": n.pool_waiters},
                    "last_error": n.last_error,
                    "alias_of": n.alias_of,
                }
                for n in self.nodes
            },
        }


_EXECUTE, _EXECUTEMANY, _FETCH, _FETCHROW, _FETCHVAL, _TOKEN = range(6)
_TOKEN_SQL = "SELECT pg_current_wal_insert_lsn()"


class FailoverClient(Instrumented):
    """A PostgreSQL client over asyncpg that follows the primary through failovers.

    Give it the cluster's nodes in order of preference (the guide's primary and secondary are
    the two-node case). It keeps one asyncpg pool per node, probes every node in the background
    (role, timeline, system identifier, WAL position) and routes each call::

        db = FailoverClient(
            ["postgresql://app:secret@db1:5432/app", "postgresql://app:secret@db2:5432/app"],
            name="orders-db",
        )
        async with db:
            await db.execute("INSERT INTO orders (id) VALUES ($1)", 42)      # the primary
            rows = await db.fetch("SELECT * FROM orders", route="prefer_standby")
            async with db.transaction() as conn:
                await conn.execute("UPDATE stock SET n = n - 1 WHERE id = $1", 7)

    What it guarantees:

    - **Writes go only to the node confirmed primary.** The role is probed, not assumed;
      pooled connections are evicted when their node's role changes; a primary on an older
      timeline than another (split brain) is fenced; nodes of different clusters stop writes.
    - **Failover is waited out.** When the primary fails, calls wait up to ``failover_timeout``
      for a node to become primary, and fail at once when every node is down.
    - **Errors say what happened.** Work that never reached the server is retried on the new
      primary; an autocommit write or a COMMIT whose answer was lost raises
      :class:`CommitOutcomeUnknownError` and is never retried unless ``idempotent=True``.
    - **Everything is bounded**: connecting (per node), every statement (``command_timeout``),
      waiting for a pooled connection (``acquire_timeout``), releasing one after a timeout.

    Args:
        nodes: The nodes, in order of preference: :class:`Node` objects, single-host
            ``postgresql://`` URLs, ``(host, port)`` tuples, or one multi-host URL.
        name: The client's name in errors, logs and metric labels; keep it bounded.
        user: Role to connect as (for nodes given without a DSN).
        password: Its password. Never shown anywhere.
        database: Database to connect to (for nodes given without a DSN).
        ssl: asyncpg's ``ssl`` argument.
        server_settings: Session settings; ``application_name`` defaults to ``name``.
        connect_kwargs: Other :func:`asyncpg.connect` arguments (``statement_cache_size``...).
        read_route: Where reads go unless a call says otherwise: ``"primary"`` or
            ``"prefer_standby"`` (a standby within the lag limits, else the primary).
        max_lag_bytes: A standby more than this many bytes of WAL behind the primary serves no
            reads (``None``: no limit). 16 MiB by default.
        max_lag_seconds: A standby more than this many seconds behind serves no reads (estimated
            from the primary's WAL positions over time; ``None``: no limit).
        connect_timeout: Seconds to connect to one node, for each node on its own (> 0).
        command_timeout: Default limit on every statement, in seconds (> 0). Always set: without
            it asyncpg waits forever on a dead link.
        acquire_timeout: Seconds to wait for a free pooled connection when the pool is full.
        release_timeout: Seconds a connection may take to go back to its pool after a timed-out
            or cancelled statement (the server cancels the statement meanwhile); it is then
            closed.
        failover_timeout: Seconds a call waits for a writable primary (> 0).
        monitor_interval: Seconds between probes of a node while all is well (> 0).
        fast_interval: Seconds between probes while something is changing: after an error that
            hints a role change, while a call waits for a primary, while a node is confirming a
            new state (> 0).
        probe_timeout: Limit of one probe query, in seconds (> 0).
        fall: Failed probes in a row that mark a node down (>= 1).
        rise: Good probes in a row that bring a node back, confirm a promotion, or let a
            lagging standby serve reads again (>= 1).
        min_size: Connections opened to the primary at start (warm-up), >= 0.
        max_size: Maximum connections per node pool (>= 1).
        max_queries: Queries after which a pooled connection is replaced.
        max_inactive_connection_lifetime: Seconds after which an idle pooled connection closes
            (0 disables).
        init: Coroutine run on every new pooled connection (asyncpg's ``init=``).
        setup: Coroutine run at every acquire (asyncpg's ``setup=``; costs what it runs).
        record_class: asyncpg's ``record_class`` for the pools.
        read_your_writes: After every write through the client, take a :class:`WriteToken`
            (one extra round trip) and make later reads in the same task context wait for it on
            a standby, or go to the primary.
        ryw_timeout: Seconds a read waits for a standby to replay a token before it goes to the
            primary (> 0).
        auto_promote: Promote the most advanced standby (``pg_promote()``) when no node has been
            primary for ``promote_after`` seconds. For small setups without an HA manager; see
            the risks in docs/postgres.md before turning it on.
        promote_after: Seconds without any primary before ``auto_promote`` acts (> 0).
        system_identifier: The cluster's ``system_identifier`` if known in advance: nodes that
            report another one are fenced. Without it, the first node's is learned and any
            mismatch stops writes altogether.
        min_timeline: Never write to a primary on a timeline below this one (>= 1), even when it
            is the only node reachable: it is fenced as stale. The client remembers the highest
            timeline it has seen, but only while it runs; set this (from your HA manager's
            record of the current timeline) so a client started while only an old, fenced
            primary answers does not write to it. ``None``: no floor.
        fencing_record: A :class:`FencingRecord` the clients share (e.g. a
            :class:`FileFencingRecord`): the client saves the highest timeline it sees there,
            and reads it back before its first write, so a restart cannot forget fencing.
            Until it has read the record it takes no writes.
        breaker_options: Options for each node's :class:`~veritas_resilience.CircuitBreaker`
            (default ``failure_threshold=5, reset_timeout=2.0``). Connection failures and
            timeouts count as failures; SQL errors do not.
        tcp_keepalive: Turn on TCP keepalive (5 s idle, 1 s interval, 3 probes) on every socket.
        tcp_user_timeout: ``TCP_USER_TIMEOUT`` in seconds: unacknowledged data older than this
            drops the connection (Linux; ``None`` to leave it).
        clock: Time source of the topology decisions and durations.
        hooks: Hooks for this client and its breakers; the process defaults when ``None``.

    Raises:
        ValueError: If a setting is out of its range (the message names it).
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec] | str,
        *,
        name: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        ssl: Any = None,
        server_settings: Mapping[str, str] | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        read_route: Route = "primary",
        max_lag_bytes: int | None = 16 * 1024 * 1024,
        max_lag_seconds: Seconds | None = None,
        connect_timeout: Seconds = 2.0,
        command_timeout: Seconds = 5.0,
        acquire_timeout: Seconds = 5.0,
        release_timeout: Seconds = 1.0,
        failover_timeout: Seconds = 30.0,
        monitor_interval: Seconds = 0.5,
        fast_interval: Seconds = 0.025,
        probe_timeout: Seconds = 1.0,
        fall: int = 2,
        rise: int = 2,
        min_size: int = 1,
        max_size: int = 10,
        max_queries: int = 50000,
        max_inactive_connection_lifetime: Seconds = 300.0,
        init: Callable[[asyncpg.Connection[Any]], Awaitable[None]] | None = None,
        setup: Callable[[Any], Awaitable[None]] | None = None,
        record_class: type[Any] | None = None,
        read_your_writes: bool = False,
        ryw_timeout: Seconds = 0.5,
        auto_promote: bool = False,
        promote_after: Seconds = 5.0,
        system_identifier: int | None = None,
        min_timeline: int | None = None,
        fencing_record: FencingRecord | None = None,
        breaker_options: Mapping[str, Any] | None = None,
        tcp_keepalive: bool = True,
        tcp_user_timeout: Seconds | None = 10.0,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        # Every keyword but nodes, clock and hooks is a setting, validated on its own (a test
        # checks that the two lists match).
        options = {k: v for k, v in locals().items() if k not in _NOT_SETTINGS}
        self._settings = st = ClientSettings(**options)
        specs = coerce_nodes(nodes)
        self._name = name
        self._specs = specs
        self._clock = clock
        self._now = clock.monotonic
        self._connect = st.connect_settings()
        self._fencing = st.fencing_record
        self._fence_saved = 0
        self._fence_task: asyncio.Task[None] | None = None
        self._fence_retry_at = -math.inf
        self._topology = Topology(
            [spec.name for spec in specs],
            client=name,
            fall=st.fall,
            rise=st.rise,
            max_lag_bytes=st.max_lag_bytes,
            max_lag_seconds=st.max_lag_seconds,
            system_identifier=st.system_identifier,
            min_timeline=st.min_timeline,
            await_floor=st.fencing_record is not None,
            clock=clock,
        )
        self._runtimes: tuple[NodeRuntime, ...] = tuple(
            NodeRuntime(
                spec,
                state,
                CircuitBreaker(
                    name=f"{name}/{spec.name}",
                    failure_on=breaker_failure,
                    ignore_on=breaker_ignored,
                    clock=clock,
                    hooks=hooks,
                    **(st.breaker_options or {}),
                ),
                self._connect,
                client=name,
                max_size=st.max_size,
                acquire_timeout=st.acquire_timeout,
                on_role_mismatch=self._on_role_mismatch,
            )
            for spec, state in zip(specs, self._topology.nodes)
        )
        self._state = _STARTING
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._primary_rt: NodeRuntime | None = None
        self._changed: asyncio.Event | None = None
        self._seen_version = -1
        self._waiting = 0
        self._last_hint = -math.inf
        self._background: set[asyncio.Task[Any]] = set()
        self._promotion: asyncio.Task[None] | None = None
        self._last_promotion = -math.inf
        self._token: contextvars.ContextVar[WriteToken | None] = contextvars.ContextVar(
            f"veritas_postgres_token_{id(self)}", default=None
        )
        # Metrics: plain counters, read at scrape time.
        self._bounds = DEFAULT_BUCKETS
        # Durations served by [the primary, a standby].
        self._hist = ([0] * (len(DEFAULT_BUCKETS) + 1), [0] * (len(DEFAULT_BUCKETS) + 1))
        self._hist_sum = [0.0, 0.0]
        self._errors = dict.fromkeys(_ERROR_KINDS, 0)
        self._retries = 0
        self._ryw_counts = dict.fromkeys(_RYW_OUTCOMES, 0)
        self._promotions = 0
        self._attempt_fn = self._attempt  # bound once: one allocation less per call
        self._init_hooks(hooks)

    # -- identity and inspection --------------------------------------------------------------

    @property
    def name(self) -> str:
        """The client's name."""
        return self._name

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The configured nodes, in order."""
        return self._specs

    @property
    def primary(self) -> str | None:
        """The name of the node taking writes now, or ``None``."""
        p = self._topology.primary
        return None if p is None else p.name

    @property
    def last_write_token(self) -> WriteToken | None:
        """The token of the last write in this task context (with ``read_your_writes=True``)."""
        return self._token.get()

    def breaker(self, node: str) -> CircuitBreaker:
        """The circuit breaker of the node called ``node``.

        Raises:
            KeyError: If no node has that name.
        """
        for rt in self._runtimes:
            if rt.name == node:
                return rt.breaker
        raise KeyError(node)

    def __repr__(self) -> str:
        names = ", ".join(rt.name for rt in self._runtimes)
        return (
            f"<FailoverClient {self._name!r} nodes=[{names}] primary={self.primary} {self._state}>"
        )

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the pools, start the topology monitor, and wait for the first probes.

        Returns once a primary is known or every node answered its first probe (or failed to),
        bounded by ``connect_timeout + probe_timeout``; the monitor keeps probing afterwards.
        Calls start the client themselves if needed. Idempotent.

        Raises:
            RuntimeError: If the client was closed.
        """
        if self._state == _RUNNING:
            return
        if self._state == _CLOSED:
            raise RuntimeError(f"postgres client {self._name!r} is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._state != _STARTING:
                return
            # The loop the pools belong to: current_task(loop) skips looking it up (which costs
            # a getpid() system call each time) on every call that waits for a connection.
            self._loop = asyncio.get_running_loop()
            for rt in self._runtimes:
                await rt.start_pool(
                    max_queries=self._settings.max_queries,
                    max_inactive_connection_lifetime=self._settings.max_inactive_connection_lifetime,
                    init=self._settings.init,
                    setup=self._settings.setup,
                    record_class=self._settings.record_class,
                )
            self._changed = asyncio.Event()
            self._state = _RUNNING
            for rt in self._runtimes:
                rt.task = asyncio.create_task(
                    self._monitor(rt), name=f"veritas-postgres-monitor:{self._name}:{rt.name}"
                )
            deadline = self._now() + self._settings.connect_timeout + self._settings.probe_timeout
            topo = self._topology
            while topo.primary is None and not topo.probed and self._now() < deadline:
                await self._wait_changed(deadline - self._now())
            await self._warm_up()

    async def _warm_up(self) -> None:
        rt = self._primary_rt
        if rt is None or rt.pool is None or self._settings.min_size == 0:
            return

        async def one() -> None:
            pool = rt.pool
            assert pool is not None
            rt.in_use += 1
            try:
                conn = await pool.acquire()
                await pool.release(conn)
            finally:
                rt.in_use -= 1

        results = await asyncio.gather(
            *(one() for _ in range(self._settings.min_size)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result

    async def close(self) -> None:
        """Stop the monitor, close every pool and connection. Idempotent.

        Calls waiting for a primary fail with :class:`NoPrimaryError` (reason ``"closed"``).
        Connections still in use are terminated after ``release_timeout`` plus a second.
        """
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        tasks = [rt.task for rt in self._runtimes if rt.task is not None]
        if self._promotion is not None:
            tasks.append(self._promotion)
        fence = self._fence_task
        if fence is not None:
            if not self._topology.floor_pending:
                # A timeline being saved is worth its bounded wait: another client may need it.
                await asyncio.wait([fence], timeout=self._settings.probe_timeout)
            tasks.append(fence)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._notify()
        if self._background:
            await asyncio.wait(list(self._background), timeout=self._settings.release_timeout + 1)
        for rt in self._runtimes:
            rt.task = None
            try:
                await rt.close(self._settings.release_timeout + 1)
            except Exception:
                pass  # the pool was terminated instead; keep closing the others
        for task in list(self._background):
            task.cancel()
        self._hookset.detach(self)

    async def __aenter__(self) -> FailoverClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the calls ------------------------------------------------------------------------------

    def execute(
        self, query: str, *args: Any, timeout: float | None = None, idempotent: bool = False
    ) -> Coroutine[Any, Any, str]:
        """Run a statement on the primary (asyncpg's ``execute``); return its status.

        Args:
            query: The SQL.
            *args: Its parameters.
            timeout: Statement timeout in seconds; ``command_timeout`` by default.
            idempotent: Whether running it twice is harmless. Only then is it retried after its
                connection died mid-flight; otherwise that raises
                :class:`CommitOutcomeUnknownError`.

        Raises:
            NoPrimaryError: If no writable primary appeared within ``failover_timeout``, or
                none can (every node down, breaker open).
            CommitOutcomeUnknownError: If the connection died (or the statement timed out)
                after it was sent, and it is not idempotent.
            SplitBrainError: If writes are stopped because the primary is ambiguous.
            QueryTimeoutError: If an idempotent statement timed out.
            asyncpg.PostgresError: SQL errors (constraint violations...) pass through.
        """
        # A plain method returning the coroutine: one frame less on every await inside a call.
        return self._call(_EXECUTE, query, args, timeout, None, True, idempotent, "primary", None)

    def executemany(
        self,
        command: str,
        args: Iterable[Sequence[Any]],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Coroutine[Any, Any, None]:
        """Run a statement once per argument tuple on the primary (asyncpg's ``executemany``).

        Args:
            command: The SQL.
            args: One sequence of parameters per execution.
            timeout: Timeout in seconds for the whole batch; ``command_timeout`` by default.
            idempotent: See :meth:`execute`.

        Raises:
            See :meth:`execute`.
        """
        return self._call(
            _EXECUTEMANY, command, list(args), timeout, None, True, idempotent, "primary", None
        )

    def fetch(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        route: Route | None = None,
        write: bool = False,
        idempotent: bool | None = None,
        after: WriteToken | None = None,
        record_class: type[Any] | None = None,
    ) -> Coroutine[Any, Any, list[Any]]:
        """Run a query and return its rows (asyncpg's ``fetch``).

        Args:
            query: The SQL.
            *args: Its parameters.
            timeout: Statement timeout in seconds; ``command_timeout`` by default.
            route: ``"primary"`` or ``"prefer_standby"``; the client's ``read_route`` by default.
            write: The query writes (``INSERT ... RETURNING``): run it on the primary and treat
                it like :meth:`execute` (not retried after it was sent unless ``idempotent``).
            idempotent: Whether it may be retried after its connection died mid-flight; true
                for reads, false for writes, by default.
            after: A :class:`WriteToken`: a standby serves the read only once it has replayed
                it (else the primary does). With ``read_your_writes=True`` the task's last
                token is used by default.
            record_class: asyncpg's ``record_class`` for this query.

        Raises:
            See :meth:`execute`.
        """
        return self._call(
            _FETCH, query, args, timeout, record_class, write,
            (not write) if idempotent is None else idempotent,
            "primary" if write else (route or self._settings.read_route), after,
        )  # fmt: skip

    def fetchrow(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        route: Route | None = None,
        write: bool = False,
        idempotent: bool | None = None,
        after: WriteToken | None = None,
        record_class: type[Any] | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Run a query and return its first row, or ``None`` (asyncpg's ``fetchrow``).

        Args and errors as :meth:`fetch`.
        """
        return self._call(
            _FETCHROW, query, args, timeout, record_class, write,
            (not write) if idempotent is None else idempotent,
            "primary" if write else (route or self._settings.read_route), after,
        )  # fmt: skip

    def fetchval(
        self,
        query: str,
        *args: Any,
        column: int = 0,
        timeout: float | None = None,
        route: Route | None = None,
        write: bool = False,
        idempotent: bool | None = None,
        after: WriteToken | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Run a query and return one value of its first row (asyncpg's ``fetchval``).

        Args and errors as :meth:`fetch`; ``column`` picks the column (0 by default).
        """
        return self._call(
            _FETCHVAL, query, args, timeout, column, write,
            (not write) if idempotent is None else idempotent,
            "primary" if write else (route or self._settings.read_route), after,
        )  # fmt: skip

    async def write_token(self) -> WriteToken:
        """Return the primary's current WAL insert position as a :class:`WriteToken`.

        Taken after a write (even one made elsewhere), it lets a later read on a standby wait
        until that write is visible there: ``await db.fetch(..., after=token)``.

        Raises:
            NoPrimaryError: If there is no writable primary.
        """
        lsn = await self._call(_TOKEN, "", (), None, None, False, True, "primary", None)
        p = self._topology.primary
        return WriteToken(int(lsn), None if p is None else p.timeline)

    def transaction(
        self,
        *,
        isolation: Literal["serializable", "repeatable_read", "read_committed"] | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> AbstractAsyncContextManager[Any]:
        """A transaction on the primary: ``async with db.transaction() as conn: ...``.

        Entering waits for a writable primary and retries what never reached the server; the
        block runs once. On a clean exit the transaction is committed; an exception rolls it
        back and is re-raised, mapped when it concerns the topology.

        ``conn`` is asyncpg's pooled connection, wrapped: its calls, and those of the prepared
        statements, cursors and transactions it gives, raise the errors below as they happen
        (the server's SQL errors pass unchanged). It goes back to the pool when the block ends.

        Raises:
            CommitOutcomeUnknownError: The connection died (or COMMIT timed out) after COMMIT
                was sent: it may have committed. Never retried.
            ConnectionLostError: The connection died before COMMIT: the transaction was rolled
                back.
            NotPrimaryError: The node stopped being the primary (25006): rolled back.
            NodeFencedError: The node was fenced during the transaction: rolled back.
            QueryTimeoutError: A statement timed out: rolled back.
            NoPrimaryError, SplitBrainError: When entering, as for :meth:`execute`.
        """
        options = {"isolation": isolation, "readonly": readonly, "deferrable": deferrable}
        return Session(self, "primary", options)

    def acquire(self, *, route: Route = "primary") -> AbstractAsyncContextManager[Any]:
        """Hold one pooled connection: ``async with db.acquire() as conn: ...``.

        The connection comes from the primary (``route="primary"``) or a standby within the lag
        limits (``"prefer_standby"``). Statements on it are not retried. Errors that concern the
        node or the link are mapped as in :meth:`transaction`; an autocommit statement on the
        primary whose connection died after it was sent raises
        :class:`CommitOutcomeUnknownError`. Prefer the client's own calls and
        :meth:`transaction`.

        Raises:
            NoPrimaryError, SplitBrainError: When entering, as for :meth:`execute`.
            PostgresError: From the block's statements (:class:`NodeFencedError`,
                :class:`ConnectionLostError`, :class:`CommitOutcomeUnknownError`,
                :class:`QueryTimeoutError`, :class:`NotPrimaryError`), as for
                :meth:`transaction`.
        """
        return Session(self, route, None)

    # -- routing and retries ---------------------------------------------------------------------

    async def _call(
        self,
        op: int,
        query: str,
        args: Any,
        timeout: float | None,
        extra: Any,
        write: bool,
        idempotent: bool,
        route: Route,
        after: WriteToken | None,
    ) -> Any:
        if self._state != _RUNNING:
            await self._ensure_running()
        topo = self._topology
        token: WriteToken | None = None
        standby_ok = route == "prefer_standby" and not write
        if standby_ok:
            token = (
                after
                if after is not None
                else (self._token.get() if self._settings.read_your_writes else None)
            )
        deadline: float | None = None
        tried: set[NodeRuntime] | None = None
        last: BaseException | None = None
        trial_waited = False
        while True:
            version = topo.version
            node: NodeRuntime | None = None
            if standby_ok:
                node = self._pick_standby(token, tried)
            on_standby = node is not None
            if node is None:
                node = self._primary_rt
                if node is None:
                    node, deadline = await self._wait_for_primary(deadline, last)
            try:
                return await node.breaker.call(
                    self._attempt_fn, node, op, query, args, timeout, extra, write,
                    token if on_standby else None,
                )  # fmt: skip
            except NotSent as exc:
                last = exc.error or exc
                if exc.kind == "closed":
                    raise NoPrimaryError(client=self._name, reason="closed") from None
                if exc.kind != "ryw_fallback":  # not a failure: the standby was behind
                    self._failed(node, exc.kind, exc.error, retried=True)
                if on_standby:
                    tried = add_tried(tried, node)
                    continue  # another standby, or the primary
                if exc.kind == "acquire_timeout":
                    raise exc.error or exc from None
            except CircuitOpenError as exc:
                if on_standby:
                    tried = add_tried(tried, node)
                    continue
                if not node.state.suspect:
                    await self._breaker_wait(node, exc, deadline, trial_waited)
                    trial_waited = True
                    continue
                last = exc  # the monitor has yet to confirm what happened: wait for it
            except Exception as exc:
                kind = classify(exc)
                if kind is Kind.SQL:
                    raise
                last = exc
                if kind is Kind.READ_ONLY:
                    if on_standby:
                        raise  # a write sent as a read: asyncpg's error says exactly that
                    self._failed(node, kind.value, exc, retried=True)
                elif kind is Kind.TIMEOUT:
                    self._failed(node, kind.value, exc, retried=False)
                    if write and not idempotent:
                        self._errors["commit_unknown"] += 1
                        raise CommitOutcomeUnknownError(
                            client=self._name, node=node.name, reason="timeout"
                        ) from exc
                    raise QueryTimeoutError(
                        client=self._name,
                        node=node.name,
                        timeout=self._settings.command_timeout if timeout is None else timeout,
                    ) from exc
                elif not idempotent:
                    self._failed(node, kind.value, exc, retried=False)
                    self._errors["commit_unknown"] += 1
                    raise CommitOutcomeUnknownError(
                        client=self._name,
                        node=node.name,
                        reason="shutdown" if kind is Kind.SHUTDOWN else "connection_lost",
                    ) from exc
                else:
                    self._failed(node, kind.value, exc, retried=True)
                    if on_standby:
                        tried = add_tried(tried, node)
                        continue
            # Retry on the primary once the topology has caught up (or shortly anyway).
            deadline = await self._retry_later(version, deadline, last)

    async def _attempt(
        self,
        node: NodeRuntime,
        op: int,
        query: str,
        args: Any,
        timeout: float | None,
        extra: Any,
        write: bool,
        token: WriteToken | None,
    ) -> Any:
        pool = node.pool
        if pool is None:
            raise NotSent("closed")
        now = self._now
        start = now()
        in_use = node.in_use = node.in_use + 1
        try:
            if in_use > node.max_size:
                # The pool is full: wait, within acquire_timeout (AcquireGuard.acquire, inline:
                # this is every waiting call's path).
                guard = node.guard
                waiting = guard.waiting
                task = _current_task(self._loop)
                waiting[task] = _monotonic() + guard.timeout
                if guard.watchdog is None:
                    guard.start_watchdog()
                try:
                    conn = await pool.acquire()
                except asyncio.CancelledError:
                    if guard.expired(task):
                        raise AcquireExpired() from None
                    raise
                finally:
                    del waiting[task]
            else:
                conn = await pool.acquire()
        except Exception as exc:
            node.in_use -= 1
            raise self._acquire_failure(node, exc) from exc
        except BaseException:
            node.in_use -= 1
            raise
        inline = True
        try:
            if token is not None:
                await self._wait_replayed(conn, node, token)
            # The statement, inline: a helper returning the driver's coroutine would cost a call.
            if op == _FETCHVAL:
                result = await conn.fetchval(query, *args, column=extra, timeout=timeout)
            elif op == _EXECUTE:
                result = await conn.execute(query, *args, timeout=timeout)
            elif op == _FETCH:
                result = await conn.fetch(query, *args, timeout=timeout, record_class=extra)
            elif op == _FETCHROW:
                result = await conn.fetchrow(query, *args, timeout=timeout, record_class=extra)
            elif op == _EXECUTEMANY:
                await conn.executemany(query, args, timeout=timeout)
                result = None
            else:
                result = await conn.fetchval(_TOKEN_SQL, timeout=timeout)
            if write and self._settings.read_your_writes:
                await self._take_token(conn, node)
        except BaseException as exc:
            if isinstance(exc, NotSent):
                raise
            if sent_nothing(exc):
                terminate(conn)
                raise NotSent("stale", exc) from exc
            kind = classify_on(exc, conn) if isinstance(exc, Exception) else None
            if kind is None or kind is Kind.TIMEOUT:
                # The statement is being cancelled: let it go back to the pool (or be closed)
                # in the background, and raise now.
                inline = False
                self._spawn(self._release(node, pool, conn, self._settings.release_timeout))
            elif kind in NODE_FAILURES:
                terminate(conn)
                gone = gone_error(exc, conn)
                if gone is not exc:
                    raise gone from exc
            raise
        finally:
            if inline:
                try:
                    await pool.release(conn)
                except Exception:
                    terminate(conn)
                finally:
                    node.in_use -= 1
        elapsed = now() - start
        k = 1 if token is not None or node.state.role == "standby" else 0
        self._hist[k][_bisect(self._bounds, elapsed)] += 1
        self._hist_sum[k] += elapsed
        return result

    def _acquire_failure(self, node: NodeRuntime, exc: Exception) -> NotSent:
        if isinstance(exc, RoleMismatch):
            return NotSent("stale", exc)
        if isinstance(exc, NodeFencedError):
            return NotSent("fenced", exc)
        if isinstance(exc, AcquireExpired):
            error = AcquireTimeoutError(
                client=self._name, node=node.name, timeout=self._settings.acquire_timeout
            )
            return NotSent("acquire_timeout", error)
        return NotSent("connect", exc)

    async def _release(
        self, node: NodeRuntime, pool: Any, conn: Any, timeout: float | None
    ) -> None:
        # ``pool`` is the one the connection came from: the node may have a new one by now.
        try:
            await pool.release(conn, timeout=timeout)
        except Exception:
            terminate(conn)
        finally:
            node.in_use -= 1

    def _pick_standby(
        self, token: WriteToken | None, tried: set[NodeRuntime] | None
    ) -> NodeRuntime | None:
        for state in self._topology.readable:
            rt = self._runtimes[state.index]
            if tried is not None and rt in tried:
                continue
            if token is not None:
                if token.lsn == _MAX_LSN:
                    return None
                if (
                    token.timeline is not None
                    and state.timeline is not None
                    and token.timeline != state.timeline
                ):
                    continue
            return rt
        return None

    async def _wait_primary(self, deadline: float, last: BaseException | None) -> NodeRuntime:
        topo = self._topology
        self._waiting += 1
        try:
            while True:
                if self._state == _CLOSED:
                    raise NoPrimaryError(client=self._name, reason="closed")
                rt = self._primary_rt
                if rt is not None:
                    return rt
                blocked = topo.writes_blocked
                if blocked is not None:
                    self._errors["split_brain"] += 1
                    if blocked[0] == "system_identifier":
                        raise SystemIdentifierMismatchError(client=self._name, nodes=blocked[1])
                    raise SplitBrainError(client=self._name, nodes=blocked[1])
                if topo.probed and topo.all_down:
                    self._errors["no_primary"] += 1
                    raise NoPrimaryError(
                        client=self._name,
                        reason="all_nodes_down",
                        retry_after=self._settings.monitor_interval,
                    ) from last
                if self._now() >= deadline:
                    raise self._no_primary(deadline, last)
                self._wake_all()
                await self._wait_changed(
                    min(deadline - self._now(), self._settings.fast_interval * 4)
                )
        finally:
            self._waiting -= 1

    async def _breaker_wait(
        self,
        node: NodeRuntime,
        exc: CircuitOpenError,
        deadline: float | None,
        trial_waited: bool,
    ) -> None:
        """The primary's breaker rejected a call while its node answers probes.

        A call that has not waited fails at once: the node's calls keep failing. A call that was
        already waiting for a primary (its deadline runs) waits instead, within that deadline,
        for the breaker to admit calls again: its open time to end, then its half-open trial
        to succeed. Otherwise every waiter but one would fail the moment the node heals.

        Returns when the call should try again; raises :class:`NoPrimaryError` (reason
        ``"breaker_open"``) when the breaker will not admit it in time, or the trial it waited
        for failed.
        """
        breaker = node.breaker
        failed = trial_waited and exc.state != "half_open"  # the trial we waited for failed
        if deadline is not None and not failed:
            seen_trial = exc.state == "half_open"
            remaining = deadline - self._now()
            # An open breaker that stays open past the deadline is not worth waiting for; a
            # trial in flight is: it usually ends in one round trip.
            if seen_trial or exc.retry_after < remaining:
                self._waiting += 1
                try:
                    while remaining > 0:
                        state = breaker.state
                        if state is CircuitState.HALF_OPEN:
                            seen_trial = True
                        elif state is not CircuitState.CLOSED and seen_trial:
                            break  # the trial failed: the breaker opened again
                        if breaker.retry_after() == 0.0:
                            return
                        await self._clock.sleep(min(self._settings.fast_interval, remaining))
                        remaining = deadline - self._now()
                finally:
                    self._waiting -= 1
        self._errors["no_primary"] += 1
        raise NoPrimaryError(
            client=self._name,
            reason="breaker_open",
            retry_after=breaker.retry_after(),
            node=node.name,
        ) from exc

    async def _wait_for_primary(
        self, deadline: float | None, last: BaseException | None
    ) -> tuple[NodeRuntime, float]:
        """Wait for a writable primary; the call's deadline starts now if it has none yet."""
        if deadline is None:
            deadline = self._now() + self._settings.failover_timeout
        return await self._wait_primary(deadline, last), deadline

    async def _retry_later(
        self, version: int, deadline: float | None, last: BaseException | None
    ) -> float:
        """Before a call tries again: wait for the topology to change (briefly), within the
        call's deadline (which starts now if it has none yet); past it, raise."""
        now = self._now()
        if deadline is None:
            deadline = now + self._settings.failover_timeout
        if now >= deadline:
            raise self._no_primary(deadline, last)
        self._retries += 1
        await self._await_change(version, deadline)
        return deadline

    def _no_primary(self, deadline: float, last: BaseException | None) -> BaseException:
        self._errors["no_primary"] += 1
        topo = self._topology
        ro = topo.read_only_primary
        waited = self._settings.failover_timeout + self._now() - deadline
        error = NoPrimaryError(
            client=self._name,
            reason="read_only" if ro is not None else "timeout",
            waited=waited,
            node=ro.name if ro is not None else None,
        )
        error.__cause__ = last
        return error

    async def _await_change(self, version: int, deadline: float) -> None:
        if self._topology.version != version:
            return
        self._waiting += 1
        try:
            self._wake_all()
            remaining = deadline - self._now()
            if remaining > 0:
                await self._wait_changed(min(remaining, self._settings.fast_interval * 4))
        finally:
            self._waiting -= 1

    async def _wait_changed(self, timeout: float) -> None:
        event = self._changed
        if event is None or timeout <= 0:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            pass

    async def _ensure_running(self) -> None:
        if self._state == _CLOSED:
            raise NoPrimaryError(client=self._name, reason="closed")
        await self.start()

    def _failed(
        self, node: NodeRuntime | None, kind: str, error: BaseException | None, *, retried: bool
    ) -> None:
        if kind in self._errors:
            self._errors[kind] += 1
        if node is not None and kind in ("connect", "connection_lost", "shutdown", "read_only",
                                         "timeout", "stale", "fenced"):  # fmt: skip
            self._hint(node)
        if self._w_failed:
            self._emit(
                PostgresCallFailed(
                    name=self._name,
                    node=None if node is None else node.name,
                    error_kind=kind,
                    retried=retried,
                    error=error,
                )
            )

    def _hint(self, node: NodeRuntime) -> None:
        # An error that may mean a role change: re-probe that node now, and the others too when
        # it was the primary (one of them may have been promoted).
        self._topology.hint(node.state)
        self._last_hint = self._now()
        if node.state is self._topology.primary or node.state.role == "primary":
            self._wake_all()
        else:
            node.wake.set()

    def _on_role_mismatch(self, node: NodeRuntime) -> None:
        self._hint(node)

    def _wake_all(self) -> None:
        for rt in self._runtimes:
            rt.wake.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- read your writes ------------------------------------------------------------------------

    async def _take_token(self, conn: Any, node: NodeRuntime) -> None:
        try:
            lsn = await conn.fetchval(_TOKEN_SQL)
            token = WriteToken(int(lsn), node.state.timeline)
        except Exception:
            # The write went through but its position is unknown: read from the primary.
            terminate(conn)
            token = WriteToken(_MAX_LSN, None)
        current = self._token.get()
        if current is None or token.lsn >= current.lsn or token.timeline != current.timeline:
            self._token.set(token)

    async def _wait_replayed(self, conn: Any, node: NodeRuntime, token: WriteToken) -> None:
        known = node.state.lsn
        if known is not None and known >= token.lsn:
            self._ryw_counts["replayed"] += 1
            return
        deadline = self._now() + self._settings.ryw_timeout
        delay = 0.002
        while True:
            replayed = await conn.fetchval("SELECT pg_last_wal_replay_lsn()")
            if replayed is not None and replayed >= token.lsn:
                self._ryw_counts["waited"] += 1
                return
            remaining = deadline - self._now()
            if replayed is None or remaining <= 0:
                self._ryw_counts["fallback"] += 1
                raise NotSent("ryw_fallback")
            await self._clock.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    # -- topology monitor ------------------------------------------------------------------------

    async def _monitor(self, rt: NodeRuntime) -> None:
        loop = asyncio.get_running_loop()
        bound = self._settings.connect_timeout + self._settings.probe_timeout + 1.0
        last_start = -math.inf
        while self._state == _RUNNING:
            # Never probe in a tight loop, whatever the hints; but confirm a role change at
            # once: a standby's promotion is one-way, and writers are waiting for it.
            gap = self._settings.fast_interval - (loop.time() - last_start)
            if gap > 0 and rt.state.pending_role is None:
                await asyncio.sleep(gap)
            rt.wake.clear()
            last_start = loop.time()
            try:
                observation = await asyncio.wait_for(rt.probe(self._settings.probe_timeout), bound)
                error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                observation, error = None, type(exc).__name__
            was_primary = rt.state is self._topology.primary
            events = self._topology.observe(rt.state, observation, error)
            await self._apply(events)
            if observation is None and was_primary:
                self._wake_all()  # the primary does not answer: look for a promoted standby
            if self._settings.auto_promote:
                self._maybe_promote()
            if rt.state.pending_role is not None:
                continue
            try:
                await asyncio.wait_for(rt.wake.wait(), self._interval(rt))
            except (TimeoutError, asyncio.TimeoutError):
                pass

    def _interval(self, rt: NodeRuntime) -> float:
        st = rt.state
        topo = self._topology
        confirming = (
            st.hinted
            or st.pending_role is not None
            or (st.reachable is True and st.fail_streak > 0)
            or (st.reachable is False and st.ok_streak > 0)
        )
        if confirming or self._waiting:
            return self._settings.fast_interval
        if st.reachable is False:
            # Down: look again soon (a restart is quick), then back off to the normal pace.
            backoff = self._settings.fast_interval * 2.0 ** min(st.fail_streak, 16)
            return min(self._settings.monitor_interval, backoff)
        if topo.primary is None and not topo.all_down:
            return self._settings.fast_interval  # a standby may be promoted any moment
        if self._now() - self._last_hint < self._settings.monitor_interval:
            return self._settings.fast_interval
        return self._settings.monitor_interval

    async def _apply(self, events: list[Any]) -> None:
        topo = self._topology
        for event in events:
            if self._hookset.wants(type(event)):
                self._emit(event)
        primary = topo.primary
        for rt in self._runtimes:
            st = rt.state
            if rt.synced_generation != st.generation:
                was_primary = rt is self._primary_rt
                terminate = st.fenced is not None or (was_primary and st.role != "primary")
                await rt.evict(terminate_active=terminate)
        new = None if primary is None else self._runtimes[primary.index]
        if new is not self._primary_rt:
            self._primary_rt = new
        if topo.version != self._seen_version:
            self._seen_version = topo.version
            self._notify()
        if self._fencing is not None:
            self._sync_fencing()

    # -- fencing record --------------------------------------------------------------------------

    def _sync_fencing(self) -> None:
        """Read the fencing record once the cluster is known; save every higher timeline."""
        topo = self._topology
        sysid = topo.system_identifier
        if (
            sysid is None or self._fence_task is not None or self._state != _RUNNING
            or self._now() < self._fence_retry_at
        ):  # fmt: skip
            return
        if topo.floor_pending:
            self._fence_task = asyncio.create_task(self._fence_io(sysid, None))
        elif topo.max_timeline > self._fence_saved:
            self._fence_task = asyncio.create_task(self._fence_io(sysid, topo.max_timeline))

    async def _fence_io(self, sysid: int, save: int | None) -> None:
        """Load the record (``save`` is ``None``) or save timeline ``save`` to it, bounded."""
        record = self._fencing
        assert record is not None
        timeline: int | None = save
        try:
            io: Awaitable[int | None] = (
                record.load(sysid) if save is None else record.save(sysid, save)
            )
            loaded = await asyncio.wait_for(io, self._settings.probe_timeout)
            if save is None:
                timeline = loaded
                if timeline is not None and (isinstance(timeline, bool) or timeline < 1):
                    raise ValueError(f"the record holds timeline {timeline!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fence_retry_at = self._now() + self._settings.monitor_interval
            action = "load" if save is None else "save"
            self._emit(
                PostgresFencingRecordFailed(name=self._name, action=action, timeline=save,
                                            error=exc)
            )  # fmt: skip
            return
        finally:
            self._fence_task = None
        self._fence_saved = max(self._fence_saved, timeline or 0)
        if save is None:
            await self._apply(self._topology.set_timeline_floor(timeline))

    def _notify(self) -> None:
        event = self._changed
        if event is not None:
            event.set()
        if self._state != _CLOSED:
            self._changed = asyncio.Event()

    def _maybe_promote(self) -> None:
        topo = self._topology
        if self._promotion is not None or topo.primary is not None:
            return
        gap = topo.no_primary_for()
        now = self._now()
        if (
            gap < self._settings.promote_after
            or now - self._last_promotion < self._settings.promote_after
        ):
            return
        candidate = topo.promotion_candidate()
        if candidate is None:
            return
        self._last_promotion = now
        self._promotion = asyncio.create_task(self._promote(self._runtimes[candidate.index]))

    async def _promote(self, rt: NodeRuntime) -> None:
        try:
            ok = await rt.promote(self._settings.failover_timeout)
            error: BaseException | None = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ok, error = False, exc
        finally:
            self._promotion = None
        if ok:
            self._promotions += 1
        self._emit(
            PostgresPromotionAttempted(name=self._name, node=rt.name, succeeded=ok, error=error)
        )
        self._wake_all()

    # -- health ----------------------------------------------------------------------------------

    async def health(self, *, refresh: bool = False) -> PostgresHealth:
        """Report each node's role, reachability, lag, breaker and pool, and the active node.

        Args:
            refresh: Probe every node now (bounded by ``connect_timeout + probe_timeout``)
                instead of reporting the monitor's latest picture.

        Returns:
            A :class:`PostgresHealth`; ``as_dict()`` gives JSON. It holds node names, never
            DSNs or passwords.
        """
        if self._state == _STARTING:
            await self.start()
        if refresh and self._state == _RUNNING:
            generations = [rt.state.observed_at for rt in self._runtimes]
            self._wake_all()
            deadline = self._now() + self._settings.connect_timeout + self._settings.probe_timeout
            while self._now() < deadline and any(
                rt.state.observed_at == g and rt.state.last_error is None
                for rt, g in zip(self._runtimes, generations)
            ):
                await self._wait_changed(min(self._settings.fast_interval, deadline - self._now()))
        topo = self._topology
        nodes = []
        for rt in self._runtimes:
            st = rt.state
            size, idle = rt.pool_stats()
            nodes.append(
                NodeHealth(
                    name=rt.name,
                    reachable=st.reachable,
                    role=st.role,
                    active=st is topo.primary,
                    readable=st in topo.readable,
                    fenced=st.fenced,
                    timeline=st.timeline,
                    lag_bytes=st.lag_bytes,
                    lag_seconds=st.lag_seconds,
                    breaker=rt.breaker.state.value,
                    pool_size=size,
                    pool_idle=idle,
                    pool_waiters=rt.waiters,
                    last_error=st.last_error,
                    alias_of=None if st.alias_of is None else st.alias_of.name,
                )
            )
        status: Literal["ok", "degraded", "down"]
        if topo.primary is None:
            status = "down"
        elif all(
            n.reachable and n.fenced is None and n.breaker == "closed"
            and (n.role == "primary" or n.readable)
            for n in nodes
        ):  # fmt: skip
            status = "ok"
        else:
            status = "degraded"
        blocked_by = self._writes_blocked_reason()
        return PostgresHealth(
            name=self._name,
            status=status,
            active=self.primary,
            writes_blocked=blocked_by,
            nodes=tuple(nodes),
        )

    # -- hooks and metrics -----------------------------------------------------------------------

    def _on_hooks_changed(self) -> None:
        self._w_failed = self._hookset.wants(PostgresCallFailed)

    def _writes_blocked_reason(self) -> str | None:
        """Why writes are stopped altogether, or None: the topology's reason, or the fencing
        record not read yet."""
        topo = self._topology
        if topo.writes_blocked is not None:
            return topo.writes_blocked[0]
        return "fencing_record" if topo.floor_pending else None

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        topo = self._topology
        for rt in self._runtimes:
            st = rt.state
            key = (name, rt.name)
            yield "veritas_postgres_node_up", key, 1.0 if st.reachable else 0.0
            for role in _ROLES:
                yield (
                    "veritas_postgres_node_role",
                    (name, rt.name, role),
                    1.0 if st.role == role else 0.0,
                )
            yield "veritas_postgres_node_timeline", key, float(st.timeline or 0)
            yield "veritas_postgres_node_fenced", key, 1.0 if st.fenced else 0.0
            if st.lag_bytes is not None:
                yield "veritas_postgres_replication_lag_bytes", key, float(st.lag_bytes)
            if st.lag_seconds is not None:
                yield "veritas_postgres_replication_lag_seconds", key, float(st.lag_seconds)
            size, idle = rt.pool_stats()
            yield "veritas_postgres_pool_connections", key, float(size)
            yield "veritas_postgres_pool_idle", key, float(idle)
            yield "veritas_postgres_pool_waiters", key, float(rt.waiters)
        yield "veritas_postgres_primary_available", (name,), 0.0 if topo.primary is None else 1.0
        yield "veritas_postgres_failovers", (name,), float(topo.failovers)
        yield "veritas_postgres_fencings", (name,), float(topo.fencings)
        yield "veritas_postgres_no_primary_seconds", (name,), topo.no_primary_seconds()
        blocked = topo.writes_blocked[0] if topo.writes_blocked is not None else None
        if blocked is None and topo.floor_pending:
            blocked = "fencing_record"
        for reason in ("split_brain", "system_identifier", "fencing_record"):
            yield (
                "veritas_postgres_writes_blocked",
                (name, reason),
                1.0 if blocked == reason else 0.0,
            )
        settings = self._settings
        if settings.max_lag_bytes is not None:
            limit = float(settings.max_lag_bytes)
            yield "veritas_postgres_replication_lag_limit_bytes", (name,), limit
        if settings.max_lag_seconds is not None:
            limit = float(settings.max_lag_seconds)
            yield "veritas_postgres_replication_lag_limit_seconds", (name,), limit
        for k, served_by in enumerate(("primary", "standby")):
            yield (
                "veritas_postgres_query_duration_seconds",
                (name, served_by),
                HistogramValue(cumulative_buckets(self._bounds, self._hist[k]), self._hist_sum[k]),
            )
        for kind, count in self._errors.items():
            yield "veritas_postgres_errors", (name, kind), float(count)
        yield "veritas_postgres_retries", (name,), float(self._retries)
        for outcome, count in self._ryw_counts.items():
            yield "veritas_postgres_read_your_writes", (name, outcome), float(count)
        yield "veritas_postgres_promotions", (name,), float(self._promotions)
