"""Events of the alert-driven recovery: every decision, and every notification turned away."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..events import Event
from ..instrumentation.prometheus import define_metric
from ..instrumentation.structlog import LOGGED_EVENTS, error_fields

__all__ = ["AlertsTruncated", "NotificationRejected", "RecoveryDecision"]

DECISIONS = (
    "ran",
    "failed",
    "dry_run",
    "duplicate",
    "cooldown",
    "budget_exhausted",
    "escalated",
    "escalation_failed",
    "reverted",
    "revert_failed",
    "resolved",
    "unmatched",
)
"""What the receiver decided about one alert (the ``decision`` label of the metrics)."""

REJECTIONS = (
    "unauthorized",
    "too_large",
    "bad_request",
    "not_found",
    "method_not_allowed",
    "internal_error",
)

_WARN = frozenset({"failed", "budget_exhausted", "escalated", "escalation_failed", "revert_failed"})

define_metric(
    "veritas_recovery_notifications",
    "counter",
    "Webhook notifications received, by outcome: accepted, or why they were turned away.",
    ("name", "outcome"),
)
define_metric(
    "veritas_recovery_decisions",
    "counter",
    "Decisions about alerts, by registered alert name and decision (ran, failed, dry_run, "
    "duplicate, cooldown, budget_exhausted, escalated, reverted, ...).",
    ("name", "alertname", "decision"),
)
define_metric(
    "veritas_recovery_truncated_alerts",
    "counter",
    "Alerts Alertmanager left out of notifications (max_alerts): never seen by the receiver.",
    ("name",),
)
define_metric(
    "veritas_recovery_incidents_active",
    "gauge",
    "Incidents (alert fingerprint and start) firing and handled by a rule now.",
    ("name",),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryDecision(Event):
    """The receiver decided something about one alert: also a line of the audit journal.

    Attributes:
        alertname: The alert's name.
        fingerprint: Alertmanager's fingerprint of the alert.
        starts_at: When the alert started (with the fingerprint, the incident's key).
        decision: One of ``ran``, ``failed``, ``dry_run``, ``duplicate``, ``cooldown``,
            ``budget_exhausted``, ``escalated``, ``escalation_failed``, ``reverted``,
            ``revert_failed``, ``resolved`` (no revert to run), ``unmatched`` (no rule).
        step: The rung of the escalation ladder (0 for the first action), when one is concerned.
        action: The name of the action (or revert, or escalation hook) concerned.
        dry_run: Whether the receiver only said what it would do.
        error: What the action raised, for ``failed``, ``revert_failed``, ``escalation_failed``.
        detail: A few words more (which limit held the action back, which Alertmanager sent it).
    """

    kind: ClassVar[str] = "recovery"
    alertname: str
    fingerprint: str
    starts_at: str
    decision: str
    step: int | None = None
    action: str | None = None
    dry_run: bool = False
    error: BaseException | None = None
    detail: str = ""

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning for failures, exhausted budgets and escalations, else an info line."""
        fields: dict[str, Any] = {
            "receiver": self.name,
            "alertname": self.alertname,
            "fingerprint": self.fingerprint,
            "starts_at": self.starts_at,
            "decision": self.decision,
        }
        if self.step is not None:
            fields["step"] = self.step
        if self.action is not None:
            fields["action"] = self.action
        if self.dry_run:
            fields["dry_run"] = True
        if self.detail:
            fields["detail"] = self.detail
        fields.update(error_fields(self.error))
        return ("warning" if self.decision in _WARN else "info", "recovery_decision", fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertsTruncated(Event):
    """A notification said Alertmanager left alerts out (``truncatedAlerts > 0``).

    Those alerts never reach the receiver: raise ``max_alerts`` in the webhook config.

    Attributes:
        count: How many were left out.
        group_key: The notification's group.
    """

    kind: ClassVar[str] = "recovery"
    count: int
    group_key: str

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: some alerts were not delivered."""
        return (
            "warning",
            "recovery_alerts_truncated",
            {"receiver": self.name, "count": self.count, "group_key": self.group_key},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationRejected(Event):
    """The receiver turned a request away.

    Attributes:
        status: The HTTP status answered (400, 401, 404, 405, 408, 413 or 500).
        reason: ``bad_request``, ``unauthorized``, ``not_found``, ``method_not_allowed``,
            ``timeout``, ``too_large`` or ``internal_error``.
        detail: What was wrong with it (never the credentials or the body).
    """

    kind: ClassVar[str] = "recovery"
    status: int
    reason: str
    detail: str = ""

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning naming the reason."""
        return (
            "warning",
            "recovery_notification_rejected",
            {"receiver": self.name, "status": self.status, "reason": self.reason,
             "detail": self.detail},
        )  # fmt: skip


LOGGED_EVENTS.update({RecoveryDecision, AlertsTruncated, NotificationRejected})
