"""In-process injectors: exact counts under a seeded source, switches, cancellation, pipelines."""

from __future__ import annotations

import random

import anyio
import pytest

from veritas_resilience import CircuitBreaker, CircuitOpenError, Pipeline
from veritas_resilience.chaos import (
    BehaviourInjector,
    ChaosInjected,
    FaultInjector,
    InjectedFaultError,
    LatencyInjector,
    OutcomeInjector,
)
from veritas_resilience.retry import Retry
from veritas_resilience.testing import FakeClock, RecordingHook

pytestmark = pytest.mark.anyio

CALLS = 2000
SEED = 20261203


def expected_hits(seed: int, rate: float, calls: int = CALLS) -> list[int]:
    """The call indices a Random(seed) chooses at this rate, one draw per call."""
    rng = random.Random(seed)
    return [i for i in range(calls) if rng.random() < rate]


async def source(i: int) -> int:
    return i


async def test_fault_injector_injects_exactly_the_seeded_calls() -> None:
    """With a seeded source the injected calls are exactly those the seed picks (one draw each)."""
    injector = FaultInjector(injection_rate=0.1, random=random.Random(SEED), hooks=[])
    wrapped = injector(source)
    hit = []
    for i in range(CALLS):
        try:
            await wrapped(i)
        except InjectedFaultError:
            hit.append(i)
    assert hit == expected_hits(SEED, 0.1)
    assert injector.injected == len(hit) and injector.calls == CALLS
    assert 140 < len(hit) < 260  # about 10 %, far from 0 and from all


async def test_two_injectors_with_one_seed_inject_into_the_same_calls() -> None:
    """Seeded runs are reproducible across injector kinds."""
    outcome = OutcomeInjector(-1, injection_rate=0.3, random=random.Random(7), hooks=[])
    clock = FakeClock(auto_advance=True)
    latency = LatencyInjector(0.25, injection_rate=0.3, random=random.Random(7), clock=clock)
    faked = [i for i in range(500) if await outcome.call(source, i) == -1]
    for i in range(500):
        await latency.call(source, i)
    assert faked == expected_hits(7, 0.3, 500)
    assert clock.slept == [0.25] * len(faked)


async def test_disabled_injector_injects_nothing_and_draws_nothing() -> None:
    """enabled=False (or a callable saying so) skips injection without consuming the source."""
    draws = []

    def rng() -> float:
        draws.append(1)
        return 0.0

    flag = {"on": False}
    injector = FaultInjector(injection_rate=1.0, random=rng, enabled=lambda: flag["on"], hooks=[])
    for i in range(10):
        assert await injector.call(source, i) == i
    assert draws == [] and injector.injected == 0 and injector.calls == 10
    flag["on"] = True
    with pytest.raises(InjectedFaultError):
        await injector.call(source, 0)
    injector.enabled = False
    assert await injector.call(source, 1) == 1


async def test_rate_generator_and_fault_generator() -> None:
    """A callable rate is asked at every call; a fault generator returning None means no fault."""
    rates = iter([1.0, 0.0, 1.0])
    faults = iter([KeyError("a"), None])
    injector = FaultInjector(
        lambda: next(faults), injection_rate=lambda: next(rates), random=lambda: 0.5, hooks=[]
    )
    with pytest.raises(KeyError):
        await injector.call(source, 0)
    assert await injector.call(source, 1) == 1  # rate 0
    assert await injector.call(source, 2) == 2  # rate 1, but the generator chose no fault


async def test_latency_injection_is_cancellable() -> None:
    """A cancelled call ends its injected wait at once and the call is never made."""
    made = []

    async def record(i: int) -> int:
        made.append(i)
        return i

    injector = LatencyInjector(30.0, injection_rate=1.0, hooks=[])
    with anyio.move_on_after(0.05) as scope:
        await injector.call(record, 1)
    assert scope.cancelled_caught and made == []


async def test_outcome_factory_and_behaviour_get_the_call_arguments() -> None:
    """The outcome factory answers for the call; a behaviour runs before it, with its arguments."""
    seen = []
    outcome = OutcomeInjector(factory=lambda i: i * 100, injection_rate=1.0, hooks=[])
    assert await outcome.call(source, 3) == 300

    async def side_effect(i: int) -> None:
        seen.append(i)

    behaviour = BehaviourInjector(side_effect, injection_rate=1.0, hooks=[])
    assert await behaviour.call(source, 4) == 4
    assert seen == [4]


async def test_events_report_each_injection() -> None:
    """Each injection is one ChaosInjected event naming the injector and what it did."""
    hook = RecordingHook()
    injector = LatencyInjector(
        0.5, injection_rate=1.0, clock=FakeClock(auto_advance=True), name="slow-db", hooks=[hook]
    )
    await injector.call(source, 1)
    (event,) = hook.of(ChaosInjected)
    assert (event.name, event.injector, event.delay) == ("slow-db", "latency", 0.5)


async def test_pipeline_policies_react_to_injected_faults() -> None:
    """As the innermost pipeline step, injected faults are retried and counted by the breaker."""
    draws = iter([0.0, 0.0, 0.9])  # inject, inject, pass
    retried = Pipeline(
        retry=Retry(on=ConnectionError, attempts=3, wait_initial=0, wait_jitter=0),
        chaos=[FaultInjector(injection_rate=0.5, random=lambda: next(draws), hooks=[])],
    )
    assert retried.describe() == ["retry", "chaos"]
    assert await retried.call(source, 9) == 9

    breaker = CircuitBreaker(name="chaos-breaker", failure_threshold=2, reset_timeout=60, hooks=[])
    guarded = Pipeline(breaker=breaker, chaos=FaultInjector(injection_rate=1.0, hooks=[]))
    for _ in range(2):
        with pytest.raises(InjectedFaultError):
            await guarded.call(source, 1)
    with pytest.raises(CircuitOpenError):
        await guarded.call(source, 1)


def test_bad_settings_are_rejected_with_the_parameter_named() -> None:
    """injection_rate outside 0..1, a negative latency or a bad fault fail at construction."""
    with pytest.raises(ValueError, match="injection_rate"):
        FaultInjector(injection_rate=1.5)
    with pytest.raises(ValueError, match="latency"):
        LatencyInjector(-1)
    with pytest.raises(TypeError, match="fault"):
        FaultInjector(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chaos"):
        Pipeline(chaos=[object()])  # type: ignore[list-item]


async def test_injections_are_counted_for_prometheus() -> None:
    """veritas_chaos_injections_total counts each injector's injections, by name and kind."""
    from prometheus_client import CollectorRegistry

    from veritas_resilience import PrometheusHook

    registry = CollectorRegistry()
    injector = OutcomeInjector(
        0, injection_rate=1.0, name="fake-zero", hooks=[PrometheusHook(registry)]
    )
    for i in range(3):
        await injector.call(source, i)
    labels = {"name": "fake-zero", "kind": "outcome"}
    assert registry.get_sample_value("veritas_chaos_injections_total", labels) == 3.0
