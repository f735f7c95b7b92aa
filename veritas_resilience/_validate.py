"""Validation of settings, shared by every component: a bad value names its parameter and range."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import TypeAlias

__all__ = [
    "ExceptionMatcher",
    "Seconds",
    "fraction",
    "matcher",
    "number",
    "percent",
    "positive_int",
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
