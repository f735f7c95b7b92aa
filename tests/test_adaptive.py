"""AdaptiveLimit: the limit follows latency (vegas, gradient) on a FakeClock, asyncio and trio."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import (
    AdaptiveLimit,
    AdaptiveLimitChanged,
    AdaptiveLimitRejected,
    BulkheadFullError,
    ConcurrencyLimitError,
    Pipeline,
    PrometheusHook,
)
from veritas_resilience.testing import FakeClock
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio


async def rounds(limit: AdaptiveLimit, clock: FakeClock, latency: float, count: int) -> None:
    """Run ``count`` rounds: fill the limit with calls taking ``latency``, then let them end."""

    async def call() -> None:
        await limit.call(clock.sleep, latency)

    for _ in range(count):
        async with anyio.create_task_group() as tg:
            for _ in range(limit.limit):
                tg.start_soon(call)
            await clock.wait_for_sleepers(limit.limit)
            clock.advance(latency)


@pytest.mark.parametrize("algorithm", ["vegas", "gradient"])
async def test_limit_grows_at_no_load_latency_and_shrinks_when_queueing_shows(
    clock: FakeClock, algorithm: Any
) -> None:
    """Steady latency lets the limit grow; latency that climbs with load makes it shrink."""
    limit = AdaptiveLimit(
        algorithm=algorithm, initial_limit=10, max_limit=100, clock=clock, hooks=[]
    )
    await rounds(limit, clock, 0.010, 40)
    grown = limit.limit
    assert grown >= 20
    await rounds(limit, clock, 0.050, 10)  # five times slower: the dependency is queueing
    assert limit.limit < grown * 0.75


async def test_calls_above_the_limit_are_rejected_at_once(clock: FakeClock) -> None:
    """At the limit, a call is rejected without running, as a BulkheadFullError subclass."""
    recorder = Recorder()
    limit = AdaptiveLimit(initial_limit=2, name="search", clock=clock, hooks=[recorder])
    ran = 0

    async def slow() -> None:
        nonlocal ran
        ran += 1
        await clock.sleep(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(limit.call, slow)
        tg.start_soon(limit.call, slow)
        await clock.wait_for_sleepers(2)
        with pytest.raises(ConcurrencyLimitError) as info:
            await limit(slow)()
        assert isinstance(info.value, BulkheadFullError)
        assert info.value.max_concurrent == 2 and "adaptive limit 'search'" in str(info.value)
        clock.advance(1)
    assert ran == 2 and limit.in_flight == 0
    assert limit.counts()["rejected"] == 1
    [event] = recorder.of(AdaptiveLimitRejected)
    assert event.limit == 2


async def test_cancelled_call_gives_its_slot_back_without_a_sample(clock: FakeClock) -> None:
    """A cancelled call frees its slot and teaches the limit nothing."""
    limit = AdaptiveLimit(initial_limit=1, clock=clock, hooks=[])
    with anyio.move_on_after(0):
        await limit.call(clock.sleep, 10)
    assert limit.in_flight == 0 and limit.counts()["cancelled"] == 1
    assert limit.baseline == 0.0 and limit.limit == 1


async def test_timeouts_shrink_the_limit_and_other_errors_are_ignored(clock: FakeClock) -> None:
    """An error in drop_on (TimeoutError) shrinks the limit; any other error leaves it."""
    limit = AdaptiveLimit(initial_limit=50, clock=clock, hooks=[])
    await rounds(limit, clock, 0.01, 1)  # learn the no-load latency first
    before = limit.limit

    async def fails(exc: Exception) -> None:
        await clock.sleep(0.01)
        raise exc

    async def run(exc: Exception) -> None:
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                with pytest.raises(type(exc)):
                    await limit.call(fails, exc)

            tg.start_soon(one)
            await clock.wait_for_sleepers(1)
            clock.advance(0.01)

    await run(KeyError("not found"))
    assert limit.limit == before and limit.counts()["ignored"] == 1
    await run(TimeoutError())
    assert limit.limit < before and limit.counts()["dropped"] == 1


async def test_application_limited_load_leaves_the_limit_alone(clock: FakeClock) -> None:
    """With far fewer calls than the limit, latency says nothing about capacity: no change."""
    limit = AdaptiveLimit(initial_limit=100, clock=clock, hooks=[])
    for latency in (0.01, 0.01, 0.05, 0.05):
        async with anyio.create_task_group() as tg:
            tg.start_soon(limit.call, clock.sleep, latency)
            await clock.wait_for_sleepers(1)
            clock.advance(latency)
    assert limit.limit == 100


async def test_changes_are_reported_and_exported(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Moves of a tenth or more are events (logged); the limit and calls are metrics."""
    recorder = Recorder()
    limit = AdaptiveLimit(
        initial_limit=10, name="search", clock=clock, hooks=[recorder, PrometheusHook(registry)]
    )
    await rounds(limit, clock, 0.01, 8)
    changes = recorder.of(AdaptiveLimitChanged)
    assert changes and changes[0].old_limit == 10 and changes[-1].new_limit == limit.limit
    assert changes[0].log_fields()[1] == "adaptive_limit_changed"
    text = generate_latest(registry).decode()
    assert f'veritas_adaptive_limit{{name="search"}} {float(limit.limit)}' in text
    assert 'veritas_adaptive_calls_total{name="search",outcome="success"}' in text
    [line] = [x for x in text.splitlines() if x.startswith("veritas_adaptive_min_rtt_seconds{")]
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(0.01)


async def test_pipeline_step(clock: FakeClock) -> None:
    """In a pipeline the adaptive limit sits inside the rate limiter, outside the bulkhead."""
    limit = AdaptiveLimit(clock=clock, hooks=[])
    pipeline = Pipeline(adaptive_limit=limit, bulkhead=5)
    assert pipeline.describe() == ["adaptive_limit", "bulkhead"]
    assert pipeline.adaptive_limit is limit

    async def answer() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    assert await pipeline.call(answer) == 42


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_limit": 0}, "initial_limit must be >= 1"),
        ({"min_limit": 0}, "min_limit must be >= 1"),
        ({"max_limit": -3}, "max_limit must be >= 1"),
        ({"min_limit": 10, "max_limit": 5}, r"max_limit must be >= min_limit \(10\)"),
        ({"initial_limit": 500, "max_limit": 100}, "initial_limit must be between"),
        ({"smoothing": 0}, "smoothing must be > 0 and <= 1"),
        ({"smoothing": 1.5}, "smoothing must be > 0 and <= 1"),
        ({"algorithm": "aimd"}, "algorithm must be 'vegas' or 'gradient'"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    """Out-of-range settings raise ValueError naming the parameter and the range."""
    with pytest.raises(ValueError, match=message):
        AdaptiveLimit(**kwargs)


async def test_a_dependency_slower_for_good_gets_a_new_baseline(clock: FakeClock) -> None:
    """Vegas re-learns its no-load latency: after a lasting slowdown the limit comes back up."""
    limit = AdaptiveLimit(initial_limit=10, max_limit=100, clock=clock, hooks=[])
    await rounds(limit, clock, 0.010, 40)
    grown = limit.limit
    await rounds(limit, clock, 0.050, 10)
    shrunk = limit.limit
    assert shrunk < grown
    await rounds(limit, clock, 0.050, 120)  # the new normal
    assert limit.baseline == pytest.approx(0.050)
    assert limit.limit > shrunk
