"""A hypothesis state machine checks the breaker against a small reference model.

Calls are coroutines stepped by hand: each call is admitted when first resumed, then parks on a
gate until the machine decides how it ends (success, failure, ignored error or cancellation).
That lets calls overlap state changes in any order without an event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from veritas_resilience import CircuitBreaker, CircuitOpenError, CircuitState
from veritas_resilience.testing import FakeClock

RESET = 10.0


class Boom(Exception):
    pass


class _Gate:
    def __await__(self) -> Generator[None, None, None]:
        yield None


@dataclass
class _Call:
    coro: Coroutine[Any, Any, str]
    outcome: list[str]
    permit: tuple[int, int] | None  # the model's (generation, probe token)


@dataclass
class Model:
    """The reference: the breaker's rules written as plainly as possible."""

    threshold: int
    successes: int
    max_probes: int
    now: float = 0.0
    state: str = "closed"
    gen: int = 0
    failures: int = 0
    reopen_at: float = 0.0
    half_successes: int = 0
    probes: dict[int, float] = field(default_factory=dict)
    next_token: int = 1
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("success", "failure", "ignored", "cancelled", "rejected"), 0
        )
    )

    def _move(self, state: str) -> None:
        self.state, self.gen = state, self.gen + 1
        self.failures = self.half_successes = 0
        self.probes.clear()
        if state == "open":
            self.reopen_at = self.now + RESET

    def current_state(self) -> str:
        if self.state == "open" and self.now >= self.reopen_at:
            self._move("half_open")
        return self.state

    def admit(self) -> tuple[int, int] | None:
        state = self.current_state()
        if state == "closed":
            return (self.gen, 0)
        if state == "half_open":
            self.probes = {t: d for t, d in self.probes.items() if d > self.now}
            if len(self.probes) < self.max_probes:
                token, self.next_token = self.next_token, self.next_token + 1
                self.probes[token] = self.now + RESET
                return (self.gen, token)
        self.counts["rejected"] += 1
        return None

    def finish(self, permit: tuple[int, int], outcome: str) -> None:
        gen, token = permit
        self.counts[outcome] += 1
        live = token in self.probes
        if token:
            self.probes.pop(token, None)
        if outcome in ("ignored", "cancelled") or gen != self.gen:
            return
        if outcome == "success":
            if token and live:
                self.half_successes += 1
                if self.half_successes >= self.successes:
                    self._move("closed")
            elif not token and self.state == "closed":
                self.failures = 0
        elif token and live:
            self._move("open")
        elif not token and self.state == "closed":
            self.failures += 1
            if self.failures >= self.threshold:
                self._move("open")


async def _body(outcome: list[str]) -> str:
    await _Gate()
    if outcome[0] == "failure":
        raise Boom
    if outcome[0] == "ignored":
        raise KeyError("ignored")
    return "ok"


class BreakerMachine(RuleBasedStateMachine):
    calls = Bundle("calls")
    threshold, successes, max_probes = 3, 2, 2
    #: "call": breaker.call(fn, ...); "decorator": the decorated function.
    form = "call"
    #: Time every call (the duration histogram): CLOSED calls then leave the fast path.
    timed = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.breaker = CircuitBreaker(
            name="model",
            failure_threshold=self.threshold,
            reset_timeout=RESET,
            success_threshold=self.successes,
            half_open_max_calls=self.max_probes,
            ignore_on=KeyError,
            record_duration=self.timed,
            clock=self.clock,
            hooks=[],
        )
        self.guarded = self.breaker(_body)
        self.model = Model(self.threshold, self.successes, self.max_probes)

    @initialize(target=calls)
    def slow_calls_from_the_start(self) -> Any:
        """Calls admitted at generation 0 that may end much later: the stale-result cases."""
        return multiple(self.start(), self.start())

    @rule(target=calls)
    def start(self) -> _Call:
        outcome = ["success"]
        if_call = self.form == "call"
        coro = self.breaker.call(_body, outcome) if if_call else self.guarded(outcome)
        permit = self.model.admit()
        try:
            coro.send(None)
        except CircuitOpenError:
            assert permit is None, "the breaker rejected a call the model admits"
            return _Call(coro, outcome, None)
        assert permit is not None, "the breaker admitted a call the model rejects"
        return _Call(coro, outcome, permit)

    @rule(call=consumes(calls), outcome=st.sampled_from(["success", "failure", "ignored"]))
    def finish(self, call: _Call, outcome: str) -> None:
        if call.permit is None:
            return
        call.outcome[0] = outcome
        try:
            call.coro.send(None)
        except StopIteration:
            assert outcome == "success"
        except Boom:
            assert outcome == "failure"
        except KeyError:
            assert outcome == "ignored"
        self.model.finish(call.permit, outcome)

    @rule(outcome=st.sampled_from(["success", "failure"]))
    def quick_call(self, outcome: str) -> None:
        """A call that starts and ends at once: moves the breaker along in one step."""
        self.finish(self.start(), outcome)

    @rule(call=consumes(calls))
    def cancel(self, call: _Call) -> None:
        if call.permit is None:
            return
        try:
            call.coro.throw(asyncio.CancelledError())
        except asyncio.CancelledError:
            pass
        self.model.finish(call.permit, "cancelled")

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.99, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.model.now += seconds

    @invariant()
    def same_state_and_counts(self) -> None:
        expected = self.model.current_state()
        snap = self.breaker.snapshot()
        assert snap.state is CircuitState(expected)
        assert snap.calls == self.model.counts
        assert snap.consecutive_failures == self.model.failures
        if expected == "half_open":
            assert snap.probes_in_flight == len(self.model.probes)


class QuickTripMachine(BreakerMachine):
    """One failure opens, one probe at a time, one success closes: deep states come quickly."""

    threshold, successes, max_probes = 1, 1, 1


class DecoratorMachine(BreakerMachine):
    """The same rules through the decorated function."""

    form = "decorator"


class QuickTripDecoratorMachine(QuickTripMachine):
    """The quick-trip rules through the decorated function."""

    form = "decorator"


class TimedMachine(BreakerMachine):
    """The same rules with every call timed: CLOSED calls take the general path."""

    form, timed = "decorator", True


def _settings(examples: int, steps: int) -> settings:
    # Scaled by the profile's max_examples (100 by default): the "other-pythons" profile
    # (tests/conftest.py) checks the same properties with fewer examples.
    default = settings.default
    scale = (default.max_examples if default is not None else 100) / 100
    return settings(
        max_examples=max(5, round(examples * scale)), stateful_step_count=steps, deadline=None
    )


TestBreakerModel = BreakerMachine.TestCase
TestBreakerModel.settings = _settings(300, 40)
TestQuickTripModel = QuickTripMachine.TestCase
TestQuickTripModel.settings = _settings(600, 30)
TestDecoratorModel = DecoratorMachine.TestCase
TestDecoratorModel.settings = _settings(300, 40)
TestQuickTripDecoratorModel = QuickTripDecoratorMachine.TestCase
TestQuickTripDecoratorModel.settings = _settings(300, 30)
TestTimedModel = TimedMachine.TestCase
TestTimedModel.settings = _settings(200, 40)
