"""The drill's workload: writers of unique ids, readers and a cached read path, on every store.

A :class:`Store` is one write path under test (PostgreSQL through ``FailoverClient``, Redis
through ``SentinelRedis``, a journal file on disk). The :class:`Workload` runs, for every store,
writers that add unique ids to a set named after the current scenario, a reader, and a reader
behind a :class:`~veritas_resilience.FallbackChain` with a
:class:`~veritas_resilience.StaleCache`, and records every operation for the timeline and the
set check.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio

from .._fallback import FallbackChain, StaleCache, track_fallbacks
from ..limits import Timeout
from ..pipeline import Pipeline
from ._check import SetChecker

__all__ = ["Op", "Outcome", "Store", "Workload"]

Outcome = Literal["ok", "fail", "info"]
OpKind = Literal["write", "read", "cached_read", "health"]


class Store(Protocol):
    """One write path under test.

    ``write`` adds ``item`` to the set ``tag`` and returns only once the store acknowledges it;
    ``read`` is an ordinary read; ``final_read`` returns the whole set after the fault is over.
    ``classify`` says what a failed write means: ``"fail"`` if it certainly had no effect,
    ``"info"`` if it may have (when unsure, say ``"info"``: it is never called lost).
    """

    name: str

    async def write(self, tag: str, item: int) -> None:
        """Add ``item`` to the set ``tag``; return once acknowledged."""
        ...

    async def read(self, tag: str) -> object:
        """Read something from the store (the size of the set, a setting...)."""
        ...

    async def final_read(self, tag: str) -> set[int]:
        """Every id in the set ``tag``.

        A store may also define ``cached_read(tag)`` (the read behind the stale cache; ``read``
        when absent) and ``health()`` (the client's own status, ``"ok"`` when well).
        """
        ...

    def classify(self, error: BaseException) -> Outcome:
        """``"fail"`` or ``"info"`` for a failed write."""
        ...


@dataclass(frozen=True, slots=True)
class Op:
    """One recorded operation.

    Attributes:
        store: The store's name.
        kind: ``"write"``, ``"read"``, ``"cached_read"``, or ``"health"`` (the client's own
            health report, for stores that have one: ``ok`` or ``fail``).
        start: Seconds since the drill started, when it began.
        end: Seconds since the drill started, when it ended.
        outcome: ``"ok"``, ``"fail"`` or ``"info"`` (reads: ``"ok"`` or ``"fail"``).
        error: The error's type name (``"OSError[ENOSPC]"`` for OS errors), or None.
        fallback: Whether a fallback step served it (cached reads).
        tag: The scenario it belongs to.
    """

    store: str
    kind: OpKind
    start: float
    end: float
    outcome: Outcome
    error: str | None
    fallback: bool
    tag: str


def error_name(error: BaseException) -> str:
    """A bounded name for an error: its type, and the errno name for OS errors."""
    name = type(error).__name__
    errno_value = getattr(error, "errno", None)
    if isinstance(error, OSError) and isinstance(errno_value, int):
        import errno

        code = errno.errorcode.get(errno_value)
        if code:
            return f"{name}[{code}]"
    return name


@dataclass
class _Tag:
    name: str
    checkers: dict[str, SetChecker]
    in_flight: int = 0
    idle: anyio.Event = field(default_factory=anyio.Event)


class Workload:
    """Writers, readers and a cached reader per store, recording every operation.

    Args:
        stores: The write paths under test.
        writers: Writer tasks per store.
        interval: Seconds each worker waits between two operations.
        op_timeout: Seconds after which an operation is abandoned (a write then counts as
            indeterminate): nothing in the drill waits forever.
        cached_read_timeout: Deadline of the cached read path, after which the stale cache
            answers.
        clock: Seconds, monotonic.
    """

    def __init__(
        self,
        stores: list[Store],
        *,
        writers: int = 2,
        interval: float = 0.02,
        op_timeout: float = 10.0,
        cached_read_timeout: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stores = stores
        self.writers = writers
        self.interval = interval
        self.op_timeout = op_timeout
        self._clock = clock
        self.started = clock()
        self.ops: list[Op] = []
        self._ids = itertools.count(1)
        self._tag: _Tag | None = None
        # The cached read path: a read with a deadline, answered from the last good value when
        # the deadline passes or the read fails (a stale-if-error cache).
        self._caches = {
            store.name: Pipeline(
                name=f"drill-{store.name}-read",
                fallback=FallbackChain(
                    StaleCache(
                        name=f"drill-{store.name}",
                        max_staleness=3600,
                        key=lambda *args, **kwargs: "steady",
                        hooks=[],
                    ),
                    name=f"drill-{store.name}-read",
                    hooks=[],
                ),
                timeout=Timeout(cached_read_timeout, name=f"drill-{store.name}-read", hooks=[]),
            )
            for store in stores
        }

    def now(self) -> float:
        """Seconds since the workload was made."""
        return self._clock() - self.started

    def begin(self, tag: str) -> dict[str, SetChecker]:
        """Send new writes to the set ``tag``, with a fresh checker per store."""
        self._tag = _Tag(tag, {store.name: SetChecker() for store in self.stores})
        return self._tag.checkers

    async def drain(self, tag: str, limit: float) -> None:
        """Stop writing to ``tag`` and wait (at most ``limit`` s) for its writes in flight."""
        current = self._tag
        if current is None or current.name != tag:
            return
        self._tag = None
        if current.in_flight:
            with anyio.move_on_after(limit):
                await current.idle.wait()

    async def run(self) -> None:
        """Run every worker until cancelled."""
        async with anyio.create_task_group() as tg:
            for store in self.stores:
                for _ in range(self.writers):
                    tg.start_soon(self._writer, store)
                tg.start_soon(self._reader, store, False)
                tg.start_soon(self._reader, store, True)
                if callable(getattr(store, "health", None)):
                    tg.start_soon(self._health, store)

    async def _writer(self, store: Store) -> None:
        while True:
            tag = self._tag
            if tag is None:
                await anyio.sleep(self.interval)
                continue
            item = next(self._ids)
            checker = tag.checkers[store.name]
            tag.in_flight += 1
            start = self.now()
            outcome: Outcome = "ok"
            error: str | None = None
            try:
                with anyio.fail_after(self.op_timeout):
                    await store.write(tag.name, item)
            except Exception as exc:
                outcome = "info" if isinstance(exc, TimeoutError) else store.classify(exc)
                error = error_name(exc)
            finally:
                tag.in_flight -= 1
            {"ok": checker.ok, "fail": checker.fail, "info": checker.info}[outcome](item)
            self.ops.append(
                Op(store.name, "write", start, self.now(), outcome, error, False, tag.name)
            )
            if not tag.in_flight and self._tag is not tag:
                tag.idle.set()
            await anyio.sleep(self.interval)

    async def _reader(self, store: Store, cached: bool) -> None:
        chain = self._caches[store.name]
        while True:
            tag = self._tag
            name = tag.name if tag is not None else ""
            start = self.now()
            error: str | None = None
            fallback = False
            try:
                with anyio.fail_after(self.op_timeout):
                    if cached:
                        with track_fallbacks() as served:
                            await chain.call(getattr(store, "cached_read", store.read), name)
                        fallback = served.degraded
                    else:
                        await store.read(name)
            except Exception as exc:
                error = error_name(exc)
            self.ops.append(
                Op(
                    store.name,
                    "cached_read" if cached else "read",
                    start,
                    self.now(),
                    "ok" if error is None else "fail",
                    error,
                    fallback,
                    name,
                )
            )
            await anyio.sleep(self.interval * 2)

    async def _health(self, store: Store) -> None:
        health = getattr(store, "health")  # noqa: B009 - optional method of a Store
        while True:
            tag = self._tag
            start = self.now()
            try:
                with anyio.fail_after(self.op_timeout):
                    status = str(await health())
            except Exception as exc:
                status = error_name(exc)
            outcome: Outcome = "ok" if status == "ok" else "fail"
            error = None if status == "ok" else f"health:{status}"
            name = tag.name if tag is not None else ""
            self.ops.append(
                Op(store.name, "health", start, self.now(), outcome, error, False, name)
            )
            await anyio.sleep(0.05)

    # -- measurements ----------------------------------------------------------------------------

    def window(self, start: float, end: float, store: str | None = None) -> list[Op]:
        """Operations that ended in ``[start, end)``, of one store or all."""
        return [
            op for op in self.ops if start <= op.end < end and (store is None or op.store == store)
        ]

    def steady(self, start: float, end: float) -> tuple[bool, str]:
        """Whether every store wrote and read successfully in the window, with no error."""
        for store in self.stores:
            ops = [op for op in self.window(start, end, store.name) if op.kind != "health"]
            writes = [op for op in ops if op.kind == "write"]
            ok = sum(op.outcome == "ok" for op in writes)
            errors = Counter(op.error for op in ops if op.outcome != "ok")
            degraded = sum(op.fallback for op in ops)
            if not ok or errors or degraded:
                detail = ", ".join(f"{n}x {e}" for e, n in errors.most_common(3)) or "no error"
                return False, (
                    f"{store.name}: {ok} writes ok, {sum(errors.values())} errors ({detail}), "
                    f"{degraded} reads served by fallback in {end - start:.1f}s"
                )
        return True, "every store writes and reads, no error, no fallback"
