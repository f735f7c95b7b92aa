"""Retries on tenacity that know about circuit breakers, budgets and cancellation.

:class:`Retry` has stamina's opinions: you name the errors to retry, waits grow exponentially with
jitter (``min(wait_max, wait_initial * wait_exp_base**(n-1) + U(0, wait_jitter))``), and both the
attempts and the total time are capped. On top of that:

- A :class:`~veritas_resilience.CircuitOpenError` is retried only when the breaker reopens before
  the next wait is over (its ``retry_after`` is shorter than the wait); otherwise it is raised at
  once. Retrying an open breaker only burns attempts.
- Cancellation (asyncio's ``CancelledError``, trio's ``Cancelled``), ``KeyboardInterrupt`` and
  ``SystemExit`` are never retried, counted or swallowed: only ``Exception`` subclasses are looked
  at.
- A :class:`RetryBudget` shared by every caller of a dependency caps the retries they make
  together, so that an outage does not turn into a retry storm.

The first attempt runs directly in the decorator's wrapper, so a call that succeeds costs an
``await`` and a counter; tenacity's ``AsyncRetrying`` takes over only after a retryable failure,
and sleeps through the policy's :class:`~veritas_resilience.Clock`, so tests with
:class:`~veritas_resilience.testing.FakeClock` never wait, under asyncio and trio alike.

:func:`set_testing` switches every policy to a fixed number of attempts without waits, for your
test suite.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio.lowlevel
from tenacity import AsyncRetrying, DoAttempt, DoSleep, RetryCallState
from tenacity import retry_if_exception as _retry_if_exception
from tenacity.stop import stop_after_attempt, stop_base, stop_before_delay
from tenacity.wait import wait_base, wait_exponential_jitter, wait_none

from . import _hooks, _validate
from ._clock import MONOTONIC, Clock
from ._validate import ExceptionMatcher, Seconds
from ._validate import matcher as _matcher
from ._validate import number as _number
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .errors import CircuitOpenError, RetryBudgetExhaustedError
from .events import Hook, RetryBudgetDenied, RetryExhausted, RetryScheduled
from .instrumentation.prometheus import HistogramValue, define_metric

__all__ = [
    "Retry",
    "RetryBudget",
    "RetryBudgetDenied",
    "RetryExhausted",
    "RetryScheduled",
    "is_testing",
    "set_testing",
]

P = ParamSpec("P")
T = TypeVar("T")

_OUTCOMES = ("success", "retried", "exhausted", "not_retried", "budget_exhausted")

define_metric(
    "veritas_retry_attempts",
    "counter",
    "Attempts made by a retry policy, by what followed: success, retried, exhausted (no attempt "
    "or time left), not_retried (an error not named, or an open breaker), budget_exhausted.",
    ("name", "outcome"),
)
define_metric(
    "veritas_retry_budget_exhausted",
    "counter",
    "Retries refused because the dependency's shared retry budget was empty.",
    ("name",),
)


# -- events -------------------------------------------------------------------------------------


# -- testing switch -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Testing:
    attempts: int
    no_wait: bool


_testing: _Testing | None = None


class _RestoreTesting:
    """Returned by :func:`set_testing`: restores the previous mode on exit from a with block."""

    __slots__ = ("_old",)

    def __init__(self, old: _Testing | None) -> None:
        self._old = old

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _testing
        _testing = self._old


def set_testing(
    testing: bool = True, *, attempts: int = 1, no_wait: bool = True
) -> _RestoreTesting:
    """Switch every retry policy to test mode, or back.

    In test mode a policy makes exactly ``attempts`` attempts (its own attempt cap and time cap
    are ignored) and, with ``no_wait``, does not sleep between them. Breaker awareness, the retry
    budget and the choice of errors to retry stay as configured. The switch is process-wide;
    used as a context manager it restores the previous mode on exit::

        with veritas_resilience.retry.set_testing(attempts=3):
            await client.fetch()  # at most 3 attempts, no backoff

    Args:
        testing: True to enter test mode, False to leave it.
        attempts: Attempts (>= 1) each call makes in test mode; 1 disables retries.
        no_wait: Whether to skip the waits between attempts.

    Returns:
        A context manager that restores the previous mode.

    Raises:
        ValueError: If ``attempts`` is < 1.
    """
    global _testing
    old = _testing
    _testing = _Testing(_positive_int(attempts, "attempts"), bool(no_wait)) if testing else None
    return _RestoreTesting(old)


def is_testing() -> bool:
    """Whether :func:`set_testing` has put retries in test mode."""
    return _testing is not None


# -- budget -------------------------------------------------------------------------------------


class RetryBudget(_hooks.Instrumented):
    """A token bucket of retries shared by every caller of one dependency.

    Each retry (never a first attempt) takes a token; tokens come back at ``refill_rate`` per
    second up to ``capacity``. When the bucket is empty a retry is refused and the call raises
    :class:`~veritas_resilience.RetryBudgetExhaustedError` (from the attempt's error): during an
    outage the callers together add at most ``refill_rate`` retries per second on top of their
    first attempts, instead of multiplying the load by the number of attempts::

        payments_budget = RetryBudget(name="payments", capacity=20, refill_rate=5)
        charge_retry = Retry(on=ConnectionError, budget=payments_budget)
        refund_retry = Retry(on=ConnectionError, budget=payments_budget)

    Args:
        name: Used in errors, events and metric labels; ``retry-budget-N`` by default.
        capacity: The most tokens (>= 1; each retry takes one) the bucket holds, which is also
            how it starts: the largest burst of retries allowed.
        refill_rate: Tokens (>= 0) added per second of the clock; 0 makes a fixed allowance.
        clock: Time source; :class:`~veritas_resilience.testing.FakeClock` in tests.
        hooks: Hooks for this budget only (it exports its metrics through them).

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        capacity: float = 10,
        refill_rate: float = 1.0,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self._name = _validate.name(name, "retry-budget")
        self._capacity = _number(capacity, "capacity", allow_zero=False)
        if self._capacity < 1:
            # A retry takes a whole token: a smaller bucket could never grant one.
            raise ValueError(
                f"capacity must be a number >= 1 (each retry takes one token), got {capacity!r}"
            )
        self._rate = _number(refill_rate, "refill_rate", allow_zero=True)
        self._now = _validate.clock(clock).monotonic
        self._tokens = self._capacity
        self._updated = self._now()
        self._n_exhausted = 0
        self._lock = threading.Lock()
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The budget's name."""
        return self._name

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds."""
        return self._capacity

    @property
    def refill_rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        with self._lock:
            self._refill(self._now())
            return self._tokens

    @property
    def exhausted(self) -> int:
        """How many retries the budget has refused."""
        return self._n_exhausted

    def __repr__(self) -> str:
        return f"<RetryBudget {self._name!r} tokens={self.tokens:.2f}/{self._capacity:g}>"

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._updated = now

    def try_acquire(self) -> bool:
        """Take one token for a retry; return False (and count it) when there is none."""
        with self._lock:
            self._refill(self._now())
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self._n_exhausted += 1
            return False

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield "veritas_retry_budget_exhausted", (self._name,), float(self._n_exhausted)


# -- retry policy -------------------------------------------------------------------------------

_has_multiplier = "multiplier" in inspect.signature(wait_exponential_jitter).parameters


def _exponential_jitter(initial: float, maximum: float, base: float, jitter: float) -> wait_base:
    # tenacity 9.2 renamed ``initial`` to ``multiplier`` (same meaning) and deprecated the old name.
    if _has_multiplier:
        return wait_exponential_jitter(
            multiplier=initial, max=maximum, exp_base=base, jitter=jitter
        )
    return wait_exponential_jitter(initial=initial, max=maximum, exp_base=base, jitter=jitter)


class Retry(_hooks.Instrumented):
    """Retry an async call on the errors you name, with capped exponential backoff and jitter.

    Use it as a decorator or as ``await retry.call(fn, ...)``::

        @Retry(on=(ConnectionError, TimeoutError), attempts=5, timeout=10, name="orders-db")
        async def load_order(order_id: int) -> Order: ...

    When it sits around a circuit breaker (as :class:`~veritas_resilience.pipeline.Pipeline`
    places it), a :class:`~veritas_resilience.CircuitOpenError` ends the retries at once unless
    the breaker reopens before the next wait is over.

    Args:
        on: The errors to retry: an exception type, a tuple of them, or a predicate on the
            exception. Required: retrying everything retries bugs too.
        name: Used in events and metric labels; ``retry-N`` by default.
        attempts: The most attempts (>= 1), the first included.
        timeout: Seconds (> 0) after the first failure within which retries may run: a retry
            whose wait would end past it is not made. None for no time cap. (The first attempt
            is not timed, so that a successful call pays nothing for it; bound each attempt
            with a :class:`~veritas_resilience.limits.Timeout`.)
        wait_initial: The first wait in seconds (>= 0), before jitter.
        wait_max: The longest wait in seconds (>= wait_initial), jitter included.
        wait_jitter: The most random seconds (>= 0) added to each wait.
        wait_exp_base: The factor (>= 1) each wait grows by.
        wait: A tenacity wait strategy to use instead of the exponential one above.
        stop: A tenacity stop strategy to use instead of ``attempts`` and ``timeout``.
        budget: A :class:`RetryBudget` that every retry must take a token from.
        clock: Time source for waits and the time cap; ``FakeClock`` in tests.
        hooks: Hooks for this policy only; the process-wide defaults when None.

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    def __init__(
        self,
        *,
        on: ExceptionMatcher,
        name: str | None = None,
        attempts: int = 10,
        timeout: Seconds | None = 45.0,
        wait_initial: Seconds = 0.1,
        wait_max: Seconds = 5.0,
        wait_jitter: Seconds = 1.0,
        wait_exp_base: float = 2.0,
        wait: wait_base | Callable[[RetryCallState], float] | None = None,
        stop: stop_base | Callable[[RetryCallState], bool] | None = None,
        budget: RetryBudget | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        if on is None:
            raise TypeError("on must name the errors to retry: a type, a tuple, or a predicate")
        matcher = _matcher(on, "on")
        assert matcher is not None
        self._on = matcher
        self._name = _validate.name(name, "retry")
        self._auto_named = name is None
        self._attempts = _positive_int(attempts, "attempts")
        self._timeout = None if timeout is None else _seconds(timeout, "timeout")
        initial = _seconds(wait_initial, "wait_initial", allow_zero=True)
        maximum = _seconds(wait_max, "wait_max", allow_zero=True)
        if maximum < initial:
            raise ValueError(f"wait_max must be >= wait_initial ({initial!r}s), got {maximum!r}")
        jitter = _seconds(wait_jitter, "wait_jitter", allow_zero=True)
        base = wait_exp_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1 <= base < math.inf:
            raise ValueError(f"wait_exp_base must be a finite number >= 1, got {base!r}")
        if wait is not None and not callable(wait):
            raise TypeError(f"wait must be a tenacity wait strategy, got {wait!r}")
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be a tenacity stop strategy, got {stop!r}")
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a RetryBudget or None, got {budget!r}")
        self._wait = (
            wait if wait is not None else _exponential_jitter(initial, maximum, base, jitter)
        )
        if stop is None:
            stop = stop_after_attempt(self._attempts)
            if self._timeout is not None:
                stop = stop | stop_before_delay(self._timeout)
        self._stop = stop
        self._budget = budget
        self._clock = _validate.clock(clock, sleeps=True)
        self._now = clock.monotonic
        self._retry_if = _retry_if_exception(self._should_retry)
        self._n = dict.fromkeys(_OUTCOMES[1:], 0)  # "success" is _n_success, on the hot path
        self._n_success = 0
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The policy's name."""
        return self._name

    @property
    def attempts(self) -> int:
        """The most attempts per call (the ``attempts`` setting; a custom ``stop`` may differ)."""
        return self._attempts

    @property
    def budget(self) -> RetryBudget | None:
        """The shared retry budget, if any."""
        return self._budget

    @property
    def clock(self) -> Clock:
        """The policy's time source."""
        return self._clock

    def counts(self) -> dict[str, int]:
        """Attempts since creation by what followed them (the outcomes of the metric)."""
        return {"success": self._n_success, **self._n}

    def __repr__(self) -> str:
        return f"<Retry {self._name!r} attempts={self._attempts} timeout={self._timeout}>"

    def _on_hooks_changed(self) -> None:
        hooks = self._hookset
        self._w_scheduled = hooks.wants(RetryScheduled)
        self._w_exhausted = hooks.wants(RetryExhausted)
        self._w_budget = hooks.wants(RetryBudgetDenied)

    def _should_retry(self, exc: BaseException) -> bool:
        # An open breaker is always a candidate; whether to wait for it is decided against the
        # next wait in _after_failure.
        return isinstance(exc, CircuitOpenError) or (isinstance(exc, Exception) and self._on(exc))

    def _retrying(self, testing: _Testing | None) -> AsyncRetrying:
        # A fresh controller per failing call: tenacity keeps per-call state in thread-locals
        # that concurrent coroutines of one thread would otherwise share (jd/tenacity#701).
        if testing is None:
            stop, wait = self._stop, self._wait
        else:
            stop = stop_after_attempt(testing.attempts)
            wait = wait_none() if testing.no_wait else self._wait
        return AsyncRetrying(
            sleep=self._clock.sleep, stop=stop, wait=wait, retry=self._retry_if, reraise=True
        )

    async def _after_failure(
        self,
        exc: Exception,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """The first attempt failed with ``exc``: let tenacity decide and run the retries."""
        now = self._now
        testing = _testing
        retrying = self._retrying(testing)
        retrying.begin()
        state = RetryCallState(retrying, fn, args, kwargs)
        # tenacity reads time.monotonic(); the policy's clock takes its place so that time caps
        # follow a fake clock in tests. Time counts from the first failure: reading the clock
        # before the first attempt would cost every successful call (about 70 ns here).
        state.start_time = state.outcome_timestamp = now()
        state.set_exception((type(exc), exc, exc.__traceback__))
        state.outcome_timestamp = state.start_time
        counts = self._n
        while True:
            try:
                do = await retrying.iter(state)
            except Exception as final:
                self._finish_failed(retrying, state, final)
                raise
            if isinstance(do, DoAttempt):
                try:
                    result = await fn(*args, **kwargs)
                except Exception:
                    state.set_exception(sys.exc_info())  # type: ignore[arg-type]
                else:
                    state.set_result(result)
                state.outcome_timestamp = now()
            elif isinstance(do, DoSleep):
                wait = float(do)
                assert state.outcome is not None
                error = state.outcome.exception()
                assert error is not None
                if isinstance(error, CircuitOpenError) and error.retry_after > wait:
                    counts["not_retried"] += 1
                    raise error
                budget = self._budget
                if budget is not None and not budget.try_acquire():
                    counts["budget_exhausted"] += 1
                    if self._w_budget:
                        self._emit(
                            RetryBudgetDenied(
                                name=self._name,
                                budget=budget.name,
                                attempts=state.attempt_number,
                                error=error,
                            )
                        )
                    raise RetryBudgetExhaustedError(budget.name, state.attempt_number) from error
                counts["retried"] += 1
                if self._w_scheduled:
                    self._emit(
                        RetryScheduled(
                            name=self._name, attempt=state.attempt_number, wait=wait, error=error
                        )
                    )
                state.prepare_for_next_attempt()
                if testing is not None and testing.no_wait:
                    await anyio.lowlevel.checkpoint()
                else:
                    await self._clock.sleep(wait)
            else:
                self._n_success += 1
                return do  # type: ignore[no-any-return]

    def _finish_failed(
        self, retrying: AsyncRetrying, state: RetryCallState, error: BaseException
    ) -> None:
        if not retrying.iter_state.retry_run_result:
            self._n["not_retried"] += 1
            return
        self._n["exhausted"] += 1
        if self._w_exhausted:
            elapsed = (state.outcome_timestamp or state.start_time) - state.start_time
            self._emit(
                RetryExhausted(
                    name=self._name,
                    attempts=state.attempt_number,
                    elapsed=elapsed,
                    error=error,
                )
            )

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)``, retrying it as configured.

        Raises:
            Exception: The last attempt's error when the retries end (it was not retryable, no
                attempt or time was left, or the breaker stays open past the next wait).
            RetryBudgetExhaustedError: When a retry was wanted but the budget was empty.
        """
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            return await self._after_failure(exc, fn, args, kwargs)
        self._n_success += 1
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function so every call is retried as configured."""
        _validate.require_async(fn, "Retry")
        policy = self
        after_failure = self._after_failure

        # The first attempt is awaited right here, not in a helper coroutine: a successful call
        # costs this frame, a try block and a counter; tenacity only runs after a failure.
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                return await after_failure(exc, fn, args, kwargs)
            policy._n_success += 1
            return result

        wrapper.retry = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for outcome, count in self.counts().items():
            yield "veritas_retry_attempts", (name, outcome), float(count)
