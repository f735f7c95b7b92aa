"""Events of the PostgreSQL failover client: topology changes, failovers, fencing, failed calls.

Every event carries the client's name in ``name`` and nodes by their display name (``host:port``
unless named otherwise), never a DSN or a password. The ones an operator must see define
``log_fields()`` and are logged by the structlog hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._redact import redact
from ..events import Event
from ..instrumentation.structlog import LOGGED_EVENTS, error_fields

__all__ = [
    "PostgresCallFailed",
    "PostgresFailoverDetected",
    "PostgresFencingRecordFailed",
    "PostgresNodeChanged",
    "PostgresNodeFenced",
    "PostgresPromotionAttempted",
    "PostgresWritesBlocked",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresNodeChanged(Event):
    """A node's reachability or role changed, as the topology monitor confirmed it.

    Attributes:
        node: The node's name.
        reachable: Whether it answers probes now.
        from_role: Its role before (``"primary"``, ``"standby"`` or ``"unknown"``).
        to_role: Its role now.
        timeline: Its timeline, when known.
        reason: Why, in a word: ``"probe_failed"``, ``"probe_ok"``, ``"promoted"``,
            ``"demoted"``, ``"discovered"``.
    """

    kind: ClassVar[str] = "postgres"
    node: str
    reachable: bool
    from_role: str
    to_role: str
    timeline: int | None
    reason: str

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        level = "info" if self.reachable else "warning"
        return (
            level,
            "postgres_node_changed",
            {
                "client": self.name,
                "node": self.node,
                "reachable": self.reachable,
                "from_role": self.from_role,
                "to_role": self.to_role,
                "timeline": self.timeline,
                "reason": self.reason,
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresFailoverDetected(Event):
    """The writable primary moved to another node (or a primary appeared after none).

    Attributes:
        old_primary: The previous primary, or ``None`` at the first discovery.
        new_primary: The new one.
        timeline: The new primary's timeline.
        without_primary: Seconds the client had no writable primary before this one.
    """

    kind: ClassVar[str] = "postgres"
    old_primary: str | None
    new_primary: str
    timeline: int | None
    without_primary: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "warning",
            "postgres_failover_detected",
            {
                "client": self.name,
                "old_primary": self.old_primary,
                "new_primary": self.new_primary,
                "timeline": self.timeline,
                "without_primary": round(self.without_primary, 6),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresNodeFenced(Event):
    """A node was fenced (no writes, no reads) or released from its fence.

    Attributes:
        node: The node.
        fenced: True when fenced, False when released (it came back as a standby).
        reason: ``"stale_timeline"``, ``"split_brain"`` or ``"system_identifier"`` (the reason
            it was fenced, also on release).
        timeline: The node's timeline.
        winner: The primary that won, when there is one.
    """

    kind: ClassVar[str] = "postgres"
    node: str
    fenced: bool
    reason: str
    timeline: int | None
    winner: str | None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "error" if self.fenced else "info",
            "postgres_node_fenced" if self.fenced else "postgres_node_unfenced",
            {
                "client": self.name,
                "node": self.node,
                "reason": self.reason,
                "timeline": self.timeline,
                "winner": self.winner,
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresWritesBlocked(Event):
    """Writes were stopped altogether (or allowed again).

    Attributes:
        blocked: True when stopped, False when allowed again.
        reason: ``"split_brain"`` or ``"system_identifier"``.
        nodes: The nodes in conflict.
    """

    kind: ClassVar[str] = "postgres"
    blocked: bool
    reason: str
    nodes: tuple[str, ...]

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "error" if self.blocked else "info",
            "postgres_writes_blocked" if self.blocked else "postgres_writes_unblocked",
            {"client": self.name, "reason": self.reason, "nodes": list(self.nodes)},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresPromotionAttempted(Event):
    """The client itself promoted a standby (``auto_promote=True``).

    Attributes:
        node: The standby it promoted.
        succeeded: Whether ``pg_promote()`` reported success.
        error: The error, when it failed.
    """

    kind: ClassVar[str] = "postgres"
    node: str
    succeeded: bool
    error: BaseException | None = None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "warning" if self.succeeded else "error",
            "postgres_promotion_attempted",
            {
                "client": self.name,
                "node": self.node,
                "succeeded": self.succeeded,
                **error_fields(self.error),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresCallFailed(Event):
    """A call through the client failed on a node.

    Attributes:
        node: The node, or ``None`` when no node was tried (no primary).
        error_kind: A bounded word: ``"connect"``, ``"connection_lost"``, ``"shutdown"``,
            ``"timeout"``, ``"read_only"``, ``"commit_unknown"``, ``"no_primary"``,
            ``"fenced"``, ``"split_brain"``.
        retried: Whether the client tried again.
        error: The exception (its message is redacted in logs).
    """

    kind: ClassVar[str] = "postgres"
    node: str | None
    error_kind: str
    retried: bool
    error: BaseException | None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        fields: dict[str, Any] = {
            "client": self.name,
            "node": self.node,
            "error_kind": self.error_kind,
            "retried": self.retried,
            **error_fields(self.error),
        }
        if "error" in fields:
            fields["error"] = redact(fields["error"])
        return ("info" if self.retried else "warning", "postgres_call_failed", fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresFencingRecordFailed(Event):
    """The client could not read or write its fencing record (``fencing_record=``).

    Until it has read the record, the client takes no writes (it tries again every
    ``monitor_interval``); a failed write is tried again at the next probe round.

    Attributes:
        action: ``"load"`` or ``"save"``.
        timeline: The timeline it was saving (``None`` for a load).
        error: The exception (its message is redacted in logs).
    """

    kind: ClassVar[str] = "postgres"
    action: str
    timeline: int | None
    error: BaseException

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        fields: dict[str, Any] = {
            "client": self.name,
            "action": self.action,
            "timeline": self.timeline,
            **error_fields(self.error),
        }
        if "error" in fields:
            fields["error"] = redact(fields["error"])
        return ("error", "postgres_fencing_record_failed", fields)


LOGGED_EVENTS.update(
    {
        PostgresFencingRecordFailed,
        PostgresNodeChanged,
        PostgresFailoverDetected,
        PostgresNodeFenced,
        PostgresWritesBlocked,
        PostgresPromotionAttempted,
        PostgresCallFailed,
    }
)
