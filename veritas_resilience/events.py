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

__all__ = [
    "BreakerCallCancelled",
    "BreakerCallFailed",
    "BreakerCallIgnored",
    "BreakerCallRejected",
    "BreakerCallSucceeded",
    "BreakerStateChanged",
    "CircuitState",
    "Event",
    "Hook",
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
