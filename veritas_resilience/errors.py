"""The exceptions veritas-resilience raises.

Every error the library raises on its own account derives from :class:`ResilienceError`, so one
``except ResilienceError`` catches them all, while the errors of your own code and of the drivers
pass through unchanged unless an integration maps them at its boundary::

    ResilienceError
    ├── CircuitOpenError            a breaker rejected the call (name, state, retry_after)
    ├── ServiceUnavailableError     every step of a fallback chain failed (errors of each step)
    ├── CacheMissError              a stale-if-error cache had no usable value (``StaleCache``)
    ├── RetryBudgetExhaustedError   the shared retry budget of a dependency is spent
    ├── BulkheadFullError           a concurrency limit and its wait queue are full
    │   └── ConcurrencyLimitError   an adaptive concurrency limit is reached (``AdaptiveLimit``)
    ├── RateLimitedError            a rate limiter refused the call (name, retry_after)
    ├── ResilienceTimeoutError      a timeout policy expired (also a built-in ``TimeoutError``)
    ├── postgres.PostgresError      the PostgreSQL failover client (``veritas_resilience.postgres``)
    └── redis.RedisError            the Redis Sentinel/Cluster client (``veritas_resilience.redis``)

Cancellation is never turned into one of these: a cancelled call raises the event loop's own
cancellation exception.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

__all__ = [
    "BulkheadFullError",
    "CacheMissError",
    "CircuitOpenError",
    "ConcurrencyLimitError",
    "RateLimitedError",
    "ResilienceError",
    "ResilienceTimeoutError",
    "RetryBudgetExhaustedError",
    "ServiceUnavailableError",
]


class ResilienceError(Exception):
    """Root of every error raised by veritas-resilience."""


def public_type_name(error: BaseException) -> str:
    """The name of ``error``'s class, or of its nearest public base when the class is private.

    Logs, events and messages name error types with it, so an internal class (``_NotSent``)
    never shows up where users and operators read: they see the type they can catch.
    """
    for cls in type(error).__mro__:
        if _is_public(cls):
            return cls.__name__
    return "BaseException"  # pragma: no cover - BaseException itself is public


def _is_public(cls: type) -> bool:
    """Whether users can name ``cls``: a public name, and, when it is defined in a private module
    (``pkg._errors``), re-exported by the package in front of it."""
    if cls.__name__.startswith("_"):
        return False
    parts = cls.__module__.split(".")
    private = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
    if private is None:
        return True
    package = sys.modules.get(".".join(parts[:private]))
    return getattr(package, cls.__name__, None) is cls


class CircuitOpenError(ResilienceError):
    """A circuit breaker rejected the call without running it.

    Attributes:
        name: The breaker's name.
        state: The breaker's state when it rejected the call (``"open"``, ``"half_open"`` when
            every probe slot is taken, or ``"forced_open"``).
        retry_after: Seconds until the breaker will admit a call again (0.0 when unknown or now).
    """

    # No Python __init__: BaseException keeps the arguments in C, which halves the cost of the
    # hot rejection path. The signature below is for type checkers and readers.
    if TYPE_CHECKING:

        def __init__(self, name: str, state: str, retry_after: float) -> None: ...

    @property
    def name(self) -> str:
        """The breaker's name."""
        return str(self.args[0])

    @property
    def state(self) -> str:
        """The breaker's state when it rejected the call."""
        return str(self.args[1])

    @property
    def retry_after(self) -> float:
        """Seconds until the breaker admits a call again."""
        return float(self.args[2])

    def __str__(self) -> str:
        return f"circuit breaker {self.name!r} is {self.state}; retry after {self.retry_after:.3f}s"


class ServiceUnavailableError(ResilienceError):
    """Every step of a fallback chain failed.

    Attributes:
        name: The chain's name.
        errors: One exception per step that ran, in the order the steps ran.
        steps: The names of those steps, in the same order.
    """

    def __init__(self, name: str, steps: Sequence[str], errors: Sequence[BaseException]) -> None:
        super().__init__(name, tuple(steps), tuple(errors))
        self.name = name
        self.steps: tuple[str, ...] = tuple(steps)
        self.errors: tuple[BaseException, ...] = tuple(errors)

    def __str__(self) -> str:
        causes = "; ".join(
            f"{step}: {public_type_name(err)}: {err}" for step, err in zip(self.steps, self.errors)
        )
        return f"service {self.name!r} is temporarily unavailable ({causes or 'no step ran'})"


class CacheMissError(ResilienceError):
    """A stale cache had no value for the call, or only one older than its ``max_staleness``.

    Attributes:
        name: The cache's name.
        reason: ``"missing"`` or ``"expired"``.
        age: The age in seconds of the value that was too old, else None.
    """

    def __init__(self, name: str, reason: str, age: float | None = None) -> None:
        super().__init__(name, reason, age)
        self.name = name
        self.reason = reason
        self.age = age

    def __str__(self) -> str:
        if self.age is None:
            return f"stale cache {self.name!r} has no value for this call"
        return f"stale cache {self.name!r} has only a value {self.age:.3f}s old ({self.reason})"


class RetryBudgetExhaustedError(ResilienceError):
    """A retry was wanted but the dependency's shared retry budget had no token left.

    Attributes:
        name: The budget's name.
        attempts: How many attempts the call made before the budget stopped it.
    """

    def __init__(self, name: str, attempts: int) -> None:
        super().__init__(name, attempts)
        self.name = name
        self.attempts = attempts

    def __str__(self) -> str:
        return f"retry budget {self.name!r} exhausted after {self.attempts} attempt(s)"


class BulkheadFullError(ResilienceError):
    """A bulkhead had no free slot and no room in its wait queue (or the wait timed out).

    Attributes:
        name: The bulkhead's name.
        max_concurrent: Its concurrency limit.
    """

    def __init__(self, name: str, max_concurrent: int) -> None:
        super().__init__(name, max_concurrent)
        self.name = name
        self.max_concurrent = max_concurrent

    def __str__(self) -> str:
        return f"bulkhead {self.name!r} is full ({self.max_concurrent} concurrent calls)"


class ConcurrencyLimitError(BulkheadFullError):
    """An adaptive concurrency limit was reached; the call was rejected at once, not queued.

    It is a :class:`BulkheadFullError`, so code that handles a full bulkhead handles it too.

    Attributes:
        name: The limit's name.
        max_concurrent: The limit when the call was rejected.
    """

    def __str__(self) -> str:
        return f"adaptive limit {self.name!r} is reached ({self.max_concurrent} concurrent calls)"


class RateLimitedError(ResilienceError):
    """A rate limiter refused the call: no permit now, nor within the time it may wait.

    Attributes:
        name: The rate limiter's name.
        retry_after: Seconds until a permit will be free (for a ``Retry-After`` header).
    """

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(name, retry_after)
        self.name = name
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"rate limiter {self.name!r} refused the call; retry after {self.retry_after:.3f}s"


class ResilienceTimeoutError(ResilienceError, TimeoutError):
    """A timeout policy expired before the call finished.

    It is also a built-in :class:`TimeoutError`, so ``except TimeoutError`` catches it.

    Attributes:
        name: The timeout policy's name.
        timeout: The limit, in seconds.
    """

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(name, timeout)
        self.name = name
        self.timeout = timeout

    def __str__(self) -> str:
        return f"{self.name!r} timed out after {self.timeout:g}s"
