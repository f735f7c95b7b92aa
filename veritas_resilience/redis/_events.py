"""Events of the Redis integration, and the metric families its components export.

Events go to the hooks (the structlog hook logs those with ``log_fields``); metrics are plain
counters kept by the components and read at scrape time (see
:mod:`veritas_resilience.instrumentation.prometheus`). Labels are bounded: the client's name,
a switch source, a retry reason, a state. Nodes appear in events and logs as ``host:port``, never
in labels, and no event carries a password, a key or a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..events import Event
from ..instrumentation.prometheus import define_metric
from ..instrumentation.structlog import LOGGED_EVENTS

__all__ = [
    "RedisCommandRetried",
    "RedisMasterLost",
    "RedisMasterSwitched",
    "RedisPubSubReconnected",
    "RedisReplicasChanged",
    "RedisSentinelDisagreement",
    "RedisSentinelStateChanged",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisMasterSwitched(Event):
    """The client accepted a new master and started a new connection generation.

    Attributes:
        service: The Sentinel service name.
        old: The previous master as ``host:port``, or None at start.
        new: The new master as ``host:port``.
        generation: The new generation (connections of older ones are fenced off).
        source: What revealed the switch: ``initial``, ``event`` (a Sentinel event),
            ``poll``, ``readonly`` (a READONLY-like reply), ``connection_error``,
            ``role_check`` (a new connection found the node demoted) or ``manual``.
        idle_closed: Idle connections to the old master closed at once.
    """

    kind: ClassVar[str] = "redis"
    service: str
    old: str | None
    new: str
    generation: int
    source: str
    idle_closed: int = 0

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        level = "info" if self.old is None else "warning"
        return (
            level,
            "redis_master_switched",
            {
                "client": self.name,
                "service": self.service,
                "old": self.old,
                "new": self.new,
                "generation": self.generation,
                "source": self.source,
                "idle_closed": self.idle_closed,
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisMasterLost(Event):
    """The client has no writable master: new connections wait until the failover ends.

    Attributes:
        service: The Sentinel service name.
        candidate: The master the Sentinels name, as ``host:port``, or None.
        reason: Why it is not usable.
    """

    kind: ClassVar[str] = "redis"
    service: str
    candidate: str | None
    reason: str

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "warning",
            "redis_master_lost",
            {
                "client": self.name,
                "service": self.service,
                "candidate": self.candidate,
                "reason": self.reason,
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSentinelStateChanged(Event):
    """A Sentinel started or stopped answering, or its event subscription went up or down.

    Attributes:
        sentinel: The Sentinel as ``host:port``.
        up: Whether it answers (for ``what="lookup"``) or delivers events (``"subscription"``).
        what: ``"lookup"`` or ``"subscription"``.
        error: The error type and short message when it went down.
    """

    kind: ClassVar[str] = "redis"
    sentinel: str
    up: bool
    what: str
    error: str | None = None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        fields: dict[str, Any] = {"client": self.name, "sentinel": self.sentinel, "what": self.what}
        if self.error:
            fields["error"] = self.error
        return (
            "info" if self.up else "warning",
            f"redis_sentinel_{'up' if self.up else 'down'}",
            fields,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSentinelDisagreement(Event):
    """Listed Sentinels name a master that no quorum of the configured Sentinels backs.

    Typically a Sentinel that monitors another deployment under the same service name: the
    client ignores it (it writes to the master the quorum names) and reports it here, in
    ``health()`` (``details["disagreeing_sentinels"]``, status ``degraded``) and in the metric
    ``veritas_redis_sentinel_disagreements_total``. Sent when the set of disagreeing Sentinels
    changes.

    Attributes:
        service: The Sentinel service name.
        master: The master the client uses, as ``host:port``, or None.
        sentinels: The disagreeing Sentinels, as ``host:port``.
        named: The master each of them names, in the same order.
    """

    kind: ClassVar[str] = "redis"
    service: str
    master: str | None
    sentinels: tuple[str, ...]
    named: tuple[str, ...]

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "warning",
            "redis_sentinel_disagreement",
            {
                "client": self.name,
                "service": self.service,
                "master": self.master,
                "sentinels": list(self.sentinels),
                "named": list(self.named),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisReplicasChanged(Event):
    """The set of replicas fit for reads changed.

    Attributes:
        replicas: The healthy replicas, as ``host:port``.
        generation: The new replica generation.
    """

    kind: ClassVar[str] = "redis"
    replicas: tuple[str, ...]
    generation: int

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "info",
            "redis_replicas_changed",
            {"client": self.name, "replicas": list(self.replicas), "generation": self.generation},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisCommandRetried(Event):
    """A command is about to run again (not logged by default: counted in metrics).

    Attributes:
        command: The command's name, never its arguments.
        reason: Why (see :class:`~veritas_resilience.redis._commands.Failure`).
        attempt: The attempt about to start (2 for the first retry).
        delay: Seconds waited before it (backoff, or waiting for a new master).
    """

    kind: ClassVar[str] = "redis"
    command: str
    reason: str
    attempt: int
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisPubSubReconnected(Event):
    """A Pub/Sub connection was lost and re-established (resubscribed) on the current master.

    Messages published during the gap were not received: Redis Pub/Sub does not queue them.

    Attributes:
        node: Where it is connected now, as ``host:port``.
        gap: Seconds between losing the connection and being subscribed again.
    """

    kind: ClassVar[str] = "redis"
    node: str
    gap: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "warning",
            "redis_pubsub_reconnected",
            {"client": self.name, "node": self.node, "gap": round(self.gap, 6)},
        )


LOGGED_EVENTS.update(
    {
        RedisMasterSwitched,
        RedisMasterLost,
        RedisSentinelStateChanged,
        RedisReplicasChanged,
        RedisPubSubReconnected,
        RedisSentinelDisagreement,
    }
)

# -- metric families -----------------------------------------------------------------------------

define_metric(
    "veritas_redis_master_switches",
    "counter",
    "Master switches the client applied, by what revealed them.",
    ("name", "source"),
)
define_metric(
    "veritas_redis_generation",
    "gauge",
    "Current master generation: connections opened under older ones are fenced off.",
    ("name",),
)
define_metric(
    "veritas_redis_sentinels_up",
    "gauge",
    "Sentinels that answered the last lookup.",
    ("name",),
)
define_metric(
    "veritas_redis_sentinels_known",
    "gauge",
    "Sentinels the client knows (configured and discovered).",
    ("name",),
)
define_metric(
    "veritas_redis_sentinel_subscriptions_up",
    "gauge",
    "Sentinel event subscriptions that are alive.",
    ("name",),
)
define_metric(
    "veritas_redis_writable_master",
    "gauge",
    "1 while the client has a confirmed master, 0 while it has none.",
    ("name",),
)
define_metric(
    "veritas_redis_no_writable_master_seconds",
    "counter",
    "Total seconds without a confirmed writable master (the current outage included).",
    ("name",),
)
define_metric(
    "veritas_redis_unavailable_seconds",
    "histogram",
    "Length of each period without a writable master, from the first sign to the new master.",
    ("name",),
)
define_metric(
    "veritas_redis_lookups",
    "counter",
    "Master lookups through the Sentinels, by result.",
    ("name", "result"),
)
define_metric(
    "veritas_redis_sentinel_disagreements",
    "counter",
    "Times listed Sentinels were found naming a master no quorum of the configured ones backs.",
    ("name",),
)
define_metric(
    "veritas_redis_replicas",
    "gauge",
    "Replicas fit for reads (up, linked to the master, ROLE checked).",
    ("name",),
)
define_metric(
    "veritas_redis_stale_connections_closed",
    "counter",
    "Connections closed because they belonged to an older master generation.",
    ("name",),
)
define_metric(
    "veritas_redis_retries",
    "counter",
    "Commands run again, by the reason of the failed attempt.",
    ("name", "reason"),
)
define_metric(
    "veritas_redis_call_errors",
    "counter",
    "Calls that failed with an error of the client (not a server reply about the command).",
    ("name", "error"),
)
define_metric(
    "veritas_redis_command_duration_seconds",
    "histogram",
    "Duration of commands and pipelines through the client, retries included.",
    ("name",),
)
define_metric(
    "veritas_redis_pool_connections",
    "gauge",
    "Connections of the client's pool, by state (idle, in_use).",
    ("name", "state"),
)
define_metric(
    "veritas_redis_pubsub_reconnects",
    "counter",
    "Pub/Sub connections re-established after a loss or a master switch.",
    ("name",),
)
define_metric(
    "veritas_redis_cluster_refreshes",
    "counter",
    "Full reloads of the cluster's slot map.",
    ("name",),
)
