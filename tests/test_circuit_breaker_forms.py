"""The forms of a guarded call: the decorator (async and sync), call() and call_sync().

All four run one guard (circuit_breaker._GUARD). These tests cover what a wrapper could get wrong
beyond the state machine (tests/test_circuit_breaker.py and the model test cover that): how a
decorated function looks to frameworks and event loops, the coroutine protocol of one call, and
the mistakes a caller can make with the forms.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import pickle
import traceback
import typing
import warnings
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from veritas_resilience import (
    BreakerCallIgnored,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from veritas_resilience.testing import FakeClock, RecordingHook

module_breaker = CircuitBreaker(name="module-level", hooks=[])


@module_breaker
async def lookup(key: str, default: int = 0, *, scale: int = 1) -> int:
    """Look a key up."""
    return len(key) * scale + default


class _Gate:
    def __await__(self) -> Generator[None, None, None]:
        yield None


async def _sleep_then(value: int) -> int:
    await anyio.lowlevel.checkpoint()
    return value


def _calls(breaker: CircuitBreaker) -> dict[str, int]:
    return breaker.snapshot().calls


def _half_open(breaker: CircuitBreaker) -> None:
    breaker._set_state(CircuitState.HALF_OPEN, "test")


# -- how a decorated function looks ---------------------------------------------------------------


def test_a_decorated_function_looks_like_the_coroutine_function_it_wraps() -> None:
    """Name, docs, signature, type hints and coroutine-function checks are those of the function."""
    assert lookup.__name__ == "lookup"
    assert lookup.__qualname__ == "lookup"
    assert lookup.__doc__ == "Look a key up."
    assert lookup.__module__ == __name__
    assert inspect.signature(lookup) == inspect.signature(lookup.__wrapped__)  # type: ignore[attr-defined]
    assert list(inspect.signature(lookup).parameters) == ["key", "default", "scale"]
    assert inspect.iscoroutinefunction(lookup)
    assert asyncio.iscoroutinefunction(lookup)
    assert lookup.breaker is module_breaker  # type: ignore[attr-defined]
    assert typing.get_type_hints(lookup) == {
        "key": str,
        "default": int,
        "scale": int,
        "return": int,
    }


def test_a_decorated_plain_function_is_not_a_coroutine_function() -> None:
    """A plain function gets a plain wrapper that keeps its signature and is counted."""

    def render(template: str, *, strict: bool = False) -> str:
        """Render a template."""
        return template.upper()

    guarded = CircuitBreaker(hooks=[])(render)
    assert not inspect.iscoroutinefunction(guarded)
    assert not asyncio.iscoroutinefunction(guarded)
    assert inspect.signature(guarded) == inspect.signature(render)
    assert guarded.__doc__ == "Render a template."
    assert guarded("a", strict=True) == "A"
    assert _calls(guarded.breaker)["success"] == 1  # type: ignore[attr-defined]


def test_a_callable_object_with_an_async_call_gets_the_async_wrapper() -> None:
    """An object whose __call__ is async is guarded as async: its outcome is awaited."""

    class Client:
        async def __call__(self, x: int) -> int:
            await anyio.lowlevel.checkpoint()
            if x < 0:
                raise OSError("down")
            return x

    breaker = CircuitBreaker(hooks=[])
    guarded = breaker(Client())
    assert inspect.iscoroutinefunction(guarded)
    assert anyio.run(guarded, 2) == 2
    with pytest.raises(OSError, match="down"):
        anyio.run(guarded, -1)
    assert _calls(breaker)["success"] == 1
    assert _calls(breaker)["failure"] == 1


def test_stacked_breakers_on_a_plain_function_stay_plain() -> None:
    """A breaker over a decorated plain function does not take it for a coroutine function."""
    outer = CircuitBreaker(name="outer", hooks=[])
    inner = CircuitBreaker(name="inner", hooks=[])

    @outer
    @inner
    def double(x: int) -> int:
        return 2 * x

    assert not inspect.iscoroutinefunction(double)
    assert double(4) == 8
    assert _calls(outer)["success"] == _calls(inner)["success"] == 1


def test_a_decorated_function_pickles_by_reference_like_a_function() -> None:
    """Pickling a decorated module-level function gives back the same object."""
    assert pickle.loads(pickle.dumps(lookup)) is lookup


def test_a_traceback_through_the_guard_shows_its_source() -> None:
    """The guard's frame in a traceback has a source line, like any module's code."""
    breaker = CircuitBreaker(hooks=[])

    async def broken() -> None:
        raise OSError("down")

    with pytest.raises(OSError) as caught:
        anyio.run(breaker(broken))
    text = "".join(traceback.format_exception(caught.value))
    assert "circuit_breaker guard" in text
    assert "fn(*args, **kwargs)" in text


# -- how a call behaves ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_methods_bind_self_and_calls_pass_every_kind_of_argument() -> None:
    """Decorated methods receive self; positional, default and keyword arguments pass through."""
    breaker = CircuitBreaker(hooks=[])

    class Repo:
        factor = 10

        @breaker
        async def load(self, key: str, *, extra: int = 0) -> int:
            return self.factor * len(key) + extra

    repo = Repo()
    assert await repo.load("abc") == 30
    assert await repo.load("ab", extra=1) == 21
    bound = repo.load
    assert await bound("a") == 10
    assert inspect.iscoroutinefunction(Repo.load) and inspect.iscoroutinefunction(repo.load)
    assert await lookup("ab", 1, scale=3) == 7
    assert _calls(breaker)["success"] == 3


@pytest.mark.anyio
async def test_stacked_breakers_each_see_every_call(clock: FakeClock) -> None:
    """A breaker over a decorated function counts what the inner one sees, rejections included."""
    outer = CircuitBreaker(name="outer", failure_threshold=2, clock=clock, hooks=[])
    inner = CircuitBreaker(name="inner", failure_threshold=1, clock=clock, hooks=[])
    failing = [False]

    @outer
    @inner
    async def fetch(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        if failing[0]:
            raise OSError("down")
        return x

    assert inspect.iscoroutinefunction(fetch)
    assert await fetch(3) == 3
    failing[0] = True
    with pytest.raises(OSError):
        await fetch(1)
    with pytest.raises(CircuitOpenError) as rejected:
        await fetch(1)
    assert rejected.value.name == "inner"
    assert _calls(inner)["failure"] == 1
    assert _calls(outer)["failure"] == 2  # the inner rejection is a failure outside
    assert outer.state is CircuitState.OPEN


@pytest.mark.anyio
async def test_a_call_can_be_a_task_of_anyio_and_of_the_event_loop(anyio_backend: str) -> None:
    """Task groups and nurseries (both backends), create_task and gather run a call."""
    breaker = CircuitBreaker(hooks=[])
    guarded = breaker(_sleep_then)
    results: list[int] = []

    async def keep(fn: Callable[[int], Awaitable[int]], value: int) -> None:
        results.append(await fn(value))

    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded, 1)
        tg.start_soon(keep, guarded, 2)
        tg.start_soon(breaker.call, _sleep_then, 3)
    if anyio_backend == "asyncio":
        assert await asyncio.create_task(guarded(4)) == 4
        assert list(await asyncio.gather(guarded(5), breaker.call(_sleep_then, 6))) == [5, 6]
    assert results == [2]
    assert _calls(breaker)["success"] == (6 if anyio_backend == "asyncio" else 3)


@pytest.mark.anyio
async def test_nothing_is_admitted_until_the_call_is_awaited(clock: FakeClock) -> None:
    """Calling a decorated function admits nothing; the call is admitted when awaited."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock, hooks=[])
    guarded = breaker(_sleep_then)
    pending = guarded(1)
    breaker.isolate()
    with pytest.raises(CircuitOpenError):
        await pending
    breaker.reset()
    later = guarded(2)
    assert _calls(breaker) == dict.fromkeys(
        ("success", "failure", "ignored", "cancelled", "rejected"), 0
    ) | {"rejected": 1}
    assert await later == 2


@pytest.mark.anyio
async def test_a_rejected_call_never_calls_the_function(clock: FakeClock) -> None:
    """While OPEN, neither call() nor the decorator calls the function."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock, hooks=[])
    called: list[str] = []

    def make(value: int) -> Awaitable[int]:
        called.append("made")
        return _sleep_then(value)

    async def fail() -> None:
        called.append("failed")
        raise OSError("down")

    with pytest.raises(OSError, match="down"):
        await breaker(fail)()
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as caught:
            await breaker.call(make, 1)
        assert caught.value.retry_after == 5.0
        with pytest.raises(CircuitOpenError):
            await breaker(fail)()
    assert called == ["failed"]
    assert _calls(breaker)["rejected"] == 6
    clock.advance(5)
    assert await breaker.call(make, 7) == 7
    assert breaker.state is CircuitState.CLOSED


def test_a_call_is_a_coroutine_awaited_once() -> None:
    """A finished call cannot run again; a first send must be None, like any coroutine's."""
    breaker = CircuitBreaker(hooks=[])
    call = breaker.call(_sleep_then, 1)
    with pytest.raises(TypeError, match="non-None"):
        call.send("x")
    call.close()
    done = lookup("abc")
    with pytest.raises(StopIteration) as stopped:
        done.send(None)
    assert stopped.value.value == 3
    with pytest.raises(RuntimeError, match="already awaited"):
        done.send(None)


@pytest.mark.parametrize("how", ["await itself", "close", "throw", "send"])
def test_re_entering_a_running_call_raises_instead_of_crashing(how: str) -> None:
    """A call that awaits, closes, throws into or resumes itself gets Python's ValueError."""
    breaker = CircuitBreaker(hooks=[])
    me: list[Any] = []

    async def selfish() -> None:
        call = me[0]
        if how == "await itself":
            await call
        elif how == "close":
            call.close()
        elif how == "throw":
            call.throw(KeyError("x"))
        else:
            call.send(None)

    call = breaker(selfish)()
    me.append(call)
    with pytest.raises(ValueError, match="coroutine already executing"):
        call.send(None)
    assert breaker.state is CircuitState.CLOSED


def test_closing_a_suspended_probe_gives_its_slot_back(clock: FakeClock) -> None:
    """A half-open probe abandoned mid-call (close(), or garbage) frees its slot and counts as
    neither success nor failure."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock, hooks=[])

    async def gated() -> str:
        await _Gate()
        return "ok"

    guarded = breaker(gated)
    _half_open(breaker)
    probe = guarded()
    probe.send(None)
    assert breaker.snapshot().probes_in_flight == 1
    probe.close()
    assert breaker.snapshot().probes_in_flight == 0
    assert _calls(breaker)["ignored"] == 1

    probe = guarded()
    probe.send(None)
    assert breaker.snapshot().probes_in_flight == 1
    del probe
    gc.collect()
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.state is CircuitState.HALF_OPEN


def test_throw_reaches_the_wrapped_coroutine_and_counts_its_outcome() -> None:
    """An exception thrown into a running call is the call's outcome; one caught inside is not."""
    breaker = CircuitBreaker(hooks=[])

    async def resilient() -> str:
        try:
            await _Gate()
        except KeyError:
            await _Gate()
        return "recovered"

    call = breaker(resilient)()
    call.send(None)
    assert call.throw(KeyError("x")) is None  # caught inside: suspended again
    with pytest.raises(StopIteration):
        call.send(None)
    failing = breaker(resilient)()
    failing.send(None)
    with pytest.raises(ValueError, match="bad"):
        failing.throw(ValueError("bad"))
    assert _calls(breaker) == {
        "success": 1,
        "failure": 1,
        "ignored": 0,
        "cancelled": 0,
        "rejected": 0,
    }


def test_an_unawaited_call_warns_like_an_unawaited_coroutine() -> None:
    """Dropping a call that was never awaited warns, naming the decorated function."""

    async def forgotten() -> None:
        pass

    guarded = CircuitBreaker(hooks=[])(forgotten)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pending = guarded()
        del pending
        gc.collect()
    assert any("forgotten' was never awaited" in str(w.message) for w in caught)


def test_a_hook_that_wants_rejections_hears_of_each() -> None:
    """With a hook listening for rejections, every rejected call is told."""
    hook = RecordingHook()
    breaker = CircuitBreaker(failure_threshold=1, hooks=[hook])
    breaker.isolate()
    for _ in range(2):
        with pytest.raises(CircuitOpenError):
            breaker(lookup.__wrapped__)("k").send(None)  # type: ignore[attr-defined]
    assert [type(e).__name__ for e in hook.events].count("BreakerCallRejected") == 2


# -- every form runs the same guard ----------------------------------------------------------------


def _forms(breaker: CircuitBreaker) -> dict[str, Callable[[Callable[[], Any]], Any]]:
    """Run a zero-argument body through each form; a sync body for the sync forms."""

    def as_async(body: Callable[[], Any]) -> Callable[[], Any]:
        async def run() -> Any:
            return body()

        return run

    def decorator(body: Callable[[], Any]) -> Any:
        return anyio.run(breaker(as_async(body)))

    def call(body: Callable[[], Any]) -> Any:
        return anyio.run(breaker.call, as_async(body))

    def sync_decorator(body: Callable[[], Any]) -> Any:
        guarded: Callable[[], Any] = breaker(body)
        return guarded()

    def call_sync(body: Callable[[], Any]) -> Any:
        return breaker.call_sync(body)

    return {
        "decorator": decorator,
        "call": call,
        "sync decorator": sync_decorator,
        "call_sync": call_sync,
    }


@pytest.mark.parametrize("form", ["decorator", "call", "sync decorator", "call_sync"])
def test_every_form_follows_the_same_rules(clock: FakeClock, form: str) -> None:
    """Failures open, rejections skip the function, a probe closes: the same in each form."""
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=5, clock=clock, hooks=[])
    run = _forms(breaker)[form]
    ran: list[str] = []

    def ok() -> str:
        ran.append("ok")
        return "ok"

    def down() -> str:
        ran.append("down")
        raise OSError("down")

    assert run(ok) == "ok"
    with pytest.raises(OSError):
        run(down)
    assert run(ok) == "ok"  # a success breaks the row
    for _ in range(2):
        with pytest.raises(OSError):
            run(down)
    assert breaker.snapshot().state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        run(ok)
    clock.advance(5)
    assert run(ok) == "ok"  # the probe
    assert breaker.snapshot().state is CircuitState.CLOSED
    assert ran == ["ok", "down", "ok", "down", "down", "ok"]
    assert _calls(breaker) == {
        "success": 3,
        "failure": 3,
        "ignored": 0,
        "cancelled": 0,
        "rejected": 1,
    }


# -- mistakes at the call site -------------------------------------------------------------------


@pytest.mark.parametrize("thing", [42, "orders", None])
def test_decorating_something_not_callable_is_a_type_error(thing: object) -> None:
    """breaker(42) says what it got instead of failing later, at the first call."""
    with pytest.raises(TypeError, match="decorates a function or another callable"):
        CircuitBreaker(hooks=[])(thing)  # type: ignore[call-overload]


@pytest.mark.parametrize("state", ["closed", "half_open"])
@pytest.mark.parametrize("returns", [5, None])
def test_call_with_a_plain_function_is_a_type_error_not_a_failure(
    clock: FakeClock, state: str, returns: object
) -> None:
    """await breaker.call(sync_fn): a TypeError naming call_sync; no failure, no slot kept."""
    hook = RecordingHook()
    breaker = CircuitBreaker(failure_threshold=1, clock=clock, hooks=[hook])
    if state == "half_open":
        _half_open(breaker)

    def plain() -> object:
        return returns

    for _ in range(2):  # a slot kept by the first call would reject the second
        with pytest.raises(TypeError, match=r"call_sync\(\)") as caught:
            anyio.run(breaker.call, plain)  # type: ignore[arg-type]
        assert "plain" in str(caught.value) and type(returns).__name__ in str(caught.value)
    snap = breaker.snapshot()
    assert snap.state is CircuitState(state)
    assert snap.calls["failure"] == 0
    assert snap.calls["ignored"] == 2
    assert snap.probes_in_flight == 0
    assert len(hook.of(BreakerCallIgnored)) == 2


def test_a_type_error_from_the_dependency_is_still_a_failure(clock: FakeClock) -> None:
    """Only a result that cannot be awaited is a call-site mistake; the function's own
    TypeError is the dependency's failure."""
    breaker = CircuitBreaker(failure_threshold=1, clock=clock, hooks=[])

    async def broken() -> None:
        raise TypeError("bad row")

    with pytest.raises(TypeError, match="bad row"):
        anyio.run(breaker.call, broken)
    assert breaker.state is CircuitState.OPEN


def test_a_future_failing_with_a_type_error_is_still_a_failure(clock: FakeClock) -> None:
    """A TypeError handed back by an awaitable (a future, no frame of its own) is the
    dependency's outcome, not a call-site mistake."""
    breaker = CircuitBreaker(failure_threshold=1, clock=clock, hooks=[])

    def pending() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(TypeError("bad reply"))
        return future

    with pytest.raises(TypeError, match="bad reply"):
        asyncio.run(breaker.call(pending))
    assert breaker.state is CircuitState.OPEN


@pytest.mark.parametrize("form", ["call_sync", "sync decorator"])
@pytest.mark.parametrize("state", ["closed", "half_open"])
def test_a_sync_call_that_returns_a_coroutine_is_a_type_error_not_a_success(
    clock: FakeClock, form: str, state: str
) -> None:
    """breaker.call_sync(async_fn): a TypeError saying to await; no success, no slot kept,
    and no "never awaited" warning on top."""
    breaker = CircuitBreaker(failure_threshold=1, clock=clock, hooks=[])
    if state == "half_open":
        _half_open(breaker)

    async def fetch() -> int:
        return 1

    def sneaky() -> Any:  # a plain function that hands back a coroutine
        return fetch()

    def run() -> object:
        if form == "call_sync":
            return breaker.call_sync(fetch)
        guarded: Callable[[], Any] = breaker(sneaky)
        return guarded()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(TypeError, match="returned a coroutine"):
                run()
            gc.collect()
    snap = breaker.snapshot()
    assert snap.state is CircuitState(state)
    assert snap.calls["success"] == snap.calls["failure"] == 0
    assert snap.calls["ignored"] == 2
    assert snap.probes_in_flight == 0
