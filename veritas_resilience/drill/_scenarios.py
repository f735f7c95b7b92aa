"""The drill's scenarios: one fault each, its injection and the repair that ends it.

A scenario injects a fault, holds it for ``hold`` seconds while the workload runs, then repairs
what an operator or an HA manager would (promote a standby, heal a link, restart a node). The
runner checks the hypotheses around it. Scenarios that stop or pause servers run only on servers
the drill started itself (``requires`` names what a scenario needs from its environment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import anyio

from ..chaos import Toxic

if TYPE_CHECKING:
    from ._drill import Environment

__all__ = [
    "DiskFull",
    "PostgresLatency",
    "PostgresPartition",
    "PostgresPrimaryCrash",
    "RedisLatency",
    "RedisMasterKill",
    "RedisMasterPause",
    "RedisPartition",
    "Scenario",
    "default_scenarios",
]


@dataclass
class Scenario:
    """Base of the scenarios.

    Attributes:
        name: Short name (the set's tag, the JSON key).
        title: What happens, in words.
        store: The store the fault hits (its detection and first-write times are measured).
        requires: What the environment must offer: ``"pg_control"`` (a PostgreSQL cluster the
            drill started), ``"pg_proxy"`` (PostgreSQL reached through the drill's proxy),
            ``"redis_control"`` (Redis started by the drill), ``"redis_proxy"`` (Redis data
            nodes reached through the drill's proxy), ``"disk"`` (the drill's journal).
        hold: Seconds the fault lasts before the repair starts.
        errors_allowed: Whether callers may see errors during the fault (False for latency:
            a slow dependency within the timeouts must not fail calls).
        recovered_at: Set by :meth:`recover` when service is restored (drill time).
        marks: Moments worth marking on the timeline, as ``(drill time, label)``.
    """

    name: ClassVar[str] = "scenario"
    title: ClassVar[str] = ""
    store: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    hold: float = 3.0
    errors_allowed: bool = True
    recovered_at: float | None = field(default=None, init=False)
    marks: list[tuple[float, str]] = field(default_factory=list, init=False)

    def mark(self, env: Environment, label: str) -> float:
        """Record a moment of the scenario; return its drill time."""
        now = env.now()
        self.marks.append((now, label))
        return now

    async def inject(self, env: Environment) -> None:
        """Inject the fault."""

    async def recover(self, env: Environment) -> None:
        """Repair; set :attr:`recovered_at` when service is restored."""


@dataclass
class PostgresPrimaryCrash(Scenario):
    """Crash the PostgreSQL primary (SIGQUIT); ``hold`` seconds later an HA manager promotes the
    standby; the old primary is rewound (``pg_rewind``) and follows it."""

    name: ClassVar[str] = "pg-primary-crash"
    title: ClassVar[str] = "PostgreSQL primary crash and promotion"
    store: ClassVar[str] = "postgres"
    requires: ClassVar[frozenset[str]] = frozenset({"pg_control"})
    hold: float = 1.0

    async def inject(self, env: Environment) -> None:
        """Crash the primary."""
        cluster = env.require_pg_cluster()
        await anyio.to_thread.run_sync(cluster.kill_primary)

    async def recover(self, env: Environment) -> None:
        """Promote, then rewind the old primary into a standby of the new one."""
        cluster = env.require_pg_cluster()
        old = cluster.primary
        new = cluster.standbys[0]
        sync = await anyio.to_thread.run_sync(cluster.query, new, "SHOW synchronous_standby_names")
        await anyio.to_thread.run_sync(cluster.promote, new)
        # Synchronous replication with its only standby gone would hold every commit: as HA
        # managers do, run asynchronous until a standby is back.
        await anyio.to_thread.run_sync(cluster.alter_system, new, "synchronous_standby_names", None)
        self.recovered_at = self.mark(env, "standby promoted")
        await anyio.to_thread.run_sync(cluster.rewind_as_standby, old, new)
        self.mark(env, "old primary rewound, streaming")
        if sync.strip():
            await anyio.to_thread.run_sync(
                cluster.alter_system, new, "synchronous_standby_names", sync.strip()
            )


@dataclass
class _Partition(Scenario):
    """Freeze the link between the client and the node that takes writes (the proxy drops every
    byte both ways, closes nothing), then heal it. Nothing is stopped: it runs on any server."""

    _proxy: str = field(default="", init=False)

    async def inject(self, env: Environment) -> None:
        """Drop everything both ways on the writable node's proxy."""
        self._proxy = await env.writable_proxy(self.store)
        for stream in ("upstream", "downstream"):
            toxic = Toxic(type="timeout", stream=stream, name=f"partition-{stream}")
            await anyio.to_thread.run_sync(env.proxies.add_toxic, self._proxy, toxic)

    async def recover(self, env: Environment) -> None:
        """Heal the link."""
        for stream in ("upstream", "downstream"):
            await anyio.to_thread.run_sync(
                env.proxies.remove_toxic, self._proxy, f"partition-{stream}"
            )
        self.recovered_at = env.now()


@dataclass
class _Latency(Scenario):
    """Add latency (with jitter) to every reply of the node that takes writes, below the
    client's timeouts: calls get slower and none may fail."""

    errors_allowed: bool = False
    latency_ms: int = 150
    jitter_ms: int = 50
    _proxy: str = field(default="", init=False)

    async def inject(self, env: Environment) -> None:
        """Add the latency toxic."""
        self._proxy = await env.writable_proxy(self.store)
        toxic = Toxic(
            type="latency",
            name="drill-latency",
            attributes={"latency": self.latency_ms, "jitter": self.jitter_ms},
        )
        await anyio.to_thread.run_sync(env.proxies.add_toxic, self._proxy, toxic)

    async def recover(self, env: Environment) -> None:
        """Remove it."""
        await anyio.to_thread.run_sync(env.proxies.remove_toxic, self._proxy, "drill-latency")
        self.recovered_at = env.now()


@dataclass
class PostgresPartition(_Partition):
    """Freeze the link between the client and the PostgreSQL primary, then heal it."""

    name: ClassVar[str] = "pg-partition"
    title: ClassVar[str] = "partition of the PostgreSQL primary (frozen link)"
    store: ClassVar[str] = "postgres"
    requires: ClassVar[frozenset[str]] = frozenset({"pg_proxy"})


@dataclass
class PostgresLatency(_Latency):
    """Slow every reply of the PostgreSQL primary by 150 ± 50 ms."""

    name: ClassVar[str] = "pg-latency"
    title: ClassVar[str] = "PostgreSQL latency (150 ± 50 ms per reply)"
    store: ClassVar[str] = "postgres"
    requires: ClassVar[frozenset[str]] = frozenset({"pg_proxy"})


@dataclass
class RedisPartition(_Partition):
    """Freeze the link between the client and the Redis master, then heal it. The Sentinels
    still reach the master, so they do not fail over: the client must ride it out alone."""

    name: ClassVar[str] = "redis-partition"
    title: ClassVar[str] = "partition of the Redis master from the client (frozen link)"
    store: ClassVar[str] = "redis"
    requires: ClassVar[frozenset[str]] = frozenset({"redis_proxy"})


@dataclass
class RedisLatency(_Latency):
    """Slow every reply of the Redis master by 150 ± 50 ms."""

    name: ClassVar[str] = "redis-latency"
    title: ClassVar[str] = "Redis latency (150 ± 50 ms per reply)"
    store: ClassVar[str] = "redis"
    requires: ClassVar[frozenset[str]] = frozenset({"redis_proxy"})


@dataclass
class RedisMasterKill(Scenario):
    """SIGKILL the Redis master; the Sentinels elect a replica; the old master comes back as a
    replica of the new one."""

    name: ClassVar[str] = "redis-master-kill"
    title: ClassVar[str] = "Redis master kill and Sentinel failover"
    store: ClassVar[str] = "redis"
    requires: ClassVar[frozenset[str]] = frozenset({"redis_control"})
    hold: float = 0.0
    _old: tuple[str, int] = field(default=("", 0), init=False)

    async def inject(self, env: Environment) -> None:
        """Kill the master."""
        kit = env.require_redis_kit()
        self._old = await anyio.to_thread.run_sync(kit.kill_master)

    async def recover(self, env: Environment) -> None:
        """Wait for the Sentinels' failover, then restart the old master as a replica."""
        kit = env.require_redis_kit()
        await anyio.to_thread.run_sync(lambda: kit.wait_for_master_change(self._old, timeout=30))
        self.recovered_at = self.mark(env, "Sentinels named a new master")
        await anyio.to_thread.run_sync(lambda: kit.restart_node(self._old, timeout=30))
        self.mark(env, "old master back as a replica")


@dataclass
class RedisMasterPause(Scenario):
    """Freeze the Redis master (SIGSTOP) for longer than the Sentinels' down-after; they fail
    over; it wakes up (SIGCONT) still believing it is the master until they convert it."""

    name: ClassVar[str] = "redis-master-pause"
    title: ClassVar[str] = "Redis master paused (SIGSTOP) for 3 s, past down-after"
    store: ClassVar[str] = "redis"
    requires: ClassVar[frozenset[str]] = frozenset({"redis_control"})
    hold: float = 0.0
    pause: float = 3.0
    _old: tuple[str, int] = field(default=("", 0), init=False)
    _paused_at: float = field(default=0.0, init=False)

    async def inject(self, env: Environment) -> None:
        """SIGSTOP the master."""
        kit = env.require_redis_kit()
        self._old = await anyio.to_thread.run_sync(kit.pause_master)
        self._paused_at = env.now()

    async def recover(self, env: Environment) -> None:
        """Wait for the Sentinels' failover, SIGCONT the old master once ``pause`` seconds have
        passed, and wait until it replicates from the new master."""
        kit = env.require_redis_kit()
        try:
            await anyio.to_thread.run_sync(
                lambda: kit.wait_for_master_change(self._old, timeout=30)
            )
            self.recovered_at = self.mark(env, "Sentinels named a new master")
            await anyio.sleep(max(self._paused_at + self.pause - env.now(), 0.0))
        finally:
            await anyio.to_thread.run_sync(kit.resume_master)
        self.mark(env, "old master resumed (SIGCONT)")
        await anyio.to_thread.run_sync(lambda: kit.wait_replicas_synced(timeout=30))
        self.mark(env, "old master converted to a replica")


@dataclass
class DiskFull(Scenario):
    """Make the journal's disk full: its writes fail with a real ``ENOSPC`` (the journal's link
    points at ``/dev/full``), then free it."""

    name: ClassVar[str] = "disk-full"
    title: ClassVar[str] = "disk full on the journal's write path (ENOSPC)"
    store: ClassVar[str] = "disk"
    requires: ClassVar[frozenset[str]] = frozenset({"disk"})
    hold: float = 2.0

    async def inject(self, env: Environment) -> None:
        """Point the journal at /dev/full."""
        journal = env.require_journal()
        journal.point_at(Path("/dev/full"))

    async def recover(self, env: Environment) -> None:
        """Point it back at its file."""
        journal = env.require_journal()
        journal.point_at(journal.data)
        self.recovered_at = env.now()


def default_scenarios() -> list[Scenario]:
    """Every scenario, in the order the drill plays them."""
    scenarios: list[Scenario] = [
        PostgresPrimaryCrash(),
        PostgresPartition(),
        PostgresLatency(),
        RedisMasterKill(),
        RedisMasterPause(),
        RedisPartition(),
        RedisLatency(),
    ]
    if Path("/dev/full").exists():
        scenarios.append(DiskFull())
    return scenarios
