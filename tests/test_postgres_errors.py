"""The error tree of the PostgreSQL client, and what each driver error means for routing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from veritas_resilience import ResilienceError
from veritas_resilience.postgres import (
    AcquireTimeoutError,
    CommitOutcomeUnknownError,
    ConnectionLostError,
    NodeFencedError,
    NoPrimaryError,
    NotPrimaryError,
    PostgresError,
    QueryTimeoutError,
    SplitBrainError,
    SystemIdentifierMismatchError,
)
from veritas_resilience.postgres._errors import NODE_FAILURES, ConnectionGone, Kind, classify
from veritas_resilience.postgres._node import classify_on, gone_error


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT"), Kind.READ_ONLY),
        (asyncpg.AdminShutdownError("terminating connection"), Kind.SHUTDOWN),
        (asyncpg.CrashShutdownError("crash"), Kind.SHUTDOWN),
        (asyncpg.CannotConnectNowError("starting up"), Kind.CONNECT),
        (asyncpg.ConnectionDoesNotExistError("closed in the middle"), Kind.LOST),
        (ConnectionResetError(104, "reset"), Kind.LOST),
        (ConnectionRefusedError(111, "refused"), Kind.LOST),
        (OSError(113, "no route"), Kind.LOST),
        (TimeoutError(), Kind.TIMEOUT),
        (asyncio.TimeoutError(), Kind.TIMEOUT),
        (asyncpg.InterfaceError("connection is closed"), Kind.LOST),
        (asyncpg.InterfaceError("cannot perform operation: another operation"), Kind.SQL),
        (asyncpg.UniqueViolationError("duplicate key"), Kind.SQL),
        (asyncpg.UndefinedTableError("no such table"), Kind.SQL),
        (asyncpg.SerializationError("could not serialize"), Kind.SQL),
        (ValueError("bad argument"), Kind.SQL),
    ],
)
def test_classify(error: BaseException, kind: Kind) -> None:
    """Each driver error maps to what it says about the node: failure, role hint or plain SQL."""
    assert classify(error) is kind


def test_node_failures_are_what_the_breaker_counts() -> None:
    """Connection problems and timeouts count against a node; 25006 and SQL errors do not."""
    assert {Kind.CONNECT, Kind.LOST, Kind.SHUTDOWN, Kind.TIMEOUT} == NODE_FAILURES
    assert Kind.READ_ONLY not in NODE_FAILURES and Kind.SQL not in NODE_FAILURES


def test_tree() -> None:
    """Every error is a PostgresError and a ResilienceError; timeouts are also TimeoutError."""
    for cls in (
        NoPrimaryError, NotPrimaryError, NodeFencedError, SplitBrainError,
        SystemIdentifierMismatchError, ConnectionLostError, CommitOutcomeUnknownError,
        QueryTimeoutError, AcquireTimeoutError,
    ):  # fmt: skip
        assert issubclass(cls, PostgresError) and issubclass(cls, ResilienceError)
    assert issubclass(SystemIdentifierMismatchError, SplitBrainError)
    assert issubclass(QueryTimeoutError, TimeoutError)
    assert issubclass(AcquireTimeoutError, TimeoutError)


def test_only_an_unknown_commit_is_unsafe_to_retry() -> None:
    """safe_to_retry is false for CommitOutcomeUnknownError and true for the rest."""
    unknown = CommitOutcomeUnknownError(client="db", node="db1:5432", reason="connection_lost")
    assert not unknown.safe_to_retry
    assert unknown.reason == "connection_lost" and unknown.node == "db1:5432"
    assert NotPrimaryError(client="db", node="db1:5432").safe_to_retry
    assert ConnectionLostError(client="db", node="db1:5432").safe_to_retry


def test_messages_say_what_happened_and_where() -> None:
    """Messages name the client, the node and the reason."""
    assert str(NoPrimaryError(client="db", reason="timeout", waited=2.5)) == (
        "db: no writable primary: none became writable within 2.500s"
    )
    error = NoPrimaryError(client="db", reason="breaker_open", node="db1:5432", retry_after=1.5)
    assert "db1:5432" in str(error) and error.retry_after == 1.5
    assert NoPrimaryError(client="db", reason="all_nodes_down").reason == "all_nodes_down"
    fenced = NodeFencedError(client="db", node="db1:5432", reason="stale_timeline")
    assert str(fenced) == "db: db1:5432 is fenced (stale_timeline)"
    split = SystemIdentifierMismatchError(client="db", nodes=["a:1", "b:2"])
    assert split.nodes == ("a:1", "b:2") and "different clusters" in str(split)
    assert "unknown (timeout)" in str(
        CommitOutcomeUnknownError(client="db", node="a:1", reason="timeout")
    )
    assert "1.5s" in str(QueryTimeoutError(client="db", node="a:1", timeout=1.5))


class _Conn:
    """Just enough of a connection for classify_on: open or closed."""

    def __init__(self, closed: bool) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


def test_any_error_but_the_servers_from_a_closed_connection_is_its_loss() -> None:
    """Once the client closed a connection, asyncpg's odd errors (an AttributeError from inside
    it, a released proxy) count as a connection loss and come wrapped as one; the server's own
    errors, and anything on an open connection, keep their meaning."""
    odd = AttributeError("'NoneType' object has no attribute 'bind_execute'")
    assert classify_on(odd, _Conn(closed=True)) is Kind.LOST
    assert classify_on(odd, _Conn(closed=False)) is Kind.SQL
    server = asyncpg.UniqueViolationError("duplicate key")
    assert classify_on(server, _Conn(closed=True)) is Kind.SQL
    gone = gone_error(odd, _Conn(closed=True))
    assert isinstance(gone, ConnectionGone) and gone.__cause__ is odd
    assert classify(gone) is Kind.LOST
    assert gone_error(server, _Conn(closed=True)) is server
