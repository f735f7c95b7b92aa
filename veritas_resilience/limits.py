"""Timeouts and bulkheads: bound how long a call may take, and how many may run at once.

:class:`Timeout` gives up on a call after a fixed number of seconds and raises
:class:`~veritas_resilience.ResilienceTimeoutError`, which is also a built-in ``TimeoutError``. It
converts only its *own* expiry: when an outer cancel scope, an ``asyncio`` task cancel or
``fail_after`` cancels the call, the cancellation passes through untouched.

:class:`Bulkhead` lets at most ``max_concurrent`` calls run at once, keeps up to ``max_queue``
more waiting for a slot, and rejects the rest at once with
:class:`~veritas_resilience.BulkheadFullError`.

Both give back what they hold (a deadline, a slot) when the call is cancelled, and both work under
asyncio and trio. A timeout is an anyio cancel scope (``move_on_after``) around the call; on
asyncio with the real clock, the default engine gets the same outcomes from one shared loop timer
per policy, for a tenth of the cost (the tests run on both engines). Given a
:class:`~veritas_resilience.testing.FakeClock`, deadlines follow that clock, so tests need no
real waiting.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
)

import anyio

from . import _hooks, _validate
from ._clock import Clock, MonotonicClock
from ._loop import LoopTracker, is_closed
from ._validate import Seconds
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .errors import BulkheadFullError, ResilienceTimeoutError
from .events import BulkheadRejected, Hook, TimeoutExpired
from .instrumentation.prometheus import HistogramValue, define_metric

if TYPE_CHECKING:
    import trio

__all__ = ["Bulkhead", "BulkheadRejected", "SchedulingClock", "Timeout", "TimeoutExpired"]

P = ParamSpec("P")
T = TypeVar("T")

define_metric(
    "veritas_timeout", "counter", "Calls given up by a timeout policy when it expired.", ("name",)
)
define_metric(
    "veritas_bulkhead_rejected",
    "counter",
    "Calls a bulkhead rejected because its slots and wait queue were full (or the wait timed out).",
    ("name",),
)
define_metric(
    "veritas_bulkhead_in_use", "gauge", "Slots of a bulkhead taken by running calls.", ("name",)
)


# -- timeout ------------------------------------------------------------------------------------

_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
_current_task = asyncio.current_task
_CancelledError = asyncio.CancelledError
_trio: types.ModuleType | None = None

if sys.version_info >= (3, 11):
    _cancelling = asyncio.Task.cancelling
    _uncancel = asyncio.Task.uncancel
else:  # pragma: no cover - Python 3.10 has no cancel counting; every expiry is ours

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return 0


# A call under a timeout on asyncio is a list, cheaper to make than an object: [deadline, task,
# the task's cancel count on entry, state, the task's innermost anyio cancel scope on entry, how
# many times our expiry cancelled the task].
_AT, _TASK, _CANCELLING, _STATE, _OUTER, _CANCELS = 0, 1, 2, 3, 4, 5
_ACTIVE, _DONE, _EXPIRED, _ENDED = 0, 1, 2, 3
_Entry: TypeAlias = "list[Any]"

# anyio's cancel scopes on asyncio, read to honour shielded scopes inside a call (anyio's own
# semantics). Private to anyio: when its layout changes, shields are simply not seen.
try:
    from anyio._backends._asyncio import _task_states as _anyio_task_states

    _anyio_states: dict[Any, Any] = _anyio_task_states.data  # type: ignore[attr-defined]
    _anyio_state_of: Callable[[Any], Any] = _anyio_task_states.get
except (ImportError, AttributeError):  # pragma: no cover
    _anyio_states = {}

    def _anyio_state_of(task: Any) -> Any:
        return None


_last_anyio_state: tuple[Any, Any] = (None, None)  # (task, its anyio TaskState): a one-slot cache


def _anyio_scope(task: asyncio.Task[Any]) -> Any:
    """The innermost anyio cancel scope ``task`` is in, or None (cheap when anyio is unused)."""
    global _last_anyio_state
    if not _anyio_states:
        return None
    last_task, state = _last_anyio_state
    if last_task is not task:
        state = _anyio_state_of(task)
        if state is None:
            return None
        _last_anyio_state = (task, state)
    return getattr(state, "cancel_scope", None)


def _shielded(task: asyncio.Task[Any], outer: Any) -> bool:
    """Whether ``task`` is in a shielded anyio scope entered inside the call (below ``outer``)."""
    scope = _anyio_scope(task)
    while scope is not None and scope is not outer:
        if getattr(scope, "_shield", False):
            return True
        scope = getattr(scope, "_parent_scope", None)
    return False


class _LoopDeadlines:
    """The deadlines of one :class:`Timeout` on one asyncio loop, served by a single timer.

    ``asyncio.timeout`` and anyio's ``fail_after`` schedule and cancel a timer handle per call,
    which costs several microseconds. All calls under one policy share one duration, so their
    deadlines arrive in the order the calls started: a FIFO queue is also a deadline-ordered
    queue. One timer waits for the head; a call that ends only marks its entry, and finished
    entries are dropped from the head (or, if a slow call holds the head, by compaction).

    The hot path (adding an entry and finishing it) is inlined in :class:`Timeout`'s wrapper.
    """

    __slots__ = ("active", "entries", "handle", "loop", "now", "policy")

    def __init__(self, policy: Timeout, loop: asyncio.AbstractEventLoop) -> None:
        self.policy = policy
        self.loop = loop
        # The default loops read time.monotonic(); calling it directly saves a method frame.
        is_default = getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time
        self.now: Callable[[], float] = time.monotonic if is_default else loop.time
        self.entries: deque[_Entry] = deque()
        self.handle: asyncio.TimerHandle | None = None
        self.active = 0

    def schedule(self) -> None:
        """Start the timer for the head entry (called when no timer is pending)."""
        self.handle = self.loop.call_at(self.entries[0][_AT], self.fire)

    def finish(self, entry: _Entry) -> bool:
        """Mark ``entry`` ended; return whether it had expired (its task was cancelled by us)."""
        if entry[_STATE] == _EXPIRED:
            return True
        entry[_STATE] = _DONE
        self.active -= 1
        self.prune()
        return False

    def prune(self) -> None:
        """Drop finished entries from the head; compact when a slow call holds the head."""
        entries = self.entries
        while entries and entries[0][_STATE]:
            entries.popleft()
        if len(entries) > 2 * self.active + 64:
            self.entries = deque(e for e in entries if not e[_STATE])

    def fire(self) -> None:
        self.handle = None
        now = self.now()
        entries = self.entries
        expired = 0
        while entries:
            entry = entries[0]
            if entry[_STATE]:
                entries.popleft()
            elif entry[_AT] <= now:
                entries.popleft()
                entry[_STATE] = _EXPIRED
                self.active -= 1
                expired += 1
                self.deliver(entry)
            else:
                self.handle = self.loop.call_at(entry[_AT], self.fire)
                break
        if expired:
            self.policy._record_expired(expired)

    def deliver(self, entry: _Entry) -> None:
        """Cancel an expired call's task again whenever it waits, until the call ends.

        This is anyio's level-triggered cancellation (a cancelled scope cancels every await
        inside it, not just the one it interrupted), so a call that catches the cancellation
        and awaits again is cancelled again, as under ``engine="anyio"`` and on trio. As in
        anyio, a task waiting in a shielded anyio scope entered inside the call is left alone
        until it leaves that scope. Only expired calls pay for this.
        """
        if entry[_STATE] != _EXPIRED:
            return
        task: asyncio.Task[Any] = entry[_TASK]
        if task.done():
            return
        waiter = getattr(task, "_fut_waiter", None)
        if (
            not (isinstance(waiter, asyncio.Future) and waiter.done())
            and not getattr(task, "_must_cancel", False)
            and not _shielded(task, entry[_OUTER])
        ):
            # As anyio does: cancel unless the task is about to wake with a result anyway.
            task.cancel(f"veritas timeout {self.policy.name!r} expired")
            entry[_CANCELS] += 1
        elif isinstance(waiter, asyncio.Future) and not waiter.done():
            # Shielded while waiting: look again once that wait ends (after the task's step).
            waiter.add_done_callback(lambda _: self.loop.call_soon(self.deliver, entry))
            return
        self.loop.call_soon(self.deliver, entry)


def _end_expired(task: asyncio.Task[Any], entry: _Entry) -> int:
    """An expired call ended: stop re-cancelling, withdraw our cancel requests, return the rest."""
    entry[_STATE] = _ENDED
    left = _cancelling(task)
    for _ in range(entry[_CANCELS]):
        left = _uncancel(task)
    return left


def _trio_scope(seconds: float) -> trio.CancelScope:
    """A trio cancel scope whose deadline is ``seconds`` from now (trio imported on first use)."""
    global _trio
    if _trio is None:
        import trio as _trio_mod

        _trio = _trio_mod
    return _trio.CancelScope(deadline=_trio.current_time() + seconds)  # type: ignore[no-any-return]


class _Timer(Protocol):
    def cancel(self) -> None: ...


class SchedulingClock(Protocol):
    """A clock that can run a callback at a given time, as :class:`Timeout` needs one to.

    :class:`veritas_resilience.testing.FakeClock` is one.
    """

    def monotonic(self) -> float:
        """Return the current time in seconds."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer:
        """Run ``callback()`` once the clock reaches ``when``; the result's cancel() stops it."""
        ...


TimeoutEngine: TypeAlias = Literal["auto", "anyio"]


class Timeout(_hooks.Instrumented):
    """Give up on a call that takes longer than ``seconds``.

    Use it as a decorator or as ``await timeout.call(fn, ...)``::

        @Timeout(2.0, name="orders-db")
        async def load_order(order_id: int) -> Order: ...

        try:
            order = await load_order(42)
        except TimeoutError:  # a ResilienceTimeoutError
            ...

    The call is cancelled when the time is up, and the cancellation is turned into
    :class:`~veritas_resilience.ResilienceTimeoutError` only if this policy caused it; any other
    cancellation (an outer scope, a cancelled task) propagates unchanged, so a breaker or a
    fallback around the timeout sees a timeout as a failure and a cancellation as neither.

    Engines: ``"anyio"`` runs each call in ``anyio.move_on_after(seconds)`` (anyio's level
    cancellation, on any backend). ``"auto"``, the default, does the same on trio (a native
    ``trio.CancelScope``, which is what anyio uses there) and on asyncio shares one loop timer
    per policy among its calls, and cancels an expired call's task as anyio cancels a scope:
    again at each await until the call ends, but not inside a shielded anyio scope the call
    entered itself. That costs under a microsecond per call instead of about 9 µs for
    ``anyio.fail_after`` (see ``benchmarks/RESULTS.md``). The outcomes are the same; the tests
    run every case on both engines.

    Deadlines follow the event loop's clock, or ``clock`` when one is given: with a
    :class:`~veritas_resilience.testing.FakeClock` a call expires when the test advances the
    clock past its deadline (an anyio cancel scope cancelled from the clock's timer).

    Args:
        seconds: The limit (> 0), a float or a ``timedelta``.
        name: Used in errors, events and metric labels; ``timeout-N`` by default.
        engine: ``"auto"`` or ``"anyio"``, as above.
        clock: A clock with ``monotonic()`` and ``call_at(when, callback)`` (a
            :class:`SchedulingClock`, such as ``FakeClock``); the event loop's clock when None.
        hooks: Hooks for this policy only; the process-wide defaults when None.

    Raises:
        ValueError: If ``seconds`` is not a finite number > 0, ``name`` is empty or ``engine``
            is not one of the two.
        TypeError: If ``clock`` cannot schedule a callback.
    """

    def __init__(
        self,
        seconds: Seconds,
        *,
        name: str | None = None,
        engine: TimeoutEngine = "auto",
        clock: SchedulingClock | Clock | None = None,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self._seconds = _seconds(seconds, "seconds")
        self._name = _validate.name(name, "timeout")
        self._auto_named = name is None
        if engine not in ("auto", "anyio"):
            raise ValueError(f"engine must be 'auto' or 'anyio', got {engine!r}")
        self._clock: SchedulingClock | None = None
        if clock is not None and not isinstance(clock, MonotonicClock):  # else the loop's clock
            if not (
                callable(getattr(clock, "call_at", None))
                and callable(getattr(clock, "monotonic", None))
            ):
                raise TypeError(
                    "clock must provide monotonic() and call_at(when, callback), as "
                    f"veritas_resilience.testing.FakeClock does; got {clock!r}"
                )
            self._clock = cast(SchedulingClock, clock)
        self._engine: TimeoutEngine = engine
        # Calls go through the scoped path (an anyio cancel scope) unless the shared asyncio
        # timer / native trio scope of the default engine applies.
        self._scoped = engine == "anyio" or self._clock is not None
        self._n_expired = 0
        # (thread id, loop, deadlines) of the last loop used. A tuple is replaced atomically, so
        # threads running their own loops cannot mix them up.
        self._cache: tuple[int, Any, Any] = (0, None, None)
        self._per_loop: dict[asyncio.AbstractEventLoop, _LoopDeadlines] = {}
        self._lock = threading.Lock()
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The policy's name."""
        return self._name

    @property
    def seconds(self) -> float:
        """The limit, in seconds."""
        return self._seconds

    @property
    def expired(self) -> int:
        """How many calls this policy has given up on."""
        return self._n_expired

    @property
    def engine(self) -> TimeoutEngine:
        """``"auto"`` or ``"anyio"`` (see the class docs)."""
        return self._engine

    def __repr__(self) -> str:
        return f"<Timeout {self._name!r} {self._seconds:g}s engine={self._engine}>"

    def _on_hooks_changed(self) -> None:
        self._w_expired = self._hookset.wants(TimeoutExpired)

    async def _call_scoped(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        """The call in an anyio cancel scope with our deadline (on the loop's or our clock)."""
        clock = self._clock
        if clock is None:
            with anyio.move_on_after(self._seconds):
                return await fn(*args, **kwargs)
        else:
            scope = anyio.CancelScope()
            timer = clock.call_at(clock.monotonic() + self._seconds, scope.cancel)
            try:
                with scope:
                    return await fn(*args, **kwargs)
            finally:
                timer.cancel()
        # Reached only when the scope caught its own cancellation (anyio never lets an inner
        # scope swallow an outer one): our deadline expired.
        self._record_expired()
        raise self._timeout_error()

    def _deadlines(self, loop: asyncio.AbstractEventLoop) -> _LoopDeadlines:
        with self._lock:
            deadlines = self._per_loop.get(loop)
            if deadlines is None:
                # Forget loops that have been closed (each asyncio.run() makes a new one).
                for old in [lp for lp in self._per_loop if lp.is_closed()]:
                    del self._per_loop[old]
                deadlines = self._per_loop[loop] = _LoopDeadlines(self, loop)
        self._cache = (_get_ident(), loop, deadlines)
        return deadlines

    def _record_expired(self, count: int = 1) -> None:
        self._n_expired += count
        if self._w_expired:
            for _ in range(count):
                self._emit(TimeoutExpired(name=self._name, timeout=self._seconds))

    def _timeout_error(self) -> ResilienceTimeoutError:
        return ResilienceTimeoutError(self._name, self._seconds)

    async def _call_other(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        """Outside asyncio (trio): a native cancel scope with our deadline."""
        with _trio_scope(self._seconds):
            return await fn(*args, **kwargs)
        # Reached only when the scope swallowed its own cancellation: our deadline expired. An
        # outer cancellation is never swallowed by an inner scope in trio.
        self._record_expired()
        raise self._timeout_error()

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` under the timeout.

        Raises:
            ResilienceTimeoutError: If the call did not finish within ``seconds``.
        """
        # Keep in step with the wrapper built in __call__, which inlines the same code.
        if self._scoped:
            return await self._call_scoped(fn, args, kwargs)
        loop = _get_running_loop()
        if loop is None:
            return await self._call_other(fn, args, kwargs)
        thread, cached_loop, deadlines = self._cache
        if cached_loop is not loop or thread != _get_ident():
            deadlines = self._deadlines(loop)
        task = _current_task(loop)
        if task is None:
            raise RuntimeError("a Timeout must be awaited inside an asyncio task")
        entry = [
            deadlines.now() + self._seconds,
            task,
            _cancelling(task),
            _ACTIVE,
            _anyio_scope(task),
            0,
        ]
        deadlines.entries.append(entry)
        deadlines.active += 1
        if deadlines.handle is None:
            deadlines.schedule()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            if deadlines.finish(entry):
                self._expired_with(task, entry, exc)
            raise
        if entry[_STATE]:
            _end_expired(task, entry)  # the call swallowed our cancellation and returned anyway
        else:
            entry[_STATE] = _DONE
            deadlines.active -= 1
            deadlines.prune()
        return result

    def _expired_with(self, task: asyncio.Task[Any], entry: _Entry, exc: BaseException) -> None:
        """Our deadline cancelled ``task`` and the call ended with ``exc``: convert it if ours.

        As in ``asyncio.timeout``: only when no other cancellation was requested meanwhile (the
        task's cancel count is back to what it was on entry) is the CancelledError ours.
        """
        ours = _end_expired(task, entry) <= entry[_CANCELLING] and entry[_CANCELS] > 0
        if ours and isinstance(exc, _CancelledError):
            raise self._timeout_error() from None

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function so every call runs under the timeout."""
        _validate.require_async(fn, "Timeout")
        policy = self
        seconds = self._seconds
        call = self.call
        expired_with = self._expired_with
        if self._scoped:
            scoped = self._call_scoped

            @functools.wraps(fn)
            async def scoped_wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                return await scoped(fn, args, kwargs)

            scoped_wrapper.timeout = self  # type: ignore[attr-defined]
            return scoped_wrapper

        # The body of call(), inlined: one coroutine frame less.
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            # The task, found from the loop this thread used last: asyncio._get_running_loop()
            # makes a getpid() system call on every use. Only one loop runs in a thread at a
            # time, so if that loop has a current task, it is ours. Anything else (first call,
            # a new loop, trio) goes through call(), which finds the loop and caches it.
            thread, loop, deadlines = policy._cache
            task = _current_task(loop) if thread == _get_ident() else None
            if task is None:
                return await call(fn, *args, **kwargs)
            known = _last_anyio_state  # _anyio_scope(task), inlined for the usual case
            entry = [
                deadlines.now() + seconds,
                task,
                _cancelling(task),
                _ACTIVE,
                known[1].cancel_scope if known[0] is task else _anyio_scope(task),
                0,
            ]
            deadlines.entries.append(entry)
            deadlines.active += 1
            if deadlines.handle is None:
                deadlines.schedule()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                if deadlines.finish(entry):
                    expired_with(task, entry, exc)
                raise
            if entry[_STATE]:
                _end_expired(task, entry)
            else:
                entry[_STATE] = _DONE
                deadlines.active -= 1
                entries = deadlines.entries
                if entries[0] is entry and (len(entries) == 1 or not entries[1][_STATE]):
                    entries.popleft()  # the usual case, without a method call
                else:
                    deadlines.prune()
            return result

        wrapper.timeout = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield "veritas_timeout", (self._name,), float(self._n_expired)


# -- bulkhead -----------------------------------------------------------------------------------


class Bulkhead(_hooks.Instrumented):
    """Let at most ``max_concurrent`` calls run at once; queue a few more, reject the rest fast.

    A dependency that slows down makes calls pile up; a bulkhead caps how many of your tasks it
    can hold, so the rest of the service keeps its connections, memory and workers::

        reports = Bulkhead(10, max_queue=20, queue_timeout=1.0, name="reports-api")

        @reports
        async def render(report_id: int) -> bytes: ...

    A call takes a free slot at once if there is one. Otherwise it waits in a FIFO queue of at
    most ``max_queue`` calls, for at most ``queue_timeout`` seconds; when the queue is full or the
    wait times out it raises :class:`~veritas_resilience.BulkheadFullError`. A slot is given back
    when the call ends in any way, cancellation included, and a queued call that is cancelled
    leaves the queue (or passes on the slot it was just handed).

    A bulkhead serves one event loop at a time (asyncio or trio); its counters are not locked.
    Used by several loops in turn, it notices when the loop its queue or its full slots belong to
    has closed with calls pending, and drops that dead state instead of waiting on it.

    Args:
        max_concurrent: Calls (>= 1) allowed to run at once.
        max_queue: Calls (>= 0) allowed to wait for a slot; 0 rejects at once when full.
        queue_timeout: Seconds (> 0) a queued call waits before it is rejected; None waits until
            a slot frees up or the caller is cancelled. Measured on the event loop's clock.
        name: Used in errors, events and metric labels; ``bulkhead-N`` by default.
        hooks: Hooks for this bulkhead only; the process-wide defaults when None.

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queue: int = 0,
        queue_timeout: Seconds | None = None,
        name: str | None = None,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self._max = _positive_int(max_concurrent, "max_concurrent")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int):
            raise TypeError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue!r}")
        self._max_queue = max_queue
        self._queue_timeout = (
            None if queue_timeout is None else _seconds(queue_timeout, "queue_timeout")
        )
        self._name = _validate.name(name, "bulkhead")
        self._auto_named = name is None
        self._in_use = 0
        self._waiters: deque[anyio.Event] = deque()
        self._n_rejected = 0
        # The asyncio loop that last filled the bulkhead or queued on it (None: none, or trio).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loops = LoopTracker()
        self._epoch = 0  # bumped when a closed loop's slots are dropped; their release is void
        self._init_hooks(hooks)

    @property
    def name(self) -> str:
        """The bulkhead's name."""
        return self._name

    @property
    def max_concurrent(self) -> int:
        """The concurrency limit."""
        return self._max

    @property
    def in_use(self) -> int:
        """Slots taken by running calls now."""
        return self._in_use

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._waiters)

    @property
    def rejected(self) -> int:
        """Calls rejected since creation."""
        return self._n_rejected

    def __repr__(self) -> str:
        return (
            f"<Bulkhead {self._name!r} {self._in_use}/{self._max} in use, "
            f"{len(self._waiters)}/{self._max_queue} queued>"
        )

    def _on_hooks_changed(self) -> None:
        self._w_rejected = self._hookset.wants(BulkheadRejected)

    def _reject(self) -> BulkheadFullError:
        self._n_rejected += 1
        if self._w_rejected:
            self._emit(
                BulkheadRejected(
                    name=self._name, max_concurrent=self._max, queued=len(self._waiters)
                )
            )
        return BulkheadFullError(self._name, self._max)

    def _note_full(self) -> None:
        """The bulkhead just filled up: remember in which loop (cheap; only when it fills)."""
        self._loop = self._loops.current()

    async def _wait_for_slot(self) -> None:
        """Queue for a slot; return owning one, or raise BulkheadFullError."""
        loop = self._loops.current()
        if loop is not self._loop:
            if is_closed(self._loop):
                # The loop that filled the bulkhead or queued on it closed with those calls
                # pending: they will never give their slots back nor take them.
                self._in_use = 0
                self._waiters.clear()
                self._epoch += 1
            self._loop = loop
        if self._in_use < self._max and not self._waiters:
            self._in_use += 1
            return
        if len(self._waiters) >= self._max_queue:
            raise self._reject()
        epoch = self._epoch
        waiter = anyio.Event()
        self._waiters.append(waiter)
        try:
            if self._queue_timeout is None:
                await waiter.wait()
            else:
                with anyio.move_on_after(self._queue_timeout):
                    await waiter.wait()
        except BaseException:
            # Cancelled while queued. If a releaser handed us its slot in the meantime, pass it
            # on; otherwise just leave the queue.
            if waiter.is_set():
                self._release(epoch)
            else:
                self._leave(waiter)
            raise
        if not waiter.is_set():
            self._leave(waiter)
            raise self._reject()
        # The releaser kept _in_use as it was: its slot is now ours.

    def _leave(self, waiter: anyio.Event) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:  # dropped with the state of a closed loop
            pass

    def _release(self, epoch: int) -> None:
        if epoch != self._epoch:
            return  # a slot of a closed loop's call, already dropped
        waiters = self._waiters
        while waiters:
            try:
                waiters.popleft().set()
            except RuntimeError:  # a waiter of a loop that has closed: hand the slot on
                continue
            return
        self._in_use -= 1

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` in a slot of the bulkhead.

        Raises:
            BulkheadFullError: If no slot frees up and the wait queue is full, or the wait
                timed out; ``fn`` is not called.
        """
        if self._in_use < self._max and not self._waiters:
            self._in_use += 1
            if self._in_use == self._max:
                self._note_full()
        else:
            await self._wait_for_slot()
        epoch = self._epoch
        try:
            return await fn(*args, **kwargs)
        finally:
            self._release(epoch)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function so every call runs in a slot of the bulkhead."""
        _validate.require_async(fn, "Bulkhead")
        bulkhead = self
        wait_for_slot, release, note_full = self._wait_for_slot, self._release, self._note_full

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            if bulkhead._in_use < bulkhead._max and not bulkhead._waiters:
                bulkhead._in_use += 1
                if bulkhead._in_use == bulkhead._max:
                    note_full()
            else:
                await wait_for_slot()
            epoch = bulkhead._epoch
            try:
                return await fn(*args, **kwargs)
            finally:
                release(epoch)

        wrapper.bulkhead = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        yield "veritas_bulkhead_rejected", (self._name,), float(self._n_rejected)
        yield "veritas_bulkhead_in_use", (self._name,), float(self._in_use)
