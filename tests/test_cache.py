"""The stale-if-error cache: in memory under asyncio and trio with a fake clock, and in a real
Redis (a private redis-server on a free loopback port) under asyncio."""

from __future__ import annotations

import traceback
from collections.abc import Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from veritas_resilience import (
    CacheMissError,
    FallbackChain,
    MemoryStaleStore,
    RedisStaleStore,
    ServiceUnavailableError,
    StaleCache,
    StaleStoreFailed,
    StaleValueServed,
    StaleWritesDropped,
    fallback,
    track_fallbacks,
)
from veritas_resilience.pipeline import Pipeline
from veritas_resilience.testing import FakeClock, FaultProxyFactory, LocalRedisSentinel
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.anyio


class Source:
    """A dependency that can be switched down, and counts its calls."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0
        self.gate: anyio.Event | None = None

    async def fetch(self, item: int, *, lang: str = "en") -> dict[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        if not self.up:
            raise ConnectionError("source down")
        return {"item": item, "lang": lang, "version": self.calls}


async def unavailable(*args: Any, **kwargs: Any) -> Any:
    raise KeyError("no degraded path")


# -- in the chain -------------------------------------------------------------------------------


async def test_serves_stale_within_the_window_and_fails_after_it(clock: FakeClock) -> None:
    """The last good value is served while younger than max_staleness; after, the chain fails."""
    source = Source()
    cache = StaleCache(name="items", max_staleness=60, clock=clock, hooks=[])
    get_item = fallback(unavailable, cache, name="items", hooks=[])(source.fetch)
    assert (await get_item(1))["version"] == 1
    source.up = False
    clock.advance(59)
    with track_fallbacks() as served:
        assert (await get_item(1))["version"] == 1
    assert served.step == "items"
    assert served.age == pytest.approx(59)
    clock.advance(1.5)
    with pytest.raises(ServiceUnavailableError) as info:
        await get_item(1)
    assert info.value.steps == ("primary", "unavailable", "items")
    miss = info.value.errors[-1]
    assert isinstance(miss, CacheMissError)
    assert cache.counts()["stale"] == 1


async def test_each_argument_set_has_its_own_value(clock: FakeClock) -> None:
    """Values are keyed by positional and keyword arguments; an unseen key is a miss."""
    source = Source()
    cache = StaleCache(max_staleness=60, clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    await get_item(1)
    await get_item(1, lang="fr")
    source.up = False
    assert (await get_item(1))["lang"] == "en"
    assert (await get_item(1, lang="fr"))["lang"] == "fr"
    with pytest.raises(ServiceUnavailableError) as info:
        await get_item(2)
    assert isinstance(info.value.errors[-1], CacheMissError)
    assert info.value.errors[-1].reason == "missing"


async def test_key_function_and_unhashable_arguments(clock: FakeClock) -> None:
    """A key function maps arguments to the key; unhashable arguments without one fail early."""
    calls = 0

    async def search(query: dict[str, str]) -> str:
        nonlocal calls
        calls += 1
        return query["q"]

    cache = StaleCache(key=lambda query: query["q"], clock=clock, hooks=[])
    assert await FallbackChain(cache, hooks=[])(search)({"q": "soup"}) == "soup"
    plain = FallbackChain(StaleCache(clock=clock, hooks=[]), hooks=[])(search)
    with pytest.raises(TypeError, match="key="):
        await plain({"q": "soup"})
    assert calls == 1  # the unhashable call never reached the function


async def test_memory_store_is_bounded(clock: FakeClock) -> None:
    """The in-memory store keeps at most max_size values, dropping the oldest written."""
    source = Source()
    cache = StaleCache(max_size=2, clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    for item in (1, 2, 3):
        await get_item(item)
    assert len(cache.store) == 2  # type: ignore[arg-type]
    source.up = False
    assert (await get_item(3))["item"] == 3
    assert (await get_item(2))["item"] == 2
    with pytest.raises(ServiceUnavailableError):
        await get_item(1)


async def test_concurrent_misses_are_coalesced_into_one_call(clock: FakeClock) -> None:
    """100 concurrent calls for one cold key make one call; all get its result."""
    source = Source()
    source.gate = anyio.Event()
    cache = StaleCache(name="hot", clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    results: list[dict[str, Any]] = []

    async def one() -> None:
        results.append(await get_item(7))

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(one)
        while cache.counts()["coalesced"] < 99:
            await anyio.lowlevel.checkpoint()
        source.gate.set()
    assert source.calls == 1
    assert len(results) == 100
    assert all(r is results[0] for r in results)
    assert cache.counts()["stored"] == 1


async def test_coalesced_callers_share_the_error_and_fall_back_each(clock: FakeClock) -> None:
    """When the one shared call fails, every waiting caller falls back on its own."""
    source = Source()
    source.up = False
    source.gate = anyio.Event()
    degraded_calls = 0

    async def degraded(item: int) -> str:
        nonlocal degraded_calls
        degraded_calls += 1
        return "degraded"

    cache = StaleCache(clock=clock, hooks=[])
    get_item = FallbackChain(degraded, cache, hooks=[])(source.fetch)
    results: list[Any] = []

    async def one() -> None:
        results.append(await get_item(7))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
        while cache.counts()["coalesced"] < 9:
            await anyio.lowlevel.checkpoint()
        source.gate.set()
    assert source.calls == 1
    assert results == ["degraded"] * 10
    assert degraded_calls == 10


async def test_coalesced_failure_gives_each_caller_its_own_short_traceback(
    clock: FakeClock,
) -> None:
    """500 waiters of one failed call: 500 error objects whose tracebacks do not grow."""
    source = Source()
    source.up = False
    source.gate = anyio.Event()
    cache = StaleCache(clock=clock, hooks=[])
    get_item = fallback(cache, hooks=[])(source.fetch)
    errors: list[ServiceUnavailableError] = []

    async def one() -> None:
        try:
            await get_item(7)
        except ServiceUnavailableError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(one)
        while cache.counts()["coalesced"] < 499:
            await anyio.lowlevel.checkpoint()
        source.gate.set()
    assert source.calls == 1
    primaries = [e.errors[0] for e in errors]
    assert len(primaries) == 500
    assert len({id(e) for e in primaries}) == 500
    assert all(isinstance(e, ConnectionError) and str(e) == "source down" for e in primaries)
    frames = [len(traceback.extract_tb(e.__traceback__)) for e in primaries]
    assert max(frames) <= min(frames) + 2  # 1,001 frames in the last one when they were shared
    assert max(len("".join(traceback.format_exception(e))) for e in errors) < 20_000


async def test_background_writes_are_bounded_and_drops_are_counted_and_reported(
    clock: FakeClock,
) -> None:
    """A store that never answers: calls return at once; writes past the bound are dropped."""
    release = anyio.Event()
    written: list[Hashable] = []

    class StuckStore:
        async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
            return None

        async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
            await release.wait()
            written.append(key)

        async def delete(self, namespace: str, key: Hashable) -> None:
            pass

    hook = Recorder()
    source = Source()
    cache = StaleCache(
        store=StuckStore(), max_pending_writes=2, store_timeout=600, clock=clock, hooks=[hook]
    )
    get_item = fallback(cache, hooks=[])(source.fetch)
    for item in range(5):
        assert (await get_item(item))["item"] == item
    assert cache.pending_writes == 2
    assert cache.counts()["write_dropped"] == 3
    assert [(e.dropped, e.pending) for e in hook.of(StaleWritesDropped)] == [(1, 2)]
    clock.advance(1.0)
    await get_item(5)
    assert [e.dropped for e in hook.of(StaleWritesDropped)] == [1, 3]
    release.set()
    await cache.wait_for_writes()
    assert sorted(written) == [(0,), (1,)]  # type: ignore[type-var]
    assert cache.counts()["stored"] == 2


async def test_awaited_writes_never_fail_a_call_that_succeeded(clock: FakeClock) -> None:
    """writes="await": the store's failure is reported, the call still returns its value."""

    class BrokenStore:
        async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
            return None

        async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
            raise ConnectionError("store down")

        async def delete(self, namespace: str, key: Hashable) -> None:
            pass

    hook = Recorder()
    cache = StaleCache(store=BrokenStore(), writes="await", clock=clock, hooks=[hook])
    assert (await cache(Source().fetch)(1))["item"] == 1
    assert cache.pending_writes == 0
    assert [e.operation for e in hook.of(StaleStoreFailed)] == ["set"]


async def test_a_cancelled_leader_hands_over_to_a_waiting_caller(clock: FakeClock) -> None:
    """If the caller making the shared call is cancelled, a waiting caller makes it instead."""
    source = Source()
    source.gate = anyio.Event()
    cache = StaleCache(clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    results: list[Any] = []

    async def follower() -> None:
        results.append(await get_item(1))

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as leader_scope:
            async with anyio.create_task_group() as leader_group:
                leader_group.start_soon(get_item, 1)
                await anyio.lowlevel.checkpoint()
                tg.start_soon(follower)
                while cache.counts()["coalesced"] < 1:
                    await anyio.lowlevel.checkpoint()
                leader_scope.cancel()
        assert leader_scope.cancelled_caught
        while source.calls < 2:
            await anyio.lowlevel.checkpoint()
        source.gate.set()
    assert source.calls == 2
    assert [r["version"] for r in results] == [2]


def test_a_call_left_pending_by_a_closed_event_loop_is_not_waited_on() -> None:
    """A loop closed while a coalesced call was running: the next asyncio.run calls afresh."""
    import asyncio

    source = Source()
    source.gate = anyio.Event()
    cache = StaleCache(hooks=[])
    get_item = fallback(cache, hooks=[])(source.fetch)
    pending: list[asyncio.Task[Any]] = []

    async def start() -> None:
        pending.append(asyncio.create_task(get_item(1)))
        await asyncio.sleep(0.01)
        assert source.calls == 1

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()  # the call and its flight are left pending
    source.gate = None

    async def later() -> Any:
        with anyio.fail_after(5):  # waited on the dead flight forever before
            return await get_item(1)

    assert asyncio.run(later())["version"] == 2
    pending.clear()


async def test_fresh_for_serves_recent_values_without_calling(clock: FakeClock) -> None:
    """With fresh_for, a value younger than it is returned without calling the source."""
    source = Source()
    cache = StaleCache(max_staleness=60, fresh_for=5, clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    await get_item(1)
    clock.advance(4)
    assert (await get_item(1))["version"] == 1
    assert source.calls == 1
    clock.advance(2)
    assert (await get_item(1))["version"] == 2
    assert cache.counts()["fresh"] == 1


async def test_invalidate_forgets_a_value(clock: FakeClock) -> None:
    """invalidate(*args) drops the value stored for those arguments."""
    source = Source()
    cache = StaleCache(clock=clock, hooks=[])
    get_item = FallbackChain(cache, hooks=[])(source.fetch)
    await get_item(1)
    await cache.invalidate(1)
    source.up = False
    with pytest.raises(ServiceUnavailableError):
        await get_item(1)


# -- as a decorator -----------------------------------------------------------------------------


async def test_decorator_serves_stale_values_on_error(clock: FakeClock) -> None:
    """Used alone, the cache answers a failure with the stored value, and reports it."""
    hook = Recorder()
    source = Source()
    cache = StaleCache(name="items", max_staleness=30, clock=clock, hooks=[hook])
    get_item = cache(source.fetch)
    await get_item(1)
    source.up = False
    clock.advance(10)
    with track_fallbacks() as served:
        assert (await get_item(1))["version"] == 1
    assert served.uses[0].chain == "items"
    assert served.age == pytest.approx(10)
    [event] = hook.of(StaleValueServed)
    assert event.age == pytest.approx(10)
    assert isinstance(event.error, ConnectionError)


async def test_decorator_reraises_the_original_error_without_a_usable_value(
    clock: FakeClock,
) -> None:
    """Without a value (or with one too old) the call's own error propagates, unchained."""
    source = Source()
    source.up = False
    cache = StaleCache(max_staleness=30, clock=clock, hooks=[])
    get_item = cache(source.fetch)
    with pytest.raises(ConnectionError) as info:
        await get_item(1)
    assert info.value.__context__ is None
    source.up = True
    await get_item(2)
    source.up = False
    clock.advance(31)
    with pytest.raises(ConnectionError):
        await get_item(2)
    assert cache.counts()["miss"] == 2  # the in-memory store drops values at max_staleness


async def test_decorator_on_limits_which_errors_serve_stale(clock: FakeClock) -> None:
    """Errors outside the cache's `on` propagate even when a value is stored."""
    calls = 0

    async def get(item: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ValueError("bad request")
        return item

    get_cached = StaleCache(on=ConnectionError, clock=clock, hooks=[])(get)
    await get_cached(1)
    with pytest.raises(ValueError):
        await get_cached(1)


async def test_store_failures_never_fail_the_call(clock: FakeClock) -> None:
    """A store that cannot write is reported; the call still returns its value."""

    class BrokenStore:
        async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
            raise ConnectionError("store down")

        async def set(self, namespace: str, key: Hashable, value: Any, ttl: float) -> None:
            raise ConnectionError("store down")

        async def delete(self, namespace: str, key: Hashable) -> None:
            raise ConnectionError("store down")

    hook = Recorder()
    source = Source()
    cache = StaleCache(store=BrokenStore(), clock=clock, hooks=[hook])
    get_item = cache(source.fetch)
    assert (await get_item(1))["version"] == 1
    await cache.wait_for_writes()
    source.up = False
    with pytest.raises(ConnectionError, match="source down"):
        await get_item(1)
    assert [e.operation for e in hook.of(StaleStoreFailed)] == ["set", "get"]
    assert cache.counts()["store_error"] == 2


def test_cache_rejects_bad_configuration() -> None:
    """Bad settings raise at construction, naming the parameter."""
    with pytest.raises(ValueError, match="max_staleness"):
        StaleCache(max_staleness=0)
    with pytest.raises(ValueError, match="fresh_for"):
        StaleCache(max_staleness=10, fresh_for=11)
    with pytest.raises(ValueError, match="max_size"):
        StaleCache(max_size=0)
    with pytest.raises(ValueError, match="max_size"):
        StaleCache(max_size=10, store=MemoryStaleStore())
    with pytest.raises(TypeError, match="store"):
        StaleCache(store=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        StaleCache(key="id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="store_timeout"):
        StaleCache(store_timeout=0)
    with pytest.raises(ValueError, match="writes"):
        StaleCache(writes="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pending_writes"):
        StaleCache(max_pending_writes=0)
    with pytest.raises(TypeError, match="store_breaker"):
        StaleCache(store_breaker="db")  # type: ignore[arg-type]


@pytest.mark.parametrize("client", [None, "redis://cache:6379", 6379])
def test_redis_store_rejects_what_is_not_a_redis_client(client: Any) -> None:
    """RedisStaleStore(None) says what it needs at construction, not AttributeError in a call."""
    with pytest.raises(TypeError, match=r"^client must be a redis\.asyncio client"):
        RedisStaleStore(client)


# -- Redis --------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_store_shares_stale_values_between_processes(redis_client: Any) -> None:
    """A value written by one process's cache is served stale by another's, with its age."""
    source = Source()
    writer = StaleCache(name="catalog", store=RedisStaleStore(redis_client), hooks=[])
    reader = StaleCache(name="catalog", store=RedisStaleStore(redis_client), hooks=[])
    await fallback(writer, hooks=[])(source.fetch)(5, lang="de")
    await writer.wait_for_writes()
    source.up = False
    get_item = fallback(reader, hooks=[])(source.fetch)
    with track_fallbacks() as served:
        value = await get_item(5, lang="de")
    assert value == {"item": 5, "lang": "de", "version": 1}
    assert served.age is not None and 0 <= served.age < 5


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_store_ages_by_server_ttl_and_hides_arguments(redis_client: Any) -> None:
    """Ages come from the server's TTL; keys are hashed; values past max_staleness expire."""
    store = RedisStaleStore(redis_client, prefix="test:")
    await store.set("users", ("jane.doe@example.com",), {"id": 7}, ttl=600)
    keys = [k.decode() for k in await redis_client.keys("*")]
    assert keys == [store.redis_key("users", ("jane.doe@example.com",))]
    assert keys[0].startswith("test:users:")
    assert "jane" not in keys[0]
    # Make the value look 590 s old: 10 s of its 600 s TTL are left.
    await redis_client.pexpire(keys[0], 10_000)
    hit = await store.get("users", ("jane.doe@example.com",))
    assert hit is not None
    value, age = hit
    assert value == {"id": 7}
    assert 589 <= age <= 591
    cache = StaleCache(name="users", max_staleness=600, store=store, hooks=[])
    with pytest.raises(CacheMissError) as info:
        await cache._stale(("other",))
    assert info.value.reason == "missing"
    strict = StaleCache(name="users", max_staleness=300, store=store, hooks=[])
    with pytest.raises(CacheMissError) as info:
        await strict._stale(("jane.doe@example.com",))
    assert info.value.reason == "expired"
    assert info.value.age is not None and info.value.age > 300
    await store.delete("users", ("jane.doe@example.com",))
    assert await store.get("users", ("jane.doe@example.com",)) is None


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_store_coalesces_and_serves_fresh_values(redis_client: Any) -> None:
    """Coalescing and fresh_for work the same with the Redis store."""
    source = Source()
    source.gate = anyio.Event()
    cache = StaleCache(name="hot", fresh_for=60, store=RedisStaleStore(redis_client), hooks=[])
    get_item = fallback(cache, hooks=[])(source.fetch)
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(get_item, 3)
        while cache.counts()["coalesced"] < 19:
            await anyio.sleep(0.001)
        source.gate.set()
    assert source.calls == 1
    await cache.wait_for_writes()
    assert (await get_item(3))["version"] == 1
    assert source.calls == 1
    assert cache.counts()["fresh"] == 1


class CountingRedisStore(RedisStaleStore):
    """The Redis store, counting the reads that reach Redis."""

    reads = 0

    async def get(self, namespace: str, key: Hashable) -> tuple[Any, float] | None:
        self.reads += 1
        return await super().get(namespace, key)


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stale_reads_during_an_outage_are_coalesced(
    redis_sentinel: LocalRedisSentinel,
) -> None:
    """500 callers of a failing key with a 20-connection pool: one Redis read, 500 stale answers."""
    from redis.asyncio import Redis

    host, port = redis_sentinel.master
    client = Redis(host=host, port=port, db=10, max_connections=20)
    try:
        await client.flushdb()
        store = CountingRedisStore(client)
        source = Source()
        cache = StaleCache(name="outage", store=store, coalesce=False, hooks=[])
        get_item = fallback(cache, hooks=[])(source.fetch)
        await get_item(4)
        await cache.wait_for_writes()
        source.up = False
        results: list[Any] = []

        async def one() -> None:
            try:
                results.append((await get_item(4))["version"])
            except Exception as exc:  # what the callers got before: MaxConnectionsError
                results.append(repr(exc))

        async with anyio.create_task_group() as tg:
            for _ in range(500):
                tg.start_soon(one)
        assert results == [1] * 500
        assert store.reads <= 3
        assert cache.counts()["stale"] == 500
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
async def test_a_store_that_hangs_or_refuses_never_delays_a_call(
    redis_sentinel: LocalRedisSentinel, fault_proxy_factory: FaultProxyFactory, fault: str
) -> None:
    """Redis behind a proxy that black-holes or refuses: calls answer in time, stale reads end."""
    from redis.asyncio import Redis

    proxy = fault_proxy_factory(*redis_sentinel.master)
    client = Redis(host=proxy.host, port=proxy.port, db=11)
    hook = Recorder()
    try:
        await client.flushdb()
        source = Source()
        cache = StaleCache(
            name="catalog", store=RedisStaleStore(client), store_timeout=0.2, hooks=[hook]
        )
        get_item = Pipeline(name="catalog", fallback=[cache], timeout=0.5)(source.fetch)
        assert (await get_item(1))["version"] == 1
        await cache.wait_for_writes()
        assert cache.counts()["stored"] == 1
        getattr(proxy, fault)()

        started = anyio.current_time()
        for version in range(2, 12):  # background writes fail; the calls do not wait for them
            assert (await get_item(1))["version"] == version
        assert anyio.current_time() - started < 2.0  # 10 calls; a hanging write took forever
        await cache.wait_for_writes()  # each write gave up after store_timeout
        assert cache.counts()["store_error"] >= 5
        assert cache._store_breaker is not None and cache._store_breaker.state.value == "open"
        assert (await get_item(1))["version"] == 12
        await cache.wait_for_writes()
        assert cache.counts()["store_skipped"] == 1  # the open breaker spares the store a try

        source.up = False
        started = anyio.current_time()
        with pytest.raises(ServiceUnavailableError) as info:
            await get_item(1)
        assert anyio.current_time() - started < 2.0
        assert [type(e).__name__ for e in info.value.errors] == [
            "ConnectionError",
            "CircuitOpenError",
        ]

        awaited = StaleCache(
            name="awaited", store=RedisStaleStore(client), store_timeout=0.2, writes="await"
        )
        source.up = True
        started = anyio.current_time()
        assert (await awaited(source.fetch)(2))["item"] == 2  # the write waited 0.2 s at most
        assert anyio.current_time() - started < 2.0
        assert awaited.counts()["store_error"] == 1
    finally:
        proxy.heal()
        await client.aclose()
