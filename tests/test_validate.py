"""Argument checks shared by every component: a bad clock, hooks list or name fails at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from veritas_resilience import (
    Bulkhead,
    CircuitBreaker,
    FallbackChain,
    MemoryStaleStore,
    Retry,
    RetryBudget,
    StaleCache,
    Timeout,
    set_hooks,
)
from veritas_resilience._validate import name, require_async
from veritas_resilience.testing import FakeClock, RecordingHook

WITH_CLOCK: dict[str, Callable[[Any], object]] = {
    "CircuitBreaker": lambda clock: CircuitBreaker(clock=clock, hooks=[]),
    "Retry": lambda clock: Retry(on=OSError, clock=clock, hooks=[]),
    "RetryBudget": lambda clock: RetryBudget(clock=clock, hooks=[]),
    "StaleCache": lambda clock: StaleCache(clock=clock, hooks=[]),
    "StaleCache with a store": lambda clock: StaleCache(
        store=MemoryStaleStore(), clock=clock, hooks=[]
    ),
    "MemoryStaleStore": lambda clock: MemoryStaleStore(clock=clock),
}

WITH_HOOKS: dict[str, Callable[[Any], object]] = {
    "CircuitBreaker": lambda hooks: CircuitBreaker(hooks=hooks),
    "Retry": lambda hooks: Retry(on=OSError, hooks=hooks),
    "RetryBudget": lambda hooks: RetryBudget(hooks=hooks),
    "StaleCache": lambda hooks: StaleCache(hooks=hooks),
    "FallbackChain": lambda hooks: FallbackChain(lambda: None, hooks=hooks),
    "Timeout": lambda hooks: Timeout(1, hooks=hooks),
    "Bulkhead": lambda hooks: Bulkhead(1, hooks=hooks),
    "set_hooks": set_hooks,
}


@pytest.mark.parametrize("make", WITH_CLOCK.values(), ids=WITH_CLOCK.keys())
def test_a_clock_that_is_not_one_is_rejected_at_construction(
    make: Callable[[Any], object],
) -> None:
    """clock="x" raises TypeError naming clock when built, not AttributeError on first use."""
    with pytest.raises(TypeError, match=r"^clock must be a clock with monotonic\(\)"):
        make("x")


@pytest.mark.parametrize("make", WITH_CLOCK.values(), ids=WITH_CLOCK.keys())
def test_a_fake_clock_is_accepted(make: Callable[[Any], object]) -> None:
    """The testing kit's FakeClock passes the same check."""
    make(FakeClock())


def test_a_retry_clock_must_also_sleep() -> None:
    """Retry waits between attempts, so its clock needs sleep() too; the message says so."""

    class OnlyTime:
        def monotonic(self) -> float:
            return 0.0

    CircuitBreaker(clock=OnlyTime(), hooks=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"monotonic\(\) and sleep\(\)"):
        Retry(on=OSError, clock=OnlyTime(), hooks=[])  # type: ignore[arg-type]


@pytest.mark.parametrize("make", WITH_HOOKS.values(), ids=WITH_HOOKS.keys())
@pytest.mark.parametrize("bad", [5, "hook", [5]], ids=["int", "str", "list-of-int"])
def test_hooks_that_are_not_a_list_of_hooks_are_rejected(
    make: Callable[[Any], object], bad: object
) -> None:
    """hooks=5 (or a string, or a list of non-hooks) raises TypeError naming hooks."""
    with pytest.raises(TypeError, match=r"^hooks"):
        make(bad)


def test_a_single_hook_not_in_a_list_gets_a_hint() -> None:
    """hooks=hook (forgotten brackets) says to wrap it in a list."""
    with pytest.raises(TypeError, match=r"wrap the hook: hooks=\["):
        CircuitBreaker(hooks=RecordingHook())  # type: ignore[arg-type]


def test_auto_names_are_numbered_per_kind() -> None:
    """Unnamed components get kind-N names from one helper; a given name is kept and checked."""
    first, second = name(None, "widget"), name(None, "widget")
    assert (first, second) == ("widget-1", "widget-2")
    assert name("orders", "widget") == "orders"
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        name("", "widget")


def test_require_async_names_the_policy() -> None:
    """Decorating a plain function says which policy wants an async def."""
    with pytest.raises(TypeError, match=r"^Retry decorates async functions"):
        require_async(lambda: None, "Retry")
