"""In-process chaos: injectors that make calls fail, slow down, return a fake outcome, or run a
side effect, at a chosen rate.

Four injectors, one shape (the model is Polly's chaos strategies):

- :class:`FaultInjector` raises an exception instead of calling;
- :class:`LatencyInjector` waits before calling (and the wait is cancellable);
- :class:`OutcomeInjector` returns a value instead of calling;
- :class:`BehaviourInjector` runs a side effect, then calls.

Each decides per call: when ``enabled`` (a bool or a callable asked every call) it draws one number
from its random source and injects if the number is below ``injection_rate`` (a float or a
callable). Exactly one number is drawn per enabled call, so two injectors built with
``random.Random(seed)`` of the same seed inject into exactly the same calls.

Use them as decorators, with ``await injector.call(fn, ...)``, or as the innermost step of a
:class:`~veritas_resilience.Pipeline` (``Pipeline(..., chaos=[...])``) so the breaker, retry,
timeout and fallback react to what they inject as they would to the real thing.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import random as _random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

import anyio

from .. import _hooks, _validate
from .._clock import Clock
from .._validate import Seconds, seconds
from ..events import Event, Hook
from ..instrumentation.prometheus import HistogramValue, define_metric
from ._errors import InjectedFaultError

__all__ = [
    "BehaviourInjector",
    "ChaosInjected",
    "FaultInjector",
    "Injector",
    "LatencyInjector",
    "OutcomeInjector",
]

P = ParamSpec("P")
T = TypeVar("T")

RandomSource = _random.Random | Callable[[], float]

define_metric(
    "veritas_chaos_injections",
    "counter",
    "Calls a chaos injector injected into (kind: fault, latency, outcome, behaviour).",
    ("name", "kind"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosInjected(Event):
    """An injector injected into a call.

    Attributes:
        injector: What it injected: ``"fault"``, ``"latency"``, ``"outcome"`` or ``"behaviour"``.
        delay: The latency added, in seconds (latency injectors only).
        error_type: The class name of the injected exception (fault injectors only).
    """

    kind: ClassVar[str] = "chaos"
    injector: str
    delay: float | None = None
    error_type: str | None = None

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Level, message and fields of the log line for this event."""
        fields: dict[str, Any] = {"injector": self.name, "kind": self.injector}
        if self.delay is not None:
            fields["delay"] = round(self.delay, 6)
        if self.error_type is not None:
            fields["error_type"] = self.error_type
        return "info", "chaos_injected", fields


def _rate(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number between 0 and 1, got {value!r}")
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{field} must be between 0 and 1, got {value!r}")
    return float(value)


class Injector(_hooks.Instrumented):
    """Base of the injectors: when and how often to inject. Not used directly.

    Args:
        injection_rate: The probability (0 to 1) that an enabled call is injected into, or a
            callable returning it, asked at every enabled call. Polly's default, 0.001.
        enabled: Whether to inject at all: a bool, or a callable asked at every call (a
            feature flag, an environment check). Disabled calls draw no random number.
        random: The random source: a :class:`random.Random` (seed it for reproducible runs) or
            a callable returning floats in ``[0, 1)``. A private ``random.Random()`` when None.
        name: Used in events and logs; ``<kind>-injector-N`` by default.
        hooks: Hooks for this injector only; the process-wide defaults when None.

    Raises:
        ValueError: If ``injection_rate`` is outside 0..1 or ``name`` is empty.
        TypeError: If ``random`` or ``enabled`` is of the wrong type.
    """

    injector_kind: ClassVar[str] = "fault"

    def __init__(
        self,
        *,
        injection_rate: float | Callable[[], float] = 0.001,
        enabled: bool | Callable[[], bool] = True,
        random: RandomSource | None = None,
        name: str | None = None,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self._name = _validate.name(name, f"{self.injector_kind}-injector")
        if callable(injection_rate):
            self._rate: float | Callable[[], float] = injection_rate
        else:
            self._rate = _rate(injection_rate, "injection_rate")
        if not (isinstance(enabled, bool) or callable(enabled)):
            raise TypeError(f"enabled must be a bool or a callable, got {enabled!r}")
        self._enabled = enabled
        if random is None:
            random = _random.Random()
        if isinstance(random, _random.Random):
            self._draw: Callable[[], float] = random.random
        elif callable(random):
            self._draw = random
        else:
            raise TypeError(f"random must be a random.Random or a callable, got {random!r}")
        self.calls = 0
        """Calls seen so far."""
        self.injected = 0
        """Calls injected into so far."""
        self._init_hooks(hooks)

    def _on_hooks_changed(self) -> None:
        self._wants_events = self._hookset.wants(ChaosInjected)

    @property
    def name(self) -> str:
        """The injector's name."""
        return self._name

    @property
    def enabled(self) -> bool:
        """Whether the injector injects right now."""
        enabled = self._enabled
        return enabled if isinstance(enabled, bool) else bool(enabled())

    @enabled.setter
    def enabled(self, value: bool | Callable[[], bool]) -> None:
        if not (isinstance(value, bool) or callable(value)):
            raise TypeError(f"enabled must be a bool or a callable, got {value!r}")
        self._enabled = value

    @property
    def injection_rate(self) -> float:
        """The injection rate right now (asks the callable, if one was given)."""
        rate = self._rate
        return rate if isinstance(rate, float) else _rate(rate(), "injection_rate()")

    @injection_rate.setter
    def injection_rate(self, value: float | Callable[[], float]) -> None:
        self._rate = value if callable(value) else _rate(value, "injection_rate")

    def should_inject(self) -> bool:
        """Decide for one call (counting it); draws one random number when enabled."""
        self.calls += 1
        if not self.enabled:
            return False
        rate = self.injection_rate
        if self._draw() < rate:
            self.injected += 1
            return True
        return False

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield "veritas_chaos_injections", (self._name, self.injector_kind), float(self.injected)

    def _emit_injected(self, **fields: Any) -> None:
        if self._wants_events:
            self._emit(ChaosInjected(name=self._name, injector=self.injector_kind, **fields))

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function."""
        _validate.require_async(fn, type(self).__name__)

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return wrapper

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)``, injecting into it if this call is chosen."""
        if not self.should_inject():
            return await fn(*args, **kwargs)
        return await self._inject(fn, args, kwargs)

    async def _inject(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._name!r} rate={self._rate!r} "
            f"injected={self.injected}/{self.calls}>"
        )


class FaultInjector(Injector):
    """Raise an exception instead of making the call.

    Example::

        flaky = FaultInjector(ConnectionResetError("injected"), injection_rate=0.05)

        @flaky
        async def load_order(order_id: int) -> Order: ...

    Args:
        fault: What to raise: an exception (a shallow copy of it is raised each time, so
            tracebacks do not pile up), an exception class (instantiated with a message), or a
            callable returning an exception, or None for "no fault this time".
            :class:`InjectedFaultError` (a ``ConnectionError``) when omitted.
        **options: ``injection_rate``, ``enabled``, ``random``, ``name``, ``hooks``, as in
            :class:`Injector`.

    Raises:
        TypeError: If ``fault`` is none of these.
    """

    injector_kind: ClassVar[str] = "fault"

    def __init__(
        self,
        fault: BaseException
        | type[BaseException]
        | Callable[[], BaseException | None]
        | None = None,
        **options: Any,
    ) -> None:
        if fault is not None and not (
            isinstance(fault, BaseException)
            or (isinstance(fault, type) and issubclass(fault, BaseException))
            or callable(fault)
        ):
            raise TypeError(
                f"fault must be an exception, an exception class or a callable, got {fault!r}"
            )
        self._fault = fault
        super().__init__(**options)

    def _make(self) -> BaseException | None:
        fault = self._fault
        if fault is None:
            return InjectedFaultError(self.name)
        if isinstance(fault, BaseException):
            return copy.copy(fault)
        if isinstance(fault, type):
            instance: BaseException = fault(f"fault injected by {self.name!r}")
            return instance
        made: BaseException | None = fault()
        return made

    async def _inject(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        error = self._make()
        if error is None:  # the generator chose no fault for this call
            return await fn(*args, **kwargs)
        self._emit_injected(error_type=type(error).__name__)
        raise error


class LatencyInjector(Injector):
    """Wait before making the call.

    The wait is an ordinary sleep: cancelling the call (a timeout, a cancelled task) ends it at
    once, and the call is then not made.

    Example::

        slow = LatencyInjector(0.5, injection_rate=0.1)   # 10 % of calls take 500 ms more

    Args:
        latency: Seconds to wait (>= 0, a float or ``timedelta``), or a callable returning them
            for each injected call (for jitter).
        clock: Whose ``sleep`` waits (a :class:`~veritas_resilience.testing.FakeClock` in tests);
            the event loop's when None.
        **options: ``injection_rate``, ``enabled``, ``random``, ``name``, ``hooks``, as in
            :class:`Injector`.

    Raises:
        ValueError: If ``latency`` is negative or not finite.
    """

    injector_kind: ClassVar[str] = "latency"

    def __init__(
        self,
        latency: Seconds | Callable[[], float],
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        if callable(latency):
            self._latency: float | Callable[[], float] = latency
        else:
            self._latency = seconds(latency, "latency", allow_zero=True)
        self._sleep: Callable[[float], Awaitable[None]] = (
            clock.sleep if clock is not None else anyio.sleep
        )
        super().__init__(**options)

    async def _inject(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        latency = self._latency
        delay = (
            latency
            if isinstance(latency, float)
            else seconds(latency(), "latency()", allow_zero=True)
        )
        self._emit_injected(delay=delay)
        await self._sleep(delay)
        return await fn(*args, **kwargs)


class OutcomeInjector(Injector):
    """Return a value instead of making the call (a fake answer: empty, stale, wrong).

    Example::

        empty = OutcomeInjector([], injection_rate=0.2)   # 20 % of searches find nothing

    Args:
        outcome: The value to return.
        factory: Instead of ``outcome``, a function (sync or async) called with the call's
            arguments whose result is returned.
        **options: ``injection_rate``, ``enabled``, ``random``, ``name``, ``hooks``, as in
            :class:`Injector`.

    Raises:
        TypeError: If ``factory`` is not callable.
    """

    injector_kind: ClassVar[str] = "outcome"

    def __init__(
        self, outcome: Any = None, *, factory: Callable[..., Any] | None = None, **options: Any
    ) -> None:
        if factory is not None and not callable(factory):
            raise TypeError(f"factory must be callable, got {factory!r}")
        self._outcome = outcome
        self._factory = factory
        super().__init__(**options)

    async def _inject(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        self._emit_injected()
        if self._factory is None:
            return self._outcome  # type: ignore[no-any-return]
        result = self._factory(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]


class BehaviourInjector(Injector):
    """Run a side effect before making the call (fill a disk, drop a cache, kill a connection).

    Example::

        async def drop_cache(*args, **kwargs):
            await cache.clear()

        chaos = BehaviourInjector(drop_cache, injection_rate=0.01)

    Args:
        behaviour: A function (sync or async) called with the call's arguments. If it raises,
            the call fails with its error (as a real side effect would).
        **options: ``injection_rate``, ``enabled``, ``random``, ``name``, ``hooks``, as in
            :class:`Injector`.

    Raises:
        TypeError: If ``behaviour`` is not callable.
    """

    injector_kind: ClassVar[str] = "behaviour"

    def __init__(self, behaviour: Callable[..., Any], **options: Any) -> None:
        if not callable(behaviour):
            raise TypeError(f"behaviour must be callable, got {behaviour!r}")
        self._behaviour = behaviour
        super().__init__(**options)

    async def _inject(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        self._emit_injected()
        result = self._behaviour(*args, **kwargs)
        if inspect.isawaitable(result):
            await result
        return await fn(*args, **kwargs)
