"""SentinelRedis against real Sentinel topologies: failovers, kills, lost events, fencing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
import redis.asyncio.connection
import redis.exceptions as rex
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from veritas_resilience import PrometheusHook
from veritas_resilience.chaos import ProxyServer
from veritas_resilience.errors import CircuitOpenError, ResilienceError
from veritas_resilience.events import Event
from veritas_resilience.redis import (
    NoSentinelAvailableError,
    NotASentinelError,
    OutcomeUnknownError,
    ReadFrom,
    RedisAuthenticationError,
    RedisConfigurationError,
    RedisMasterSwitched,
    RedisSentinelDisagreement,
    RedisUnavailableError,
    RetryPolicy,
    SentinelRedis,
    UnknownServiceError,
    retry_unknown_outcome,
)
from veritas_resilience.redis._compat import async_timeout
from veritas_resilience.redis._pool import FencedConnection
from veritas_resilience.testing import LocalRedisSentinel
from veritas_resilience.testing import RecordingHook as Recorder

pytestmark = pytest.mark.integration

Address = tuple[str, int]
PASSWORD = "data-Secret-7f3a"
SENTINEL_PASSWORD = "sentinel-Secret-91c2"


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="module")
def kit() -> Iterator[LocalRedisSentinel]:
    """One topology for the module, with different passwords for data nodes and Sentinels."""
    with LocalRedisSentinel(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD) as topology:
        yield topology


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., SentinelRedis]]:
    """Makes SentinelRedis clients for a kit, closed when the test ends."""
    made: list[SentinelRedis] = []

    def make(topology: LocalRedisSentinel, **kwargs: Any) -> SentinelRedis:
        kwargs.setdefault("hooks", [])
        client = SentinelRedis(
            topology.sentinels,
            topology.service_name,
            password=topology.password,
            sentinel_password=topology.sentinel_password,
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def admin(address: Address, password: str | None = None) -> redis.asyncio.Redis:
    """A plain client that fails at once, to look at or poke a node directly."""
    return redis.asyncio.Redis(
        host=address[0],
        port=address[1],
        password=password,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=2,
    )


async def on_node(address: Address, password: str | None, *args: Any) -> Any:
    async with admin(address, password) as client:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def get_calls(address: Address, password: str | None) -> int:
    """How many GETs a node has served (INFO commandstats)."""
    async with admin(address, password) as client:
        stats = await client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{what} did not happen within {timeout:g} s")


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of one sample (summed over the labels not given)."""
    total, found = 0.0, False
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    assert found, f"no sample {name}{labels}"
    return total


def switched_to(client: SentinelRedis, address: Address) -> Callable[[], bool]:
    """A check that the client writes to ``address``."""
    return lambda: client.master_address == address


async def settled(topology: LocalRedisSentinel) -> None:
    """Wait until a previous failover has fully settled: replicas in sync, and every Sentinel
    has seen each of them as a replica with its link up (a Sentinel that missed the old
    master's conversion would turn it back into a replica if it were promoted right away)."""
    await asyncio.to_thread(topology.wait_replicas_synced, 30)
    master = topology.master
    expected = {n for n in topology.nodes if n != master}

    async def seen_by_all() -> bool:
        for sentinel in topology.sentinels:
            async with admin(sentinel, topology.sentinel_password) as client:
                client.response_callbacks.clear()
                replies = await client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "REPLICAS", topology.service_name
                )
            good = set()
            for reply in replies:
                fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2]))
                if fields.get("flags") == "slave" and fields.get("master-link-status") == "ok":
                    good.add((str(fields["ip"]), int(fields["port"])))
            if not expected <= good:
                return False
        return True

    await eventually(seen_by_all, "every Sentinel to see the replicas as replicas", 30)


async def fail_over(topology: LocalRedisSentinel) -> Address:
    """``kit.failover()`` in a thread (it settles the topology first and asks again on abort)."""
    return await asyncio.to_thread(topology.failover, 40.0)


class Writers:
    """Tasks that write unique keys in a loop and record what happened to each write."""

    def __init__(self, client: SentinelRedis, count: int, prefix: str, pause: float = 0.005):
        self.client = client
        self.prefix = prefix
        self.pause = pause
        self.stop = False
        self.acked: list[tuple[float, float, str]] = []
        self.errors: list[BaseException] = []
        self.tasks = [asyncio.ensure_future(self._run(i)) for i in range(count)]

    async def _run(self, index: int) -> None:
        seq = 0
        while not self.stop:
            seq += 1
            key = f"{self.prefix}:{index}:{seq}"
            started = time.monotonic()
            try:
                await self.client.set(key, seq)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.acked.append((started, time.monotonic(), key))
            await asyncio.sleep(self.pause)

    async def finish(self) -> None:
        self.stop = True
        await asyncio.gather(*self.tasks)

    def first_ack_started_after(self, moment: float) -> float | None:
        times = [done for started, done, _ in self.acked if started > moment]
        return min(times) if times else None


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Address, float]]:
    """Every write this process makes to a socket, as (peer address, time of the write)."""
    log: list[tuple[Address, float]] = []
    write, writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

    def peer(writer: asyncio.StreamWriter) -> Address:
        name = writer.get_extra_info("peername") or ("", 0)
        return (str(name[0]), int(name[1]))

    def recording_write(self: asyncio.StreamWriter, data: Any) -> None:
        log.append((peer(self), time.monotonic()))
        write(self, data)

    def recording_writelines(self: asyncio.StreamWriter, data: Any) -> None:
        log.append((peer(self), time.monotonic()))
        writelines(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", recording_write)
    monkeypatch.setattr(asyncio.StreamWriter, "writelines", recording_writelines)
    return log


# -- the command API ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_commands_pipelines_transactions_and_pubsub_work_as_with_redis_py(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """get/set, pipelines, MULTI/EXEC with WATCH, Pub/Sub and locks, with separate passwords."""
    client = clients(kit, decode_responses=True)
    assert await client.set("api:k", "v") is True
    assert await client.get("api:k") == "v"
    pipe: Any
    async with client.pipeline(transaction=False) as pipe:
        assert await pipe.set("api:n", 1).incr("api:n").get("api:n").execute() == [True, 2, "2"]

    async def bump(pipe: Any) -> None:
        value = int(await pipe.get("api:n"))
        pipe.multi()
        pipe.set("api:n", value + 10)

    await client.transaction(bump, "api:n")
    assert await client.get("api:n") == "12"
    pubsub = client.pubsub()
    await pubsub.subscribe("api:ch")
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    await client.publish("api:ch", "hi")
    assert (await pubsub.get_message(timeout=1))["data"] == "hi"
    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
    async with client.lock("api:lock", timeout=5):
        assert await client.exists("api:lock") == 1
    assert client.master_address == kit.master


@pytest.mark.anyio
async def test_an_unknown_service_and_unreachable_sentinels_are_distinct_errors(
    kit: LocalRedisSentinel,
) -> None:
    """A wrong service name gives UnknownServiceError; no Sentinel answering,
    NoSentinelAvailableError; Sentinels refusing the password, RedisAuthenticationError."""
    wrong_name = SentinelRedis(
        kit.sentinels, "nosuch", sentinel_password=kit.sentinel_password, hooks=[]
    )
    with pytest.raises(UnknownServiceError) as unknown:
        await wrong_name.initialize()
    await wrong_name.aclose()
    assert unknown.value.service == "nosuch"
    nobody = SentinelRedis([("127.0.0.1", 1), ("127.0.0.1", 2)], "mymaster", hooks=[])
    with pytest.raises(NoSentinelAvailableError) as unreachable:
        await nobody.initialize()
    await nobody.aclose()
    assert "127.0.0.1:1" in str(unreachable.value)
    wrong_password = SentinelRedis(
        kit.sentinels, kit.service_name, sentinel_password="not-it", hooks=[]
    )
    with pytest.raises(RedisAuthenticationError) as refused:
        await wrong_password.initialize()
    await wrong_password.aclose()
    assert "not-it" not in str(refused.value)


# -- SENTINEL FAILOVER under load ---------------------------------------------------------------


@pytest.mark.anyio
async def test_failover_under_200_writers_no_errors_and_nothing_sent_to_the_old_master(
    kit: LocalRedisSentinel,
    clients: Callable[..., SentinelRedis],
    sends: list[tuple[Address, float]],
) -> None:
    """SENTINEL FAILOVER with 200 writers: no caller error, no command to the old master once the
    client has switched; metrics, events and logs say so, without any password."""
    await settled(kit)
    registry = CollectorRegistry()
    recorder = Recorder()
    switched_at: list[float] = []

    class SwitchTime:
        event_types = frozenset({RedisMasterSwitched})

        def on_event(self, event: Event) -> None:
            switched_at.append(time.monotonic())

    client = clients(kit, hooks=[PrometheusHook(registry), recorder, SwitchTime()])
    await client.initialize()
    old, old_generation = kit.master, client.generation
    subscriber: Any = client.pubsub()
    await subscriber.subscribe("fo:news")
    received: list[bytes] = []

    async def listen() -> None:
        async for message in subscriber.listen():
            if message["type"] == "message":
                received.append(message["data"])

    listener = asyncio.ensure_future(listen())
    writers = Writers(client, 200, "fo")
    await asyncio.sleep(0.3)
    new = await fail_over(kit)
    await eventually(lambda: client.master_address == new, "the client's switch")
    await asyncio.sleep(0.3)
    await writers.finish()
    # The listener's connection was cut under it; it re-subscribed on the new master.
    await eventually(lambda: subscriber.reconnects == 1, "the subscriber's reconnection")
    assert await client.publish("fo:news", "after the switch") == 1
    await eventually(lambda: received == [b"after the switch"], "the message")
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    await subscriber.aclose()

    assert writers.errors == []
    assert len(writers.acked) > 1000
    seen = switched_at[-1]  # the hook runs right after the generation moved
    late = [when - seen for node, when in sends if node == old and when > seen]
    assert late == [], f"{len(late)} writes went to the old master after the switch"
    to_new = [when - seen for node, when in sends if node == new]
    assert any(t > 0 for t in to_new)
    switch = recorder.of(RedisMasterSwitched)[-1]
    assert (switch.old, switch.new) == (f"{old[0]}:{old[1]}", f"{new[0]}:{new[1]}")
    assert switch.source in ("event", "poll", "connection_error", "readonly", "role_check")
    assert client.generation > old_generation
    text = generate_latest(registry).decode()
    assert (
        f'veritas_redis_master_switches_total{{name="mymaster",source="{switch.source}"}} 1.0'
        in text
    )
    assert 'veritas_redis_sentinels_up{name="mymaster"} 3.0' in text
    assert metric(registry, "veritas_redis_generation") == client.generation
    assert metric(registry, "veritas_redis_stale_connections_closed_total") > 0
    # A switch learned from +switch-master before any write failed leaves no unwritable window.
    assert metric(registry, "veritas_redis_no_writable_master_seconds_total") >= 0
    assert metric(registry, "veritas_redis_command_duration_seconds_count") >= len(writers.acked)
    assert metric(registry, "veritas_redis_writable_master") == 1
    everything = text + repr(recorder.events) + repr(client) + repr(await client.health())
    assert PASSWORD not in everything and SENTINEL_PASSWORD not in everything


@pytest.mark.anyio
async def test_cancelling_half_the_callers_mid_failover_leaves_no_connection_with_unread_replies(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """Tasks cancelled in the middle of commands during a failover leave every pooled connection
    clean: no pending replies, no slot held, and every reply afterwards matches its command."""
    await settled(kit)
    client = clients(kit, decode_responses=True, max_connections=40)
    await client.initialize()

    async def worker(index: int) -> None:
        # Each reply is checked against its own command: a connection handed on with an unread
        # reply would give a command the reply of another (a different key, or a number).
        seq = 0
        pipe: Any
        while True:
            seq += 1
            async with client.pipeline(transaction=index % 2 == 0) as pipe:
                pipe.set(f"cx:{index}", f"{index}:{seq}").get(f"cx:{index}")
                assert await pipe.execute() == [True, f"{index}:{seq}"]
            value: Any = await client.get(f"cx:{index}")
            assert value is None or value.startswith(f"{index}:"), value

    tasks = [asyncio.ensure_future(worker(i)) for i in range(100)]
    failover = asyncio.ensure_future(fail_over(kit))
    for task in tasks[::2]:
        await asyncio.sleep(0.02)
        task.cancel()
    new = await failover
    await eventually(lambda: client.master_address == new, "the client's switch")
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), [
        r for r in results if not isinstance(r, asyncio.CancelledError)
    ]

    pool: Any = client.connection_pool
    idle, in_use = pool.counts()
    assert in_use == 0
    assert idle <= 40
    for conn in list(pool._available_connections):
        if conn.is_connected:
            assert not await conn.can_read(), "a pooled connection holds an unread reply"
    for i in range(100):
        await client.set(f"cx:check:{i}", i)
    assert await asyncio.gather(*(client.get(f"cx:check:{i}") for i in range(100))) == [
        str(i) for i in range(100)
    ]


@pytest.mark.anyio
async def test_ten_failovers_in_a_row_keep_the_pool_steady_and_leak_nothing(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """Ten failovers under load: ten switches, a bounded pool, no connection left on any node
    but the master, no task left behind after close."""
    await settled(kit)
    tasks_before = {t for t in asyncio.all_tasks() if not t.done()}
    client = clients(kit, max_connections=30, client_name="veritas-ten")
    await client.initialize()
    writers = Writers(client, 30, "ten", pause=0.01)
    sizes = []
    for _ in range(10):
        new = await fail_over(kit)
        await eventually(switched_to(client, new), "the client's switch")
        idle, in_use = client.connection_pool.counts()  # type: ignore[attr-defined]
        sizes.append(idle + in_use)
    await writers.finish()

    assert writers.errors == []
    switches = client.switches()
    assert sum(switches.values()) - switches["initial"] == 10
    assert max(sizes) <= 30
    master = kit.master
    for node in kit.nodes:
        listing = await on_node(node, kit.password, "CLIENT", "LIST")
        ours = [line for line in str(listing).splitlines() if "name=veritas-ten" in line]
        if node != master:
            assert ours == [], f"{len(ours)} connections left on {node}"
        else:
            assert len(ours) <= 30
    await client.aclose()
    await asyncio.sleep(0.05)
    leaked = {t for t in asyncio.all_tasks() if not t.done()} - tasks_before
    current = asyncio.current_task()
    assert current is not None
    leaked.discard(current)
    assert not leaked, [t.get_name() for t in leaked]


# -- lost events ----------------------------------------------------------------------------------


class SubscriptionBlackhole:
    """A loopback relay to one Sentinel that forwards everything until the client subscribes,
    then silently drops what the Sentinel sends on that connection, as a dead path would.

    (FaultProxy cannot blackhole one connection while the others flow: see the note to the lead.)
    """

    def __init__(self, target: Address) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.address: Address = ("127.0.0.1", 0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.swallowed = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        subscribed = False

        async def to_server() -> None:
            nonlocal subscribed
            while data := await reader.read(65536):
                subscribed = subscribed or b"SUBSCRIBE" in data.upper()
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if subscribed:
                    self.swallowed += 1
                    continue
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(to_server(), to_client())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            up_writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.anyio
async def test_when_every_event_subscription_is_blackholed_the_poll_finds_the_switch(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """Subscriptions that silently receive nothing are detected (PING), the poll turns fast, and
    it finds the switch within the degraded interval plus a second."""
    await settled(kit)
    relays = [SubscriptionBlackhole(s) for s in kit.sentinels]
    for relay in relays:
        await relay.start()
    try:
        client = SentinelRedis(
            [r.address for r in relays],
            kit.service_name,
            password=kit.password,
            sentinel_password=kit.sentinel_password,
            discover_sentinels=False,  # the real Sentinels would bypass the relays
            degraded_poll_interval=0.5,
            ping_interval=0.3,
            hooks=[],
        )
        try:
            await client.initialize()
            health = await client.health()
            assert health.details["subscriptions_up"] == 0
            assert health.status == "degraded"
            new = await fail_over(kit)
            agreed = time.monotonic()
            await eventually(lambda: client.master_address == new, "the poll's switch", 10)
            assert time.monotonic() - agreed <= 0.5 + 1.0
            switches = client.switches()
            assert switches["poll"] == 1
            assert switches["event"] == 0
            assert await client.set("blackhole", "ok") is True
        finally:
            await client.aclose()
    finally:
        for relay in relays:
            await relay.close()


# -- Sentinels down -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_with_every_sentinel_down_traffic_goes_on_and_new_discovery_fails_distinctly(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """All Sentinels stopped, master healthy: commands (on new connections too) keep working;
    a lookup and a new client fail with NoSentinelAvailableError; health shows 0 Sentinels."""
    topology = redis_sentinel_factory()
    client = clients(topology)
    await client.initialize()
    assert await client.set("sd:before", 1) is True
    for index in range(len(topology.sentinels)):
        await asyncio.to_thread(topology.stop_sentinel, index)

    results = await asyncio.gather(*(client.set(f"sd:{i}", i) for i in range(150)))
    assert all(r is True for r in results)
    assert client.connection_pool.counts()[0] > 50  # type: ignore[attr-defined]
    with pytest.raises(NoSentinelAvailableError):
        await client.refresh()
    fresh = SentinelRedis(topology.sentinels, topology.service_name, hooks=[])
    with pytest.raises(NoSentinelAvailableError):
        await fresh.initialize()
    await fresh.aclose()
    health = await client.health()
    assert health.details["sentinels_up"] == 0
    assert health.status == "degraded"
    assert health.ping_seconds is not None
    assert await client.get("sd:149") == b"149"


# -- kill -9 and READONLY -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_after_kill_9_of_the_master_writes_resume_within_failover_time_plus_a_second(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """kill -9 of the master under load: writes resume within the Sentinels' failover time plus
    one second, and no caller sees an error with the default deadline."""
    topology = redis_sentinel_factory()
    client = clients(topology)
    await client.initialize()
    writers = Writers(client, 20, "kill")
    await asyncio.sleep(0.3)
    killed_at = time.monotonic()
    old = await asyncio.to_thread(topology.kill_master)
    new = await asyncio.to_thread(topology.wait_for_master_change, old, 30)
    sentinels_done = time.monotonic()
    await eventually(lambda: writers.first_ack_started_after(killed_at + 0.05), "a write")
    await asyncio.sleep(0.2)
    await writers.finish()

    resumed = writers.first_ack_started_after(killed_at + 0.05)
    assert resumed is not None
    failover_time = sentinels_done - killed_at
    assert resumed - killed_at <= failover_time + 1.0, (resumed - killed_at, failover_time)
    assert writers.errors == []
    assert client.master_address == new


@pytest.mark.anyio
async def test_readonly_on_a_live_connection_is_retried_once_on_the_new_master(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """The master turned into a replica without closing its clients: the next write gets
    READONLY on a pooled connection and is retried once, on the new master, successfully."""
    topology = redis_sentinel_factory()
    client = clients(
        topology, subscribe=False, poll_interval=60, degraded_poll_interval=60
    )  # only the READONLY reply may reveal the switch
    await client.initialize()
    assert await client.set("ro:warm", 1) is True
    old = topology.master
    new, other = topology.replicas[0], topology.replicas[1]
    name = topology.service_name
    for sentinel in topology.sentinels:
        await on_node(sentinel, None, "SENTINEL", "REMOVE", name)
    await on_node(new, None, "REPLICAOF", "NO", "ONE")
    await on_node(old, None, "REPLICAOF", new[0], new[1])  # demoted; its clients stay connected
    await on_node(other, None, "REPLICAOF", new[0], new[1])
    for sentinel in topology.sentinels:
        await on_node(sentinel, None, "SENTINEL", "MONITOR", name, new[0], new[1], 2)

    assert await client.set("ro:key", "after") is True
    assert client.retries() == {"readonly": 1}
    assert client.switches()["readonly"] == 1
    assert client.master_address == new
    assert await on_node(new, None, "GET", "ro:key") == "after"


@pytest.mark.anyio
async def test_a_lost_reply_fails_a_non_idempotent_write_clearly_and_retries_a_read(
    kit: LocalRedisSentinel,
    clients: Callable[..., SentinelRedis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server runs the command but its reply is lost with the connection: INCR raises
    OutcomeUnknownError and is not run again; GET is retried; retry_unknown_outcome() opts in."""
    await settled(kit)
    client = clients(kit)
    await client.set("ou:n", 0)
    lose_next = [False]
    read_response = FencedConnection.read_response

    async def lossy(self: FencedConnection, *args: Any, **kwargs: Any) -> Any:
        reply = await read_response(self, *args, **kwargs)
        if lose_next[0]:
            lose_next[0] = False
            await self.disconnect(nowait=True)
            raise rex.ConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(FencedConnection, "read_response", lossy)
    lose_next[0] = True
    with pytest.raises(OutcomeUnknownError) as caught:
        await client.incr("ou:n")
    assert caught.value.command == "INCRBY"  # redis-py sends incr() as INCRBY
    assert await client.get("ou:n") == b"1"  # it ran once and was not sent again
    lose_next[0] = True
    assert await client.get("ou:n") == b"1"  # a read is simply retried
    lose_next[0] = True
    with retry_unknown_outcome():
        assert await client.incr("ou:n") == 3  # opted in: run again, so counted twice
    assert client.retries() == {"connection": 2}


# -- replicas -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_replica_reads_avoid_a_replica_whose_link_to_the_master_is_down(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """read_from=replica spreads reads over the replicas, and stops reading from one as soon as
    its replication link is down; the master is never read from."""
    await settled(kit)
    master = clients(kit)
    reader = master.replica(ReadFrom.REPLICA)
    await master.set("rr:k", "v")
    await asyncio.to_thread(kit.wait_replicas_synced, 30)
    first, second = kit.replicas
    master_gets = await get_calls(kit.master, kit.password)
    for _ in range(10):  # concurrent reads open several connections, spread round robin
        assert await asyncio.gather(*(reader.get("rr:k") for _ in range(6))) == [b"v"] * 6
    assert await get_calls(first, kit.password) > 0 and await get_calls(second, kit.password) > 0

    await on_node(first, kit.password, "CONFIG", "SET", "masterauth", "wrong-password")
    await on_node(first, kit.password, "CLIENT", "KILL", "TYPE", "master")
    try:
        dropped = time.monotonic()
        await eventually(lambda: first not in reader._topology.replicas, "dropping the replica")
        assert time.monotonic() - dropped < 2.5  # rechecked every second
        before = await get_calls(first, kit.password)
        for _ in range(20):
            assert await asyncio.gather(*(reader.get("rr:k") for _ in range(6))) == [b"v"] * 6
        assert await get_calls(first, kit.password) == before
        assert await get_calls(kit.master, kit.password) == master_gets
    finally:
        await on_node(first, kit.password, "CONFIG", "SET", "masterauth", PASSWORD)
        await on_node(first, kit.password, "CLIENT", "KILL", "TYPE", "master")
    await eventually(lambda: first in reader._topology.replicas, "taking the replica back")
    await reader.aclose()


# -- a paused master (SIGSTOP), deadlines, fencing of in-flight commands ---------------------------


@pytest.mark.anyio
async def test_every_call_ends_within_its_deadline_on_a_paused_master_first_attempt_included(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """A master frozen with SIGSTOP (and not failed over): an RPUSH and a GET end at the 1 s
    deadline, not at the 5 s socket timeout; the RPUSH may have run, so its outcome is unknown."""
    topology = redis_sentinel_factory(down_after_ms=60_000)  # the pause only stalls the master
    client = clients(topology, retry=RetryPolicy(deadline=1.0), socket_timeout=5.0)
    assert await client.set("dl:warm", 1) is True
    topology.pause_master()
    try:
        started = time.monotonic()
        with pytest.raises(OutcomeUnknownError):
            await client.rpush("dl:list", "x")
        pushed = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError):
            await client.get("dl:warm")
        read = time.monotonic() - started
    finally:
        topology.resume_master()
    assert pushed < 1.0 + 0.5 and read < 1.0 + 0.5, (pushed, read)


class MixedWriters:
    """Tasks writing unique ids: even ones RPUSH to one list, odd ones SET a key of their own."""

    def __init__(self, client: SentinelRedis, count: int) -> None:
        self.client = client
        self.stop = False
        self.acked: list[tuple[float, str]] = []  # (when the call started, id)
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self.tasks = [asyncio.ensure_future(self._run(i)) for i in range(count)]

    async def _run(self, index: int) -> None:
        seq = 0
        while not self.stop:
            seq += 1
            ident = f"{index}:{seq}"
            started = time.monotonic()
            try:
                if index % 2 == 0:
                    await self.client.rpush("mx:ids", ident)
                else:
                    await self.client.set(f"mx:{ident}", 1)
            except Exception as exc:
                self.errors.append(exc)
            else:
                self.acked.append((started, ident))
            self.longest = max(self.longest, time.monotonic() - started)
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self.stop = True
        await asyncio.gather(*self.tasks)

    async def lost(self, master: Address, password: str | None, after: float) -> list[str]:
        """Acknowledged ids of calls started after ``after`` that the master does not have."""
        async with admin(master, password) as node:
            pushed = set(await node.lrange("mx:ids", 0, -1))
            missing = []
            for started, ident in self.acked:
                if started <= after:
                    continue
                index = int(ident.split(":")[0])
                if index % 2 == 0:
                    found = ident in pushed
                else:
                    found = bool(await node.exists(f"mx:{ident}"))
                if not found:
                    missing.append(ident)
        return missing


@pytest.mark.anyio
async def test_a_sigstop_failover_loses_no_acknowledged_write_and_new_callers_get_the_new_master(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """200 writers, master paused until after the switch: no reply from the old master counts as
    a success, a new caller is served by the new master while the old one is still frozen, every
    call ends within its deadline, and callers only ever see the library's own errors."""
    topology = redis_sentinel_factory()
    client = clients(topology, retry=RetryPolicy(deadline=3.0), socket_timeout=30.0)
    await client.initialize()
    writers = MixedWriters(client, 200)
    await asyncio.sleep(0.3)
    old = topology.pause_master()
    paused = time.monotonic()
    try:
        new = await asyncio.to_thread(topology.wait_for_master_change, old, 30)
        await eventually(switched_to(client, new), "the client's switch")
        # The old master is still frozen with writes on its sockets: a new caller gets a fresh
        # connection to the new master instead of waiting for the pool.
        assert await client.set("mx:fresh", 1) is True
    finally:
        topology.resume_master()
    await asyncio.sleep(0.5)  # the old master answers whatever it still had
    await writers.finish()

    lost = await writers.lost(new, topology.password, after=paused + 0.05)
    assert lost == [], f"{len(lost)} acknowledged writes are not on the new master"
    assert writers.longest < 3.0 + 0.5
    assert all(isinstance(e, ResilienceError) for e in writers.errors), {
        type(e).__name__ for e in writers.errors
    }
    assert any(isinstance(e, OutcomeUnknownError) for e in writers.errors)  # RPUSHes in flight


@pytest.mark.anyio
async def test_aclose_returns_after_the_event_loop_was_blocked(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """A loop blocked for longer than the subscriptions' ping interval, then aclose(): it
    returns, and no task of the client is left behind."""
    before = {t for t in asyncio.all_tasks() if not t.done()}
    client = clients(kit)
    await asyncio.gather(*(client.set(f"cl:{i}", i) for i in range(100)))
    time.sleep(1.2)  # a blocking call in the event loop's thread
    try:
        async with async_timeout(10):
            await client.aclose()
    except TimeoutError:
        pytest.fail("aclose() did not return")
    left = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert not left, [t.get_name() for t in left]


# -- whom to believe, and misconfiguration --------------------------------------------------------


@pytest.mark.anyio
async def test_a_sentinel_of_another_redis_with_a_higher_epoch_is_outvoted_and_reported(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """One listed Sentinel monitors a different Redis under the same service name, with a higher
    config epoch: the client writes to the master the quorum names, and health, an event and a
    metric report the disagreement."""
    ours = redis_sentinel_factory()
    foreign = redis_sentinel_factory(num_replicas=1, num_sentinels=1)
    foreign_master = await asyncio.to_thread(foreign.failover, 30.0)  # its epoch is now higher
    registry = CollectorRegistry()
    recorder = Recorder()
    client = SentinelRedis(
        [*ours.sentinels, *foreign.sentinels],
        ours.service_name,
        hooks=[recorder, PrometheusHook(registry)],
    )
    try:
        for i in range(100):
            await client.set(f"fx:{i}", i)
        assert client.master_address == ours.master
        assert await on_node(foreign_master, None, "DBSIZE") == 0
        health = await client.health()
        assert health.status == "degraded"
        foreign_sentinel = f"{foreign.sentinels[0][0]}:{foreign.sentinels[0][1]}"
        assert foreign_sentinel in health.details["disagreeing_sentinels"]
        [event] = recorder.of(RedisSentinelDisagreement)
        assert event.sentinels == (foreign_sentinel,)
        assert event.named == (f"{foreign_master[0]}:{foreign_master[1]}",)
        assert metric(registry, "veritas_redis_sentinel_disagreements_total") == 1
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("mistake", ["data_password", "sentinel_password", "data_as_sentinels"])
async def test_permanent_misconfiguration_fails_at_once_with_an_error_that_says_what(
    kit: LocalRedisSentinel, mistake: str
) -> None:
    """A wrong data-node password, a wrong Sentinel password, or data nodes listed as Sentinels
    fail the first command without any retry, with a typed error naming the mistake."""
    settings: dict[str, Any] = {
        "password": kit.password,
        "sentinel_password": kit.sentinel_password,
        "retry": RetryPolicy(deadline=30.0),
        "hooks": [],
    }
    sentinels = kit.sentinels
    if mistake == "data_password":
        settings["password"] = "not-the-password"
    elif mistake == "sentinel_password":
        settings["sentinel_password"] = "not-the-password"
    else:
        sentinels = kit.nodes
        settings["sentinel_password"] = kit.password
    client = SentinelRedis(sentinels, kit.service_name, **settings)
    try:
        started = time.monotonic()
        with pytest.raises(RedisConfigurationError) as caught:
            await client.set("mc:k", 1)
        assert time.monotonic() - started < 5.0  # far from the 30 s deadline: not retried
    finally:
        await client.aclose()
    error = caught.value
    assert client.retries() == {}
    assert "not-the-password" not in str(error) and PASSWORD not in str(error)
    if mistake == "data_as_sentinels":
        assert isinstance(error, NotASentinelError)
        assert "SENTINEL" in str(error)
    else:
        assert isinstance(error, RedisAuthenticationError)
        assert isinstance(error, rex.AuthenticationError)
        assert error.role == ("data node" if mistake == "data_password" else "Sentinel")


class BlackHole:
    """A listener that accepts connections and never answers (a Sentinel behind a dead path)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.address: Address = ("127.0.0.1", 0)
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> BlackHole:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


@pytest.mark.anyio
async def test_a_command_while_every_sentinel_is_blackholed_says_no_sentinel_available() -> None:
    """Sentinels that accept connections and never answer: the command fails at its deadline
    with NoSentinelAvailableError naming them, not with a bare timeout."""
    async with BlackHole() as first, BlackHole() as second:
        client = SentinelRedis(
            [first.address, second.address],
            "mymaster",
            retry=RetryPolicy(deadline=1.5),
            sentinel_timeout=0.2,
            hooks=[],
        )
        try:
            with pytest.raises(NoSentinelAvailableError) as caught:
                await client.set("bh:k", 1)
        finally:
            await client.aclose()
    assert f"{first.address[0]}:{first.address[1]}" in str(caught.value)


@pytest.mark.anyio
async def test_an_open_circuit_is_also_a_redis_py_connection_error(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """CircuitOpenError raised by the client is caught by redis-py code (except ConnectionError)
    and by ours (except CircuitOpenError)."""
    client = clients(kit, retry=RetryPolicy(deadline=0.5))
    assert client.breaker is not None
    client.breaker.isolate()
    try:
        with pytest.raises(rex.ConnectionError) as caught:
            await client.get("co:k")
    finally:
        client.breaker.reset()
    assert isinstance(caught.value, CircuitOpenError)
    assert caught.value.name == "redis:mymaster"


@pytest.mark.anyio
async def test_address_remap_routes_every_data_node_connection_to_the_mapped_address(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel],
    clients: Callable[..., SentinelRedis],
) -> None:
    """With address_remap, connections and ROLE checks dial the mapped address (a TCP proxy in
    front of each data node here): with the master's proxy disabled writes fail, enabled they
    go through, and after a failover the client dials the new master's proxy. The client still
    reports the addresses the Sentinels announce."""
    topology = redis_sentinel_factory()
    proxies = ProxyServer()
    names: dict[Address, str] = {}
    asked: list[Address] = []

    def through_proxy(address: Address) -> str:
        asked.append(address)
        if address not in names:
            names[address] = f"node{len(names)}"
            proxies.create_proxy(names[address], f"{address[0]}:{address[1]}")
        return proxies.get_proxy(names[address]).listen

    try:
        client = clients(
            topology, address_remap=through_proxy, breaker=False, retry=RetryPolicy(deadline=1.0)
        )
        await client.set("remap:k", "1")
        master = topology.master
        assert client.master_address == master
        assert master in asked
        assert proxies.get_proxy(names[master]).connections >= 1

        proxies.update_proxy(names[master], enabled=False)
        with pytest.raises(rex.ConnectionError):
            await client.set("remap:k", "2")
        proxies.update_proxy(names[master], enabled=True)
        await client.set("remap:k", "3")
        assert await on_node(master, topology.password, "GET", "remap:k") == "3"

        old = await asyncio.to_thread(topology.kill_master)
        new = await asyncio.to_thread(topology.wait_for_master_change, old, 30)

        async def written() -> bool:
            try:
                return bool(await client.set("remap:k", "4"))
            except rex.ConnectionError:
                return False

        await eventually(written, "a write through the new master's proxy")
        assert client.master_address == new
        assert new in names and proxies.get_proxy(names[new]).connections >= 1
        assert await on_node(new, topology.password, "GET", "remap:k") == "4"
    finally:
        proxies.close()


@pytest.mark.anyio
async def test_an_address_remap_that_returns_no_address_fails_naming_it(
    kit: LocalRedisSentinel, clients: Callable[..., SentinelRedis]
) -> None:
    """A remap returning something that is not an address fails the call with an error that
    names address_remap and the announced address."""
    client = clients(kit, address_remap=lambda address: None, retry=RetryPolicy(deadline=0.5))
    with pytest.raises(ValueError, match=r"address_remap\(127\.0\.0\.1:") as caught:
        await client.set("remap:bad", "1")
    assert "None" in str(caught.value)
