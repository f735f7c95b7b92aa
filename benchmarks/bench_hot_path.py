"""The breaker's hot path against a bare call and against the breakers a user would pick instead.

Run: ``python -m benchmarks.bench_hot_path`` on this Python (``--quick`` for a smoke run), or
``python -m benchmarks.bench_hot_path --all-pythons`` on every CPython 3.10-3.14 found, one after
another, each in its own venv under .venvs/ with the ``benchmarks`` extra: that run writes the
"hot_path" section of benchmarks/RESULTS.md, one table per version.

In one process it alternates the cases round after round and reports medians in ns per call:

- a bare ``await op()``, and the floor: a do-nothing ``async def`` wrapper forwarding
  ``*args, **kwargs`` (what any decorator of an ``async def`` costs in pure Python);
- veritas-resilience's breaker CLOSED (decorator, with the default hooks on an isolated registry,
  and with hooks off; ``breaker.call()``; with the duration histogram on), and OPEN rejection
  against a bare coroutine raising and catching the same error;
- circuitbreaker, aiocircuitbreaker, aiobreaker, purgatory and interlock-cb, CLOSED and OPEN;
- pybreaker against veritas-resilience on a plain sync function;
- 1000 concurrent tasks, each making calls that yield to the event loop;
- memory after 1e6 rejections (tracemalloc).

Targets (per CPython): CLOSED decorated ``async def`` within +60 ns of the floor; a rejection at
most 2x a bare coroutine raising the same error; ahead of every peer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import platform
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks._pythons import run_on_each
from benchmarks._results import write_section
from veritas_resilience import CircuitBreaker, CircuitOpenError, PrometheusHook, StructlogHook

AsyncCase = Callable[[], Awaitable[Any]]
FLOOR = "(floor) a do-nothing async wrapper"
RAISE = "(reference) a bare coroutine raising the same error"
COUNTER = "(reference) the floor + an exact success counter"
STATE_COUNTER = "(reference) the floor + a state read + the counter"


async def op() -> int:
    return 1


def sync_op() -> int:
    return 1


class Down(Exception):
    pass


async def down() -> int:
    raise Down


async def _open(guarded: AsyncCase, errors: tuple[type[BaseException], ...]) -> None:
    for _ in range(20):
        try:
            await guarded()
        except errors:
            pass


# -- cases ----------------------------------------------------------------------------------------


async def build_async_cases() -> tuple[dict[str, AsyncCase], dict[str, AsyncCase]]:
    """Return (closed cases, open-rejection cases), each a zero-argument coroutine function."""
    closed: dict[str, AsyncCase] = {"bare await op()": op}
    rejected: dict[str, AsyncCase] = {"bare await op()": op}

    registry = CollectorRegistry()
    default = CircuitBreaker(name="default", hooks=[PrometheusHook(registry), StructlogHook()])
    silent = CircuitBreaker(name="silent", hooks=[])
    timed = CircuitBreaker(
        name="timed", record_duration=True, hooks=[PrometheusHook(registry), StructlogHook()]
    )
    closed["veritas decorator, default hooks"] = default(op)
    closed["veritas decorator, hooks off"] = silent(op)

    async def via_call() -> int:
        return await default.call(op)

    closed["veritas breaker.call(op)"] = via_call
    closed["veritas decorator, duration histogram on"] = timed(op)

    async def passthrough(*args: Any, **kwargs: Any) -> int:
        return await op(*args, **kwargs)

    closed[FLOOR] = passthrough

    # What any breaker must add to the floor in pure Python: an exact count of successes (one C
    # call, exact across threads), and reading the breaker's state before the call.
    successes = itertools.count()

    async def floor_and_count(*args: Any, **kwargs: Any) -> int:
        result = await op(*args, **kwargs)
        next(successes)
        return result

    class State:
        fast: int | None = 0

    state = State()

    async def floor_state_and_count(*args: Any, **kwargs: Any) -> int:
        if state.fast is not None:
            result = await op(*args, **kwargs)
            next(successes)
            return result
        raise AssertionError

    closed[COUNTER] = floor_and_count
    closed[STATE_COUNTER] = floor_state_and_count

    def make_opened(name: str) -> CircuitBreaker:
        return CircuitBreaker(
            name=name,
            failure_threshold=1,
            reset_timeout=1e9,
            hooks=[PrometheusHook(registry), StructlogHook()],
        )

    opened = make_opened("opened")
    await _open(opened(down), (Down, CircuitOpenError))
    rejected["veritas"] = _rejecting(opened(op), CircuitOpenError)

    async def raise_only() -> int:
        raise CircuitOpenError("x", "open", 1.0)

    rejected[RAISE] = _rejecting(raise_only, CircuitOpenError)

    import circuitbreaker

    fab = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=1e9, name="fab")
    closed["circuitbreaker"] = fab(op)
    fab_open = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=1e9)
    fab_open_op = fab_open(op)
    await _open(fab_open(down), (Down, circuitbreaker.CircuitBreakerError))
    rejected["circuitbreaker"] = _rejecting(fab_open_op, circuitbreaker.CircuitBreakerError)

    import aiocircuitbreaker

    aio = aiocircuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=10**9)
    closed["aiocircuitbreaker"] = aio(op)
    aio_open = aiocircuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=10**9)
    aio_open_op = aio_open(op)
    await _open(aio_open(down), (Down, aiocircuitbreaker.CircuitBreakerError))
    rejected["aiocircuitbreaker"] = _rejecting(aio_open_op, aiocircuitbreaker.CircuitBreakerError)

    import aiobreaker

    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(days=1000))

    async def ab_closed() -> int:
        return await ab.call_async(op)  # type: ignore[no-any-return]

    closed["aiobreaker"] = ab_closed
    ab_open = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(days=1000))

    async def ab_down() -> int:
        return await ab_open.call_async(down)  # type: ignore[no-any-return]

    async def ab_rejected() -> int:
        return await ab_open.call_async(op)  # type: ignore[no-any-return]

    await _open(ab_down, (Down, aiobreaker.CircuitBreakerError))
    rejected["aiobreaker"] = _rejecting(ab_rejected, aiobreaker.CircuitBreakerError)

    import purgatory

    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=10**9)
    await factory.initialize()
    closed["purgatory"] = factory("purg")(op)
    purg_down = factory("purg-open", threshold=1)(down)
    purg_open_op = factory("purg-open", threshold=1)(op)
    from purgatory.domain.model import OpenedState

    await _open(purg_down, (Down, OpenedState))
    rejected["purgatory"] = _rejecting(purg_open_op, OpenedState)

    try:
        import interlock
    except ImportError:  # interlock-cb needs Python 3.11+
        MISSING.append("interlock-cb (needs Python 3.11+)")
    else:
        il = interlock.CircuitBreaker(name="interlock")
        closed["interlock-cb"] = il(op)
        il_open = interlock.CircuitBreaker(name="interlock-open")
        il_open.force_open()
        rejected["interlock-cb"] = _rejecting(il_open(op), interlock.CircuitOpenError)
    return closed, rejected


#: Peers that could not be installed on this Python, with the reason.
MISSING: list[str] = []


def _rejecting(fn: AsyncCase, error: type[BaseException]) -> AsyncCase:
    async def case() -> None:
        try:
            await fn()
        except error:
            pass
        else:
            raise AssertionError("the breaker let a call through while open")

    return case


def build_sync_cases() -> dict[str, Callable[[], Any]]:
    import pybreaker

    cases: dict[str, Callable[[], Any]] = {"bare sync_op()": sync_op}
    cases["veritas decorator (sync), hooks off"] = CircuitBreaker(name="sync", hooks=[])(sync_op)
    registry = CollectorRegistry()
    cases["veritas decorator (sync), default hooks"] = CircuitBreaker(
        name="sync-default", hooks=[PrometheusHook(registry), StructlogHook()]
    )(sync_op)
    cases["pybreaker"] = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)(sync_op)
    return cases


# -- measurement ----------------------------------------------------------------------------------


# CPU time of this thread: time given to other processes on a busy machine is not counted.
_now_ns = time.thread_time_ns


async def _time_async(fn: AsyncCase, n: int) -> float:
    start = _now_ns()
    for _ in range(n):
        await fn()
    return (_now_ns() - start) / n


def _time_sync(fn: Callable[[], Any], n: int) -> float:
    start = _now_ns()
    for _ in range(n):
        fn()
    return (_now_ns() - start) / n


async def measure_async(cases: dict[str, AsyncCase], n: int, rounds: int) -> dict[str, float]:
    """Medians over ``rounds``; each case runs as many calls as take ~20 ms (at most ``n``)."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    counts: dict[str, int] = {}
    for name, fn in cases.items():  # warm up, and size each case's sample
        est = await _time_async(fn, max(100, n // 20))
        counts[name] = int(min(n, max(1_000, 20e6 / max(est, 1.0))))
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(await _time_async(fn, counts[name]))
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_sync(cases: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_time_sync(fn, n))
    return {k: statistics.median(v) for k, v in samples.items()}


async def measure_concurrent(tasks: int, calls: int, rounds: int) -> dict[str, float]:
    """ns per call with ``tasks`` tasks each making ``calls`` calls that yield to the loop."""

    async def yielding() -> int:
        await asyncio.sleep(0)
        return 1

    import aiocircuitbreaker
    import circuitbreaker

    variants: dict[str, AsyncCase] = {
        "bare": yielding,
        "veritas, default hooks": CircuitBreaker(
            name="concurrent", hooks=[PrometheusHook(CollectorRegistry()), StructlogHook()]
        )(yielding),
        "circuitbreaker": circuitbreaker.CircuitBreaker(recovery_timeout=1e9)(yielding),
        "aiocircuitbreaker": aiocircuitbreaker.CircuitBreaker(recovery_timeout=10**9)(yielding),
    }

    async def worker(fn: AsyncCase) -> None:
        for _ in range(calls):
            await fn()

    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = _now_ns()
            await asyncio.gather(*(worker(fn) for _ in range(tasks)))
            samples[name].append((_now_ns() - start) / (tasks * calls))
    return {k: statistics.median(v) for k, v in samples.items()}


async def measure_rejection_memory(count: int) -> tuple[int, int]:
    """Bytes traced after 1/10 of the rejections and after all of them."""
    breaker = CircuitBreaker(name="memory", failure_threshold=1, reset_timeout=1e9, hooks=[])
    guarded = breaker(op)
    await _open(breaker(down), (Down, CircuitOpenError))
    gc.collect()
    tracemalloc.start()
    first = 0
    for i in range(count):
        try:
            await guarded()
        except CircuitOpenError:
            pass
        if i == count // 10:
            gc.collect()
            first = tracemalloc.get_traced_memory()[0]
    gc.collect()
    last = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return first, last


# -- report ---------------------------------------------------------------------------------------


def _table(results: dict[str, float], bare_key: str) -> list[str]:
    bare = results[bare_key]
    lines = ["| case | ns/call | overhead (ns) | × bare |", "|---|---:|---:|---:|"]
    for name, ns in results.items():
        over = "" if name == bare_key else f"{ns - bare:+.0f}"
        lines.append(f"| {name} | {ns:.0f} | {over} | {ns / bare:.2f} |")
    return lines


def _rej_table(results: dict[str, float], bare_key: str) -> list[str]:
    bare = results[bare_key]
    lines = ["| breaker | ns/rejected call | over a bare await (ns) |", "|---|---:|---:|"]
    for name, ns in sorted(results.items(), key=lambda kv: kv[1]):
        over = "" if name == bare_key else f"{ns - bare:+.0f}"
        lines.append(f"| {name} | {ns:.0f} | {over} |")
    return lines


async def main_async(quick: bool) -> tuple[str, dict[str, Any]]:
    """Run every measurement; return the report and the numbers."""
    n, rounds = (2_000, 3) if quick else (200_000, 15)
    closed, rejected = await build_async_cases()
    async_results = await measure_async({**closed}, n, rounds)
    rej_results = await measure_async(rejected, n, rounds)
    sync_results = measure_sync(build_sync_cases(), 2_000 if quick else 100_000, rounds)
    concurrent = await measure_concurrent(
        tasks=100 if quick else 1000, calls=2 if quick else 50, rounds=1 if quick else 5
    )
    rejections = 10_000 if quick else 1_000_000
    mem_first, mem_last = await measure_rejection_memory(rejections)
    numbers = {
        "python": platform.python_version(),
        "closed": async_results,
        "rejected": rej_results,
        "sync": sync_results,
        "concurrent": concurrent,
        "memory": [mem_first, mem_last],
        "missing": MISSING,
    }
    out = [
        "Medians of alternating rounds, in CPU time of the benchmark's thread (time given to "
        "other processes is not counted); overhead is the difference to a bare `await op()` "
        "measured in the same rounds. veritas breakers run with the default hooks (Prometheus + "
        "structlog) unless stated. The package is pure Python.",
        "",
        "### CLOSED: a successful call",
        "",
        *_table(async_results, "bare await op()"),
        "",
        "### OPEN: a rejected call (`try: await guarded() except <its error>`)",
        "",
        *_rej_table(rej_results, "bare await op()"),
        "",
        "### Sync function (pybreaker's home ground)",
        "",
        *_table(sync_results, "bare sync_op()"),
        "",
        "### Concurrency: 1000 tasks × 50 calls, each call yielding once to the event loop",
        "",
        *_table(concurrent, "bare"),
        "",
        "### Memory across rejections",
        "",
        f"Traced Python memory after {rejections // 10:,} rejections: {mem_first:,} B; after "
        f"{rejections:,}: {mem_last:,} B (growth {mem_last - mem_first:+,} B).",
        "",
        "### Targets",
        "",
        *summary(numbers),
    ]
    return "\n".join(out), numbers


def summary(numbers: dict[str, Any]) -> list[str]:
    """The three targets, each with its numbers and whether it is met."""
    closed, rejected = numbers["closed"], numbers["rejected"]
    floor = closed[FLOOR]
    ours = closed["veritas decorator, default hooks"]
    peers_closed = {k: v for k, v in closed.items() if not k.startswith(("veritas", "bare", "("))}
    peers_rej = {k: v for k, v in rejected.items() if not k.startswith(("veritas", "bare", "("))}
    bare_raise, ours_rej = rejected[RAISE], rejected["veritas"]
    best_closed = min(peers_closed, key=peers_closed.__getitem__)
    best_rej = min(peers_rej, key=peers_rej.__getitem__)
    ahead = ours < peers_closed[best_closed] and ours_rej < peers_rej[best_rej]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        f"- CLOSED, decorated `async def`, default hooks: {ours - floor:+.0f} ns over the floor "
        f"(a do-nothing `async def` wrapper, {floor:.0f} ns); target ≤ +60 ns: "
        f"{verdict(ours - floor <= 60)}. What any pure-Python breaker adds to the floor: an "
        f"exact success counter {closed[COUNTER] - floor:+.0f} ns, with a read of its state "
        f"{closed[STATE_COUNTER] - floor:+.0f} ns.",
        f"- OPEN rejection: {ours_rej:.0f} ns, {ours_rej / bare_raise:.2f}× a bare coroutine "
        f"raising and catching the same error ({bare_raise:.0f} ns); target ≤ 2×: "
        f"{verdict(ours_rej <= 2 * bare_raise)}.",
        f"- Ahead of every peer: {verdict(ahead)} (best peer CLOSED: {best_closed}, "
        f"{peers_closed[best_closed]:.0f} ns; OPEN: {best_rej}, {peers_rej[best_rej]:.0f} ns).",
    ]
    if numbers["missing"]:
        lines.append(f"- Not installable on this Python: {', '.join(numbers['missing'])}.")
    return lines


# -- every CPython ------------------------------------------------------------------------------


def run_all_pythons(quick: bool) -> None:
    """Run this benchmark on every CPython found, one after another; write one section."""
    sections = [
        f"### CPython {numbers['python']}\n\n{load}\n\n" + _version_tables(numbers)
        for numbers, load in run_on_each("benchmarks.bench_hot_path", "--json", quick)
    ]
    report = (
        "One process per CPython (the CPython above is the one that ran the others), one after "
        "another, each in its own venv with the `benchmarks` "
        "extra. Medians of alternating rounds in CPU time of the benchmark's thread (time given "
        "to other processes is not counted). The floor is a do-nothing `async def` wrapper "
        "forwarding `*args, **kwargs`: what any decorator of an `async def` costs in pure "
        "Python.\n\n" + "\n\n".join(sections)
    )
    print(report)
    if not quick:
        write_section(
            "hot_path",
            "Circuit breaker hot path on every CPython (bench_hot_path.py --all-pythons)",
            report,
        )


def _version_tables(numbers: dict[str, Any]) -> str:
    closed, rejected, sync = numbers["closed"], numbers["rejected"], numbers["sync"]
    floor = closed[FLOOR]
    lines = [
        "| CLOSED, successful call | ns/call | over bare await | over the floor |",
        "|---|---:|---:|---:|",
    ]
    bare = closed["bare await op()"]
    for name, ns in closed.items():
        lines.append(f"| {name} | {ns:.0f} | {ns - bare:+.0f} | {ns - floor:+.0f} |")
    lines += ["", "| OPEN, rejected call | ns/call | × bare raise |", "|---|---:|---:|"]
    bare_raise = rejected[RAISE]
    for name, ns in sorted(rejected.items(), key=lambda kv: kv[1]):
        lines.append(f"| {name} | {ns:.0f} | {ns / bare_raise:.2f} |")
    lines += ["", "| sync function | ns/call | over bare call |", "|---|---:|---:|"]
    for name, ns in sync.items():
        lines.append(f"| {name} | {ns:.0f} | {ns - sync['bare sync_op()']:+.0f} |")
    return "\n".join([*lines, "", *summary(numbers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    parser.add_argument(
        "--all-pythons", action="store_true", help="run on every CPython 3.10-3.14 found"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.all_pythons:
        run_all_pythons(args.quick)
        return
    report, numbers = asyncio.run(main_async(args.quick))
    print(report)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
