"""Composition of policies, under asyncio and trio, with a fake clock for retries and breakers.

Timeouts follow the event loop's clock, so the tests that need one to expire use 50 ms limits on
calls that never finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import generate_latest

from veritas_resilience import (
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    FallbackChain,
    PrometheusHook,
    ResilienceTimeoutError,
    ServiceUnavailableError,
    StaleCache,
    track_fallbacks,
)
from veritas_resilience.limits import Bulkhead, Timeout
from veritas_resilience.pipeline import ORDER, Pipeline
from veritas_resilience.retry import Retry
from veritas_resilience.testing import FakeClock

pytestmark = pytest.mark.anyio

SHORT = 0.05

_LAYER_ATTRIBUTES = {
    "fallback": "fallback",
    "retry": "retry",
    "breaker": "circuit_breaker",
    "bulkhead": "bulkhead",
    "timeout": "timeout",
}


def nesting(wrapper: Callable[..., Any]) -> list[str]:
    """The policies actually wrapped around a function, outermost first.

    Every policy's wrapper is made with functools.wraps (which copies the inner wrapper's
    attributes and sets __wrapped__) and then marks itself with one attribute; the attribute each
    layer adds is the one its inner layer lacks.
    """
    layers = []
    current: Any = wrapper
    while hasattr(current, "__wrapped__"):
        inner = current.__wrapped__
        added = set(vars(current)) - set(vars(inner)) - {"__wrapped__", "pipeline"}
        layers += [_LAYER_ATTRIBUTES[a] for a in sorted(added) if a in _LAYER_ATTRIBUTES]
        current = inner
    return layers


async def never() -> None:
    await anyio.Event().wait()


@pytest.fixture
def auto_clock() -> FakeClock:
    """A fake clock whose sleeps advance it at once."""
    return FakeClock(1000.0, auto_advance=True)


def full_pipeline(clock: FakeClock, **overrides: Any) -> Pipeline:
    async def degraded(*args: Any) -> str:
        return "degraded"

    options: dict[str, Any] = {
        "name": "orders",
        "fallback": FallbackChain(degraded, name="orders", hooks=[]),
        "retry": Retry(on=(ConnectionError, TimeoutError), attempts=3, clock=clock, hooks=[]),
        "breaker": CircuitBreaker(name="orders-db", failure_threshold=10, clock=clock, hooks=[]),
        "bulkhead": Bulkhead(2, name="orders", hooks=[]),
        "timeout": Timeout(SHORT, name="orders", hooks=[]),
    }
    options.update(overrides)
    return Pipeline(**options)


async def test_description_lists_policies_in_the_fixed_order(auto_clock: FakeClock) -> None:
    """describe() is always fallback, retry, circuit_breaker, bulkhead, timeout (those present)."""
    classic = ["fallback", "retry", "circuit_breaker", "bulkhead", "timeout"]
    assert full_pipeline(auto_clock).describe() == [kind for kind in ORDER if kind in classic]
    partial = Pipeline(timeout=1.0, retry=Retry(on=OSError, hooks=[]))
    assert partial.describe() == ["retry", "timeout"]
    assert "retry" in repr(partial) and "timeout" in repr(partial)


@pytest.mark.parametrize(
    "present",
    [
        ("fallback", "retry", "breaker", "bulkhead", "timeout"),
        ("retry", "breaker", "timeout"),
        ("fallback", "timeout"),
        ("breaker", "bulkhead"),
    ],
)
async def test_actual_nesting_matches_the_description(
    auto_clock: FakeClock, present: tuple[str, ...]
) -> None:
    """The wrappers really nest in the order describe() reports."""
    everything = full_pipeline(auto_clock)
    pipeline = Pipeline(**{kind: getattr(everything, kind) for kind in present})
    wrapped = pipeline(never)
    assert nesting(wrapped) == pipeline.describe()
    assert wrapped.pipeline is pipeline  # type: ignore[attr-defined]


async def test_each_timeout_is_counted_once_by_retry_and_breaker(auto_clock: FakeClock) -> None:
    """Timeout inside retry inside breaker: each expiry is one timeout, one breaker failure, one
    retried attempt; none is seen as a cancellation."""
    breaker = CircuitBreaker(name="db", failure_threshold=10, clock=auto_clock, hooks=[])
    retry = Retry(on=TimeoutError, attempts=3, clock=auto_clock, hooks=[])
    timeout = Timeout(SHORT, name="db", hooks=[])
    pipeline = Pipeline(retry=retry, breaker=breaker, timeout=timeout)
    with pytest.raises(ResilienceTimeoutError):
        await pipeline(never)()
    assert timeout.expired == 3
    calls = breaker.snapshot().calls
    assert (calls["failure"], calls["cancelled"], calls["success"]) == (3, 0, 0)
    assert retry.counts()["retried"] == 2
    assert retry.counts()["exhausted"] == 1


async def test_each_timeout_is_counted_once_on_the_fake_clock(clock: FakeClock) -> None:
    """The same with every deadline and backoff on one FakeClock: three timeouts of 2 s each,
    three breaker failures, two retries, nothing cancelled, and no real time spent."""
    breaker = CircuitBreaker(name="db", failure_threshold=10, clock=clock, hooks=[])
    retry = Retry(on=TimeoutError, attempts=3, clock=clock, hooks=[])
    timeout = Timeout(2.0, name="db", clock=clock, hooks=[])
    pipeline = Pipeline(retry=retry, breaker=breaker, timeout=timeout)
    start = clock.monotonic()
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            await pipeline(never)()
        except ResilienceTimeoutError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        while not outcome:
            await anyio.wait_all_tasks_blocked()
            clock.advance(0.25)
    assert timeout.expired == 3
    calls = breaker.snapshot().calls
    assert (calls["failure"], calls["cancelled"], calls["success"]) == (3, 0, 0)
    assert retry.counts()["retried"] == 2
    # Three deadlines of 2 s plus the backoff waits, each rounded up to the 0.25 s steps.
    least = 3 * 2.0 + sum(clock.slept)
    assert least <= clock.monotonic() - start <= least + 5 * 0.25


async def test_fallback_answers_only_after_the_retries_give_up(auto_clock: FakeClock) -> None:
    """The fallback is outermost: it runs once, after every attempt has failed."""
    attempts = 0

    async def flaky(order_id: int) -> str:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("db down")

    pipeline = full_pipeline(auto_clock)
    with track_fallbacks() as served:
        assert await pipeline(flaky)(7) == "degraded"
    assert attempts == 3
    assert served.step == "degraded"
    assert pipeline.breaker is not None
    assert pipeline.breaker.snapshot().calls["failure"] == 3


async def test_open_breaker_stops_retries_and_never_touches_the_bulkhead(
    auto_clock: FakeClock,
) -> None:
    """The breaker wraps the bulkhead and sits inside the retry: when open, it rejects at once."""
    breaker = CircuitBreaker(name="db", failure_threshold=1, reset_timeout=60, clock=auto_clock)
    breaker.isolate()
    bulkhead = Bulkhead(1, hooks=[])
    retry = Retry(on=ConnectionError, clock=auto_clock, hooks=[])
    pipeline = Pipeline(retry=retry, breaker=breaker, bulkhead=bulkhead)
    with pytest.raises(CircuitOpenError):
        await pipeline(never)()
    assert auto_clock.slept == []
    assert (bulkhead.in_use, bulkhead.rejected) == (0, 0)
    assert breaker.state is CircuitState.FORCED_OPEN


async def test_bulkhead_wait_is_not_charged_to_the_timeout(auto_clock: FakeClock) -> None:
    """The timeout is inside the bulkhead: queueing for a slot does not eat the call's time."""
    bulkhead = Bulkhead(1, max_queue=1, hooks=[])
    pipeline = Pipeline(bulkhead=bulkhead, timeout=Timeout(SHORT * 4, hooks=[]))
    gate = anyio.Event()
    results: list[str] = []

    async def quick() -> str:
        await anyio.sleep(SHORT)  # alone it fits the timeout easily...
        return "done"

    async def holder() -> None:
        await bulkhead.call(gate.wait)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        while bulkhead.in_use == 0:
            await anyio.lowlevel.checkpoint()

        async def queued() -> None:
            results.append(await pipeline(quick)())

        tg.start_soon(queued)
        await anyio.sleep(SHORT * 5)  # ...and waiting longer than it in the queue is not counted
        gate.set()
    assert results == ["done"]


async def test_cancellation_passes_through_every_policy_and_leaks_nothing(
    auto_clock: FakeClock,
) -> None:
    """A cancelled call is not retried, not a breaker failure, not a fallback, not a timeout, and
    its bulkhead slot comes back."""
    degraded_calls = 0

    async def degraded(*args: Any) -> str:
        nonlocal degraded_calls
        degraded_calls += 1
        return "degraded"

    pipeline = full_pipeline(
        auto_clock,
        fallback=FallbackChain(degraded, hooks=[]),
        timeout=Timeout(5, hooks=[]),
    )
    started = 0

    async def hangs() -> None:
        nonlocal started
        started += 1
        await never()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline(hangs))
            while started == 0:
                await anyio.lowlevel.checkpoint()
            scope.cancel()
    assert scope.cancelled_caught
    assert started == 1
    assert degraded_calls == 0
    assert pipeline.bulkhead is not None and pipeline.bulkhead.in_use == 0
    assert pipeline.timeout is not None and pipeline.timeout.expired == 0
    assert pipeline.retry is not None and sum(pipeline.retry.counts().values()) == 0
    assert pipeline.breaker is not None
    calls = pipeline.breaker.snapshot().calls
    assert (calls["cancelled"], calls["failure"]) == (1, 0)
    assert pipeline.fallback is not None
    assert pipeline.fallback.counts()["primary"]["failure"] == 0


# asyncio only: Task.cancel() is asyncio's own API; trio is covered by the cancel-scope test
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancel_passes_through_the_pipeline(auto_clock: FakeClock) -> None:
    """asyncio's Task.cancel() on a pipelined call ends it as cancelled, leaking nothing."""
    pipeline = full_pipeline(auto_clock, timeout=Timeout(5, hooks=[]))
    task = asyncio.ensure_future(pipeline(never)())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pipeline.bulkhead is not None and pipeline.bulkhead.in_use == 0
    assert pipeline.breaker is not None
    assert pipeline.breaker.snapshot().calls["cancelled"] == 1


async def test_all_failing_pipeline_raises_service_unavailable(auto_clock: FakeClock) -> None:
    """When the fallback fails too, the caller gets ServiceUnavailableError with both causes."""

    async def degraded(*args: Any) -> str:
        raise KeyError("nothing cached")

    pipeline = full_pipeline(auto_clock, fallback=FallbackChain(degraded, hooks=[]))
    with pytest.raises(ServiceUnavailableError) as info:
        await pipeline(never)()
    assert [type(e) for e in info.value.errors] == [ResilienceTimeoutError, KeyError]


async def test_shorthands_build_policies_named_after_the_pipeline() -> None:
    """timeout=, bulkhead= and fallback=[...] build policies that carry the pipeline's name."""

    async def default(*args: Any) -> str:
        return "d"

    pipeline = Pipeline(name="catalog", fallback=[default], bulkhead=3, timeout=1.5)
    assert pipeline.fallback is not None and pipeline.fallback.name == "catalog"
    assert pipeline.bulkhead is not None and pipeline.bulkhead.max_concurrent == 3
    assert pipeline.timeout is not None and pipeline.timeout.seconds == 1.5
    assert pipeline.bulkhead.name == pipeline.timeout.name == "catalog"

    async def fails() -> str:
        raise BulkheadFullError("x", 1)

    assert await pipeline(fails)() == "d"


async def test_unnamed_parts_of_a_named_pipeline_take_its_name(
    prometheus: PrometheusHook, auto_clock: FakeClock
) -> None:
    """breaker-N, retry-N, fallback-N and cache-N given to a named pipeline are renamed to it."""
    cache = StaleCache(hooks=[prometheus])
    breaker = CircuitBreaker(failure_threshold=1, clock=auto_clock, hooks=[prometheus])
    retry = Retry(on=OSError, attempts=2, clock=auto_clock, hooks=[prometheus])
    chain = FallbackChain(cache, hooks=[prometheus])
    assert breaker.name.startswith("breaker-") and retry.name.startswith("retry-")
    pipeline = Pipeline(name="checkout", fallback=chain, retry=retry, breaker=breaker)
    assert [p.name for _, p in pipeline.policies] == ["checkout"] * 3
    assert cache.name == "checkout"

    async def fails() -> None:
        raise OSError("down")

    with pytest.raises(ServiceUnavailableError) as info:
        await pipeline(fails)()
    assert info.value.name == "checkout"
    assert info.value.steps == ("primary", "checkout")
    assert isinstance(info.value.errors[0], CircuitOpenError)
    assert info.value.errors[0].name == "checkout"
    text = generate_latest(prometheus.registry).decode()
    assert 'veritas_circuit_breaker_state{name="checkout",state="open"} 1.0' in text
    assert 'veritas_retry_attempts_total{name="checkout",outcome="retried"} 1.0' in text
    assert "breaker-" not in text and "retry-" not in text


def test_named_parts_and_unnamed_pipelines_keep_their_names() -> None:
    """A name the user gave is never replaced, and an unnamed pipeline renames nothing."""
    named = CircuitBreaker(name="orders-db", hooks=[])
    Pipeline(name="orders", breaker=named)
    assert named.name == "orders-db"
    unnamed = Retry(on=OSError, hooks=[])
    before = unnamed.name
    pipeline = Pipeline(retry=unnamed)
    assert unnamed.name == before and pipeline.name.startswith("pipeline-")


async def test_one_pipeline_guards_several_functions_with_shared_policies(
    auto_clock: FakeClock,
) -> None:
    """Functions decorated by one pipeline share its breaker, and call() caches its wrapper."""
    breaker = CircuitBreaker(name="db", failure_threshold=2, clock=auto_clock, hooks=[])
    pipeline = Pipeline(breaker=breaker)

    async def a() -> None:
        raise ConnectionError

    async def b() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await pipeline(a)()
    with pytest.raises(ConnectionError):
        await pipeline.call(b)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await pipeline.call(b)
    assert len(pipeline._wrapped) == 1


def test_pipeline_rejects_bad_configuration() -> None:
    """Wrong policy types, bad shorthands and an empty pipeline raise at construction."""
    with pytest.raises(ValueError, match="policy"):
        Pipeline()
    with pytest.raises(TypeError, match="retry"):
        Pipeline(retry=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="breaker"):
        Pipeline(breaker="db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fallback"):
        Pipeline(fallback="cached")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^timeout must be .* > 0"):
        Pipeline(timeout=0)
    with pytest.raises(ValueError, match=r"^timeout must be .* > 0, got -1"):
        Pipeline(timeout=-1)
    with pytest.raises(ValueError, match=r"^bulkhead must be >= 1, got 0"):
        Pipeline(bulkhead=0)
    with pytest.raises(TypeError, match=r"^bulkhead must be an int"):
        Pipeline(bulkhead=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async"):
        Pipeline(timeout=1)(lambda: None)  # type: ignore[arg-type, return-value]
