"""The Redis Cluster client: redis-py's ``RedisCluster`` with the same guard as the Sentinel one.

redis-py already follows ``MOVED``/``ASK`` redirections and reloads the slot map after a
connection error or ``CLUSTERDOWN``; what it does not know is which commands are safe to repeat:
its own retry loop runs any command again after a connection error. :class:`ClusterRedis` turns
that loop off and runs every call through a :class:`~veritas_resilience.redis._retry.CallGuard`
instead: failures before sending and replies that prove the command did not run are retried for
any command, a connection lost after sending only for idempotent ones, under an overall deadline,
behind one circuit breaker for the cluster.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, Literal

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, PipelineCommand
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._clock import MONOTONIC, Clock
from .._validate import positive_int as _positive_int
from .._validate import seconds as _seconds
from ..circuit_breaker import CircuitBreaker, FailureRate
from ..events import CircuitState, Hook
from ..instrumentation.prometheus import HistogramValue
from ..retry import RetryBudget
from ._client import RedisHealth, _default_breaker
from ._commands import command_name, is_idempotent, mark_unsent
from ._compat import DirectSendConnection, async_timeout
from ._retry import CallGuard, RetryPolicy
from ._topology import Address, describe, parse_address

__all__ = ["ClusterRedis"]

_in_command: ContextVar[bool] = ContextVar("veritas_redis_cluster_in_command", default=False)
_RELOAD_GAP = 0.25

Seconds = float | timedelta


class _ClusterConnection(DirectSendConnection):
    """A cluster node connection whose connect failures are known not to have sent anything."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        """Connect; a failure here is marked as "not sent"."""
        try:
            await super().connect_check_health(
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            mark_unsent(exc)
            raise


class _ClusterGuard(CallGuard):
    refreshes = 0

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield from super()._metric_samples()
        yield "veritas_redis_cluster_refreshes", (self.name,), float(self.refreshes)


class ClusterRedis(redis.asyncio.RedisCluster):
    """A ``redis.asyncio.RedisCluster`` with safe retries, a deadline, a breaker and metrics.

    Use it like redis-py's cluster client::

        cluster = ClusterRedis([("10.0.0.1", 7000), ("10.0.0.2", 7000)], password="...")
        await cluster.set("user:42", "...")
        print(await cluster.health())
        await cluster.aclose()

    Args:
        startup_nodes: Some nodes of the cluster, as ``("host", port)``, ``"host:port"`` or
            ``ClusterNode``.
        name: The client's name in metrics, logs and errors.
        password: Password of the nodes.
        username: ACL user of the nodes.
        decode_responses: Return ``str`` instead of ``bytes``.
        socket_timeout: Seconds to wait for a reply.
        socket_connect_timeout: Seconds to wait for a connection.
        max_connections: Connections per node at most.
        read_from_replicas: Send read commands to replicas too (redis-py's option).
        retry: The :class:`~veritas_resilience.redis.RetryPolicy`.
        breaker: A circuit breaker for the cluster, True for the default one, False for none.
        retry_budget: A :class:`~veritas_resilience.RetryBudget` capping the retries of every
            caller together.
        clock: Time source.
        hooks: Hooks for this client (the process defaults when None).
        rng: Random source for jitter.
        **cluster_kwargs: More ``RedisCluster`` arguments (``ssl``, ``address_remap``...);
            ``retry`` and ``cluster_error_retry_attempts`` are the guard's business and refused.

    Raises:
        ValueError: If an argument is out of range (the message names it).
    """

    def __init__(
        self,
        startup_nodes: Sequence[Address | str | ClusterNode],
        *,
        name: str = "cluster",
        password: str | None = None,
        username: str | None = None,
        decode_responses: bool = False,
        socket_timeout: Seconds = 5.0,
        socket_connect_timeout: Seconds = 1.0,
        max_connections: int = 100,
        read_from_replicas: bool = False,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | bool = True,
        retry_budget: RetryBudget | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
        rng: random.Random | None = None,
        **cluster_kwargs: Any,
    ) -> None:
        if isinstance(startup_nodes, (str, bytes)) or not startup_nodes:
            raise ValueError("startup_nodes must be a non-empty list of nodes")
        nodes = [
            n if isinstance(n, ClusterNode) else ClusterNode(*parse_address(n, "startup_nodes"))
            for n in startup_nodes
        ]
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        _positive_int(max_connections, "max_connections")
        for forbidden in ("retry", "cluster_error_retry_attempts", "retry_on_error"):
            if forbidden in cluster_kwargs:
                raise TypeError(f"{forbidden} is not accepted: pass retry=RetryPolicy(...)")
        extra: dict[str, Any] = dict(cluster_kwargs)
        if read_from_replicas:  # passing it at all makes redis-py warn that it is deprecated
            extra["read_from_replicas"] = True
        policy = retry if retry is not None else RetryPolicy()
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")
        super().__init__(
            startup_nodes=nodes,
            password=password,
            username=username,
            decode_responses=decode_responses,
            socket_timeout=_seconds(socket_timeout, "socket_timeout"),
            socket_connect_timeout=_seconds(socket_connect_timeout, "socket_connect_timeout"),
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 0),  # redis-py must not repeat commands on its own
            **extra,
        )
        if self.connection_kwargs.get("connection_class") is redis.asyncio.Connection:
            # Shared with the nodes manager: nodes it creates from now on use this class.
            self.connection_kwargs["connection_class"] = _ClusterConnection
        if breaker is True:
            # Failures in a row would open it for the whole cluster when one master of several
            # dies; a failure rate of one half does not.
            the_breaker: CircuitBreaker | None = _default_breaker(
                name, clock, hooks, trip=FailureRate(threshold=0.5, window=100, minimum_calls=20)
            )
        elif breaker is False:
            the_breaker = None
        elif isinstance(breaker, CircuitBreaker):
            the_breaker = breaker
        else:
            raise TypeError(f"breaker must be a CircuitBreaker or a bool, got {breaker!r}")
        self._name = name
        self._guard = _ClusterGuard(
            name=name,
            policy=policy,
            breaker=the_breaker,
            clock=clock,
            rng=rng,
            hooks=hooks,
            role="cluster",
            budget=retry_budget,
        )
        self._attempt_guarded = self._guard.guarded(self._attempt)
        self._now = clock.monotonic
        self._last_reload = -math.inf
        self._loaded_epoch: int | None = -1
        self._extra_idempotent = policy.idempotent_commands

    @property
    def name(self) -> str:
        """The client's name."""
        return self._name

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The cluster's circuit breaker."""
        return self._guard.breaker

    def retries(self) -> dict[str, int]:
        """Retries so far, by reason."""
        return self._guard.retries()

    @property
    def refreshes(self) -> int:
        """Full reloads of the slot map so far."""
        return self._guard.refreshes

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> ClusterRedis:
        """Load the slot map if it is not loaded (each load is counted as a refresh)."""
        await super().initialize(
            additional_startup_nodes_info=additional_startup_nodes_info,
            last_failed_node_name=last_failed_node_name,
        )
        # Many tasks may ask at once; the nodes manager's epoch counts the loads really made.
        epoch = getattr(self.nodes_manager, "_epoch", None)
        if epoch is None or epoch != self._loaded_epoch:
            self._loaded_epoch = epoch
            self._guard.refreshes += 1
        return self

    async def _attempt(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = _in_command.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            _in_command.reset(token)

    async def aclose(self) -> None:
        """Close every connection (when called by you).

        redis-py also calls this from inside a command, to reload the slot map after MOVED
        redirections or CLUSTERDOWN; that would cut the connections other tasks are using in the
        middle of their commands, turning a redirection into errors of unknown outcome. Then it
        only marks the map for reloading.
        """
        if _in_command.get():
            # Debounced: a storm of redirections reloads the map a few times a second at most;
            # in between, redis-py patches the slot of each MOVED it gets.
            now = self._now()
            if not self._initialize and now - self._last_reload >= _RELOAD_GAP:
                self._last_reload = now
                self._initialize = True
            return
        await super().aclose()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command with the client's retries, breaker and deadline (redis-py's API)."""
        guard = self._guard
        started = self._now()
        # redis-py pops target_nodes from the keyword arguments: keep them for a retry.
        saved = dict(kwargs) if "target_nodes" in kwargs else kwargs
        try:
            async with async_timeout(guard.deadline) as scope:
                result = await self._attempt_guarded(args, kwargs)
        except Exception as exc:
            try:
                result = await guard.recover(
                    exc,
                    started,
                    lambda: self._attempt_guarded(args, dict(saved)),
                    command_name(args),
                    lambda: is_idempotent(args, self._extra_idempotent),
                    scope,
                )
            finally:
                guard.observe(self._now() - started)
            return result
        guard.observe(self._now() - started)
        return result

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        """A cluster pipeline with the client's retries."""
        if shard_hint:
            raise rex.RedisClusterException("shard_hint is deprecated in cluster mode")
        pipe = _ClusterPipeline(self, transaction)  # type: ignore[abstract]
        pipe._owner = self
        return pipe

    async def health(self, *, timeout: float = 1.0) -> RedisHealth:
        """Check the cluster: ``CLUSTER INFO`` from one node, the slot map and the breaker.

        Returns:
            A :class:`~veritas_resilience.redis.RedisHealth`; it never raises.
        """
        ping: float | None = None
        error: str | None = None
        state = "unknown"
        started = self._now()
        try:
            async with async_timeout(timeout):
                if self._initialize:
                    await self.initialize()
                info = await self._attempt(
                    ("CLUSTER INFO",), {"target_nodes": self.get_random_node()}
                )
            ping = self._now() - started
            if isinstance(info, dict):
                state = str(info.get("cluster_state", "unknown"))
        except Exception as exc:
            error = describe(exc)
        breaker = self._guard.breaker
        bstate = breaker.state if breaker is not None else CircuitState.CLOSED
        masters = self.get_primaries() if not self._initialize else []
        nodes = self.get_nodes() if not self._initialize else []
        status: Literal["ok", "degraded", "down"] = "ok"
        if ping is None or state != "ok" or bstate in (CircuitState.OPEN, CircuitState.FORCED_OPEN):
            status = "down"
            if error is None:
                error = f"cluster_state is {state}" if state != "ok" else f"breaker {bstate.value}"
        elif bstate is CircuitState.HALF_OPEN:
            status = "degraded"
        connections = in_use = 0
        for node in nodes:
            total = len(node._connections)
            connections += total
            in_use += total - len(node._free)
        default = self.get_default_node() if not self._initialize else None
        return RedisHealth(
            name=self._name,
            status=status,
            read_from="cluster",
            node=None if default is None else f"{default.host}:{default.port}",
            generation=self._guard.refreshes,
            ping_seconds=ping,
            breaker=bstate.value,
            unwritable_for=0.0,
            connections=connections,
            in_use=in_use,
            error=error,
            details={
                "cluster_state": state,
                "masters": sorted(f"{n.host}:{n.port}" for n in masters),
                "nodes": len(nodes),
            },
        )


class _ClusterPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, run by the owning client's guard."""

    _owner: ClusterRedis

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        """Run the queued commands; retried as a whole when that is safe."""
        owner = self._owner
        guard = owner._guard
        strategy: Any = self._execution_strategy
        if getattr(strategy, "_watching", False):
            return await super().execute(raise_on_error, allow_redirections)
        queued = [(c.args, dict(c.kwargs)) for c in strategy._command_queue]
        if not queued:
            return []
        run = super().execute
        breaker = guard.breaker

        async def attempt() -> list[Any]:
            strategy._command_queue = [
                PipelineCommand(i, *args, **dict(kwargs)) for i, (args, kwargs) in enumerate(queued)
            ]
            if breaker is None:
                return await run(raise_on_error, allow_redirections)
            return await breaker.call(run, raise_on_error, allow_redirections)

        started = owner._now()
        try:
            async with async_timeout(guard.deadline) as scope:
                if breaker is None:
                    result = await run(raise_on_error, allow_redirections)
                else:
                    result = await breaker.call(run, raise_on_error, allow_redirections)
        except Exception as exc:
            try:
                result = await guard.recover(
                    exc,
                    started,
                    attempt,
                    "PIPELINE",
                    lambda: all(is_idempotent(a, owner._extra_idempotent) for a, _ in queued),
                    scope,
                )
            finally:
                guard.observe(owner._now() - started)
            return result
        guard.observe(owner._now() - started)
        return result
