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
        │                               that is not idempotent was sent       (+ ConnectionError)
        └── RedisUnavailableError       the retries and the deadline ran out  (+ ConnectionError)

Messages name nodes as ``host:port`` and commands by name only; never a password, a key or a
value. Errors of the server about the command itself (``WRONGTYPE``, syntax errors...) are not
mapped: they reach the caller as redis-py raised them.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.exceptions

from ..errors import ResilienceError

__all__ = [
    "NoMasterError",
    "NoReplicaError",
    "NoSentinelAvailableError",
    "OutcomeUnknownError",
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
    """

    def __init__(self, *, name: str, command: str, node: str | None, attempts: int) -> None:
        self.command = command
        self.node = node
        self.attempts = attempts
        where = f" to {node}" if node else ""
        super().__init__(
            f"{name!r}: the connection{where} was lost after {command} was sent, so it may or "
            f"may not have run; not retried because {command} is not known to be idempotent",
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
