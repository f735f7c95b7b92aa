"""A fake clock that makes time-based tests instant and exact."""

from __future__ import annotations

import heapq
import itertools
import math

import anyio
import anyio.lowlevel

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~veritas_resilience.Clock` whose time moves only when told to.

    Pass it as ``clock=`` to any primitive, then ``advance()`` it instead of sleeping::

        clock = FakeClock()
        breaker = CircuitBreaker(failure_threshold=1, reset_timeout=30, clock=clock)
        ...
        clock.advance(30)           # the breaker now admits a half-open probe

    ``await clock.sleep(s)`` waits until the clock has been advanced past its deadline. With
    ``auto_advance=True`` a sleep instead moves the clock forward by itself at once, which suits
    retry and backoff tests that only check how long was waited (see :attr:`slept`).

    Args:
        start: The initial reading of :meth:`monotonic`.
        auto_advance: Whether ``sleep()`` advances the clock itself instead of waiting.
    """

    def __init__(self, start: float = 0.0, *, auto_advance: bool = False) -> None:
        if not math.isfinite(start):
            raise ValueError(f"start must be a finite number of seconds, got {start!r}")
        self._now = float(start)
        self.auto_advance = auto_advance
        self.slept: list[float] = []
        """Every duration passed to :meth:`sleep`, in order."""
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        """Return the fake time in seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come.

        Raises:
            ValueError: If ``seconds`` is negative or not finite (time never goes backwards).
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, event = heapq.heappop(self._sleepers)
            event.set()

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock reaches now + ``seconds`` (or advance it, in auto mode)."""
        seconds = max(0.0, float(seconds))
        self.slept.append(seconds)
        if self.auto_advance:
            self.advance(seconds)
            await anyio.lowlevel.checkpoint()
            return
        if seconds == 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (self._now + seconds, next(self._seq), event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():
                # Cancelled: forget the sleeper so it does not hold the event forever.
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting in :meth:`sleep` now."""
        return len(self._sleepers)

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Yield to the event loop until at least ``count`` tasks are sleeping on this clock."""
        while len(self._sleepers) < count:
            await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r}, sleepers={len(self._sleepers)})"
