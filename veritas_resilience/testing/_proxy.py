"""A TCP proxy that injects network faults at runtime: latency, freezes, cuts, resets, blackholes.

:class:`FaultProxy` sits between a client and one server on loopback. It runs its own asyncio
event loop in its own thread, so it works under any event loop (asyncio or trio) and from plain
synchronous code, and it keeps forwarding while a test blocks its own loop. Every fault method is
thread-safe and has taken effect when it returns::

    with FaultProxy(node.host, node.port) as proxy:
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="postgres")
        proxy.freeze()              # the next query hangs: bytes are held, nothing is closed
        ...
        proxy.heal()                # held bytes flow again
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

__all__ = ["FaultProxy", "FaultProxyFactory"]

Direction = Literal["both", "to_server", "to_client"]
_T = TypeVar("_T")
_CHUNK = 65536
_QUEUE_CHUNKS = 64  # per direction; past this the proxy stops reading and TCP pushes back


def _close_socket(sock: socket.socket, _: object) -> None:
    sock.close()


class FaultProxyFactory(Protocol):
    """The type of the ``fault_proxy_factory`` fixture, for annotating tests."""

    def __call__(self, target_host: str, target_port: int, **kwargs: Any) -> FaultProxy:
        """Start and return a proxy; ``kwargs`` go to :class:`FaultProxy`."""
        ...


@dataclass(eq=False)
class _Trigger:
    match: bytes | Callable[[bytes], bool]
    action: Literal["cut", "drop"]
    once: bool
    reset: bool = False
    reply_timeout: float = 0.0


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    swallowing: _Trigger | None = None  # set once a trigger fired: drop the reply, then close
    dropping: bool = False  # a drop trigger fired: the connection is dead but stays open
    tail: bytes = b""  # end of the previous client chunk, to match across chunk boundaries


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` with faults settable at runtime.

    The proxy listens as soon as it is constructed; :meth:`close` (or leaving the ``with`` block)
    closes every connection and stops its thread. Faults apply to the connections already open
    and to new ones, except where a method says otherwise, and last until :meth:`heal`.

    Example::

        with FaultProxy("127.0.0.1", pg_port) as proxy:
            pool = await asyncpg.create_pool(host=proxy.host, port=proxy.port, user="postgres")
            proxy.cut_after_client_message(b"COMMIT")   # the server commits, the client never hears
            ...

    Args:
        target_host: The server's address.
        target_port: The server's port.
        host: The loopback address to listen on.
        port: The port to listen on; ``0`` (the default) picks a free one.
        connect_timeout: Seconds to wait for the server when a client connects; on failure the
            client connection is reset, as a refused connection would be.

    Attributes:
        connections_total: Client connections accepted so far (blackholed ones included).
        bytes_to_server: Bytes forwarded from clients to the server.
        bytes_to_client: Bytes forwarded from the server to clients.
        triggers_fired: How many connections :meth:`cut_after_client_message` or
            :meth:`drop_after_client_message` has cut or killed.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self.connections_total = 0
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.triggers_fired = 0
        self._delay = {"to_server": 0.0, "to_client": 0.0}
        self._blackhole = False
        self._trigger: _Trigger | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._listener: socket.socket | None = socket.create_server((host, port), backlog=128)
        self._listener.setblocking(False)
        sockname = self._listener.getsockname()
        self._host: str = sockname[0]
        self._port: int = sockname[1]
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None  # made on the proxy's loop; set = not frozen
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"FaultProxy-{self._port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        self._call(self._start)

    # -- public API -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the proxy listens on (kept across :meth:`refuse` and :meth:`heal`)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the proxy, to hand to a client instead of the server's."""
        return self._host, self._port

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` new connections are forwarded to."""
        return self._target

    @property
    def active_connections(self) -> int:
        """Client connections open right now."""
        return len(self._conns)

    def delay(self, seconds: float, direction: Direction = "both") -> None:
        """Hold every chunk read from now on for ``seconds`` before forwarding it.

        A request/response round trip through the proxy thus takes at least ``2 * seconds`` with
        ``direction="both"``. Chunks are delayed, not serialised: throughput is unchanged.

        Args:
            seconds: Added latency; ``0`` removes it.
            direction: ``"both"``, ``"to_server"`` or ``"to_client"``.

        Raises:
            ValueError: If ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")

        async def apply() -> None:
            for key in ("to_server", "to_client"):
                if direction in ("both", key):
                    self._delay[key] = float(seconds)

        self._call(apply)

    def freeze(self) -> None:
        """Stop moving bytes in both directions, on open and new connections, closing nothing.

        Like a network link that silently drops everything: writes seem to succeed, reads wait
        forever, and even a close by the server is held back. :meth:`unfreeze` releases it all.
        """

        async def apply() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(apply)

    def unfreeze(self) -> None:
        """Release what :meth:`freeze` held; bytes flow again, in order."""

        async def apply() -> None:
            assert self._flowing is not None
            self._flowing.set()

        self._call(apply)

    def cut(self) -> None:
        """Close every open connection, on both sides, at once (the proxy keeps listening)."""
        self._call(lambda: self._close_all(reset=False))

    def reset(self) -> None:
        """Abort every open connection with a TCP RST (``SO_LINGER`` 0), on both sides."""
        self._call(lambda: self._close_all(reset=True))

    def blackhole(self) -> None:
        """Accept new connections but never connect them to the server nor answer them.

        What a host behind a dead link or a stuck load balancer looks like: the TCP handshake
        succeeds and then nothing. Bytes sent are read and dropped. Connections already open are
        not affected (combine with :meth:`freeze` for that); blackholed connections stay open,
        even after :meth:`heal`, until :meth:`cut`, :meth:`reset` or :meth:`close`.
        """

        async def apply() -> None:
            self._blackhole = True

        self._call(apply)

    def refuse(self) -> None:
        """Stop listening: new connections are refused (RST) until :meth:`heal`.

        Open connections are not affected. The port is kept and listened on again by
        :meth:`heal`.
        """
        self._call(self._stop_listening)

    def retarget(self, host: str, port: int) -> None:
        """Forward new connections to ``host:port``; open connections keep their server."""

        async def apply() -> None:
            self._target = (host, port)

        self._call(apply)

    def cut_after_client_message(
        self,
        match: bytes | Callable[[bytes], bool],
        *,
        once: bool = True,
        reset: bool = False,
        reply_timeout: float = 5.0,
    ) -> None:
        """Lose the server's answer to a matching client message, then cut the connection.

        The next client→server chunk that matches is forwarded to the server; the proxy then
        waits for the server's reply (at most ``reply_timeout`` seconds), drops it, and closes
        the connection on both sides. The server has done the work; the client only sees its
        connection die. With ``match=b"COMMIT"`` this is the lost-COMMIT case: the transaction
        is committed but the client cannot know.

        Matching works on what the client writes, not on protocol messages: asyncpg sends
        ``execute("COMMIT")`` as one Query message (``'Q'``) and a prepared statement as
        Parse/Bind/Execute messages, each written in one piece, so a substring match is reliable
        for small statements. A bytes pattern also matches across two consecutive chunks.

        One message trigger is armed at a time: this replaces one set by
        :meth:`drop_after_client_message`, and :meth:`heal` disarms it.

        Args:
            match: A byte string the chunk must contain, or a predicate over the chunk.
            once: Disarm after the first cut (otherwise every match cuts until :meth:`heal`).
            reset: Close the client side with a RST instead of a FIN.
            reply_timeout: Close anyway after this many seconds without a reply.
        """
        trigger = _Trigger(
            match=match, action="cut", once=once, reset=reset, reply_timeout=reply_timeout
        )

        async def apply() -> None:
            self._trigger = trigger

        self._call(apply)

    def drop_after_client_message(
        self, match: bytes | Callable[[bytes], bool], *, once: bool = True
    ) -> None:
        """Make one connection go silently dead right after a matching client message.

        The matching client→server chunk is forwarded; from then on that connection drops
        everything in both directions and never closes (even when a side closes), while the
        other connections keep flowing. This is a dead path under one long-lived connection,
        for instance a pub/sub subscription (``match=b"SUBSCRIBE"``) or a replication stream.
        The connection stays open, even after :meth:`heal`, until :meth:`cut`, :meth:`reset`
        or :meth:`close`. Matching works as in :meth:`cut_after_client_message`, whose trigger
        this replaces.

        Args:
            match: A byte string the chunk must contain, or a predicate over the chunk.
            once: Disarm after the first match (otherwise every match kills its connection).
        """
        trigger = _Trigger(match=match, action="drop", once=once)

        async def apply() -> None:
            self._trigger = trigger

        self._call(apply)

    def heal(self) -> None:
        """Clear every fault: no delay, no freeze, no blackhole, no armed trigger, listening again.

        The target set by :meth:`retarget` is kept; connections already closed stay closed.
        """
        self._call(self._heal)

    def close(self) -> None:
        """Close every connection and the listener and stop the proxy's thread. Idempotent."""
        if self._closed:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy.close() cannot be called from the proxy's own thread")
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self._host}:{self._port} -> {self._target[0]}:{self._target[1]}"
            f" active={self.active_connections}>"
        )

    # -- the proxy's thread ---------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())

    def _call(self, op: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        if self._closed:
            raise RuntimeError("the FaultProxy is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy methods cannot be called from the proxy's own thread")
        return asyncio.run_coroutine_threadsafe(op(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._start_listening()

    def _start_listening(self) -> None:
        if self._listener is None:
            self._listener = socket.create_server((self._host, self._port), backlog=128)
            self._listener.setblocking(False)
        # A reader callback rather than a task awaiting sock_accept(): cancelling that task can
        # drop a socket that was just accepted.
        self._loop.add_reader(self._listener.fileno(), self._accept, self._listener)

    async def _stop_listening(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def _heal(self) -> None:
        self._delay = {"to_server": 0.0, "to_client": 0.0}
        self._blackhole = False
        self._trigger = None
        assert self._flowing is not None
        self._flowing.set()
        if self._listener is None:
            self._start_listening()

    async def _shutdown(self) -> None:
        await self._stop_listening()
        await self._close_all(reset=False)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # BlockingIOError: nothing more to accept
                return
            sock.setblocking(False)
            self.connections_total += 1
            task = self._loop.create_task(self._handle(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
            # A handler cancelled before it wrapped the socket in a transport would leak it;
            # once wrapped, closing it again is harmless.
            task.add_done_callback(functools.partial(_close_socket, sock))

    async def _handle(self, sock: socket.socket) -> None:
        client_reader, client_writer = await asyncio.open_connection(sock=sock)
        conn = _Conn(client=client_writer)
        self._conns.add(conn)
        tasks: list[asyncio.Task[None]] = []
        try:
            if self._blackhole:
                # Read and drop until the client leaves or the proxy cuts the connection.
                with contextlib.suppress(OSError):
                    while await client_reader.read(_CHUNK):
                        pass
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self._target), self.connect_timeout
                )
            except (OSError, asyncio.TimeoutError):
                self._close(conn, reset=True)
                return
            conn.upstream = up_writer
            if conn.closed.is_set():  # cut while connecting
                up_writer.close()
                return
            tasks += self._pump(conn, client_reader, up_writer, "to_server")
            tasks += self._pump(conn, up_reader, client_writer, "to_client")
            await conn.closed.wait()
        finally:
            self._conns.discard(conn)
            self._close(conn, reset=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["to_server", "to_client"],
    ) -> list[asyncio.Task[None]]:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
        flowing = self._flowing
        assert flowing is not None

        async def read_side() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    await queue.put((self._loop.time() + self._delay[direction], data))
            except OSError:
                pass
            finally:
                # EOF or error: the write side forwards what is queued, then closes (unless frozen).
                await queue.put(None)

        async def write_side() -> None:
            try:
                while (item := await queue.get()) is not None:
                    due, data = item
                    await flowing.wait()
                    if (wait := due - self._loop.time()) > 0:
                        await asyncio.sleep(wait)
                        await flowing.wait()  # frozen while the chunk was delayed
                    if conn.dropping:
                        continue
                    if conn.swallowing is not None:
                        if direction == "to_client":  # the reply to lose: drop it and cut
                            self._close(conn, reset=conn.swallowing.reset)
                            return
                        continue  # the client spoke again before the cut: drop it too
                    # Count before writing, so a test that got the bytes sees them counted.
                    if direction == "to_server":
                        self.bytes_to_server += len(data)
                    else:
                        self.bytes_to_client += len(data)
                    writer.write(data)
                    await writer.drain()
                    if direction == "to_server":
                        self._check_trigger(conn, data)
                await flowing.wait()
            except OSError:
                pass
            if conn.dropping:
                return  # a dead path tells nobody that a side has gone
            if conn.swallowing is None or direction == "to_client":
                self._close(conn, reset=False)

        return [self._loop.create_task(read_side()), self._loop.create_task(write_side())]

    def _check_trigger(self, conn: _Conn, data: bytes) -> None:
        trigger = self._trigger
        if trigger is None:
            return
        if isinstance(trigger.match, bytes):
            window = conn.tail + data
            matched = trigger.match in window
            conn.tail = window[-(len(trigger.match) - 1) :] if len(trigger.match) > 1 else b""
        else:
            matched = trigger.match(data)
        if not matched:
            return
        if trigger.once:
            self._trigger = None
        self.triggers_fired += 1
        if trigger.action == "drop":
            conn.dropping = True
        else:
            conn.swallowing = trigger
            self._loop.call_later(trigger.reply_timeout, self._close, conn, trigger.reset)

    async def _close_all(self, *, reset: bool) -> None:
        for conn in list(self._conns):
            self._close(conn, reset=reset)
        # Let the transports run their connection_lost callbacks, so the sockets are really
        # closed when the caller's cut()/reset() returns.
        for _ in range(2):
            await asyncio.sleep(0)

    def _close(self, conn: _Conn, reset: bool) -> None:
        conn.closed.set()
        for writer in (conn.client, conn.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
            else:
                writer.close()
