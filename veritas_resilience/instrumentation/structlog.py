"""Log lines for what an operator must see: state changes and failures, never every success."""

from __future__ import annotations

from typing import Any

import structlog

from ..events import (
    BreakerCallFailed,
    BreakerStateChanged,
    CircuitState,
    Event,
    FallbackExhausted,
    FallbackServed,
    RetryBudgetDenied,
    RetryExhausted,
    StaleStoreFailed,
    StaleValueServed,
    StaleWritesDropped,
    _error_fields,
)

__all__ = ["StructlogHook", "LOGGED_EVENTS"]

error_fields = _error_fields
"""Describe an exception for a log line (``error_type``, redacted ``error``); for event modules."""

LOGGED_EVENTS: set[type[Event]] = {
    BreakerStateChanged,
    BreakerCallFailed,
    FallbackServed,
    FallbackExhausted,
    StaleValueServed,
    StaleStoreFailed,
    StaleWritesDropped,
    RetryExhausted,
    RetryBudgetDenied,
}
"""Event types the structlog hook logs; the integrations add theirs when they are imported."""


class StructlogHook:
    """Logs state changes (warning when a breaker opens) and failures with structlog.

    Logs carry the component's name, never call arguments (they may hold personal data), and
    error messages have passwords redacted.

    Args:
        logger: A structlog logger; ``structlog.get_logger("veritas_resilience")`` by default.
    """

    def __init__(self, logger: Any = None) -> None:
        self._log = logger if logger is not None else structlog.get_logger("veritas_resilience")

    @property
    def event_types(self) -> frozenset[type[Event]]:
        """The event types this hook logs."""
        return frozenset(LOGGED_EVENTS)

    def on_event(self, event: Event) -> None:
        """Write one log line for ``event``."""
        if isinstance(event, BreakerStateChanged):
            level = "warning" if event.to_state in (CircuitState.OPEN,) else "info"
            fields: dict[str, Any] = {
                "breaker": event.name,
                "from_state": event.from_state.value,
                "to_state": event.to_state.value,
                "reason": event.reason,
            }
            if event.open_for is not None:
                fields["open_for"] = round(event.open_for, 6)
            getattr(self._log, level)("circuit_breaker_state_changed", **fields)
        elif isinstance(event, BreakerCallFailed):
            self._log.warning(
                "circuit_breaker_call_failed",
                breaker=event.name,
                state=event.state.value,
                slow=event.slow,
                duration=event.duration,
                **error_fields(event.error),
            )
        else:
            describe = getattr(event, "log_fields", None)
            if describe is not None:
                level, message, fields = describe()
                getattr(self._log, level)(message, **fields)

    def __repr__(self) -> str:
        return "StructlogHook()"
