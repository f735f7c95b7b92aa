"""A hook that records events, for assertions in tests."""

from __future__ import annotations

from typing import TypeVar

from ..events import Event

__all__ = ["RecordingHook"]

E = TypeVar("E", bound=Event)


class RecordingHook:
    """Keeps every event it is sent, in order.

    Example::

        hook = RecordingHook()
        breaker = CircuitBreaker(name="db", failure_threshold=1, hooks=[hook])
        ...
        [opened] = hook.of(BreakerStateChanged)
        assert opened.to_state is CircuitState.OPEN
    """

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, event: Event) -> None:
        """Record ``event``."""
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        """The recorded events of type ``kind`` (subclasses included), in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def clear(self) -> None:
        """Forget every recorded event."""
        self.events.clear()
