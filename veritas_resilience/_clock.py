"""Time sources. Every time-dependent primitive takes a :class:`Clock` so tests can fake time."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import anyio

__all__ = ["Clock", "MonotonicClock", "MONOTONIC"]


@runtime_checkable
class Clock(Protocol):
    """Where a primitive reads the time and waits.

    ``monotonic()`` returns seconds from an arbitrary origin and never goes backwards; ``sleep()``
    waits for that many seconds of this clock's time. :class:`veritas_resilience.testing.FakeClock`
    implements it for tests.
    """

    def monotonic(self) -> float:
        """Return the current time in seconds; it never decreases."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class MonotonicClock:
    """The real clock: :func:`time.monotonic` and :func:`anyio.sleep`."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of real time on the running event loop (asyncio or trio)."""
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "MonotonicClock()"


MONOTONIC = MonotonicClock()
