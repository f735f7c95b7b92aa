"""FaultProxy: forwarding and runtime faults (delay, freeze, cut, reset, blackhole, lost COMMIT)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from veritas_resilience.testing import (
    FaultProxy,
    FaultProxyFactory,
    LocalPostgresCluster,
    PostgresClusterFactory,
)


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg runs on asyncio only; the proxy itself runs on its own loop in its own thread."""
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(pg_cluster_factory: PostgresClusterFactory) -> LocalPostgresCluster:
    """A lone PostgreSQL primary to proxy to."""
    return pg_cluster_factory(standbys=0)


class Echo:
    """An echo server on the test's loop that prefixes each answer and counts its clients."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(self.prefix + data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Net:
    """The echo servers and client connections of one test, all closed when it ends."""

    def __init__(self) -> None:
        self.servers: list[tuple[asyncio.Server, Echo]] = []
        self.clients: list[asyncio.StreamWriter] = []

    async def echo(self, prefix: bytes = b"") -> tuple[Echo, int]:
        """Start an echo server on 127.0.0.1; return it and its port."""
        state = Echo(prefix)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        self.servers.append((server, state))
        return state, server.sockets[0].getsockname()[1]

    async def connect(self, proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a client connection through the proxy."""
        reader, writer = await asyncio.open_connection(*proxy.address)
        self.clients.append(writer)
        return reader, writer

    async def roundtrip(
        self, proxy: FaultProxy, payload: bytes = b"ping", timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Connect through the proxy, send ``payload`` and return what came back."""
        reader, writer = await self.connect(proxy)
        writer.write(payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout)
        return reader, writer, answer

    async def aclose(self) -> None:
        for writer in self.clients:
            writer.close()
        for server, state in self.servers:
            server.close()
            for writer in state.writers:
                writer.close()
            await server.wait_closed()
        await asyncio.sleep(0)  # let the transports finish closing


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    """Echo servers and clients for one test."""
    n = Net()
    yield n
    await n.aclose()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_forwards_both_ways_and_counts(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """Bytes go to the server and back; the counters see the connection and the bytes."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    assert proxy.address == (proxy.host, proxy.port)
    assert proxy.host == "127.0.0.1"
    _, writer, answer = await net.roundtrip(proxy, b"hello")
    assert answer == b"hello"
    assert proxy.connections_total == 1
    assert proxy.active_connections == 1
    assert proxy.bytes_to_server == 5
    assert proxy.bytes_to_client == 5
    writer.close()
    await wait_until(lambda: proxy.active_connections == 0)


@pytest.mark.anyio
async def test_delay_adds_latency(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """delay(d) adds at least d per direction; heal() removes it."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    proxy.delay(0.2)
    started = time.monotonic()
    *_, answer = await net.roundtrip(proxy)
    assert answer == b"ping"
    assert time.monotonic() - started >= 0.4
    proxy.delay(0.3, direction="to_client")
    proxy.delay(0, direction="to_server")
    started = time.monotonic()
    await net.roundtrip(proxy)
    assert time.monotonic() - started >= 0.3
    proxy.heal()
    started = time.monotonic()
    await net.roundtrip(proxy)
    assert time.monotonic() - started < 0.3
    with pytest.raises(ValueError, match="seconds"):
        proxy.delay(-1)


@pytest.mark.anyio
async def test_freeze_holds_bytes_without_closing(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """While frozen, reads on open and new connections hang; unfreeze() delivers everything."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    reader, writer, _ = await net.roundtrip(proxy)
    proxy.freeze()
    writer.write(b"held")
    new_reader, new_writer = await net.connect(proxy)
    new_writer.write(b"new")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(65536), 0.3)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(new_reader.read(65536), 0.1)
    assert proxy.active_connections == 2
    proxy.unfreeze()
    assert await asyncio.wait_for(reader.read(65536), 5) == b"held"
    assert await asyncio.wait_for(new_reader.read(65536), 5) == b"new"


@pytest.mark.anyio
async def test_cut_closes_open_connections(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """cut() closes every open connection; new ones still work."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    reader, *_ = await net.roundtrip(proxy)
    other, *_ = await net.roundtrip(proxy)
    proxy.cut()
    assert await asyncio.wait_for(reader.read(65536), 5) == b""
    assert await asyncio.wait_for(other.read(65536), 5) == b""
    await wait_until(lambda: proxy.active_connections == 0)
    *_, answer = await net.roundtrip(proxy)
    assert answer == b"ping"


@pytest.mark.anyio
async def test_reset_aborts_with_rst(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """reset() aborts open connections: the client gets ECONNRESET, not a clean EOF."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    reader, *_ = await net.roundtrip(proxy)
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(65536), 5)


@pytest.mark.anyio
async def test_blackhole_accepts_but_never_answers(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """A blackholed proxy completes the handshake but never reaches the server nor answers."""
    server, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    proxy.blackhole()
    reader, writer = await net.connect(proxy)
    writer.write(b"anyone?")
    await writer.drain()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(65536), 0.3)
    assert server.connections == 0
    assert proxy.connections_total == 1
    proxy.heal()
    *_, answer = await net.roundtrip(proxy)
    assert answer == b"ping"
    assert server.connections == 1
    proxy.cut()  # blackholed connections stay open until cut
    assert await asyncio.wait_for(reader.read(65536), 5) == b""


@pytest.mark.anyio
async def test_refuse_stops_listening_until_heal(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """refuse() makes connects fail with ECONNREFUSED; heal() listens again on the same port."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        await net.connect(proxy)
    proxy.heal()
    *_, answer = await net.roundtrip(proxy)
    assert answer == b"ping"


@pytest.mark.anyio
async def test_retarget_moves_new_connections(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """After retarget(), new connections reach the new server; open ones keep the old one."""
    _, port_a = await net.echo(b"a:")
    _, port_b = await net.echo(b"b:")
    proxy = fault_proxy_factory("127.0.0.1", port_a)
    reader, writer, answer = await net.roundtrip(proxy, b"1")
    assert answer == b"a:1"
    proxy.retarget("127.0.0.1", port_b)
    assert proxy.target == ("127.0.0.1", port_b)
    *_, answer = await net.roundtrip(proxy, b"2")
    assert answer == b"b:2"
    writer.write(b"3")
    assert await asyncio.wait_for(reader.read(65536), 5) == b"a:3"


@pytest.mark.anyio
async def test_unreachable_target_resets_the_client(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """When the server refuses, the client's connection is reset as if it had been refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        proxy = fault_proxy_factory("127.0.0.1", sock.getsockname()[1])

        async def connect_and_read() -> bytes:
            reader, _ = await net.connect(proxy)
            return await asyncio.wait_for(reader.read(65536), 5)

        with pytest.raises(ConnectionResetError):  # the RST may even beat the connect's end
            await connect_and_read()


@pytest.mark.anyio
async def test_drop_after_client_message_kills_one_connection_silently(
    net: Net,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """After a matching message one connection goes dead (open, silent); the others flow."""
    _, port = await net.echo(b"")
    proxy = fault_proxy_factory("127.0.0.1", port)
    doomed, doomed_writer, _ = await net.roundtrip(proxy, b"hello")
    other, other_writer, _ = await net.roundtrip(proxy, b"hello")
    proxy.drop_after_client_message(b"SUBSCRIBE")
    doomed_writer.write(b"SUBSCRIBE news")
    # The echo of SUBSCRIBE itself is dropped, and so is everything after it.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(doomed.read(65536), 0.3)
    doomed_writer.write(b"more")
    other_writer.write(b"still here")
    assert await asyncio.wait_for(other.read(65536), 5) == b"still here"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(doomed.read(65536), 0.2)
    assert proxy.triggers_fired == 1
    assert proxy.active_connections == 2
    proxy.cut()
    assert await asyncio.wait_for(doomed.read(65536), 5) == b""


@pytest.mark.anyio
async def test_cut_after_commit_loses_the_reply_not_the_commit(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """The server commits, but the client only sees its connection die: an unknown outcome."""
    primary = cluster.primary
    cluster.query(primary, "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY)")
    proxy = fault_proxy_factory(primary.host, primary.port)
    conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres")
    try:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO ledger VALUES (1)")
        proxy.cut_after_client_message(b"COMMIT")
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
            await conn.execute("COMMIT")
    finally:
        conn.terminate()
    assert proxy.triggers_fired == 1
    assert cluster.query(primary, "SELECT count(*) FROM ledger WHERE id = 1") == "1"
    # The trigger fired once; the next COMMIT goes through.
    conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres")
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO ledger VALUES (2)")
    finally:
        await conn.close()
    assert proxy.triggers_fired == 1


@pytest.mark.anyio
async def test_freeze_hangs_a_postgres_query(
    cluster: LocalPostgresCluster,
    fault_proxy_factory: FaultProxyFactory,
) -> None:
    """A frozen link makes an asyncpg query hang (only its own timeout ends it)."""
    primary = cluster.primary
    proxy = fault_proxy_factory(primary.host, primary.port)
    conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres")
    try:
        proxy.freeze()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 0.3)
    finally:
        conn.terminate()


def test_works_from_sync_code_and_leaves_no_thread(cluster: LocalPostgresCluster) -> None:
    """Without any event loop, the proxy forwards; close() ends its thread and its sockets."""
    primary = cluster.primary
    threads_before = set(threading.enumerate())
    with FaultProxy(primary.host, primary.port) as proxy:
        assert any(t.name.startswith("FaultProxy") for t in threading.enumerate())
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest: the server answers N or S
            assert sock.recv(1) in (b"N", b"S")
            other = socket.create_connection(proxy.address, timeout=5)
    assert set(threading.enumerate()) <= threads_before
    try:
        closed = other.recv(1) == b""  # closed by close(): an EOF...
    except ConnectionResetError:
        closed = True  # ...or a reset, when the proxy closed with bytes still unread
    assert closed
    other.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=5).close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.freeze()
    proxy.close()  # idempotent
