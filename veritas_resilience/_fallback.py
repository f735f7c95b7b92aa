"""Graceful degradation: ordered fallback chains and a stale-if-error cache.

A :class:`FallbackChain` tries the primary path, then each fallback step in order, and when every
step has failed raises :class:`~veritas_resilience.ServiceUnavailableError` holding each step's
error (chained from an ``ExceptionGroup`` of them, so tracebacks show all of them). This is the
source guide's ``GracefulDegradation.processRequest`` in one line::

    process_request = fallback(degraded_response, cached_response, name="requests")(primary)

Each step may name the errors it handles (every ``Exception`` by default, an open breaker's
:class:`~veritas_resilience.CircuitOpenError` and timeouts among them); a step that does not
handle the error that reached it is skipped. Cancellation, ``KeyboardInterrupt`` and
``SystemExit`` are never handled by any step: they pass through the chain untouched.

A :class:`StaleCache` keeps the primary's last good result per call arguments and serves it,
if it is not older than ``max_staleness``, as the chain's last step. It also coalesces
concurrent calls with the same arguments into one call of the primary. Its values live in a
bounded in-memory store by default, or in Redis
(:class:`~veritas_resilience.RedisStaleStore`) to be shared between processes.

Which step served a result is counted (``veritas_fallback_total{name,step,outcome}``) and can be
read by the caller with :func:`track_fallbacks`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import sys
import threading
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Hashable,
    Iterator,
    Sequence,
)
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

import anyio

from . import _hooks, _validate
from ._cache import MemoryStaleStore, StaleStore, default_key
from ._clock import MONOTONIC, Clock
from ._loop import LoopTracker, is_closed
from ._redis_store import RedisStaleStore
from ._validate import ExceptionMatcher, Seconds
from ._validate import matcher as _matcher
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .circuit_breaker import CircuitBreaker
from .errors import CacheMissError, CircuitOpenError, ServiceUnavailableError
from .events import (
    FallbackExhausted,
    FallbackServed,
    Hook,
    StaleStoreFailed,
    StaleValueServed,
    StaleWritesDropped,
)
from .instrumentation.prometheus import HistogramValue, define_metric
from .limits import Timeout

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

__all__ = [
    "CacheMissError",
    "FallbackChain",
    "FallbackExhausted",
    "FallbackServed",
    "FallbackStep",
    "FallbackTracker",
    "FallbackUse",
    "MemoryStaleStore",
    "RedisStaleStore",
    "StaleCache",
    "StaleStore",
    "StaleStoreFailed",
    "StaleValueServed",
    "StaleWritesDropped",
    "fallback",
    "track_fallbacks",
]

P = ParamSpec("P")
T = TypeVar("T")

_PRIMARY = "primary"
"""The step name of the decorated (primary) function in metrics, events and errors."""

define_metric(
    "veritas_fallback",
    "counter",
    "Steps of a fallback chain by outcome: success (it served the result), failure, or skipped "
    "(it does not handle the error that reached it).",
    ("name", "step", "outcome"),
)
define_metric(
    "veritas_stale_cache",
    "counter",
    "Stale-if-error cache operations by outcome: fresh (served without a call), stored, "
    "coalesced (waited for another caller's call), stale (served after an error), miss, expired, "
    "store_error (a store operation failed or timed out), store_skipped (not tried: the store's "
    "breaker is open), write_dropped (too many writes pending).",
    ("name", "outcome"),
)

_CACHE_OUTCOMES = (
    "fresh",
    "stored",
    "coalesced",
    "stale",
    "miss",
    "expired",
    "store_error",
    "store_skipped",
    "write_dropped",
)

StoreWrites = Literal["background", "await"]


# -- events -------------------------------------------------------------------------------------


# -- provenance ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FallbackUse:
    """One result served by a fallback step, as recorded by :func:`track_fallbacks`.

    Attributes:
        chain: The chain's (or, for a stale cache used as a decorator, the cache's) name.
        step: The step that served the result.
        index: The step's position (1 for the first fallback).
        age: For stale values, their age in seconds; else None.
    """

    chain: str
    step: str
    index: int
    age: float | None = None


@dataclass(slots=True)
class FallbackTracker:
    """What :func:`track_fallbacks` records: every result a fallback step served in its block.

    Attributes:
        uses: The fallback results, in the order they were served (empty when every call was
            served by its primary).
    """

    uses: list[FallbackUse] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        """Whether any result in the block came from a fallback step."""
        return bool(self.uses)

    @property
    def step(self) -> str | None:
        """The step that served the last fallback result, or None if there was none."""
        return self.uses[-1].step if self.uses else None

    @property
    def age(self) -> float | None:
        """The age of the last fallback result if it was a stale value, else None."""
        return self.uses[-1].age if self.uses else None


_tracker: ContextVar[FallbackTracker | None] = ContextVar("veritas_fallback_tracker", default=None)


@contextmanager
def track_fallbacks() -> Generator[FallbackTracker, None, None]:
    """Record which results in the block were served by a fallback step, and by which.

    Results served by their primary cost nothing to track; only fallback results are recorded::

        with track_fallbacks() as served:
            order = await get_order(42)
        if served.degraded:
            response.headers["Warning"] = f'110 - "served by {served.step}"'

    The tracker follows the context: calls in the block and tasks started from it record into
    it. With nested chains, each chain that served from a fallback step adds a use.

    Yields:
        The :class:`FallbackTracker` that fills up during the block.
    """
    tracker = FallbackTracker()
    token = _tracker.set(tracker)
    try:
        yield tracker
    finally:
        _tracker.reset(token)


def _track(chain: str, step: str, index: int, age: float | None) -> None:
    tracker = _tracker.get()
    if tracker is not None:
        tracker.uses.append(FallbackUse(chain, step, index, age))


# -- stale-if-error cache -----------------------------------------------------------------------


class _Flight:
    """One call that concurrent callers with the same key wait for."""

    __slots__ = ("error", "event", "ok", "result", "traceback")

    def __init__(self) -> None:
        self.event: anyio.Event | None = None  # made only when a second caller arrives
        self.ok = False
        self.result: Any = None
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None

    async def wait(self) -> None:
        if self.event is None:
            self.event = anyio.Event()
        await self.event.wait()

    def finish(self) -> None:
        if self.event is not None:
            self.event.set()


class _SingleFlight:
    """Concurrent calls with one key share one call: the first makes it, the others wait.

    Flights belong to the event loop they run in (an ``anyio.Event`` does), so they are kept per
    asyncio loop (per thread under trio), and those of a loop that closed with a call pending are
    dropped, never waited on. A failed call's error reaches each waiter as a copy of its own, so
    that a thousand waiters do not stack a thousand sets of frames on one traceback.
    """

    __slots__ = ("_flights", "_loops", "_owner")

    def __init__(self) -> None:
        self._flights: dict[tuple[Any, Hashable], _Flight] = {}
        self._loops = LoopTracker()
        self._owner: Any = None

    def __len__(self) -> int:
        return len(self._flights)

    async def run(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_wait: Callable[[], object] | None = None,
    ) -> tuple[T, bool]:
        """Return ``fn``'s result and whether this caller made the call (else it waited)."""
        loop = self._loops.current()
        owner = loop if loop is not None else threading.get_ident()
        if owner != self._owner:
            self._owner = owner
            self._forget_closed_loops()
        flights = self._flights
        flight_key = (owner, key)
        flight = flights.get(flight_key)
        while flight is not None:
            if on_wait is not None:
                on_wait()
            await flight.wait()
            if flight.ok:
                return flight.result, False
            if flight.error is not None:
                raise _own_copy(flight.error, flight.traceback)
            # The caller that made the call was cancelled: make it again, maybe as the leader.
            flight = flights.get(flight_key)
        flight = flights[flight_key] = _Flight()
        try:
            result = await fn(*args, **kwargs)
            flight.result, flight.ok = result, True
        except Exception as exc:
            flight.error, flight.traceback = exc, exc.__traceback__
            raise
        finally:
            if flights.get(flight_key) is flight:
                del flights[flight_key]
            flight.finish()
        return result, True

    def _forget_closed_loops(self) -> None:
        flights = self._flights
        for flight_key in [k for k in flights if is_closed(_as_loop(k[0]))]:
            del flights[flight_key]


def _as_loop(owner: Any) -> asyncio.AbstractEventLoop | None:
    return owner if isinstance(owner, asyncio.AbstractEventLoop) else None


def _own_copy(error: Exception, traceback: TracebackType | None) -> Exception:
    """A waiter's own copy of a coalesced call's error, with the call's traceback and causes."""
    try:
        copied = copy.copy(error)
    except Exception:
        copied = None
    if type(copied) is not type(error) or copied is error:
        # Not copyable: share the error, but without the frames other waiters added to it.
        return error.with_traceback(traceback)
    assert copied is not None
    copied.__cause__ = error.__cause__
    copied.__context__ = error.__context__
    copied.__suppress_context__ = error.__suppress_context__
    return copied.with_traceback(traceback)


class StaleCache(_hooks.Instrumented):
    """Remember the last good result of each call, and serve it when the source fails.

    As the last step of a fallback chain it records every result of the chain's primary, keyed by
    the call's arguments, and serves the stored one when the earlier steps have failed, if it is
    not older than ``max_staleness``::

        catalog_cache = StaleCache(name="catalog", max_staleness=600)

        @fallback(catalog_cache)
        async def get_product(product_id: int) -> Product: ...

    Used directly as a decorator it does the same for one function: a failure is answered with
    the stored value, or re-raised when there is none fresh enough.

    Concurrent calls with the same key share one call of the primary (coalescing): a hundred
    requests for a cold key make one query, and all get its result or its error (each caller
    its own copy of the error). Lookups of the store are coalesced the same way, so an outage
    makes one read per key, not one per caller. With ``fresh_for`` set, a stored value younger
    than that is returned without calling at all. Results are shared, not copied (the in-memory
    store keeps them by reference): treat them as read-only.

    A store other than the in-memory one (Redis) is bounded: each operation gets
    ``store_timeout`` seconds and goes through a circuit breaker (``{name}.store``), so a store
    that refuses connections or stops answering costs the call nothing once the breaker is open,
    and at most ``store_timeout`` before. Writes run in the background by default (the call
    returns as soon as the primary has): at most ``max_pending_writes`` at once, further ones are
    dropped, counted (``write_dropped``) and logged. A store failure never fails or delays a
    call that succeeded.

    Args:
        name: Used in events, metric labels and as the store namespace; ``cache-N`` by default.
        max_staleness: The oldest value (seconds > 0) that may be served after an error; values
            are dropped from the store after it.
        fresh_for: Seconds (>= 0, <= max_staleness) during which a stored value is served
            without calling the primary at all; 0 (the default) always calls it.
        max_size: The most values in the default in-memory store (1024 when None); give the
            store its own bound when you pass ``store``.
        key: Maps the call's arguments (``*args, **kwargs``) to a hashable key; by default the
            arguments themselves, which must then be hashable.
        store: Where values live; a bounded :class:`MemoryStaleStore` by default, or a
            :class:`RedisStaleStore` shared by processes.
        coalesce: Whether concurrent calls with one key share one call of the primary.
        on: Which errors of the call make the decorator form serve a stale value (the chain
            form uses its step's ``on``); every ``Exception`` by default.
        clock: Time source for the in-memory store and the store's breaker; ``FakeClock`` in
            tests.
        hooks: Hooks for this cache (and its store's breaker and timeout) only; the
            process-wide defaults when None.
        store_timeout: Seconds (> 0) each operation of a store other than the in-memory one
            may take before it is given up and counted as a store failure.
        store_breaker: The breaker guarding that store; by default one named ``{name}.store``
            that opens after 5 consecutive failures for 10 seconds.
        writes: ``"background"`` (the default) writes results to that store in a background
            task; ``"await"`` writes before returning (still bounded by ``store_timeout``).
        max_pending_writes: The most background writes (>= 1) in flight at once.

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
        TypeError: If ``clock``, ``hooks``, ``store`` or ``store_breaker`` is of the wrong type.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        max_staleness: Seconds = 300.0,
        fresh_for: Seconds = 0.0,
        max_size: int | None = None,
        key: Callable[..., Hashable] | None = None,
        store: StaleStore | None = None,
        coalesce: bool = True,
        on: ExceptionMatcher = Exception,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
        store_timeout: Seconds = 0.5,
        store_breaker: CircuitBreaker | None = None,
        writes: StoreWrites = "background",
        max_pending_writes: int = 1000,
    ) -> None:
        self._name = _validate.name(name, "cache")
        self._auto_named = name is None
        self._max_staleness = _seconds(max_staleness, "max_staleness")
        _validate.clock(clock)
        self._fresh_for = _seconds(fresh_for, "fresh_for", allow_zero=True)
        if self._fresh_for > self._max_staleness:
            raise ValueError(
                f"fresh_for must be <= max_staleness ({self._max_staleness!r}s), "
                f"got {self._fresh_for!r}"
            )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the call's arguments, got {key!r}")
        if store is None:
            store = MemoryStaleStore(1024 if max_size is None else max_size, clock=clock)
        elif max_size is not None:
            raise ValueError("max_size sizes the default in-memory store; bound your store instead")
        elif not isinstance(store, StaleStore):
            raise TypeError(f"store must implement get/set/delete (StaleStore), got {store!r}")
        self._keyfn = key
        self._store = store
        self._memory = store if type(store) is MemoryStaleStore else None
        self._coalesce = bool(coalesce)
        handles = _matcher(on, "on")
        assert handles is not None
        self._handles = handles
        self._calls = _SingleFlight()
        self._reads = _SingleFlight()
        self._n = dict.fromkeys(_CACHE_OUTCOMES, 0)
        store_seconds = _seconds(store_timeout, "store_timeout")
        if writes not in ("background", "await"):
            raise ValueError(f"writes must be 'background' or 'await', got {writes!r}")
        self._background = writes == "background"
        self._max_pending = _positive_int(max_pending_writes, "max_pending_writes")
        self._pending = 0
        self._dropped = 0  # since the last report
        self._dropped_reported_at = -float("inf")
        self._now = clock.monotonic
        # Background writes on asyncio, each with its ticket: [True] while it counts as pending.
        self._tasks: dict[asyncio.Task[None], list[bool]] = {}
        self._loops = LoopTracker()
        hooks = _validate.hooks(hooks)
        self._store_parts: tuple[_hooks.Instrumented, ...] = ()
        if store_breaker is not None and not isinstance(store_breaker, CircuitBreaker):
            raise TypeError(f"store_breaker must be a CircuitBreaker, got {store_breaker!r}")
        self._store_breaker: CircuitBreaker | None = None
        if self._memory is None:
            part_name = f"{self._name}.store"
            timeout = Timeout(store_seconds, name=part_name, hooks=hooks)
            breaker = store_breaker
            if breaker is None:
                breaker = CircuitBreaker(
                    name=part_name, failure_threshold=5, reset_timeout=10, clock=clock, hooks=hooks
                )
                self._store_parts = (timeout, breaker)
            else:
                self._store_parts = (timeout,)
            self._store_breaker = breaker
            self._store_get = breaker(timeout(store.get))
            self._store_set = breaker(timeout(store.set))
            self._store_delete = breaker(timeout(store.delete))
        self._serving_stale = False
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The cache's name."""
        return self._name

    @property
    def max_staleness(self) -> float:
        """The oldest value, in seconds, that may be served."""
        return self._max_staleness

    @property
    def store(self) -> StaleStore:
        """Where the values live."""
        return self._store

    def counts(self) -> dict[str, int]:
        """Operations since creation, by outcome (the labels of ``veritas_stale_cache_total``)."""
        return dict(self._n)

    @property
    def serving_stale(self) -> bool:
        """Whether :meth:`serve_stale` turned on serving stored values without calling."""
        return self._serving_stale

    def serve_stale(self, enabled: bool = True) -> None:
        """Serve stored values without calling the source, to take load off it; or stop.

        While on, a call whose key has a stored value younger than ``max_staleness`` gets that
        value (counted as ``stale``, or ``fresh`` within ``fresh_for``) and the source is not
        called; a key without one still calls the source. An operator's switch, also used by
        the alert-driven recovery (``veritas_resilience.recovery.serve_stale``).

        Args:
            enabled: ``True`` to start serving stored values, ``False`` to call the source again.
        """
        self._serving_stale = bool(enabled)

    def __repr__(self) -> str:
        return f"<StaleCache {self._name!r} max_staleness={self._max_staleness:g}s>"

    def _on_hooks_changed(self) -> None:
        hooks = self._hookset
        self._w_served = hooks.wants(StaleValueServed)
        self._w_store = hooks.wants(StaleStoreFailed)
        self._w_dropped = hooks.wants(StaleWritesDropped)

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if self._keyfn is None:
            return default_key(args, kwargs)
        key = self._keyfn(*args, **kwargs)
        hash(key)  # fail here, before the call, rather than inside the store
        return key

    def _adopt_name(self, name: str) -> None:
        """Take ``name`` if auto-named; the store's breaker and timeout built here follow."""
        if not self._auto_named:
            return
        super()._adopt_name(name)
        for part in self._store_parts:
            part._auto_named = True
            part._adopt_name(f"{name}.store")

    def _store_failed(self, operation: str, error: Exception) -> None:
        breaker = self._store_breaker
        if (
            isinstance(error, CircuitOpenError)
            and breaker is not None
            and error.name == breaker.name
        ):
            # Not tried: the breaker logged the store's outage once when it opened.
            self._n["store_skipped"] += 1
            return
        self._n["store_error"] += 1
        if self._w_store:
            self._emit(StaleStoreFailed(name=self._name, operation=operation, error=error))

    async def _record(self, key: Hashable, value: Any) -> None:
        memory = self._memory
        if memory is not None:
            memory.set_now(self._name, key, value, self._max_staleness)
            self._n["stored"] += 1
        elif self._background:
            self._write_later(key, value)
        else:
            await self._write(key, value)

    async def _write(self, key: Hashable, value: Any) -> None:
        try:
            await self._store_set(self._name, key, value, self._max_staleness)
        except Exception as exc:
            # The call succeeded; failing to remember its result must not turn it into a failure.
            self._store_failed("set", exc)
        else:
            self._n["stored"] += 1

    def _write_later(self, key: Hashable, value: Any) -> None:
        """Write in a background task, unless too many writes are pending already."""
        if self._pending >= self._max_pending:
            self._forget_dead_writes()
        if self._pending >= self._max_pending:
            self._n["write_dropped"] += 1
            self._dropped += 1
            now = self._now()
            if now - self._dropped_reported_at >= 1.0:
                self._dropped_reported_at = now
                if self._w_dropped:
                    self._emit(
                        StaleWritesDropped(
                            name=self._name, dropped=self._dropped, pending=self._pending
                        )
                    )
                self._dropped = 0
            return
        self._pending += 1
        ticket = [True]
        loop = self._loops.current()
        if loop is not None:
            task = loop.create_task(self._background_write(key, value, ticket))
            self._tasks[task] = ticket  # a reference until it ends (asyncio keeps weak ones)
            task.add_done_callback(lambda done: self._tasks.pop(done, None))
        else:
            import trio

            trio.lowlevel.spawn_system_task(self._background_write, key, value, ticket)

    async def _background_write(self, key: Hashable, value: Any, ticket: list[bool]) -> None:
        try:
            await self._write(key, value)
        finally:
            if ticket[0]:
                ticket[0] = False
                self._pending -= 1

    async def _lookup(self, key: Hashable) -> tuple[Any, float] | None:
        """The store's value for ``key`` and its age; concurrent lookups of a key share one."""
        memory = self._memory
        if memory is not None:
            return memory.get_now(self._name, key)
        hit, _ = await self._reads.run(key, self._read_store, (key,), {})
        return hit

    async def _read_store(self, key: Hashable) -> tuple[Any, float] | None:
        try:
            return await self._store_get(self._name, key)
        except Exception as exc:
            self._store_failed("get", exc)  # once per lookup, not once per waiting caller
            raise

    async def _load(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """Call ``fn`` (coalesced with concurrent callers of ``key``) and remember its result."""
        fresh_for = self._max_staleness if self._serving_stale else self._fresh_for
        if fresh_for:
            try:
                hit = await self._lookup(key)
            except Exception:  # counted and reported by _lookup
                hit = None
            if hit is not None and hit[1] <= fresh_for:
                self._n["fresh" if hit[1] <= self._fresh_for else "stale"] += 1
                return hit[0]  # type: ignore[no-any-return]
        if not self._coalesce:
            result = await fn(*args, **kwargs)
            await self._record(key, result)
            return result
        result, led = await self._calls.run(key, fn, args, kwargs, self._count_coalesced)
        if led:
            await self._record(key, result)
        return result

    def _count_coalesced(self) -> None:
        self._n["coalesced"] += 1

    async def _stale(self, key: Hashable) -> tuple[Any, float]:
        """The stored value for ``key`` and its age, or CacheMissError (or the store's error)."""
        hit = await self._lookup(key)
        if hit is None:
            self._n["miss"] += 1
            raise CacheMissError(self._name, "missing")
        value, age = hit
        if age > self._max_staleness:
            self._n["expired"] += 1
            raise CacheMissError(self._name, "expired", age)
        self._n["stale"] += 1
        return value, age

    @property
    def pending_writes(self) -> int:
        """Background writes to the store not finished yet."""
        return self._pending

    async def wait_for_writes(self) -> None:
        """Wait until the background writes started so far have ended (written or failed).

        Each is bounded by ``store_timeout``; call it before shutting down to keep the last
        results, or in tests before reading what was written.
        """
        # Polled: the writes are tasks of their own, asyncio or trio, and an Event would be
        # bound to one loop.
        while self._pending:
            self._forget_dead_writes()
            if self._pending:
                await anyio.sleep(0.001)

    def _forget_dead_writes(self) -> None:
        """Stop counting the writes of an asyncio loop that closed: they will never end."""
        for task in [task for task in self._tasks if task.get_loop().is_closed()]:
            ticket = self._tasks.pop(task)
            if ticket[0]:
                ticket[0] = False
                self._pending -= 1

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Forget the value stored for a call with these arguments.

        Raises:
            Exception: The store's error (or ``ResilienceTimeoutError``, ``CircuitOpenError``)
                when it could not be deleted: a value that may still be served is not hidden.
        """
        key = self._key(args, kwargs)
        if self._memory is not None:
            await self._memory.delete(self._name, key)
        else:
            await self._store_delete(self._name, key)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function: remember its results, serve them when it fails."""
        _validate.require_async(fn, "StaleCache")
        cache = self

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            key = cache._key(args, kwargs)
            try:
                return await cache._load(key, fn, args, kwargs)
            except Exception as exc:
                if not cache._handles(exc):
                    raise
                error = exc
            hit: tuple[Any, float] | None = None
            try:
                hit = await cache._stale(key)
            except Exception:  # a miss, or the store failed (counted and reported by _stale)
                pass
            if hit is None:
                # Raised here, outside any except block, so no miss is chained to the error.
                raise error
            value, age = hit
            _track(cache._name, "stale", 1, age)
            if cache._w_served:
                cache._emit(StaleValueServed(name=cache._name, age=age, error=error))
            return value  # type: ignore[no-any-return]

        wrapper.stale_cache = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        for outcome, count in self._n.items():
            yield "veritas_stale_cache", (self._name, outcome), float(count)


# -- fallback chains ----------------------------------------------------------------------------


class FallbackStep:
    """One alternative in a fallback chain: what to call, which errors it handles, its name.

    Plain functions and :class:`StaleCache` objects given to a chain become steps with the
    chain's defaults; wrap one in ``FallbackStep`` to set its own::

        FallbackChain(
            FallbackStep(read_replica, on=(ConnectionError, CircuitOpenError)),
            FallbackStep(lambda *a, **kw: DEFAULT_MENU, name="static_menu"),
        )

    Args:
        fn: Called with the call's arguments: an async function, a plain function (which should
            not block: a constant or a computation), or a :class:`StaleCache`.
        on: The errors this step handles (types or a predicate); when the error that reached
            the step does not match, the step is skipped. Every ``Exception`` by default.
        name: The step's label in metrics, events and errors; the function's (or cache's) name
            by default.
    """

    __slots__ = ("_cache", "_call", "_fn", "_handles", "_is_async", "_name", "_named_by_cache")

    def __init__(
        self,
        fn: Callable[..., Any] | StaleCache,
        *,
        on: ExceptionMatcher = Exception,
        name: str | None = None,
    ) -> None:
        self._cache = fn if isinstance(fn, StaleCache) else None
        if self._cache is None and not callable(fn):
            raise TypeError(f"a fallback step must be callable or a StaleCache, got {fn!r}")
        self._fn = fn
        self._call: Callable[..., Any] = fn
        self._is_async = self._cache is None and inspect.iscoroutinefunction(fn)
        handles = _matcher(on, "on")
        assert handles is not None
        self._handles = handles
        self._named_by_cache = name is None and self._cache is not None
        if name is None:
            name = fn.name if isinstance(fn, StaleCache) else getattr(fn, "__name__", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r} (for step {fn!r})")
        self._name = name

    @property
    def name(self) -> str:
        """The step's name."""
        return self._name

    @property
    def fn(self) -> Callable[..., Any] | StaleCache:
        """What the step calls."""
        return self._fn

    def handles(self, error: BaseException) -> bool:
        """Whether this step runs after ``error`` (never for cancellation or other exits)."""
        return isinstance(error, Exception) and self._handles(error)

    def __repr__(self) -> str:
        return f"FallbackStep({self._name!r})"


class FallbackChain(_hooks.Instrumented):
    """An ordered chain of alternatives to a primary function.

    Decorate the primary with the chain (or with :func:`fallback`, the same thing), or call
    ``await chain.call(primary, ...)``::

        @FallbackChain(degraded_response, cached_response, name="requests")
        async def process_request(request: Request) -> Response: ...

    The primary runs first. When it raises an ``Exception``, each step runs in order, with the
    same arguments, until one returns; a step whose ``on`` does not match the error that reached
    it (the previous step's) is skipped. When a step returns, its value is the result, counted
    as ``veritas_fallback_total{step=...,outcome="success"}`` and visible through
    :func:`track_fallbacks`. When every step that ran has failed,
    :class:`~veritas_resilience.ServiceUnavailableError` is raised with every error; when no
    step handles the primary's error at all, that error is raised unchanged.

    A :class:`StaleCache` step (at most one) also records every result of the primary and
    coalesces concurrent calls of the primary with equal arguments.

    Args:
        *steps: The fallbacks in order: functions, :class:`StaleCache` objects, or
            :class:`FallbackStep` objects.
        name: Used in errors, events and metric labels; ``fallback-N`` by default.
        on: The errors handled by steps that are not :class:`FallbackStep` objects with their
            own; every ``Exception`` by default.
        hooks: Hooks for this chain only; the process-wide defaults when None.

    Raises:
        ValueError: With no steps, two steps of one name, or two stale caches.
    """

    def __init__(
        self,
        *steps: Callable[..., Any] | StaleCache | FallbackStep,
        name: str | None = None,
        on: ExceptionMatcher = Exception,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        if not steps:
            raise ValueError("steps: a fallback chain needs at least one fallback step")
        self._name = _validate.name(name, "fallback")
        self._auto_named = name is None
        built = tuple(s if isinstance(s, FallbackStep) else FallbackStep(s, on=on) for s in steps)
        names = [_PRIMARY, *(s.name for s in built)]
        for step_name in names:
            if names.count(step_name) > 1:
                raise ValueError(
                    f"steps: two steps are named {step_name!r} ({_PRIMARY!r} is the decorated "
                    "function); name them with FallbackStep(fn, name=...)"
                )
        caches = [s._cache for s in built if s._cache is not None]
        if len(caches) > 1:
            raise ValueError("steps: a chain can hold at most one StaleCache")
        self._steps = built
        self._step_names = tuple(names)
        self._cache = caches[0] if caches else None
        n = len(names)
        self._ok = [0] * n
        self._failed = [0] * n
        self._skipped = [0] * n
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The chain's name."""
        return self._name

    def _adopt_name(self, name: str) -> None:
        """Take ``name`` if auto-named, and give it to an auto-named stale cache step too."""
        super()._adopt_name(name)
        cache = self._cache
        if cache is None or not cache._auto_named:
            return
        cache._adopt_name(name)
        names = list(self._step_names)
        for index, step in enumerate(self._steps, 1):
            if step._named_by_cache and name not in names:
                step._name = names[index] = name
        self._step_names = tuple(names)

    @property
    def steps(self) -> tuple[FallbackStep, ...]:
        """The fallback steps, in order (without the primary)."""
        return self._steps

    @property
    def step_names(self) -> tuple[str, ...]:
        """Every step's name in order, ``"primary"`` first."""
        return self._step_names

    def counts(self) -> dict[str, dict[str, int]]:
        """Per step name: how often it served, failed and was skipped since creation."""
        return {
            step: {"success": ok, "failure": failed, "skipped": skipped}
            for step, ok, failed, skipped in zip(
                self._step_names, self._ok, self._failed, self._skipped
            )
        }

    def __repr__(self) -> str:
        return f"<FallbackChain {self._name!r} {' -> '.join(self._step_names)}>"

    def _on_hooks_changed(self) -> None:
        hooks = self._hookset
        self._w_served = hooks.wants(FallbackServed)
        self._w_exhausted = hooks.wants(FallbackExhausted)

    async def _fall_back(
        self,
        primary_error: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Hashable | None,
    ) -> Any:
        """The primary failed: run the steps that handle the errors, in order."""
        self._failed[0] += 1
        errors: list[Exception] = [primary_error]
        ran = [_PRIMARY]
        error: Exception = primary_error
        for index, step in enumerate(self._steps, 1):
            if not step._handles(error):
                self._skipped[index] += 1
                continue
            age: float | None = None
            try:
                cache = step._cache
                if cache is not None:
                    value, age = await cache._stale(
                        cache._key(args, kwargs) if key is None else key
                    )
                else:
                    value = step._call(*args, **kwargs)
                    if step._is_async or inspect.isawaitable(value):
                        value = await value
            except Exception as exc:
                self._failed[index] += 1
                errors.append(exc)
                ran.append(step._name)
                error = exc
                continue
            self._ok[index] += 1
            _track(self._name, step._name, index, age)
            if self._w_served:
                self._emit(
                    FallbackServed(
                        name=self._name, step=step._name, index=index, error=error, age=age
                    )
                )
            return value
        if len(errors) == 1:
            # No step handles this kind of error: it is not a failure the chain is for.
            raise primary_error
        if self._w_exhausted:
            self._emit(FallbackExhausted(name=self._name, steps=tuple(ran), errors=tuple(errors)))
        raise ServiceUnavailableError(self._name, ran, errors) from ExceptionGroup(
            f"every step of fallback chain {self._name!r} failed", errors
        )

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` as the primary, falling back through the steps when it fails.

        Raises:
            ServiceUnavailableError: If every step that ran failed.
        """
        cache = self._cache
        key = None if cache is None else cache._key(args, kwargs)
        try:
            if cache is None:
                result = await fn(*args, **kwargs)
            else:
                result = await cache._load(key, fn, args, kwargs)
        except Exception as exc:
            return await self._fall_back(exc, args, kwargs, key)  # type: ignore[no-any-return]
        self._ok[0] += 1
        return result

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` primary function with the chain."""
        _validate.require_async(fn, "FallbackChain")
        ok = self._ok
        fall_back = self._fall_back
        cache = self._cache

        if cache is None:

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                try:
                    result = await fn(*args, **kwargs)
                except Exception as exc:
                    return await fall_back(exc, args, kwargs, None)  # type: ignore[no-any-return]
                ok[0] += 1
                return result

        else:
            load, make_key = cache._load, cache._key

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                key = make_key(args, kwargs)
                try:
                    result = await load(key, fn, args, kwargs)
                except Exception as exc:
                    return await fall_back(exc, args, kwargs, key)  # type: ignore[no-any-return]
                ok[0] += 1
                return result

        wrapper.fallback = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for step, ok, failed, skipped in zip(
            self._step_names, self._ok, self._failed, self._skipped
        ):
            yield "veritas_fallback", (name, step, "success"), float(ok)
            yield "veritas_fallback", (name, step, "failure"), float(failed)
            yield "veritas_fallback", (name, step, "skipped"), float(skipped)


def fallback(
    *steps: Callable[..., Any] | StaleCache | FallbackStep,
    name: str | None = None,
    on: ExceptionMatcher = Exception,
    hooks: Sequence[Hook] | None = None,
) -> FallbackChain:
    """Decorate a primary function with an ordered chain of fallbacks.

    ``@fallback(degraded, cached)`` is ``@FallbackChain(degraded, cached)``; see
    :class:`FallbackChain` for the arguments::

        stale = StaleCache(name="orders", max_staleness=300)

        @fallback(orders_from_replica, stale, name="get_order")
        async def get_order(order_id: int) -> Order: ...

    Returns:
        The chain, which decorates the primary.
    """
    return FallbackChain(*steps, name=name, on=on, hooks=hooks)
