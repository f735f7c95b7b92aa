"""Hedged calls (Dean and Barroso, "The Tail at Scale"): ask again when an answer is late.

:class:`Hedge` starts a call and, when no answer has come after ``delay``, starts another attempt
of the same call, up to ``max_attempts`` in flight. The first success wins; the other attempts are
cancelled and awaited before the call returns, so nothing outlives it. The delay is fixed, or the
observed ``percentile`` (p95 by default) of the call's own attempt latencies, so that only the
slowest few percent of calls are hedged.

Hedging repeats calls, so it is only for calls that are safe to repeat: a ``Hedge`` cannot be
built without ``idempotent=True``. Its extra load is capped by a budget (``budget_percent`` extra
attempts per hundred calls), and it does not hedge while a given circuit breaker is open or
half-open: a struggling dependency is not sent more work.

Clients hedge over alternative targets with :meth:`Hedge.call_targets`: attempt *i* goes to
target *i* (a standby, a replica), so a slow node is raced by another one.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import anyio

from . import _hooks, _validate
from ._clock import MONOTONIC, Clock
from ._validate import Seconds
from ._validate import percent as _percent
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .circuit_breaker import CircuitBreaker
from .events import CircuitState, Event, Hook
from .instrumentation.prometheus import HistogramValue, define_metric
from .instrumentation.structlog import LOGGED_EVENTS

__all__ = ["Hedge", "HedgeBudgetExhausted", "HedgeSkipped", "HedgeStarted"]

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")

define_metric(
    "veritas_hedge_calls",
    "counter",
    "Calls through a hedge, by which attempt answered: primary (the first), hedge (a later "
    "one), failed (every attempt failed).",
    ("name", "outcome"),
)
define_metric(
    "veritas_hedge_attempts", "counter", "Extra (hedged) attempts a hedge started.", ("name",)
)
define_metric(
    "veritas_hedge_cancelled",
    "counter",
    "Attempts a hedge cancelled because another attempt answered first.",
    ("name",),
)
define_metric(
    "veritas_hedge_skipped",
    "counter",
    "Hedged attempts not started although the delay passed, by reason: budget (the extra-load "
    "budget was spent) or breaker (the breaker was open or half-open).",
    ("name", "reason"),
)
define_metric(
    "veritas_hedge_delay_seconds",
    "gauge",
    "The delay after which a hedge starts another attempt now.",
    ("name",),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeStarted(Event):
    """A hedge started another attempt because no answer came within the delay.

    Attributes:
        attempt: The attempt's number (2 for the first hedge).
        delay: The delay that passed, in seconds.
    """

    kind: ClassVar[str] = "hedge"
    attempt: int
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeSkipped(Event):
    """The delay passed but the hedge did not start another attempt.

    Attributes:
        reason: ``"budget"`` (the extra-load budget is spent) or ``"breaker"`` (the breaker is
            open or half-open).
    """

    kind: ClassVar[str] = "hedge"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeBudgetExhausted(Event):
    """A hedge's budget ran out: slow calls are not hedged until calls earn it back.

    Sent when the budget first refuses a hedge after having allowed one, not for every refusal.

    Attributes:
        budget_percent: The budget, in extra attempts per hundred calls.
    """

    kind: ClassVar[str] = "hedge"
    budget_percent: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: tail latency is no longer being hedged."""
        return (
            "warning",
            "hedge_budget_exhausted",
            {"hedge": self.name, "budget_percent": self.budget_percent},
        )


LOGGED_EVENTS.add(HedgeBudgetExhausted)

_PENDING: Any = object()
_get_running_loop = asyncio._get_running_loop

# Latency samples kept for the percentile, how many before it replaces ``initial_delay``, and
# how often (in new samples) it is recomputed: sorting a few hundred floats costs microseconds.
_WINDOW = 512
_MIN_SAMPLES = 20
_RECOMPUTE_EVERY = 16


class _Race:
    """The state of one hedged call, shared by its attempts and the task that starts them."""

    __slots__ = (
        "changed",
        "ended",
        "errors",
        "running",
        "waiter",
        "wake",
        "winner",
        "winner_index",
    )

    def __init__(self) -> None:
        self.winner: Any = _PENDING
        self.winner_index = -1
        self.errors: list[Exception] = []
        self.running = 0
        self.ended = 0  # attempts that ended, however
        self.wake: anyio.CancelScope | None = None
        self.changed: anyio.Event | None = None
        self.waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """An attempt ended: wake the task that starts attempts."""
        self.ended += 1
        if self.wake is not None:
            self.wake.cancel()
        if self.changed is not None:
            self.changed.set()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _resolve(waiter: asyncio.Future[None]) -> None:
    """The delay passed: wake the task that starts attempts (unless something already did)."""
    if not waiter.done():
        waiter.set_result(None)


class Hedge(_hooks.Instrumented):
    """Start another attempt of a slow call after a delay; the first success wins.

    For reads that are safe to repeat::

        hedged = Hedge(idempotent=True, delay=0.05, max_attempts=2, budget_percent=5)

        @hedged
        async def get_profile(user_id: int) -> dict: ...

    With ``delay=None`` the delay follows the observed ``percentile`` (p95 by default) of the
    attempts' latencies (``initial_delay`` until enough calls were seen). Over alternative
    targets, where attempt *i* goes to ``targets[i]``::

        row = await hedged.call_targets(fetch_from, [primary, standby_1, standby_2], query)

    The attempts run as tasks (an anyio task group; on asyncio, with the loop's clock or a
    ``FakeClock``, plain asyncio tasks, which cost several times less): the first to succeed
    wins and the others are cancelled and awaited before the call returns. An attempt that fails
    does not end the call while another is in flight; when every attempt started has failed, the
    last error is raised. Hedged attempts are only started while the budget has room (on average
    ``budget_percent`` extra attempts per hundred calls) and ``breaker`` (if given) is closed.
    Cancelling the call cancels every attempt. Like a :class:`~veritas_resilience.Bulkhead`, a
    hedge belongs to one event loop: its counters and budget are not locked.

    Args:
        idempotent: Must be True: you confirm that the call may run more than once at a time.
        delay: Seconds (> 0) without an answer before another attempt starts; None follows the
            observed ``percentile`` of attempt latencies.
        percentile: Which percentile (0 to 100, exclusive of 0) of latencies the delay follows
            when ``delay`` is None.
        initial_delay: Seconds (> 0) used while fewer than 20 latencies have been seen.
        min_delay: Seconds (> 0) the observed delay never goes below.
        max_attempts: Attempts (>= 1) per call, the first included; 1 never hedges.
        budget_percent: Extra attempts allowed per hundred calls (0 to 100), with room for a
            burst of as many as a hundred calls earn.
        breaker: No hedging while this breaker is open or half-open.
        name: Used in events and metric labels; ``hedge-N`` by default.
        clock: Time source; :class:`~veritas_resilience.testing.FakeClock` in tests.
        hooks: Hooks for this hedge only; the process-wide defaults when None.

    Raises:
        ValueError: If ``idempotent`` is not True, or a setting is outside its allowed range
            (the message names it).
    """

    def __init__(
        self,
        *,
        idempotent: bool,
        delay: Seconds | None = None,
        percentile: float = 95.0,
        initial_delay: Seconds = 0.1,
        min_delay: Seconds = 0.001,
        max_attempts: int = 2,
        budget_percent: float = 10.0,
        breaker: CircuitBreaker | None = None,
        name: str | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        if idempotent is not True:
            raise ValueError(
                "idempotent must be True: a hedge runs a call more than once, so it is only "
                f"for calls that are safe to repeat (got {idempotent!r})"
            )
        self._fixed = None if delay is None else _seconds(delay, "delay")
        self._percentile = _percent(percentile, "percentile")
        if self._percentile == 0:
            raise ValueError("percentile must be a percentage > 0 and <= 100, got 0.0")
        self._initial_delay = _seconds(initial_delay, "initial_delay")
        self._min_delay = _seconds(min_delay, "min_delay")
        self._max_attempts = _positive_int(max_attempts, "max_attempts")
        self._budget_percent = _percent(budget_percent, "budget_percent")
        self._ratio = self._budget_percent / 100.0
        # Room for what a hundred calls earn, and at least one whole hedge (none at 0%).
        self._credit_cap = max(1.0, self._ratio * 100.0) if self._ratio > 0 else 0.0
        self._credits = self._credit_cap
        self._budget_refused = False
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        self._breaker = breaker
        self._name = _validate.name(name, "hedge")
        self._clock = _validate.clock(clock, sleeps=True)
        self._now = clock.monotonic
        # On asyncio the race runs on plain tasks when the delay can be a timer: the loop's
        # (the default clock) or the clock's own (one with call_at, such as FakeClock).
        self._schedules = callable(getattr(clock, "call_at", None))
        self._native = clock is MONOTONIC or self._schedules
        self._samples: deque[float] = deque(maxlen=_WINDOW)
        self._new_samples = 0
        self._delay = self._fixed if self._fixed is not None else self._initial_delay
        self._counts = {"primary": 0, "hedge": 0, "failed": 0}
        self._skipped = {"budget": 0, "breaker": 0}
        self._n_attempts = 0
        self._n_cancelled = 0
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The hedge's name."""
        return self._name

    @property
    def delay(self) -> float:
        """Seconds without an answer before another attempt starts, as of now."""
        return self._delay

    @property
    def max_attempts(self) -> int:
        """Attempts per call, the first included."""
        return self._max_attempts

    @property
    def budget_percent(self) -> float:
        """Extra attempts allowed per hundred calls."""
        return self._budget_percent

    def counts(self) -> dict[str, int]:
        """Counters since creation.

        Returns:
            Calls by which attempt answered (``primary``, ``hedge``, ``failed``), extra attempts
            started (``attempts``), attempts cancelled because another answered first
            (``cancelled``) and hedges not started (``skipped_budget``, ``skipped_breaker``).
        """
        return {
            **self._counts,
            "attempts": self._n_attempts,
            "cancelled": self._n_cancelled,
            "skipped_budget": self._skipped["budget"],
            "skipped_breaker": self._skipped["breaker"],
        }

    def __repr__(self) -> str:
        how = "fixed" if self._fixed is not None else f"p{self._percentile:g}"
        return (
            f"<Hedge {self._name!r} delay={self._delay:g}s ({how}) "
            f"max_attempts={self._max_attempts} budget={self._budget_percent:g}%>"
        )

    def _on_hooks_changed(self) -> None:
        self._w_started = self._hookset.wants(HedgeStarted)
        self._w_skipped = self._hookset.wants(HedgeSkipped)

    # -- delay and budget ------------------------------------------------------------------------

    def _observe(self, seconds: float) -> None:
        if self._fixed is not None:
            return
        self._samples.append(seconds)
        self._new_samples += 1
        if self._new_samples >= _RECOMPUTE_EVERY and len(self._samples) >= _MIN_SAMPLES:
            self._new_samples = 0
            ordered = sorted(self._samples)
            index = min(len(ordered) - 1, math.ceil(self._percentile / 100 * len(ordered)) - 1)
            self._delay = max(self._min_delay, ordered[max(0, index)])

    def _refusal(self) -> str | None:
        """Why another attempt may not start now (None when it may); takes a budget credit."""
        breaker = self._breaker
        if breaker is not None and breaker.state in (
            CircuitState.OPEN,
            CircuitState.HALF_OPEN,
            CircuitState.FORCED_OPEN,
        ):
            return "breaker"
        if self._credits < 1.0:
            if not self._budget_refused:
                self._budget_refused = True
                self._emit(
                    HedgeBudgetExhausted(name=self._name, budget_percent=self._budget_percent)
                )
            return "budget"
        self._credits -= 1.0
        self._budget_refused = False
        return None

    # -- calls -----------------------------------------------------------------------------------

    async def _attempt(
        self,
        race: _Race,
        index: int,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        now = self._now
        started = now()
        cancelled = anyio.get_cancelled_exc_class()
        try:
            result = await fn(*args, **kwargs)
        except cancelled:
            if race.winner is not _PENDING:
                self._n_cancelled += 1
                # Cut short by a faster attempt: its latency was at least this long.
                self._observe(now() - started)
            raise
        except Exception as exc:
            race.errors.append(exc)
        else:
            self._observe(now() - started)
            if race.winner is _PENDING:
                race.winner = result
                race.winner_index = index
        finally:
            race.running -= 1
            race.notify()

    async def _drive(
        self,
        race: _Race,
        attempts: int,
        start: Callable[[int], None],
        wait: Callable[[_Race, float | None], Awaitable[bool]],
    ) -> None:
        """Start attempts until one succeeds or all that may start have ended.

        ``start(i)`` starts attempt ``i``; ``wait(race, delay)`` returns True when ``delay``
        passed with no attempt ending, False as soon as one ends (``delay=None``: no timer).
        """
        start(0)
        started = 1
        while race.winner is _PENDING and race.running:
            if started >= attempts:
                await wait(race, None)
                continue
            delay = self._delay
            if not await wait(race, delay):
                continue  # an attempt ended first: look again
            reason = self._refusal()
            if reason is not None:
                self._skipped[reason] += 1
                if self._w_skipped:
                    self._emit(HedgeSkipped(name=self._name, reason=reason))
                started = attempts  # no more hedges for this call
                continue
            self._n_attempts += 1
            if self._w_started:
                self._emit(HedgeStarted(name=self._name, attempt=started + 1, delay=delay))
            start(started)
            started += 1

    async def _wait_anyio(self, race: _Race, delay: float | None) -> bool:
        """``wait`` for any backend: an event the ending attempt sets, the delay as a timer."""
        ended_before = race.ended
        race.changed = event = anyio.Event()
        clock = self._clock
        try:
            if delay is None:
                await event.wait()
            elif clock is MONOTONIC:
                with anyio.move_on_after(delay):
                    await event.wait()
            elif self._schedules:
                # A clock that schedules (FakeClock): the delay follows it, not the loop.
                timer = clock.call_at(clock.monotonic() + delay, event.set)  # type: ignore[attr-defined]
                try:
                    await event.wait()
                finally:
                    timer.cancel()
            else:  # a clock that can only sleep: sleep, and be cancelled by an ending attempt
                race.wake = scope = anyio.CancelScope()
                with scope:
                    await clock.sleep(delay)
                race.wake = None
        finally:
            race.changed = None
        return race.ended == ended_before

    async def _wait_asyncio(self, race: _Race, delay: float | None) -> bool:
        """``wait`` on asyncio: a future the ending attempt resolves, the delay a loop timer."""
        ended_before = race.ended
        loop = _get_running_loop()
        assert loop is not None
        race.waiter = waiter = loop.create_future()
        timer: Any = None
        if delay is not None:
            clock = self._clock
            if clock is MONOTONIC:
                timer = loop.call_later(delay, _resolve, waiter)
            else:
                timer = clock.call_at(  # type: ignore[attr-defined]
                    clock.monotonic() + delay, functools.partial(_resolve, waiter)
                )
        try:
            await waiter
        finally:
            race.waiter = None
            if timer is not None:
                timer.cancel()
        return race.ended == ended_before

    async def _race_asyncio(
        self,
        race: _Race,
        attempts: int,
        attempt_args: Callable[[int], tuple[Any, ...]],
        fn: Callable[..., Awaitable[Any]],
        kwargs: dict[str, Any],
    ) -> None:
        """The race on plain asyncio tasks: several times cheaper than a task group there."""
        loop = _get_running_loop()
        assert loop is not None
        tasks: list[asyncio.Task[None]] = []

        def start(index: int) -> None:
            race.running += 1
            coro = self._attempt(race, index, fn, attempt_args(index), kwargs)
            tasks.append(loop.create_task(coro))

        try:
            await self._drive(race, attempts, start, self._wait_asyncio)
        finally:
            # Whatever happened (a winner, every attempt failed, or we are being cancelled),
            # cancel what still runs and wait for it: nothing outlives the call.
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            cancelled: BaseException | None = None
            while pending:
                try:
                    await asyncio.wait(pending)
                except asyncio.CancelledError as exc:  # cancelled meanwhile: finish, then raise
                    cancelled = exc
                pending = [task for task in pending if not task.done()]
            if cancelled is not None:
                raise cancelled

    async def _race(
        self,
        fn: Callable[..., Awaitable[T]],
        targets: Sequence[Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        credits = self._credits + self._ratio
        self._credits = credits if credits < self._credit_cap else self._credit_cap
        attempts = self._max_attempts if targets is None else min(self._max_attempts, len(targets))
        race = _Race()

        def attempt_args(index: int) -> tuple[Any, ...]:
            return args if targets is None else (targets[index], *args)

        if self._native and _get_running_loop() is not None:
            await self._race_asyncio(race, attempts, attempt_args, fn, kwargs)
        else:
            async with anyio.create_task_group() as tg:

                def start(index: int) -> None:
                    race.running += 1
                    tg.start_soon(self._attempt, race, index, fn, attempt_args(index), kwargs)

                await self._drive(race, attempts, start, self._wait_anyio)
                tg.cancel_scope.cancel()
        if race.winner is not _PENDING:
            self._counts["primary" if race.winner_index == 0 else "hedge"] += 1
            return race.winner  # type: ignore[no-any-return]
        self._counts["failed"] += 1
        raise race.errors[-1]

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)``, hedged.

        Returns:
            The first successful attempt's result.

        Raises:
            Exception: The last attempt's error, when every attempt started has failed.
        """
        if not self._max_attempts > 1:
            return await fn(*args, **kwargs)
        return await self._race(fn, None, args, kwargs)

    async def call_targets(
        self,
        fn: Callable[Concatenate[A, P], Awaitable[T]],
        targets: Sequence[A],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``await fn(targets[i], *args, **kwargs)`` for attempt *i*, hedged.

        The first attempt goes to ``targets[0]``, the first hedge to ``targets[1]`` and so on:
        at most ``min(max_attempts, len(targets))`` attempts.

        Raises:
            ValueError: If ``targets`` is empty.
            Exception: The last attempt's error, when every attempt started has failed.
        """
        if not targets:
            raise ValueError("targets must hold at least one target")
        if self._max_attempts == 1 or len(targets) == 1:
            return await fn(targets[0], *args, **kwargs)
        return await self._race(fn, targets, args, kwargs)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function (safe to repeat) so slow calls are hedged."""
        _validate.require_async(fn, "Hedge")
        race = self._race
        single = self._max_attempts == 1

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if single:
                return await fn(*args, **kwargs)
            return await race(fn, None, args, kwargs)

        wrapper.hedge = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for outcome, count in self._counts.items():
            yield "veritas_hedge_calls", (name, outcome), float(count)
        yield "veritas_hedge_attempts", (name,), float(self._n_attempts)
        yield "veritas_hedge_cancelled", (name,), float(self._n_cancelled)
        for reason, count in self._skipped.items():
            yield "veritas_hedge_skipped", (name, reason), float(count)
        yield "veritas_hedge_delay_seconds", (name,), self._delay
