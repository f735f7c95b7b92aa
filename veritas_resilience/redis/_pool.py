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
from ._compat import DirectSendConnection
from ._errors import PoolExhaustedError, RedisAuthenticationError
from ._topology import Address, Fence, describe, role_problem

__all__ = [
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


class FencedConnection(DirectSendConnection):
    """A connection tagged with the generation it was opened under (internal).

    Args:
        fence: The generation counter it is checked against before every send.
        router: Asked for the address at every dial.
        verify_role: Whether to run ``ROLE`` after connecting.
        on_role_mismatch: Called when ``ROLE`` says the node is not what the router expected.
        owner: The client's name, for errors.
        dial: Maps the router's address to the one to connect to (``address_remap``).
        **kwargs: For ``redis.asyncio.Connection``.
    """

    def __init__(
        self,
        *,
        fence: Fence,
        router: Router,
        verify_role: bool = True,
        on_role_mismatch: Callable[[], None] | None = None,
        owner: str = "redis",
        dial: Callable[[Address], Address] | None = None,
        **kwargs: Any,
    ) -> None:
        self._fence = fence
        self._dial = dial
        self._router = router
        self._verify_role = verify_role
        self._on_role_mismatch = on_role_mismatch
        self._owner = owner
        self._gen = -1
        self._want: Role = "master"
        self.stale = False  # set on a READONLY-like reply: close it when it comes back
        self.pubsub = False  # long-lived: interrupted on a switch, not just closed on release
        self.abandoned = False  # cut loose at a switch: closed, not pooled, when it comes back
        kwargs["redis_connect_func"] = _after_connect
        super().__init__(**kwargs)

    @property
    def generation(self) -> int:
        """The generation it was opened under (-1 before the first connect)."""
        return self._gen

    @property
    def address(self) -> Address:
        """Where it is (or was last) connected (after ``address_remap``)."""
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
        if self._dial is not None:
            address = self._dial(address)
        self.host, self.port = address
        self._gen = generation
        self._want = want
        try:
            # retry_socket_connect=False: the client's own retry decides what happens next.
            await super().connect_check_health(
                check_health=check_health, retry_socket_connect=False
            )
        except rex.AuthenticationError as exc:
            # Wrong credentials: no retry can fix it, say which ones.
            raise RedisAuthenticationError(
                name=self._owner,
                role="data node",
                node=f"{self.host}:{self.port}",
                detail=describe(exc),
            ) from exc
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


def _expire(waiter: asyncio.Future[Any], name: str, size: int, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(PoolExhaustedError(name=name, max_connections=size, waited=timeout))


class FencedPool(redis.asyncio.ConnectionPool):
    """The pool of one client: fenced connections, waiting when all are in use (internal).

    At a generation change, connections of older generations are closed if idle and
    *abandoned* if in use: their sockets are cut at once (a command waiting on a frozen master
    fails now instead of at its socket timeout), they stop counting against
    ``max_connections``, and callers waiting for a connection get fresh ones for the new node.

    Args:
        fence: The generation counter of the role this pool serves.
        router: Where new connections go.
        role: ``"master"`` or ``"replica"``.
        max_connections: Connections at most; further callers wait.
        pool_timeout: Seconds a caller waits for a free connection before
            :class:`~veritas_resilience.redis.PoolExhaustedError`; None waits as long as it
            takes.
        name: The client's name, for errors.
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
        name: str = "redis",
        verify_role: bool = True,
        on_role_mismatch: Callable[[], None] | None = None,
        ssl: bool = False,
        **connection_kwargs: Any,
    ) -> None:
        self.role = role
        self.name = name
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
            owner=name,
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
        """Take a connection, connected to the current node of this pool's role.

        Whatever interrupts it (a connection error, the call's deadline) happened before the
        command was sent, and is marked so.
        """
        try:
            conn: FencedConnection = self._available_connections.pop()  # type: ignore[assignment]
        except IndexError:
            if len(self._in_use_connections) < self.max_connections:
                conn = self.make_connection()  # type: ignore[no-untyped-call]
            else:
                try:
                    conn = await self._wait_for_connection()
                except BaseException as exc:
                    mark_unsent(exc)
                    raise
        self._in_use_connections.add(conn)
        try:
            if conn._gen != self._fence.gen and conn.is_connected:
                self.stale_closed += 1
                await conn.disconnect(nowait=True)
            await self.ensure_connection(conn)
        except BaseException as exc:
            await self.release(conn)
            mark_unsent(exc)
            raise
        return conn

    async def _wait_for_connection(self) -> FencedConnection:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[FencedConnection] = loop.create_future()
        self._waiters.append(waiter)
        timer = None
        if self._timeout is not None:
            timer = loop.call_later(
                self._timeout, _expire, waiter, self.name, self.max_connections, self._timeout
            )
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
        if conn.abandoned:
            # Cut loose at a switch and no longer counted: just make sure it is closed.
            conn.abandoned = False
            if conn.is_connected:
                await conn.disconnect(nowait=True)
            return
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
        """The generation moved: close idle connections of older ones, abandon in-use ones.

        An in-use connection of an older generation gets its socket cut at once, whatever its
        caller is waiting for: a reply that arrives on it now could only be the old master's,
        and a frozen master would hold the caller (and the pool slot) until the socket timeout.
        A Pub/Sub connection stays with its subscriber, which reconnects and resubscribes on
        the new node; any other is dropped from the pool's count, and waiting callers get new
        connections in its place. Nothing here awaits the old node.

        Returns:
            How many connections were closed or abandoned.
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
            if c._gen == gen or c._gen < 0:
                continue  # current, or new and still asking the router where to go
            writer = c._writer
            if writer is not None:
                writer.transport.abort()
            if c.pubsub:
                continue
            c.abandoned = True
            self._in_use_connections.discard(c)
            closed += 1
        while self._waiters and len(self._in_use_connections) < self.max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                fresh: FencedConnection = self.make_connection()  # type: ignore[no-untyped-call]
                self._in_use_connections.add(fresh)
                waiter.set_result(fresh)
        self.stale_closed += closed
        return closed

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Close connections (in-use ones too, by default); waiters get an error."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(rex.ConnectionError("the connection pool was closed"))
        await super().disconnect(inuse_connections)
