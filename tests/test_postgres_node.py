"""The node runtime's pieces that need no server: the acquire deadline guard and small helpers."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import asyncpg
import pytest

from veritas_resilience.postgres._node import AcquireExpired, AcquireGuard, is_closed, terminate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The client runs on asyncio (asyncpg does)."""
    return "asyncio"


class SlowPool:
    """A pool whose acquire() waits for ``release_one()``."""

    def __init__(self) -> None:
        self.free: asyncio.Queue[str] = asyncio.Queue()

    async def acquire(self) -> str:
        return await self.free.get()

    def release_one(self) -> None:
        self.free.put_nowait("conn")


async def test_a_wait_past_the_deadline_raises_acquire_expired() -> None:
    """A wait longer than the timeout ends with AcquireExpired; the task is not left cancelled."""
    guard = AcquireGuard(0.05)
    pool: Any = SlowPool()
    start = time.monotonic()
    with pytest.raises(AcquireExpired):
        await guard.acquire(pool)
    assert 0.04 < time.monotonic() - start < 0.5
    task = asyncio.current_task()
    assert task is not None
    if sys.version_info >= (3, 11):  # Task.cancelling() is new in 3.11
        assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # the task can still await: no cancellation is pending
    assert guard.watchdog is None and not guard.waiting  # nobody waits: the watchdog stopped
    guard.close()


async def test_waits_that_end_in_time_are_left_alone() -> None:
    """Acquires served before the deadline return normally and leave no entry behind."""
    guard = AcquireGuard(0.2)
    pool = SlowPool()

    async def later() -> None:
        await asyncio.sleep(0.02)
        for _ in range(3):
            pool.release_one()

    helper = asyncio.create_task(later())
    results = await asyncio.gather(*(guard.acquire(pool) for _ in range(3)))  # type: ignore[arg-type]
    await helper
    assert results == ["conn"] * 3
    assert not guard.waiting
    await asyncio.sleep(0.3)
    assert guard.watchdog is None


async def test_outside_cancellation_is_not_turned_into_a_timeout() -> None:
    """Cancelling a waiting task raises CancelledError, not AcquireExpired."""
    guard = AcquireGuard(5.0)
    task = asyncio.create_task(guard.acquire(SlowPool()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    guard.close()


async def test_only_the_overdue_waits_expire() -> None:
    """With staggered waits, each expires at its own deadline, in order."""
    guard = AcquireGuard(0.1)
    pool = SlowPool()
    outcomes: list[tuple[int, str]] = []

    async def wait(k: int) -> None:
        try:
            await guard.acquire(pool)  # type: ignore[arg-type]
            outcomes.append((k, "got"))
        except AcquireExpired:
            outcomes.append((k, "expired"))

    first = asyncio.create_task(wait(1))
    await asyncio.sleep(0.06)
    second = asyncio.create_task(wait(2))
    await asyncio.sleep(0.06)  # the first is overdue, the second is not
    pool.release_one()
    await asyncio.gather(first, second)
    assert outcomes == [(1, "expired"), (2, "got")]
    guard.close()


class HandPool:
    """A pool whose acquire() calls are served by hand, in any order."""

    def __init__(self) -> None:
        self.waits: list[asyncio.Future[str]] = []

    async def acquire(self) -> str:
        wait: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waits.append(wait)
        return await wait


async def test_a_wait_served_before_older_ones_is_forgotten_at_once() -> None:
    """Waits served out of order leave nothing behind: the guard holds only waits in progress."""
    guard = AcquireGuard(5.0)
    pool: Any = HandPool()
    tasks = [asyncio.create_task(guard.acquire(pool)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert list(guard.waiting) == tasks
    pool.waits[2].set_result("c")
    pool.waits[1].set_result("b")
    assert await tasks[2] == "c" and await tasks[1] == "b"
    assert list(guard.waiting) == [tasks[0]]
    pool.waits[0].set_result("a")
    assert await tasks[0] == "a"
    assert not guard.waiting
    guard.close()


def test_terminate_and_is_closed_tolerate_released_proxies() -> None:
    """A pooled proxy already given back raises InterfaceError; the helpers absorb it."""

    class Released:
        def terminate(self) -> None:
            raise asyncpg.InterfaceError("connection has been released back to the pool")

        def is_closed(self) -> bool:
            raise asyncpg.InterfaceError("connection has been released back to the pool")

    terminate(Released())
    assert is_closed(Released())
