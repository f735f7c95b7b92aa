"""Validation of settings, shared by every component: a bad value names its parameter and range."""

from __future__ import annotations

import inspect
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ._clock import Clock
    from .events import Hook

__all__ = [
    "ExceptionMatcher",
    "Seconds",
    "clock",
    "fraction",
    "hooks",
    "matcher",
    "name",
    "number",
    "percent",
    "positive_int",
    "require_async",
    "seconds",
]

ExceptionMatcher: TypeAlias = (
    "type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]"
)
"""Which exceptions a rule applies to: a type, a tuple of types, or a predicate."""

Seconds: TypeAlias = "float | timedelta"
"""A duration: seconds as a number, or a ``timedelta``."""


def seconds(value: Seconds, field: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` in seconds; raise if it is not a finite duration > 0 (>= 0 if allowed)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return _finite(value, field, allow_zero, "a number of seconds or a timedelta", " of seconds")


def _finite(value: object, field: str, allow_zero: bool, kind: str, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be {kind}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be a finite number{unit} {allowed}, got {number!r}")
    return number


def positive_int(value: int, field: str) -> int:
    """Return ``value``; raise if it is not an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{field} must be >= 1, got {value!r}")
    return value


def number(value: float, field: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float; raise if it is not a finite number > 0 (>= 0 if allowed)."""
    return _finite(value, field, allow_zero, "a number", "")


def fraction(value: float, field: str) -> float:
    """Return ``value`` as a float; raise if it is not a number > 0 and <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number > 0 and <= 1, got {value!r}")
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"{field} must be > 0 and <= 1, got {value!r}")
    return float(value)


def percent(value: float, field: str) -> float:
    """Return ``value``; raise if it is not a number between 0 and 100 (a percentage)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a percentage (a number from 0 to 100), got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 100.0:  # also rejects NaN
        raise ValueError(f"{field} must be a percentage from 0 to 100, got {value!r}")
    return value


def matcher(value: ExceptionMatcher | None, field: str) -> Callable[[BaseException], bool] | None:
    """Turn exception types or a predicate into one predicate (None stays None)."""
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, BaseException):
        types: tuple[type[BaseException], ...] = (value,)
    elif isinstance(value, tuple):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise TypeError(f"{field} must hold exception types, got {item!r}")
        types = value
    elif callable(value):
        return value  # type: ignore[return-value]
    else:
        raise TypeError(f"{field} must be an exception type, a tuple of them, or a predicate")
    return lambda exc: isinstance(exc, types)


_counters: dict[str, Iterator[int]] = {}
_counters_lock = threading.Lock()


def name(value: str | None, kind: str) -> str:
    """Return ``value``, or ``{kind}-N`` (numbered per kind) when it is None.

    Raises:
        ValueError: If ``value`` is not a non-empty string.
    """
    if value is None:
        with _counters_lock:
            counter = _counters.setdefault(kind, itertools.count(1))
            return f"{kind}-{next(counter)}"
    if not isinstance(value, str) or not value:
        raise ValueError(f"name must be a non-empty string, got {value!r}")
    return value


def require_async(fn: Callable[..., Any], policy: str) -> None:
    """Raise TypeError unless ``fn`` is an async function (or an object with an async __call__)."""
    if not (
        inspect.iscoroutinefunction(fn)
        or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
    ):
        raise TypeError(
            f"{policy} decorates async functions (async def); got {fn!r}. "
            "Wrap sync code with anyio.to_thread.run_sync in an async function first."
        )


def clock(value: Clock, field: str = "clock", *, sleeps: bool = False) -> Clock:
    """Return ``value`` if it is a clock: ``monotonic()`` and, when ``sleeps``, ``sleep(s)``.

    Raises:
        TypeError: Naming ``field``, if a method is missing.
    """
    needed = ("monotonic", "sleep") if sleeps else ("monotonic",)
    missing = [m for m in needed if not callable(getattr(value, m, None))]
    if missing:
        raise TypeError(
            f"{field} must be a clock with {' and '.join(f'{m}()' for m in needed)} "
            "(veritas_resilience.MonotonicClock, or veritas_resilience.testing.FakeClock in "
            f"tests); got {value!r}"
        )
    return value


def hooks(value: Iterable[Hook] | object, field: str = "hooks") -> tuple[Hook, ...] | None:
    """Return ``value`` as a tuple of hooks (None stays None: the process-wide defaults).

    Raises:
        TypeError: Naming ``field``, if it is not a list of objects with ``on_event(event)``.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        if callable(getattr(value, "on_event", None)):
            raise TypeError(f"{field} must be a list of hooks; wrap the hook: {field}=[{value!r}]")
        raise TypeError(f"{field} must be a list of hooks (objects with on_event), got {value!r}")
    result = tuple(value)
    for hook in result:
        if not callable(getattr(hook, "on_event", None)):
            raise TypeError(f"{field}: {hook!r} has no on_event(event) method")
    return result
