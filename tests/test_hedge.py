"""Hedge: hedged attempts on a FakeClock under asyncio and trio; nothing outlives a call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import (
    CircuitBreaker,
    CircuitState,
    Hedge,
    HedgeBudgetExhausted,
    HedgeSkipped,
    HedgeStarted,
    Pipeline,
    PrometheusHook,
)
from veritas_resilience.testing import FakeClock, LocalRedisSentinel
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio


class Dependency:
    """A fake dependency on the fake clock: each attempt sleeps its scripted latency.

    It counts attempts started, finished, cancelled and still running, so a test can prove that
    every attempt was awaited before the hedged call returned.
    """

    def __init__(
        self, clock: FakeClock, latencies: list[float], fail: frozenset[int] = frozenset()
    ) -> None:
        self.clock = clock
        self.latencies = latencies
        self.fail = fail
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.running = 0
        self.targets: list[str] = []

    async def __call__(self, *args: Any) -> str:
        index = self.started
        self.started += 1
        self.running += 1
        self.targets.extend(a for a in args if isinstance(a, str))
        try:
            await self.clock.sleep(self.latencies[index % len(self.latencies)])
            if index in self.fail:
                raise ConnectionError(f"attempt {index} failed")
            self.finished += 1
            return f"answer {index}"
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


async def drive(clock: FakeClock, call: Callable[[], Awaitable[Any]], step: float = 0.01) -> Any:
    """Run ``call()`` while advancing the fake clock by ``step`` until it is done."""
    box: list[Any] = []

    async def runner() -> None:
        try:
            box.append(("ok", await call()))
        except Exception as exc:
            box.append(("error", exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner)
        for _ in range(10_000):
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            if box:
                break
            clock.advance(step)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def hedge(clock: FakeClock, **kwargs: Any) -> Hedge:
    options: dict[str, Any] = {"idempotent": True, "delay": 0.05, "clock": clock, "hooks": []}
    options.update(kwargs)
    return Hedge(**options)


async def test_a_fast_answer_is_not_hedged(clock: FakeClock) -> None:
    """An attempt that answers within the delay is the only one."""
    dep = Dependency(clock, [0.02])
    policy = hedge(clock)
    assert await drive(clock, lambda: policy(dep)()) == "answer 0"
    assert dep.started == 1
    assert policy.counts()["primary"] == 1 and policy.counts()["attempts"] == 0


async def test_a_late_answer_is_raced_and_the_loser_cancelled(clock: FakeClock) -> None:
    """After the delay a second attempt starts; the first to answer wins and the other is
    cancelled and awaited before the call returns."""
    recorder = Recorder()
    dep = Dependency(clock, [1.0, 0.02])
    policy = hedge(clock, hooks=[recorder])
    assert await drive(clock, lambda: policy.call(dep)) == "answer 1"
    assert dep.started == 2 and dep.cancelled == 1 and dep.running == 0
    assert clock.monotonic() == pytest.approx(1000.07)
    assert policy.counts()["hedge"] == 1 and policy.counts()["cancelled"] == 1
    [started] = recorder.of(HedgeStarted)
    assert started.attempt == 2 and started.delay == 0.05


async def test_up_to_max_attempts_and_nothing_leaks(clock: FakeClock) -> None:
    """With three attempts, a hedge starts after each delay; the losers are all cancelled."""
    dep = Dependency(clock, [1.0, 1.0, 0.01])
    policy = hedge(clock, max_attempts=3)
    assert await drive(clock, lambda: policy.call(dep)) == "answer 2"
    assert (dep.started, dep.cancelled, dep.running) == (3, 2, 0)
    assert clock.monotonic() == pytest.approx(1000.11)


class SleepOnlyClock:
    """A clock that can tell the time and sleep, and nothing more (no call_at)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


async def test_a_clock_that_can_only_sleep_works_too(clock: FakeClock) -> None:
    """With a clock that cannot schedule, the delay is a sleep that an ending attempt cuts."""
    dep = Dependency(clock, [1.0, 0.02])
    policy = Hedge(idempotent=True, delay=0.05, clock=SleepOnlyClock(clock), hooks=[])
    assert await drive(clock, lambda: policy.call(dep)) == "answer 1"
    assert (dep.started, dep.cancelled, dep.running) == (2, 1, 0)
    fast = Dependency(clock, [0.01])
    assert await drive(clock, lambda: policy.call(fast)) == "answer 0"
    assert fast.started == 1


async def test_on_the_event_loop_clock() -> None:
    """With the default clock the delay runs on the event loop's time (asyncio and trio)."""
    never = anyio.Event()
    calls = 0

    async def replica() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await never.wait()  # the first attempt never answers
        return "answer"

    policy = Hedge(idempotent=True, delay=0.01, hooks=[])
    with anyio.fail_after(10):
        assert await policy.call(replica) == "answer"
    assert policy.counts()["hedge"] == 1 and policy.counts()["cancelled"] == 1


async def test_the_original_can_still_win(clock: FakeClock) -> None:
    """The first attempt answers after the hedge started: it wins and the hedge is cancelled."""
    dep = Dependency(clock, [0.08, 1.0])
    policy = hedge(clock)
    assert await drive(clock, lambda: policy.call(dep)) == "answer 0"
    assert (dep.started, dep.cancelled) == (2, 1)
    assert policy.counts()["primary"] == 1


async def test_failures(clock: FakeClock) -> None:
    """A fast failure is raised without hedging; a failed hedge waits for the original; when
    every attempt fails the last error is raised."""
    dep = Dependency(clock, [0.01], fail=frozenset({0}))
    policy = hedge(clock)
    with pytest.raises(ConnectionError, match="attempt 0"):
        await drive(clock, lambda: policy.call(dep))
    assert dep.started == 1

    dep = Dependency(clock, [0.2, 0.01], fail=frozenset({1}))
    assert await drive(clock, lambda: policy.call(dep)) == "answer 0"

    dep = Dependency(clock, [0.2, 0.01], fail=frozenset({0, 1}))
    with pytest.raises(ConnectionError, match="attempt 0"):
        await drive(clock, lambda: policy.call(dep))
    assert policy.counts()["failed"] == 2 and dep.running == 0


async def test_cancelling_the_call_cancels_every_attempt(clock: FakeClock) -> None:
    """An outer cancellation reaches every attempt in flight, and all are awaited."""
    dep = Dependency(clock, [5.0])
    policy = hedge(clock, max_attempts=3)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy.call, dep)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
                clock.advance(0.01)
            assert dep.running == 3
            scope.cancel()
    assert (dep.started, dep.cancelled, dep.running) == (3, 3, 0)
    assert policy.counts()["cancelled"] == 0  # not beaten by another attempt: just cancelled


async def test_targets_each_attempt_goes_to_the_next(clock: FakeClock) -> None:
    """call_targets sends attempt i to target i, and never more attempts than targets."""
    dep = Dependency(clock, [1.0, 1.0, 0.01])
    policy = hedge(clock, max_attempts=5)
    result = await drive(clock, lambda: policy.call_targets(dep, ["a", "b", "c"], "query"))
    assert result == "answer 2"
    assert dep.targets == ["a", "query", "b", "query", "c", "query"]
    one = Dependency(clock, [1.0])
    assert await drive(clock, lambda: policy.call_targets(one, ["only"])) == "answer 0"
    assert one.started == 1
    with pytest.raises(ValueError, match="targets"):
        await policy.call_targets(dep, [])


async def test_budget_caps_the_extra_load(clock: FakeClock) -> None:
    """At 10%, hedges stop once the budget (ten to start, a tenth per call) is spent."""
    recorder = Recorder()
    policy = hedge(clock, budget_percent=10, hooks=[recorder])
    dep = Dependency(clock, [0.2, 0.01])
    for _ in range(50):
        dep.started = 0  # every call: a slow first attempt, a fast second one
        await drive(clock, lambda: policy.call(dep))
    counts = policy.counts()
    assert counts["attempts"] <= 10 + 0.1 * 50
    assert counts["attempts"] + counts["skipped_budget"] == 50
    assert counts["skipped_budget"] > 0
    assert len(recorder.of(HedgeBudgetExhausted)) >= 1
    assert {e.reason for e in recorder.of(HedgeSkipped)} == {"budget"}
    none = hedge(clock, budget_percent=0)
    dep.started = 0
    await drive(clock, lambda: none.call(dep))
    assert none.counts()["attempts"] == 0


async def test_no_hedging_while_the_breaker_is_not_closed(clock: FakeClock) -> None:
    """An open or half-open breaker stops hedging: a struggling dependency gets no extra work."""
    breaker = CircuitBreaker(
        name="db", failure_threshold=1, reset_timeout=30, clock=clock, hooks=[]
    )
    policy = hedge(clock, breaker=breaker)

    async def boom() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await breaker.call(boom)
    dep = Dependency(clock, [0.2, 0.01])
    assert await drive(clock, lambda: policy.call(dep)) == "answer 0"
    assert dep.started == 1 and policy.counts()["skipped_breaker"] == 1
    clock.advance(30)  # the open time is over: half-open
    assert breaker.state is CircuitState.HALF_OPEN
    dep = Dependency(clock, [0.2, 0.01])
    assert await drive(clock, lambda: policy.call(dep)) == "answer 0"
    assert dep.started == 1 and policy.counts()["skipped_breaker"] == 2
    breaker.reset()  # closed again: hedging resumes
    dep = Dependency(clock, [0.2, 0.01])
    assert await drive(clock, lambda: policy.call(dep)) == "answer 1"


async def test_delay_follows_the_observed_p95(clock: FakeClock) -> None:
    """With delay=None the delay becomes the p95 of attempt latencies once enough are seen."""
    policy = hedge(clock, delay=None, initial_delay=1.0, budget_percent=0)  # observe only
    assert policy.delay == 1.0
    latencies = [0.001 * (i + 1) for i in range(100)]
    dep = Dependency(clock, latencies)
    for _ in range(100):  # recomputed after 20 samples, then every 16: last at 100
        await drive(clock, lambda: policy.call(dep), step=0.001)
    assert policy.delay == pytest.approx(0.095, abs=0.0015)  # p95 of 1..100 ms


async def test_metrics(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Calls by winner, extra attempts, cancellations and the delay are exported by name."""
    policy = hedge(clock, name="profiles", hooks=[PrometheusHook(registry)])
    await drive(clock, lambda: policy.call(Dependency(clock, [1.0, 0.01])))
    text = generate_latest(registry).decode()
    assert 'veritas_hedge_calls_total{name="profiles",outcome="hedge"} 1.0' in text
    assert 'veritas_hedge_attempts_total{name="profiles"} 1.0' in text
    assert 'veritas_hedge_cancelled_total{name="profiles"} 1.0' in text
    assert 'veritas_hedge_delay_seconds{name="profiles"} 0.05' in text


async def test_pipeline_step(clock: FakeClock) -> None:
    """In a pipeline the hedge sits inside the bulkhead and outside the timeout."""
    policy = hedge(clock)
    pipeline = Pipeline(hedge=policy, bulkhead=2, timeout=5)
    assert pipeline.describe() == ["bulkhead", "hedge", "timeout"]
    dep = Dependency(clock, [1.0, 0.01])
    assert await drive(clock, lambda: pipeline.call(dep)) == "answer 1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"idempotent": False}, "idempotent must be True"),
        ({"delay": 0}, "delay must be a finite number of seconds > 0"),
        ({"delay": -1}, "delay must be a finite number of seconds > 0"),
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"budget_percent": -1}, "budget_percent must be a percentage from 0 to 100"),
        ({"budget_percent": 101}, "budget_percent must be a percentage from 0 to 100"),
        ({"percentile": 0}, "percentile must be a percentage > 0"),
        ({"percentile": 150}, "percentile must be a percentage from 0 to 100"),
        ({"initial_delay": 0}, "initial_delay must be a finite number of seconds > 0"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    """Out-of-range settings raise ValueError naming the parameter and the range."""
    options: dict[str, Any] = {"idempotent": True}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Hedge(**options)


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_hedged_reads_across_real_replicas(redis_sentinel: LocalRedisSentinel) -> None:
    """Reads hedged over two real Redis replicas: when one is slow, the other answers, and the
    slow read is cancelled (its connection dropped) before the call returns."""
    import time

    from redis.asyncio import Redis

    from veritas_resilience.testing import FaultProxy

    host, port = redis_sentinel.master
    master = Redis(host=host, port=port)
    await master.set("hedge:profile:42", b"jane")
    await anyio.to_thread.run_sync(redis_sentinel.wait_replicas_synced)
    slow_replica, fast_replica = redis_sentinel.replicas[:2]
    with FaultProxy(*slow_replica) as proxy:
        slow = Redis(host=proxy.host, port=proxy.port)
        fast = Redis(host=fast_replica[0], port=fast_replica[1])
        await slow.ping()
        proxy.delay(2.0)  # the slow replica now takes at least 4 s per round trip

        async def read(client: Redis, key: str) -> bytes | str | None:
            return await client.get(key)

        policy = Hedge(idempotent=True, delay=0.05, name="replica-reads", hooks=[])
        started = time.monotonic()
        assert await policy.call_targets(read, [slow, fast], "hedge:profile:42") == b"jane"
        assert time.monotonic() - started < 2.0  # far below the slow replica's 4 s
        assert policy.counts()["hedge"] == 1 and policy.counts()["cancelled"] == 1
        proxy.delay(0)
        for client in (slow, fast, master):
            await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancel_waits_for_slow_cleanups(clock: FakeClock) -> None:
    """A plain asyncio task.cancel() (twice, even) reaches every attempt, and the call ends only
    after each attempt's own cleanup has finished."""
    import asyncio

    cleanup_may_finish = asyncio.Event()
    cleaned = 0

    async def attempt() -> str:
        nonlocal cleaned
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await cleanup_may_finish.wait()  # a slow cleanup (a connection being closed)
            cleaned += 1
            raise
        return "never"

    policy = Hedge(idempotent=True, delay=0.05, max_attempts=2, clock=clock, hooks=[])
    task = asyncio.create_task(policy.call(attempt))
    for _ in range(10):
        await asyncio.sleep(0)
    clock.advance(0.05)  # the hedge starts
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()  # cancelled again while it waits for the cleanups
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done() and cleaned == 0
    cleanup_may_finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == 2
