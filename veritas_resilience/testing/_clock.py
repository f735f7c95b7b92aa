"""A fake clock that makes time-based tests instant and exact."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = ["FakeClock", "FakeTimer"]


class FakeTimer:
    """A callback :meth:`FakeClock.call_at` will run; :meth:`cancel` it to stop that."""

    __slots__ = ("_callback", "cancelled", "fired", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        """The clock time at which the callback runs."""
        self._callback: Callable[[], object] | None = callback
        self.cancelled = False
        """Whether :meth:`cancel` was called before the callback ran."""
        self.fired = False
        """Whether the callback has run."""

    def cancel(self) -> None:
        """Do not run the callback (nothing happens if it already ran)."""
        if not self.fired:
            self.cancelled = True
            self._callback = None

    def _fire(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None and not self.cancelled:
            self.fired = True
            callback()

    def __repr__(self) -> str:
        state = "fired" if self.fired else "cancelled" if self.cancelled else "pending"
        return f"<FakeTimer at {self.when!r} {state}>"


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
    :meth:`call_at` runs a callback when the clock reaches a time; a
    :class:`~veritas_resilience.Timeout` given this clock uses it for its deadlines.

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
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        """Return the fake time in seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward, wake every sleeper and run every timer whose time has come.

        Sleepers and timers are served in the order of their deadlines. A timer's callback runs
        inside this call; an exception from it propagates to the caller of ``advance()``.

        Raises:
            ValueError: If ``seconds`` is negative or not finite (time never goes backwards).
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self._now += seconds
        sleepers, timers = self._sleepers, self._timers
        while True:
            sleeper_at = sleepers[0][0] if sleepers else math.inf
            timer_at = timers[0][0] if timers else math.inf
            if min(sleeper_at, timer_at) > self._now:
                return
            if timer_at <= sleeper_at:
                heapq.heappop(timers)[2]._fire()
            else:
                heapq.heappop(sleepers)[2].set()

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        """Run ``callback()`` once the clock reaches ``when``, during :meth:`advance`.

        A time already reached runs at the next ``advance()`` (``advance(0)`` will do).

        Returns:
            A :class:`FakeTimer` whose ``cancel()`` stops the callback from running.

        Raises:
            ValueError: If ``when`` is not a finite number.
        """
        if not math.isfinite(when):
            raise ValueError(f"when must be a finite time, got {when!r}")
        timer = FakeTimer(float(when), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    @property
    def timers(self) -> int:
        """How many :meth:`call_at` timers are neither run nor cancelled."""
        self._timers = [t for t in self._timers if not t[2].cancelled]
        heapq.heapify(self._timers)
        return len(self._timers)

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
        return f"FakeClock(now={self._now!r}, sleepers={len(self._sleepers)}, timers={self.timers})"
