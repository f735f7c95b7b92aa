"""The Sentinel-aware client: redis-py's command API over a fenced pool, guarded by retries and a
circuit breaker.

:class:`SentinelRedis` *is* a ``redis.asyncio.Redis``: ``get``, ``set``, pipelines, transactions,
Pub/Sub, locks and scripts work as in redis-py. What differs is underneath: where connections go
(:class:`~veritas_resilience.redis._topology.SentinelTopology`), which connections may still be
used (:class:`~veritas_resilience.redis._pool.FencedPool`), and what happens when a call fails
(:class:`~veritas_resilience.redis._retry.CallGuard`).
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

import redis.asyncio
import redis.asyncio.client
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._clock import MONOTONIC, Clock
from .._hedge import Hedge
from .._validate import positive_int as _positive_int
from .._validate import seconds as _seconds
from ..circuit_breaker import CircuitBreaker, FailureRate
from ..events import CircuitState, Hook
from ..instrumentation.prometheus import HistogramValue
from ..retry import RetryBudget
from ._commands import FencedReplyError, classify, command_name, is_idempotent, is_read_only
from ._compat import async_timeout
from ._errors import NoSentinelAvailableError, RedisConfigurationError
from ._events import RedisPubSubReconnected
from ._hedged import NodePools
from ._pool import FencedConnection, FencedPool, Role, Router
from ._retry import CallGuard, RetryPolicy
from ._topology import Address, SentinelTopology, describe, fmt, parse_address

__all__ = ["ReadFrom", "RedisHealth", "SentinelRedis"]

Seconds = float | timedelta


class ReadFrom(str, enum.Enum):
    """Which nodes a client sends its commands to.

    ``MASTER``: the master only. ``REPLICA``: replicas only, never one whose link to the master
    is down, never the master (:class:`~veritas_resilience.redis.NoReplicaError` when none is
    fit). ``REPLICA_PREFERRED``: a fit replica when there is one, else the master.
    """

    MASTER = "master"
    REPLICA = "replica"
    REPLICA_PREFERRED = "replica_preferred"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class RedisHealth:
    """The health of a Redis client at one instant (from ``await client.health()``).

    Attributes:
        name: The client's name.
        status: ``"ok"``; ``"degraded"`` (it works, but part of the topology is down: a
            Sentinel, a subscription, a cluster node, or the breaker is probing); ``"down"``
            (no usable node, the ping failed, or the breaker is open).
        read_from: ``"master"``, ``"replica"``, ``"replica_preferred"``, or ``"cluster"``.
        node: The node the client writes to (the master), as ``host:port``, or None.
        generation: The master generation.
        ping_seconds: Round trip of the health PING, or None when it failed.
        breaker: The circuit breaker's state.
        unwritable_for: Seconds the client has been without a writable master (0 when it has
            one).
        connections: Connection objects in the pools (idle and in use).
        in_use: Connections in use.
        error: Why it is not ok (type and message, no secrets), or None.
        details: Topology details: for Sentinel ``service``, ``sentinels_up``,
            ``sentinels_known``, ``subscriptions_up``, ``replicas``, ``last_switch_source``,
            ``disagreeing_sentinels``, and for a hedged replica client ``hedge_pools`` (``idle``
            and ``in_use`` of each node's pool, by ``host:port``); for a cluster ``masters``,
            ``nodes``, ``cluster_state``.
    """

    name: str
    status: Literal["ok", "degraded", "down"]
    read_from: str
    node: str | None
    generation: int
    ping_seconds: float | None
    breaker: str
    unwritable_for: float
    connections: int
    in_use: int
    error: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The health as plain JSON-friendly data."""
        data = asdict(self)
        data["details"] = dict(self.details)
        return data


class _ClientGuard(CallGuard):
    """A CallGuard that also exports its client's pool counters."""

    pool: FencedPool | None = None
    pubsub_reconnects: int = 0

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield from super()._metric_samples()
        pool = self.pool
        if pool is not None:
            idle, in_use = pool.counts()
            yield "veritas_redis_pool_connections", (self.name, "idle"), float(idle)
            yield "veritas_redis_pool_connections", (self.name, "in_use"), float(in_use)
            yield "veritas_redis_stale_connections_closed", (self.name,), float(pool.stale_closed)
        yield "veritas_redis_pubsub_reconnects", (self.name,), float(self.pubsub_reconnects)


def _default_breaker(
    name: str, clock: Clock, hooks: Sequence[Hook] | None, trip: FailureRate | None = None
) -> CircuitBreaker:
    def node_failure(exc: BaseException) -> bool:
        failure = classify(exc)
        return failure is not None and failure.node_failure

    def not_about_the_node(exc: BaseException) -> bool:
        failure = classify(exc)
        return failure is not None and not failure.node_failure

    return CircuitBreaker(
        name=f"redis:{name}",
        failure_threshold=10,
        reset_timeout=1.0,
        failure_on=node_failure,
        ignore_on=not_about_the_node,
        trip=trip,
        clock=clock,
        hooks=hooks,
    )


class SentinelRedis(redis.asyncio.Redis):
    """A ``redis.asyncio.Redis`` for a master watched by Sentinels, that rides through failovers.

    Create it once per service and reuse it; use it like redis-py's client::

        client = SentinelRedis(
            [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26379)],
            "mymaster",
            password="data-node-secret",
            sentinel_password="sentinel-secret",
        )
        await client.set("greeting", "hello")
        async with client.pipeline() as pipe:
            await pipe.incr("hits").expire("hits", 60).execute()
        reader = client.replica()              # reads from replicas, same discovery
        ...
        await client.aclose()

    How it finds the master: it subscribes to the events of every Sentinel and also polls them
    (fast while degraded), asks all of them at once, keeps only masters a quorum (majority) of
    the configured Sentinels backs, believes the highest config epoch among those, and accepts a
    master only after the node itself answers ``ROLE master``. Every connection belongs to the
    master generation it was opened under; after a switch nothing is sent on an older one, the
    connections still in use are cut loose at once, and a reply that arrives on one of them is
    never reported as a success.

    How it retries: a reply that proves the command did not run (``READONLY``, ``LOADING``,
    ``MASTERDOWN``...) and a failure before sending are retried for any command; a connection lost
    after sending only for idempotent commands (or inside
    :func:`~veritas_resilience.redis.retry_unknown_outcome`); all within ``retry.deadline``
    (which bounds the whole call, the first attempt included), with jittered backoff cut short
    when a new master is accepted, behind one circuit breaker per service. A wrong password or
    a data node listed as a Sentinel fails at once with a
    :class:`~veritas_resilience.redis.RedisConfigurationError`.

    Args:
        sentinels: The Sentinels, as ``("host", port)`` pairs or ``"host:port"`` strings.
        service_name: The name the Sentinels monitor the master under.
        name: The client's name in metrics, logs and errors; ``service_name`` by default (a
            replica client adds ``":replica"``).
        read_from: Which nodes to use (see :class:`ReadFrom`).
        password: Password of the data nodes (master and replicas).
        username: ACL user of the data nodes.
        sentinel_password: Password of the Sentinels (not the data nodes').
        sentinel_username: ACL user of the Sentinels.
        db: Database number.
        decode_responses: Return ``str`` instead of ``bytes``.
        socket_timeout: Seconds to wait for a reply from a data node.
        socket_connect_timeout: Seconds to wait for a connection to a data node.
        sentinel_timeout: Seconds to wait for a Sentinel (connect and reply) and for the ROLE
            check of a candidate; keep it short, a few hundred milliseconds.
        max_connections: Connections to the data nodes at most; further callers wait.
        pool_timeout: Seconds a caller waits for a free connection (None: the deadline).
        client_name: ``CLIENT SETNAME`` for every data-node connection.
        retry: The :class:`RetryPolicy` (deadline, backoff, unknown outcomes).
        breaker: A :class:`~veritas_resilience.CircuitBreaker` for this service, True for the
            default one (10 failures in a row, 1 s open), False for none. A master switch
            resets it.
        retry_budget: A :class:`~veritas_resilience.RetryBudget` capping the retries of every
            caller together (none by default: waits for a new master are already bounded).
        poll_interval: Seconds between Sentinel polls when all is well.
        degraded_poll_interval: Seconds between polls while degraded.
        ping_interval: Seconds of silence after which an event subscription is PINGed (no
            answer within ``sentinel_timeout`` counts as a lost subscription).
        subscribe: Subscribe to Sentinel events (on every Sentinel).
        discover_sentinels: Add the Sentinels the others know of (``SENTINEL SENTINELS``) for
            events and health; only the configured ones vote on the master.
        verify_role: Check ``ROLE`` on every new data-node connection.
        connection_kwargs: More keyword arguments for data-node connections (``ssl_*``...).
        sentinel_kwargs: More keyword arguments for Sentinel connections.
        ssl: Use TLS to the data nodes (pass certificates in ``connection_kwargs``).
        clock: Time source (a fake one in tests).
        hooks: Hooks for this client (the process defaults when None).
        rng: Random source for jitter and the Sentinel order.
        hedge: A :class:`~veritas_resilience.Hedge` for the read-only commands of a replica
            client (``GET``, ``MGET``, ``HGETALL``, ``EXISTS``, ``TTL``...): attempt *i* goes to
            replica *i* (then, for ``replica_preferred``, to the master), each over a pool of
            its own bounded by ``max_connections``; the first reply wins and the other
            attempts are cancelled (their connections closed). Writes, pipelines and Pub/Sub
            are never hedged. Usually given through :meth:`replica`.
        address_remap: Maps the address of a data node, as the Sentinels announce it, to the
            address to connect to: ``("host", port)`` in, ``("host", port)`` or
            ``"host:port"`` out. For Sentinels that announce addresses the client cannot reach
            (NAT, containers, a TCP proxy in between). Called at every dial and ROLE check,
            never for the Sentinels themselves; health, metrics and events keep the announced
            addresses. None (the default) connects to the announced address.

    Raises:
        ValueError: If an argument is out of range (the message names it).
    """

    def __init__(
        self,
        sentinels: Sequence[Address | str],
        service_name: str,
        *,
        name: str | None = None,
        read_from: ReadFrom | str = ReadFrom.MASTER,
        password: str | None = None,
        username: str | None = None,
        sentinel_password: str | None = None,
        sentinel_username: str | None = None,
        db: int = 0,
        decode_responses: bool = False,
        socket_timeout: Seconds = 5.0,
        socket_connect_timeout: Seconds = 1.0,
        sentinel_timeout: Seconds = 0.5,
        max_connections: int = 100,
        pool_timeout: Seconds | None = None,
        client_name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | bool = True,
        retry_budget: RetryBudget | None = None,
        poll_interval: Seconds = 10.0,
        degraded_poll_interval: Seconds = 0.5,
        ping_interval: Seconds = 1.0,
        subscribe: bool = True,
        discover_sentinels: bool = True,
        verify_role: bool = True,
        connection_kwargs: Mapping[str, Any] | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        ssl: bool = False,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
        rng: random.Random | None = None,
        hedge: Hedge | None = None,
        address_remap: Callable[[Address], Address | str] | None = None,
        _topology: SentinelTopology | None = None,
    ) -> None:
        if isinstance(sentinels, (str, bytes)) or not sentinels:
            raise ValueError("sentinels must be a non-empty list of ('host', port) or 'host:port'")
        addresses = [parse_address(s, "sentinels") for s in sentinels]
        if not isinstance(service_name, str) or not service_name or " " in service_name:
            raise ValueError(f"service_name must be a non-empty word, got {service_name!r}")
        try:
            mode = ReadFrom(read_from)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in ReadFrom)
            raise ValueError(f"read_from must be one of {allowed}, got {read_from!r}") from None
        if name is None:
            name = service_name if mode is ReadFrom.MASTER else f"{service_name}:replica"
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        _positive_int(max_connections, "max_connections")
        if isinstance(db, bool) or not isinstance(db, int) or db < 0:
            raise ValueError(f"db must be an int >= 0, got {db!r}")
        if hedge is not None:
            if not isinstance(hedge, Hedge):
                raise TypeError(f"hedge must be a Hedge or None, got {hedge!r}")
            if mode is ReadFrom.MASTER:
                raise ValueError(
                    "hedge needs a replica client (read_from='replica' or 'replica_preferred'): "
                    "a master client has a single node to read from"
                )
        if address_remap is not None and not callable(address_remap):
            raise TypeError(
                "address_remap must be a function of ('host', port) returning the address to "
                f"connect to, or None, got {address_remap!r}"
            )
        policy = retry if retry is not None else RetryPolicy()
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")
        rng = rng or random.Random()

        self._settings: dict[str, Any] = {
            "sentinels": addresses,
            "service_name": service_name,
            "password": password,
            "username": username,
            "sentinel_password": sentinel_password,
            "sentinel_username": sentinel_username,
            "db": db,
            "decode_responses": decode_responses,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "sentinel_timeout": sentinel_timeout,
            "max_connections": max_connections,
            "pool_timeout": pool_timeout,
            "client_name": client_name,
            "retry": policy,
            "retry_budget": retry_budget,
            "poll_interval": poll_interval,
            "degraded_poll_interval": degraded_poll_interval,
            "ping_interval": ping_interval,
            "subscribe": subscribe,
            "discover_sentinels": discover_sentinels,
            "verify_role": verify_role,
            "connection_kwargs": dict(connection_kwargs or {}),
            "sentinel_kwargs": dict(sentinel_kwargs or {}),
            "ssl": ssl,
            "clock": clock,
            "hooks": hooks,
            "address_remap": address_remap,
        }
        node_kwargs: dict[str, Any] = {"password": password, "username": username}
        node_kwargs.update(self._settings["connection_kwargs"])
        if ssl:
            node_kwargs["ssl"] = True
        if _topology is None:
            s_kwargs: dict[str, Any] = {
                "password": sentinel_password,
                "username": sentinel_username,
            }
            s_kwargs.update(self._settings["sentinel_kwargs"])
            _topology = SentinelTopology(
                addresses,
                service_name,
                name=name,
                sentinel_kwargs=s_kwargs,
                node_kwargs=node_kwargs,
                sentinel_timeout=_seconds(sentinel_timeout, "sentinel_timeout"),
                poll_interval=_seconds(poll_interval, "poll_interval"),
                degraded_poll_interval=_seconds(degraded_poll_interval, "degraded_poll_interval"),
                subscribe=bool(subscribe),
                discover_sentinels=bool(discover_sentinels),
                ping_interval=_seconds(ping_interval, "ping_interval"),
                clock=clock,
                hooks=hooks,
                rng=rng,
                address_remap=address_remap,
            )
        topology = _topology
        self._topology = topology
        self._read_from = mode
        self._name = name

        if mode is ReadFrom.MASTER:
            fence = topology.master_fence

            async def router() -> tuple[Address, int, Literal["master", "replica"]]:
                address, generation = await topology.master_address()
                return address, generation, "master"

            role: Literal["master", "replica"] = "master"
        else:
            fence = topology.replica_fence
            fallback = mode is ReadFrom.REPLICA_PREFERRED

            async def router() -> tuple[Address, int, Literal["master", "replica"]]:
                return await topology.replica_address(fallback)

            role = "replica"

        def on_role_mismatch() -> None:
            topology.report_failure("role_check", master=role == "master")

        conn_kwargs: dict[str, Any] = {
            "db": db,
            "password": password,
            "username": username,
            "socket_timeout": _seconds(socket_timeout, "socket_timeout"),
            "socket_connect_timeout": _seconds(socket_connect_timeout, "socket_connect_timeout"),
            "decode_responses": decode_responses,
            "client_name": client_name,
            # redis-py must never retry on its own: only the guard knows what is safe.
            "retry": Retry(NoBackoff(), 0),
        }
        if address_remap is not None:
            conn_kwargs["dial"] = topology.dial_address
        conn_kwargs.update(self._settings["connection_kwargs"])
        timeout = (
            _seconds(policy.deadline, "deadline")
            if pool_timeout is None
            else _seconds(pool_timeout, "pool_timeout")
        )

        def make_pool(router: Router, role: Role) -> FencedPool:
            return FencedPool(
                fence=fence,
                router=router,
                role=role,
                max_connections=max_connections,
                pool_timeout=timeout,
                name=name,
                verify_role=verify_role,
                on_role_mismatch=on_role_mismatch,
                ssl=ssl,
                **conn_kwargs,
            )

        pool = make_pool(router, role)
        super().__init__(connection_pool=pool)
        self.auto_close_connection_pool = True  # the pool is ours alone

        if breaker is True:
            the_breaker: CircuitBreaker | None = _default_breaker(name, clock, hooks)
        elif breaker is False:
            the_breaker = None
        elif isinstance(breaker, CircuitBreaker):
            the_breaker = breaker
        else:
            raise TypeError(f"breaker must be a CircuitBreaker or a bool, got {breaker!r}")

        self._guard = _ClientGuard(
            name=name,
            policy=policy,
            breaker=the_breaker,
            settle=self._settle,
            wait_changed=topology.wait_changed,
            generation=lambda: fence.gen,
            clock=clock,
            rng=rng,
            hooks=hooks,
            role=role,
            budget=retry_budget,
            explain=self._explain,
        )
        self._guard.pool = pool
        self._attempt_guarded = self._guard.guarded(self._attempt)
        self._now = clock.monotonic
        self._extra_idempotent = policy.idempotent_commands
        topology.register_pool(pool)
        self._hedge = hedge
        self._node_pools: NodePools | None = None
        if hedge is not None:
            self._node_pools = NodePools(
                topology, make_pool, with_master=mode is ReadFrom.REPLICA_PREFERRED
            )
            topology.register_pool(self._node_pools)
            self._hedged_guarded = self._guard.guarded(self._hedged)
        topology.add_listener(self._on_switch)
        topology.acquire()
        self._closed = False

    # -- identity -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The client's name (metric label, logs, errors)."""
        return self._name

    @property
    def service_name(self) -> str:
        """The Sentinel service name."""
        return self._topology.service

    @property
    def read_from(self) -> ReadFrom:
        """Which nodes this client uses."""
        return self._read_from

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The circuit breaker of this client's service and role."""
        return self._guard.breaker

    @property
    def master_address(self) -> tuple[str, int] | None:
        """The master the client writes to now, or None during a failover."""
        return self._topology.master

    @property
    def generation(self) -> int:
        """The current generation of this client's role (master, or replicas)."""
        return self.connection_pool.fence.gen  # type: ignore[attr-defined, no-any-return]

    def __repr__(self) -> str:
        return (
            f"<SentinelRedis {self._name!r} service={self._topology.service!r} "
            f"read_from={self._read_from.value} master={fmt(self._topology.master)}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def initialize(self) -> SentinelRedis:
        """Start discovery (once) and look the master up.

        Called by ``async with client`` and ``await client``; commands call it themselves when
        needed.

        Raises:
            NoSentinelAvailableError: No Sentinel answered.
            UnknownServiceError: No Sentinel knows the service name.
            NoMasterError: No confirmed master yet, or none a quorum of the configured Sentinels
                backs (master clients only).
            RedisConfigurationError: A Sentinel or data node refused the credentials, or a
                listed Sentinel is not one.
        """
        topology = self._topology
        if not topology.started:
            if self._read_from is ReadFrom.MASTER:
                await topology.start()
            else:
                try:
                    await topology.start()
                except rex.ConnectionError:
                    if topology.master is None and not topology.replicas:
                        raise
        return self

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the pool's connections and, with the last client, the Sentinel connections."""
        await super().aclose(close_connection_pool)
        if not self._closed:
            self._closed = True
            self._topology.unregister_pool(self.connection_pool)
            if self._node_pools is not None:
                self._topology.unregister_pool(self._node_pools)
                await self._node_pools.aclose()
            await self._topology.release_user()

    def replica(
        self,
        read_from: ReadFrom | str = ReadFrom.REPLICA_PREFERRED,
        *,
        hedge: Hedge | None = None,
    ) -> SentinelRedis:
        """A client for reads from replicas, sharing this one's discovery (close it too).

        Args:
            read_from: ``"replica"`` or ``"replica_preferred"`` (or ``"master"``).
            hedge: Hedge its read-only commands across the replicas (then the master, for
                ``"replica_preferred"``): attempt *i* goes to replica *i*. None: no hedging.

        Raises:
            ValueError: If ``hedge`` is given for a master client.
        """
        settings = dict(self._settings)
        sentinels = settings.pop("sentinels")
        service = settings.pop("service_name")
        mode = ReadFrom(read_from)
        suffix = "" if mode is ReadFrom.MASTER else ":replica"
        return SentinelRedis(
            sentinels,
            service,
            name=f"{self._topology.name}{suffix}",
            read_from=mode,
            hedge=hedge,
            _topology=self._topology,
            **settings,
        )

    def client(self) -> redis.asyncio.Redis:
        """Not supported: a single-connection client cannot follow a failover."""
        raise TypeError("SentinelRedis has no single-connection client; use the client itself")

    # -- commands -------------------------------------------------------------------------------

    async def _attempt(
        self, args: tuple[Any, ...], options: dict[str, Any], pool: Any = None
    ) -> Any:
        if pool is None:  # a node's own pool, for a hedged read
            pool = self.connection_pool
        conn = await pool.get_connection()
        try:
            reply = await self._send_command_parse_response(  # type: ignore[no-untyped-call]
                conn, args[0], *args, **options
            )
            if conn._gen != pool.fence.gen:
                raise _fenced(conn, args)
            return reply
        except (rex.ReadOnlyError, rex.MasterDownError):
            conn.stale = True  # the node is not what we took it for
            raise
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            if conn.abandoned and not isinstance(exc, FencedReplyError):
                raise _fenced(conn, args) from exc
            raise
        finally:
            await pool.release(conn)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command with the client's retries, breaker and deadline (redis-py's API)."""
        guard = self._guard
        started = self._now()
        attempt = self._attempt_guarded
        if self._hedge is not None and is_read_only(args):
            attempt = self._hedged_guarded
        try:
            async with async_timeout(guard.deadline) as scope:
                result = await attempt(args, options)
        except Exception as exc:
            try:
                result = await guard.recover(
                    exc,
                    started,
                    lambda: attempt(args, options),
                    command_name(args),
                    lambda: is_idempotent(args, self._extra_idempotent),
                    scope,
                )
            finally:
                guard.observe(self._now() - started)
            return result
        guard.observe(self._now() - started)
        return result

    async def _hedged(self, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """A read-only command raced across the nodes: attempt *i* on node *i*'s pool."""
        assert self._hedge is not None and self._node_pools is not None
        targets = self._node_pools.targets()
        if not targets:  # discovery not started, or no node to read from: the usual path says
            return await self._attempt(args, options)
        return await self._hedge.call_targets(self._attempt_on, targets, args, options)

    def _attempt_on(self, pool: FencedPool, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        return self._attempt(args, options, pool)

    def _explain(self) -> BaseException | None:
        """Why no node could be reached, when discovery knows (for a call out of time)."""
        error = self._topology.last_error
        if isinstance(error, (NoSentinelAvailableError, RedisConfigurationError)):
            return error.clone()
        return None

    async def _settle(self, source: str, within: float) -> None:
        topology = self._topology
        topology.report_failure(source, master=self._read_from is ReadFrom.MASTER)
        task = topology.lookup_in_flight()
        if task is not None and within > 0:
            try:
                async with async_timeout(min(within, 2.0)):
                    await asyncio.shield(task)
            except asyncio.TimeoutError:  # not the built-in one before Python 3.11
                pass

    def _on_switch(self) -> None:
        breaker = self._guard.breaker
        if breaker is not None and breaker.state is not CircuitState.CLOSED:
            breaker.reset()

    def pipeline(
        self, transaction: bool = True, shard_hint: str | None = None
    ) -> redis.asyncio.client.Pipeline:
        """A pipeline (a MULTI/EXEC transaction by default) with the client's retries."""
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe._owner = self
        return pipe

    def pubsub(self, **kwargs: Any) -> redis.asyncio.client.PubSub:
        """A Pub/Sub object that re-subscribes on the new master after a failover."""
        pubsub = _PubSub(self.connection_pool, event_dispatcher=self._event_dispatcher, **kwargs)
        pubsub._owner = self
        return pubsub

    # -- health ---------------------------------------------------------------------------------

    async def health(self, *, timeout: float = 1.0) -> RedisHealth:
        """Check the client: topology, breaker, pool, and a PING through the pool.

        Args:
            timeout: Seconds the PING may take.

        Returns:
            A :class:`RedisHealth`; it never raises for an unhealthy client.
        """
        snap = self._topology.snapshot()
        ping: float | None = None
        error: str | None = None
        started = self._now()
        try:
            async with async_timeout(timeout):
                await self._attempt(("PING",), {})
            ping = self._now() - started
        except Exception as exc:
            error = describe(exc)
        breaker = self._guard.breaker
        state = breaker.state if breaker is not None else CircuitState.CLOSED
        idle, in_use = self.connection_pool.counts()  # type: ignore[attr-defined]
        details: dict[str, Any] = {}
        if self._node_pools is not None:  # a hedged replica client: one pool per node too
            hedge_pools = self._node_pools.counts()
            details["hedge_pools"] = {
                node: {"idle": i, "in_use": u} for node, (i, u) in hedge_pools.items()
            }
            idle += sum(i for i, _ in hedge_pools.values())
            in_use += sum(u for _, u in hedge_pools.values())
        known = len(snap.sentinels)
        status: Literal["ok", "degraded", "down"] = "ok"
        no_master = self._read_from is ReadFrom.MASTER and snap.master is None
        if ping is None or no_master or state in (CircuitState.OPEN, CircuitState.FORCED_OPEN):
            status = "down"
        elif (
            snap.sentinels_up <= known // 2
            or (self._settings["subscribe"] and snap.subscriptions_up == 0)
            or snap.degraded
            or snap.disagreeing
            or state is CircuitState.HALF_OPEN
            or (self._read_from is not ReadFrom.MASTER and not snap.replicas)
        ):
            status = "degraded"
        if error is None and status != "ok":
            error = snap.last_error
        return RedisHealth(
            name=self._name,
            status=status,
            read_from=self._read_from.value,
            node=fmt(snap.master),
            generation=snap.generation,
            ping_seconds=ping,
            breaker=state.value,
            unwritable_for=snap.unwritable_for,
            connections=idle + in_use,
            in_use=in_use,
            error=error,
            details={
                "service": self._topology.service,
                "sentinels_up": snap.sentinels_up,
                "sentinels_known": known,
                "subscriptions_up": snap.subscriptions_up,
                "replicas": [fmt(r) for r in snap.replicas],
                "last_switch_source": snap.last_switch_source,
                "disagreeing_sentinels": [fmt(s) for s, _ in snap.disagreeing],
                **details,
            },
        )

    # -- inspection for tests and operators -----------------------------------------------------

    def retries(self) -> dict[str, int]:
        """Retries so far, by reason."""
        return self._guard.retries()

    def switches(self) -> dict[str, int]:
        """Master switches so far, by source."""
        return self._topology.snapshot().switches

    async def refresh(self) -> None:
        """Look the master up now (the result shows in :meth:`health` and the metrics).

        Raises:
            NoSentinelAvailableError: No Sentinel answered.
            UnknownServiceError: No Sentinel knows the service.
            NoMasterError: The Sentinels name no usable master.
            RedisConfigurationError: The credentials were refused, or a listed Sentinel is not
                one.
        """
        topology = self._topology
        if not topology.started:
            await topology.start()
            return
        await topology.refresh("manual")
        if topology.last_error is not None:
            raise topology.no_master_error()


class _Pipeline(redis.asyncio.client.Pipeline):
    """redis-py's pipeline, run by the owning client's guard."""

    _owner: SentinelRedis

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the queued commands; retried as a whole when that is safe."""
        owner = self._owner
        guard = owner._guard
        if self.watching or self.connection is not None:
            # A WATCH lives on one connection: if it breaks, redis-py raises WatchError and the
            # transaction must be rebuilt by the caller (``client.transaction`` does it).
            return await super().execute(raise_on_error)
        stack = list(self.command_stack)
        scripts = set(self.scripts)
        if not stack:
            return []
        name = "MULTI" if self.is_transaction or self.explicit_transaction else "PIPELINE"
        run = super().execute
        breaker = guard.breaker
        started = owner._now()

        async def attempt() -> list[Any]:
            self.command_stack = list(stack)
            self.scripts = set(scripts)
            if breaker is None:
                return await run(raise_on_error)
            return await breaker.call(run, raise_on_error)

        try:
            async with async_timeout(guard.deadline) as scope:
                if breaker is None:
                    result = await run(raise_on_error)
                else:
                    result = await breaker.call(run, raise_on_error)
        except Exception as exc:
            try:
                result = await guard.recover(
                    exc,
                    started,
                    attempt,
                    name,
                    lambda: all(is_idempotent(args, owner._extra_idempotent) for args, _ in stack),
                    scope,
                )
            finally:
                guard.observe(owner._now() - started)
            return result
        guard.observe(owner._now() - started)
        return result

    async def _execute_transaction(  # type: ignore[override]
        self, connection: FencedConnection, commands: Any, raise_on_error: bool
    ) -> Any:
        return await _fenced_run(
            connection, super()._execute_transaction(connection, commands, raise_on_error)
        )

    async def _execute_pipeline(  # type: ignore[override]
        self, connection: FencedConnection, commands: Any, raise_on_error: bool
    ) -> Any:
        return await _fenced_run(
            connection, super()._execute_pipeline(connection, commands, raise_on_error)
        )


def _fenced(conn: FencedConnection, args: Sequence[Any]) -> FencedReplyError:
    return FencedReplyError(
        f"{command_name(args) or 'PIPELINE'} was sent to {conn.host}:{conn.port} under "
        f"generation {conn.generation}; the client has switched since: its reply does not count"
    )


async def _fenced_run(conn: FencedConnection, run: Awaitable[Any]) -> Any:
    """Run a pipeline's round trip on ``conn``; a reply from a replaced master is not a success."""
    try:
        reply = await run
    except (rex.ConnectionError, rex.TimeoutError) as exc:
        if conn.abandoned and not isinstance(exc, FencedReplyError):
            raise _fenced(conn, ()) from exc
        raise
    if conn.generation != conn._fence.gen:
        raise _fenced(conn, ())
    return reply


class _PubSub(redis.asyncio.client.PubSub):
    """redis-py's Pub/Sub that reconnects (and re-subscribes) to the current master."""

    _owner: SentinelRedis
    reconnects: int = 0

    async def connect(self) -> None:
        """Connect (once) and mark the connection as long-lived for the pool."""
        await super().connect()  # type: ignore[no-untyped-call]
        conn: Any = self.connection
        if isinstance(conn, FencedConnection):
            conn.pubsub = True

    _reconnecting: bool = False

    async def _execute(
        self, conn: Any, command: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        try:
            return await super()._execute(  # type: ignore[no-untyped-call]
                conn, command, *args, **kwargs
            )
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            if (
                isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError))
                or not isinstance(conn, FencedConnection)
                or self._reconnecting  # a re-subscription inside the reconnection below
            ):
                raise
            self._reconnecting = True
            try:
                await self._reconnect_current(conn, exc)
            finally:
                self._reconnecting = False
            return await super()._execute(  # type: ignore[no-untyped-call]
                conn, command, *args, **kwargs
            )

    async def _reconnect_current(self, conn: FencedConnection, exc: BaseException) -> None:
        owner = self._owner
        guard = owner._guard
        lost = owner._now()
        deadline = lost + guard.deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                await conn.disconnect(nowait=True)
                await conn.connect()  # the current node; redis-py re-subscribes in on_connect
                conn.pubsub = True
                break
            except (rex.ConnectionError, rex.TimeoutError) as error:
                if owner._now() >= deadline:
                    raise error from exc
                await owner._topology.wait_changed(guard.policy.backoff(attempt))
        self.reconnects += 1
        guard.pubsub_reconnects += 1
        if guard._hookset.wants(RedisPubSubReconnected):
            guard._emit(
                RedisPubSubReconnected(
                    name=owner.name, node=f"{conn.host}:{conn.port}", gap=owner._now() - lost
                )
            )
