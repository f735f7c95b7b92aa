"""The compiled fast path (_speedups.c) behaves like the `async def` wrapper it stands in for.

The breaker's behaviour is tested on both implementations by the main breaker tests and the model
test; these tests cover what only the compiled objects could get wrong: how a decorated function
looks to frameworks and event loops, and the coroutine protocol of one call.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import pickle
import subprocess
import sys
import typing
import warnings
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from veritas_resilience import CircuitBreaker, CircuitOpenError, CircuitState, circuit_breaker
from veritas_resilience.testing import FakeClock

pytestmark = pytest.mark.skipif(
    circuit_breaker._speedups is None
    and not os.environ.get("VERITAS_RESILIENCE_REQUIRE_EXTENSIONS"),
    reason="the compiled fast path is not built",
)

module_breaker = CircuitBreaker(name="module-level", hooks=[])


@module_breaker
async def lookup(key: str, default: int = 0, *, scale: int = 1) -> int:
    """Look a key up."""
    return len(key) * scale + default


class _Gate:
    def __await__(self) -> Generator[None, None, None]:
        yield None


def test_the_compiled_module_is_built_when_required() -> None:
    """CI compiles the fast path: a build that silently fell back to pure Python fails here."""
    assert circuit_breaker._speedups is not None
    assert type(lookup).__name__ == "Guarded"


def test_a_decorated_function_looks_like_the_coroutine_function_it_wraps() -> None:
    """Name, docs, signature and coroutine-function checks are those of the wrapped function."""
    assert lookup.__name__ == "lookup"
    assert lookup.__qualname__ == "lookup"
    assert lookup.__doc__ == "Look a key up."
    assert lookup.__module__ == __name__
    assert inspect.signature(lookup) == inspect.signature(lookup.__wrapped__)  # type: ignore[attr-defined]
    assert list(inspect.signature(lookup).parameters) == ["key", "default", "scale"]
    assert inspect.iscoroutinefunction(lookup)
    assert asyncio.iscoroutinefunction(lookup)
    assert lookup.breaker is module_breaker  # type: ignore[attr-defined]
    assert lookup.__globals__ is globals()
    assert typing.get_type_hints(lookup) == {
        "key": str,
        "default": int,
        "scale": int,
        "return": int,
    }
    assert "lookup" in repr(lookup) and "module-level" in repr(lookup)


def test_a_decorated_plain_function_is_compiled_and_not_a_coroutine_function() -> None:
    """A plain function gets the compiled wrapper too, and still looks like a plain function."""

    def render(template: str, *, strict: bool = False) -> str:
        """Render a template."""
        return template.upper()

    guarded = CircuitBreaker(hooks=[])(render)
    assert type(guarded).__name__ == "Guarded"
    assert not inspect.iscoroutinefunction(guarded)
    assert not asyncio.iscoroutinefunction(guarded)
    assert inspect.signature(guarded) == inspect.signature(render)
    assert guarded.__doc__ == "Render a template."
    assert guarded("a", strict=True) == "A"
    assert guarded.breaker.snapshot().calls["success"] == 1  # type: ignore[attr-defined]


def test_stacked_breakers_on_a_plain_function_stay_plain() -> None:
    """A breaker over a compiled plain-function wrapper does not take it for a coroutine."""
    outer = CircuitBreaker(name="outer", hooks=[])
    inner = CircuitBreaker(name="inner", hooks=[])

    @outer
    @inner
    def double(x: int) -> int:
        return 2 * x

    assert not inspect.iscoroutinefunction(double)
    assert double(4) == 8
    assert outer.snapshot().calls["success"] == inner.snapshot().calls["success"] == 1


def test_a_decorated_function_pickles_by_reference_like_a_function() -> None:
    """Pickling a decorated module-level function gives back the same object."""
    assert pickle.loads(pickle.dumps(lookup)) is lookup


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
    assert breaker.snapshot().calls["success"] == 3


@pytest.mark.anyio
async def test_stacked_breakers_each_see_every_call(clock: FakeClock) -> None:
    """A breaker over a decorated function (two compiled wrappers) counts what the inner sees."""
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

    assert type(fetch).__name__ == "Guarded"
    assert inspect.iscoroutinefunction(fetch)
    assert await fetch(3) == 3
    failing[0] = True
    with pytest.raises(OSError):
        await fetch(1)
    with pytest.raises(CircuitOpenError) as rejected:
        await fetch(1)
    assert rejected.value.name == "inner"
    assert inner.snapshot().calls["failure"] == 1
    assert outer.snapshot().calls["failure"] == 2  # the inner rejection is a failure outside
    assert outer.state is CircuitState.OPEN


async def _sleep_then(value: int) -> int:
    await anyio.lowlevel.checkpoint()
    return value


@pytest.mark.anyio
async def test_a_call_can_be_a_task_of_anyio_and_of_the_event_loop(anyio_backend: str) -> None:
    """Task groups (both backends) and asyncio.create_task run a call as a coroutine."""
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
    assert breaker.snapshot().calls["success"] == (6 if anyio_backend == "asyncio" else 3)


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
    assert breaker.snapshot().calls == dict.fromkeys(
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
    assert breaker.snapshot().calls["rejected"] == 6
    clock.advance(5)
    assert await breaker.call(make, 7) == 7
    assert breaker.state is CircuitState.CLOSED


def test_a_call_is_a_coroutine_awaited_once() -> None:
    """A finished call cannot run again; a first send must be None, like a coroutine's."""
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


def test_closing_a_suspended_probe_gives_its_slot_back(clock: FakeClock) -> None:
    """A half-open probe abandoned mid-call (close(), or garbage) frees its slot and counts as
    neither success nor failure."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock, hooks=[])

    async def gated() -> str:
        await _Gate()
        return "ok"

    guarded = breaker(gated)
    breaker.isolate()
    breaker.reset()
    breaker._set_state(CircuitState.HALF_OPEN, "test")
    probe = guarded()
    probe.send(None)
    assert breaker.snapshot().probes_in_flight == 1
    probe.close()
    assert breaker.snapshot().probes_in_flight == 0
    assert breaker.snapshot().calls["ignored"] == 1

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
    assert breaker.snapshot().calls == {
        "success": 1,
        "failure": 1,
        "ignored": 0,
        "cancelled": 0,
        "rejected": 0,
    }
    unstarted = breaker(resilient)()
    with pytest.raises(ValueError, match="never ran"):
        unstarted.throw(ValueError("never ran"))
    assert breaker.snapshot().calls["failure"] == 1


def test_an_unawaited_call_warns_like_an_unawaited_coroutine() -> None:
    """Dropping a call that was never awaited warns about the wrapped coroutine, as Python does."""

    async def forgotten() -> None:
        pass

    guarded = CircuitBreaker(hooks=[])(forgotten)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pending = guarded()
        del pending
        gc.collect()
    assert any("was never awaited" in str(w.message) for w in caught)


def test_pure_python_can_be_forced_by_the_environment() -> None:
    """VERITAS_RESILIENCE_PURE_PYTHON=1 makes every breaker run in pure Python."""
    code = (
        "from veritas_resilience import CircuitBreaker, circuit_breaker\n"
        "async def f(): pass\n"
        "print(circuit_breaker._speedups is None, type(CircuitBreaker()(f)).__name__)\n"
    )
    env = dict(os.environ, VERITAS_RESILIENCE_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "function"]


def test_a_hook_that_wants_rejections_still_hears_of_each() -> None:
    """With a hook listening for rejections, the compiled path hands them to Python."""
    from veritas_resilience.testing import RecordingHook

    hook = RecordingHook()
    breaker = CircuitBreaker(failure_threshold=1, hooks=[hook])
    breaker.isolate()
    for _ in range(2):
        with pytest.raises(CircuitOpenError):
            lookup_through(breaker).send(None)
    assert [type(e).__name__ for e in hook.events].count("BreakerCallRejected") == 2


def lookup_through(breaker: CircuitBreaker) -> Any:
    return breaker(lookup.__wrapped__)("k")  # type: ignore[attr-defined]
