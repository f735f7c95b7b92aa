"""Fallback chains, under asyncio and trio."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _log_capture import LogCapture
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from veritas_resilience import (
    CircuitBreaker,
    FallbackChain,
    FallbackExhausted,
    FallbackServed,
    FallbackStep,
    FallbackUse,
    PrometheusHook,
    ResilienceError,
    ServiceUnavailableError,
    StaleCache,
    StructlogHook,
    fallback,
    track_fallbacks,
)
from veritas_resilience.limits import Timeout
from veritas_resilience.testing import FakeClock
from veritas_resilience.testing import RecordingHook as Recorder

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


def fallback_metric(registry: CollectorRegistry, name: str, step: str, outcome: str) -> float:
    """The value of veritas_fallback_total for one chain, step and outcome."""
    wanted = {"name": name, "step": step, "outcome": outcome}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == "veritas_fallback_total" and sample.labels == wanted:
                return float(sample.value)
    raise AssertionError(f"no sample for {wanted}")


class Calls:
    """Steps that record the order they ran in."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def ok(self, name: str, value: Any) -> Any:
        async def step(*args: Any, **kwargs: Any) -> Any:
            self.order.append(name)
            await anyio.lowlevel.checkpoint()
            return value

        step.__name__ = name
        return step

    def fail(self, name: str, error: Exception) -> Any:
        async def step(*args: Any, **kwargs: Any) -> Any:
            self.order.append(name)
            await anyio.lowlevel.checkpoint()
            raise error

        step.__name__ = name
        return step


async def test_primary_success_runs_no_fallback(prometheus: PrometheusHook) -> None:
    """When the primary answers, no step runs and the primary is counted."""
    calls = Calls()
    chain = FallbackChain(calls.ok("degraded", "d"), name="orders", hooks=[prometheus])
    primary = chain(calls.ok("primary", "p"))
    assert await primary(1) == "p"
    assert calls.order == ["primary"]
    assert chain.counts()["primary"] == {"success": 1, "failure": 0, "skipped": 0}
    assert fallback_metric(prometheus.registry, "orders", "primary", "success") == 1
    assert fallback_metric(prometheus.registry, "orders", "degraded", "success") == 0


async def test_steps_run_in_order_until_one_answers(prometheus: PrometheusHook) -> None:
    """primary -> first -> second: the first step that returns serves the result."""
    hook = Recorder()
    calls = Calls()
    boom = ConnectionError("primary down")
    chain = fallback(
        calls.fail("first", KeyError("no degraded data")),
        calls.ok("second", "from second"),
        calls.ok("third", "never"),
        name="orders",
        hooks=[hook, prometheus],
    )
    primary = chain(calls.fail("primary", boom))
    assert await primary(42) == "from second"
    assert calls.order == ["primary", "first", "second"]
    [served] = hook.of(FallbackServed)
    assert (served.name, served.step, served.index) == ("orders", "second", 2)
    assert isinstance(served.error, KeyError)
    assert fallback_metric(prometheus.registry, "orders", "primary", "failure") == 1
    assert fallback_metric(prometheus.registry, "orders", "first", "failure") == 1
    assert fallback_metric(prometheus.registry, "orders", "second", "success") == 1
    assert fallback_metric(prometheus.registry, "orders", "third", "success") == 0


async def test_steps_receive_the_call_arguments() -> None:
    """Every step is called with the primary's positional and keyword arguments."""
    seen: list[tuple[Any, ...]] = []

    async def primary(a: int, *, b: str) -> str:
        raise ConnectionError

    async def degraded(a: int, *, b: str) -> str:
        seen.append((a, b))
        return f"{a}{b}"

    assert await fallback(degraded, hooks=[])(primary)(1, b="x") == "1x"
    assert seen == [(1, "x")]


async def test_step_predicates_skip_steps_that_do_not_handle_the_error() -> None:
    """A step whose `on` does not match the error that reached it is skipped and counted."""
    calls = Calls()
    chain = FallbackChain(
        FallbackStep(calls.ok("replica", "r"), on=ConnectionError),
        FallbackStep(calls.ok("default", "d"), on=(KeyError, LookupError)),
        hooks=[],
    )
    primary = chain(calls.fail("primary", KeyError("missing")))
    assert await primary() == "d"
    assert calls.order == ["primary", "default"]
    assert chain.counts()["replica"]["skipped"] == 1


async def test_predicates_see_the_latest_error() -> None:
    """Each step's predicate is checked against the previous step's error, not the primary's."""
    calls = Calls()
    chain = FallbackChain(
        calls.fail("cache", KeyError("cold")),
        FallbackStep(calls.ok("only_after_connection_errors", "x"), on=ConnectionError),
        FallbackStep(calls.ok("after_key_errors", "y"), on=KeyError),
        hooks=[],
    )
    assert await chain(calls.fail("primary", ConnectionError()))() == "y"
    assert calls.order == ["primary", "cache", "after_key_errors"]


async def test_an_error_no_step_handles_is_raised_unchanged() -> None:
    """If no step handles the primary's error, that very error propagates, not a chain error."""
    bug = TypeError("a bug, not an outage")
    calls = Calls()
    chain = FallbackChain(FallbackStep(calls.ok("replica", "r"), on=ConnectionError), hooks=[])
    with pytest.raises(TypeError) as info:
        await chain(calls.fail("primary", bug))()
    assert info.value is bug
    assert calls.order == ["primary"]


async def test_all_failing_raises_service_unavailable_with_every_cause(
    prometheus: PrometheusHook,
) -> None:
    """When every step fails, ServiceUnavailableError holds each step's name and error."""
    hook = Recorder()
    errors = [ConnectionError("db down"), KeyError("no degraded"), LookupError("no cache")]
    calls = Calls()
    chain = FallbackChain(
        calls.fail("degraded", errors[1]),
        calls.fail("cached", errors[2]),
        name="requests",
        hooks=[hook, prometheus],
    )
    with pytest.raises(ServiceUnavailableError) as info:
        await chain(calls.fail("primary", errors[0]))()
    exc = info.value
    assert isinstance(exc, ResilienceError)
    assert exc.name == "requests"
    assert exc.steps == ("primary", "degraded", "cached")
    assert list(exc.errors) == errors
    assert "temporarily unavailable" in str(exc)
    assert isinstance(exc.__cause__, ExceptionGroup)
    assert list(exc.__cause__.exceptions) == errors
    [exhausted] = hook.of(FallbackExhausted)
    assert exhausted.steps == ("primary", "degraded", "cached")
    assert fallback_metric(prometheus.registry, "requests", "cached", "failure") == 1


async def test_open_breaker_and_timeouts_are_handled_by_default() -> None:
    """A breaker's CircuitOpenError and a ResilienceTimeoutError fall back with default steps."""
    clock = FakeClock()
    breaker = CircuitBreaker(name="db", failure_threshold=1, clock=clock, hooks=[])
    breaker.isolate()
    calls = Calls()
    chain = FallbackChain(calls.ok("degraded", "d"), hooks=[])
    with track_fallbacks() as served:
        assert await chain(breaker(calls.ok("primary", "p")))() == "d"
        assert await chain(Timeout(0.02, hooks=[])(never))() == "d"
    assert calls.order == ["degraded", "degraded"]
    assert served.degraded and len(served.uses) == 2


async def never() -> Any:
    await anyio.Event().wait()


async def test_cancellation_is_never_handled_by_a_fallback() -> None:
    """A cancelled primary propagates its cancellation; no step runs, nothing is counted."""
    calls = Calls()
    chain = FallbackChain(calls.ok("degraded", "d"), hooks=[])
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(chain(never))
            await anyio.lowlevel.checkpoint()
            scope.cancel()
    assert scope.cancelled_caught
    assert calls.order == []
    assert chain.counts()["primary"] == {"success": 0, "failure": 0, "skipped": 0}


async def test_cancellation_of_a_fallback_step_propagates() -> None:
    """A step that is cancelled while it runs ends the chain with that cancellation."""
    calls = Calls()
    chain = FallbackChain(never, calls.ok("last", "x"), hooks=[])
    with anyio.move_on_after(0.02) as scope:
        await chain(calls.fail("primary", ConnectionError()))()
    assert scope.cancelled_caught
    assert calls.order == ["primary"]


async def test_sync_steps_and_constants() -> None:
    """Plain functions (a constant default) work as steps, as do ones returning awaitables."""
    calls = Calls()

    def default_menu(*args: Any) -> list[str]:
        return ["soup"]

    chain = FallbackChain(
        FallbackStep(lambda: calls.fail("x", KeyError())(), name="x"), default_menu, hooks=[]
    )
    assert await chain(calls.fail("primary", ConnectionError()))() == ["soup"]
    assert calls.order == ["primary", "x"]


async def test_object_form_calls_through_the_chain() -> None:
    """chain.call(primary, ...) behaves like the decorated primary."""
    calls = Calls()
    chain = FallbackChain(calls.ok("degraded", "d"), hooks=[])
    assert await chain.call(calls.fail("primary", OSError()), 1, 2) == "d"
    assert await chain.call(calls.ok("primary", "p")) == "p"


async def test_track_fallbacks_tells_which_step_served() -> None:
    """track_fallbacks records fallback results only; primary results leave it empty."""
    calls = Calls()
    chain = FallbackChain(calls.fail("a", KeyError()), calls.ok("b", "b"), name="menu", hooks=[])
    good = chain(calls.ok("primary", "p"))
    bad = chain(calls.fail("primary", ConnectionError()))
    with track_fallbacks() as served:
        await good()
    assert not served.degraded
    assert served.step is None
    with track_fallbacks() as served:
        await bad()
    assert served.degraded
    assert served.step == "b"
    assert served.uses == [FallbackUse("menu", "b", 2, None)]
    await bad()  # outside a tracking block nothing is recorded anywhere


async def test_nested_chains_each_record_their_fallback() -> None:
    """An inner chain's degraded result stays visible when the outer primary returns it."""
    calls = Calls()
    inner = FallbackChain(calls.ok("replica", "r"), name="inner", hooks=[])
    outer = FallbackChain(calls.ok("static", "s"), name="outer", hooks=[])
    nested = outer(inner(calls.fail("primary", ConnectionError())))
    with track_fallbacks() as served:
        assert await nested() == "r"
    assert [(u.chain, u.step) for u in served.uses] == [("inner", "replica")]


async def test_logs_name_steps_but_never_arguments() -> None:
    """fallback_served and fallback_exhausted logs carry names and error types only."""
    log = LogCapture()
    calls = Calls()
    chain = FallbackChain(
        calls.fail("degraded", KeyError("x")),
        calls.ok("cached", 1),
        name="users",
        hooks=[StructlogHook(log)],
    )
    await chain(calls.fail("primary", ConnectionError("reset")))("jane.doe@example.com")
    failing = FallbackChain(
        calls.fail("degraded", KeyError("x")), name="users2", hooks=[StructlogHook(log)]
    )
    with pytest.raises(ServiceUnavailableError):
        await failing(calls.fail("primary", ConnectionError("reset")))("jane.doe@example.com")
    assert [(level, message) for level, message, _ in log.lines] == [
        ("info", "fallback_served"),
        ("error", "fallback_exhausted"),
    ]
    assert log.lines[0][2] == {
        "chain": "users",
        "step": "cached",
        "index": 2,
        "error_type": "KeyError",
    }
    assert log.lines[1][2]["error_types"] == ["ConnectionError", "KeyError"]
    assert "jane.doe" not in repr(log.lines)


async def test_seed_parity_graceful_degradation_in_one_line() -> None:
    """The guide's processRequest: primary -> degraded -> cached -> ServiceUnavailable."""
    state = {"primary": True, "degraded": True, "cached": True}

    async def primary_service(request: str) -> str:
        if not state["primary"]:
            raise ConnectionError("primary down")
        return f"full:{request}"

    async def degraded_service(request: str) -> str:
        if not state["degraded"]:
            raise ConnectionError("degraded down")
        return f"degraded:{request}"

    async def cached_response(request: str) -> str:
        if not state["cached"]:
            raise KeyError(request)
        return f"cached:{request}"

    process_request = fallback(degraded_service, cached_response, name="requests", hooks=[])(
        primary_service
    )

    assert await process_request("r1") == "full:r1"
    state["primary"] = False
    assert await process_request("r1") == "degraded:r1"
    state["degraded"] = False
    assert await process_request("r1") == "cached:r1"
    state["cached"] = False
    with pytest.raises(ServiceUnavailableError, match="temporarily unavailable"):
        await process_request("r1")


def test_chain_rejects_bad_configuration() -> None:
    """Bad chains raise at construction, naming what is wrong."""

    async def a() -> None: ...

    with pytest.raises(ValueError, match="steps"):
        FallbackChain()
    with pytest.raises(ValueError, match="steps"):
        FallbackChain(a, a)
    with pytest.raises(ValueError, match="steps"):
        FallbackChain(FallbackStep(a, name="primary"))
    with pytest.raises(ValueError, match="steps"):
        FallbackChain(StaleCache(hooks=[]), StaleCache(hooks=[]), hooks=[])
    with pytest.raises(ValueError, match="name"):
        FallbackStep(a, name="")
    with pytest.raises(TypeError, match="callable"):
        FallbackStep(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on"):
        FallbackStep(a, on="KeyError")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async"):
        FallbackChain(a)(lambda: None)  # type: ignore[arg-type, return-value]
