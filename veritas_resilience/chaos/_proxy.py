"""The one TCP fault proxy engine: forwarding, Toxiproxy's toxics, and the testing kit's faults.

A :class:`_Proxy` listens on one address and forwards every connection to its upstream, through
two pumps per connection (``upstream``: client to server; ``downstream``: server to client). On
its way, each chunk meets the toxics of its stream (latency with jitter, bandwidth, slicer,
limit_data, timeout, and on close slow_close; reset_peer and timeout also act on a timer) and the
kit's runtime faults (delay, freeze, blackhole, message triggers). Everything here runs on one
event loop, owned by a :class:`_LoopThread`; :class:`~veritas_resilience.chaos.ProxyServer` and
:class:`~veritas_resilience.testing.FaultProxy` are two faces of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random as _random
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ._errors import ProxyError

__all__ = ["TOXIC_TYPES", "Stream", "Toxic"]

Stream = Literal["upstream", "downstream"]
_T = TypeVar("_T")
_CHUNK = 65536
_QUEUE_CHUNKS = 64  # per direction; past this the proxy stops reading and TCP pushes back

TOXIC_TYPES: Mapping[str, Mapping[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
}
"""Every toxic type with its attributes and their defaults (Toxiproxy's units: ms, KB/s, bytes,
and microseconds for the slicer's delay)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Toxic:
    """A toxic, as Toxiproxy defines it: what to do to one direction of a proxy's connections.

    Example::

        Toxic(type="latency", attributes={"latency": 200, "jitter": 50})          # downstream
        Toxic(type="limit_data", stream="upstream", attributes={"bytes": 1024})

    Args:
        type: One of :data:`TOXIC_TYPES`: ``latency`` (``latency``, ``jitter`` ms),
            ``bandwidth`` (``rate`` KB/s, 0 = nothing flows), ``slow_close`` (``delay`` ms),
            ``timeout`` (``timeout`` ms: data stops, the connection closes after it; 0 = never),
            ``reset_peer`` (``timeout`` ms, then TCP RST), ``slicer`` (``average_size``,
            ``size_variation`` bytes, ``delay`` µs between slices), ``limit_data`` (``bytes``,
            then close).
        name: Unique per proxy; ``<type>_<stream>`` by default.
        stream: ``"downstream"`` (server to client, the default) or ``"upstream"``.
        toxicity: Probability (0 to 1) that the toxic applies to a given connection.
        attributes: The type's attributes (integers >= 0); missing ones take their default.

    Raises:
        ProxyError: (status 400) If the type, stream, toxicity or an attribute is invalid.
    """

    type: str
    name: str = ""
    stream: Stream = "downstream"
    toxicity: float = 1.0
    attributes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        defaults = TOXIC_TYPES.get(self.type)
        if defaults is None:
            raise ProxyError(
                f"toxic type must be one of {', '.join(TOXIC_TYPES)}, got {self.type!r}", 400
            )
        if self.stream not in ("upstream", "downstream"):
            raise ProxyError(f"stream must be 'upstream' or 'downstream', got {self.stream!r}", 400)
        if (
            isinstance(self.toxicity, bool)
            or not isinstance(self.toxicity, (int, float))
            or not 0.0 <= self.toxicity <= 1.0
        ):
            raise ProxyError(f"toxicity must be between 0 and 1, got {self.toxicity!r}", 400)
        attributes = dict(defaults)
        for key, value in dict(self.attributes).items():
            if key not in defaults:
                raise ProxyError(
                    f"{self.type} toxic has no attribute {key!r} (it has {', '.join(defaults)})",
                    400,
                )
            if isinstance(value, float) and float(value).is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProxyError(f"{self.type}.{key} must be an integer >= 0, got {value!r}", 400)
            attributes[key] = value
        object.__setattr__(self, "attributes", attributes)
        object.__setattr__(self, "toxicity", float(self.toxicity))
        if not self.name:
            object.__setattr__(self, "name", f"{self.type}_{self.stream}")

    def to_json(self) -> dict[str, Any]:
        """The toxic as Toxiproxy's API shows it."""
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_json(cls, data: Any) -> Toxic:
        """Build a toxic from a Toxiproxy API body.

        Raises:
            ProxyError: (status 400) If the body is not a valid toxic.
        """
        if not isinstance(data, dict) or "type" not in data:
            raise ProxyError("a toxic needs at least a 'type'", 400)
        attributes = data.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ProxyError("toxic attributes must be an object", 400)
        return cls(
            type=str(data["type"]),
            name=str(data.get("name") or ""),
            stream=data.get("stream") or "downstream",
            toxicity=data.get("toxicity", 1.0),
            attributes=attributes,
        )


def parse_address(value: Any, field: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) as a tuple; ProxyError 400 if malformed."""
    if not isinstance(value, str) or ":" not in value:
        raise ProxyError(f"{field} must be 'host:port', got {value!r}", 400)
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ProxyError(f"{field} must be 'host:port' with a port 0-65535, got {value!r}", 400)
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _LoopThread:
    """An asyncio event loop in a daemon thread, and a thread-safe way to run coroutines on it.

    The proxy runs on its own loop so that it keeps forwarding whatever the caller's loop does
    (a test blocking it, a trio program, plain synchronous code).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def call(self, op: Callable[[], Coroutine[Any, Any, _T]], owner: str) -> _T:
        """Run ``op()`` on the loop and return its result (re-raising its error)."""
        if self.closed:
            raise RuntimeError(f"the {owner} is closed")
        if threading.current_thread() is self.thread:
            raise RuntimeError(f"{owner} methods cannot be called from the proxy's own thread")
        return asyncio.run_coroutine_threadsafe(op(), self.loop).result(timeout=30)

    def close(self, shutdown: Callable[[], Coroutine[Any, Any, None]], owner: str) -> None:
        if self.closed:
            return
        if threading.current_thread() is self.thread:
            raise RuntimeError(f"{owner}.close() cannot be called from the proxy's own thread")
        self.closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def _close_socket(sock: socket.socket, _: object) -> None:
    sock.close()


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
    # Toxicity is drawn once per connection and toxic: id(toxic) -> (toxic, applies).
    applies: dict[int, tuple[Toxic, bool]] = field(default_factory=dict)
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})


class _Proxy:
    """One proxy: a listener, its upstream, its toxics, its faults and its open connections.

    Lives on one event loop; every method except the constructor runs on it.
    """

    def __init__(
        self,
        name: str,
        listener: socket.socket,
        upstream: tuple[str, int],
        loop: asyncio.AbstractEventLoop,
        *,
        rng: _random.Random,
        connect_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.loop = loop
        self.rng = rng
        self.connect_timeout = connect_timeout
        sockname = listener.getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]
        self.listener: socket.socket | None = listener
        self.listener.setblocking(False)
        self.target = upstream
        self.enabled = True
        self.toxics: dict[str, Toxic] = {}
        self.delay = {"upstream": 0.0, "downstream": 0.0}
        self.blackholed = False
        self.trigger: _Trigger | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns: set[_Conn] = set()
        self.handlers: set[asyncio.Task[None]] = set()
        self.connections_total = 0
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.triggers_fired = 0

    # -- listening ------------------------------------------------------------------------------

    def start_listening(self) -> None:
        if self.listener is None:
            self.listener = socket.create_server((self.host, self.port), backlog=128)
            self.listener.setblocking(False)
        # A reader callback rather than a task awaiting sock_accept(): cancelling that task can
        # drop a socket that was just accepted.
        self.loop.add_reader(self.listener.fileno(), self._accept, self.listener)

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None

    async def set_enabled(self, enabled: bool) -> None:
        """Toxiproxy's enable/disable: disabling stops listening and closes every connection."""
        if enabled and not self.enabled:
            self.start_listening()
        elif not enabled and self.enabled:
            self.stop_listening()
            await self.close_all(reset=False)
        self.enabled = enabled

    async def relisten(self, host: str, port: int) -> None:
        """Move the listener to ``host:port`` (``0``: a free port)."""
        listener = socket.create_server((host, port), backlog=128)
        was_listening = self.listener is not None
        self.stop_listening()
        listener.setblocking(False)
        sockname = listener.getsockname()
        self.host, self.port = sockname[0], sockname[1]
        self.listener = listener
        if was_listening:
            self.start_listening()
        else:
            listener.close()
            self.listener = None

    async def shutdown(self) -> None:
        self.stop_listening()
        await self.close_all(reset=False)
        handlers = list(self.handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    # -- toxics ---------------------------------------------------------------------------------

    def add_toxic(self, toxic: Toxic, *, replace: bool = False) -> None:
        if toxic.name in self.toxics and not replace:
            raise ProxyError(f"toxic {toxic.name!r} already exists on proxy {self.name!r}", 409)
        old = self.toxics.get(toxic.name)
        if old is not None:
            self._detach(old)
        self.toxics[toxic.name] = toxic
        for conn in self.conns:
            self._attach(conn, toxic)

    def remove_toxic(self, name: str) -> None:
        toxic = self.toxics.pop(name, None)
        if toxic is None:
            raise ProxyError(f"toxic {name!r} not found on proxy {self.name!r}", 404)
        self._detach(toxic)

    def clear_toxics(self) -> None:
        for name in list(self.toxics):
            self.remove_toxic(name)

    def _applies(self, conn: _Conn, toxic: Toxic) -> bool:
        entry = conn.applies.get(id(toxic))
        if entry is None or entry[0] is not toxic:
            applies = toxic.toxicity >= 1.0 or self.rng.random() < toxic.toxicity
            conn.applies[id(toxic)] = (toxic, applies)
            return applies
        return entry[1]

    def _active(self, conn: _Conn, stream: Stream, kind: str) -> list[Toxic]:
        return [
            t
            for t in self.toxics.values()
            if t.type == kind and t.stream == stream and self._applies(conn, t)
        ]

    def _attach(self, conn: _Conn, toxic: Toxic) -> None:
        """Start what a toxic does on its own clock: timeout's close, reset_peer's RST."""
        if toxic.type not in ("timeout", "reset_peer") or not self._applies(conn, toxic):
            return
        ms = toxic.attributes["timeout"]
        if toxic.type == "timeout" and ms == 0:
            return  # data stops until the toxic goes; the connection stays open
        reset = toxic.type == "reset_peer"
        conn.timers[toxic.name] = self.loop.call_later(ms / 1000, self._close, conn, reset)

    def _detach(self, toxic: Toxic) -> None:
        for conn in self.conns:
            timer = conn.timers.pop(toxic.name, None)
            if timer is not None:
                timer.cancel()
            conn.applies.pop(id(toxic), None)

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # BlockingIOError: nothing more to accept
                return
            sock.setblocking(False)
            self.connections_total += 1
            task = self.loop.create_task(self._handle(sock))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
            # A handler cancelled before it wrapped the socket in a transport would leak it;
            # once wrapped, closing it again is harmless.
            task.add_done_callback(functools.partial(_close_socket, sock))

    async def _handle(self, sock: socket.socket) -> None:
        client_reader, client_writer = await asyncio.open_connection(sock=sock)
        conn = _Conn(client=client_writer)
        self.conns.add(conn)
        tasks: list[asyncio.Task[None]] = []
        try:
            if not self.enabled:  # accepted just before the proxy was disabled
                return
            if self.blackholed:
                # Read and drop until the client leaves or the proxy cuts the connection.
                with contextlib.suppress(OSError):
                    while await client_reader.read(_CHUNK):
                        pass
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self.connect_timeout
                )
            except (OSError, asyncio.TimeoutError):
                self._close(conn, reset=True)
                return
            conn.upstream = up_writer
            if conn.closed.is_set():  # cut while connecting
                up_writer.close()
                return
            for toxic in list(self.toxics.values()):
                self._attach(conn, toxic)
            tasks += self._pump(conn, client_reader, up_writer, "upstream")
            tasks += self._pump(conn, up_reader, client_writer, "downstream")
            await conn.closed.wait()
        finally:
            self.conns.discard(conn)
            for timer in conn.timers.values():
                timer.cancel()
            self._close(conn, reset=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream: Stream,
    ) -> list[asyncio.Task[None]]:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
        flowing = self.flowing
        loop = self.loop

        async def read_side() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    await queue.put((loop.time(), data))
            except OSError:
                pass
            finally:
                # EOF or error: the write side forwards what is queued, then closes (unless frozen).
                await queue.put(None)

        async def write_side() -> None:
            try:
                while (item := await queue.get()) is not None:
                    received, data = item
                    await flowing.wait()
                    if (wait := received + self._latency(conn, stream) - loop.time()) > 0:
                        await asyncio.sleep(wait)
                        await flowing.wait()  # frozen while the chunk was delayed
                    if conn.dropping or self._active(conn, stream, "timeout"):
                        continue
                    if conn.swallowing is not None:
                        if stream == "downstream":  # the reply to lose: drop it and cut
                            self._close(conn, reset=conn.swallowing.reset)
                            return
                        continue  # the client spoke again before the cut: drop it too
                    data, limit_reached = self._limit(conn, stream, data)
                    # Count before writing, so a test that got the bytes sees them counted.
                    if stream == "upstream":
                        self.bytes_to_server += len(data)
                    else:
                        self.bytes_to_client += len(data)
                    await self._write(conn, stream, writer, data)
                    if stream == "upstream":
                        self._check_trigger(conn, data)
                    if limit_reached:
                        self._close(conn, reset=False)
                        return
                await flowing.wait()
            except OSError:
                pass
            if conn.dropping:
                return  # a dead path tells nobody that a side has gone
            if self._active(conn, stream, "timeout"):
                await conn.closed.wait()  # a timed-out link shows no close either
                return
            delays = [t.attributes["delay"] for t in self._active(conn, stream, "slow_close")]
            if delays:
                await asyncio.sleep(max(delays) / 1000)
            if conn.swallowing is None or stream == "downstream":
                self._close(conn, reset=False)

        return [loop.create_task(read_side()), loop.create_task(write_side())]

    def _latency(self, conn: _Conn, stream: Stream) -> float:
        total = self.delay[stream]
        for toxic in self._active(conn, stream, "latency"):
            jitter = toxic.attributes["jitter"]
            ms = toxic.attributes["latency"] + (self.rng.uniform(-jitter, jitter) if jitter else 0)
            total += max(ms, 0.0) / 1000
        return total

    def _limit(self, conn: _Conn, stream: Stream, data: bytes) -> tuple[bytes, bool]:
        limits = [t.attributes["bytes"] for t in self._active(conn, stream, "limit_data")]
        if not limits:
            return data, False
        room = max(min(limits) - conn.sent[stream], 0)
        conn.sent[stream] += min(len(data), room)
        if len(data) >= room:
            return data[:room], True
        return data, False

    async def _write(
        self, conn: _Conn, stream: Stream, writer: asyncio.StreamWriter, data: bytes
    ) -> None:
        slicers = self._active(conn, stream, "slicer")
        bandwidths = self._active(conn, stream, "bandwidth")
        if not slicers and not bandwidths:
            writer.write(data)
            await writer.drain()
            return
        pieces = [data]
        pause = 0.0
        if slicers:
            attrs = slicers[0].attributes
            pieces = self._slice(data, attrs["average_size"], attrs["size_variation"])
            pause = attrs["delay"] / 1_000_000
        rate = min(t.attributes["rate"] for t in bandwidths) * 1000 if bandwidths else None
        for index, piece in enumerate(pieces):
            if rate is not None:
                # A rate of 0 lets nothing through: wait until the connection goes.
                if rate == 0:
                    await conn.closed.wait()
                    return
                step = max(rate // 10, 1)  # 100 ms worth of bytes at a time
                for start in range(0, len(piece), step):
                    part = piece[start : start + step]
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(len(part) / rate)
            else:
                writer.write(piece)
                await writer.drain()
            if pause and index < len(pieces) - 1:
                await asyncio.sleep(pause)

    def _slice(self, data: bytes, average: int, variation: int) -> list[bytes]:
        if average <= 0:
            return [data]
        pieces = []
        start = 0
        while start < len(data):
            size = average + (self.rng.randint(-variation, variation) if variation else 0)
            size = max(size, 1)
            pieces.append(data[start : start + size])
            start += size
        return pieces

    def _check_trigger(self, conn: _Conn, data: bytes) -> None:
        trigger = self.trigger
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
            self.trigger = None
        self.triggers_fired += 1
        if trigger.action == "drop":
            conn.dropping = True
        else:
            conn.swallowing = trigger
            self.loop.call_later(trigger.reply_timeout, self._close, conn, trigger.reset)

    async def close_all(self, *, reset: bool) -> None:
        for conn in list(self.conns):
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

    # -- the kit's faults -----------------------------------------------------------------------

    def heal(self) -> None:
        self.delay = {"upstream": 0.0, "downstream": 0.0}
        self.blackholed = False
        self.trigger = None
        self.flowing.set()
        if self.listener is None and self.enabled:
            self.start_listening()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": format_address(self.host, self.port),
            "upstream": format_address(*self.target),
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics.values()],
        }
