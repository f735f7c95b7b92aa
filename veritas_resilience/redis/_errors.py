"""The errors of the Redis integration, one tree under :class:`veritas_resilience.ResilienceError`.

Each error is also the redis-py exception a caller of redis-py would catch for the same
situation, so code written for redis-py keeps working (``except redis.ConnectionError``)::

    ResilienceError (veritas_resilience)       redis.exceptions.RedisError
    └── RedisError ─────────────────────────────┘
        ├── NoSentinelAvailableError    no Sentinel answered                  (+ ConnectionError)
        ├── UnknownServiceError         every Sentinel that answered does not
        │                               know the service name                 (+ ConnectionError)
        ├── NoMasterError               no confirmed master yet: a failover
        │                               is under way                          (+ ConnectionError)
        ├── NoReplicaError              no healthy replica to read from       (+ ConnectionError)
        ├── OutcomeUnknownError         the connection broke after a command
        │                               that is not idempotent was sent, or
        │                               its reply came from a replaced master (+ ConnectionError)
        ├── RedisUnavailableError       the retries and the deadline ran out  (+ ConnectionError)
        ├── PoolExhaustedError          no pooled connection became free in
        │                               time                             (+ MaxConnectionsError)
        ├── RedisCircuitOpenError       the client's breaker is open
        │                               (also a core CircuitOpenError)        (+ ConnectionError)
        └── RedisConfigurationError     a permanent misconfiguration; never
            │                           retried                               (+ ConnectionError)
            ├── RedisAuthenticationError  a data node or Sentinel refused
            │                             the credentials             (+ AuthenticationError)
            └── NotASentinelError         a node listed as a Sentinel does
                                          not know the SENTINEL command

Every error carries its own traceback: an error shared by many callers (the result of one
lookup) is copied for each (:meth:`RedisError.clone`), so tracebacks never pile up.

Messages name nodes as ``host:port`` and commands by name only; never a password, a key or a
value. Errors of the server about the command itself (``WRONGTYPE``, syntax errors...) are not
mapped: they reach the caller as redis-py raised them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import redis.exceptions

from ..errors import CircuitOpenError, ResilienceError

_E = TypeVar("_E", bound="RedisError")

__all__ = [
    "NoMasterError",
    "NoReplicaError",
    "NoSentinelAvailableError",
    "NotASentinelError",
    "OutcomeUnknownError",
    "PoolExhaustedError",
    "RedisAuthenticationError",
    "RedisCircuitOpenError",
    "RedisConfigurationError",
    "RedisError",
    "RedisUnavailableError",
    "UnknownServiceError",
]


class RedisError(ResilienceError, redis.exceptions.RedisError):
    """Root of the errors raised by :mod:`veritas_resilience.redis`.

    Attributes:
        name: The client's name (the Sentinel service name or the cluster's name by default).
    """

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def clone(self: _E) -> _E:
        """A copy with the same message and attributes, and no traceback or cause of its own.

        One lookup's error is raised to every caller that waited for it; each gets a copy, so
        the tracebacks of all those raises do not pile up on one object.
        """
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.args = self.args
        return copy


class NoSentinelAvailableError(RedisError, redis.exceptions.ConnectionError):
    """No Sentinel answered: they are all down, unreachable, or refuse the credentials.

    Attributes:
        sentinels: Every Sentinel asked, as ``host:port``.
        errors: What went wrong with each, in the same order (error type and message).
    """

    def __init__(self, *, name: str, sentinels: Sequence[str], errors: Sequence[str]) -> None:
        self.sentinels = tuple(sentinels)
        self.errors = tuple(errors)
        detail = "; ".join(f"{s}: {e}" for s, e in zip(self.sentinels, self.errors))
        super().__init__(
            f"{name!r}: no Sentinel answered ({detail or 'none configured'})", name=name
        )


class UnknownServiceError(RedisError, redis.exceptions.ConnectionError):
    """Every Sentinel that answered says it monitors no master by that service name.

    Attributes:
        service: The service name asked for.
        sentinels: The Sentinels that answered, as ``host:port``.
    """

    def __init__(self, *, name: str, service: str, sentinels: Sequence[str]) -> None:
        self.service = service
        self.sentinels = tuple(sentinels)
        super().__init__(
            f"{name!r}: no Sentinel monitors a master named {service!r} "
            f"(asked {', '.join(self.sentinels)})",
            name=name,
        )


class NoMasterError(RedisError, redis.exceptions.ConnectionError):
    """The Sentinels answer but there is no confirmed, writable master: a failover is under way.

    Commands retry through this error until their deadline; it reaches the caller only when the
    failover takes longer than that.

    Attributes:
        service: The service name.
        candidate: The master the Sentinels name, as ``host:port``, or None.
        reason: Why it was not accepted (it does not answer, its ROLE is not master...).
    """

    def __init__(
        self, *, name: str, service: str, reason: str, candidate: str | None = None
    ) -> None:
        self.service = service
        self.candidate = candidate
        self.reason = reason
        where = f" (Sentinels name {candidate})" if candidate else ""
        super().__init__(f"{name!r}: no writable master{where}: {reason}", name=name)


class NoReplicaError(RedisError, redis.exceptions.ConnectionError):
    """A replica-only client found no replica that is up and linked to its master.

    Attributes:
        service: The service name.
    """

    def __init__(self, *, name: str, service: str) -> None:
        self.service = service
        super().__init__(
            f"{name!r}: no replica of {service!r} is up with its link to the master up",
            name=name,
        )


class OutcomeUnknownError(RedisError, redis.exceptions.ConnectionError):
    """The connection broke after the command was sent: it may or may not have run.

    The command was not retried because it is not known to be idempotent. Retry it yourself if
    that is safe, or run it inside :func:`veritas_resilience.redis.retry_unknown_outcome`.

    Attributes:
        command: The command's name (``"INCR"``, ``"PIPELINE"``, ``"MULTI"``...).
        node: The node it was sent to, as ``host:port``, when known.
        attempts: Attempts made, this one included.
        reason: ``"connection"`` (lost after sending), ``"deadline"`` (the call's deadline cut
            it short after sending), or ``"fenced_reply"`` (the reply came on a connection to a
            master the client had already replaced: never reported as a success).
    """

    def __init__(
        self,
        *,
        name: str,
        command: str,
        node: str | None,
        attempts: int,
        reason: str = "connection",
    ) -> None:
        self.command = command
        self.node = node
        self.attempts = attempts
        self.reason = reason
        where = f" to {node}" if node else ""
        if reason == "fenced_reply":
            what = (
                f"the reply to {command} came from{where or ' a node'} after the client had "
                "switched to another master: the old master may have run it, and a demoted "
                "master's writes are discarded"
            )
        elif reason == "deadline":
            what = f"the call's deadline ran out after {command} was sent{where}"
        else:
            what = f"the connection{where} was lost after {command} was sent"
        super().__init__(
            f"{name!r}: {what}, so it may or may not have run; not retried because {command} "
            "is not known to be idempotent",
            name=name,
        )


class RedisUnavailableError(RedisError, redis.exceptions.ConnectionError):
    """Every attempt failed until the call's deadline (or attempt limit) was reached.

    The last error is the ``__cause__``.

    Attributes:
        command: The command's name.
        attempts: Attempts made.
        elapsed: Seconds spent, from the first attempt.
        reason: What the last attempt ran into (``"connection"``, ``"readonly"``, ...).
    """

    def __init__(
        self, *, name: str, command: str, attempts: int, elapsed: float, reason: str
    ) -> None:
        self.command = command
        self.attempts = attempts
        self.elapsed = elapsed
        self.reason = reason
        super().__init__(
            f"{name!r}: {command} failed after {attempts} attempt(s) in {elapsed:.3f}s "
            f"(last: {reason})",
            name=name,
        )


class PoolExhaustedError(RedisError, redis.exceptions.MaxConnectionsError):
    """Every pooled connection stayed in use for as long as the caller could wait.

    Attributes:
        max_connections: The pool's size (None when the driver's pool did not say).
        waited: Seconds the caller waited.
    """

    def __init__(self, *, name: str, max_connections: int | None, waited: float) -> None:
        self.max_connections = max_connections
        self.waited = waited
        size = "all" if max_connections is None else f"all {max_connections}"
        super().__init__(
            f"{name!r}: {size} connections stayed in use for {waited:g}s",
            name=name,
        )


class RedisCircuitOpenError(CircuitOpenError, redis.exceptions.ConnectionError):
    """The client's circuit breaker rejected the call: nothing was sent.

    It is the core :class:`~veritas_resilience.CircuitOpenError` (``name`` is the breaker's,
    ``redis:<client name>``; ``state``; ``retry_after``) and also a
    ``redis.exceptions.ConnectionError``, so code written for redis-py treats it as the
    connection problem it stands for. It is not a :class:`RedisError`: its ``name`` is the
    breaker's.
    """

    def __init__(self, name: str, state: str, retry_after: float) -> None:
        super().__init__(name, state, retry_after)

    @classmethod
    def from_breaker(cls, exc: CircuitOpenError) -> RedisCircuitOpenError:
        """The same rejection as a :class:`RedisCircuitOpenError`."""
        if isinstance(exc, RedisCircuitOpenError):
            return exc
        return cls(exc.name, exc.state, exc.retry_after)

    def __str__(self) -> str:
        return CircuitOpenError.__str__(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class RedisConfigurationError(RedisError, redis.exceptions.ConnectionError):
    """The client is set up wrong in a way no retry can fix; raised at once, never retried.

    Attributes:
        node: The node that showed it, as ``host:port``.
    """

    def __init__(self, message: str, *, name: str, node: str) -> None:
        self.node = node
        super().__init__(message, name=name)


class RedisAuthenticationError(RedisConfigurationError, redis.exceptions.AuthenticationError):
    """A data node or a Sentinel refused the client's credentials (wrong or missing password,
    unknown ACL user). Never retried.

    Attributes:
        role: ``"data node"`` or ``"Sentinel"``: which password to check (``password`` or
            ``sentinel_password``).
        node: The node that refused, as ``host:port``.
        detail: The server's reply (never the password).
    """

    def __init__(self, *, name: str, role: str, node: str, detail: str) -> None:
        self.role = role
        self.detail = detail
        setting = "password/username"
        if role == "Sentinel":
            setting = "sentinel_password/sentinel_username"
        super().__init__(
            f"{name!r}: {role} {node} refused the credentials ({detail}); check {setting}",
            name=name,
            node=node,
        )


class NotASentinelError(RedisConfigurationError):
    """A node listed as a Sentinel does not know the ``SENTINEL`` command: it is a data node (or
    something else), not a Sentinel. Never retried.

    Attributes:
        node: The node, as ``host:port``.
        detail: Its reply.
    """

    def __init__(self, *, name: str, node: str, detail: str) -> None:
        self.detail = detail
        super().__init__(
            f"{name!r}: {node} is listed as a Sentinel but does not know the SENTINEL command "
            f"({detail}): list the Sentinels' addresses, not the data nodes'",
            name=name,
            node=node,
        )
