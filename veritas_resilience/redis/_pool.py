"""A connection pool whose connections belong to a master generation.

:class:`FencedConnection` is a ``redis.asyncio.Connection`` that asks its router where to connect
*every* time it dials (the retry inside a command included: redis-py#3874), checks the node's
``ROLE`` before it is used, and refuses to send on a connection opened under an older generation.
:class:`FencedPool` closes idle connections of an older generation as soon as the generation
changes, closes in-use ones when they come back, and waits for a free connection instead of
failing when ``max_connections`` are in use. The success path takes no lock and allocates nothing
beyond redis-py's own work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import redis
import redis.asyncio
import redis.exceptions as rex
from redis.event import AsyncAfterConnectionReleasedEvent

from ._commands import RoleMismatchError, StaleConnectionError, mark_unsent
from ._compat import async_timeout
from ._topology import Address, Fence, role_problem

__all__ = [
    "DirectSendConnection",
    "FencedConnection",
    "FencedPool",
    "FencedSSLConnection",
    "Router",
]

_connect = getattr(redis.asyncio.Connection, "connect_check_health", None)
if _connect is None or "retry_socket_connect" not in inspect.signature(_connect).parameters:
    raise ImportError(
        "veritas_resilience.redis needs a redis-py whose asyncio Connection has "
        "connect_check_health(check_health, retry_socket_connect) (tested with 8.1); "
        f"this is redis-py {redis.__version__}"
    )

Role = Literal["master", "replica"]
Router = Callable[[], Awaitable[tuple[Address, int, Role]]]
"""Where a new connection goes: ``(address, generation, role expected there)``."""


class DirectSendConnection(redis.asyncio.Connection):
    """A ``redis.asyncio.Connection`` that writes without ``asyncio.wait_for`` (internal)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Write a packed command (refused on a fenced connection, see :meth:`_may_send`).

        Unlike redis-py, the write is not wrapped in ``asyncio.wait_for``: on Python 3.11 that
        can swallow a cancellation arriving as the write completes (the caller's task then runs
        on as if never cancelled), and it costs a task per command. The socket timeout applies
        only when the write actually has to wait for the socket.
        """
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health and self.health_check_interval:
            await self.check_health()  # type: ignore[no-untyped-call]
        # No await between this check and the write: nothing can switch in between.
        if not self._may_send():
            await self._refuse()
        writer = self._writer
        assert writer is not None
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                writer.write(command)
            else:
                writer.writelines(command)
            if writer.transport.get_write_buffer_size() and self.socket_timeout:
                async with async_timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()
        except asyncio.TimeoutError:
            await self.disconnect(nowait=True)
            raise rex.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise rex.ConnectionError(
                f"Error while writing to {self.host}:{self.port}: {exc}"
            ) from exc
        except BaseException:
            # A command half written cannot be taken back: the connection is unusable.
            await self.disconnect(nowait=True)
            raise

    def _may_send(self) -> bool:
        return True

    async def _refuse(self) -> None:
        raise StaleConnectionError("the connection may not send")


class FencedConnection(DirectSendConnection):
    """A connection tagged with the generation it was opened under (internal).

    Args:
        fence: The generation counter it is checked against before every send.
        router: Asked for the address at every dial.
        verify_role: Whether to run ``ROLE`` after connecting.
        on_role_mismatch: Called when ``ROLE`` says the node is not what the router expected.
        **kwargs: For ``redis.asyncio.Connection``.
    """

    def __init__(
        self,
        *,
        fence: Fence,
        router: Router,
        verify_role: bool = True,
        on_role_mismatch: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._fence = fence
        self._router = router
        self._verify_role = verify_role
        self._on_role_mismatch = on_role_mismatch
        self._gen = -1
        self._want: Role = "master"
        self.stale = False  # set on a READONLY-like reply: close it when it comes back
        self.pubsub = False  # long-lived: interrupted on a switch, not just closed on release
        kwargs["redis_connect_func"] = _after_connect
        super().__init__(**kwargs)

    @property
    def generation(self) -> int:
        """The generation it was opened under (-1 before the first connect)."""
        return self._gen

    @property
    def address(self) -> Address:
        """Where it is (or was last) connected."""
        return (self.host, self.port)

    async def connect(self) -> None:
        """Connect if not connected (to wherever the router says now)."""
        if self._reader is not None:
            return
        await self.connect_check_health(check_health=True, retry_socket_connect=False)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        """Dial the router's current address; every (re)connect path of redis-py comes here.

        Errors of this phase are marked as "not sent", so the client may retry any command.
        """
        if self.is_connected:
            return
        address, generation, want = await self._router()
        self.host, self.port = address
        self._gen = generation
        self._want = want
        try:
            # retry_socket_connect=False: the client's own retry decides what happens next.
            await super().connect_check_health(
                check_health=check_health, retry_socket_connect=False
            )
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            mark_unsent(exc)
            raise

    def _may_send(self) -> bool:
        return self._gen == self._fence.gen

    async def _refuse(self) -> None:
        gen, now = self._gen, self._fence.gen
        await self.disconnect(nowait=True)
        raise StaleConnectionError(
            f"connection to {self.host}:{self.port} belongs to generation {gen}, the current one "
            f"is {now}: nothing was sent"
        )

    def repr_pieces(self) -> list[tuple[str, Any]]:
        """Pieces of ``repr()``: where and which generation (never credentials)."""
        return [("host", self.host), ("port", self.port), ("db", self.db), ("gen", self._gen)]


async def _after_connect(conn: FencedConnection) -> None:
    """redis-py's handshake (AUTH, SELECT...), then ROLE: is the node what we came for?"""
    await conn.on_connect()
    if not conn._verify_role:
        return
    await conn.send_command("ROLE", check_health=False)
    reply = await conn.read_response()
    problem = role_problem(reply, conn._want)
    if problem is not None:
        if conn._on_role_mismatch is not None:
            conn._on_role_mismatch()
        raise RoleMismatchError(f"{conn.host}:{conn.port} is not usable as {conn._want}: {problem}")


class FencedSSLConnection(FencedConnection, redis.asyncio.SSLConnection):
    """:class:`FencedConnection` over TLS."""


def _expire(waiter: asyncio.Future[Any], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(
            rex.MaxConnectionsError(f"no connection became free within {timeout:g}s")
        )


class FencedPool(redis.asyncio.ConnectionPool):
    """The pool of one client: fenced connections, waiting when all are in use (internal).

    Args:
        fence: The generation counter of the role this pool serves.
        router: Where new connections go.
        role: ``"master"`` or ``"replica"``.
        max_connections: Connections at most; further callers wait.
        pool_timeout: Seconds a caller waits for a free connection before
            ``MaxConnectionsError``; None waits as long as it takes.
        verify_role: Run ``ROLE`` on every new connection.
        on_role_mismatch: Called when a new connection finds the wrong role.
        ssl: Connect with TLS.
        **connection_kwargs: For each ``FencedConnection``.
    """

    def __init__(
        self,
        *,
        fence: Fence,
        router: Router,
        role: Role,
        max_connections: int,
        pool_timeout: float | None,
        verify_role: bool = True,
        on_role_mismatch: Callable[[], None] | None = None,
        ssl: bool = False,
        **connection_kwargs: Any,
    ) -> None:
        self.role = role
        self._fence = fence
        self._timeout = pool_timeout
        self._waiters: collections.deque[asyncio.Future[FencedConnection]] = collections.deque()
        self.stale_closed = 0
        self._dispatch_release = connection_kwargs.get("credential_provider") is not None
        super().__init__(
            connection_class=FencedSSLConnection if ssl else FencedConnection,
            max_connections=max_connections,
            fence=fence,
            router=router,
            verify_role=verify_role,
            on_role_mismatch=on_role_mismatch,
            **connection_kwargs,
        )

    @property
    def fence(self) -> Fence:
        """The generation counter this pool follows."""
        return self._fence

    def counts(self) -> tuple[int, int]:
        """``(idle, in use)`` connection objects; idle ones may be disconnected."""
        return len(self._available_connections), len(self._in_use_connections)

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> FencedConnection:
        """Take a connection, connected to the current node of this pool's role."""
        try:
            conn: FencedConnection = self._available_connections.pop()  # type: ignore[assignment]
        except IndexError:
            if len(self._in_use_connections) < self.max_connections:
                conn = self.make_connection()  # type: ignore[no-untyped-call]
            else:
                conn = await self._wait_for_connection()
        self._in_use_connections.add(conn)
        try:
            if conn._gen != self._fence.gen and conn.is_connected:
                self.stale_closed += 1
                await conn.disconnect(nowait=True)
            await self.ensure_connection(conn)
        except BaseException as exc:
            await self.release(conn)
            if isinstance(exc, (rex.ConnectionError, rex.TimeoutError)):
                mark_unsent(exc)
            raise
        return conn

    async def _wait_for_connection(self) -> FencedConnection:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[FencedConnection] = loop.create_future()
        self._waiters.append(waiter)
        timer = None
        if self._timeout is not None:
            timer = loop.call_later(self._timeout, _expire, waiter, self._timeout)
        try:
            return await waiter
        except BaseException:
            # Cancelled after a connection was handed over: pass it on, or it would leak.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand_over(waiter.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def release(self, connection: redis.asyncio.connection.AbstractConnection) -> None:
        """Give a connection back; one of an older generation (or marked stale) is closed."""
        conn: FencedConnection = connection  # type: ignore[assignment]
        try:
            conn.pubsub = False
            if conn._gen != self._fence.gen or conn.stale:
                conn.stale = False
                if conn.is_connected:
                    self.stale_closed += 1
                    await conn.disconnect(nowait=True)
        finally:
            # Synchronous, so a caller cancelled while releasing cannot lose the slot.
            self._hand_over(conn)
        dispatcher = self._event_dispatcher
        if self._dispatch_release and dispatcher is not None:
            # Only needed for credential providers that re-authenticate released connections.
            event = AsyncAfterConnectionReleasedEvent(conn)  # type: ignore[no-untyped-call]
            await dispatcher.dispatch_async(event)

    def _hand_over(self, conn: FencedConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # stays in use: ownership passes to the waiter
                return
        if conn in self._in_use_connections:
            self._in_use_connections.remove(conn)
            self._available_connections.append(conn)

    async def fence_changed(self) -> int:
        """The generation moved: close idle connections of older ones, interrupt Pub/Sub ones.

        Returns:
            How many idle connections were closed.
        """
        gen = self._fence.gen
        closed = 0
        for conn in list(self._available_connections):
            c: FencedConnection = conn  # type: ignore[assignment]
            if c.is_connected and c._gen != gen:
                closed += 1
                await c.disconnect(nowait=True)
        for conn in list(self._in_use_connections):
            c = conn  # type: ignore[assignment]
            if c.pubsub and c.is_connected and c._gen != gen and c._writer is not None:
                # A subscriber blocks in a read on the old node: cut the socket under it, and
                # it reconnects (and resubscribes) to the new one.
                c._writer.transport.abort()
        self.stale_closed += closed
        return closed

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Close connections (in-use ones too, by default); waiters get an error."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(rex.ConnectionError("the connection pool was closed"))
        await super().disconnect(inuse_connections)
