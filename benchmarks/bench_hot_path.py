"""The breaker's hot path against a bare call and against the breakers a user would pick instead.

Run: ``python -m benchmarks.bench_hot_path`` (``--quick`` for a smoke run that writes nothing).

In one process it alternates the cases round after round and reports medians in ns per call:

- a bare ``await op()``;
- veritas-resilience's breaker CLOSED (decorator, with the default hooks on an isolated registry,
  and with hooks off; ``breaker.call()``; with the duration histogram on), and OPEN rejection;
- circuitbreaker, aiocircuitbreaker, aiobreaker, purgatory and interlock-cb, CLOSED and OPEN;
- pybreaker against veritas-resilience on a plain sync function;
- 1000 concurrent tasks, each making calls that yield to the event loop;
- memory after 1e6 rejections (tracemalloc).

It prints the table and writes the "hot_path" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks._results import write_section
from veritas_resilience import (
    CircuitBreaker,
    CircuitOpenError,
    PrometheusHook,
    StructlogHook,
    circuit_breaker,
)

AsyncCase = Callable[[], Awaitable[Any]]


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


def _pure_python(make: Callable[[], CircuitBreaker]) -> CircuitBreaker:
    """A breaker built without the compiled fast path (breakers choose at creation)."""
    compiled, circuit_breaker._speedups = circuit_breaker._speedups, None
    try:
        return make()
    finally:
        circuit_breaker._speedups = compiled


async def build_async_cases() -> tuple[dict[str, AsyncCase], dict[str, AsyncCase]]:
    """Return (closed cases, open-rejection cases), each a zero-argument coroutine function."""
    closed: dict[str, AsyncCase] = {"bare await op()": op}
    rejected: dict[str, AsyncCase] = {"bare await op()": op}

    registry = CollectorRegistry()
    default = CircuitBreaker(name="default", hooks=[PrometheusHook(registry), StructlogHook()])
    pure = _pure_python(
        lambda: CircuitBreaker(name="pure", hooks=[PrometheusHook(registry), StructlogHook()])
    )
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
    closed["veritas decorator, default hooks, pure Python"] = pure(op)

    async def passthrough(*args: Any, **kwargs: Any) -> int:
        return await op(*args, **kwargs)

    closed["(reference) a do-nothing async wrapper"] = passthrough

    def make_opened(name: str) -> CircuitBreaker:
        return CircuitBreaker(
            name=name,
            failure_threshold=1,
            reset_timeout=1e9,
            hooks=[PrometheusHook(registry), StructlogHook()],
        )

    for label, opened in (
        ("veritas", make_opened("opened")),
        ("veritas, pure Python", _pure_python(lambda: make_opened("opened-pure"))),
    ):
        await _open(opened(down), (Down, CircuitOpenError))
        rejected[label] = _rejecting(opened(op), CircuitOpenError)

    async def raise_only() -> int:
        raise CircuitOpenError("x", "open", 1.0)

    rejected["(reference) a bare coroutine raising the same error"] = _rejecting(
        raise_only, CircuitOpenError
    )

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

    import interlock

    il = interlock.CircuitBreaker(name="interlock")
    closed["interlock-cb"] = il(op)
    il_open = interlock.CircuitBreaker(name="interlock-open")
    il_open.force_open()
    rejected["interlock-cb"] = _rejecting(il_open(op), interlock.CircuitOpenError)
    return closed, rejected


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
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm up
        await _time_async(fn, n // 10)
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(await _time_async(fn, n))
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


def _verdict(value: float, target: float) -> str:
    return f"target ≤ {target:.0f} ns: {'met' if value <= target else 'NOT met'}"


async def main_async(quick: bool) -> str:
    n, rounds = (2_000, 3) if quick else (100_000, 15)
    closed, rejected = await build_async_cases()
    async_results = await measure_async({**closed}, n, rounds)
    rej_results = await measure_async(rejected, n, rounds)
    sync_results = measure_sync(build_sync_cases(), n, rounds)
    concurrent = await measure_concurrent(
        tasks=100 if quick else 1000, calls=2 if quick else 50, rounds=1 if quick else 5
    )
    mem_first, mem_last = await measure_rejection_memory(10_000 if quick else 1_000_000)

    bare = async_results["bare await op()"]
    rej_bare = rej_results["bare await op()"]
    peers_closed = {
        k: v for k, v in async_results.items() if not k.startswith(("veritas", "bare", "("))
    }
    peers_rej = {k: v for k, v in rej_results.items() if not k.startswith(("veritas", "bare", "("))}
    ours_closed = async_results["veritas decorator, default hooks"] - bare
    pure_closed = async_results["veritas decorator, default hooks, pure Python"] - bare
    ours_rej = rej_results["veritas"] - rej_bare
    pure_rej = rej_results["veritas, pure Python"] - rej_bare
    compiled = circuit_breaker._speedups is not None
    out = [
        "Medians of alternating rounds, in CPU time of the benchmark's thread (time given to "
        "other processes is not counted); overhead is the difference to a bare `await op()` "
        "measured in the same rounds. veritas breakers run with the default hooks (Prometheus + "
        "structlog) unless stated, on the compiled fast path "
        + ("(built)" if compiled else "(NOT built: every veritas row is pure Python)")
        + "; the *pure Python* rows are breakers made without it.",
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
        f"Traced Python memory after {(10_000 if quick else 1_000_000) // 10:,} rejections: "
        f"{mem_first:,} B; after {10_000 if quick else 1_000_000:,}: {mem_last:,} B "
        f"(growth {mem_last - mem_first:+,} B).",
        "",
        "### Summary",
        "",
        f"- CLOSED overhead, default hooks (Prometheus + structlog): {ours_closed:.0f} ns "
        f"({_verdict(ours_closed, 150)}); pure Python: {pure_closed:.0f} ns; "
        f"best peer: {min(peers_closed.values()) - bare:.0f} ns "
        f"({min(peers_closed, key=peers_closed.__getitem__)}); a do-nothing `async def` "
        "wrapper forwarding *args/**kwargs: "
        f"{async_results['(reference) a do-nothing async wrapper'] - bare:.0f} ns.",
        f"- OPEN rejection over a bare await: {ours_rej:.0f} ns ({_verdict(ours_rej, 400)}); "
        f"pure Python: {pure_rej:.0f} ns; best peer: "
        f"{min(peers_rej.values()) - rej_bare:.0f} ns "
        f"({min(peers_rej, key=peers_rej.__getitem__)}); "
        f"a bare coroutine raising the same error: "
        f"{rej_results['(reference) a bare coroutine raising the same error'] - rej_bare:.0f} ns.",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    args = parser.parse_args()
    report = asyncio.run(main_async(args.quick))
    print(report)
    if not args.quick:
        write_section("hot_path", "Circuit breaker hot path (benchmarks/bench_hot_path.py)", report)


if __name__ == "__main__":
    main()
