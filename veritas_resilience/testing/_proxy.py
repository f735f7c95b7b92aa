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

It is a face of the chaos package's proxy engine (:mod:`veritas_resilience.chaos`): the same
forwarding serves :class:`~veritas_resilience.chaos.ProxyServer`, and Toxiproxy's toxics can be
added here too (:meth:`FaultProxy.add_toxic`).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, Protocol

from ..chaos._proxy import Stream, Toxic, _LoopThread, _Proxy, _Trigger

__all__ = ["FaultProxy", "FaultProxyFactory"]

Direction = Literal["both", "to_server", "to_client"]
_STREAMS: dict[str, tuple[Stream, ...]] = {
    "both": ("upstream", "downstream"),
    "to_server": ("upstream",),
    "to_client": ("downstream",),
}


class FaultProxyFactory(Protocol):
    """The type of the ``fault_proxy_factory`` fixture, for annotating tests."""

    def __call__(self, target_host: str, target_port: int, **kwargs: Any) -> FaultProxy:
        """Start and return a proxy; ``kwargs`` go to :class:`FaultProxy`."""
        ...


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
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        listener = socket.create_server((host, port), backlog=128)
        sockname = listener.getsockname()
        self._host: str = sockname[0]
        self._port: int = sockname[1]
        self._thread = _LoopThread(name=f"FaultProxy-{self._port}")
        self._proxy = _Proxy(
            f"fault-proxy-{self._port}",
            listener,
            (target_host, target_port),
            self._thread.loop,
            rng=random.Random(),
            connect_timeout=connect_timeout,
        )

        async def start() -> None:
            self._proxy.start_listening()

        self._call(start)

    @property
    def connections_total(self) -> int:
        """Client connections accepted so far (blackholed ones included)."""
        return self._proxy.connections_total

    @property
    def bytes_to_server(self) -> int:
        """Bytes forwarded from clients to the server."""
        return self._proxy.bytes_to_server

    @property
    def bytes_to_client(self) -> int:
        """Bytes forwarded from the server to clients."""
        return self._proxy.bytes_to_client

    @property
    def triggers_fired(self) -> int:
        """Connections cut or killed by a message trigger so far."""
        return self._proxy.triggers_fired

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
        return self._proxy.target

    @property
    def active_connections(self) -> int:
        """Client connections open right now."""
        return len(self._proxy.conns)

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

        if direction not in _STREAMS:
            raise ValueError(
                f"direction must be 'both', 'to_server' or 'to_client', got {direction!r}"
            )

        async def apply() -> None:
            for stream in _STREAMS[direction]:
                self._proxy.delay[stream] = float(seconds)

        self._call(apply)

    def freeze(self) -> None:
        """Stop moving bytes in both directions, on open and new connections, closing nothing.

        Like a network link that silently drops everything: writes seem to succeed, reads wait
        forever, and even a close by the server is held back. :meth:`unfreeze` releases it all.
        """

        async def apply() -> None:
            self._proxy.flowing.clear()

        self._call(apply)

    def unfreeze(self) -> None:
        """Release what :meth:`freeze` held; bytes flow again, in order."""

        async def apply() -> None:
            self._proxy.flowing.set()

        self._call(apply)

    def cut(self) -> None:
        """Close every open connection, on both sides, at once (the proxy keeps listening)."""
        self._call(lambda: self._proxy.close_all(reset=False))

    def reset(self) -> None:
        """Abort every open connection with a TCP RST (``SO_LINGER`` 0), on both sides."""
        self._call(lambda: self._proxy.close_all(reset=True))

    def blackhole(self) -> None:
        """Accept new connections but never connect them to the server nor answer them.

        What a host behind a dead link or a stuck load balancer looks like: the TCP handshake
        succeeds and then nothing. Bytes sent are read and dropped. Connections already open are
        not affected (combine with :meth:`freeze` for that); blackholed connections stay open,
        even after :meth:`heal`, until :meth:`cut`, :meth:`reset` or :meth:`close`.
        """

        async def apply() -> None:
            self._proxy.blackholed = True

        self._call(apply)

    def refuse(self) -> None:
        """Stop listening: new connections are refused (RST) until :meth:`heal`.

        Open connections are not affected. The port is kept and listened on again by
        :meth:`heal`.
        """

        async def apply() -> None:
            self._proxy.stop_listening()

        self._call(apply)

    def retarget(self, host: str, port: int) -> None:
        """Forward new connections to ``host:port``; open connections keep their server."""

        async def apply() -> None:
            self._proxy.target = (host, port)

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
            self._proxy.trigger = trigger

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
            self._proxy.trigger = trigger

        self._call(apply)

    def heal(self) -> None:
        """Clear every fault: no delay, no freeze, no blackhole, no armed trigger, listening again.

        The target set by :meth:`retarget` is kept; connections already closed stay closed.
        """

        async def apply() -> None:
            self._proxy.heal()

        self._call(apply)

    def add_toxic(self, toxic: Toxic) -> None:
        """Add one of Toxiproxy's toxics (see :class:`~veritas_resilience.chaos.Toxic`).

        It applies to open and new connections at once, next to the faults set by the other
        methods, until :meth:`remove_toxic` (``heal()`` leaves toxics alone).

        Raises:
            veritas_resilience.chaos.ProxyError: If a toxic of that name is already there.
        """

        async def apply() -> None:
            self._proxy.add_toxic(toxic)

        self._call(apply)

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic added by :meth:`add_toxic`.

        Raises:
            veritas_resilience.chaos.ProxyError: If there is no toxic of that name.
        """

        async def apply() -> None:
            self._proxy.remove_toxic(name)

        self._call(apply)

    def close(self) -> None:
        """Close every connection and the listener and stop the proxy's thread. Idempotent."""
        self._thread.close(self._proxy.shutdown, "FaultProxy")

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
            f"<FaultProxy {self._host}:{self._port} -> {self.target[0]}:{self.target[1]}"
            f" active={self.active_connections}>"
        )

    def _call(self, op: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._thread.call(op, "FaultProxy")
