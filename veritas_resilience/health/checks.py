"""Built-in health checks: PostgreSQL, Redis, disk, memory, event-loop lag and circuit breakers.

Each function returns a check to pass to :meth:`HealthRegistry.add`::

    health.add("postgres", checks.postgres(db), critical=True)
    health.add("redis", checks.redis(cache))
    health.add("disk", checks.disk("/var/lib/orders", warn=0.80, fail=0.95))
    health.add("memory", checks.memory(warn=0.85, fail=0.95))
    health.add("breakers", checks.breakers(registry, critical={"payments"}))

The PostgreSQL and Redis checks read the clients' own ``health()``; they need no driver import
here. Memory and event-loop lag are *process* checks (``process_local``): the only kind the
liveness group takes without ``allow_in_liveness=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio
import anyio.to_thread
import psutil

from .._redact import redact
from .._validate import Seconds, seconds
from ..events import CircuitState
from ._model import CheckResult, Observation, Status, worst
from ._watchdog import LoopLagMonitor

__all__ = [
    "BreakersCheck",
    "DiskCheck",
    "EventLoopLagCheck",
    "MemoryCheck",
    "PostgresCheck",
    "RedisCheck",
    "breakers",
    "disk",
    "event_loop_lag",
    "memory",
    "postgres",
    "redis",
]


def _ratio(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a ratio in (0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{field} must be a ratio in (0, 1], got {value!r}")
    return value


def _thresholds(warn: float, fail: float) -> tuple[float, float]:
    warn, fail = _ratio(warn, "warn"), _ratio(fail, "fail")
    if warn > fail:
        raise ValueError(f"warn must be <= fail, got warn={warn!r} > fail={fail!r}")
    return warn, fail


def _grade(value: float, warn: float, fail: float) -> Status:
    if value >= fail:
        return Status.FAIL
    if value >= warn:
        return Status.WARN
    return Status.PASS


class _Check:
    """Base of the built-in checks: flags read by the registry."""

    process_local = False
    """Whether the check reads the process alone (may serve the liveness probe)."""
    component_type = "component"
    """``componentType`` of its readings."""


# -- PostgreSQL ------------------------------------------------------------------------------------


class _PostgresClient(Protocol):
    async def health(self, *, refresh: bool = ...) -> Any: ...


class PostgresCheck(_Check):
    """Reads :meth:`FailoverClient.health() <veritas_resilience.postgres.FailoverClient.health>`.

    ``fail`` without a writable primary (or with writes blocked), ``warn`` when degraded (a node
    down, fenced, lagging or with its breaker not closed), else ``pass``. One reading per node,
    ``postgres:replicationLag`` in seconds (0 for the primary).
    """

    component_type = "datastore"

    def __init__(self, client: _PostgresClient, *, refresh: bool, lag_warn: float | None) -> None:
        self._client = client
        self._refresh = refresh
        self._lag_warn = lag_warn

    async def __call__(self) -> CheckResult:
        """Read the client's health."""
        health = await self._client.health(refresh=self._refresh)
        observations = []
        problems = []
        for node in health.nodes:
            status, output = self._node_status(node)
            if output is not None:
                problems.append(f"{node.name}: {output}")
            value = 0.0 if node.active else node.lag_seconds
            observations.append(
                Observation(
                    status=status,
                    measurement="replicationLag",
                    component_id=node.name,
                    component_type="datastore",
                    observed_value=None if value is None else round(float(value), 6),
                    observed_unit="s",
                    output=output,
                )
            )
        if health.writes_blocked is not None:
            status, output = Status.FAIL, f"writes blocked ({health.writes_blocked})"
        elif health.status == "down" or health.active is None:
            status, output = Status.FAIL, "no writable primary"
        elif health.status == "degraded" or problems:
            status, output = Status.WARN, "degraded"
        else:
            status, output = Status.PASS, None
        if problems and output is not None:
            output = f"{output}: {'; '.join(problems)}"
        return CheckResult(status=status, output=output, observations=tuple(observations))

    def _node_status(self, node: Any) -> tuple[Status, str | None]:
        if node.fenced is not None:
            return Status.FAIL, f"fenced ({node.fenced})"
        if node.reachable is False:
            why = f" ({node.last_error})" if node.last_error else ""
            return Status.FAIL, f"unreachable{why}"
        if node.reachable is None:
            return Status.WARN, "not probed yet"
        if node.breaker != "closed":
            return Status.WARN, f"breaker {node.breaker}"
        lag = node.lag_seconds
        if (
            self._lag_warn is not None
            and not node.active
            and lag is not None
            and lag > self._lag_warn
        ):
            return Status.WARN, f"replication lag {lag:.3f} s"
        if not node.active and not node.readable:
            return Status.WARN, f"{node.role}, not serving reads"
        return Status.PASS, None

    def __repr__(self) -> str:
        return f"checks.postgres({getattr(self._client, 'name', '?')!r})"


def postgres(
    client: _PostgresClient, *, refresh: bool = False, lag_warn: Seconds | None = None
) -> PostgresCheck:
    """A check of a PostgreSQL :class:`~veritas_resilience.postgres.FailoverClient`.

    Args:
        client: The client.
        refresh: Probe every node at each run instead of reading the monitor's picture (the
            picture is at most one monitor interval old, and costs nothing).
        lag_warn: Replication lag in seconds above which a standby warns (off by default).

    Raises:
        ValueError: If ``client`` has no ``health()`` or ``lag_warn`` is not > 0.
    """
    if not callable(getattr(client, "health", None)):
        raise ValueError(f"client must have a health() method, got {client!r}")
    lag = None if lag_warn is None else seconds(lag_warn, "lag_warn")
    return PostgresCheck(client, refresh=refresh, lag_warn=lag)


# -- Redis -----------------------------------------------------------------------------------------


class _RedisClient(Protocol):
    async def health(self, *, timeout: float = ...) -> Any: ...  # noqa: ASYNC109


_REDIS_STATUS = {"ok": Status.PASS, "degraded": Status.WARN, "down": Status.FAIL}


class RedisCheck(_Check):
    """Reads ``health()`` of a :class:`~veritas_resilience.redis.SentinelRedis` or
    :class:`~veritas_resilience.redis.ClusterRedis`: ok/degraded/down as pass/warn/fail, and the
    PING's round trip as ``redis:responseTime`` in milliseconds."""

    component_type = "datastore"

    def __init__(self, client: _RedisClient, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def __call__(self) -> CheckResult:
        """Read the client's health."""
        health = await self._client.health(timeout=self._timeout)
        status = _REDIS_STATUS.get(health.status, Status.FAIL)
        output = None if health.error is None else redact(str(health.error))
        if status is not Status.PASS and output is None:
            output = health.status
        ping = health.ping_seconds
        return CheckResult(
            status=status,
            output=output,
            observations=(
                Observation(
                    status=status,
                    measurement="responseTime",
                    component_id=health.node,
                    component_type="datastore",
                    observed_value=None if ping is None else round(ping * 1000.0, 3),
                    observed_unit="ms",
                    output=output,
                ),
            ),
        )

    def __repr__(self) -> str:
        return f"checks.redis({getattr(self._client, 'name', '?')!r})"


def redis(client: _RedisClient, *, timeout: Seconds = 1.0) -> RedisCheck:
    """A check of a Redis client of this library (Sentinel or Cluster).

    Args:
        client: The client.
        timeout: Seconds its health PING may take (keep it under the check's timeout).

    Raises:
        ValueError: If ``client`` has no ``health()`` or ``timeout`` is not > 0.
    """
    if not callable(getattr(client, "health", None)):
        raise ValueError(f"client must have a health() method, got {client!r}")
    return RedisCheck(client, timeout=seconds(timeout, "timeout"))


# -- disk and memory -------------------------------------------------------------------------------


class DiskCheck(_Check):
    """The used share of the file system holding a path, as ``disk:utilization`` in percent."""

    component_type = "system"

    def __init__(self, path: str, warn: float, fail: float) -> None:
        self.path = path
        self.warn = warn
        self.fail = fail

    async def __call__(self) -> CheckResult:
        """Read the file system's usage (in a worker thread: a hung mount must not block)."""
        usage = await anyio.to_thread.run_sync(psutil.disk_usage, self.path, abandon_on_cancel=True)
        capacity = usage.used + usage.free  # without the blocks reserved for root, as df does
        ratio = usage.used / capacity if capacity else 0.0
        status = _grade(ratio, self.warn, self.fail)
        output = None
        if status is not Status.PASS:
            output = f"{ratio:.1%} used, {'fail' if status is Status.FAIL else 'warn'} at " + (
                f"{self.fail:.0%}" if status is Status.FAIL else f"{self.warn:.0%}"
            )
        return CheckResult(
            status=status,
            output=output,
            measurement="utilization",
            component_type="system",
            observed_value=round(ratio * 100.0, 2),
            observed_unit="percent",
        )

    def __repr__(self) -> str:
        return f"checks.disk({self.path!r}, warn={self.warn!r}, fail={self.fail!r})"


def disk(path: str = ".", *, warn: float = 0.80, fail: float = 0.95) -> DiskCheck:
    """A check of the file system holding ``path``: warn and fail at these used ratios.

    Args:
        path: Any path on the file system to watch.
        warn: Used ratio in (0, 1] at which it warns.
        fail: Used ratio in (0, 1] at which it fails (>= ``warn``).

    Raises:
        ValueError: If a ratio is out of range, ``warn`` > ``fail``, or ``path`` is empty.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    return DiskCheck(path, *_thresholds(warn, fail))


class MemoryCheck(_Check):
    """System memory in use (``memory:utilization``, percent) and the process's resident set
    (``memory:rss``, bytes, graded against ``rss_limit`` when one is given)."""

    process_local = True
    component_type = "system"

    def __init__(self, warn: float, fail: float, rss_limit: int | None) -> None:
        self.warn = warn
        self.fail = fail
        self.rss_limit = rss_limit
        self._process = psutil.Process()

    async def __call__(self) -> CheckResult:
        """Read memory use."""
        vm = psutil.virtual_memory()
        used = 1.0 - vm.available / vm.total if vm.total else 0.0
        rss = self._process.memory_info().rss
        system = _grade(used, self.warn, self.fail)
        process = Status.PASS
        if self.rss_limit is not None:
            process = _grade(rss / self.rss_limit, self.warn, self.fail)
        readings = (
            Observation(
                status=system,
                measurement="utilization",
                component_type="system",
                observed_value=round(used * 100.0, 2),
                observed_unit="percent",
                output=None if system is Status.PASS else f"{used:.1%} of system memory in use",
            ),
            Observation(
                status=process,
                measurement="rss",
                component_type="system",
                observed_value=rss,
                observed_unit="bytes",
                output=None
                if process is Status.PASS
                else f"resident set {rss} bytes of a {self.rss_limit}-byte limit",
            ),
        )
        status = worst(r.status for r in readings)
        output = "; ".join(r.output for r in readings if r.output) or None
        return CheckResult(status=status, output=output, observations=readings)

    def __repr__(self) -> str:
        return (
            f"checks.memory(warn={self.warn!r}, fail={self.fail!r}, rss_limit={self.rss_limit!r})"
        )


def memory(*, warn: float = 0.85, fail: float = 0.95, rss_limit: int | None = None) -> MemoryCheck:
    """A process check of memory: the system's share in use, and the process's resident set.

    Args:
        warn: Ratio in (0, 1] at which it warns.
        fail: Ratio in (0, 1] at which it fails (>= ``warn``).
        rss_limit: Bytes the process may use (its container's limit); the resident set is
            graded against it with the same ratios. Not graded when omitted.

    Raises:
        ValueError: If a ratio is out of range, ``warn`` > ``fail``, or ``rss_limit`` < 1.
    """
    warn, fail = _thresholds(warn, fail)
    if rss_limit is not None and (
        isinstance(rss_limit, bool) or not isinstance(rss_limit, int) or rss_limit < 1
    ):
        raise ValueError(f"rss_limit must be a number of bytes >= 1 or None, got {rss_limit!r}")
    return MemoryCheck(warn, fail, rss_limit)


# -- event loop ------------------------------------------------------------------------------------


class EventLoopLagCheck(_Check):
    """How late the event loop runs, as ``event_loop:lag`` in seconds: a process check."""

    process_local = True
    component_type = "system"

    def __init__(self, monitor: LoopLagMonitor, warn: float, fail: float) -> None:
        self.monitor = monitor
        self.warn = warn
        self.fail = fail

    async def __call__(self) -> CheckResult:
        """Read the lag."""
        lag = await self.monitor.measure()
        status = (
            Status.FAIL if lag >= self.fail else Status.WARN if lag >= self.warn else Status.PASS
        )
        return CheckResult(
            status=status,
            output=None if status is Status.PASS else f"event loop {lag:.3f} s late",
            measurement="lag",
            component_type="system",
            observed_value=round(lag, 6),
            observed_unit="s",
        )

    def __repr__(self) -> str:
        return f"checks.event_loop_lag(warn={self.warn!r}, fail={self.fail!r})"


def event_loop_lag(
    monitor: LoopLagMonitor | None = None, *, warn: Seconds = 1.0, fail: Seconds = 5.0
) -> EventLoopLagCheck:
    """A process check of event-loop lag (every registry has one, named ``event_loop``).

    Args:
        monitor: The heartbeat to read; a new one by default (it measures on the spot until
            its ``run()`` is started).
        warn: Seconds of lag at which it warns.
        fail: Seconds of lag at which it fails (>= ``warn``).

    Raises:
        ValueError: If a threshold is not > 0 or ``warn`` > ``fail``.
    """
    warn_s, fail_s = seconds(warn, "warn"), seconds(fail, "fail")
    if warn_s > fail_s:
        raise ValueError(f"warn must be <= fail, got warn={warn_s!r} > fail={fail_s!r}")
    return EventLoopLagCheck(monitor or LoopLagMonitor(), warn_s, fail_s)


# -- circuit breakers ------------------------------------------------------------------------------


class _Breaker(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def state(self) -> CircuitState: ...


_OPEN = (CircuitState.OPEN, CircuitState.FORCED_OPEN)


class BreakersCheck(_Check):
    """The state of every breaker: one ``breakers:state`` reading per breaker.

    An open (or forced-open) breaker warns; one marked critical fails; a half-open one warns.
    """

    def __init__(self, source: Iterable[_Breaker], critical: Callable[[str], bool]) -> None:
        self._source = source
        self._critical = critical

    async def __call__(self) -> CheckResult:
        """Read the breakers' states."""
        readings = []
        problems = []
        for breaker in sorted(self._source, key=lambda b: b.name):
            state = breaker.state
            if state in _OPEN:
                status = Status.FAIL if self._critical(breaker.name) else Status.WARN
            elif state is CircuitState.HALF_OPEN:
                status = Status.WARN
            else:
                status = Status.PASS
            output = None if status is Status.PASS else f"{breaker.name} is {state.value}"
            if output is not None:
                problems.append(output)
            readings.append(
                Observation(
                    status=status,
                    measurement="state",
                    component_id=breaker.name,
                    component_type="component",
                    observed_value=state.value,
                    output=output,
                )
            )
        return CheckResult(
            status=worst(r.status for r in readings),
            output="; ".join(problems) or None,
            observations=tuple(readings),
        )

    def __repr__(self) -> str:
        return "checks.breakers(...)"


def breakers(
    source: Iterable[_Breaker], *, critical: Iterable[str] | Callable[[str], bool] = ()
) -> BreakersCheck:
    """A check of circuit breakers: any open breaker warns; a critical one open fails.

    Register it with ``critical=True`` for a critical breaker's ``fail`` to fail readiness (a
    non-critical check's failure makes the probe ``warn``).

    Args:
        source: A :class:`~veritas_resilience.CircuitBreakerRegistry`, or any iterable of
            breakers; read at each run, so breakers created later are included.
        critical: Names of the breakers whose opening fails the check, or a predicate on names.

    Raises:
        ValueError: If ``source`` is not iterable or ``critical`` holds something else than
            names.
    """
    if not hasattr(source, "__iter__"):
        raise ValueError(
            f"source must be a breaker registry or an iterable of breakers, got {source!r}"
        )
    if callable(critical):
        predicate = critical
    else:
        if isinstance(critical, str):
            critical = (critical,)
        names = frozenset(critical)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"critical must hold breaker names, got {sorted(map(repr, names))}")
        predicate = names.__contains__
    return BreakersCheck(source, predicate)
