"""Retries, under asyncio and trio, with a fake clock: nothing here really sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _log_capture import LogCapture
from prometheus_client import CollectorRegistry, generate_latest
from tenacity import stop_after_attempt, wait_fixed

from veritas_resilience import (
    CircuitBreaker,
    CircuitOpenError,
    PrometheusHook,
    RetryBudgetExhaustedError,
    StructlogHook,
)
from veritas_resilience.retry import (
    Retry,
    RetryBudget,
    RetryBudgetDenied,
    RetryExhausted,
    RetryScheduled,
    is_testing,
    set_testing,
)
from veritas_resilience.testing import FakeClock
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio


class Flaky:
    """An async dependency that fails ``failures`` times with ``error``, then answers."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def call(self, *args: Any) -> str:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.calls <= self.failures:
            raise self.error(f"attempt {self.calls} failed")
        return "ok"


def attempts_metric(registry: CollectorRegistry, name: str) -> dict[str, float]:
    out = {}
    prefix = f'veritas_retry_attempts_total{{name="{name}",outcome="'
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(prefix):
            outcome = line[len(prefix) :].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture
def auto_clock() -> FakeClock:
    """A fake clock whose sleeps advance it at once."""
    return FakeClock(1000.0, auto_advance=True)


async def test_retries_named_errors_with_growing_jittered_waits(
    auto_clock: FakeClock, prometheus: PrometheusHook
) -> None:
    """Named errors are retried; waits follow min(max, initial*base^(n-1) + U(0, jitter))."""
    hook = Recorder()
    dep = Flaky(3)
    retry = Retry(
        on=ConnectionError,
        name="db",
        wait_initial=0.1,
        wait_max=5,
        wait_jitter=1.0,
        clock=auto_clock,
        hooks=[hook, prometheus],
    )
    assert await retry(dep.call)() == "ok"
    assert dep.calls == 4
    waits = auto_clock.slept
    assert len(waits) == 3
    for n, wait in enumerate(waits, 1):
        base = 0.1 * 2 ** (n - 1)
        assert base <= wait <= base + 1.0
    scheduled = hook.of(RetryScheduled)
    assert [e.attempt for e in scheduled] == [1, 2, 3]
    assert [e.wait for e in scheduled] == waits
    assert all(isinstance(e.error, ConnectionError) for e in scheduled)
    counts = attempts_metric(prometheus.registry, "db")
    assert counts["success"] == 1
    assert counts["retried"] == 3
    assert counts["exhausted"] == counts["not_retried"] == counts["budget_exhausted"] == 0


async def test_success_on_first_attempt_never_waits(auto_clock: FakeClock) -> None:
    """A call that succeeds first time makes one attempt and no sleep."""
    dep = Flaky(0)
    retry = Retry(on=ConnectionError, clock=auto_clock, hooks=[])
    assert await retry.call(dep.call, "arg") == "ok"
    assert dep.calls == 1
    assert auto_clock.slept == []


async def test_errors_not_named_are_not_retried(auto_clock: FakeClock) -> None:
    """An error that `on` does not name is raised at once, as is."""
    dep = Flaky(1, error=ValueError)
    retry = Retry(on=ConnectionError, name="r", clock=auto_clock, hooks=[])
    with pytest.raises(ValueError, match="attempt 1"):
        await retry(dep.call)()
    assert dep.calls == 1
    assert auto_clock.slept == []
    assert retry.counts()["not_retried"] == 1


async def test_predicate_decides_what_to_retry(auto_clock: FakeClock) -> None:
    """`on` may be a predicate on the exception."""
    dep = Flaky(2, error=OSError)
    retry = Retry(
        on=lambda exc: isinstance(exc, OSError) and "attempt" in str(exc),
        clock=auto_clock,
        hooks=[],
    )
    assert await retry(dep.call)() == "ok"
    assert dep.calls == 3


async def test_attempt_cap_raises_the_last_error(auto_clock: FakeClock) -> None:
    """After `attempts` failures the last error is raised and RetryExhausted is reported."""
    hook = Recorder()
    dep = Flaky(10)
    retry = Retry(on=ConnectionError, attempts=3, clock=auto_clock, hooks=[hook])
    with pytest.raises(ConnectionError, match="attempt 3"):
        await retry(dep.call)()
    assert dep.calls == 3
    [exhausted] = hook.of(RetryExhausted)
    assert exhausted.attempts == 3
    assert str(exhausted.error) == "attempt 3 failed"
    assert exhausted.elapsed == pytest.approx(sum(auto_clock.slept))
    assert retry.counts() == {
        "success": 0,
        "retried": 2,
        "exhausted": 1,
        "not_retried": 0,
        "budget_exhausted": 0,
    }


async def test_time_cap_stops_before_a_wait_that_would_pass_it(auto_clock: FakeClock) -> None:
    """No retry is made whose wait would end past `timeout` after the first failure."""
    dep = Flaky(10)
    retry = Retry(
        on=ConnectionError,
        attempts=100,
        timeout=3.5,
        wait_initial=1,
        wait_jitter=0,
        wait_exp_base=1,
        clock=auto_clock,
        hooks=[],
    )
    with pytest.raises(ConnectionError):
        await retry(dep.call)()
    assert auto_clock.slept == [1, 1, 1]
    assert dep.calls == 4


async def test_waits_go_through_the_injected_clock(clock: FakeClock) -> None:
    """The retry sleeps on the policy's clock: it resumes only when that clock is advanced."""
    dep = Flaky(1)
    retry = Retry(on=ConnectionError, wait_initial=2, wait_jitter=0, clock=clock, hooks=[])
    result: list[str] = []

    async def run() -> None:
        result.append(await retry(dep.call)())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await clock.wait_for_sleepers(1)
        assert dep.calls == 1
        clock.advance(1.9)
        await anyio.lowlevel.checkpoint()
        assert dep.calls == 1
        clock.advance(0.1)
    assert result == ["ok"]
    assert dep.calls == 2


async def test_open_breaker_is_not_retried_when_it_reopens_after_the_wait(
    auto_clock: FakeClock,
) -> None:
    """CircuitOpenError whose retry_after exceeds the next wait ends the retries at once."""
    breaker = CircuitBreaker(name="dep", failure_threshold=2, reset_timeout=30, clock=auto_clock)
    dep = Flaky(100)
    retry = Retry(on=ConnectionError, attempts=10, wait_jitter=0, clock=auto_clock, hooks=[])
    guarded = retry(breaker(dep.call))
    with pytest.raises(CircuitOpenError) as info:
        await guarded()
    assert info.value.retry_after > 1
    assert dep.calls == 2  # the two failures that opened the breaker; nothing after
    assert len(auto_clock.slept) == 2
    assert retry.counts()["not_retried"] == 1


async def test_open_breaker_is_retried_when_it_reopens_before_the_wait_ends(
    auto_clock: FakeClock,
) -> None:
    """If the breaker admits a probe before the next wait is over, the retry waits and probes."""
    breaker = CircuitBreaker(name="dep", failure_threshold=1, reset_timeout=0.5, clock=auto_clock)
    dep = Flaky(1)
    retry = Retry(on=ConnectionError, wait_initial=1, wait_jitter=0, clock=auto_clock, hooks=[])
    assert await retry(breaker(dep.call))() == "ok"
    assert dep.calls == 2
    assert breaker.snapshot().calls["rejected"] == 0


async def test_retry_never_retries_or_counts_cancellation(auto_clock: FakeClock) -> None:
    """A cancelled attempt propagates at once: no retry, no count, no sleep."""
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.Event().wait()

    retry = Retry(on=BaseException, clock=auto_clock, hooks=[])
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(retry(hangs))
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            scope.cancel()
    assert scope.cancelled_caught
    assert calls == 1
    assert auto_clock.slept == []
    assert sum(retry.counts().values()) == 0


async def test_cancellation_during_the_backoff_wait_stops_the_retries(clock: FakeClock) -> None:
    """Cancelling a call while it waits between attempts ends it; no further attempt runs."""
    dep = Flaky(5)
    retry = Retry(on=ConnectionError, clock=clock, hooks=[])
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(retry(dep.call))
            await clock.wait_for_sleepers(1)
            scope.cancel()
    assert scope.cancelled_caught
    assert dep.calls == 1
    assert clock.sleepers == 0


# asyncio only: asyncio's own exception; trio's Cancelled is covered by the scope test
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_cancelled_error_raised_by_the_call_is_not_retried(
    auto_clock: FakeClock,
) -> None:
    """A CancelledError raised inside the call (asyncio) passes through untouched."""
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await Retry(on=Exception, clock=auto_clock, hooks=[])(cancelled)()
    assert calls == 1


@pytest.mark.parametrize("exit_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_are_never_retried(
    exit_type: type[BaseException],
) -> None:
    """KeyboardInterrupt and SystemExit escape the retry on the first attempt."""
    calls = 0

    async def interrupted() -> None:
        nonlocal calls
        calls += 1
        raise exit_type

    wrapped = Retry(on=BaseException, clock=FakeClock(auto_advance=True), hooks=[])(interrupted)
    # Driven by hand: raising these inside an event loop would stop the test session itself.
    coro = wrapped()
    with pytest.raises(exit_type):
        coro.send(None)
    assert calls == 1


async def test_budget_stops_retries_across_callers(
    clock: FakeClock, auto_clock: FakeClock, prometheus: PrometheusHook
) -> None:
    """A shared budget allows `capacity` retries in all, then raises RetryBudgetExhaustedError."""
    hook = Recorder()
    budget = RetryBudget(
        name="payments", capacity=2, refill_rate=1.0, clock=clock, hooks=[prometheus]
    )
    charge = Retry(on=ConnectionError, name="charge", budget=budget, clock=auto_clock, hooks=[hook])
    refund = Retry(on=ConnectionError, name="refund", budget=budget, clock=auto_clock, hooks=[hook])
    dep = Flaky(100)
    with pytest.raises(RetryBudgetExhaustedError) as info:
        await charge(dep.call)()
    assert dep.calls == 3  # the first attempt and two retries
    assert info.value.name == "payments"
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, ConnectionError)
    with pytest.raises(RetryBudgetExhaustedError):
        await refund(dep.call)()
    assert dep.calls == 4  # the other caller got no retry at all
    assert budget.exhausted == 2
    assert [(e.name, e.budget, e.attempts) for e in hook.of(RetryBudgetDenied)] == [
        ("charge", "payments", 3),
        ("refund", "payments", 1),
    ]
    text = generate_latest(prometheus.registry).decode()
    assert 'veritas_retry_budget_exhausted_total{name="payments"} 2.0' in text
    clock.advance(1.0)  # one token back
    assert budget.tokens == pytest.approx(1.0)
    ok_later = Flaky(1)
    assert await refund(ok_later.call)() == "ok"


async def test_budget_refills_up_to_capacity(clock: FakeClock) -> None:
    """Tokens come back at refill_rate per second, never beyond capacity."""
    budget = RetryBudget(capacity=3, refill_rate=0.5, clock=clock, hooks=[])
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.advance(2)
    assert budget.tokens == pytest.approx(1.0)
    clock.advance(100)
    assert budget.tokens == pytest.approx(3.0)


async def test_set_testing_fixes_attempts_and_skips_waits(clock: FakeClock) -> None:
    """Test mode makes exactly `attempts` attempts without sleeping, and restores on exit."""
    retry = Retry(on=ConnectionError, attempts=10, clock=clock, hooks=[])
    dep = Flaky(100)
    with set_testing(attempts=2):
        assert is_testing()
        with pytest.raises(ConnectionError):
            await retry(dep.call)()
    assert not is_testing()
    assert dep.calls == 2
    assert clock.slept == []
    with set_testing(attempts=1):
        with set_testing(False):
            assert not is_testing()
        assert is_testing()


async def test_custom_tenacity_strategies(auto_clock: FakeClock) -> None:
    """tenacity wait and stop strategies can replace the defaults."""
    dep = Flaky(100)
    retry = Retry(
        on=ConnectionError,
        wait=wait_fixed(0.25),
        stop=stop_after_attempt(4),
        clock=auto_clock,
        hooks=[],
    )
    with pytest.raises(ConnectionError):
        await retry(dep.call)()
    assert dep.calls == 4
    assert auto_clock.slept == [0.25, 0.25, 0.25]


async def test_concurrent_calls_keep_their_own_attempt_counts(auto_clock: FakeClock) -> None:
    """Many concurrent calls through one policy do not share retry state."""
    retry = Retry(on=ConnectionError, attempts=3, clock=auto_clock, hooks=[])
    deps = [Flaky(i % 3) for i in range(30)]
    results: list[str] = []

    async def one(dep: Flaky) -> None:
        results.append(await retry(dep.call)())

    async with anyio.create_task_group() as tg:
        for dep in deps:
            tg.start_soon(one, dep)
    assert results == ["ok"] * 30
    assert [d.calls for d in deps] == [i % 3 + 1 for i in range(30)]


async def test_exhausted_log_line_carries_no_argument_values(auto_clock: FakeClock) -> None:
    """The retries_exhausted log names the policy and error type, never the call's arguments."""
    log = LogCapture()

    async def lookup(email: str) -> None:
        raise ConnectionError("connection reset")

    retry = Retry(
        on=ConnectionError, attempts=2, name="users", clock=auto_clock, hooks=[StructlogHook(log)]
    )
    with pytest.raises(ConnectionError):
        await retry(lookup)("jane.doe@example.com")
    [(level, message, fields)] = log.lines
    assert (level, message) == ("warning", "retries_exhausted")
    assert fields["retry"] == "users"
    assert fields["attempts"] == 2
    assert fields["error_type"] == "ConnectionError"
    assert "jane.doe" not in repr(fields)


def test_retry_rejects_bad_configuration() -> None:
    """Bad settings raise at construction, naming the parameter."""
    with pytest.raises(ValueError, match="attempts"):
        Retry(on=OSError, attempts=0)
    with pytest.raises(ValueError, match="timeout"):
        Retry(on=OSError, timeout=0)
    with pytest.raises(ValueError, match="wait_max"):
        Retry(on=OSError, wait_initial=2, wait_max=1)
    with pytest.raises(ValueError, match="wait_jitter"):
        Retry(on=OSError, wait_jitter=-1)
    with pytest.raises(ValueError, match="wait_exp_base"):
        Retry(on=OSError, wait_exp_base=0.5)
    with pytest.raises(TypeError, match="on"):
        Retry(on=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on"):
        Retry(on="OSError")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity"):
        RetryBudget(capacity=0)
    with pytest.raises(ValueError, match=r"^capacity must be a number >= 1 .*got 0\.5"):
        RetryBudget(capacity=0.5)  # it could never grant a retry: each takes a whole token
    with pytest.raises(ValueError, match="refill_rate"):
        RetryBudget(refill_rate=-1)
    with pytest.raises(ValueError, match="attempts"):
        set_testing(attempts=0)
    with pytest.raises(TypeError, match="async"):
        Retry(on=OSError)(lambda: None)  # type: ignore[arg-type, return-value]
