"""The fake clock: time moves only when told, and sleepers wake exactly at their deadline."""

from __future__ import annotations

import anyio
import pytest

from veritas_resilience import Clock, MonotonicClock
from veritas_resilience.testing import FakeClock

pytestmark = pytest.mark.anyio


def test_both_clocks_satisfy_the_protocol() -> None:
    """FakeClock and the real clock both implement Clock."""
    assert isinstance(FakeClock(), Clock)
    assert isinstance(MonotonicClock(), Clock)


async def test_sleepers_wake_in_deadline_order_only_when_advanced() -> None:
    """sleep() waits for advance(); sleepers wake at their deadline, in order."""
    clock = FakeClock(10.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, "late", 5.0)
        tg.start_soon(sleeper, "early", 1.0)
        await clock.wait_for_sleepers(2)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        clock.advance(0.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == [("early", 11.0)]
        clock.advance(10)
    assert woke == [("early", 11.0), ("late", 21.0)]
    assert sorted(clock.slept) == [1.0, 5.0]  # trio starts tasks in no fixed order


async def test_cancelled_sleeper_is_forgotten() -> None:
    """A sleep cancelled by its scope leaves no sleeper behind."""
    clock = FakeClock()
    with anyio.move_on_after(0.01):
        await clock.sleep(100)
    assert clock.sleepers == 0


async def test_auto_advance_moves_time_by_itself() -> None:
    """With auto_advance, sleep() returns at once and the clock has moved by the sleep."""
    clock = FakeClock(auto_advance=True)
    await clock.sleep(2.5)
    await clock.sleep(0.5)
    assert clock.monotonic() == 3.0
    assert clock.slept == [2.5, 0.5]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_time_never_goes_backwards(bad: float) -> None:
    """advance() refuses negative and non-finite amounts, naming the parameter."""
    with pytest.raises(ValueError, match="seconds"):
        FakeClock().advance(bad)


def test_timers_run_in_deadline_order_with_the_sleepers_when_advanced() -> None:
    """call_at() callbacks run inside advance() once their time comes, in order, exactly once."""
    clock = FakeClock(100.0)
    ran: list[tuple[str, float]] = []
    clock.call_at(103.0, lambda: ran.append(("late", clock.monotonic())))
    clock.call_at(101.0, lambda: ran.append(("early", clock.monotonic())))
    dropped = clock.call_at(102.0, lambda: ran.append(("cancelled", clock.monotonic())))
    dropped.cancel()
    assert clock.timers == 2
    clock.advance(0.999)
    assert ran == []
    clock.advance(0.001)
    assert ran == [("early", 101.0)]
    clock.advance(5)
    assert ran == [("early", 101.0), ("late", 106.0)]  # run during the advance that passed 103
    clock.advance(5)
    assert len(ran) == 2
    assert clock.timers == 0
    assert dropped.cancelled and not dropped.fired


def test_a_timer_already_due_runs_at_the_next_advance() -> None:
    """A time already reached runs on the next advance(), even advance(0)."""
    clock = FakeClock(5.0)
    ran: list[bool] = []
    timer = clock.call_at(4.0, lambda: ran.append(True))
    assert ran == []
    clock.advance(0)
    assert ran == [True]
    assert timer.fired
    timer.cancel()  # too late: nothing changes
    assert not timer.cancelled
    with pytest.raises(ValueError, match="when"):
        clock.call_at(float("nan"), lambda: None)
