"""The drill runner: environments (embedded or the user's servers), hypotheses, measurements."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio

from .._redact import redact
from ..chaos import ProxyServer
from ._check import SetCheckResult
from ._errors import DrillError
from ._scenarios import Scenario, default_scenarios
from ._stores import JournalStore, PostgresStore, RedisStore
from ._workload import Op, Store, Workload

if TYPE_CHECKING:
    from ..postgres import FailoverClient
    from ..redis import SentinelRedis
    from ..testing import LocalPostgresCluster, LocalRedisSentinel

__all__ = [
    "Drill",
    "DrillReport",
    "DrillTimings",
    "Environment",
    "Hypothesis",
    "Progress",
    "ScenarioResult",
    "embedded_environment",
    "external_environment",
]

INSTALL_HINT = (
    "The embedded drill runs real PostgreSQL (13+) and Redis (6.2+) servers on loopback; only "
    "their server binaries are needed. Install them with:\n"
    "  Debian/Ubuntu:  sudo apt-get install -y postgresql redis-server\n"
    "  Fedora/RHEL:    sudo dnf install -y postgresql-server redis\n"
    "  macOS:          brew install postgresql@16 redis\n"
    "(the machine's own services need not run; set VERITAS_PG_BINDIR if initdb is not found), "
    "or point the drill at your servers: --postgres DSN ... --redis-sentinel host:port ..."
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DrillTimings:
    """How long each phase lasts (seconds).

    Attributes:
        warmup: Workload time before the first hypothesis check of a scenario.
        window: Length of the steady-state window a hypothesis looks at.
        settle_timeout: How long the system has, after the repair, to be steady again.
        op_timeout: Bound on any single operation of the workload.
        drain_timeout: How long to wait for a scenario's writes in flight before the final read.
    """

    warmup: float = 1.5
    window: float = 1.0
    settle_timeout: float = 20.0
    op_timeout: float = 10.0
    drain_timeout: float = 12.0

    def __post_init__(self) -> None:
        for name in ("warmup", "window", "settle_timeout", "op_timeout", "drain_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """One checked hypothesis: its statement, whether it held, and what was seen."""

    name: str
    held: bool
    detail: str


@dataclass
class ScenarioResult:
    """What a scenario did and measured.

    Attributes:
        name: The scenario's name.
        title: What happened.
        store: The store the fault hit.
        passed: Whether every hypothesis held.
        skipped: Why the scenario did not run (not possible here), or None.
        hypotheses: Every hypothesis checked, in order.
        checks: The set check of each store.
        fault_at: Drill time the fault was injected (s).
        repair_at: Drill time the repair started (s).
        recovered_at: Drill time service was restored (s), if it was.
        end_at: Drill time the scenario ended (s).
        detection: Seconds from the fault to the first sign of it on its store: a failed call,
            a read served by the stale cache, or the client's health leaving ``ok`` (None:
            nothing noticed it).
        first_write: Seconds from the fault to the first successful write begun once the fault
            was noticed (or after the fault, if it never was).
        errors: Failed calls by error type, during the scenario.
        fallback_served: Reads answered by the stale cache during the scenario.
        writes_ok: Acknowledged writes during the scenario (every store).
        timeline: Per store, points every 0.5 s since the fault (negative before it):
            ``(t, writes ok per second, failed calls per second)``.
        marks: Moments of the repair, as ``(drill time, label)`` (promotion, SIGCONT...).
    """

    name: str
    title: str
    store: str
    passed: bool = False
    skipped: str | None = None
    hypotheses: list[Hypothesis] = field(default_factory=list)
    checks: dict[str, SetCheckResult] = field(default_factory=dict)
    fault_at: float | None = None
    repair_at: float | None = None
    recovered_at: float | None = None
    end_at: float | None = None
    start_at: float | None = None
    detection: float | None = None
    first_write: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    fallback_served: int = 0
    writes_ok: int = 0
    timeline: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    marks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Acknowledged writes lost, over every store."""
        return sum(len(c.lost) for c in self.checks.values())

    @property
    def unexpected(self) -> int:
        """Unexpected ids read, over every store."""
        return sum(len(c.unexpected) for c in self.checks.values())

    @property
    def indeterminate(self) -> int:
        """Writes of unknown outcome, over every store."""
        return sum(c.indeterminate for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""

        def rel(t: float | None) -> float | None:
            if t is None or self.fault_at is None:
                return None
            return round(t - self.fault_at, 3)

        return {
            "name": self.name,
            "title": self.title,
            "store": self.store,
            "passed": self.passed,
            "skipped": self.skipped,
            "hypotheses": [
                {"name": h.name, "held": h.held, "detail": h.detail} for h in self.hypotheses
            ],
            "set_checks": {store: c.as_dict() for store, c in self.checks.items()},
            "lost": self.lost,
            "unexpected": self.unexpected,
            "indeterminate": self.indeterminate,
            "detection_seconds": _round(self.detection),
            "first_write_seconds": _round(self.first_write),
            "repair_started_seconds": rel(self.repair_at),
            "recovered_seconds": rel(self.recovered_at),
            "errors": dict(self.errors),
            "fallback_served": self.fallback_served,
            "writes_ok": self.writes_ok,
            "marks": [{"seconds": rel(t), "label": label} for t, label in self.marks],
            "timeline": {
                store: [list(point) for point in points] for store, points in self.timeline.items()
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class DrillReport:
    """The whole drill.

    Attributes:
        results: One per scenario, in order.
        environment: What the drill ran against (no secrets).
        started: Wall-clock start (ISO 8601, UTC).
        duration: Seconds the scenarios took.
        setup: Seconds the environment took to start (servers, clients), when known.
    """

    results: list[ScenarioResult]
    environment: dict[str, Any]
    started: str
    duration: float = 0.0
    setup: float | None = None

    @property
    def passed(self) -> bool:
        """Whether every scenario that ran passed (and at least one ran)."""
        ran = [r for r in self.results if r.skipped is None]
        return bool(ran) and all(r.passed for r in ran)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "passed": self.passed,
            "started": self.started,
            "duration_seconds": round(self.duration, 2),
            "setup_seconds": None if self.setup is None else round(self.setup, 2),
            "environment": self.environment,
            "scenarios": [r.as_dict() for r in self.results],
        }


_NEEDS = {
    "pg_control": "PostgreSQL started by the drill",
    "pg_proxy": "PostgreSQL (--postgres)",
    "redis_control": "Redis started by the drill",
    "redis_proxy": "Redis (--redis-sentinel)",
    "disk": "/dev/full",
}


class Progress(Protocol):
    """Receives the drill's progress (the CLI shows it live)."""

    def phase(self, scenario: str, phase: str) -> None:
        """A scenario entered a phase (``steady``, ``fault``, ``repair``, ``settle``, ``check``)."""

    def tick(self, workload: Workload) -> None:
        """Called about twice a second with the running workload."""

    def result(self, result: ScenarioResult) -> None:
        """A scenario finished."""


class Environment:
    """What the drill runs against: the stores, the proxy, and the servers it may control.

    Made by :func:`embedded_environment` or :func:`external_environment`.
    """

    def __init__(
        self,
        *,
        stores: list[Store],
        proxies: ProxyServer,
        capabilities: set[str],
        description: dict[str, Any],
        pg_client: FailoverClient | None = None,
        pg_proxy_of: dict[str, str] | None = None,
        pg_cluster: LocalPostgresCluster | None = None,
        redis_kit: LocalRedisSentinel | None = None,
        journal: JournalStore | None = None,
        redis_client: SentinelRedis | None = None,
        redis_proxy_of: Mapping[tuple[str, int], str] | None = None,
    ) -> None:
        self.stores = stores
        self.proxies = proxies
        self.capabilities = capabilities
        self.description = description
        self.pg_client = pg_client
        self.pg_proxy_of = pg_proxy_of or {}
        self.pg_cluster = pg_cluster
        self.redis_kit = redis_kit
        self.journal = journal
        self.redis_client = redis_client
        # A live view: proxies are put in front of Redis nodes as the client first dials them.
        self.redis_proxy_of = redis_proxy_of if redis_proxy_of is not None else {}
        self.now: Callable[[], float] = lambda: 0.0

    def require_pg_cluster(self) -> LocalPostgresCluster:
        """The PostgreSQL cluster the drill started."""
        if self.pg_cluster is None:
            raise DrillError("this scenario needs a PostgreSQL cluster started by the drill")
        return self.pg_cluster

    def require_redis_kit(self) -> LocalRedisSentinel:
        """The Redis topology the drill started."""
        if self.redis_kit is None:
            raise DrillError("this scenario needs a Redis topology started by the drill")
        return self.redis_kit

    def require_journal(self) -> JournalStore:
        """The drill's journal."""
        if self.journal is None:
            raise DrillError("this scenario needs the drill's journal")
        return self.journal

    async def pg_primary_proxy(self) -> str:
        """The name of the proxy in front of the node that takes writes now."""
        if self.pg_client is None:
            raise DrillError("no PostgreSQL client")
        health = await self.pg_client.health()
        if health.active is None or health.active not in self.pg_proxy_of:
            raise DrillError(f"no PostgreSQL primary to fault (status {health.status})")
        return self.pg_proxy_of[health.active]

    async def redis_master_proxy(self) -> str:
        """The name of the proxy in front of the Redis master the client uses now."""
        if self.redis_client is None:
            raise DrillError("no Redis client")
        master = self.redis_client.master_address
        if master is None or master not in self.redis_proxy_of:
            raise DrillError("no Redis master reached through the drill's proxy to fault")
        return self.redis_proxy_of[master]

    async def writable_proxy(self, store: str) -> str:
        """The proxy in front of the node of ``store`` (``"postgres"`` or ``"redis"``) that
        takes writes now."""
        if store == "postgres":
            return await self.pg_primary_proxy()
        if store == "redis":
            return await self.redis_master_proxy()
        raise DrillError(f"no proxy for the store {store!r}")


class Drill:
    """Plays scenarios one after another against an environment, with the workload running.

    For each scenario: the steady-state hypothesis is checked over the last ``window`` seconds,
    the fault is injected and held, the repair runs, the system has ``settle_timeout`` seconds
    to be steady again, then the writes of the scenario are drained and the set check runs on
    every store. A scenario passes when every hypothesis holds.

    Args:
        env: The environment.
        scenarios: The scenarios (``default_scenarios()`` when None); those whose ``requires``
            the environment does not offer are reported as skipped.
        timings: Phase lengths.
        progress: Receives live progress.
        writers: Writer tasks per store.
    """

    def __init__(
        self,
        env: Environment,
        scenarios: Sequence[Scenario] | None = None,
        *,
        timings: DrillTimings | None = None,
        progress: Progress | None = None,
        writers: int = 2,
    ) -> None:
        self.env = env
        self.scenarios = list(scenarios) if scenarios is not None else default_scenarios()
        self.timings = timings or DrillTimings()
        self.progress = progress
        self.workload = Workload(env.stores, writers=writers, op_timeout=self.timings.op_timeout)
        env.now = self.workload.now

    async def run(self) -> DrillReport:
        """Play every scenario; return the report (also when a scenario fails)."""
        started = time.monotonic()
        report = DrillReport(
            results=[],
            environment=self.env.description,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.workload.run)
            if self.progress is not None:
                tg.start_soon(self._ticker)
            tags: list[str] = []
            for scenario in self.scenarios:
                missing = scenario.requires - self.env.capabilities
                result = ScenarioResult(scenario.name, scenario.title, scenario.store)
                if missing:
                    result.skipped = "needs " + ", ".join(_NEEDS.get(m, m) for m in sorted(missing))
                else:
                    tags.append(scenario.name)
                    await self._play(scenario, result)
                report.results.append(result)
                if self.progress is not None:
                    self.progress.result(result)
            tg.cancel_scope.cancel()
        for store in self.env.stores:
            cleanup = getattr(store, "cleanup", None)
            if cleanup is not None:
                with anyio.move_on_after(5), contextlib.suppress(Exception):
                    await cleanup(tags)
        report.duration = time.monotonic() - started
        return report

    async def _ticker(self) -> None:
        assert self.progress is not None
        while True:
            self.progress.tick(self.workload)
            await anyio.sleep(0.5)

    def _phase(self, scenario: Scenario, phase: str) -> None:
        if self.progress is not None:
            self.progress.phase(scenario.name, phase)

    async def _play(self, scenario: Scenario, result: ScenarioResult) -> None:
        t = self.timings
        w = self.workload
        checkers = w.begin(scenario.name)
        result.start_at = w.now()
        self._phase(scenario, "steady")
        await anyio.sleep(t.warmup)
        now = w.now()
        steady, detail = w.steady(now - t.window, now)
        result.hypotheses.append(Hypothesis("steady state before the fault", steady, detail))
        if steady:
            self._phase(scenario, "fault")
            result.fault_at = w.now()
            try:
                await scenario.inject(self.env)
                await anyio.sleep(scenario.hold)
                self._phase(scenario, "repair")
                result.repair_at = w.now()
                await scenario.recover(self.env)
            except Exception as exc:
                result.hypotheses.append(
                    Hypothesis("fault injected and repaired", False, redact(f"{exc!r}"))
                )
            result.recovered_at = scenario.recovered_at
            result.marks = list(scenario.marks)
            self._phase(scenario, "settle")
            result.hypotheses.append(await self._settle())
        self._phase(scenario, "check")
        await w.drain(scenario.name, t.drain_timeout)
        result.end_at = w.now()
        for store in self.env.stores:
            try:
                with anyio.fail_after(t.op_timeout):
                    final = await store.final_read(scenario.name)
            except Exception as exc:
                result.hypotheses.append(
                    Hypothesis(f"{store.name}: final read", False, redact(f"{exc!r}"))
                )
                continue
            check = checkers[store.name].check(final)
            result.checks[store.name] = check
            result.hypotheses.append(
                Hypothesis(
                    f"{store.name}: no acknowledged write lost, nothing unexpected",
                    check.valid,
                    f"{check.acknowledged} acknowledged, {len(check.lost)} lost, "
                    f"{len(check.unexpected)} unexpected, {check.indeterminate} indeterminate "
                    f"({check.recovered} of them present), {check.failed} failed",
                ),
            )
        self._measure(scenario, result)
        result.passed = all(h.held for h in result.hypotheses)

    async def _settle(self) -> Hypothesis:
        t = self.timings
        w = self.workload
        repaired = w.now()
        detail = ""
        while w.now() - repaired < t.settle_timeout:
            await anyio.sleep(0.25)
            now = w.now()
            if now - repaired < t.window:
                continue
            steady, detail = w.steady(now - t.window, now)
            if steady:
                return Hypothesis(
                    "steady state after the repair",
                    True,
                    f"steady {now - repaired:.1f}s after the repair",
                )
        return Hypothesis(
            "steady state after the repair",
            False,
            f"not steady within {t.settle_timeout:.0f}s of the repair: {detail}",
        )

    def _measure(self, scenario: Scenario, result: ScenarioResult) -> None:
        w = self.workload
        end = result.end_at if result.end_at is not None else w.now()
        start = result.start_at if result.start_at is not None else 0.0
        everything = [op for op in w.ops if start <= op.end <= end]
        ops = [op for op in everything if op.kind != "health"]
        result.errors = dict(Counter(op.error for op in ops if op.error is not None).most_common())
        result.fallback_served = sum(op.fallback for op in ops)
        result.writes_ok = sum(op.kind == "write" and op.outcome == "ok" for op in ops)
        result.timeline = _timeline(ops, result.fault_at if result.fault_at is not None else start)
        fault = result.fault_at
        if fault is None:
            return
        hit = [op for op in ops if op.store == scenario.store and op.end >= fault]
        noticed = [op.end for op in hit if op.outcome != "ok" or op.fallback]
        # The client's own health counts too, if it was "ok" just before the fault.
        health = [op for op in everything if op.store == scenario.store and op.kind == "health"]
        before = [op for op in health if op.end < fault]
        if before and before[-1].outcome == "ok":
            noticed += [op.end for op in health if op.end >= fault and op.outcome != "ok"]
        result.detection = min(noticed) - fault if noticed else None
        since = fault + (result.detection or 0.0)
        written = [
            op.end for op in hit if op.kind == "write" and op.outcome == "ok" and op.start >= since
        ]
        result.first_write = min(written) - fault if written else None
        own_timeouts = sum(op.error == "TimeoutError" for op in ops)
        result.hypotheses.append(
            Hypothesis(
                f"every call returned within {self.timings.op_timeout:.0f}s",
                own_timeouts == 0,
                f"{own_timeouts} calls abandoned by the drill" if own_timeouts else "no call hung",
            )
        )
        if not scenario.errors_allowed:
            window = [op for op in hit if op.end <= (result.recovered_at or end)]
            kinds = Counter(op.error for op in window if op.outcome != "ok")
            stale = sum(op.fallback for op in window)
            detail = ", ".join(f"{n}x {e}" for e, n in kinds.most_common()) or "none failed"
            result.hypotheses.append(
                Hypothesis(
                    f"{scenario.store}: no call failed during the fault",
                    not kinds,
                    f"{detail}; {stale} reads answered by the stale cache past their deadline",
                )
            )


_BUCKET = 0.5  # seconds per timeline point; counts are scaled to per second


def _timeline(ops: list[Op], origin: float) -> dict[str, list[tuple[float, int, int]]]:
    buckets: dict[str, dict[int, list[int]]] = {}
    for op in ops:
        if op.kind != "write" and op.outcome == "ok":
            continue
        index = int((op.end - origin) // _BUCKET)
        slot = buckets.setdefault(op.store, {}).setdefault(index, [0, 0])
        if op.outcome == "ok":
            slot[0] += 1
        else:
            slot[1] += 1
    timeline: dict[str, list[tuple[float, int, int]]] = {}
    for store, slots in buckets.items():
        lo, hi = min(slots), max(slots)
        scale = round(1 / _BUCKET)
        timeline[store] = [
            (i * _BUCKET, slots.get(i, [0, 0])[0] * scale, slots.get(i, [0, 0])[1] * scale)
            for i in range(lo, hi + 1)
        ]
    return timeline


# -- environments --------------------------------------------------------------------------------


def _check_binaries() -> None:
    from ..testing._postgres import find_postgres_bindir

    missing = []
    try:
        find_postgres_bindir()
    except RuntimeError:
        missing.append("PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_rewind)")
    if not (
        shutil.which("redis-server")
        or any(Path(p, "redis-server").is_file() for p in ("/usr/bin", "/usr/local/bin"))
    ):
        missing.append("redis-server")
    if missing:
        raise DrillError("Missing: " + "; ".join(missing) + ".\n" + INSTALL_HINT)


@contextlib.asynccontextmanager
async def embedded_environment(*, workdir: Path | None = None) -> AsyncIterator[Environment]:
    """Start the embedded default and yield its environment; stop everything afterwards.

    A PostgreSQL primary and a synchronous standby, and a Redis master, two replicas and three
    Sentinels, all on free loopback ports in a temporary folder (the testing kit), with the
    clients reaching PostgreSQL and the Redis data nodes through the drill's proxy.

    Raises:
        DrillError: If server binaries are missing (the message says how to install them).
    """
    from ..postgres import Node
    from ..testing import LocalPostgresCluster, LocalRedisSentinel

    _check_binaries()
    folder = Path(tempfile.mkdtemp(prefix="veritas-drill-", dir=workdir))
    cluster = LocalPostgresCluster(standbys=1, synchronous=True)
    kit = LocalRedisSentinel(num_replicas=2, down_after_ms=800, failover_timeout_ms=2000)
    proxies = ProxyServer()
    pg: FailoverClient | None = None
    redis: SentinelRedis | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, cluster.start)
            tg.start_soon(anyio.to_thread.run_sync, kit.start)
        nodes = []
        proxy_of = {}
        for node in cluster.nodes:
            info = proxies.create_proxy(node.name, f"{node.host}:{node.port}")
            nodes.append(Node(host=info.host, port=info.port, name=node.name))
            proxy_of[node.name] = node.name
        pg = _pg_client(nodes, user="postgres", database="postgres")
        redis_proxies = _RedisProxies(proxies)
        redis = _redis_client(kit.sentinels, kit.service_name, None, None, redis_proxies)
        await pg.start()
        journal = JournalStore(folder)
        pg_store = PostgresStore(pg)
        await pg_store.setup()
        env = Environment(
            stores=[pg_store, RedisStore(redis, replicas=1), journal],
            proxies=proxies,
            capabilities={"pg_control", "pg_proxy", "redis_control", "redis_proxy", "disk"},
            description={
                "mode": "embedded",
                "postgres": "primary + 1 synchronous standby "
                f"(PostgreSQL {cluster.server_version})",
                "redis": "master + 2 replicas + 3 Sentinels (writes WAIT for 1)",
                "disk": "journal file, fsync per write",
            },
            pg_client=pg,
            pg_proxy_of=proxy_of,
            pg_cluster=cluster,
            redis_kit=kit,
            journal=journal,
            redis_client=redis,
            redis_proxy_of=redis_proxies.proxy_of,
        )
        yield env
    finally:
        with anyio.CancelScope(shield=True):
            await _close_clients(pg, redis, proxies)
            await anyio.to_thread.run_sync(kit.stop)
            await anyio.to_thread.run_sync(cluster.stop)
            shutil.rmtree(folder, ignore_errors=True)


def _pg_client(nodes: list[Any], **kwargs: Any) -> FailoverClient:
    from ..postgres import FailoverClient

    return FailoverClient(
        nodes,
        name="drill-postgres",
        connect_timeout=1.0,
        command_timeout=1.5,
        failover_timeout=8.0,
        monitor_interval=0.25,
        fast_interval=0.05,
        probe_timeout=1.0,
        max_size=8,
        breaker_options={"failure_threshold": 5, "reset_timeout": 0.5},
        hooks=[],
        **kwargs,
    )


class _RedisProxies:
    """The client's ``address_remap``: a proxy of the drill's in front of every Redis data node,
    made when the client first dials it (a replica promoted later gets one too)."""

    def __init__(self, proxies: ProxyServer) -> None:
        self._proxies = proxies
        self.proxy_of: dict[tuple[str, int], str] = {}
        self._listen: dict[tuple[str, int], str] = {}

    def __call__(self, address: tuple[str, int]) -> str:
        listen = self._listen.get(address)
        if listen is None:
            name = f"redis{len(self.proxy_of) + 1}"
            listen = self._proxies.create_proxy(name, f"{address[0]}:{address[1]}").listen
            self._listen[address] = listen
            self.proxy_of[address] = name
        return listen


def _redis_client(
    sentinels: Sequence[Any],
    service: str,
    password: str | None,
    sentinel_password: str | None,
    remap: _RedisProxies,
) -> SentinelRedis:
    from ..redis import SentinelRedis

    return SentinelRedis(
        list(sentinels),
        service,
        name="drill-redis",
        address_remap=remap,
        password=password,
        sentinel_password=sentinel_password,
        socket_timeout=1.0,
        socket_connect_timeout=0.5,
        sentinel_timeout=0.5,
        degraded_poll_interval=0.25,
        ping_interval=0.5,
        hooks=[],
    )


def _proxied_dsn(dsn: str, host: str, port: int) -> str:
    parts = urlsplit(dsn)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def external_environment(
    *,
    postgres: Sequence[str] = (),
    redis_sentinels: Sequence[str] = (),
    redis_service: str = "mymaster",
    redis_password: str | None = None,
    sentinel_password: str | None = None,
    redis_wait_replicas: int = 1,
    workdir: Path | None = None,
) -> AsyncIterator[Environment]:
    """An environment on the user's own servers; the drill never stops or pauses them.

    PostgreSQL is reached through the drill's proxy (one proxy per DSN), and the Redis data
    nodes through one proxy each (the client maps the addresses the Sentinels announce to the
    proxies, with ``address_remap``), so the partition and latency scenarios can run on both;
    the Sentinels are reached directly. The drill's rows and keys
    (table ``veritas_drill_writes``, keys ``veritas-drill:*``) are deleted at the end.

    Raises:
        DrillError: If no server is given or one cannot be reached (secrets never shown).
    """
    from ..postgres import Node

    if not postgres and not redis_sentinels:
        raise DrillError("give --postgres DSN and/or --redis-sentinel host:port")
    folder = Path(tempfile.mkdtemp(prefix="veritas-drill-", dir=workdir))
    proxies = ProxyServer()
    stores: list[Store] = []
    capabilities = {"disk"}
    description: dict[str, Any] = {"mode": "external", "disk": "journal file, fsync per write"}
    pg = None
    redis = None
    proxy_of: dict[str, str] = {}
    redis_proxy_of: dict[tuple[str, int], str] = {}
    try:
        if postgres:
            nodes = []
            for index, dsn in enumerate(postgres, 1):
                parts = urlsplit(dsn)
                if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
                    raise DrillError(f"--postgres must be a postgresql:// URL, got {redact(dsn)}")
                real = f"{parts.hostname}:{parts.port or 5432}"
                info = proxies.create_proxy(f"pg{index}", real)
                nodes.append(
                    Node(
                        host=info.host,
                        port=info.port,
                        name=real,
                        dsn=_proxied_dsn(dsn, info.host, info.port),
                    )
                )
                proxy_of[real] = f"pg{index}"
            pg = _pg_client(nodes)
            try:
                with anyio.fail_after(15):
                    await pg.start()
                store = PostgresStore(pg)
                await store.setup()
            except Exception as exc:
                raise DrillError(f"PostgreSQL not usable: {redact(str(exc))}") from None
            stores.append(store)
            capabilities.add("pg_proxy")
            description["postgres"] = ", ".join(proxy_of)
        if redis_sentinels:
            redis_proxies = _RedisProxies(proxies)
            redis = _redis_client(
                redis_sentinels, redis_service, redis_password, sentinel_password, redis_proxies
            )
            try:
                with anyio.fail_after(15):
                    await redis.ping()
            except Exception as exc:
                raise DrillError(f"Redis not usable: {redact(str(exc))}") from None
            stores.append(RedisStore(redis, replicas=redis_wait_replicas))
            capabilities.add("redis_proxy")
            redis_proxy_of = redis_proxies.proxy_of
            description["redis"] = f"Sentinels {', '.join(redis_sentinels)} ({redis_service})"
        journal = JournalStore(folder)
        stores.append(journal)
        yield Environment(
            stores=stores,
            proxies=proxies,
            capabilities=capabilities,
            description=description,
            pg_client=pg,
            pg_proxy_of=proxy_of,
            journal=journal,
            redis_client=redis,
            redis_proxy_of=redis_proxy_of,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await _close_clients(pg, redis, proxies)
            shutil.rmtree(folder, ignore_errors=True)


async def _close_clients(
    pg: FailoverClient | None, redis: SentinelRedis | None, proxies: ProxyServer
) -> None:
    """Close the drill's clients and proxies, whatever state a scenario left them in."""
    if pg is not None:
        with contextlib.suppress(Exception):
            await pg.close()
    if redis is not None:
        with contextlib.suppress(Exception):
            await redis.aclose()
    proxies.close()
