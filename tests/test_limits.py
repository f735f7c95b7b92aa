"""Timeouts and bulkheads, under asyncio and trio.

Most timeout tests drive deadlines with a FakeClock. The tests of the real-clock engines (the
shared asyncio timer and anyio's cancel scope, each test run on both) use a short real limit
(50 ms) on a call that waits for an event that never fires: they cannot be flaky in the direction
of a false pass, only slow.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import (
    BulkheadFullError,
    PrometheusHook,
    ResilienceError,
    ResilienceTimeoutError,
)
from veritas_resilience.limits import (
    Bulkhead,
    BulkheadRejected,
    Timeout,
    TimeoutEngine,
    TimeoutExpired,
)
from veritas_resilience.testing import FakeClock
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio

SHORT = 0.05  # seconds: long enough for a fast call, short enough for a test that must expire


def metric(registry: CollectorRegistry, line_start: str) -> float:
    """The value of the one exposition line starting with ``line_start``."""
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


async def never() -> None:
    """Wait for an event that never fires."""
    await anyio.Event().wait()


async def double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return 2 * x


# -- timeout ------------------------------------------------------------------------------------


@pytest.fixture(params=["auto", "anyio"])
def engine(request: pytest.FixtureRequest) -> TimeoutEngine:
    """Each real-clock timeout test runs on both engines: the same outcomes are required."""
    return request.param  # type: ignore[no-any-return]


async def test_timeout_returns_the_result_in_time(engine: TimeoutEngine) -> None:
    """A call that finishes in time returns its value, through the decorator and call()."""
    timeout = Timeout(5, name="t", hooks=[], engine=engine)
    assert await timeout(double)(21) == 42
    assert await timeout.call(double, 4) == 8
    assert timeout.expired == 0


async def test_timeout_expiry_raises_a_resilience_timeout_error(
    prometheus: PrometheusHook,
    engine: TimeoutEngine,
) -> None:
    """Expiry raises ResilienceTimeoutError (a TimeoutError), counted and reported once."""
    hook = Recorder()
    timeout = Timeout(SHORT, name="slow-db", hooks=[hook, prometheus], engine=engine)
    with pytest.raises(ResilienceTimeoutError) as info:
        await timeout(never)()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ResilienceError)
    assert info.value.name == "slow-db"
    assert info.value.timeout == SHORT
    assert timeout.expired == 1
    assert [e.timeout for e in hook.of(TimeoutExpired)] == [SHORT]
    assert metric(prometheus.registry, 'veritas_timeout_total{name="slow-db"}') == 1


async def test_outer_cancellation_passes_through_a_timeout(engine: TimeoutEngine) -> None:
    """An outer scope's cancellation is not turned into a timeout error, nor counted."""
    timeout = Timeout(5, hooks=[], engine=engine)
    with anyio.move_on_after(SHORT) as scope:
        await timeout.call(never)
    assert scope.cancelled_caught
    assert timeout.expired == 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        await timeout(never)()
    assert scope.cancelled_caught
    assert timeout.expired == 0


async def test_timeout_inside_fail_after_of_same_length_never_hides_the_outer(
    engine: TimeoutEngine,
) -> None:
    """When an outer deadline fires too, the outer scope still sees its own cancellation."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    outer_caught = False
    try:
        with anyio.fail_after(SHORT):
            await timeout(never)()
    except ResilienceTimeoutError:
        pass  # ours expired first: a legitimate outcome of the race
    except TimeoutError:
        outer_caught = True
    # Either way, nothing is left cancelled: the next await runs normally.
    await anyio.lowlevel.checkpoint()
    assert outer_caught or timeout.expired == 1


# asyncio only: Task.cancel() is asyncio's own API; trio uses cancel scopes (tested above).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_task_cancel_on_asyncio_passes_through(engine: TimeoutEngine) -> None:
    """asyncio's Task.cancel() on a call under a timeout propagates as CancelledError."""
    timeout = Timeout(5, hooks=[], engine=engine)
    task = asyncio.create_task(timeout.call(never))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert timeout.expired == 0


async def test_call_that_swallows_the_cancellation_keeps_its_result(engine: TimeoutEngine) -> None:
    """A call that catches our cancellation and returns keeps its value; no cancel is left over."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)

    async def stubborn() -> str:
        try:
            await never()
        except anyio.get_cancelled_exc_class():
            return "late but mine"
        return "unreachable"

    assert await timeout(stubborn)() == "late but mine"
    await anyio.lowlevel.checkpoint()  # would raise if a cancellation request were pending
    await anyio.lowlevel.checkpoint()


async def test_call_that_catches_the_cancellation_and_waits_again_is_cancelled_again(
    engine: TimeoutEngine,
) -> None:
    """Cancellation is level-triggered on every engine: each await after expiry is cancelled."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    reached: list[str] = []

    async def stubborn() -> str:
        try:
            await never()
        except anyio.get_cancelled_exc_class():
            reached.append("caught")
            await anyio.sleep(2)
            reached.append("slept")
            return "late"
        return "unreachable"

    with anyio.fail_after(1.5), pytest.raises(ResilienceTimeoutError):
        await timeout.call(stubborn)
    assert reached == ["caught"]
    assert timeout.expired == 1


async def test_each_await_after_expiry_is_cancelled_and_none_is_left_pending(
    engine: TimeoutEngine,
) -> None:
    """A call that swallows three re-cancellations and returns keeps its value; nothing leaks."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    caught = 0

    async def very_stubborn() -> str:
        nonlocal caught
        for _ in range(3):
            try:
                await never()
            except anyio.get_cancelled_exc_class():
                caught += 1
        return "gave up waiting"

    with anyio.fail_after(5):
        assert await timeout.call(very_stubborn) == "gave up waiting"
    assert caught == 3
    await anyio.lowlevel.checkpoint()  # raises if a cancel request of ours were left pending
    await anyio.lowlevel.checkpoint()


async def test_shielded_section_inside_the_call_finishes_before_the_timeout(
    engine: TimeoutEngine,
) -> None:
    """A shielded scope inside the call is not interrupted; the next await is, on every engine."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    steps: list[str] = []

    async def commit_then_wait() -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(4 * SHORT)
            steps.append("committed")
        await never()

    with pytest.raises(ResilienceTimeoutError):
        await timeout.call(commit_then_wait)
    assert steps == ["committed"]


async def test_timeout_inside_a_shielded_scope_still_expires(engine: TimeoutEngine) -> None:
    """A shield around the timed call (bounded cleanup) does not stop the timeout's own expiry."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    with anyio.CancelScope(shield=True), pytest.raises(ResilienceTimeoutError):
        await timeout.call(never)


async def test_nested_timeouts_each_convert_only_their_own_expiry(engine: TimeoutEngine) -> None:
    """An inner shorter timeout raises its own error; an outer shorter one is not the inner's."""
    short = Timeout(SHORT, name="short", hooks=[], engine=engine)
    long = Timeout(5, name="long", hooks=[], engine=engine)
    with pytest.raises(ResilienceTimeoutError) as inner_first:
        await long.call(short.call, never)
    assert inner_first.value.name == "short"
    with pytest.raises(ResilienceTimeoutError) as outer_first:
        await short.call(long.call, never)
    assert outer_first.value.name == "short"
    assert long.expired == 0


async def test_timeout_sees_through_anyio_scopes_inside_the_call(engine: TimeoutEngine) -> None:
    """The call's own anyio cancel scopes do not swallow the timeout's cancellation."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)

    async def nested() -> None:
        with anyio.CancelScope():
            with anyio.move_on_after(10):
                await never()

    with pytest.raises(ResilienceTimeoutError):
        await timeout(nested)()


async def test_only_the_slow_calls_of_many_concurrent_ones_time_out(engine: TimeoutEngine) -> None:
    """With 40 concurrent calls, exactly the 20 that hang time out; the others return."""
    timeout = Timeout(SHORT, hooks=[], engine=engine)
    results: list[str] = []

    async def one(i: int) -> None:
        async def body() -> str:
            if i % 2:
                await never()
            await anyio.lowlevel.checkpoint()
            return "ok"

        try:
            results.append(await timeout.call(body))
        except ResilienceTimeoutError:
            results.append("timeout")

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(one, i)
    assert results.count("ok") == 20
    assert results.count("timeout") == 20
    assert timeout.expired == 20


async def test_with_a_fake_clock_a_call_expires_exactly_at_its_deadline(clock: FakeClock) -> None:
    """A deadline on a FakeClock: not a moment before, and at once when the clock reaches it."""
    timeout = Timeout(2.0, name="fake", clock=clock, hooks=[])
    outcome: list[str] = []

    async def run() -> None:
        try:
            await timeout(never)()
        except ResilienceTimeoutError as exc:
            outcome.append(f"timed out after {exc.timeout}s")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_until(lambda: clock.timers == 1)
        clock.advance(1.999)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert outcome == []
        clock.advance(0.001)
    assert outcome == ["timed out after 2.0s"]
    assert timeout.expired == 1
    assert clock.timers == 0


async def test_with_a_fake_clock_calls_that_end_in_time_leave_nothing_behind(
    clock: FakeClock,
) -> None:
    """A call that returns (or fails) in time cancels its timer; later advances change nothing."""
    timeout = Timeout(1.0, clock=clock, hooks=[])
    assert await timeout(double)(4) == 8

    async def boom() -> None:
        raise KeyError("inner")

    with pytest.raises(KeyError):
        await timeout.call(boom)
    assert clock.timers == 0
    clock.advance(10)
    await anyio.lowlevel.checkpoint()
    assert timeout.expired == 0


async def test_with_a_fake_clock_concurrent_calls_expire_in_deadline_order(
    clock: FakeClock,
) -> None:
    """Calls started at different times expire one by one as the clock passes each deadline."""
    timeout = Timeout(10.0, clock=clock, hooks=[])
    expired: list[int] = []

    async def run(i: int) -> None:
        with pytest.raises(ResilienceTimeoutError):
            await timeout.call(never)
        expired.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(run, i)
            await wait_until(lambda i=i: clock.timers == i + 1)
            clock.advance(1.0)
        # deadlines at 10, 11 and 12 s from the first start; the clock is at 3 s
        clock.advance(7.0)
        await wait_until(lambda: len(expired) == 1)
        assert expired == [0]
        clock.advance(1.0)
        await wait_until(lambda: len(expired) == 2)
        clock.advance(1.0)
    assert expired == [0, 1, 2]
    assert timeout.expired == 3


async def test_with_a_fake_clock_an_outer_cancellation_is_not_a_timeout(clock: FakeClock) -> None:
    """An outer scope cancelling a call under a fake-clock timeout passes through uncounted."""
    timeout = Timeout(5.0, clock=clock, hooks=[])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await timeout(never)()
    assert scope.cancelled_caught
    assert timeout.expired == 0
    assert clock.timers == 0


# asyncio only: the shared deadline queue is the asyncio implementation; trio uses its scopes
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_timeout_bookkeeping_stays_small_with_out_of_order_completions() -> None:
    """One hung call does not make the asyncio deadline queue grow with each fast call."""
    timeout = Timeout(5, hooks=[])
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(timeout.call, release.wait)
        await anyio.lowlevel.checkpoint()
        for i in range(1000):
            await timeout.call(double, i)
        deadlines = timeout._cache[2]
        assert deadlines is not None
        assert len(deadlines.entries) <= 2 * deadlines.active + 65
        release.set()
    assert deadlines is not None and deadlines.active == 0


async def test_timeout_policy_is_reusable_across_event_loops() -> None:
    """A module-level Timeout works in every test's fresh loop, asyncio or trio, in turn."""
    assert await _SHARED_TIMEOUT.call(double, 1) == 2
    assert await _shared_double(2) == 4
    with pytest.raises(ResilienceTimeoutError):
        await _shared_never()
    assert len(_SHARED_TIMEOUT._per_loop) <= 2  # closed loops are forgotten


_SHARED_TIMEOUT = Timeout(SHORT, name="shared", hooks=[])
_shared_double = _SHARED_TIMEOUT(double)
_shared_never = _SHARED_TIMEOUT(never)


def test_one_timeout_serves_loops_in_several_threads_at_once() -> None:
    """Threads running their own asyncio loops share a Timeout without mixing up their calls."""
    timeout = Timeout(SHORT, hooks=[])
    fast, slow = timeout(double), timeout(never)
    outcomes: list[str] = []
    lock = threading.Lock()

    async def work() -> None:
        for i in range(200):
            assert await fast(i) == 2 * i
        try:
            await slow()
        except ResilienceTimeoutError:
            with lock:
                outcomes.append("timeout")
        for i in range(200):
            assert await fast(i) == 2 * i
        with lock:
            outcomes.append("done")

    threads = [threading.Thread(target=asyncio.run, args=(work(),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["done"] * 4 + ["timeout"] * 4
    assert timeout.expired == 4


def test_timeout_rejects_bad_configuration() -> None:
    """Bad settings raise at construction, naming the parameter."""
    with pytest.raises(ValueError, match="engine"):
        Timeout(1, engine="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        Timeout(1, clock=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds"):
        Timeout(0)
    with pytest.raises(ValueError, match="seconds"):
        Timeout(float("inf"))
    with pytest.raises(ValueError, match="name"):
        Timeout(1, name="")
    with pytest.raises(TypeError, match="async"):
        Timeout(1)(lambda: None)  # type: ignore[arg-type, return-value]
    assert Timeout(timedelta(milliseconds=250), hooks=[]).seconds == 0.25


# -- bulkhead -----------------------------------------------------------------------------------


async def test_bulkhead_caps_concurrency_and_queues_the_rest() -> None:
    """At most max_concurrent calls run at once; queued ones run as slots free up, in order."""
    bulkhead = Bulkhead(2, max_queue=3, name="b", hooks=[])
    running = peak = 0
    started: list[int] = []
    gate = anyio.Event()

    async def work(i: int) -> None:
        nonlocal running, peak
        started.append(i)
        running += 1
        peak = max(peak, running)
        await gate.wait()
        await anyio.lowlevel.checkpoint()
        running -= 1

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(bulkhead(work), i)
            await anyio.lowlevel.checkpoint()
        await wait_until(lambda: bulkhead.queued == 3)
        assert bulkhead.in_use == 2
        gate.set()
    assert peak == 2
    assert started[:2] == [0, 1]
    assert sorted(started) == [0, 1, 2, 3, 4]
    assert (bulkhead.in_use, bulkhead.queued, bulkhead.rejected) == (0, 0, 0)


async def test_bulkhead_queue_is_first_in_first_out() -> None:
    """Queued calls get the slot in the order they arrived."""
    bulkhead = Bulkhead(1, max_queue=10, hooks=[])
    order: list[int] = []
    gate = anyio.Event()

    async def work(i: int) -> None:
        await gate.wait()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(bulkhead(work), i)
            await wait_until(lambda i=i: bulkhead.in_use + bulkhead.queued == i + 1)
        gate.set()
    assert order == [0, 1, 2, 3, 4, 5]


async def test_full_bulkhead_rejects_fast_without_calling(prometheus: PrometheusHook) -> None:
    """With every slot taken and no queue, a call fails at once with BulkheadFullError."""
    hook = Recorder()
    bulkhead = Bulkhead(1, name="reports", hooks=[hook, prometheus])
    gate = anyio.Event()
    called = 0

    async def work() -> None:
        nonlocal called
        called += 1
        await gate.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.call, work)
        await wait_until(lambda: bulkhead.in_use == 1)
        with pytest.raises(BulkheadFullError) as info:
            await bulkhead.call(work)
        assert metric(prometheus.registry, 'veritas_bulkhead_in_use{name="reports"}') == 1
        gate.set()
    assert called == 1
    assert info.value.name == "reports"
    assert info.value.max_concurrent == 1
    assert isinstance(info.value, ResilienceError)
    assert [(e.max_concurrent, e.queued) for e in hook.of(BulkheadRejected)] == [(1, 0)]
    assert metric(prometheus.registry, 'veritas_bulkhead_rejected_total{name="reports"}') == 1
    assert metric(prometheus.registry, 'veritas_bulkhead_in_use{name="reports"}') == 0


async def test_bulkhead_queue_is_bounded() -> None:
    """Beyond max_queue waiting calls, the next one is rejected."""
    bulkhead = Bulkhead(1, max_queue=1, hooks=[])
    gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.call, gate.wait)
        tg.start_soon(bulkhead.call, gate.wait)
        await wait_until(lambda: bulkhead.queued == 1)
        with pytest.raises(BulkheadFullError):
            await bulkhead.call(gate.wait)
        gate.set()
    assert bulkhead.rejected == 1
    assert (bulkhead.in_use, bulkhead.queued) == (0, 0)


async def test_bulkhead_queue_timeout_rejects_a_waiting_call() -> None:
    """A queued call that waits longer than queue_timeout is rejected and leaves the queue."""
    bulkhead = Bulkhead(1, max_queue=5, queue_timeout=SHORT, hooks=[])
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.call, never)
        await wait_until(lambda: bulkhead.in_use == 1)
        with pytest.raises(BulkheadFullError):
            await bulkhead.call(double, 1)
        assert bulkhead.queued == 0
        tg.cancel_scope.cancel()
    assert (bulkhead.in_use, bulkhead.queued, bulkhead.rejected) == (0, 0, 1)


async def test_cancellation_releases_running_and_queued_slots() -> None:
    """Cancelling running and queued calls gives back every slot and empties the queue."""
    bulkhead = Bulkhead(2, max_queue=10, hooks=[])
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(bulkhead(never))
        await wait_until(lambda: bulkhead.queued == 4)
        tg.cancel_scope.cancel()
    assert (bulkhead.in_use, bulkhead.queued, bulkhead.rejected) == (0, 0, 0)
    assert await bulkhead.call(double, 2) == 4


async def test_waiter_cancelled_just_after_being_handed_a_slot_passes_it_on() -> None:
    """A queued call cancelled in the same step it was given a slot does not leak the slot."""
    bulkhead = Bulkhead(1, max_queue=2, hooks=[])
    gate = anyio.Event()
    done: list[str] = []

    async def holder() -> None:
        await bulkhead.call(gate.wait)

    async def last() -> None:
        await bulkhead.call(anyio.lowlevel.checkpoint)
        done.append("last")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await wait_until(lambda: bulkhead.in_use == 1)
        with anyio.CancelScope() as waiter_scope:
            async with anyio.create_task_group() as inner:
                inner.start_soon(bulkhead.call, never)
                await wait_until(lambda: bulkhead.queued == 1)
                tg.start_soon(last)
                await wait_until(lambda: bulkhead.queued == 2)
                gate.set()  # the holder leaves and hands its slot to the first waiter...
                await wait_until(lambda: bulkhead.queued == 1)
                waiter_scope.cancel()  # ...which is cancelled before or while it runs
    assert done == ["last"]
    assert (bulkhead.in_use, bulkhead.queued) == (0, 0)


def test_bulkhead_drops_the_calls_of_an_event_loop_that_closed_under_them() -> None:
    """A loop closed with a call in the slot and one queued: the next asyncio.run is served."""
    bulkhead = Bulkhead(1, max_queue=5, hooks=[])
    pending: list[asyncio.Task[None]] = []

    async def hold() -> None:
        await asyncio.sleep(3600)

    async def fill() -> None:
        pending.extend(asyncio.create_task(bulkhead.call(hold)) for _ in range(2))
        await asyncio.sleep(0.01)
        assert (bulkhead.in_use, bulkhead.queued) == (1, 1)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(fill())
    loop.close()  # without cancelling the pending calls

    async def later() -> list[int]:
        with anyio.fail_after(5):  # hung forever on the dead waiter before
            return [await bulkhead.call(double, i) for i in range(3)]

    assert asyncio.run(later()) == [0, 2, 4]
    assert (bulkhead.in_use, bulkhead.queued) == (0, 0)
    pending.clear()
    gc.collect()  # the dead calls' cleanup gives back nothing twice
    assert bulkhead.in_use == 0


def test_timeout_serves_a_new_loop_after_one_closed_with_a_call_pending() -> None:
    """The shared timer of a loop closed mid-call is forgotten; the next loop's calls expire."""
    timeout = Timeout(SHORT, hooks=[])
    pending: list[asyncio.Task[None]] = []

    async def start() -> None:
        pending.append(asyncio.create_task(timeout.call(asyncio.sleep, 3600)))
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()

    async def later() -> None:
        assert await timeout.call(double, 2) == 4
        with anyio.fail_after(5), pytest.raises(ResilienceTimeoutError):
            await timeout.call(never)

    asyncio.run(later())
    assert len(timeout._per_loop) == 1
    pending.clear()


def test_bulkhead_rejects_bad_configuration() -> None:
    """Bad settings raise at construction, naming the parameter."""
    with pytest.raises(ValueError, match="max_concurrent"):
        Bulkhead(0)
    with pytest.raises(ValueError, match="max_queue"):
        Bulkhead(1, max_queue=-1)
    with pytest.raises(ValueError, match="queue_timeout"):
        Bulkhead(1, queue_timeout=0)
    with pytest.raises(TypeError, match="max_concurrent"):
        Bulkhead(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async"):
        Bulkhead(1)(lambda: None)  # type: ignore[arg-type, return-value]


async def wait_until(condition: Any, limit: int = 10_000) -> None:
    """Yield to other tasks until ``condition()`` holds (a bounded number of times)."""
    for _ in range(limit):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")
