"""An adaptive concurrency limit: find how many calls a dependency can take from its latency.

:class:`AdaptiveLimit` is a bulkhead whose size is not configured but measured, after Netflix's
concurrency-limits. Each call that ends adds a latency sample; the limit grows while latency stays
near the no-load minimum and shrinks as soon as latency shows the dependency queueing work (or a
call times out). Calls above the limit are rejected at once with
:class:`~veritas_resilience.ConcurrencyLimitError` (a
:class:`~veritas_resilience.BulkheadFullError`), never queued: a queue in front of an overloaded
dependency only adds latency.

Two algorithms, as in concurrency-limits:

- ``"vegas"`` (TCP Vegas) estimates the dependency's queue as
  ``limit * (1 - min_rtt / rtt)``: it adds ``6·log10(limit)`` while that queue is tiny, adds
  ``log10(limit)`` while it is below ``3·log10(limit)``, and takes ``log10(limit)`` off when a
  call timed out or the queue is above ``6·log10(limit)`` (half the excess queue, up to half the
  limit, when that is more: a dependency that lost most of its capacity is followed in seconds,
  not minutes). The no-load ``min_rtt`` is re-learned every ``30 · limit`` calls or so
  (jittered) from the fastest window seen meanwhile, so a dependency that got slower for good is
  not mistaken for a queueing one for long.
- ``"gradient"`` (Gradient2) compares each latency with a long-term average and multiplies the
  limit by ``clamp(1.5 · long / short, 0.5, 1)``, plus a headroom of ``sqrt(limit)``, smoothed.

The algorithms see one sample per window of calls (at least 10 calls and twice the baseline
latency; a timeout closes the window at once): the window's mean latency, the most calls that were
in flight, and whether any call timed out. Single calls are too noisy to compare with a minimum.
While the service sends less than half the limit (it is "application limited"), the limit holds:
latency at low load says nothing about capacity.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, ParamSpec, TypeAlias, TypeVar

from . import _hooks, _validate
from ._clock import MONOTONIC, Clock
from ._validate import ExceptionMatcher
from ._validate import fraction as _fraction
from ._validate import matcher as _matcher
from ._validate import positive_int as _positive_int
from .errors import ConcurrencyLimitError
from .events import Event, Hook
from .instrumentation.prometheus import HistogramValue, define_metric
from .instrumentation.structlog import LOGGED_EVENTS

__all__ = ["AdaptiveAlgorithm", "AdaptiveLimit", "AdaptiveLimitChanged", "AdaptiveLimitRejected"]

P = ParamSpec("P")
T = TypeVar("T")

AdaptiveAlgorithm: TypeAlias = Literal["vegas", "gradient"]

define_metric(
    "veritas_adaptive_limit", "gauge", "The concurrency an adaptive limit allows now.", ("name",)
)
define_metric(
    "veritas_adaptive_in_flight", "gauge", "Calls running under an adaptive limit.", ("name",)
)
define_metric(
    "veritas_adaptive_min_rtt_seconds",
    "gauge",
    "The no-load latency an adaptive limit measures against (vegas), or its long-term average "
    "latency (gradient).",
    ("name",),
)
define_metric(
    "veritas_adaptive_calls",
    "counter",
    "Calls seen by an adaptive limit, by outcome: success, dropped (timed out: the limit "
    "shrinks), ignored (another error: no sample), cancelled, rejected.",
    ("name", "outcome"),
)

_OUTCOMES = ("success", "dropped", "ignored", "cancelled", "rejected")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveLimitChanged(Event):
    """An adaptive limit moved by a tenth or more since it was last reported.

    Attributes:
        old_limit: The limit last reported.
        new_limit: The limit now.
        rtt: The latency sample (seconds) that moved it.
        baseline: The latency it was compared with: the no-load minimum (vegas) or the
            long-term average (gradient).
    """

    kind: ClassVar[str] = "adaptive_limit"
    old_limit: int
    new_limit: int
    rtt: float
    baseline: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Info: the dependency's measured capacity changed."""
        return (
            "info",
            "adaptive_limit_changed",
            {
                "adaptive_limit": self.name,
                "old_limit": self.old_limit,
                "new_limit": self.new_limit,
                "rtt": round(self.rtt, 6),
                "baseline": round(self.baseline, 6),
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveLimitRejected(Event):
    """An adaptive limit rejected a call.

    Attributes:
        limit: The limit at the time.
    """

    kind: ClassVar[str] = "adaptive_limit"
    limit: int


LOGGED_EVENTS.add(AdaptiveLimitChanged)


# Latencies are averaged over a window of at least this many calls and this many baseline
# latencies before the algorithm sees them: single calls are too noisy to compare with a minimum.
_WINDOW_SAMPLES = 10
_WINDOW_RTTS = 2.0
# Gradient2's long-term average: an exponential average over this many windows (after a warm-up
# of plain averaging over the first few).
_LONG_WINDOW = 100
_WARMUP = 10


class AdaptiveLimit(_hooks.Instrumented):
    """A concurrency limit learned from latency; calls above it are rejected at once.

    Use it as a decorator or with :meth:`call`, in front of a dependency that slows down when it
    is given more work than it can do::

        search_limit = AdaptiveLimit(name="search", initial_limit=20, max_limit=500)

        @search_limit
        async def search(query: str) -> list[str]: ...

    A call that succeeds gives the limit a latency sample. A call that fails with an error in
    ``drop_on`` (timeouts by default) counts as a sign of overload and shrinks the limit; other
    errors give no sample (a fast "not found" says nothing about capacity), and a cancelled call
    just gives its slot back.

    Like :class:`~veritas_resilience.Bulkhead`, it belongs to one event loop; its counters are
    not locked.

    Args:
        algorithm: ``"vegas"`` (the default) or ``"gradient"``; see the module docs.
        initial_limit: The limit (>= 1) to start from.
        min_limit: The limit never goes below this (>= 1).
        max_limit: The limit never goes above this (>= ``min_limit``).
        smoothing: How much of each computed change is applied (0 < smoothing <= 1); the
            default is 1.0 for vegas and 0.2 for gradient, as in concurrency-limits.
        drop_on: Errors that mean "overloaded" (shrink the limit); ``TimeoutError`` by default.
        name: Used in errors, events and metric labels; ``adaptive-limit-N`` by default.
        clock: Time source; :class:`~veritas_resilience.testing.FakeClock` in tests.
        hooks: Hooks for this limit only; the process-wide defaults when None.

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    def __init__(
        self,
        *,
        algorithm: AdaptiveAlgorithm = "vegas",
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float | None = None,
        drop_on: ExceptionMatcher = TimeoutError,
        name: str | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        if algorithm not in ("vegas", "gradient"):
            raise ValueError(f"algorithm must be 'vegas' or 'gradient', got {algorithm!r}")
        self._algorithm: AdaptiveAlgorithm = algorithm
        self._min = _positive_int(min_limit, "min_limit")
        self._max = _positive_int(max_limit, "max_limit")
        if self._max < self._min:
            raise ValueError(f"max_limit must be >= min_limit ({self._min}), got {max_limit!r}")
        initial = _positive_int(initial_limit, "initial_limit")
        if not self._min <= initial <= self._max:
            raise ValueError(
                f"initial_limit must be between min_limit ({self._min}) and max_limit "
                f"({self._max}), got {initial_limit!r}"
            )
        if smoothing is None:
            smoothing = 1.0 if algorithm == "vegas" else 0.2
        self._smoothing = _fraction(smoothing, "smoothing")
        drop = _matcher(drop_on, "drop_on")
        assert drop is not None
        self._is_drop = drop
        self._name = _validate.name(name, "adaptive-limit")
        self._now = _validate.clock(clock).monotonic
        self._estimate = float(initial)
        self._limit = initial
        self._reported = initial
        self._in_flight = 0
        self._counts = dict.fromkeys(_OUTCOMES, 0)
        # vegas
        self._min_rtt = 0.0
        self._rng = random.Random(0)  # the probe jitter: deterministic, so runs are repeatable
        self._probe_jitter = self._rng.uniform(0.5, 1.0)
        self._probe_count = 0
        self._window_min = math.inf
        # the current sample window
        self._w_start = self._now()
        self._w_count = 0
        self._w_sum = 0.0
        self._w_in_flight = 0
        self._w_dropped = False
        # gradient
        self._long_rtt = 0.0
        self._long_samples = 0
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The limit's name."""
        return self._name

    @property
    def algorithm(self) -> AdaptiveAlgorithm:
        """``"vegas"`` or ``"gradient"``."""
        return self._algorithm

    @property
    def limit(self) -> int:
        """Calls allowed at once, as of now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Calls running now."""
        return self._in_flight

    @property
    def baseline(self) -> float:
        """The latency samples are compared with: no-load minimum (vegas), long average
        (gradient); 0.0 before the first sample."""
        return self._min_rtt if self._algorithm == "vegas" else self._long_rtt

    def counts(self) -> dict[str, int]:
        """Calls by outcome: success, dropped, ignored, cancelled, rejected."""
        return dict(self._counts)

    def __repr__(self) -> str:
        return (
            f"<AdaptiveLimit {self._name!r} {self._algorithm} {self._in_flight}/{self._limit} "
            f"in flight>"
        )

    def _on_hooks_changed(self) -> None:
        self._w_rejected = self._hookset.wants(AdaptiveLimitRejected)

    # -- admission -------------------------------------------------------------------------------

    def _admit(self) -> tuple[float, int]:
        """Take a slot: return (start time, calls in flight including this one), or raise."""
        if self._in_flight >= self._limit:
            self._counts["rejected"] += 1
            if self._w_rejected:
                self._emit(AdaptiveLimitRejected(name=self._name, limit=self._limit))
            raise ConcurrencyLimitError(self._name, self._limit)
        self._in_flight += 1
        return self._now(), self._in_flight

    def _finish(self, start: float, in_flight: int, outcome: str) -> None:
        """Give the slot back and, for a success or a drop, learn from the call's latency."""
        self._in_flight -= 1
        self._counts[outcome] += 1
        if outcome == "success" or outcome == "dropped":
            now = self._now()
            rtt = now - start
            if rtt <= 0.0:
                return
            self._w_count += 1
            self._w_sum += rtt
            if in_flight > self._w_in_flight:
                self._w_in_flight = in_flight
            if outcome == "dropped":
                self._w_dropped = True
            elif self._w_count < _WINDOW_SAMPLES or now - self._w_start < _WINDOW_RTTS * (
                self.baseline or rtt
            ):
                return
            # The window is full (or a call timed out): one sample for the algorithm.
            self._sample(self._w_sum / self._w_count, self._w_in_flight, dropped=self._w_dropped)
            self._w_start = now
            self._w_count = 0
            self._w_sum = 0.0
            self._w_in_flight = 0
            self._w_dropped = False

    def _sample(self, rtt: float, in_flight: int, *, dropped: bool) -> None:
        if self._algorithm == "vegas":
            estimate = self._vegas(rtt, in_flight, dropped)
        else:
            estimate = self._gradient(rtt, in_flight, dropped)
        if estimate is None:
            return
        estimate = min(float(self._max), max(float(self._min), estimate))
        self._estimate = estimate = (
            1 - self._smoothing
        ) * self._estimate + self._smoothing * estimate
        limit = max(self._min, min(self._max, int(estimate)))
        self._limit = limit
        reported = self._reported
        if abs(limit - reported) * 10 >= reported and limit != reported:
            self._reported = limit
            self._emit(
                AdaptiveLimitChanged(
                    name=self._name,
                    old_limit=reported,
                    new_limit=limit,
                    rtt=rtt,
                    baseline=self.baseline,
                )
            )

    def _vegas(self, rtt: float, in_flight: int, dropped: bool) -> float | None:
        estimate = self._estimate
        # Every so often forget the no-load latency, so that a dependency that became slower
        # for good (not busier) is measured against its new normal.
        # The reset takes the fastest latency seen since the last one, not the latest sample:
        # under a steady overload some calls still meet no queue, and those show the baseline.
        self._probe_count += 1
        if rtt < self._window_min:
            self._window_min = rtt
        # Every 30 * limit calls or so, as concurrency-limits does (a sample is a window of calls).
        if self._probe_count * _WINDOW_SAMPLES >= self._probe_jitter * 30 * estimate:
            self._probe_count = 0
            self._probe_jitter = self._rng.uniform(0.5, 1.0)
            self._min_rtt = self._window_min
            self._window_min = math.inf
            return None
        log = max(1.0, math.log10(estimate))
        if dropped:
            return estimate - log
        if self._min_rtt == 0.0 or rtt < self._min_rtt:
            self._min_rtt = rtt
            return None
        if in_flight * 2 < estimate:
            return None  # application limited: low load says nothing about capacity
        queue = math.ceil(estimate * (1 - self._min_rtt / rtt))
        if queue <= log:
            return estimate + 6 * log
        if queue < 3 * log:
            return estimate + log
        if queue > 6 * log:
            # Vegas takes log10(limit) off; a deep queue (a dependency that lost most of its
            # capacity) would take minutes of that. Take half the excess queue instead (at
            # least log10(limit), at most half the limit), so the limit follows in seconds.
            return estimate - min(estimate / 2, max(log, (queue - 6 * log) / 2))
        return None

    def _gradient(self, rtt: float, in_flight: int, dropped: bool) -> float | None:
        estimate = self._estimate
        self._long_samples += 1
        if self._long_samples <= _WARMUP:
            self._long_rtt += (rtt - self._long_rtt) / self._long_samples
        else:
            self._long_rtt += (rtt - self._long_rtt) * (2 / (_LONG_WINDOW + 1))
        long_rtt = self._long_rtt
        if long_rtt / rtt > 2:
            # Latency fell well below the long average (the dependency recovered): let the
            # average come down faster than the window alone would.
            self._long_rtt = long_rtt = long_rtt * 0.95
        if dropped:
            return estimate * 0.5
        if in_flight * 2 < estimate:
            return None
        gradient = max(0.5, min(1.0, 1.5 * long_rtt / rtt))
        return estimate * gradient + math.sqrt(estimate)

    # -- calls -----------------------------------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` if the limit has room.

        Raises:
            ConcurrencyLimitError: If the limit is reached; ``fn`` is not called.
        """
        start, in_flight = self._admit()
        outcome = "cancelled"
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            outcome = "dropped" if self._is_drop(exc) else "ignored"
            raise
        else:
            outcome = "success"
            return result
        finally:
            self._finish(start, in_flight, outcome)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function so every call runs under the limit."""
        _validate.require_async(fn, "AdaptiveLimit")
        admit, finish, is_drop = self._admit, self._finish, self._is_drop

        # The body of call(), inlined: one coroutine frame less.
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            start, in_flight = admit()
            outcome = "cancelled"
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                outcome = "dropped" if is_drop(exc) else "ignored"
                raise
            else:
                outcome = "success"
                return result
            finally:
                finish(start, in_flight, outcome)

        wrapper.adaptive_limit = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = (self._name,)
        yield "veritas_adaptive_limit", name, float(self._limit)
        yield "veritas_adaptive_in_flight", name, float(self._in_flight)
        yield "veritas_adaptive_min_rtt_seconds", name, self.baseline
        for outcome, count in self._counts.items():
            yield "veritas_adaptive_calls", (self._name, outcome), float(count)
