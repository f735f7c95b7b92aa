"""Connections held by the caller: ``client.transaction()`` and ``client.acquire()``.

The caller gets the pooled connection wrapped in a :class:`Guarded`: every call on it, and on
the prepared statements, cursors and transactions it hands out, maps asyncpg's errors at the
boundary, as the client's own calls do. What the server says about the SQL (a unique
violation, a syntax error) passes through unchanged; what concerns the node or the link
becomes the library's error, ``raise ... from`` the driver's:

- the node was fenced meanwhile: :class:`NodeFencedError` (whatever the driver raised once the
  client terminated the connection: a closed connection, a proxy released back to the pool,
  even an ``AttributeError`` from inside a terminated connection);
- 25006 on the primary: :class:`NotPrimaryError`;
- a statement timed out: :class:`QueryTimeoutError`;
- the connection died: :class:`ConnectionLostError` inside a transaction or when nothing was
  sent (rolled back, or nothing ran), :class:`CommitOutcomeUnknownError` for an autocommit
  statement on the primary (it may have committed).

Leaving the block maps what escapes it the same way, commits (or rolls back) and gives the
connection back; after that the wrapper refuses to be used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import CoroutineType, TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
import asyncpg.cursor
import asyncpg.prepared_stmt
import asyncpg.transaction

from ..errors import CircuitOpenError, ResilienceError
from ._config import Route
from ._errors import (
    NODE_FAILURES,
    CommitOutcomeUnknownError,
    ConnectionLostError,
    Kind,
    NodeFencedError,
    NotPrimaryError,
    NotSent,
    QueryTimeoutError,
    classify,
    sent_nothing,
)
from ._node import NodeRuntime, classify_on, is_closed, terminate

if TYPE_CHECKING:
    from ._client import FailoverClient

__all__ = ["Guarded", "Held", "Session", "add_tried"]

# What a held connection hands out that talks to the server: wrapped too. (A set of exact
# types: asyncpg's own classes, and a lookup costs a fraction of isinstance() on a tuple.)
_WRAPPED = frozenset(
    {
        asyncpg.prepared_stmt.PreparedStatement,
        asyncpg.cursor.CursorFactory,
        asyncpg.cursor.Cursor,
        asyncpg.cursor.CursorIterator,
        asyncpg.transaction.Transaction,
    }
)
# Never driver errors: the protocols of iteration and generators.
_NOT_ERRORS = (StopAsyncIteration, StopIteration, GeneratorExit)


def add_tried(tried: set[NodeRuntime] | None, node: NodeRuntime) -> set[NodeRuntime]:
    """Add ``node`` to the nodes a call has tried (the set is made on first use)."""
    if tried is None:
        tried = set()
    tried.add(node)
    return tried


class Held:
    """One connection held by the caller, from entering the block to leaving it."""

    __slots__ = (
        "client", "conn", "gone", "node", "own_tx", "pool", "readonly", "released", "route", "tx",
    )  # fmt: skip

    def __init__(
        self, client: FailoverClient, node: NodeRuntime, pool: Any, conn: Any, route: Route
    ) -> None:
        self.client = client
        self.node = node
        self.pool = pool
        self.conn = conn
        self.route: Route = route
        self.tx: Any = None
        self.own_tx = 0
        """The caller's own ``async with conn.transaction()`` blocks open on it."""
        self.readonly = False
        """Whether the client's transaction is read-only (25006 is then the caller's)."""
        self.gone = False
        """Whether an error showed the connection unusable (it is terminated, not reused)."""
        self.released = False

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call a driver method; map what it raises, and guard what it returns."""
        if self.released:
            raise RuntimeError(
                "this connection went back to the pool when its `async with` block ended"
            )
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            mapped = self.map(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if type(result) is CoroutineType or inspect.isawaitable(result):
            return self.run(result)
        return self.guard(result)

    async def run(self, awaitable: Any) -> Any:
        """Await a driver coroutine; map what it raises, and guard what it returns."""
        try:
            result = await awaitable
        except Exception as exc:
            mapped = self.map(exc)
            if mapped is None:
                raise
            raise mapped from exc
        return self.guard(result)

    def guard(self, value: Any) -> Any:
        """Wrap what talks to the server (statements, cursors, transactions); pass the rest."""
        if type(value) in _WRAPPED:
            return Guarded(value, self)
        return value

    def map(self, exc: Exception, *, from_driver: bool = True) -> ResilienceError | None:
        """The library's error for a driver error on this connection, or ``None`` to pass it.

        Args:
            exc: The error.
            from_driver: Whether a driver call raised it: then any error once the connection
                is closed is the closed connection's (asyncpg raises several kinds). An error
                that escaped the block may be the caller's own, and is judged by its type.

        Reports the failure (a re-probe of the node) once, when it is first mapped.
        """
        if isinstance(exc, (ResilienceError, *_NOT_ERRORS)):
            return None
        client, node = self.client, self.node
        kind = classify_on(exc, self.conn) if from_driver else classify(exc)
        gone = kind in NODE_FAILURES or sent_nothing(exc)
        if kind is Kind.SQL and not gone:
            return None  # the server's verdict on the SQL, or a misuse asyncpg explains
        fenced = node.state.fenced
        if fenced is not None:
            self.gone = True
            client._failed(node, "fenced", exc, retried=False)
            return NodeFencedError(client=client._name, node=node.name, reason=fenced)
        if kind is Kind.READ_ONLY:
            if self.route != "primary" or self.readonly:
                return None  # a write in a read-only transaction, or sent to a standby: asyncpg's
                # error says exactly that
            client._failed(node, kind.value, exc, retried=False)
            return NotPrimaryError(client=client._name, node=node.name)
        if kind is Kind.TIMEOUT:
            self.gone = True
            client._failed(node, kind.value, exc, retried=False)
            return QueryTimeoutError(client=client._name, node=node.name, timeout=None)
        self.gone = True
        client._failed(node, kind.value, exc, retried=False)
        if (
            self.tx is not None or self.own_tx or self.route != "primary"
            or sent_nothing(exc) or self._in_tx()
        ):  # fmt: skip
            return ConnectionLostError(client=client._name, node=node.name)
        client._errors["commit_unknown"] += 1
        return CommitOutcomeUnknownError(
            client=client._name,
            node=node.name,
            reason="shutdown" if kind is Kind.SHUTDOWN else "connection_lost",
        )

    def _in_tx(self) -> bool:
        try:
            return bool(self.conn.is_in_transaction())
        except Exception:
            return False  # the connection is gone: what it was doing is unknown


class Guarded:
    """A connection (or statement, cursor, transaction) of a held connection, errors mapped.

    It forwards every attribute to the asyncpg object it wraps; methods map the driver's errors
    (see the module's docstring) and wrap the statements, cursors and transactions they return.
    """

    __slots__ = ("_held", "_target")

    def __init__(self, target: Any, held: Held) -> None:
        self._target = target
        self._held = held

    def __getattribute__(self, name: str) -> Any:
        # Every attribute is the wrapped object's (but our own two and the dunders the class
        # defines): looked up here first, since a failed lookup before __getattr__ would cost
        # an exception on every call.
        if name.startswith("_") and (name in ("_target", "_held") or name.startswith("__")):
            return object.__getattribute__(self, name)
        held: Held = object.__getattribute__(self, "_held")
        try:
            attr = getattr(object.__getattribute__(self, "_target"), name)
        except AttributeError:
            raise
        except Exception as exc:  # a released pool proxy raises on any attribute
            mapped = held.map(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if callable(attr) and not isinstance(attr, type):
            return functools.partial(held.call, attr)
        return attr

    def __repr__(self) -> str:
        return f"<Guarded {self._target!r}>"

    def __await__(self) -> Any:
        # ``await conn.cursor(...)`` gives a Cursor.
        return self._held.run(self._target).__await__()

    def __aiter__(self) -> Guarded:
        return Guarded(self._held.call(self._target.__aiter__), self._held)

    async def __anext__(self) -> Any:
        return await self._held.run(self._target.__anext__())

    async def __aenter__(self) -> Any:
        # ``async with conn.transaction():`` (a savepoint, or the caller's own transaction).
        held = self._held
        result = await held.run(self._target.__aenter__())
        held.own_tx += 1
        return result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        held = self._held
        held.own_tx -= 1
        if held.gone:
            # The connection is gone and the block's error says so; the server rolled back.
            try:
                return await self._target.__aexit__(exc_type, exc, tb)
            except Exception:
                return False
        return await held.run(self._target.__aexit__(exc_type, exc, tb))


class Session:
    """``async with client.acquire()`` / ``client.transaction()``: one connection, held."""

    def __init__(self, client: FailoverClient, route: Route, tx: dict[str, Any] | None) -> None:
        self._client = client
        self._route: Route = route
        self._tx_options = tx
        self._held: Held | None = None

    async def __aenter__(self) -> Any:
        if self._held is not None:
            raise RuntimeError("this session is already entered")
        client = self._client
        await client._ensure_running()
        topo = client._topology
        deadline: float | None = None
        tried: set[NodeRuntime] | None = None
        last: BaseException | None = None
        trial_waited = False
        while True:
            version = topo.version
            node = client._pick_standby(None, tried) if self._route == "prefer_standby" else None
            on_standby = node is not None
            if node is None:
                node = client._primary_rt
                if node is None:
                    node, deadline = await client._wait_for_primary(deadline, last)
            try:
                held = await node.breaker.call(self._open, node, on_standby)
            except NotSent as exc:
                last = exc.error or exc
                client._failed(node, exc.kind, exc.error, retried=True)
                if exc.kind == "acquire_timeout":
                    raise exc.error or exc from None
                if on_standby:
                    tried = add_tried(tried, node)
                    continue
            except CircuitOpenError as exc:
                if on_standby:
                    tried = add_tried(tried, node)
                    continue
                if not node.state.suspect:
                    await client._breaker_wait(node, exc, deadline, trial_waited)
                    trial_waited = True
                    continue
                last = exc
            else:
                self._held = held
                return Guarded(held.conn, held)
            deadline = await client._retry_later(version, deadline, last)

    async def _open(self, node: NodeRuntime, on_standby: bool) -> Held:
        client = self._client
        pool = node.pool
        if pool is None:
            raise NotSent("closed")
        node.in_use += 1
        try:
            if node.in_use > node.max_size:
                conn = await node.guard.acquire(pool)
            else:
                conn = await pool.acquire()
        except Exception as exc:
            node.in_use -= 1
            raise client._acquire_failure(node, exc) from exc
        except BaseException:
            node.in_use -= 1
            raise
        held = Held(client, node, pool, conn, "prefer_standby" if on_standby else "primary")
        if self._tx_options is None:
            return held
        tx = conn.transaction(**self._tx_options)
        try:
            await tx.start()
        except BaseException as exc:
            if sent_nothing(exc):
                terminate(conn)
                await client._release(node, pool, conn, None)
                raise NotSent("stale", exc) from exc
            kind = classify_on(exc, conn) if isinstance(exc, Exception) else None
            if kind is Kind.SQL or kind is None:
                client._spawn(client._release(node, pool, conn, client._settings.release_timeout))
                raise
            terminate(conn)
            await client._release(node, pool, conn, None)
            # BEGIN never took effect: nothing happened, the client may try again.
            raise NotSent("connect" if kind in NODE_FAILURES else "stale", exc) from exc
        held.tx = tx
        held.readonly = bool(self._tx_options.get("readonly"))
        return held

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self._client
        held = self._held
        assert held is not None
        self._held = None
        held.released = True
        node, pool, conn, tx = held.node, held.pool, held.conn, held.tx
        inline = True
        try:
            if exc is None:
                if tx is not None:
                    await self._commit(held)
                return
            if not isinstance(exc, Exception):
                inline = False  # cancelled: give it back in the background, bounded
                client._spawn(client._release(node, pool, conn, client._settings.release_timeout))
                return
            mapped = held.map(exc, from_driver=False)  # a driver error that escaped the wrappers
            if held.gone:
                terminate(conn)
            elif tx is not None and not is_closed(conn):
                try:
                    await tx.rollback()
                except Exception:
                    terminate(conn)
            if mapped is not None:
                raise mapped from exc
        finally:
            if inline:
                await client._release(node, pool, conn, None)

    async def _commit(self, held: Held) -> None:
        client, node, conn, tx = held.client, held.node, held.conn, held.tx
        state = node.state
        closed = held.gone or is_closed(conn)
        if state.fenced is not None or closed or node is not client._primary_rt:
            # Never commit on a node that lost its role: the server rolls the transaction back
            # when the connection goes.
            terminate(conn)
            if state.fenced is not None:
                client._errors["fenced"] += 1
                raise NodeFencedError(client=client._name, node=node.name, reason=state.fenced)
            if closed:
                raise ConnectionLostError(client=client._name, node=node.name)
            raise NotPrimaryError(client=client._name, node=node.name)
        try:
            await node.breaker.call(tx.commit)
        except Exception as exc:
            kind = classify_on(exc, conn)
            if sent_nothing(exc):
                # The connection was gone before COMMIT left: the server rolled back.
                terminate(conn)
                client._failed(node, Kind.LOST.value, exc, retried=False)
                raise ConnectionLostError(client=client._name, node=node.name) from exc
            if kind is Kind.SQL:
                raise  # e.g. a serialization failure at commit: rolled back, the caller's call
            client._failed(node, kind.value, exc, retried=False)
            if kind is Kind.READ_ONLY:
                raise NotPrimaryError(client=client._name, node=node.name) from exc
            terminate(conn)
            client._errors["commit_unknown"] += 1
            reason = {Kind.TIMEOUT: "timeout", Kind.SHUTDOWN: "shutdown"}.get(
                kind, "connection_lost"
            )
            raise CommitOutcomeUnknownError(
                client=client._name, node=node.name, reason=reason
            ) from exc
        if client._settings.read_your_writes:
            await client._take_token(conn, node)
