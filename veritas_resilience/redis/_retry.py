"""Retries that know what is safe: the policy, and the guard that runs every call under it.

Every call through a client goes through its :class:`CallGuard`: the first attempt runs straight
through the circuit breaker's fast path; only when it fails does the guard look at the error
(:func:`~veritas_resilience.redis._commands.classify`), decide whether another attempt is safe,
wait (full-jitter exponential backoff, cut short when a new master is accepted) and try again,
until the call's overall deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import redis.exceptions as rex

from .. import _hooks
from .._clock import MONOTONIC, Clock
from .._validate import positive_int as _positive_int
from .._validate import seconds as _seconds
from ..circuit_breaker import DEFAULT_BUCKETS, CircuitBreaker
from ..errors import CircuitOpenError, RetryBudgetExhaustedError
from ..events import Hook
from ..instrumentation.prometheus import HistogramValue, cumulative_buckets
from ..retry import RetryBudget
from ._commands import Failure, classify, unknown_outcome_allowed, was_unsent
from ._compat import async_timeout, expired
from ._errors import (
    NoSentinelAvailableError,
    OutcomeUnknownError,
    PoolExhaustedError,
    RedisAuthenticationError,
    RedisCircuitOpenError,
    RedisError,
    RedisUnavailableError,
)
from ._events import RedisCommandRetried
from ._topology import describe

__all__ = ["CallGuard", "RetryPolicy"]

T = TypeVar("T")

# Failures after which it is worth waiting for the topology to change rather than just sleeping:
# the wait ends as soon as a new master is accepted.
_WAIT_FOR_SWITCH = frozenset(
    {
        "no_master",
        "no_replica",
        "no_sentinel",
        "readonly",
        "masterdown",
        "unblocked",
        "role_mismatch",
        "connect",
        "connection",
        "timeout",
        "circuit_open",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a client retries: under an overall deadline, with jittered exponential backoff.

    Example:
        >>> RetryPolicy(deadline=5.0, backoff_max=0.25)  # doctest: +ELLIPSIS
        RetryPolicy(deadline=5.0, backoff_base=0.01, backoff_max=0.25, ...)

    Args:
        deadline: Seconds (> 0) a call may take in total, first attempt, waits and retries
            included. Sized to ride through a failover: ``down-after-milliseconds`` plus the
            election plus a margin. An attempt running when it expires is cut short.
        backoff_base: First backoff in seconds (> 0); doubles at each retry.
        backoff_max: Cap of the backoff in seconds (>= backoff_base). Each wait is drawn
            uniformly from ``[0, min(backoff_max, backoff_base * 2**n)]`` (full jitter).
        max_attempts: Attempts at most (>= 1), the first included; None leaves it to the
            deadline.
        retry_unknown_outcome: Retry every command after a connection loss, not just those
            known to be idempotent. Off by default: an ``INCR`` could count twice.
        idempotent_commands: More command names to treat as idempotent (e.g. ``{"HSET"}`` if
            you accept that its reply may count 0 new fields after a retry).
    """

    deadline: float | timedelta = 10.0
    backoff_base: float | timedelta = 0.01
    backoff_max: float | timedelta = 0.5
    max_attempts: int | None = None
    retry_unknown_outcome: bool = False
    idempotent_commands: Collection[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _seconds(self.deadline, "deadline")
        base = _seconds(self.backoff_base, "backoff_base")
        if _seconds(self.backoff_max, "backoff_max") < base:
            raise ValueError(
                f"backoff_max must be >= backoff_base ({base}s), got {self.backoff_max!r}"
            )
        if self.max_attempts is not None:
            _positive_int(self.max_attempts, "max_attempts")
        names: object = self.idempotent_commands
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError("idempotent_commands must be a collection of command names")
        object.__setattr__(self, "idempotent_commands", frozenset(str(n).upper() for n in names))

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before the ``retry``-th retry (1-based), jitter applied."""
        base = _seconds(self.backoff_base, "backoff_base")
        cap = _seconds(self.backoff_max, "backoff_max")
        ceiling = cap if retry > 60 else min(cap, base * 2 ** (retry - 1))
        return (rng or random).uniform(0.0, ceiling)


class CallGuard(_hooks.Instrumented):
    """Runs a client's calls: breaker, safe retries, deadline, metrics (internal).

    Args:
        name: The client's name.
        policy: The retry policy.
        breaker: The circuit breaker of the service, or None.
        settle: Called with a switch source after a failure that hints at a new master;
            returns once the lookup it started (or joined) is done, within the given seconds.
        wait_changed: Waits until the master generation changes or the given seconds pass.
        generation: Reads the current generation.
        clock: Time source.
        rng: Random source for jitter.
        hooks: Hooks of the client.
        role: ``"master"``, ``"replica"`` or ``"cluster"``: on a replica, READONLY means the
            command was a write sent to the wrong client, and is not retried.
        budget: A :class:`~veritas_resilience.RetryBudget` shared with other callers of the
            dependency: every retry takes a token, and the call fails with
            :class:`~veritas_resilience.RetryBudgetExhaustedError` when there is none.
        explain: Says why no node could be reached (e.g. the Sentinels' lookup error), for a
            call whose deadline ran out before anything was sent; None when unknown.
    """

    def __init__(
        self,
        *,
        name: str,
        policy: RetryPolicy,
        breaker: CircuitBreaker | None,
        settle: Callable[[str, float], Awaitable[None]] | None = None,
        wait_changed: Callable[[float], Awaitable[None]] | None = None,
        generation: Callable[[], int] | None = None,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        hooks: Sequence[Hook] | None = None,
        role: str = "master",
        budget: RetryBudget | None = None,
        explain: Callable[[], BaseException | None] | None = None,
    ) -> None:
        self._name = name
        self._explain = explain
        self._role = role
        self._budget = budget
        self.policy = policy
        self.breaker = breaker
        self._deadline = _seconds(policy.deadline, "deadline")
        self._max_attempts = policy.max_attempts or math.inf
        self._settle = settle
        self._wait_changed = wait_changed
        self._generation = generation or (lambda: 0)
        self._clock = clock
        self.now = clock.monotonic
        self._rng = rng or random.Random()
        self._retries: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._bounds = DEFAULT_BUCKETS
        self._hist = [0] * (len(DEFAULT_BUCKETS) + 1)
        self._hist_sum = 0.0
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The client's name."""
        return self._name

    @property
    def deadline(self) -> float:
        """Seconds a call may take in total."""
        return self._deadline

    def _on_hooks_changed(self) -> None:
        self._w_retry = self._hookset.wants(RedisCommandRetried)

    def guarded(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """``fn`` behind the breaker (the breaker's decorator keeps its closed path lock-free)."""
        if self.breaker is None:
            return fn
        return self.breaker(fn)

    def observe(self, seconds: float) -> None:
        """Record one call's duration."""
        self._hist[bisect.bisect_left(self._bounds, seconds)] += 1
        self._hist_sum += seconds

    def retries(self) -> dict[str, int]:
        """Retries so far, by reason."""
        return dict(self._retries)

    def call_errors(self) -> dict[str, int]:
        """Calls that failed with an error of the client, by error class."""
        return dict(self._errors)

    def _fail(self, error: BaseException) -> BaseException:
        key = type(error).__name__
        self._errors[key] = self._errors.get(key, 0) + 1
        return error

    async def recover(
        self,
        exc: Exception,
        started: float,
        attempt: Callable[[], Awaitable[T]],
        command: str,
        idempotent: Callable[[], bool],
        scope: Any = None,
    ) -> T:
        """Retry a call whose first attempt raised ``exc``, or raise the right error.

        Args:
            exc: What the failed attempt raised.
            started: Clock reading when the call began (the deadline counts from there).
            attempt: Runs one more attempt.
            command: The command's name, for errors and events (never its arguments).
            idempotent: Says whether the call may run twice.
            scope: The :func:`async_timeout` scope (of :attr:`deadline` seconds) the first
                attempt ran in, so that its expiry is told apart from other timeouts.

        Raises:
            OutcomeUnknownError: The connection broke (or the deadline ran out, or the client
                switched masters) after a command that is not idempotent was sent.
            RedisUnavailableError: Attempts or deadline ran out (the last error is the cause).
            NoSentinelAvailableError: The deadline ran out while no Sentinel answered.
            RedisCircuitOpenError: The breaker is open for longer than the deadline allows to
                wait.
            RedisConfigurationError: A permanent misconfiguration (e.g. wrong credentials).
            Exception: Any error that is not retried (a server error about the command...), as
                the attempt raised it.
        """
        attempts = 1
        if scope is not None and isinstance(exc, asyncio.TimeoutError) and expired(scope):
            raise await self._deadline_error(exc, started, command, idempotent, attempts)
        deadline = started + self._deadline
        while True:
            failure = classify(exc)
            if failure is not None and failure.reason == "readonly" and self._role == "replica":
                failure = None
            if failure is None:
                raise self._not_retried(exc)
            if failure.executed is None and not self._unknown_ok(idempotent):
                raise self._fail(
                    OutcomeUnknownError(
                        name=self._name,
                        command=command,
                        node=_node_of(exc),
                        attempts=attempts,
                        reason="fenced_reply" if failure.reason == "fenced_reply" else "connection",
                    )
                ) from exc
            generation = self._generation()
            if failure.refresh is not None and self._settle is not None:
                await self._settle(failure.refresh, max(0.0, deadline - self.now()))
            now = self.now()
            delay = self._delay(failure, attempts, exc, generation)
            if attempts >= self._max_attempts or now >= deadline:
                raise self._give_up(exc, failure, command, attempts, now - started)
            if isinstance(exc, CircuitOpenError) and now + exc.retry_after > deadline:
                if self._generation() == generation:
                    raise self._fail(RedisCircuitOpenError.from_breaker(exc)) from exc
                delay = 0.0
            delay = min(delay, deadline - now)
            if delay > 0:
                if failure.reason in _WAIT_FOR_SWITCH and self._wait_changed is not None:
                    await self._wait_changed(delay)
                else:
                    await self._clock.sleep(delay)
            if self._budget is not None and not self._budget.try_acquire():
                raise self._fail(RetryBudgetExhaustedError(self._budget.name, attempts)) from exc
            attempts += 1
            self._retries[failure.reason] = self._retries.get(failure.reason, 0) + 1
            if self._w_retry:
                self._emit(
                    RedisCommandRetried(
                        name=self._name,
                        command=command,
                        reason=failure.reason,
                        attempt=attempts,
                        delay=delay,
                    )
                )
            remaining = deadline - self.now()
            if remaining <= 0:
                raise self._give_up(exc, failure, command, attempts - 1, self.now() - started)
            try:
                async with async_timeout(remaining) as retry_scope:
                    return await attempt()
            except Exception as next_exc:
                if isinstance(next_exc, asyncio.TimeoutError) and expired(retry_scope):
                    raise await self._deadline_error(
                        next_exc, started, command, idempotent, attempts
                    ) from next_exc
                exc = next_exc

    def _not_retried(self, exc: Exception) -> BaseException:
        """The error for a failure that is not retried: a driver error that stands for one of
        ours is mapped to it, a server error about the command is left as it is."""
        if isinstance(exc, RedisError):
            return self._fail(exc)
        if isinstance(exc, CircuitOpenError):
            return self._fail(RedisCircuitOpenError.from_breaker(exc))
        error: RedisError
        if isinstance(exc, rex.AuthenticationError):
            error = RedisAuthenticationError(
                name=self._name,
                role="data node",
                node=_node_of(exc) or "a data node",
                detail=describe(exc),
            )
        elif isinstance(exc, rex.MaxConnectionsError):
            error = PoolExhaustedError(name=self._name, max_connections=None, waited=0.0)
        else:
            return exc
        error.__cause__ = exc
        return self._fail(error)

    async def _deadline_error(
        self,
        exc: BaseException,
        started: float,
        command: str,
        idempotent: Callable[[], bool],
        attempts: int,
    ) -> BaseException:
        """The error for a call whose deadline cut an attempt short."""
        elapsed = self.now() - started
        if not was_unsent(exc):
            # It was sent and no reply came in time: the node may be stalled, look again.
            if self._settle is not None:
                await self._settle("connection_error", 0.0)
            if not self._unknown_ok(idempotent):
                error: BaseException = OutcomeUnknownError(
                    name=self._name,
                    command=command,
                    node=None,
                    attempts=attempts,
                    reason="deadline",
                )
                error.__cause__ = exc
                return self._fail(error)
        elif self._explain is not None:
            explained = self._explain()
            if explained is not None:
                explained.__cause__ = exc
                return self._fail(explained)
        return self._give_up(
            exc, Failure("deadline", None, None, False), command, attempts, elapsed
        )

    def _unknown_ok(self, idempotent: Callable[[], bool]) -> bool:
        return self.policy.retry_unknown_outcome or unknown_outcome_allowed() or idempotent()

    def _delay(self, failure: Failure, attempts: int, exc: BaseException, generation: int) -> float:
        if (
            failure.reason in ("stale_connection", "fenced_reply")
            or self._generation() != generation
        ):
            return 0.0  # a new master is already known: go now
        if isinstance(exc, CircuitOpenError):
            return max(exc.retry_after, self.policy.backoff(attempts, self._rng))
        return self.policy.backoff(attempts, self._rng)

    def _give_up(
        self, exc: BaseException, failure: Failure, command: str, attempts: int, elapsed: float
    ) -> BaseException:
        if isinstance(exc, NoSentinelAvailableError):
            # More precise than "unavailable": nothing could even say where the master is.
            unreachable = exc.clone()
            unreachable.__cause__ = exc
            return self._fail(unreachable)
        error = RedisUnavailableError(
            name=self._name,
            command=command,
            attempts=attempts,
            elapsed=elapsed,
            reason=failure.reason,
        )
        error.__cause__ = exc
        return self._fail(error)

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for reason, count in sorted(self._retries.items()):
            yield "veritas_redis_retries", (name, reason), float(count)
        for error, count in sorted(self._errors.items()):
            yield "veritas_redis_call_errors", (name, error), float(count)
        yield (
            "veritas_redis_command_duration_seconds",
            (name,),
            HistogramValue(cumulative_buckets(self._bounds, self._hist), self._hist_sum),
        )

    def __repr__(self) -> str:
        return f"<CallGuard {self._name!r} deadline={self._deadline:g}s>"


def _node_of(exc: BaseException) -> str | None:
    """``host:port`` named in a redis-py connection error message, when there is one."""
    text = str(exc)
    for word in text.replace("(", " ").replace(")", " ").replace(",", " ").split():
        host, sep, port = word.rstrip(".:").rpartition(":")
        if sep and host and port.isdigit() and ("." in host or host == "localhost"):
            return f"{host}:{port}"
    return None
