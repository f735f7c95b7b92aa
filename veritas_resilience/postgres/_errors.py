"""The errors of the PostgreSQL failover client, and the mapping of asyncpg's errors onto them.

Every error the client raises on its own account derives from :class:`PostgresError`, itself a
:class:`~veritas_resilience.ResilienceError`::

    PostgresError                         client, node, safe_to_retry
    ├── NoPrimaryError                    no writable primary: none within failover_timeout, every
    │                                     node down, or the primary's breaker open
    ├── NotPrimaryError                   the node stopped being the primary during the call (25006)
    ├── NodeFencedError                   the node is fenced: it lost a split brain, or is foreign
    ├── SplitBrainError                   writes stopped: two primaries on one timeline
    │   └── SystemIdentifierMismatchError writes stopped: the nodes belong to different clusters
    ├── ConnectionLostError               the connection died before COMMIT: rolled back
    ├── CommitOutcomeUnknownError         the connection died after COMMIT (or an autocommit
    │                                     write) was sent: it may or may not have committed
    ├── QueryTimeoutError                 a statement ran out of time (also a ``TimeoutError``)
    └── AcquireTimeoutError               no pooled connection became free in time

SQL errors that say nothing about the topology (a unique violation, a syntax error, a
serialization failure) are the caller's business and pass through as asyncpg raised them.

``safe_to_retry`` says whether the failed work certainly had no effect, so running it again cannot
apply it twice. It is false only for :class:`CommitOutcomeUnknownError` (and a timed-out write).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence

import asyncpg

from ..errors import ResilienceError

__all__ = [
    "AcquireTimeoutError",
    "CommitOutcomeUnknownError",
    "ConnectionLostError",
    "NoPrimaryError",
    "NodeFencedError",
    "NotPrimaryError",
    "PostgresError",
    "QueryTimeoutError",
    "SplitBrainError",
    "SystemIdentifierMismatchError",
]


class PostgresError(ResilienceError):
    """Root of the errors raised by the PostgreSQL failover client.

    Attributes:
        client: The client's name.
        node: The node concerned, by name (``host:port`` unless named otherwise; never a
            password), or ``None`` when no single node is.
        safe_to_retry: Whether the work certainly had no effect, so running it again is safe.
    """

    safe_to_retry: bool = True

    def __init__(self, message: str, *, client: str, node: str | None = None) -> None:
        super().__init__(message)
        self.client = client
        self.node = node


class NoPrimaryError(PostgresError):
    """No node could take a write (or a read that needs the primary).

    Attributes:
        reason: ``"timeout"`` (no primary appeared within ``failover_timeout``),
            ``"all_nodes_down"`` (no node answers; waiting would not help), ``"breaker_open"``
            (the primary answers probes but its circuit breaker is open), ``"read_only"`` (the
            only primary runs with ``default_transaction_read_only``) or ``"closed"``.
        waited: Seconds the call waited for a primary.
        retry_after: Seconds after which trying again makes sense (0.0 when unknown).
    """

    def __init__(
        self,
        *,
        client: str,
        reason: str,
        waited: float = 0.0,
        retry_after: float = 0.0,
        node: str | None = None,
    ) -> None:
        detail = {
            "timeout": f"none became writable within {waited:.3f}s",
            "all_nodes_down": "no node is reachable",
            "breaker_open": f"the circuit breaker of {node} is open",
            "read_only": f"{node} runs with default_transaction_read_only",
            "closed": "the client is closed",
        }.get(reason, reason)
        super().__init__(f"{client}: no writable primary: {detail}", client=client, node=node)
        self.reason = reason
        self.waited = waited
        self.retry_after = retry_after


class NotPrimaryError(PostgresError):
    """The node stopped being the primary while the call ran on it (it answered 25006).

    The statement (and its transaction) had no effect; the client re-checks the node at once.
    """

    def __init__(self, *, client: str, node: str) -> None:
        super().__init__(f"{client}: {node} is no longer the primary", client=client, node=node)


class NodeFencedError(PostgresError):
    """The node is fenced: the client sends it no writes and no reads.

    Attributes:
        reason: ``"stale_timeline"`` (a primary on an older timeline than another primary: the
            loser of a split brain), ``"split_brain"`` (two primaries on the same timeline) or
            ``"system_identifier"`` (the node belongs to another cluster).
    """

    def __init__(self, *, client: str, node: str, reason: str) -> None:
        super().__init__(f"{client}: {node} is fenced ({reason})", client=client, node=node)
        self.reason = reason


class SplitBrainError(PostgresError):
    """Writes are stopped: the client cannot tell which node is the real primary.

    Attributes:
        nodes: The nodes in conflict.
    """

    def __init__(self, *, client: str, nodes: Sequence[str], detail: str | None = None) -> None:
        names = ", ".join(nodes)
        super().__init__(
            f"{client}: writes stopped: {detail or 'several primaries on the same timeline'} "
            f"({names})",
            client=client,
        )
        self.nodes: tuple[str, ...] = tuple(nodes)


class SystemIdentifierMismatchError(SplitBrainError):
    """Writes are stopped: the nodes report different ``system_identifier`` values.

    They are not copies of one database (a node was re-initialised, or a DSN points at another
    cluster), so no timeline comparison can say which one is right.
    """

    def __init__(self, *, client: str, nodes: Sequence[str]) -> None:
        super().__init__(client=client, nodes=nodes, detail="nodes belong to different clusters")


class ConnectionLostError(PostgresError):
    """The connection died before COMMIT was sent: the transaction was rolled back."""

    def __init__(self, *, client: str, node: str) -> None:
        super().__init__(
            f"{client}: connection to {node} lost; the transaction was rolled back",
            client=client,
            node=node,
        )


class CommitOutcomeUnknownError(PostgresError):
    """COMMIT (or an autocommit write) was sent, and no answer came back.

    The transaction may have committed or not. The client never retries it on its own; check
    with an idempotency key (a unique constraint) on the current primary before doing it again.

    Attributes:
        reason: ``"connection_lost"``, ``"shutdown"`` (the server was stopping) or ``"timeout"``.
    """

    safe_to_retry = False

    def __init__(self, *, client: str, node: str, reason: str) -> None:
        super().__init__(
            f"{client}: outcome of the commit on {node} is unknown ({reason})",
            client=client,
            node=node,
        )
        self.reason = reason


class QueryTimeoutError(PostgresError, TimeoutError):
    """A statement did not finish within its timeout (``command_timeout`` by default).

    Also a built-in :class:`TimeoutError`.

    Attributes:
        timeout: The limit, in seconds.
    """

    def __init__(self, *, client: str, node: str, timeout: float | None) -> None:
        limit = "its timeout" if timeout is None else f"{timeout:g}s"
        super().__init__(
            f"{client}: statement on {node} did not finish within {limit}",
            client=client,
            node=node,
        )
        self.timeout = timeout


class AcquireTimeoutError(PostgresError, TimeoutError):
    """No pooled connection to the node became free within ``acquire_timeout``.

    The pool is full of calls that hold their connections; nothing was sent. Also a built-in
    :class:`TimeoutError`.

    Attributes:
        timeout: The limit, in seconds.
    """

    def __init__(self, *, client: str, node: str, timeout: float) -> None:
        super().__init__(
            f"{client}: no free connection to {node} within {timeout:g}s",
            client=client,
            node=node,
        )
        self.timeout = timeout


class NotSent(Exception):
    """An attempt failed before its statement reached the server (internal, never raised out).

    Attributes:
        kind: Why: ``"connect"``, ``"stale"``, ``"fenced"``, ``"closed"``, ``"acquire_timeout"``
            or ``"ryw_fallback"``.
        error: The error behind it, if any.
    """

    def __init__(self, kind: str, error: BaseException | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error

    def __str__(self) -> str:
        # What a breaker's failure log shows: the reason and the driver's error behind it.
        if self.error is None:
            return f"not sent ({self.kind})"
        return f"not sent ({self.kind}): {type(self.error).__name__}: {self.error}"


class ConnectionGone(ConnectionError):
    """The connection was closed under a call, and the driver said so in its own way (internal).

    asyncpg raises a bare ``InterfaceError``, or even an ``AttributeError`` from inside a
    terminated connection, when the client itself closed it (the node was fenced or demoted):
    this stands for all of them (a connection loss), with the driver's error as its cause.
    """


class Kind(str, enum.Enum):
    """What an exception from a node means for routing (internal; also a metric label)."""

    CONNECT = "connect"  # no connection could be made: nothing was sent
    LOST = "connection_lost"  # the connection died; what was sent may or may not have run
    SHUTDOWN = "shutdown"  # the server is stopping (57P01/57P02): the connection is gone
    TIMEOUT = "timeout"  # no answer in time
    READ_ONLY = "read_only"  # 25006: a write reached a node that is not (or no longer) primary
    SQL = "sql"  # the node answered with an ordinary SQL error


NODE_FAILURES = frozenset({Kind.CONNECT, Kind.LOST, Kind.SHUTDOWN, Kind.TIMEOUT})
"""Kinds that say the node (or the link to it) is failing: they count for its breaker."""

ROLE_HINTS = frozenset({Kind.CONNECT, Kind.LOST, Kind.SHUTDOWN, Kind.READ_ONLY, Kind.TIMEOUT})
"""Kinds after which the topology monitor re-probes at once."""


def classify(exc: BaseException) -> Kind:
    """Say what an exception raised by asyncpg (or the socket under it) means."""
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return Kind.READ_ONLY
    if isinstance(exc, (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)):
        return Kind.SHUTDOWN
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return Kind.CONNECT
    if isinstance(exc, (asyncpg.PostgresConnectionError, ConnectionError)):
        return Kind.LOST
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Kind.TIMEOUT
    if isinstance(exc, OSError):
        return Kind.LOST
    if isinstance(exc, asyncpg.InterfaceError) and _is_closed_error(exc):
        return Kind.LOST
    if isinstance(exc, asyncpg.exceptions.TooManyConnectionsError):
        return Kind.CONNECT
    return Kind.SQL


def sent_nothing(exc: BaseException) -> bool:
    """Whether asyncpg raised ``exc`` before it wrote anything of the statement to the socket.

    A pooled connection whose server went away while it sat idle (a FATAL 57P01 already read,
    or the socket already closed) fails this way when it is used: the statement never left the
    client, so running it again elsewhere is safe whatever it does.
    """
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return str(exc).startswith("cannot switch to state")
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc)
        return text == "connection is closed" or "released back to the pool" in text
    return False


def _is_closed_error(exc: BaseException) -> bool:
    text = str(exc)
    return "closed" in text or "connection was lost" in text or "terminat" in text


def breaker_failure(exc: BaseException) -> bool:
    """Whether an error counts as a failure for the node's breaker (the node or link fails)."""
    if isinstance(exc, NotSent):
        return exc.kind == "connect"
    return classify(exc) in NODE_FAILURES


def breaker_ignored(exc: BaseException) -> bool:
    """Whether the node's breaker ignores an error (neither success nor failure of the node)."""
    if isinstance(exc, NotSent):
        return exc.kind != "connect"
    return classify(exc) is Kind.READ_ONLY
