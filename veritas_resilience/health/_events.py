"""Events of the health registry: a check's status changed; readiness or startup changed.

The structlog hook logs both (``log_fields``); the Prometheus hook reads the registry's own
counters at scrape time, as for every other component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..events import Event
from ..instrumentation.structlog import LOGGED_EVENTS
from ._model import Status

__all__ = ["HealthCheckChanged", "HealthProbeChanged", "HealthShutdownDrained"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckChanged(Event):
    """A check's status changed (or was read for the first time).

    Attributes:
        check: The check's name.
        from_status: Its status before, or ``None`` for its first reading.
        to_status: Its status now.
        critical: Whether the check is critical (a failure fails readiness).
        output: Why it is not ``pass`` (secrets redacted), or ``None``.
    """

    kind: ClassVar[str] = "health"
    check: str
    from_status: Status | None
    to_status: Status
    critical: bool
    output: str | None = None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        if self.to_status is Status.FAIL:
            level = "error" if self.critical else "warning"
        elif self.to_status is Status.WARN:
            level = "warning"
        else:
            level = "info"
        fields: dict[str, Any] = {
            "registry": self.name,
            "check": self.check,
            "from_status": None if self.from_status is None else self.from_status.value,
            "to_status": self.to_status.value,
            "critical": self.critical,
        }
        if self.output is not None:
            fields["output"] = self.output
        return level, "health_check_changed", fields


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthProbeChanged(Event):
    """The readiness or startup state changed.

    Attributes:
        probe: ``"readiness"`` or ``"startup"``.
        ok: Whether the probe's own state now passes.
        reason: Why, in a word: ``"set_ready"``, ``"shutting_down"``, ``"started"``.
    """

    kind: ClassVar[str] = "health"
    probe: str
    ok: bool
    reason: str

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "info" if self.ok else "warning",
            "health_probe_changed",
            {"registry": self.name, "probe": self.probe, "ok": self.ok, "reason": self.reason},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthShutdownDrained(Event):
    """Shutdown finished waiting for in-flight requests.

    Attributes:
        drained: Whether every in-flight request finished within the drain timeout.
        remaining: Requests still in flight when the wait ended.
        waited: Seconds waited for them.
    """

    kind: ClassVar[str] = "health"
    drained: bool
    remaining: int
    waited: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line."""
        return (
            "info" if self.drained else "warning",
            "health_shutdown_drained",
            {
                "registry": self.name,
                "drained": self.drained,
                "remaining": self.remaining,
                "waited": round(self.waited, 6),
            },
        )


LOGGED_EVENTS.update({HealthCheckChanged, HealthProbeChanged, HealthShutdownDrained})
