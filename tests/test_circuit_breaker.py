"""The circuit breakers, under asyncio and trio, with a fake clock."""

from __future__ import annotations

import inspect
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest

from veritas_resilience import (
    BreakerCallCancelled,
    BreakerCallFailed,
    BreakerCallIgnored,
    BreakerCallRejected,
    BreakerCallSucceeded,
    BreakerStateChanged,
    CircuitBreaker,
    CircuitBreakerRegistry,
    CircuitOpenError,
    CircuitState,
    Event,
    ExponentialBackoff,
    ExponentialCircuitBreaker,
    FailureRate,
    ResilienceError,
)
from veritas_resilience.testing import FakeClock, RecordingHook

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """The failure the fake dependency raises."""


class Recorder(RecordingHook):
    """A recording hook that also lists state changes."""

    def transitions(self) -> list[tuple[str, str]]:
        return [(e.from_state.value, e.to_state.value) for e in self.of(BreakerStateChanged)]


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("down")


def make(clock: FakeClock, hook: Recorder | None = None, **kw: Any) -> CircuitBreaker:
    kw.setdefault("name", "dep")
    return CircuitBreaker(clock=clock, hooks=[hook] if hook else [], **kw)


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read through a call so type checkers do not narrow it."""
    return breaker.state


async def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(fail)


# -- the simple breaker ------------------------------------------------------------------------


async def test_opens_after_threshold_failures_in_a_row(clock: FakeClock) -> None:
    """failure_threshold failures in a row open the breaker; the next call is rejected unrun."""
    breaker = make(clock, failure_threshold=3)
    await trip(breaker, 2)
    assert state_of(breaker) is CircuitState.CLOSED
    await trip(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN
    ran = False

    async def probe() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(probe)
    assert not ran
    assert isinstance(info.value, ResilienceError)
    assert info.value.name == "dep"
    assert info.value.state == "open"
    assert info.value.retry_after == pytest.approx(60.0)


async def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    """A success in CLOSED resets the count, so failures must be consecutive to trip."""
    breaker = make(clock, failure_threshold=3)
    for _ in range(5):
        await trip(breaker, 2)
        assert await breaker.call(ok) == "ok"
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.snapshot().consecutive_failures == 0


async def test_half_open_after_reset_timeout_then_success_closes(clock: FakeClock) -> None:
    """After reset_timeout one probe is admitted; its success closes the breaker."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=1, reset_timeout=30)
    await trip(breaker, 1)
    clock.advance(29.9)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) is CircuitState.CLOSED
    assert hook.transitions() == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


async def test_probe_failure_reopens_with_a_fresh_timer(clock: FakeClock) -> None:
    """A failed probe reopens the breaker and the open time starts again."""
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    await trip(breaker, 1)
    clock.advance(10)
    await trip(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN
    assert breaker.retry_after() == pytest.approx(10)
    clock.advance(10)
    assert state_of(breaker) is CircuitState.HALF_OPEN


async def test_timedelta_durations(clock: FakeClock) -> None:
    """Durations accept timedelta as well as float seconds."""
    breaker = make(clock, failure_threshold=1, reset_timeout=timedelta(minutes=2))
    await trip(breaker, 1)
    assert breaker.retry_after() == pytest.approx(120)


# -- outcomes ------------------------------------------------------------------------------------


async def test_ignored_exceptions_neither_count_nor_reset(clock: FakeClock) -> None:
    """An ignored exception is neither failure nor success: it does not reset the count."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=3, ignore_on=KeyError)

    async def missing() -> None:
        raise KeyError("x")

    await trip(breaker, 2)
    with pytest.raises(KeyError):
        await breaker.call(missing)
    assert breaker.snapshot().consecutive_failures == 2
    await trip(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN
    assert len(hook.of(BreakerCallIgnored)) == 1
    assert breaker.snapshot().calls["ignored"] == 1


async def test_failure_on_predicate_and_unlisted_errors_count_as_success(clock: FakeClock) -> None:
    """Only errors matching failure_on count; others mean the dependency answered."""
    breaker = make(
        clock,
        failure_threshold=2,
        failure_on=lambda exc: isinstance(exc, Boom) and "down" in str(exc),
    )

    async def not_found() -> None:
        raise ValueError("no such row")

    await trip(breaker, 1)
    with pytest.raises(ValueError, match="no such row"):
        await breaker.call(not_found)
    assert breaker.snapshot().consecutive_failures == 0
    assert breaker.snapshot().calls == {
        "success": 1,
        "failure": 1,
        "ignored": 0,
        "cancelled": 0,
        "rejected": 0,
    }


async def test_result_predicate_makes_a_failure_but_returns_the_value(clock: FakeClock) -> None:
    """failure_on_result counts a returned value as a failure; the caller still gets it."""
    breaker = make(clock, failure_threshold=2, failure_on_result=lambda r: r == 503)

    async def status() -> int:
        return 503

    assert await breaker.call(status) == 503
    assert await breaker.call(status) == 503
    assert state_of(breaker) is CircuitState.OPEN


async def test_slow_calls_count_as_failures(clock: FakeClock) -> None:
    """A call slower than slow_call_duration counts as a failure."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=1, slow_call_duration=0.5)

    async def slow() -> str:
        clock.advance(0.6)
        return "late"

    assert await breaker.call(slow) == "late"
    assert state_of(breaker) is CircuitState.OPEN
    (failed,) = hook.of(BreakerCallFailed)
    assert failed.slow and failed.error is None and failed.duration == pytest.approx(0.6)


async def test_keyboard_interrupt_is_not_counted(clock: FakeClock) -> None:
    """BaseExceptions that are not Exceptions (KeyboardInterrupt...) are never failures."""
    breaker = make(clock, failure_threshold=1)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call_sync(interrupted)
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.snapshot().calls["ignored"] == 1


# -- cancellation --------------------------------------------------------------------------------


async def test_cancellation_while_closed_is_not_a_failure(clock: FakeClock) -> None:
    """Cancelling calls in CLOSED never trips the breaker (a client that went away)."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=1)
    started = anyio.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    for _ in range(3):
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, hang)
            await started.wait()
            tg.cancel_scope.cancel()
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.snapshot().calls["cancelled"] == 3
    assert len(hook.of(BreakerCallCancelled)) == 3
    assert not hook.of(BreakerCallFailed)


async def _open_then_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    await trip(breaker, 1)
    clock.advance(60)
    assert state_of(breaker) is CircuitState.HALF_OPEN


@pytest.mark.parametrize("how", ["cancel_scope", "move_on_after", "fail_after"])
async def test_cancelled_probe_releases_its_slot(clock: FakeClock, how: str) -> None:
    """A probe cancelled by a cancel scope or a deadline frees its slot and decides nothing."""
    breaker = make(clock, failure_threshold=1)
    await _open_then_half_open(breaker, clock)
    started = anyio.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    if how == "cancel_scope":
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, hang)
            await started.wait()
            assert breaker.snapshot().probes_in_flight == 1
            tg.cancel_scope.cancel()
    elif how == "move_on_after":
        with anyio.move_on_after(0.01):
            await breaker.call(hang)
    else:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.01):
                await breaker.call(hang)
    snap = breaker.snapshot()
    assert snap.state is CircuitState.HALF_OPEN
    assert snap.probes_in_flight == 0
    assert snap.calls["cancelled"] == 1
    assert snap.calls["failure"] == 1  # only the failure that opened it
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) is CircuitState.CLOSED


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Task.cancel() is asyncio's own API
async def test_cancelled_probe_via_task_cancel_on_asyncio(clock: FakeClock) -> None:
    """asyncio Task.cancel() on a probe frees the slot and never closes the breaker."""
    import asyncio

    breaker = make(clock, failure_threshold=1)
    await _open_then_half_open(breaker, clock)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(breaker.call(hang))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert breaker.snapshot().probes_in_flight == 0


# -- half-open ------------------------------------------------------------------------------------


async def test_half_open_stampede_admits_exactly_the_allowed_probes(clock: FakeClock) -> None:
    """N concurrent callers at half-open: exactly half_open_max_calls reach the function."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=1, half_open_max_calls=3, success_threshold=3)
    await _open_then_half_open(breaker, clock)
    release = anyio.Event()
    reached = 0
    rejected = 0

    async def slow_ok() -> None:
        nonlocal reached
        reached += 1
        await release.wait()

    async def caller() -> None:
        nonlocal rejected
        try:
            await breaker.call(slow_ok)
        except CircuitOpenError as exc:
            assert exc.state == "half_open"
            rejected += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert reached == 3
        assert rejected == 47
        release.set()
    assert state_of(breaker) is CircuitState.CLOSED
    assert len(hook.of(BreakerCallRejected)) == 47


async def test_hung_probe_lease_lets_a_new_probe_in_and_its_result_is_dropped(
    clock: FakeClock,
) -> None:
    """A probe hanging past its lease frees the slot; its late failure changes nothing."""
    breaker = make(clock, failure_threshold=1, reset_timeout=10, probe_lease=5)
    await trip(breaker, 1)
    clock.advance(10)
    release = anyio.Event()

    async def hung() -> None:
        await release.wait()
        raise Boom("late")

    async with anyio.create_task_group() as tg:
        tg.start_soon(_expect_boom, breaker, hung)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.retry_after == pytest.approx(5)
        clock.advance(5)
        assert await breaker.call(ok) == "ok"  # the new probe closes the breaker
        assert state_of(breaker) is CircuitState.CLOSED
        release.set()
    assert state_of(breaker) is CircuitState.CLOSED


async def _expect_boom(breaker: CircuitBreaker, fn: Callable[[], Any]) -> None:
    with pytest.raises(Boom):
        await breaker.call(fn)


async def test_stale_success_from_closed_does_not_close_a_half_open_breaker(
    clock: FakeClock,
) -> None:
    """A slow call admitted while CLOSED that succeeds after the breaker opened is dropped."""
    breaker = make(clock, failure_threshold=1, reset_timeout=10)
    release = anyio.Event()

    async def slow_ok() -> str:
        await release.wait()
        return "stale"

    async with anyio.create_task_group() as tg:

        async def slow_caller() -> None:
            assert await breaker.call(slow_ok) == "stale"

        tg.start_soon(slow_caller)
        await anyio.wait_all_tasks_blocked()
        await trip(breaker, 1)
        clock.advance(10)
        assert state_of(breaker) is CircuitState.HALF_OPEN
        release.set()
    snap = breaker.snapshot()
    assert snap.state is CircuitState.HALF_OPEN
    assert snap.half_open_successes == 0


async def test_stale_failure_does_not_reopen_or_extend(clock: FakeClock) -> None:
    """Failures of calls admitted before the breaker opened do not reset the open timer."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=1, reset_timeout=10)
    release = anyio.Event()

    async def slow_fail() -> None:
        await release.wait()
        raise Boom("late")

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(_expect_boom, breaker, slow_fail)
        await anyio.wait_all_tasks_blocked()
        await trip(breaker, 1)
        clock.advance(4)
        release.set()
    assert breaker.retry_after() == pytest.approx(6)
    assert hook.transitions() == [("closed", "open")]


async def test_simultaneous_failures_at_threshold_give_one_transition(clock: FakeClock) -> None:
    """Many calls failing together past the threshold open the breaker exactly once."""
    hook = Recorder()
    breaker = make(clock, hook, failure_threshold=3)
    release = anyio.Event()

    async def fail_later() -> None:
        await release.wait()
        raise Boom("down")

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(_expect_boom, breaker, fail_later)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert hook.transitions() == [("closed", "open")]
    assert breaker.snapshot().calls["failure"] == 20


async def test_ignored_exception_in_half_open_releases_its_slot(clock: FakeClock) -> None:
    """An ignored error from a probe gives its slot back without a verdict."""
    breaker = make(clock, failure_threshold=1, ignore_on=KeyError)
    await _open_then_half_open(breaker, clock)

    async def missing() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        await breaker.call(missing)
    snap = breaker.snapshot()
    assert snap.state is CircuitState.HALF_OPEN and snap.probes_in_flight == 0
    assert await breaker.call(ok) == "ok"
    assert state_of(breaker) is CircuitState.CLOSED


async def test_closed_calls_run_in_parallel(clock: FakeClock) -> None:
    """100 concurrent calls in CLOSED are all inside the function at once (no serialization)."""
    breaker = make(clock)
    inside = 0
    peak = 0
    release = anyio.Event()

    async def work() -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await release.wait()
        inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(breaker.call, work)
        await anyio.wait_all_tasks_blocked()
        assert peak == 100
        release.set()
    assert breaker.snapshot().calls["success"] == 100


# -- exponential breaker ---------------------------------------------------------------------------


async def test_exponential_growth_cap_and_success_threshold(clock: FakeClock) -> None:
    """Each re-open doubles the open time up to the cap; three probe successes close it."""
    breaker = ExponentialCircuitBreaker(
        name="exp", failure_threshold=1, base=1, maximum=8, clock=clock, hooks=[]
    )
    await trip(breaker, 1)
    seen = [breaker.snapshot().open_for]
    for _ in range(5):
        clock.advance(breaker.retry_after())
        await trip(breaker, 1)  # the probe fails: re-open
        seen.append(breaker.snapshot().open_for)
    assert seen == [1, 2, 4, 8, 8, 8]
    clock.advance(8)
    for expected in (CircuitState.HALF_OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED):
        assert await breaker.call(ok) == "ok"
        assert breaker.state is expected


async def test_exponential_decay_after_staying_closed(clock: FakeClock) -> None:
    """Growth steps back one per cool_down spent closed, or resets with decay='reset'."""
    for decay, expected in (("step", 2.0), ("reset", 1.0)):
        breaker = ExponentialCircuitBreaker(
            name=f"decay-{decay}",
            failure_threshold=1,
            success_threshold=1,
            base=1,
            maximum=60,
            cool_down=10,
            decay=decay,  # type: ignore[arg-type]
            clock=clock,
            hooks=[],
        )
        await trip(breaker, 1)
        for _ in range(2):  # open for 1, 2, then 4
            clock.advance(breaker.retry_after())
            await trip(breaker, 1)
        assert breaker.snapshot().open_for == 4
        clock.advance(4)
        await breaker.call(ok)
        assert state_of(breaker) is CircuitState.CLOSED
        clock.advance(10)  # one cool_down: one step back (from the 4th open to the 3rd)
        await trip(breaker, 1)
        assert breaker.snapshot().open_for == (4.0 if decay == "step" else expected)
        breaker.reset()
        await trip(breaker, 1)
        assert breaker.snapshot().open_for == 1.0


async def test_quick_reopen_after_closing_keeps_growing(clock: FakeClock) -> None:
    """Tripping again soon after closing counts as a consecutive open."""
    breaker = ExponentialCircuitBreaker(
        name="flap", failure_threshold=1, success_threshold=1, base=1, clock=clock, hooks=[]
    )
    await trip(breaker, 1)
    clock.advance(1)
    await breaker.call(ok)
    await trip(breaker, 1)
    assert breaker.snapshot().open_for == 2


def test_jitter_stays_within_bounds() -> None:
    """Jittered open times fall in [t * (1 - jitter), t] and are not all equal."""
    policy = ExponentialBackoff(base=1, maximum=60, jitter=0.5)
    rng = random.Random(7)
    for k in range(8):
        t = min(2.0**k, 60.0)
        draws = [policy.duration(k, rng) for _ in range(200)]
        assert all(t * 0.5 <= d <= t for d in draws)
        assert len(set(draws)) > 100


def test_no_overflow_after_many_opens() -> None:
    """A huge exponent gives the cap, not an OverflowError."""
    assert ExponentialBackoff(base=1, maximum=30).duration(10_000) == 30


# -- failure rate ------------------------------------------------------------------------------


async def test_count_window_failure_rate(clock: FakeClock) -> None:
    """The rate policy waits for minimum_calls, then trips at the threshold."""
    breaker = make(
        clock, trip=FailureRate(threshold=0.5, window=10, minimum_calls=4), failure_threshold=1
    )
    await trip(breaker, 3)  # 3 failures, but under minimum_calls
    assert state_of(breaker) is CircuitState.CLOSED
    await breaker.call(ok)  # 3/4 >= 0.5
    assert state_of(breaker) is CircuitState.OPEN


async def test_count_window_slides(clock: FakeClock) -> None:
    """Old outcomes leave a count window as new ones arrive."""
    breaker = make(clock, trip=FailureRate(threshold=0.6, window=5, minimum_calls=5))
    for _ in range(2):
        await trip(breaker, 1)
        await breaker.call(ok)
    await breaker.call(ok)  # F S F S S: 0.4
    for _ in range(3):
        await breaker.call(ok)  # the failures slide out
    assert breaker.snapshot().failure_rate == pytest.approx(0.0)
    await trip(breaker, 2)
    assert state_of(breaker) is CircuitState.CLOSED  # 2/5
    await trip(breaker, 1)
    assert state_of(breaker) is CircuitState.OPEN  # 3/5


async def test_time_window_forgets_old_calls(clock: FakeClock) -> None:
    """Calls older than the time window no longer count."""
    breaker = make(
        clock, trip=FailureRate(threshold=0.5, window=10, window_type="time", minimum_calls=4)
    )
    await trip(breaker, 3)
    clock.advance(11)
    await breaker.call(ok)
    assert breaker.snapshot().failure_rate is None  # only one call in the window
    assert state_of(breaker) is CircuitState.CLOSED


# -- forms ----------------------------------------------------------------------------------------


async def test_decorator_keeps_signature_and_metadata(clock: FakeClock) -> None:
    """The decorator keeps name, docstring and arguments, for async and sync functions."""
    breaker = make(clock, failure_threshold=1)

    @breaker
    async def add(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    @breaker
    def mul(a: int, b: int) -> int:
        return a * b

    assert await add(1, b=3) == 4
    assert mul(2, 3) == 6
    assert add.__name__ == "add" and add.__doc__ == "Add."
    assert add.breaker is breaker  # type: ignore[attr-defined]


async def test_decorator_rejects_when_open(clock: FakeClock) -> None:
    """A decorated function is not run while the breaker is open."""
    breaker = make(clock, failure_threshold=1)
    calls = 0

    @breaker
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise Boom

    with pytest.raises(Boom):
        await flaky()
    with pytest.raises(CircuitOpenError):
        await flaky()
    assert calls == 1


async def test_async_context_manager(clock: FakeClock) -> None:
    """async with records the block's outcome, and rejects while open."""
    breaker = make(clock, failure_threshold=2)
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
    with pytest.raises(CircuitOpenError):
        async with breaker:
            pytest.fail("the block must not run")
    breaker.reset()
    async with breaker:
        pass
    assert breaker.snapshot().calls["success"] == 1


async def test_context_manager_is_safe_across_concurrent_tasks(clock: FakeClock) -> None:
    """Interleaved async with blocks on one breaker keep their own permits (half-open)."""
    breaker = make(clock, failure_threshold=1, half_open_max_calls=2, success_threshold=2)
    await _open_then_half_open(breaker, clock)
    gate = anyio.Event()

    async def block(fail_it: bool) -> None:
        try:
            async with breaker:
                await gate.wait()
                if fail_it:
                    raise Boom
        except Boom:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(block, False)
        tg.start_soon(block, True)
        await anyio.wait_all_tasks_blocked()
        assert breaker.snapshot().probes_in_flight == 2
        gate.set()
    assert state_of(breaker) is CircuitState.OPEN


def test_sync_use_from_many_threads() -> None:
    """Sync calls from 8 threads (call_sync and the decorator) are all counted and trip the
    breaker exactly once."""
    hook = Recorder()
    breaker = CircuitBreaker(name="threads", failure_threshold=50, hooks=[hook])
    decorated = breaker(_maybe_fail)
    barrier = threading.Barrier(8)

    def worker(use_decorator: bool) -> None:
        barrier.wait()
        for i in range(500):
            try:
                if use_decorator:
                    decorated(i)
                else:
                    breaker.call_sync(_maybe_fail, i)
            except (Boom, CircuitOpenError):
                pass

    threads = [threading.Thread(target=worker, args=(n % 2 == 0,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = breaker.snapshot().calls
    assert sum(calls.values()) == 8 * 500
    assert hook.transitions() == [("closed", "open")]


def test_sync_decorator_counts_rejects_and_probes(clock: FakeClock) -> None:
    """A decorated plain function: failures open the breaker, an open breaker does not run it,
    and after the reset timeout one call is the probe that closes it again."""
    breaker = make(clock, failure_threshold=2, reset_timeout=5)
    ran: list[int] = []

    @breaker
    def lookup(key: int, *, fail: bool = False) -> int:
        """Find a key."""
        ran.append(key)
        if fail:
            raise Boom
        return key * 2

    assert lookup.__name__ == "lookup" and lookup.__doc__ == "Find a key."
    assert not inspect.iscoroutinefunction(lookup)
    assert lookup(1) == 2
    for key in (2, 3):
        with pytest.raises(Boom):
            lookup(key, fail=True)
    assert state_of(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as rejected:
        lookup(4)
    assert rejected.value.retry_after == 5.0
    assert ran == [1, 2, 3]
    clock.advance(5)
    assert lookup(5) == 10
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.snapshot().calls == {
        "success": 2,
        "failure": 2,
        "ignored": 0,
        "cancelled": 0,
        "rejected": 1,
    }


def _maybe_fail(i: int) -> int:
    if i >= 100:
        raise Boom
    return i


# -- control and inspection ---------------------------------------------------------------------


async def test_isolate_disable_reset(clock: FakeClock) -> None:
    """isolate rejects everything, disable lets everything through, reset closes."""
    breaker = make(clock, failure_threshold=1)
    breaker.isolate()
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.state == "forced_open"
    clock.advance(10_000)
    assert state_of(breaker) is CircuitState.FORCED_OPEN
    breaker.disable()
    await trip(breaker, 5)
    assert state_of(breaker) is CircuitState.DISABLED
    breaker.reset()
    assert state_of(breaker) is CircuitState.CLOSED
    assert breaker.snapshot().calls["failure"] == 5


async def test_snapshot_is_consistent(clock: FakeClock) -> None:
    """snapshot() reports state, counts, opened_at and retry_after."""
    breaker = make(clock, failure_threshold=2, reset_timeout=30)
    await trip(breaker, 2)
    clock.advance(12)
    snap = breaker.snapshot()
    assert snap.state is CircuitState.OPEN
    assert snap.opened_at == 1000.0
    assert snap.open_for == 30
    assert snap.retry_after == pytest.approx(18)
    assert snap.calls["failure"] == 2
    with pytest.raises(AttributeError):
        snap.state = CircuitState.CLOSED  # type: ignore[misc]


def test_registry_gets_or_creates_by_name() -> None:
    """The registry returns one breaker per name, created with its defaults."""
    registry = CircuitBreakerRegistry(failure_threshold=2, hooks=[])
    a = registry.get("payments")
    assert registry.get("payments") is a
    assert "payments" in registry and len(registry) == 1
    b = registry.get("search", reset_timeout=5)
    registry.isolate_all(["search"])
    assert state_of(b) is CircuitState.FORCED_OPEN and state_of(a) is CircuitState.CLOSED
    registry.reset_all()
    assert [s.name for s in registry.snapshots()] == ["payments", "search"]


def test_isolate_all_takes_any_iterable_of_names() -> None:
    """A generator of names isolates every breaker it names, not only the first."""
    registry = CircuitBreakerRegistry(hooks=[])
    a, b, c = (registry.get(name) for name in ("a", "b", "c"))
    registry.isolate_all(name for name in ("a", "b"))
    assert [state_of(x) for x in (a, b, c)] == [
        CircuitState.FORCED_OPEN,
        CircuitState.FORCED_OPEN,
        CircuitState.CLOSED,
    ]


def test_isolate_all_with_unknown_names_raises_and_isolates_nothing() -> None:
    """Unknown names raise a KeyError listing each of them; no breaker is isolated."""
    registry = CircuitBreakerRegistry(hooks=[])
    a = registry.get("payments")
    with pytest.raises(KeyError, match="'paymnts', 'ledger'"):
        registry.isolate_all(["paymnts", "payments", "ledger"])
    assert state_of(a) is CircuitState.CLOSED


def test_registry_get_with_other_options_raises_naming_them() -> None:
    """get() with options that differ from the existing breaker's raises; equal ones do not."""
    clock = FakeClock(0.0)
    registry = CircuitBreakerRegistry(failure_threshold=3, clock=clock, hooks=[])
    first = registry.get("payments", reset_timeout=10)
    assert registry.get("payments") is first
    assert registry.get("payments", reset_timeout=10.0, failure_threshold=3) is first
    assert registry.get("payments", clock=clock, success_threshold=1) is first  # the default
    with pytest.raises(ValueError, match=r"'payments'") as caught:
        registry.get("payments", reset_timeout=30, failure_threshold=5, half_open_max_calls=1)
    message = str(caught.value)
    assert "failure_threshold=5 (it has 3)" in message
    assert "reset_timeout=30 (it has 10)" in message
    assert "half_open_max_calls" not in message  # equal to the default it was created with


# -- hooks ----------------------------------------------------------------------------------------


async def test_raising_hook_is_disabled_and_never_changes_the_outcome(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hook that raises is logged and disabled; calls and other hooks go on."""

    class Bad:
        calls = 0

        def on_event(self, event: Event) -> None:
            Bad.calls += 1
            raise RuntimeError("hook bug")

    good = Recorder()
    breaker = CircuitBreaker(name="hooked", failure_threshold=1, clock=clock, hooks=[Bad(), good])
    await trip(breaker, 1)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    assert Bad.calls == 1
    assert len(good.of(BreakerStateChanged)) == 1
    assert len(good.of(BreakerCallRejected)) == 1
    assert "hook_disabled" in capsys.readouterr().out


async def test_success_events_only_when_a_hook_wants_them(clock: FakeClock) -> None:
    """Success events are built only for hooks that ask for them."""

    class OnlyFailures(Recorder):
        event_types = frozenset({BreakerCallFailed})

    picky, everything = OnlyFailures(), Recorder()
    breaker = CircuitBreaker(name="picky", clock=clock, hooks=[picky, everything])
    await breaker.call(ok)
    await trip(breaker, 1)
    assert [type(e) for e in picky.events] == [BreakerCallFailed]
    assert [type(e) for e in everything.events] == [BreakerCallSucceeded, BreakerCallFailed]


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"half_open_max_calls": -1}, "half_open_max_calls"),
        ({"reset_timeout": 0}, "reset_timeout"),
        ({"reset_timeout": -1.5}, "reset_timeout"),
        ({"reset_timeout": float("nan")}, "reset_timeout"),
        ({"probe_lease": 0}, "probe_lease"),
        ({"slow_call_duration": -1}, "slow_call_duration"),
        ({"duration_buckets": [1.0, 0.5]}, "duration_buckets"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_breaker_configuration_names_the_parameter(kwargs: dict[str, Any], field: str) -> None:
    """Bad settings raise ValueError naming the parameter and the allowed range."""
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(hooks=[], **kwargs)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: FailureRate(threshold=0), "threshold"),
        (lambda: FailureRate(threshold=1.5), "threshold"),
        (lambda: FailureRate(window=5, minimum_calls=10), "minimum_calls"),
        (lambda: FailureRate(window=2.5), "window"),
        (lambda: FailureRate(window=0, window_type="time"), "window"),
        (lambda: ExponentialBackoff(base=10, maximum=5), "maximum"),
        (lambda: ExponentialBackoff(base=0), "base"),
        (lambda: ExponentialBackoff(jitter=1.5), "jitter"),
        (lambda: ExponentialBackoff(multiplier=0.5), "multiplier"),
        (lambda: ExponentialBackoff(cool_down=-1), "cool_down"),
    ],
)
def test_bad_policy_configuration_names_the_parameter(
    build: Callable[[], object], field: str
) -> None:
    """Policies validate at construction and name the parameter."""
    with pytest.raises(ValueError, match=field):
        build()


def test_rejection_error_is_picklable_and_readable() -> None:
    """CircuitOpenError keeps its fields through pickling and says when to retry."""
    import pickle

    err = pickle.loads(pickle.dumps(CircuitOpenError("db", "open", 1.5)))
    assert (err.name, err.state, err.retry_after) == ("db", "open", 1.5)
    assert str(err) == "circuit breaker 'db' is open; retry after 1.500s"
