"""The health registry: checks by name and group, run concurrently, isolated, cached, shared."""

from __future__ import annotations

import bisect
import inspect
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import anyio
import anyio.abc

from .. import _hooks
from .._clock import MONOTONIC, Clock
from .._redact import redact
from .._validate import Seconds, seconds
from ..events import Hook
from ..instrumentation.prometheus import HistogramValue, cumulative_buckets, define_metric
from ._events import HealthCheckChanged, HealthProbeChanged, HealthShutdownDrained
from ._model import CheckResult, HealthReport, Observation, Status, aggregate
from ._watchdog import LoopLagMonitor

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ._asgi import HealthApp

__all__ = ["Check", "CheckReturn", "Details", "HealthRegistry"]

CheckReturn: TypeAlias = "CheckResult | Status | str | bool | int | float | None"
"""What a check may return: a result, a status (or its word), a bool, a number, or None (pass)."""

Check: TypeAlias = "Callable[[], Awaitable[CheckReturn]] | Callable[[], CheckReturn]"
"""A check: a callable without arguments, ``async`` or not, returning a :data:`CheckReturn`."""

Details: TypeAlias = Literal["never", "always", "authorized"]

LIVENESS = "liveness"
READINESS = "readiness"
STARTUP = "startup"
_RESERVED = frozenset({READINESS, STARTUP})
_GROUP = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

define_metric(
    "veritas_health_status",
    "gauge",
    "Status of each health check (one-hot: 1 for the current status).",
    ("name", "check", "status"),
)
define_metric(
    "veritas_health_check_duration_seconds",
    "histogram",
    "Duration of health check runs (cached answers are not counted).",
    ("name", "check"),
)
define_metric(
    "veritas_health_ready",
    "gauge",
    "Whether the service's own readiness state passes (set_ready and not shutting down).",
    ("name",),
)

# Prebuilt, so that an unchanged report is made of the very same objects (the app caches the
# encoded body while they stay the same).
_NOT_READY = CheckResult(
    status=Status.FAIL, measurement="state", component_type="component", output="not ready"
)
_SHUTTING_DOWN = CheckResult(
    status=Status.FAIL, measurement="state", component_type="component", output="shutting down"
)
_NOT_STARTED = CheckResult(
    status=Status.FAIL, measurement="state", component_type="component", output="not started"
)


class _Flight:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: CheckResult | None = None


class _Entry:
    __slots__ = (
        "bounds",
        "check",
        "component_type",
        "critical",
        "expires",
        "fail_ttl",
        "flight",
        "groups",
        "hist",
        "hist_sum",
        "name",
        "pass_ttl",
        "result",
        "timeout",
        "timeout_text",
    )

    def __init__(
        self,
        name: str,
        check: Check,
        critical: bool,
        groups: frozenset[str],
        timeout: float,
        pass_ttl: float,
        fail_ttl: float,
        component_type: str | None,
    ) -> None:
        self.name = name
        self.check = check
        self.critical = critical
        self.groups = groups
        self.timeout = timeout
        self.timeout_text = f"timed out after {timeout} s"
        self.pass_ttl = pass_ttl
        self.fail_ttl = fail_ttl
        self.component_type = component_type
        self.result: CheckResult | None = None
        self.expires = -float("inf")
        self.flight: _Flight | None = None
        self.bounds = tuple(sorted({*_BOUNDS, timeout}))
        self.hist = [0] * (len(self.bounds) + 1)
        self.hist_sum = 0.0


class HealthRegistry(_hooks.Instrumented):
    """The service's health checks, served as liveness, readiness, startup and health probes.

    Example::

        health = HealthRegistry(service="orders", version="1.4.2")
        health.add("postgres", checks.postgres(db), critical=True)
        health.add("redis", checks.redis(cache))
        app = health.asgi()          # /health /ready /live /startup /metrics

    Every check of a probe runs concurrently under its own timeout; a check that hangs or raises
    gives ``fail`` with the reason in ``output``, never an error. Results are cached per check
    (``pass_ttl`` for pass, ``fail_ttl`` for warn and fail) and single-flight: concurrent probes
    share one run of each check.

    The registry holds one process check from the start: ``event_loop`` (group ``liveness``),
    which fails when the event loop has been late by ``loop_lag_fail`` seconds. ``/live``
    answers from it (and from other process checks) alone.

    Args:
        service: The service's id (``serviceId`` in the health+json body).
        version: The service's version.
        release_id: The service's release id.
        description: A human description of the service.
        name: The registry's name in metrics and logs; ``service`` (or ``"default"``) by default.
        loop_lag_warn: Seconds of event-loop lag at which ``event_loop`` warns.
        loop_lag_fail: Seconds of event-loop lag at which ``event_loop`` (and ``/live``) fails.
        ready: The initial readiness state (see :meth:`set_ready`).
        shutdown_delay: Seconds to keep answering with readiness ``fail`` at shutdown before
            draining, so that load balancers notice and stop sending traffic.
        drain_timeout: Seconds to wait at shutdown for in-flight requests to finish.
        clock: The time source for caching, durations and the lag monitor.
        hooks: Hooks for this registry's events; the default hooks when omitted.

    Raises:
        ValueError: If ``loop_lag_warn`` > ``loop_lag_fail``, or a duration is out of range.
    """

    def __init__(
        self,
        service: str | None = None,
        version: str | None = None,
        *,
        release_id: str | None = None,
        description: str | None = None,
        name: str | None = None,
        loop_lag_warn: Seconds = 1.0,
        loop_lag_fail: Seconds = 5.0,
        ready: bool = True,
        shutdown_delay: Seconds = 0.0,
        drain_timeout: Seconds = 30.0,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        for field, value in (
            ("service", service),
            ("version", version),
            ("release_id", release_id),
            ("description", description),
            ("name", name),
        ):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{field} must be a non-empty string or None, got {value!r}")
        self.service = service
        self.version = version
        self.release_id = release_id
        self.description = description
        self._name = name or service or "default"
        self.shutdown_delay = seconds(shutdown_delay, "shutdown_delay", allow_zero=True)
        self.drain_timeout = seconds(drain_timeout, "drain_timeout", allow_zero=True)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._groups: dict[str | None, tuple[_Entry, ...]] = {}
        self._ready = bool(ready)
        self._started = False
        self._shutting_down = False
        self._in_flight = 0
        self._idle: anyio.Event | None = None
        self.monitor = LoopLagMonitor(clock=clock)
        """The event-loop lag monitor behind the ``event_loop`` check."""
        from .checks import event_loop_lag

        self.add(
            "event_loop",
            event_loop_lag(self.monitor, warn=loop_lag_warn, fail=loop_lag_fail),
            critical=True,
            groups=(LIVENESS,),
            timeout=max(1.0, seconds(loop_lag_fail, "loop_lag_fail")),
            # A pass is reused for one heartbeat (the lag reading changes no faster); a probe
            # that follows a blocked loop finds it expired, and a warn or fail is never reused.
            pass_ttl=self.monitor.interval,
            fail_ttl=0.0,
        )
        self._init_hooks(hooks)

    # -- registration -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The registry's name in metrics and logs."""
        return self._name

    def add(
        self,
        name: str,
        check: Check,
        *,
        critical: bool = False,
        groups: Iterable[str] = (READINESS,),
        timeout: Seconds = 2.0,
        pass_ttl: Seconds = 1.0,
        fail_ttl: Seconds = 1.0,
        allow_in_liveness: bool = False,
        component_type: str | None = None,
    ) -> None:
        """Register a check.

        Args:
            name: The check's name: the component part of its keys in the health+json body.
                Unique, non-empty, without ``:``; ``readiness`` and ``startup`` are taken.
            check: A callable without arguments (``async`` or not) returning a
                :class:`CheckResult`, a :class:`Status` or its word, a bool, a number (an
                observed value that passes) or ``None`` (pass). An exception means ``fail``.
            critical: Whether its failure fails the probe (else it makes the probe ``warn``).
            groups: The groups that serve it: ``"readiness"`` (``/ready``), ``"liveness"``
                (``/live``), ``"startup"`` (``/startup``) or names of your own
                (``/health/<group>``). ``/health`` serves every check. Empty means readiness.
            timeout: Seconds the check may take before it counts as failed.
            pass_ttl: Seconds a ``pass`` result is reused.
            fail_ttl: Seconds a ``warn`` or ``fail`` result is reused.
            allow_in_liveness: Accept a check that is not a process check in ``liveness``.
                A liveness probe that depends on a shared dependency restarts every instance
                when that dependency fails: say so explicitly if that is really wanted.
            component_type: ``componentType`` of its readings (the check's own by default).

        Raises:
            ValueError: For an empty, duplicate or malformed name, a check that is not
                callable, a bad group, a timeout <= 0, a negative TTL, or a dependency check in
                ``liveness`` without ``allow_in_liveness``.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if ":" in name or name != name.strip():
            raise ValueError(f"name must not contain ':' or surrounding spaces, got {name!r}")
        if name in _RESERVED:
            raise ValueError(f"name {name!r} is reserved for the registry's own state")
        if name in self._entries:
            raise ValueError(f"name {name!r} is already registered")
        if not callable(check):
            raise ValueError(f"check must be a callable, got {check!r}")
        group_set = frozenset([groups] if isinstance(groups, str) else groups) or frozenset(
            {READINESS}
        )
        for group in group_set:
            if not isinstance(group, str) or not _GROUP.match(group):
                raise ValueError(
                    f"groups must hold lowercase names ([a-z0-9_-], not empty), got {group!r}"
                )
        if (
            LIVENESS in group_set
            and not getattr(check, "process_local", False)
            and not allow_in_liveness
        ):
            raise ValueError(
                f"groups: check {name!r} is not a process check and cannot be in 'liveness': a "
                "liveness probe that fails with a dependency restarts every instance at once "
                "(pass allow_in_liveness=True if that is really wanted)"
            )
        entry = _Entry(
            name,
            check,
            bool(critical),
            group_set,
            seconds(timeout, "timeout"),
            seconds(pass_ttl, "pass_ttl", allow_zero=True),
            seconds(fail_ttl, "fail_ttl", allow_zero=True),
            component_type
            if component_type is not None
            else getattr(check, "component_type", None),
        )
        self._entries[name] = entry
        self._groups.clear()

    def remove(self, name: str) -> None:
        """Unregister the check called ``name``.

        Raises:
            KeyError: If there is none.
        """
        del self._entries[name]
        self._groups.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The checks' names, in registration order."""
        return tuple(self._entries)

    @property
    def groups(self) -> frozenset[str]:
        """Every group with at least one check, and the three probes' groups."""
        out = {LIVENESS, READINESS, STARTUP}
        for entry in self._entries.values():
            out |= entry.groups
        return frozenset(out)

    # -- state ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the readiness state passes: :meth:`set_ready` and not shutting down."""
        return self._ready and not self._shutting_down

    @property
    def started(self) -> bool:
        """Whether :meth:`mark_started` was called."""
        return self._started

    @property
    def shutting_down(self) -> bool:
        """Whether shutdown began (readiness fails from then on)."""
        return self._shutting_down

    @property
    def in_flight(self) -> int:
        """Requests the wrapped application is serving now (see :meth:`asgi`)."""
        return self._in_flight

    def set_ready(self, ready: bool = True) -> None:
        """Set the readiness state: ``False`` makes ``/ready`` fail whatever the checks say."""
        ready = bool(ready)
        if ready != self._ready:
            self._ready = ready
            if not self._shutting_down:
                self._emit(HealthProbeChanged(name=self._name, probe=READINESS, ok=ready,
                                              reason="set_ready"))  # fmt: skip

    def mark_started(self) -> None:
        """Tell ``/startup`` the application has started; it answers 503 until then."""
        if not self._started:
            self._started = True
            self._emit(HealthProbeChanged(name=self._name, probe=STARTUP, ok=True,
                                          reason="started"))  # fmt: skip

    # -- running checks ---------------------------------------------------------------------------

    def _entries_for(self, group: str | None) -> tuple[_Entry, ...]:
        entries = self._groups.get(group)
        if entries is None:
            entries = tuple(e for e in self._entries.values() if group is None or group in e.groups)
            self._groups[group] = entries
        return entries

    async def run(self, group: str | None = None) -> HealthReport:
        """Run (or reuse) the checks of ``group`` and aggregate them.

        Args:
            group: ``None`` for every check (``/health``), or a group's name. ``readiness`` and
                ``None`` include the readiness state; ``startup`` includes the startup state.

        Returns:
            The :class:`HealthReport`; it never raises for a failing check.

        Raises:
            KeyError: If no check belongs to a group of the user's called ``group``.
        """
        entries = self._entries_for(group)
        if group is not None and not entries and group not in (LIVENESS, READINESS, STARTUP):
            raise KeyError(group)
        now = self._clock.monotonic()
        results: dict[str, CheckResult] = {}
        stale: list[_Entry] = []
        for entry in entries:
            result = entry.result
            if result is not None and now < entry.expires:
                results[entry.name] = result
            else:
                stale.append(entry)
        if len(stale) == 1:
            results[stale[0].name] = await self._result(stale[0])
        elif stale:

            async def one(entry: _Entry) -> None:
                results[entry.name] = await self._result(entry)

            async with anyio.create_task_group() as tg:
                for entry in stale:
                    tg.start_soon(one, entry)
        ordered = {e.name: results[e.name] for e in entries}
        critical = frozenset(e.name for e in entries if e.critical)
        state: CheckResult | None = None
        if group is None or group == READINESS:
            if self._shutting_down:
                state = _SHUTTING_DOWN
            elif not self._ready:
                state = _NOT_READY
            key = READINESS
        elif group == STARTUP and not self._started:
            state, key = _NOT_STARTED, STARTUP
        if state is not None:
            ordered[key] = state
            critical = critical | {key}
        return HealthReport(
            status=aggregate(ordered, critical),
            checks=ordered,
            critical=critical,
            service_id=self.service,
            version=self.version,
            release_id=self.release_id,
            description=self.description,
        )

    async def _result(self, entry: _Entry) -> CheckResult:
        while True:
            result = entry.result
            if result is not None and self._clock.monotonic() < entry.expires:
                return result
            flight = entry.flight
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
            # The run we waited for was cancelled: try again (one of us runs it).
        flight = entry.flight = _Flight()
        try:
            result = await self._execute(entry)
            flight.result = result
        finally:
            entry.flight = None
            flight.done.set()
        self._record(entry, result)
        return result

    async def _execute(self, entry: _Entry) -> CheckResult:
        now = self._clock.monotonic
        started = now()
        taken = time.time()
        result: CheckResult | None = None
        try:
            with anyio.move_on_after(entry.timeout):
                raw = entry.check()
                if inspect.isawaitable(raw):
                    raw = await raw
                result = _coerce(raw, entry.component_type)
        except Exception as exc:
            text = redact(str(exc))
            output = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            result = CheckResult(status=Status.FAIL, output=output,
                                 component_type=entry.component_type)  # fmt: skip
        if result is None:
            result = CheckResult(status=Status.FAIL, output=entry.timeout_text,
                                 component_type=entry.component_type)  # fmt: skip
        return replace(result, time=taken, duration=max(0.0, now() - started))

    def _record(self, entry: _Entry, result: CheckResult) -> None:
        now = self._clock.monotonic()
        previous = entry.result
        entry.result = result
        entry.expires = now + (entry.pass_ttl if result.status is Status.PASS else entry.fail_ttl)
        duration = result.duration or 0.0
        entry.hist[bisect.bisect_left(entry.bounds, duration)] += 1
        entry.hist_sum += duration
        before = None if previous is None else previous.status
        if before is not result.status and self._hookset.wants(HealthCheckChanged):
            self._emit(
                HealthCheckChanged(
                    name=self._name,
                    check=entry.name,
                    from_status=before,
                    to_status=result.status,
                    critical=entry.critical,
                    output=result.output if result.status is not Status.PASS else None,
                )
            )

    # -- shutdown ---------------------------------------------------------------------------------

    def _request_started(self) -> None:
        self._in_flight += 1

    def _request_finished(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def shutdown(
        self, *, delay: Seconds | None = None, drain_timeout: Seconds | None = None
    ) -> bool:
        """Turn readiness to ``fail``, wait ``delay``, then wait for in-flight requests to end.

        Idempotent: a second call waits for the drain again but changes nothing else.

        Args:
            delay: Seconds to answer ``/ready`` with 503 before draining (``shutdown_delay``
                by default), so that load balancers stop sending new requests first.
            drain_timeout: Seconds to wait for in-flight requests (``drain_timeout`` by
                default).

        Returns:
            Whether every in-flight request finished in time.
        """
        delay_s = self.shutdown_delay if delay is None else seconds(delay, "delay", allow_zero=True)
        drain_s = (
            self.drain_timeout
            if drain_timeout is None
            else seconds(drain_timeout, "drain_timeout", allow_zero=True)
        )
        if not self._shutting_down:
            self._shutting_down = True
            self._emit(HealthProbeChanged(name=self._name, probe=READINESS, ok=False,
                                          reason="shutting_down"))  # fmt: skip
        if delay_s:
            await self._clock.sleep(delay_s)
        started = self._clock.monotonic()
        with anyio.move_on_after(drain_s):
            while self._in_flight > 0:
                # Shared by concurrent shutdown() calls: each waits for the same wake-up.
                if self._idle is None or self._idle.is_set():
                    self._idle = anyio.Event()
                await self._idle.wait()
        drained = self._in_flight == 0
        self._emit(
            HealthShutdownDrained(
                name=self._name,
                drained=drained,
                remaining=self._in_flight,
                waited=self._clock.monotonic() - started,
            )
        )
        return drained

    def lifespan(
        self, app: object = None, *, sigterm: bool = False
    ) -> AbstractAsyncContextManager[None]:
        """An async context for the application's lifetime: the lag monitor runs inside it, and
        leaving it runs :meth:`shutdown` (readiness fails first, then in-flight work drains).

        Pass it as a framework's lifespan (``FastAPI(lifespan=health.lifespan)``) or enter it
        yourself. The app served by :meth:`asgi` does the same on ASGI lifespan events.

        Args:
            app: Ignored; accepted so that the method is a lifespan function itself.
            sigterm: Also run :meth:`watch_sigterm` (main thread only).
        """
        return self._lifespan(sigterm)

    @asynccontextmanager
    async def _lifespan(self, sigterm: bool) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(self.monitor.run)
            if sigterm:
                await tg.start(self.watch_sigterm)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()

    async def watch_sigterm(
        self,
        *,
        then: Callable[[], object] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """On SIGTERM, run :meth:`shutdown` first, then let the server stop.

        Servers stop accepting connections as soon as they see SIGTERM, so the readiness probe
        would never get to say ``fail``. This takes the signal first: readiness fails, the
        ``shutdown_delay`` passes, in-flight requests drain, and only then is the server told
        (``then()``, or the SIGTERM handler installed before this one, such as uvicorn's).
        Works only in the main thread; elsewhere it returns at once.

        Args:
            then: What stops the server once drained (e.g. ``lambda: setattr(server,
                "should_exit", True)``); the previous SIGTERM handler by default, or the
                default action (the process ends) when there was none.
            task_status: For ``task_group.start()``.
        """
        if threading.current_thread() is not threading.main_thread():
            task_status.started()
            return
        previous = signal.getsignal(signal.SIGTERM)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                break
            await self.shutdown()
        if then is not None:
            then()
        elif callable(previous):
            previous(signal.SIGTERM, None)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    # -- ASGI ------------------------------------------------------------------------------------

    def asgi(
        self,
        app: Callable[..., Awaitable[None]] | None = None,
        *,
        details: Details = "authorized",
        token: str | None = None,
        metrics: bool = True,
        metrics_registry: CollectorRegistry | None = None,
        sigterm: bool = False,
    ) -> HealthApp:
        """The probes as a pure ASGI application (see :class:`HealthApp`)."""
        from ._asgi import HealthApp

        return HealthApp(
            self,
            app,
            details=details,
            token=token,
            metrics=metrics,
            metrics_registry=metrics_registry,
            sigterm=sigterm,
        )

    # -- metrics ----------------------------------------------------------------------------------

    def _metric_samples(self) -> Iterable[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for entry in list(self._entries.values()):
            current = None if entry.result is None else entry.result.status
            for status in Status:
                yield (
                    "veritas_health_status",
                    (name, entry.name, status.value),
                    1.0 if status is current else 0.0,
                )
            yield (
                "veritas_health_check_duration_seconds",
                (name, entry.name),
                HistogramValue(cumulative_buckets(entry.bounds, entry.hist), entry.hist_sum),
            )
        yield "veritas_health_ready", (name,), 1.0 if self.ready else 0.0

    def __repr__(self) -> str:
        return f"HealthRegistry(name={self._name!r}, checks={list(self._entries)!r})"


def _coerce(raw: Any, component_type: str | None) -> CheckResult:
    if isinstance(raw, CheckResult):
        result = raw
    elif raw is None or raw is True:
        result = CheckResult(status=Status.PASS)
    elif raw is False:
        result = CheckResult(status=Status.FAIL, output="check returned False")
    elif isinstance(raw, (Status, str)):
        result = CheckResult(status=Status.parse(raw))
    elif isinstance(raw, (int, float)):
        result = CheckResult(status=Status.PASS, observed_value=raw)
    else:
        raise TypeError(
            f"a check must return a CheckResult, a Status, a bool, a number or None, "
            f"got {type(raw).__name__}"
        )
    if result.output is not None or result.observations:
        result = replace(
            result,
            output=None if result.output is None else redact(result.output),
            observations=tuple(_redacted(o) for o in result.observations),
        )
    if component_type is not None and result.component_type is None:
        result = replace(result, component_type=component_type)
    return result


def _redacted(observation: Observation) -> Observation:
    if observation.output is None:
        return observation
    return replace(observation, output=redact(observation.output))
