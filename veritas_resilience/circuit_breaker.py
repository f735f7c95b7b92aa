"""Circuit breakers: stop calling a dependency that keeps failing, and probe it before trusting it.

:class:`CircuitBreaker` is the simple breaker of the source guide: ``failure_threshold`` failures in
a row open it, after ``reset_timeout`` one call is admitted as a half-open probe, and a success
closes it. :class:`ExponentialCircuitBreaker` is the advanced one: each consecutive re-open
doubles the open time up to a cap, and several successes are needed to close. Both accept a
:class:`FailureRate` trip policy instead of failures in a row.

What sets these breakers apart:

- Outcomes are three-way (success, failure, ignored) and cancellation is a fourth, neutral one: a
  cancelled call (asyncio task cancel, anyio/trio cancel scope, ``fail_after`` seen from outside)
  never counts, and always gives back the half-open slot it held.
- Every state change starts a new *generation*. A call remembers the generation that admitted
  it, and its result is dropped if the breaker has moved on meanwhile: a slow call started while
  CLOSED cannot reopen or close the breaker after it went OPEN or HALF_OPEN.
- Half-open admits at most ``half_open_max_calls`` concurrent probes; a probe that hangs past its
  lease frees its slot for a new probe, and its late result is dropped.
- The closed path takes no lock and allocates nothing; metrics are counted in plain integers and
  exported at scrape time by :class:`~veritas_resilience.instrumentation.PrometheusHook`.
"""

from __future__ import annotations

import asyncio
import bisect
import dis
import functools
import inspect
import itertools
import linecache
import math
import random
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from types import CodeType, CoroutineType, TracebackType
from typing import Any, Literal, ParamSpec, TypeAlias, TypeVar, overload

from . import _hooks
from ._clock import MONOTONIC, Clock
from ._validate import ExceptionMatcher, Seconds
from ._validate import clock as _clock
from ._validate import matcher as _matcher
from ._validate import name as _auto_name
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .errors import CircuitOpenError
from .events import (
    BreakerCallCancelled,
    BreakerCallFailed,
    BreakerCallIgnored,
    BreakerCallRejected,
    BreakerCallSucceeded,
    BreakerStateChanged,
    CircuitState,
    Hook,
)
from .instrumentation.prometheus import HistogramValue, cumulative_buckets, define_metric

__all__ = [
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitBreakerRegistry",
    "ExceptionMatcher",
    "ExponentialBackoff",
    "ExponentialCircuitBreaker",
    "FailureRate",
]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED

_ALL_STATES = tuple(CircuitState)
_OUTCOMES = ("success", "failure", "ignored", "cancelled", "rejected")

define_metric(
    "veritas_circuit_breaker_state",
    "gauge",
    "Current state of the circuit breaker (one-hot: 1 for the current state).",
    ("name", "state"),
)
define_metric(
    "veritas_circuit_breaker_calls",
    "counter",
    "Calls through the circuit breaker by outcome.",
    ("name", "outcome"),
)
define_metric(
    "veritas_circuit_breaker_transitions",
    "counter",
    "State transitions of the circuit breaker.",
    ("name", "from_state", "to_state"),
)
define_metric(
    "veritas_circuit_breaker_call_duration_seconds",
    "histogram",
    "Duration of calls admitted by the circuit breaker (success, failure and ignored).",
    ("name",),
)
define_metric(
    "veritas_circuit_breaker_open_seconds",
    "gauge",
    "Length in seconds of the current break (0 when not open).",
    ("name",),
)
define_metric(
    "veritas_circuit_breaker_half_open_probes",
    "gauge",
    "Half-open probes in flight.",
    ("name",),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureRate:
    """Trip when the failure rate over a sliding window reaches a threshold.

    The alternative to failures in a row, for dependencies that fail some calls all the time.

    Args:
        threshold: Failure rate in (0, 1] at or above which the breaker opens.
        window: Size of the window: a number of calls (``window_type="count"``) or seconds
            (``window_type="time"``, a float or ``timedelta``).
        window_type: ``"count"`` for the last ``window`` calls, ``"time"`` for calls in the last
            ``window`` seconds.
        minimum_calls: Calls the window must hold before the rate counts at all.

    Example:
        >>> FailureRate(threshold=0.5, window=100, minimum_calls=20)
        FailureRate(threshold=0.5, window=100, window_type='count', minimum_calls=20)
    """

    threshold: float = 0.5
    window: float | timedelta = 100
    window_type: Literal["count", "time"] = "count"
    minimum_calls: int = 10

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"threshold must be a failure rate in (0, 1], got {t!r}")
        _positive_int(self.minimum_calls, "minimum_calls")
        if self.window_type == "count":
            size = self._count()
            if self.minimum_calls > size:
                raise ValueError(
                    f"minimum_calls must be <= window ({size} calls), got {self.minimum_calls!r}"
                )
        elif self.window_type == "time":
            _seconds(self.window, "window")
        else:
            raise ValueError(f"window_type must be 'count' or 'time', got {self.window_type!r}")

    def _count(self) -> int:
        window = self.window
        if isinstance(window, (timedelta, bool)) or window != int(window):
            raise ValueError(
                f"window must be a whole number of calls >= 1 for a count window, got {window!r}"
            )
        return _positive_int(int(window), "window")

    def _new_window(self) -> _Window:
        if self.window_type == "count":
            return _CountWindow(self._count(), self.minimum_calls, self.threshold)
        return _TimeWindow(_seconds(self.window, "window"), self.minimum_calls, self.threshold)


class _Window:
    """Runtime state of a :class:`FailureRate` policy."""

    __slots__ = ()

    def record(self, failed: bool, now: float) -> bool:
        """Record one outcome; return whether the breaker should trip."""
        raise NotImplementedError

    def rate(self, now: float) -> float | None:
        """The current failure rate, or None below the minimum number of calls."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


class _CountWindow(_Window):
    __slots__ = ("_failures", "_filled", "_minimum", "_pos", "_ring", "_size", "_threshold")

    def __init__(self, size: int, minimum: int, threshold: float) -> None:
        self._size = size
        self._minimum = minimum
        self._threshold = threshold
        self._ring = bytearray(size)
        self._pos = 0
        self._filled = 0
        self._failures = 0

    def record(self, failed: bool, now: float) -> bool:
        ring, pos = self._ring, self._pos
        if self._filled == self._size:
            self._failures -= ring[pos]
        else:
            self._filled += 1
        ring[pos] = failed
        self._failures += failed
        self._pos = (pos + 1) % self._size
        return self._filled >= self._minimum and self._failures >= self._threshold * self._filled

    def rate(self, now: float) -> float | None:
        return self._failures / self._filled if self._filled >= self._minimum else None

    def clear(self) -> None:
        self._ring = bytearray(self._size)
        self._pos = self._filled = self._failures = 0


class _TimeWindow(_Window):
    """Calls in the last ``seconds``, kept in 10 buckets so memory does not grow with traffic."""

    __slots__ = ("_buckets", "_minimum", "_slot", "_threshold", "_width")

    _N = 10

    def __init__(self, seconds: float, minimum: int, threshold: float) -> None:
        self._width = seconds / self._N
        self._minimum = minimum
        self._threshold = threshold
        # Each bucket: [slot index, calls, failures]
        self._buckets = [[-1, 0, 0] for _ in range(self._N)]

    def _totals(self, now: float) -> tuple[int, int]:
        current = math.floor(now / self._width)
        calls = failures = 0
        for slot, c, f in self._buckets:
            if current - slot < self._N:
                calls += c
                failures += f
        return calls, failures

    def record(self, failed: bool, now: float) -> bool:
        slot = math.floor(now / self._width)
        bucket = self._buckets[slot % self._N]
        if bucket[0] != slot:
            bucket[0], bucket[1], bucket[2] = slot, 0, 0
        bucket[1] += 1
        bucket[2] += failed
        calls, failures = self._totals(now)
        return calls >= self._minimum and failures >= self._threshold * calls

    def rate(self, now: float) -> float | None:
        calls, failures = self._totals(now)
        return failures / calls if calls >= self._minimum else None

    def clear(self) -> None:
        for bucket in self._buckets:
            bucket[0], bucket[1], bucket[2] = -1, 0, 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExponentialBackoff:
    """Open time that grows with each consecutive re-open: ``min(base * multiplier**k, maximum)``.

    ``k`` counts the opens in a row: 0 for the first, +1 each time a half-open probe fails or the
    breaker trips again soon after closing. After the breaker has stayed closed for ``cool_down``
    seconds, ``k`` steps back by one per ``cool_down`` (``decay="step"``) or goes back to 0
    (``decay="reset"``).

    Args:
        base: The first open time, in seconds (> 0).
        maximum: The cap, in seconds (>= base).
        multiplier: Growth factor per re-open (>= 1).
        jitter: Fraction in [0, 1] of the open time that is randomly taken off, so breakers that
            opened together do not all probe at once: the open time is drawn from
            ``[t * (1 - jitter), t]``.
        cool_down: Seconds of staying closed that undo one step of growth; ``maximum`` by
            default.
        decay: ``"step"`` (one step per ``cool_down``) or ``"reset"`` (back to ``base`` after
            one ``cool_down``).
    """

    base: float | timedelta = 1.0
    maximum: float | timedelta = 60.0
    multiplier: float = 2.0
    jitter: float = 0.0
    cool_down: float | timedelta | None = None
    decay: Literal["step", "reset"] = "step"

    def __post_init__(self) -> None:
        base = _seconds(self.base, "base")
        maximum = _seconds(self.maximum, "maximum")
        if maximum < base:
            raise ValueError(f"maximum must be >= base ({base!r}s), got {maximum!r}")
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 1 <= m < math.inf:
            raise ValueError(f"multiplier must be a finite number >= 1, got {m!r}")
        j = self.jitter
        if isinstance(j, bool) or not isinstance(j, (int, float)) or not 0 <= j <= 1:
            raise ValueError(f"jitter must be a fraction in [0, 1], got {j!r}")
        if self.cool_down is not None:
            _seconds(self.cool_down, "cool_down")
        if self.decay not in ("step", "reset"):
            raise ValueError(f"decay must be 'step' or 'reset', got {self.decay!r}")

    def duration(self, k: int, rng: random.Random | None = None) -> float:
        """The open time for the ``k``-th consecutive open (0-based), jitter applied."""
        base = _seconds(self.base, "base")
        maximum = _seconds(self.maximum, "maximum")
        try:
            t = min(base * self.multiplier ** max(k, 0), maximum)
        except OverflowError:
            t = maximum
        if self.jitter:
            t *= 1.0 - self.jitter * (rng or random).random()
        return t

    def _cool_down(self) -> float:
        return _seconds(self.cool_down if self.cool_down is not None else self.maximum, "cool_down")


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A read-only picture of a breaker at one instant.

    Attributes:
        name: The breaker's name.
        state: Its state.
        generation: Its state generation (bumped at every state change).
        consecutive_failures: Failures in a row counted in CLOSED (failures-in-a-row policy).
        failure_rate: The current failure rate (rate policy) or None.
        half_open_successes: Probe successes counted in the current HALF_OPEN period.
        probes_in_flight: Half-open probes running now.
        consecutive_opens: Opens in a row (drives exponential growth).
        opened_at: Clock reading when the current break began, or None.
        open_for: Length of the current break in seconds, or None.
        retry_after: Seconds until a call can be admitted (0.0 when it can be now).
        calls: Call counts by outcome since creation.
    """

    name: str
    state: CircuitState
    generation: int
    consecutive_failures: int
    failure_rate: float | None
    half_open_successes: int
    probes_in_flight: int
    consecutive_opens: int
    opened_at: float | None
    open_for: float | None
    retry_after: float
    calls: dict[str, int]


# (generation, probe token or 0, admitting state, start time or None)
_Permit: TypeAlias = "tuple[int, int, CircuitState, float | None]"


# -- the guard: the one body of every form of call -----------------------------------------------
#
# The decorator (async and sync), call() and call_sync() all run this code. It is written once
# and compiled at import into the four forms, because an async form is only fast when the guard is
# the caller's coroutine itself: delegating to a shared coroutine would add a coroutine frame to
# every call, more than the rest of the closed path costs. Lines marked "# async" or "# sync"
# belong to that kind only; `successes` is the success counter (a closure variable in the
# decorated forms, an attribute read in the methods).
#
# CLOSED with nothing to decide (see _update_fast): one attribute read before the call, a counter
# increment after it, no lock, no allocation. A plain OPEN rejection is decided here too, without
# a lock or a call of a method (what _reject_open() does, inlined; it runs when a hook wants
# rejections). Everything else goes through _acquire()/_on_result()/_on_exception().
_GUARD = """\
    gen = breaker._fast_gen
    if gen is not None:
        try:
            result = await fn(*args, **kwargs)  # async
            result = fn(*args, **kwargs)  # sync
        except BaseException as exc:
            breaker._on_exception((gen, 0, _CLOSED, None), exc, fn)
            raise
        if type(result) is _CoroutineType:  # sync
            raise breaker._not_sync((gen, 0, _CLOSED, None), fn, result)  # sync
        next(successes)
        if breaker._failures and breaker._gen == gen:
            breaker._failures = 0
        return result
    if breaker._state is _OPEN:
        now = breaker._now()
        reopen_at = breaker._reopen_at
        if now < reopen_at:
            if breaker._w_rejected:
                raise breaker._reject_open(now)
            next(breaker._n_rejected)
            raise CircuitOpenError(breaker._name, "open", reopen_at - now)
    permit = breaker._acquire()
    try:
        result = await fn(*args, **kwargs)  # async
        result = fn(*args, **kwargs)  # sync
    except BaseException as exc:
        breaker._on_exception(permit, exc, fn)
        raise
    if type(result) is _CoroutineType:  # sync
        raise breaker._not_sync(permit, fn, result)  # sync
    breaker._on_result(permit, result)
    return result
"""

_CoroutineType = CoroutineType
_GET_AWAITABLE = dis.opmap["GET_AWAITABLE"]
#: The code of every compiled guard (see _awaited_a_non_awaitable).
_GUARD_CODES: set[CodeType] = set()


def _compile_guard(form: str, *, is_async: bool, method: bool) -> Callable[..., Any]:
    """Compile _GUARD into one form: a method, or a factory ``(breaker, fn, successes)``."""
    keep, drop = ("# async", "# sync") if is_async else ("# sync", "# async")
    body = [
        line.removesuffix(keep).rstrip() for line in _GUARD.splitlines() if not line.endswith(drop)
    ]
    prefix = "async " if is_async else ""
    if method:
        lines = [f"{prefix}def {form}(self, fn, /, *args, **kwargs):"]
        body = [line.replace("next(successes)", "next(self._n_success)") for line in body]
        lines += [re.sub(r"\bbreaker\b", "self", line) for line in body]
    else:
        lines = ["def make(breaker, fn, successes):", f"    {prefix}def {form}(*args, **kwargs):"]
        lines += [f"    {line}" if line else line for line in body]
        lines.append(f"    return {form}")
    source = "\n".join(lines) + "\n"
    filename = f"<veritas_resilience.circuit_breaker guard: {form}>"
    # Tracebacks through a guard show its source, as for any other module's code.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    code = compile(source, filename, "exec")
    exec(code, globals(), namespace)
    _GUARD_CODES.update(_nested_codes(code))
    return namespace[form if method else "make"]  # type: ignore[no-any-return]


def _nested_codes(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _nested_codes(const)


def _awaited_a_non_awaitable(exc: BaseException) -> bool:
    """Whether ``exc`` is the TypeError of a guard's own ``await`` on what fn returned.

    The guard keeps no reference to that object (it would cost every call), so the error is
    recognised where it was raised: in a guard's frame, not deeper, by its ``await`` itself
    (the GET_AWAITABLE instruction). A TypeError raised by the dependency has frames below the
    guard's, or was raised by another instruction.
    """
    tb = exc.__traceback__
    if type(exc) is not TypeError or tb is None or tb.tb_next is not None:
        return False
    code = tb.tb_frame.f_code
    return code in _GUARD_CODES and code.co_code[tb.tb_lasti] == _GET_AWAITABLE


_async_guard = _compile_guard("async_guard", is_async=True, method=False)
_sync_guard = _compile_guard("sync_guard", is_async=False, method=False)

F = TypeVar("F", bound=Callable[..., Any])


def _guard_method(declared: F) -> F:
    """Replace a declared ``call``/``call_sync`` (its signature and docs) by the compiled guard."""
    guard = _compile_guard(
        declared.__name__, is_async=inspect.iscoroutinefunction(declared), method=True
    )
    for attr in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        setattr(guard, attr, getattr(declared, attr))
    return guard  # type: ignore[return-value]


class CircuitBreaker(_hooks.Instrumented):
    """A circuit breaker for async and sync callables.

    Use it as a decorator, as ``await breaker.call(fn, ...)``, or as ``async with breaker:``::

        db_breaker = CircuitBreaker(name="orders-db", failure_threshold=5, reset_timeout=30)

        @db_breaker
        async def load_order(order_id: int) -> Order: ...

        try:
            order = await load_order(42)
        except CircuitOpenError as exc:
            ...  # exc.retry_after says when to try again

    Args:
        name: Used in errors, logs and metric labels; keep it bounded (one per dependency).
            When None, the breaker is named ``breaker-N``, N counting the unnamed breakers of the
            process from 1. That suits tests and scripts; in a service, name each breaker: an
            auto-name depends on the order of creation, so it changes between releases and
            says nothing on a dashboard.
        failure_threshold: Failures in a row (>= 1) that open the breaker. Ignored when ``trip``
            is given.
        reset_timeout: Seconds (> 0) the breaker stays open before admitting a probe. Ignored
            when ``open_duration`` is given.
        success_threshold: Probe successes (>= 1) needed in HALF_OPEN to close.
        half_open_max_calls: Probes (>= 1) allowed to run at once in HALF_OPEN; others are
            rejected at once.
        probe_lease: Seconds (> 0) a probe may run before its slot is given to a new probe (its
            late result is then dropped). The current open time by default.
        trip: A :class:`FailureRate` policy instead of failures in a row.
        open_duration: An :class:`ExponentialBackoff` instead of the fixed ``reset_timeout``.
        failure_on: Which exceptions count as failures (types or a predicate); ``Exception``
            by default. An exception that matches neither this nor ``ignore_on`` counts as a
            success: the dependency answered.
        ignore_on: Which exceptions are ignored: neither success nor failure; they do not reset
            the failure count and they give back a probe slot. Checked before ``failure_on``.
        failure_on_result: A predicate on a call's return value that makes it a failure (the
            value is still returned).
        slow_call_duration: Seconds (> 0) beyond which a successful call counts as a failure.
        record_duration: Whether to time calls for the duration histogram. Off by default: two
            clock reads and a bucket search cost more than the rest of the breaker together
            (see benchmarks/RESULTS.md); services usually time their queries already.
        duration_buckets: Upper bounds of the histogram buckets, ascending.
        clock: Time source; :class:`~veritas_resilience.testing.FakeClock` in tests.
        hooks: Hooks for this breaker only; the process-wide defaults (see
            :func:`~veritas_resilience.set_hooks`) when None, ``[]`` for none at all.
        rng: Random source for jitter (seed it in tests).

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    _permits: ContextVar[tuple[_Permit, ...]]

    def __init__(
        self,
        *,
        name: str | None = None,
        failure_threshold: int = 5,
        reset_timeout: Seconds = 60.0,
        success_threshold: int = 1,
        half_open_max_calls: int = 1,
        probe_lease: Seconds | None = None,
        trip: FailureRate | None = None,
        open_duration: ExponentialBackoff | None = None,
        failure_on: ExceptionMatcher = Exception,
        ignore_on: ExceptionMatcher | None = None,
        failure_on_result: Callable[[Any], bool] | None = None,
        slow_call_duration: Seconds | None = None,
        record_duration: bool = False,
        duration_buckets: Sequence[float] = DEFAULT_BUCKETS,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._name = _auto_name(name, "breaker")
        self._auto_named = name is None
        self._failure_threshold = _positive_int(failure_threshold, "failure_threshold")
        self._reset_timeout = _seconds(reset_timeout, "reset_timeout")
        self._success_threshold = _positive_int(success_threshold, "success_threshold")
        self._half_open_max = _positive_int(half_open_max_calls, "half_open_max_calls")
        self._probe_lease = None if probe_lease is None else _seconds(probe_lease, "probe_lease")
        if trip is not None and not isinstance(trip, FailureRate):
            raise TypeError(f"trip must be a FailureRate or None, got {trip!r}")
        if open_duration is not None and not isinstance(open_duration, ExponentialBackoff):
            raise TypeError(
                f"open_duration must be an ExponentialBackoff or None, got {open_duration!r}"
            )
        self._trip = trip
        self._window = trip._new_window() if trip is not None else None
        self._backoff = open_duration
        self._cool_down = open_duration._cool_down() if open_duration is not None else 0.0
        self._is_failure = _matcher(failure_on, "failure_on")
        self._is_ignored = _matcher(ignore_on, "ignore_on")
        if failure_on_result is not None and not callable(failure_on_result):
            raise TypeError("failure_on_result must be a predicate on the call's result")
        self._failure_on_result = failure_on_result
        self._slow = (
            None
            if slow_call_duration is None
            else _seconds(slow_call_duration, "slow_call_duration")
        )
        bounds = tuple(float(b) for b in duration_buckets)
        if (
            not bounds
            or any(not math.isfinite(b) or b <= 0 for b in bounds)
            or list(bounds) != sorted(set(bounds))
        ):
            raise ValueError(
                "duration_buckets must be finite, > 0 and strictly ascending, "
                f"got {duration_buckets!r}"
            )
        self._bounds = bounds
        self._hist = [0] * (len(bounds) + 1)
        self._hist_sum = 0.0
        self._record_duration = bool(record_duration)
        self._timed = self._record_duration or self._slow is not None
        self._clock = _clock(clock)
        self._now = clock.monotonic
        self._rng = rng

        self._lock = threading.Lock()
        self._state = _CLOSED
        self._gen = 0
        self._failures = 0
        self._opened_at: float | None = None
        self._open_for: float | None = None
        self._last_open_for = self._reset_timeout
        self._reopen_at = -math.inf
        self._opens = 0
        self._closed_at = self._now()
        self._half_successes = 0
        self._probes: dict[int, float] = {}
        self._tokens = itertools.count(1)
        # next() on itertools.count is atomic (one C call), so counts stay exact when threads
        # share the breaker, without a lock on the success path.
        self._n_success = itertools.count()
        self._n_failure = itertools.count()
        self._n_ignored = itertools.count()
        self._n_cancelled = itertools.count()
        self._n_rejected = itertools.count()
        self._transitions: dict[tuple[CircuitState, CircuitState], int] = {}
        self._permits = ContextVar(f"veritas_breaker_permits_{id(self)}", default=())

        self._init_hooks(hooks)

    # -- configuration and inspection ------------------------------------------------------

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._name

    @property
    def clock(self) -> Clock:
        """The breaker's time source."""
        return self._clock

    @property
    def state(self) -> CircuitState:
        """The current state (an OPEN breaker whose open time is over reads as HALF_OPEN)."""
        if self._state is _OPEN:
            self._check_open_timeout(self._now())
        return self._state

    def retry_after(self) -> float:
        """Seconds until the breaker admits a call again (0.0 if it would now)."""
        now = self._now()
        with self._lock:
            return self._retry_after(now)

    def snapshot(self) -> BreakerSnapshot:
        """Return a consistent, read-only picture of the breaker."""
        now = self._now()
        self._check_open_timeout(now)
        with self._lock:
            return BreakerSnapshot(
                name=self._name,
                state=self._state,
                generation=self._gen,
                consecutive_failures=self._failures,
                failure_rate=self._window.rate(now) if self._window is not None else None,
                half_open_successes=self._half_successes,
                probes_in_flight=len(self._probes),
                consecutive_opens=self._opens,
                opened_at=self._opened_at,
                open_for=self._open_for,
                retry_after=self._retry_after(now),
                calls=self._calls(),
            )

    def _calls(self) -> dict[str, int]:
        return {
            "success": _hooks.read_count(self._n_success),
            "failure": _hooks.read_count(self._n_failure),
            "ignored": _hooks.read_count(self._n_ignored),
            "cancelled": _hooks.read_count(self._n_cancelled),
            "rejected": _hooks.read_count(self._n_rejected),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} state={self._state.value} gen={self._gen}>"

    # -- control -----------------------------------------------------------------------------

    def isolate(self) -> None:
        """Force the breaker open (an operator's isolate): every call is rejected until reset."""
        self._set_state(_FORCED_OPEN, "forced")

    def disable(self) -> None:
        """Let every call through and never trip, until :meth:`reset`; calls are still counted."""
        self._set_state(_DISABLED, "forced")

    def reset(self) -> None:
        """Close the breaker and forget failures and growth of the open time."""
        self._set_state(_CLOSED, "reset", clear_growth=True)

    def _set_state(self, to: CircuitState, reason: str, *, clear_growth: bool = False) -> None:
        now = self._now()
        with self._lock:
            event = self._transition(to, reason, now)
            if clear_growth:
                self._opens = 0
        if event is not None:
            self._emit(event)

    # -- hooks -------------------------------------------------------------------------------

    def _on_hooks_changed(self) -> None:
        hooks = self._hookset
        self._w_success = hooks.wants(BreakerCallSucceeded)
        self._w_failure = hooks.wants(BreakerCallFailed)
        self._w_ignored = hooks.wants(BreakerCallIgnored)
        self._w_cancelled = hooks.wants(BreakerCallCancelled)
        self._w_rejected = hooks.wants(BreakerCallRejected)
        self._w_state = hooks.wants(BreakerStateChanged)
        self._update_fast()

    def _update_fast(self) -> None:
        # The fast path (see _GUARD) handles CLOSED with failures in a row, no verdict to draw
        # from the result or its duration, and no success event: a success costs a counter
        # increment. _fast_gen is the generation while it applies, None otherwise.
        fast = (
            self._state is _CLOSED
            and self._window is None
            and not self._timed
            and self._failure_on_result is None
            and not self._w_success
        )
        self._fast_gen = self._gen if fast else None

    # -- state machine (call with self._lock held) --------------------------------------------

    def _transition(self, to: CircuitState, reason: str, now: float) -> BreakerStateChanged | None:
        frm = self._state
        if frm is to:
            self._failures = 0
            self._half_successes = 0
            if self._window is not None:
                self._window.clear()
            return None
        self._gen += 1
        self._state = to
        self._probes.clear()
        self._half_successes = 0
        self._failures = 0
        if self._window is not None:
            self._window.clear()
        open_for: float | None = None
        if to is _OPEN:
            open_for = self._next_open_duration(frm, now)
            self._opened_at, self._open_for = now, open_for
            self._last_open_for = open_for
            self._reopen_at = now + open_for
        elif to is _FORCED_OPEN:
            self._opened_at, self._open_for = now, None
        else:
            self._opened_at = self._open_for = None
        if to is _CLOSED:
            self._closed_at = now
        key = (frm, to)
        self._transitions[key] = self._transitions.get(key, 0) + 1
        self._update_fast()
        if not self._w_state:
            return None
        return BreakerStateChanged(
            name=self._name,
            from_state=frm,
            to_state=to,
            reason=reason,
            open_for=open_for,
            generation=self._gen,
        )

    def _next_open_duration(self, frm: CircuitState, now: float) -> float:
        backoff = self._backoff
        if backoff is None:
            self._opens += 1
            return self._reset_timeout
        if frm is _CLOSED and self._opens:
            steps = int((now - self._closed_at) // self._cool_down)
            if steps:
                self._opens = 0 if backoff.decay == "reset" else max(0, self._opens - steps)
        self._opens += 1
        return backoff.duration(self._opens - 1, self._rng)

    def _check_open_timeout(self, now: float) -> None:
        if self._state is not _OPEN:
            return
        with self._lock:
            event = self._maybe_half_open(now)
        if event is not None:
            self._emit(event)

    def _maybe_half_open(self, now: float) -> BreakerStateChanged | None:
        if self._state is _OPEN and now >= self._reopen_at:
            return self._transition(_HALF_OPEN, "open_timeout", now)
        return None

    def _retry_after(self, now: float) -> float:
        state = self._state
        if state is _OPEN:
            return max(0.0, self._reopen_at - now)
        if state is _FORCED_OPEN:
            return math.inf
        if state is _HALF_OPEN and len(self._probes) >= self._half_open_max:
            return max(0.0, min(self._probes.values()) - now)
        return 0.0

    def _lease(self) -> float:
        if self._probe_lease is not None:
            return self._probe_lease
        return self._last_open_for

    # -- admission and recording ---------------------------------------------------------------

    def _acquire(self) -> _Permit:
        """Admit a call or raise CircuitOpenError. Returns the call's permit."""
        now = self._now()
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            return (self._gen, 0, state, now if self._timed else None)
        if state is _OPEN and now < self._reopen_at:
            raise self._reject_open(now)
        event: BreakerStateChanged | None = None
        with self._lock:
            state = self._state
            if state is _CLOSED or state is _DISABLED:
                return (self._gen, 0, state, now if self._timed else None)
            if state is _OPEN:
                event = self._maybe_half_open(now)
                state = self._state
            if state is _HALF_OPEN:
                probes = self._probes
                if probes:
                    for token in [t for t, deadline in probes.items() if deadline <= now]:
                        del probes[token]
                if len(probes) < self._half_open_max:
                    token = next(self._tokens)
                    probes[token] = now + self._lease()
                    permit = (self._gen, token, state, now if self._timed else None)
                else:
                    permit = None
            else:
                permit = None
            if permit is None:
                next(self._n_rejected)
                retry_after = self._retry_after(now)
        if event is not None:
            self._emit(event)
        if permit is not None:
            return permit
        if self._w_rejected:
            self._emit(BreakerCallRejected(name=self._name, state=state, retry_after=retry_after))
        raise CircuitOpenError(self._name, state.value, retry_after)

    def _reject_open(self, now: float) -> CircuitOpenError:
        # The common rejection needs no lock: nothing changes but a counter.
        next(self._n_rejected)
        retry_after = self._reopen_at - now
        if self._w_rejected:
            self._emit(BreakerCallRejected(name=self._name, state=_OPEN, retry_after=retry_after))
        return CircuitOpenError(self._name, "open", retry_after)

    def _observe(self, start: float | None) -> float | None:
        if start is None:
            return None
        duration = self._now() - start
        if self._record_duration:
            self._hist[bisect.bisect_left(self._bounds, duration)] += 1
            self._hist_sum += duration
        return duration

    def _on_result(self, permit: _Permit, result: object) -> None:
        gen, token, state, start = permit
        duration = self._observe(start)
        predicate = self._failure_on_result
        if predicate is not None and predicate(result):
            self._on_failure(gen, token, state, None, duration, slow=False)
            return
        if self._slow is not None and duration is not None and duration > self._slow:
            self._on_failure(gen, token, state, None, duration, slow=True)
            return
        self._on_success(gen, token, state, duration)

    def _on_success(
        self, gen: int, token: int, state: CircuitState, duration: float | None
    ) -> None:
        next(self._n_success)
        event: BreakerStateChanged | None = None
        if gen == self._gen:
            if token:
                with self._lock:
                    if gen == self._gen and self._probes.pop(token, None) is not None:
                        self._half_successes += 1
                        if self._half_successes >= self._success_threshold:
                            event = self._transition(_CLOSED, "probes_succeeded", self._now())
            elif self._state is _CLOSED:
                if self._window is None:
                    self._failures = 0
                else:
                    with self._lock:
                        # Reaching minimum_calls with a success can still reveal a high rate.
                        now = self._now()
                        if gen == self._gen and self._window.record(False, now):
                            event = self._transition(_OPEN, "failure_rate", now)
        if self._w_success:
            self._emit(BreakerCallSucceeded(name=self._name, state=state, duration=duration))
        if event is not None:
            self._emit(event)

    def _on_failure(
        self,
        gen: int,
        token: int,
        state: CircuitState,
        error: BaseException | None,
        duration: float | None,
        *,
        slow: bool,
    ) -> None:
        event: BreakerStateChanged | None = None
        with self._lock:
            next(self._n_failure)
            if gen == self._gen:
                if token:
                    if self._probes.pop(token, None) is not None:
                        event = self._transition(_OPEN, "probe_failed", self._now())
                elif self._state is _CLOSED:
                    now = self._now()
                    if self._window is not None:
                        if self._window.record(True, now):
                            event = self._transition(_OPEN, "failure_rate", now)
                    else:
                        self._failures += 1
                        if self._failures >= self._failure_threshold:
                            event = self._transition(_OPEN, "failure_threshold", now)
        if self._w_failure:
            self._emit(
                BreakerCallFailed(
                    name=self._name, state=state, error=error, duration=duration, slow=slow
                )
            )
        if event is not None:
            self._emit(event)

    def _on_exception(
        self, permit: _Permit, exc: BaseException, fn: Callable[..., Any] | None = None
    ) -> None:
        gen, token, state, start = permit
        if fn is not None and _awaited_a_non_awaitable(exc):
            # The function handed to call() is not async: a mistake at the call site, which
            # says nothing about the dependency.
            name = getattr(fn, "__qualname__", None) or repr(fn)
            raise self._misuse(
                permit,
                exc,
                f"call() awaits what its function returns, and {name} did not return an "
                f"awaitable ({exc}): use call_sync() for a plain function",
            ) from None
        if not isinstance(exc, Exception):
            # Cancellation, KeyboardInterrupt, SystemExit, GeneratorExit: never a verdict.
            self._release(token)
            if _is_cancellation(exc):
                next(self._n_cancelled)
                if self._w_cancelled:
                    self._emit(BreakerCallCancelled(name=self._name, state=state))
            else:
                next(self._n_ignored)
                if self._w_ignored:
                    self._emit(BreakerCallIgnored(name=self._name, state=state, error=exc))
            return
        duration = self._observe(start)
        ignored = self._is_ignored
        if ignored is not None and ignored(exc):
            self._release(token)
            next(self._n_ignored)
            if self._w_ignored:
                self._emit(BreakerCallIgnored(name=self._name, state=state, error=exc))
            return
        failure = self._is_failure
        if failure is not None and failure(exc):
            self._on_failure(gen, token, state, exc, duration, slow=False)
        else:
            self._on_success(gen, token, state, duration)

    def _release(self, token: int) -> None:
        if token:
            with self._lock:
                self._probes.pop(token, None)

    def _not_sync(self, permit: _Permit, fn: Callable[..., Any], result: Any) -> TypeError:
        # A sync form whose function gave back a coroutine: it cannot be run from here.
        result.close()  # the TypeError says what happened; no "never awaited" warning on top
        name = getattr(fn, "__qualname__", None) or repr(fn)
        return self._misuse(
            permit,
            None,
            f"{name} returned a coroutine, which a sync call cannot await: use "
            "`await breaker.call(fn, ...)`, or decorate an async function",
        )

    def _misuse(self, permit: _Permit, cause: BaseException | None, message: str) -> TypeError:
        # A call that never reached the dependency: neither success nor failure (counted as
        # ignored), and the half-open slot it held goes back.
        token, state = permit[1], permit[2]
        self._release(token)
        error = TypeError(f"circuit breaker {self._name!r}: {message}")
        error.__cause__ = cause
        next(self._n_ignored)
        if self._w_ignored:
            self._emit(BreakerCallIgnored(name=self._name, state=state, error=error))
        return error

    # -- forms of use ---------------------------------------------------------------------------

    @_guard_method
    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through the breaker: ``await breaker.call(fn, ...)``.

        Nothing happens until the returned coroutine is awaited, and ``fn`` is called only once
        the breaker admits the call.

        Raises:
            CircuitOpenError: If the breaker rejects the call; ``fn`` is not called.
            TypeError: If ``fn`` returns something that cannot be awaited (a plain function:
                use :meth:`call_sync`). Not counted as a failure.
        """
        raise NotImplementedError  # the body is _GUARD's

    @_guard_method
    def call_sync(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` (a plain function) through the breaker.

        Safe to use from many threads at once; no lock is held while ``fn`` runs.

        Raises:
            CircuitOpenError: If the breaker rejects the call; ``fn`` is not called.
            TypeError: If ``fn`` returns a coroutine (an async function: use :meth:`call`).
                Not counted as a failure.
        """
        raise NotImplementedError  # the body is _GUARD's

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate an ``async def`` or plain function so every call goes through the breaker.

        The decorated function keeps the name, docstring, signature and ``__wrapped__`` of
        ``fn``; an async one passes :func:`inspect.iscoroutinefunction`.

        Raises:
            TypeError: If ``fn`` is not callable, or is a generator function (its outcome is
                not known when it returns).
        """
        if not callable(fn):
            raise TypeError(
                f"a circuit breaker decorates a function or another callable, "
                f"got {type(fn).__qualname__}: {fn!r}"
            )
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                "a circuit breaker cannot decorate a generator function: its outcome is not "
                "known when it returns; wrap the code that consumes it instead"
            )
        make = _async_guard if _is_async_callable(fn) else _sync_guard
        guard = make(self, fn, self._n_success)
        functools.update_wrapper(guard, fn)
        guard.breaker = self
        return guard  # type: ignore[no-any-return]

    async def __aenter__(self) -> CircuitBreaker:
        self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def __enter__(self) -> CircuitBreaker:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def _enter(self) -> None:
        permit = self._acquire()
        self._permits.set((*self._permits.get(), permit))

    def _exit(self, exc: BaseException | None) -> None:
        stack = self._permits.get()
        if not stack:
            raise RuntimeError(f"circuit breaker {self._name!r} exited more often than entered")
        permit = stack[-1]
        self._permits.set(stack[:-1])
        if exc is None:
            self._on_result(permit, None)
        else:
            self._on_exception(permit, exc)

    # -- metrics ------------------------------------------------------------------------------

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        state = self.state
        for s in _ALL_STATES:
            yield "veritas_circuit_breaker_state", (name, s.value), 1.0 if s is state else 0.0
        for outcome, count in self._calls().items():
            yield "veritas_circuit_breaker_calls", (name, outcome), float(count)
        for (frm, to), count in sorted(self._transitions.items()):
            yield (
                "veritas_circuit_breaker_transitions",
                (name, frm.value, to.value),
                float(count),
            )
        if self._record_duration:
            yield (
                "veritas_circuit_breaker_call_duration_seconds",
                (name,),
                HistogramValue(cumulative_buckets(self._bounds, self._hist), self._hist_sum),
            )
        open_for = self._open_for if state is _OPEN else None
        yield "veritas_circuit_breaker_open_seconds", (name,), float(open_for or 0.0)
        yield "veritas_circuit_breaker_half_open_probes", (name,), float(len(self._probes))


def _is_async_callable(fn: object) -> bool:
    # An async function (or a partial of one), or an object whose __call__ is one.
    if inspect.iscoroutinefunction(fn):
        return True
    if isinstance(fn, type) or inspect.isroutine(fn):
        return False
    return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))  # noqa: B004


def _same_option(a: object, b: object) -> bool:
    # Equal values (1 == 1.0, equal dataclasses) or the same object (a clock, a predicate).
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.CancelledError):
        return True
    # trio.Cancelled, without importing trio when it is not in use.
    return any(
        cls.__name__ == "Cancelled" and cls.__module__.startswith("trio")
        for cls in type(exc).__mro__
    )


class ExponentialCircuitBreaker(CircuitBreaker):
    """The advanced breaker: its open time grows on each consecutive re-open, and it needs several
    probe successes to close.

    Equivalent to ``CircuitBreaker(success_threshold=3, open_duration=ExponentialBackoff(...))``
    with the guide's defaults: the first break lasts ``base`` (1 s), each re-open doubles it up to
    ``maximum`` (60 s), and ``success_threshold`` (3) successful probes close it.

    Args:
        name: See :class:`CircuitBreaker`.
        failure_threshold: Failures in a row (>= 1) that open the breaker.
        success_threshold: Probe successes (>= 1) needed to close.
        base: First open time in seconds (> 0).
        maximum: Cap on the open time in seconds (>= base).
        multiplier: Growth factor per re-open (>= 1).
        jitter: Fraction in [0, 1] of the open time taken off at random.
        cool_down: Closed seconds that undo one step of growth (``maximum`` by default).
        decay: ``"step"`` or ``"reset"``, see :class:`ExponentialBackoff`.
        **options: Any other :class:`CircuitBreaker` argument.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        failure_threshold: int = 5,
        success_threshold: int = 3,
        base: Seconds = 1.0,
        maximum: Seconds = 60.0,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        cool_down: Seconds | None = None,
        decay: Literal["step", "reset"] = "step",
        **options: Any,
    ) -> None:
        if "open_duration" in options:
            raise TypeError(
                "ExponentialCircuitBreaker builds its own open_duration; pass base/maximum"
            )
        super().__init__(
            name=name,
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            open_duration=ExponentialBackoff(
                base=base,
                maximum=maximum,
                multiplier=multiplier,
                jitter=jitter,
                cool_down=cool_down,
                decay=decay,
            ),
            **options,
        )


class CircuitBreakerRegistry:
    """Gets or creates breakers by name, so every part of a service shares one per dependency.

    Example:
        >>> registry = CircuitBreakerRegistry(failure_threshold=3)
        >>> a = registry.get("payments")
        >>> a is registry.get("payments")
        True

    Args:
        factory: Builds a breaker from a name and options; :class:`CircuitBreaker` by default.
        **defaults: Options passed to every breaker the registry creates.
    """

    def __init__(
        self, factory: Callable[..., CircuitBreaker] = CircuitBreaker, **defaults: Any
    ) -> None:
        self._factory = factory
        self._defaults = defaults
        self._breakers: dict[str, CircuitBreaker] = {}
        self._options: dict[str, dict[str, Any]] = {}
        try:
            parameters = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # a factory without a signature to read
            parameters = inspect.Signature().parameters.values()
        # What a breaker created without an option has, to compare a later get()'s options with.
        self._factory_defaults = {
            p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
        }
        self._lock = threading.Lock()

    def get(self, name: str, **options: Any) -> CircuitBreaker:
        """Return the breaker called ``name``, creating it with the defaults and ``options``.

        Raises:
            ValueError: If the breaker exists and ``options`` differ from the options it was
                created with (the message names them): two parts of a service configured one
                breaker two ways.
        """
        with self._lock:
            breaker = self._breakers.get(name)
            wanted = {**self._defaults, **options}
            if breaker is None:
                breaker = self._factory(name=name, **wanted)
                self._breakers[name] = breaker
                self._options[name] = wanted
                return breaker
            created = {**self._factory_defaults, **self._options[name]}
        differ = [
            key
            for key in sorted(options)
            if key not in created or not _same_option(options[key], created[key])
        ]
        if differ:
            raise ValueError(
                f"circuit breaker {name!r} exists with other options: "
                + ", ".join(
                    f"{key}={options[key]!r} (it has {created[key]!r})"
                    if key in created
                    else f"{key}={options[key]!r} (it has the factory's default)"
                    for key in differ
                )
            )
        return breaker

    def __getitem__(self, name: str) -> CircuitBreaker:
        with self._lock:
            return self._breakers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        with self._lock:
            return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def snapshots(self) -> list[BreakerSnapshot]:
        """A snapshot of every breaker, sorted by name."""
        return [b.snapshot() for b in sorted(self, key=lambda b: b.name)]

    def isolate_all(self, names: Iterable[str] | None = None) -> None:
        """Force open every breaker, or those named: one switch to cut dependencies off.

        Args:
            names: The breakers to isolate (any iterable, a generator included); every breaker
                in the registry when None.

        Raises:
            KeyError: If a name is not in the registry (the error lists every unknown name);
                nothing is isolated then, so a typo cannot leave half of a switch thrown.
        """
        if names is None:
            targets = list(self)
        else:
            wanted = list(dict.fromkeys(names))
            with self._lock:
                unknown = [name for name in wanted if name not in self._breakers]
                targets = [self._breakers[name] for name in wanted if name in self._breakers]
            if unknown:
                raise KeyError(f"no circuit breaker named {', '.join(map(repr, unknown))}")
        for breaker in targets:
            breaker.isolate()

    def reset_all(self) -> None:
        """Reset every breaker."""
        for breaker in self:
            breaker.reset()
