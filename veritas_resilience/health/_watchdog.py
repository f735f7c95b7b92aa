"""The event-loop lag watchdog: how late the loop runs a task that asked to wake up."""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel

from .._clock import MONOTONIC, Clock
from .._validate import Seconds, seconds

__all__ = ["LoopLagMonitor"]


class LoopLagMonitor:
    """Measures how late the event loop wakes a sleeping task: the liveness signal of a process.

    Run :meth:`run` in a task group (the registry's lifespan does); a heartbeat sleeps
    ``interval`` seconds again and again and records by how much each wake-up was late. While
    the loop is blocked or starved, :meth:`lag` grows with the time since the last heartbeat,
    so a probe that gets through sees how long the loop has not run. Without a running
    heartbeat, :meth:`measure` times one trip through the loop's ready queue instead.

    Args:
        interval: Seconds between heartbeats (> 0).
        clock: The time source.

    Raises:
        ValueError: If ``interval`` is not > 0.
    """

    def __init__(self, *, interval: Seconds = 0.25, clock: Clock = MONOTONIC) -> None:
        self.interval = seconds(interval, "interval")
        self._clock = clock
        self._last_tick: float | None = None
        self._last_lag = 0.0
        self._running = 0

    @property
    def running(self) -> bool:
        """Whether a heartbeat runs."""
        return self._running > 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Beat until cancelled (asyncio or trio)."""
        now = self._clock.monotonic
        self._running += 1
        self._last_tick = now()
        task_status.started()
        try:
            while True:
                expected = now() + self.interval
                await self._clock.sleep(self.interval)
                tick = now()
                self._last_lag = max(0.0, tick - expected)
                self._last_tick = tick
        finally:
            self._running -= 1

    def lag(self) -> float | None:
        """Seconds the loop is late now: the last wake-up's delay, or the time since a heartbeat
        was due if that is longer. ``None`` when no heartbeat runs."""
        if not self._running or self._last_tick is None:
            return None
        overdue = self._clock.monotonic() - (self._last_tick + self.interval)
        return max(self._last_lag, overdue, 0.0)

    async def measure(self) -> float:
        """The lag now: from the heartbeat when it runs, else one trip through the ready queue."""
        lag = self.lag()
        if lag is not None:
            return lag
        started = self._clock.monotonic()
        await anyio.lowlevel.checkpoint()
        return max(0.0, self._clock.monotonic() - started)

    def __repr__(self) -> str:
        return f"LoopLagMonitor(interval={self.interval!r}, running={self.running})"
