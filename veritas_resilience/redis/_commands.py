"""What is safe to retry: error classification and the commands known to be idempotent.

Two questions decide whether a failed command may run again:

1. Did it run? Some replies guarantee that it did not (``READONLY``, ``LOADING``, ``MASTERDOWN``,
   ``TRYAGAIN``, ``CLUSTERDOWN``, ``NOREPLICAS``, ``UNBLOCKED``), and so do failures before the
   command left the client (connecting, a fenced connection, no master known yet). Those are
   retried for any command.
2. If the connection broke after the command was sent, its outcome is unknown. Running it again is
   safe only if running it twice leaves the same state and returns the same reply: reads, and a
   short list of writes such as a plain ``SET``. Anything else fails with
   :class:`~veritas_resilience.redis.OutcomeUnknownError` unless the caller opts in.

Classification runs only after a failure, so none of this costs anything on the success path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex

from ..errors import CircuitOpenError
from ._errors import (
    NoMasterError,
    NoReplicaError,
    NoSentinelAvailableError,
    RedisError,
    UnknownServiceError,
)

__all__ = [
    "IDEMPOTENT_COMMANDS",
    "Failure",
    "FencedReplyError",
    "RoleMismatchError",
    "StaleConnectionError",
    "classify",
    "command_name",
    "is_idempotent",
    "mark_unsent",
    "retry_unknown_outcome",
    "was_unsent",
]

# Commands that leave the same state and give the same reply when they run twice. Writes whose
# reply counts what changed (DEL, HSET, SADD...) are left out on purpose: a retry would report 0.
IDEMPOTENT_COMMANDS: frozenset[str] = frozenset(
    """
    GET MGET GETRANGE SUBSTR STRLEN GETBIT BITCOUNT BITPOS BITFIELD_RO LCS
    EXISTS TYPE TTL PTTL EXPIRETIME PEXPIRETIME DUMP KEYS SCAN RANDOMKEY DBSIZE TOUCH
    HGET HMGET HGETALL HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD
    LRANGE LLEN LINDEX LPOS
    SMEMBERS SISMEMBER SMISMEMBER SCARD SRANDMEMBER SSCAN SUNION SINTER SDIFF SINTERCARD
    ZRANGE ZRANGEBYSCORE ZRANGEBYLEX ZREVRANGE ZREVRANGEBYSCORE ZREVRANGEBYLEX ZSCORE ZMSCORE
    ZCARD ZCOUNT ZLEXCOUNT ZRANK ZREVRANK ZSCAN ZUNION ZINTER ZDIFF ZINTERCARD ZRANDMEMBER
    XRANGE XREVRANGE XLEN XPENDING
    PFCOUNT GEOPOS GEODIST GEOHASH GEOSEARCH GEORADIUS_RO GEORADIUSBYMEMBER_RO
    EVAL_RO EVALSHA_RO FCALL_RO SORT_RO
    PING ECHO TIME ROLE INFO LASTSAVE COMMAND READONLY READWRITE
    SET SETEX PSETEX MSET HMSET EXPIREAT PEXPIREAT
    OBJECT MEMORY XINFO
    """.split()  # noqa: SIM905 - a word list reads better than 90 quoted strings
) | frozenset(
    {
        "CONFIG GET",
        "CLIENT GETNAME",
        "CLIENT ID",
        "CLIENT INFO",
        "CLIENT LIST",
        "SCRIPT EXISTS",
        "SCRIPT LOAD",
        "FUNCTION LIST",
        "OBJECT ENCODING",
        "OBJECT FREQ",
        "OBJECT IDLETIME",
        "OBJECT REFCOUNT",
        "MEMORY USAGE",
        "XINFO STREAM",
        "XINFO GROUPS",
        "XINFO CONSUMERS",
        "CLUSTER SLOTS",
        "CLUSTER SHARDS",
        "CLUSTER NODES",
        "CLUSTER INFO",
    }
)
"""Commands retried after a connection loss (their outcome unknown) without the caller opting in.

``SET`` counts only without ``NX``, ``XX`` or ``GET``: with them the reply of a second run can
differ from the first (``SET k v NX`` that ran once would then report "not set").
"""

_SET_UNSAFE = frozenset({"NX", "XX", "GET"})

_retry_unknown: ContextVar[bool] = ContextVar("veritas_redis_retry_unknown", default=False)


@contextlib.contextmanager
def retry_unknown_outcome() -> Iterator[None]:
    """Retry every command in this block even when its outcome is unknown.

    By default a command whose connection broke after it was sent is retried only if it is known
    to be idempotent. Inside this block (per task, via a context variable) every command is,
    for code that makes its writes idempotent itself, e.g. with unique keys::

        with retry_unknown_outcome():
            await client.incr("page:views")     # may count twice after a lost connection
    """
    token = _retry_unknown.set(True)
    try:
        yield
    finally:
        _retry_unknown.reset(token)


def unknown_outcome_allowed() -> bool:
    """Whether the running task is inside :func:`retry_unknown_outcome`."""
    return _retry_unknown.get()


def command_name(args: Sequence[Any]) -> str:
    """The upper-case name of a command from its arguments (``"CLIENT LIST"`` for two words)."""
    if not args:
        return ""
    first = args[0]
    name = first.decode("ascii", "replace") if isinstance(first, (bytes, bytearray)) else str(first)
    return name.upper()


def _token(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("ascii", "replace").upper()
    return str(value).upper()


def is_idempotent(args: Sequence[Any], extra: Iterable[str] = ()) -> bool:
    """Whether the command with these arguments may run twice without changing its effect.

    Args:
        args: The command and its arguments as redis-py passes them to ``execute_command``.
        extra: More command names (upper case) the caller declares idempotent.
    """
    name = command_name(args)
    if name == "SET":
        return not any(_token(a) in _SET_UNSAFE for a in args[3:])
    if name in IDEMPOTENT_COMMANDS or name in extra:
        return True
    if " " not in name and len(args) > 1 and isinstance(args[1], (str, bytes)):
        # redis-py sometimes passes a subcommand as a second argument ("CONFIG", "GET", ...).
        return f"{name} {_token(args[1])}" in IDEMPOTENT_COMMANDS
    return False


class StaleConnectionError(rex.ConnectionError):
    """A command was about to go out on a connection opened under an older master: it was not
    sent, and the connection was closed. Internal: always retried."""


class RoleMismatchError(rex.ConnectionError):
    """A new connection found its node in the wrong role (ROLE is not what the client needs).
    Nothing was sent on it; the client looks the master up again and retries."""


class FencedReplyError(rex.ConnectionError):
    """A command was sent on a connection of an older master generation, and the client
    switched before it got the reply: the reply (if any came) is the old master's, whose writes
    a demotion discards, so it is never reported as a success. Internal: the caller gets
    :class:`~veritas_resilience.redis.OutcomeUnknownError`, or a retry if the command is
    idempotent."""


_UNSENT = "_veritas_unsent"


def was_unsent(exc: BaseException) -> bool:
    """Whether ``exc`` (or the cancellation a deadline turned into it) came before the command
    left the client (internal)."""
    for error in (exc, exc.__cause__, exc.__context__):
        if error is not None and getattr(error, _UNSENT, False):
            return True
    return False


def mark_unsent(exc: BaseException) -> BaseException:
    """Record that ``exc`` happened before the command left the client (internal)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _UNSENT, True)
    return exc


@dataclass(frozen=True, slots=True)
class Failure:
    """How the client treats one failed attempt.

    Attributes:
        reason: A bounded label: ``readonly``, ``loading``, ``masterdown``, ``tryagain``,
            ``clusterdown``, ``noreplicas``, ``unblocked``, ``stale_connection``,
            ``fenced_reply``,
            ``role_mismatch``, ``no_master``, ``no_replica``, ``no_sentinel``, ``circuit_open``,
            ``connect``, ``connection``, ``timeout``.
        executed: ``False`` when the command certainly did not run; ``None`` when unknown.
        refresh: Why the master should be looked up again now (a switch source:
            ``readonly``, ``connection_error``, ``role_check``), or None.
        node_failure: Whether it counts against the node in the circuit breaker.
    """

    reason: str
    executed: bool | None
    refresh: str | None
    node_failure: bool


_NOT_EXECUTED_PREFIXES: dict[str, tuple[str, str | None]] = {
    "NOREPLICAS": ("noreplicas", None),
    "UNBLOCKED": ("unblocked", "readonly"),
    "MASTERDOWN": ("masterdown", "readonly"),
    "READONLY": ("readonly", "readonly"),
    "LOADING": ("loading", None),
    "TRYAGAIN": ("tryagain", None),
    "CLUSTERDOWN": ("clusterdown", None),
}


def _response_code(exc: BaseException) -> str:
    """The error code of a server reply, also when a pipeline prefixed its message."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    text = str(exc.args[0]) if exc.args else ""
    marker = "caused error: "
    if marker in text:
        text = text.split(marker, 1)[1].lstrip("('\"")
    return text.split(" ", 1)[0]


def classify(exc: BaseException) -> Failure | None:
    """Say whether (and how) an attempt that raised ``exc`` may be retried.

    Returns:
        None when the error must reach the caller as it is (a server error about the command,
        bad credentials, a full pool, a programming error, cancellation).
    """
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, CircuitOpenError):
        return Failure("circuit_open", False, None, False)
    if isinstance(exc, RedisError):  # our own: nothing was sent
        if isinstance(exc, NoMasterError):
            return Failure("no_master", False, None, False)
        if isinstance(exc, NoReplicaError):
            return Failure("no_replica", False, None, False)
        if isinstance(exc, NoSentinelAvailableError):
            return Failure("no_sentinel", False, None, False)
        if isinstance(exc, UnknownServiceError):
            return None
        return None
    if isinstance(exc, StaleConnectionError):
        return Failure("stale_connection", False, None, False)
    if isinstance(exc, FencedReplyError):
        return Failure("fenced_reply", None, None, False)
    if isinstance(exc, RoleMismatchError):
        return Failure("role_mismatch", False, "role_check", True)
    if isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError, rex.MaxConnectionsError)):
        return None
    if isinstance(exc, rex.ReadOnlyError):
        return Failure("readonly", False, "readonly", True)
    if isinstance(exc, rex.BusyLoadingError):
        return Failure("loading", False, None, True)
    if isinstance(exc, rex.MasterDownError):
        return Failure("masterdown", False, "readonly", True)
    if isinstance(exc, rex.TryAgainError):
        return Failure("tryagain", False, None, False)
    if isinstance(exc, rex.ClusterDownError):
        return Failure("clusterdown", False, None, True)
    if isinstance(exc, rex.ResponseError):
        found = _NOT_EXECUTED_PREFIXES.get(_response_code(exc))
        if found is None:
            return None
        reason, refresh = found
        return Failure(reason, False, refresh, True)
    if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError)):
        if getattr(exc, _UNSENT, False):
            return Failure("connect", False, "connection_error", True)
        if isinstance(exc, rex.TimeoutError):
            return Failure("timeout", None, "connection_error", True)
        return Failure("connection", None, "connection_error", True)
    return None
