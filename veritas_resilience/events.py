"""Events: what the primitives tell the world, and the :class:`Hook` protocol that listens.

Every primitive reports what happened as a frozen, slotted dataclass sent to its hooks. The default
hooks turn events into Prometheus metrics and structlog log lines; your own hooks get the same
events. A hook that raises is disabled and logged, and never changes the outcome of a call.

Hooks say which event types they want through an optional ``event_types`` attribute (a frozenset of
event classes; absent or ``None`` means all). Primitives skip building events nobody wants, which
is what keeps the success path cheap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._redact import redact
from .errors import public_type_name as _public_type_name

__all__ = [
    "BreakerCallCancelled",
    "BreakerCallFailed",
    "BreakerCallIgnored",
    "BreakerCallRejected",
    "BreakerCallSucceeded",
    "BreakerStateChanged",
    "BulkheadRejected",
    "CircuitState",
    "Event",
    "FallbackExhausted",
    "FallbackServed",
    "Hook",
    "RetryBudgetDenied",
    "RetryExhausted",
    "RetryScheduled",
    "StaleStoreFailed",
    "StaleValueServed",
    "StaleWritesDropped",
    "TimeoutExpired",
]


class CircuitState(str, enum.Enum):
    """The states of a circuit breaker.

    ``CLOSED`` lets calls through and counts failures; ``OPEN`` rejects them until the open time
    is over; ``HALF_OPEN`` admits a bounded number of probes; ``FORCED_OPEN`` rejects everything
    until it is reset (an operator's isolate); ``DISABLED`` lets everything through and records
    nothing but call counts.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: which component, by kind and name, it comes from."""

    kind: ClassVar[str] = "event"
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """A circuit breaker changed state.

    Attributes:
        from_state: The state it left.
        to_state: The state it entered.
        reason: Why, in a word: ``"failure_threshold"``, ``"failure_rate"``, ``"open_timeout"``,
            ``"probe_failed"``, ``"probes_succeeded"``, ``"forced"``, ``"reset"``.
        open_for: When entering ``OPEN``, the length of this break in seconds; else ``None``.
        generation: The breaker's state generation after the change.
    """

    kind: ClassVar[str] = "circuit_breaker"
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    open_for: float | None = None
    generation: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCallSucceeded(Event):
    """A call through a breaker succeeded. ``duration`` is ``None`` when timing is off."""

    kind: ClassVar[str] = "circuit_breaker"
    state: CircuitState
    duration: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCallFailed(Event):
    """A call through a breaker counted as a failure.

    Attributes:
        state: The state the call was admitted under.
        error: The exception, or ``None`` when the result predicate or slowness made it a failure.
        duration: Seconds the call took, when timed.
        slow: True when it counted as a failure for being slower than the slow-call threshold.
    """

    kind: ClassVar[str] = "circuit_breaker"
    state: CircuitState
    error: BaseException | None
    duration: float | None = None
    slow: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCallIgnored(Event):
    """A call ended with an exception the breaker ignores: neither success nor failure."""

    kind: ClassVar[str] = "circuit_breaker"
    state: CircuitState
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCallCancelled(Event):
    """A call was cancelled while it ran; it counts neither as success nor as failure."""

    kind: ClassVar[str] = "circuit_breaker"
    state: CircuitState


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerCallRejected(Event):
    """A breaker rejected a call without running it."""

    kind: ClassVar[str] = "circuit_breaker"
    state: CircuitState
    retry_after: float


# -- policies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutExpired(Event):
    """A timeout policy gave up on a call.

    Attributes:
        timeout: The limit, in seconds.
    """

    kind: ClassVar[str] = "timeout"
    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadRejected(Event):
    """A bulkhead rejected a call: no free slot and no room in its queue, or the wait timed out.

    Attributes:
        max_concurrent: The bulkhead's concurrency limit.
        queued: Calls waiting for a slot when this one was rejected.
    """

    kind: ClassVar[str] = "bulkhead"
    max_concurrent: int
    queued: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """An attempt failed with a retryable error; the next one starts after ``wait`` seconds.

    Attributes:
        attempt: The number of the attempt that failed (1 for the first).
        wait: Seconds until the next attempt.
        error: The attempt's exception.
    """

    kind: ClassVar[str] = "retry"
    attempt: int
    wait: float
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryExhausted(Event):
    """The last attempt failed and no attempt or time is left; its error is raised.

    Attributes:
        attempts: How many attempts were made.
        elapsed: Seconds from the first failure to the last.
        error: The last attempt's exception.
    """

    kind: ClassVar[str] = "retry"
    attempts: int
    elapsed: float
    error: BaseException

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: the call failed after every retry."""
        return (
            "warning",
            "retries_exhausted",
            {
                "retry": self.name,
                "attempts": self.attempts,
                "elapsed": round(self.elapsed, 6),
                **_error_fields(self.error),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetDenied(Event):
    """A retry was wanted but the shared budget had no token left.

    Attributes:
        budget: The budget's name (``name`` is the retry policy's).
        attempts: Attempts made before the budget stopped the call.
        error: The last attempt's exception (the cause of the raised error).
    """

    kind: ClassVar[str] = "retry"
    budget: str
    attempts: int
    error: BaseException

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: retries are being shed."""
        return (
            "warning",
            "retry_budget_exhausted",
            {
                "retry": self.name,
                "budget": self.budget,
                "attempts": self.attempts,
                **_error_fields(self.error),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackServed(Event):
    """A fallback step (not the primary) served the result of a call.

    Attributes:
        step: The step's name.
        index: Its position in the chain (1 for the first fallback; the primary is 0).
        error: The error that reached this step (the previous step's).
        age: For a stale cache step, the age in seconds of the value served; else None.
    """

    kind: ClassVar[str] = "fallback"
    step: str
    index: int
    error: BaseException
    age: float | None = None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """An info line: the call was served degraded (never with the call's arguments)."""
        fields: dict[str, Any] = {
            "chain": self.name,
            "step": self.step,
            "index": self.index,
            "error_type": _public_type_name(self.error),
        }
        if self.age is not None:
            fields["stale_age"] = round(self.age, 3)
        return "info", "fallback_served", fields


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackExhausted(Event):
    """Every step of a chain that ran failed; ServiceUnavailableError is raised.

    Attributes:
        steps: The names of the steps that ran, in order.
        errors: Their errors, in the same order.
    """

    kind: ClassVar[str] = "fallback"
    steps: tuple[str, ...]
    errors: tuple[BaseException, ...]

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """An error line naming the steps and their error types."""
        return (
            "error",
            "fallback_exhausted",
            {
                "chain": self.name,
                "steps": list(self.steps),
                "error_types": [_public_type_name(e) for e in self.errors],
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleValueServed(Event):
    """A stale cache used as a decorator served a stored value after the call failed.

    Attributes:
        age: The value's age in seconds.
        error: The call's error.
    """

    kind: ClassVar[str] = "stale_cache"
    age: float
    error: BaseException

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """An info line: a stale value was served."""
        return (
            "info",
            "stale_value_served",
            {
                "cache": self.name,
                "age": round(self.age, 3),
                "error_type": _public_type_name(self.error),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleStoreFailed(Event):
    """A stale cache's store failed to read or write (the call itself is not affected by writes).

    Attributes:
        operation: ``"get"`` or ``"set"``.
        error: The store's exception.
    """

    kind: ClassVar[str] = "stale_cache"
    operation: str
    error: BaseException

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning line with the store's error (secrets redacted)."""
        return (
            "warning",
            "stale_store_failed",
            {"cache": self.name, "operation": self.operation, **_error_fields(self.error)},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleWritesDropped(Event):
    """A stale cache dropped writes to its store: too many were pending (the store is slow).

    Reported at most once a second while it lasts; ``veritas_stale_cache_total`` counts every one.

    Attributes:
        dropped: Writes dropped since the last report.
        pending: Writes pending when the last one was dropped (the ``max_pending_writes`` limit).
    """

    kind: ClassVar[str] = "stale_cache"
    dropped: int
    pending: int

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: values were not remembered, so fewer stale answers will be possible."""
        return (
            "warning",
            "stale_writes_dropped",
            {"cache": self.name, "dropped": self.dropped, "pending": self.pending},
        )


@runtime_checkable
class Hook(Protocol):
    """Receives events from the primitives it is installed on.

    Implement ``on_event``. Optionally set ``event_types`` to the frozenset of event classes the
    hook wants (subclasses included; ``None`` means every event), and define
    ``attach(component)`` to be told of each component that starts using the hook (the
    Prometheus hook uses it to export the component's counters at scrape time).
    """

    def on_event(self, event: Event) -> None:
        """Handle one event. Must not block; an exception disables the hook."""
        ...


def wanted_event_types(hook: Any) -> frozenset[type[Event]] | None:
    """Return the event classes ``hook`` asked for, or ``None`` for all (internal helper)."""
    events = getattr(hook, "event_types", None)
    return None if events is None else frozenset(events)


def _error_fields(error: BaseException | None) -> dict[str, str]:
    """Describe an exception for a log line: its public type and its message, secrets redacted."""
    if error is None:
        return {}
    return {"error_type": _public_type_name(error), "error": redact(str(error))}
