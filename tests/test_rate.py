"""RateLimiter: token bucket and GCRA on a FakeClock under asyncio and trio; shared via Redis."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import (
    Pipeline,
    PrometheusHook,
    RateLimitedError,
    RateLimiter,
    RateLimitRejected,
    RateLimitStoreFailed,
    RateLimitStoreRecovered,
    ResilienceError,
)
from veritas_resilience.testing import FakeClock, LocalRedisSentinel
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["gcra", "token_bucket"])
def algorithm(request: pytest.FixtureRequest) -> Any:
    """Each local test runs on both algorithms: they must give the same answers."""
    return request.param


def metric(registry: CollectorRegistry, line_start: str) -> float:
    """The value of the one exposition line starting with ``line_start``."""
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


async def op(x: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return x


def degraded(limiter: RateLimiter) -> bool:
    """Read the flag through a call, so the type checker does not narrow it between reads."""
    return limiter.degraded


async def test_burst_then_exactly_rate(clock: FakeClock, algorithm: Any) -> None:
    """A full bucket allows `burst` at once, then one permit per 1/rate seconds, exactly."""
    limiter = RateLimiter(10, burst=5, algorithm=algorithm, clock=clock, hooks=[])
    assert [limiter.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire()
    assert info.value.retry_after == pytest.approx(0.1)
    assert isinstance(info.value, ResilienceError) and "retry after 0.100s" in str(info.value)
    clock.advance(0.1)
    assert limiter.try_acquire() and not limiter.try_acquire()
    clock.advance(10.0)  # a long quiet spell refills the burst, and no more
    assert sum(limiter.try_acquire() for _ in range(20)) == 5
    assert limiter.counts() == {"allowed": 11, "delayed": 0, "rejected": 18, "cancelled": 0}


async def test_long_run_admits_exactly_rate_times_duration(algorithm: Any) -> None:
    """Polling every millisecond for 10 s at 10/s with burst 1 admits exactly 100 calls."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(10, burst=1, algorithm=algorithm, clock=clock, hooks=[])
    allowed = 0
    for _ in range(10_000):
        allowed += limiter.try_acquire()
        clock.advance(0.001)
    assert allowed == 100


async def test_the_decorator_admits_exactly_what_try_acquire_admits(algorithm: Any) -> None:
    """The decorator's inlined path and try_acquire() agree call for call over a long run at
    10/s with burst 3, polled every 7 ms, and both count what they allowed."""
    clock = FakeClock(0.0)
    by_call = RateLimiter(10, burst=3, algorithm=algorithm, clock=clock, hooks=[])
    by_decorator = RateLimiter(10, burst=3, algorithm=algorithm, clock=clock, hooks=[])
    limited = by_decorator(op)
    for step in range(3_000):
        expected = by_call.try_acquire()
        try:
            await limited(step)
            got = True
        except RateLimitedError:
            got = False
        assert got == expected, step
        clock.advance(0.007)
    assert by_decorator.counts() == by_call.counts()
    assert by_call.counts()["allowed"] == 3 + 209  # the burst, then 10/s until t = 20.993 s


async def test_decorator_rejects_without_calling(clock: FakeClock, algorithm: Any) -> None:
    """The decorator runs the function while permits last and rejects without running it."""
    hook = Recorder()
    limiter = RateLimiter(2, burst=2, algorithm=algorithm, clock=clock, hooks=[hook])
    calls = 0

    @limiter
    async def work(x: int) -> int:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()
        return x

    assert await work(1) == 1 and await work(2) == 2
    with pytest.raises(RateLimitedError):
        await work(3)
    assert calls == 2
    [event] = hook.of(RateLimitRejected)
    assert event.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert await limiter.call(op, 7) == 7
    assert work.rate_limiter is limiter  # type: ignore[attr-defined]


async def test_permits_weigh_calls(clock: FakeClock, algorithm: Any) -> None:
    """Taking several permits at once counts them all; more than the burst is refused."""
    limiter = RateLimiter(10, burst=5, algorithm=algorithm, clock=clock, hooks=[])
    assert limiter.try_acquire(permits=3)
    assert not limiter.try_acquire(permits=3)
    assert limiter.try_acquire(permits=2)
    with pytest.raises(ValueError, match="permits must be <= burst"):
        limiter.try_acquire(permits=6)


async def test_waits_for_its_turn_up_to_max_wait(clock: FakeClock, algorithm: Any) -> None:
    """With max_wait a call waits exactly its turn; a turn further away than that is refused."""
    limiter = RateLimiter(10, burst=1, algorithm=algorithm, max_wait=0.25, clock=clock, hooks=[])
    await limiter.acquire()
    done: list[float] = []

    async def waiter() -> None:
        await limiter.acquire()
        done.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await clock.wait_for_sleepers(2)
        assert limiter.waiting == 2
        with pytest.raises(RateLimitedError) as info:
            await limiter.acquire()  # the third turn is 0.3 s away
        assert info.value.retry_after == pytest.approx(0.3)
        clock.advance(0.1)
        while not done:
            await anyio.lowlevel.checkpoint()
        clock.advance(0.1)
    assert done == [pytest.approx(1000.1), pytest.approx(1000.2)]
    assert limiter.counts()["delayed"] == 2


async def test_cancelled_waiter_hands_back_only_what_it_took(
    clock: FakeClock, algorithm: Any
) -> None:
    """A cancelled last waiter returns its permit; one with a waiter behind it returns nothing."""
    limiter = RateLimiter(10, burst=1, algorithm=algorithm, max_wait=1.0, clock=clock, hooks=[])
    assert limiter.try_acquire()

    # The last reservation, cancelled: its permit is free again at once for the next caller.
    with anyio.move_on_after(0) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await clock.wait_for_sleepers(1)
            scope.cancel()
    assert limiter.counts()["cancelled"] == 1 and limiter.waiting == 0
    assert not limiter.try_acquire()  # still 0.1 s to go, as before the waiter came
    clock.advance(0.1)
    assert limiter.try_acquire()

    # Two waiters; the first is cancelled. The second was promised the slot after it, so the
    # first's permit is not handed back (that would let a newcomer share the second's slot).
    first = anyio.CancelScope()
    woke: list[float] = []

    async def waiter(scope: anyio.CancelScope | None) -> None:
        if scope is None:
            await limiter.acquire()
            woke.append(clock.monotonic())
        else:
            with scope:
                await limiter.acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, first)
        await clock.wait_for_sleepers(1)
        tg.start_soon(waiter, None)
        await clock.wait_for_sleepers(2)
        first.cancel()
        while clock.sleepers > 1:
            await anyio.lowlevel.checkpoint()
        assert not limiter.try_acquire()
        clock.advance(0.2)
    assert woke == [pytest.approx(1000.3)]
    clock.advance(0.05)
    assert not limiter.try_acquire()  # the lapsed slot was not handed out twice
    assert limiter.counts()["cancelled"] == 2


async def test_keyed_limits_are_separate_and_bounded(
    clock: FakeClock, algorithm: Any, prometheus: PrometheusHook, registry: CollectorRegistry
) -> None:
    """Each key has its own limit; at most max_keys are kept; keys never reach metric labels."""
    limiter = RateLimiter(
        1,
        burst=1,
        algorithm=algorithm,
        key=lambda tenant, *args, **kwargs: tenant,
        max_keys=2,
        name="tenants",
        clock=clock,
        hooks=[prometheus],
    )

    async def handle(tenant: str) -> str:
        return tenant

    limited = limiter(handle)
    assert await limited("acme") == "acme"
    assert await limited("globex") == "globex"
    with pytest.raises(RateLimitedError):
        await limited("acme")
    assert await limited("initech") == "initech"  # a third key: the oldest (globex) is forgotten
    assert limiter.keys == 2
    with pytest.raises(RateLimitedError):
        await limited("initech")
    assert metric(registry, 'veritas_rate_limit_keys{name="tenants"}') == 2
    assert metric(registry, 'veritas_rate_limit_keys_evicted_total{name="tenants"}') == 1
    rejected = 'veritas_rate_limit_calls_total{name="tenants",outcome="rejected"}'
    assert metric(registry, rejected) == 2
    exposition = generate_latest(registry).decode()
    assert "acme" not in exposition and "initech" not in exposition


async def test_pipeline_step(clock: FakeClock) -> None:
    """In a pipeline the rate limiter sits inside the breaker and outside the bulkhead."""
    limiter = RateLimiter(1, burst=1, clock=clock, hooks=[])
    pipeline = Pipeline(rate_limiter=limiter, bulkhead=1, timeout=5)
    assert pipeline.describe() == ["rate_limiter", "bulkhead", "timeout"]
    assert pipeline.rate_limiter is limiter
    assert await pipeline(op)(3) == 3
    with pytest.raises(RateLimitedError):
        await pipeline.call(op, 4)


async def test_rejections_never_count_against_the_breaker(clock: FakeClock) -> None:
    """In a pipeline the limiter sits outside the breaker: being over the rate is not a failure
    of the dependency, so it never opens the breaker."""
    from veritas_resilience import CircuitBreaker, CircuitState

    breaker = CircuitBreaker(name="api", failure_threshold=1, clock=clock, hooks=[])
    limiter = RateLimiter(1, burst=1, clock=clock, hooks=[])
    pipeline = Pipeline(breaker=breaker, rate_limiter=limiter)
    assert pipeline.describe() == ["rate_limiter", "circuit_breaker"]
    assert await pipeline.call(op, 1) == 1
    for _ in range(3):
        with pytest.raises(RateLimitedError):
            await pipeline.call(op, 2)
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, "rate must be a finite number > 0"),
        ({"rate": -5}, "rate must be a finite number > 0"),
        ({"rate": float("inf")}, "rate must be a finite number > 0"),
        ({"rate": 1, "burst": 0}, "burst must be >= 1"),
        ({"rate": 1, "burst": -1}, "burst must be >= 1"),
        ({"rate": 1, "max_wait": -1}, "max_wait must be a finite number of seconds >= 0"),
        ({"rate": 1, "max_keys": 0}, "max_keys must be >= 1"),
        ({"rate": 1, "fallback_share": 0}, "fallback_share must be > 0 and <= 1"),
        ({"rate": 1, "fallback_share": 1.5}, "fallback_share must be > 0 and <= 1"),
        ({"rate": 1, "redis_timeout": 0}, "redis_timeout must be a finite number of seconds > 0"),
        ({"rate": 1, "algorithm": "leaky"}, "algorithm must be 'gcra' or 'token_bucket'"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, Any], message: str) -> None:
    """Out-of-range settings raise ValueError naming the parameter and the range."""
    with pytest.raises(ValueError, match=message):
        RateLimiter(**kwargs)


async def test_default_burst_is_one_second(clock: FakeClock) -> None:
    """Without burst=, a full bucket holds one second's worth of permits (at least one)."""
    assert RateLimiter(7.5, clock=clock, hooks=[]).burst == 8
    assert RateLimiter(0.2, clock=clock, hooks=[]).burst == 1


# -- Redis --------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_limit_is_shared_by_every_instance(redis_client: Any) -> None:
    """Two limiters of one name (two processes) share one limit; keys are hashed in Redis."""
    a = RateLimiter(0.5, burst=5, redis=redis_client, name="shared", hooks=[])
    b = RateLimiter(0.5, burst=5, redis=redis_client, name="shared", hooks=[])
    allowed = 0
    for limiter in (a, b) * 5:
        try:
            await limiter.acquire()
            allowed += 1
        except RateLimitedError as exc:
            assert 0 < exc.retry_after <= 2.0
    assert allowed == 5
    assert not a.degraded and not b.degraded
    keyed = RateLimiter(
        0.5, burst=1, redis=redis_client, name="per-user", key=lambda user: user, hooks=[]
    )
    await keyed.call(op, "jane.doe@example.com")
    await keyed.call(op, "john@example.com")
    with pytest.raises(RateLimitedError):
        await keyed.call(op, "john@example.com")
    names = sorted(k.decode() for k in await redis_client.keys("veritas:rate:per-user*"))
    assert len(names) == 2 and not any("example" in name for name in names)
    ttl = await redis_client.pttl(names[0])
    assert 0 < ttl <= 2001  # idle state expires by itself


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_limit_holds_under_concurrent_callers(redis_client: Any) -> None:
    """Ten tasks over two limiter instances, asking as fast as they can: together they are
    never allowed more than burst + rate * elapsed, measured around the whole run."""
    import time

    limiters = [
        RateLimiter(20, burst=5, redis=redis_client, name="crowd", redis_timeout=5, hooks=[])
        for _ in range(2)
    ]
    allowed = 0
    started = time.monotonic()
    stop = started + 0.5

    async def caller(limiter: RateLimiter) -> None:
        nonlocal allowed
        while time.monotonic() < stop:
            try:
                await limiter.acquire()
                allowed += 1
            except RateLimitedError:
                continue  # acquire() waited on Redis: no busy loop

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(caller, limiters[i % 2])
    elapsed = time.monotonic() - started
    assert 5 <= allowed <= 5 + 20 * elapsed + 1
    assert not any(limiter.degraded for limiter in limiters)


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_waiter_cancelled_hands_its_reservation_back(redis_client: Any) -> None:
    """A cancelled waiter's Redis reservation is handed back when it is still the newest."""
    limiter = RateLimiter(1, burst=1, max_wait=5, redis=redis_client, name="w", hooks=[])
    await limiter.acquire()
    before = int(await redis_client.get("veritas:rate:w"))
    with anyio.move_on_after(0.05):
        await limiter.acquire()  # reserves the slot one second away, then is cancelled
    assert int(await redis_client.get("veritas:rate:w")) == before
    assert limiter.counts()["cancelled"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_unreachable_redis_falls_back_to_the_local_share(
    registry: CollectorRegistry, prometheus: PrometheusHook, redis_sentinel: LocalRedisSentinel
) -> None:
    """A Redis that stops answering costs one bounded wait, then the local share applies and
    is reported; once Redis answers again the shared limit is back, and that is reported too."""
    import time

    from redis.asyncio import Redis

    from veritas_resilience.testing import FaultProxy

    hook = Recorder()
    clock = FakeClock(1000.0)
    with FaultProxy(*redis_sentinel.master) as proxy:
        client = Redis(host=proxy.host, port=proxy.port, db=11)
        await client.flushdb()
        limiter = RateLimiter(
            100,
            burst=10,
            redis=client,
            fallback_share=0.2,
            redis_timeout=0.2,
            name="degraded",
            clock=clock,
            hooks=[hook, prometheus],
        )
        await limiter.acquire()
        assert not limiter.degraded
        proxy.freeze()  # the open connection hangs: no answer, no error
        started = time.monotonic()
        results = []
        for _ in range(3):
            try:
                await limiter.acquire()
                results.append(True)
            except RateLimitedError:
                results.append(False)
        assert time.monotonic() - started < 2.0  # one timeout of 0.2 s, generous margin
        assert results == [True, True, False]  # the local share: 20/s, burst 2
        assert degraded(limiter)
        [failed] = hook.of(RateLimitStoreFailed)
        assert failed.local_rate == pytest.approx(20.0)
        assert isinstance(failed.error, TimeoutError) and "0.2s" in str(failed.error)
        assert metric(registry, 'veritas_rate_limit_degraded{name="degraded"}') == 1
        assert metric(registry, 'veritas_rate_limit_store_errors_total{name="degraded"}') == 1

        proxy.heal()
        clock.advance(1.0)  # fallback_retry: Redis is asked again
        await limiter.acquire()
        assert not degraded(limiter)
        [recovered] = hook.of(RateLimitStoreRecovered)
        assert recovered.degraded_for == pytest.approx(1.0)
        assert metric(registry, 'veritas_rate_limit_degraded{name="degraded"}') == 0
        await client.aclose()


async def test_logged_events_of_the_policies_say_what_happened() -> None:
    """The structlog hook logs a Redis fallback and recovery, a spent hedge budget and a moved
    adaptive limit, with names and numbers but no key or argument."""
    from _log_capture import LogCapture

    from veritas_resilience import (
        AdaptiveLimitChanged,
        HedgeBudgetExhausted,
        StructlogHook,
    )

    log = LogCapture()
    hook = StructlogHook(log)
    for event in (
        RateLimitStoreFailed(name="api", error=TimeoutError("no answer"), local_rate=10.0),
        RateLimitStoreRecovered(name="api", degraded_for=2.5),
        HedgeBudgetExhausted(name="reads", budget_percent=5.0),
        AdaptiveLimitChanged(name="search", old_limit=100, new_limit=20, rtt=0.25, baseline=0.05),
        RateLimitRejected(name="api", retry_after=0.1),
    ):
        if type(event) in hook.event_types:
            hook.on_event(event)
    assert log.lines == [
        (
            "warning",
            "rate_limit_store_unavailable",
            {
                "rate_limiter": "api",
                "local_rate": 10.0,
                "error_type": "TimeoutError",
                "error": "no answer",
            },
        ),
        ("info", "rate_limit_store_recovered", {"rate_limiter": "api", "degraded_for": 2.5}),
        ("warning", "hedge_budget_exhausted", {"hedge": "reads", "budget_percent": 5.0}),
        (
            "info",
            "adaptive_limit_changed",
            {
                "adaptive_limit": "search",
                "old_limit": 100,
                "new_limit": 20,
                "rtt": 0.25,
                "baseline": 0.05,
            },
        ),
    ]


@given(
    rate=st.sampled_from([0.5, 1, 3, 10, 250]),
    burst=st.integers(1, 8),
    steps=st.lists(
        st.tuples(st.floats(0, 2, allow_nan=False), st.integers(1, 8)), min_size=1, max_size=60
    ),
)
@settings(max_examples=200, deadline=None)
def test_both_algorithms_give_the_same_answers_and_never_exceed_the_limit(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    """GCRA and the token bucket agree on every request, and in any window the permits granted
    are at most burst + rate * window (the definition of the limit)."""
    clocks = [FakeClock(0.0), FakeClock(0.0)]
    limiters = [
        RateLimiter(rate, burst=burst, algorithm="gcra", clock=clocks[0], hooks=[]),
        RateLimiter(rate, burst=burst, algorithm="token_bucket", clock=clocks[1], hooks=[]),
    ]
    granted: list[tuple[float, int]] = []
    for wait, permits in steps:
        permits = min(permits, burst)
        for clock in clocks:
            clock.advance(wait)
        answers = [limiter.try_acquire(permits=permits) for limiter in limiters]
        assert answers[0] == answers[1]
        if answers[0]:
            granted.append((clocks[0].monotonic(), permits))
    for i, (start, _) in enumerate(granted):
        total = 0
        for at, permits in granted[i:]:
            total += permits
            assert total <= burst + rate * (at - start) + 1e-6
