"""The success path of retry, timeout, bulkhead and the full pipeline, against the peers.

Run: ``python -m benchmarks.bench_policies`` (``--quick`` for a smoke run that writes nothing).

In one process, on asyncio, it alternates the cases round after round and reports medians in ns
per successful call:

- a bare ``await op(1)`` and the floor: a do-nothing async wrapper forwarding ``*args/**kwargs``;
- retry alone: veritas ``Retry`` against tenacity's ``@retry`` (``AsyncRetrying``) and stamina;
- timeout alone: veritas ``Timeout`` against ``anyio.fail_after`` and ``asyncio.timeout``;
- bulkhead alone: veritas ``Bulkhead`` against an ``anyio.CapacityLimiter``;
- the full pipeline (fallback + retry + breaker + timeout): veritas ``Pipeline`` against the same
  composition from stamina or tenacity + circuitbreaker + ``anyio.fail_after`` + try/except.

Then the veritas cases once more under trio, where a timeout is a native ``trio.CancelScope``.
Times are CPU time of the benchmark's thread, so other processes on the machine (test suites
running next to it) do not inflate them. It prints the tables and writes the "policies" section
of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from benchmarks._results import write_section
from veritas_resilience import CircuitBreaker, FallbackChain, PrometheusHook, StructlogHook
from veritas_resilience.limits import Bulkhead, Timeout, TimeoutEngine
from veritas_resilience.pipeline import Pipeline
from veritas_resilience.retry import Retry

Case = Callable[[int], Awaitable[Any]]

BARE = "bare await op(x)"
FLOOR = "(floor) a do-nothing async wrapper"


async def op(x: int) -> int:
    return x


async def degraded(x: int) -> int:
    return -x


PIPELINE = "veritas Pipeline (fallback+retry+breaker+timeout)"
PIPELINE_ANYIO = "veritas Pipeline, timeout engine='anyio'"
TIMEOUT_ANYIO = "veritas Timeout, engine='anyio'"


def hooks() -> list[Any]:
    """The default hooks (Prometheus and structlog), on a registry of the benchmark's own."""
    return [PrometheusHook(CollectorRegistry()), StructlogHook()]


def veritas_cases() -> dict[str, Case]:
    """Our policies with the default hooks, as a service would run them."""

    async def floor(*args: Any, **kwargs: Any) -> int:
        return await op(*args, **kwargs)

    def pipeline(engine: TimeoutEngine) -> Pipeline:
        return Pipeline(
            name="orders",
            fallback=FallbackChain(degraded, name="orders", hooks=hooks()),
            retry=Retry(
                on=(ConnectionError, TimeoutError), attempts=3, name="orders", hooks=hooks()
            ),
            breaker=CircuitBreaker(name="orders", failure_threshold=5, hooks=hooks()),
            timeout=Timeout(2.0, name="orders", engine=engine, hooks=hooks()),
        )

    return {
        BARE: op,
        FLOOR: floor,
        "veritas Retry": Retry(on=ConnectionError, attempts=3, hooks=hooks())(op),
        "veritas Timeout": Timeout(2.0, hooks=hooks())(op),
        TIMEOUT_ANYIO: Timeout(2.0, engine="anyio", hooks=hooks())(op),
        "veritas Bulkhead": Bulkhead(100, hooks=hooks())(op),
        PIPELINE: pipeline("auto")(op),
        PIPELINE_ANYIO: pipeline("anyio")(op),
    }


def peer_cases() -> dict[str, Case]:
    """The same policies built from the libraries a user would otherwise combine."""
    import circuitbreaker
    import stamina
    import tenacity

    cases: dict[str, Case] = {}
    retry_tenacity = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential_jitter(),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )
    retry_stamina = stamina.retry(on=ConnectionError, attempts=3)
    cases["tenacity @retry (AsyncRetrying)"] = retry_tenacity(op)
    cases["stamina @retry"] = retry_stamina(op)

    async def fail_after(x: int) -> int:
        with anyio.fail_after(2.0):
            return await op(x)

    async def asyncio_timeout(x: int) -> int:
        async with asyncio.timeout(2.0):
            return await op(x)

    cases["anyio.fail_after"] = fail_after
    if sys.version_info >= (3, 11):
        cases["asyncio.timeout"] = asyncio_timeout

    limiter = anyio.CapacityLimiter(100)

    async def capacity_limiter(x: int) -> int:
        async with limiter:
            return await op(x)

    cases["anyio.CapacityLimiter"] = capacity_limiter

    def composed(retry_decorator: Any) -> Case:
        breaker = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)
        inner = retry_decorator(breaker(fail_after))

        async def guarded(x: int) -> int:
            try:
                return await inner(x)  # type: ignore[no-any-return]
            except Exception:
                return await degraded(x)

        return guarded

    stamina_on = stamina.retry(on=(ConnectionError, TimeoutError), attempts=3)
    tenacity_on = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential_jitter(),
        retry=tenacity.retry_if_exception_type((ConnectionError, TimeoutError)),
        reraise=True,
    )
    cases["stamina + circuitbreaker + fail_after + try/except"] = composed(stamina_on)
    cases["tenacity + circuitbreaker + fail_after + try/except"] = composed(tenacity_on)
    return cases


async def _time(fn: Case, n: int) -> float:
    # CPU time of this thread: time the machine spends on other processes (this benchmark often
    # shares two cores with test suites) does not count, while everything the call does does.
    start = time.thread_time_ns()
    for i in range(n):
        await fn(i)
    return (time.thread_time_ns() - start) / n


async def measure(
    cases: dict[str, Case], rounds: int, sample_ms: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ns per call, and median overhead over a bare call, of each case.

    Each round times every case once, right after timing the bare call with as many calls: the
    overhead of a round is the difference within that pair, so load from other processes that
    drifts during the run cancels out. A case makes as many calls as fit in ``sample_ms``
    (500 to 20,000), so the slow peers do not make the run long.
    """
    calls: dict[str, int] = {}
    for name, fn in cases.items():  # warm up, check every case answers, size its samples
        assert await fn(3) in (3, -3)
        per_call = await _time(fn, 200)
        calls[name] = int(min(20_000, max(500, sample_ms * 1e6 / per_call)))
    bare = cases[BARE]
    totals: dict[str, list[float]] = {k: [] for k in cases}
    overheads: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            gc.collect()
            base = await _time(bare, calls[name])
            total = await _time(fn, calls[name])
            totals[name].append(total)
            overheads[name].append(total - base)
    return (
        {k: statistics.median(v) for k, v in totals.items()},
        {k: statistics.median(v) for k, v in overheads.items()},
    )


Results = tuple[dict[str, float], dict[str, float]]


def _table(results: Results, names: list[str]) -> list[str]:
    totals, overheads = results
    lines = ["| case | ns/call | overhead (ns) |", "|---|---:|---:|"]
    for name in names:
        over = "" if name == BARE else f"{overheads[name]:+.0f}"
        lines.append(f"| {name} | {totals[name]:.0f} | {over} |")
    return lines


def _verdict(overhead: float, target: float) -> str:
    met = "met" if overhead <= target else "MISSED"
    return f"{overhead:.0f} ns (target ≤ {target:.0f} ns: {met})"


async def run_asyncio(rounds: int, sample_ms: float) -> Results:
    return await measure({**veritas_cases(), **peer_cases()}, rounds, sample_ms)


async def run_trio(rounds: int, sample_ms: float) -> Results:
    return await measure(veritas_cases(), rounds, sample_ms)


def report(aio: Results, trio: Results, rounds: int, sample_ms: float, load: str) -> str:
    over = aio[1]
    trio_over = trio[1]
    pipeline = PIPELINE
    peers_pipeline = [k for k in over if k.endswith("+ try/except")]
    groups = {
        "Retry alone": ["veritas Retry", "tenacity @retry (AsyncRetrying)", "stamina @retry"],
        "Timeout alone": [
            "veritas Timeout",
            TIMEOUT_ANYIO,
            "anyio.fail_after",
            *(["asyncio.timeout"] if "asyncio.timeout" in over else []),
        ],
        "Bulkhead alone": ["veritas Bulkhead", "anyio.CapacityLimiter"],
        "Full pipeline: fallback + retry + breaker + timeout": [
            pipeline,
            PIPELINE_ANYIO,
            *peers_pipeline,
        ],
    }
    out = [
        f"asyncio unless stated. {rounds} rounds; in each, every case is timed right after a bare "
        f"`await op(x)` with the same number of calls (as many as fit in {sample_ms:g} ms, "
        "500 to 20,000); overhead is the median of those paired differences, ns/call the median "
        "time, both in CPU time of the benchmark's thread (time given to other processes is not "
        "counted). veritas policies run with the default hooks (Prometheus + structlog); every "
        f"call succeeds. Load average (1 min) at start and end of the run: {load}.",
        "",
        "### Baseline",
        "",
        *_table(aio, [BARE, FLOOR]),
    ]
    for title, names in groups.items():
        out += ["", f"### {title}", "", *_table(aio, names)]
    out += [
        "",
        "### The same veritas cases under trio",
        "",
        *_table(trio, list(trio[0])),
        "",
        "### Summary",
        "",
        f"- Retry success path over a bare call: {_verdict(over['veritas Retry'], 300)}; "
        f"tenacity {over['tenacity @retry (AsyncRetrying)']:.0f} ns, "
        f"stamina {over['stamina @retry']:.0f} ns; any async decorator that forwards "
        f"`*args/**kwargs` costs {over[FLOOR]:.0f} ns (the floor).",
        f"- Timeout, default engine: {over['veritas Timeout']:.0f} ns against "
        f"{over['anyio.fail_after']:.0f} ns for anyio.fail_after (one shared timer per policy "
        "and loop instead of a timer handle per call); with engine='anyio' (anyio's "
        f"move_on_after): {over[TIMEOUT_ANYIO]:.0f} ns. Under trio the "
        f"default is a native trio.CancelScope: {trio_over['veritas Timeout']:.0f} ns.",
        f"- Full pipeline over a bare call: {_verdict(over[pipeline], 5000)}; "
        + "; ".join(f"{k.split(' +')[0]} composition {over[k]:.0f} ns" for k in peers_pipeline)
        + f"; with the anyio timeout engine: {over[PIPELINE_ANYIO]:.0f} ns"
        + f". Under trio: {trio_over[pipeline]:.0f} ns (its timeout is trio's cancel scope).",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    args = parser.parse_args()
    rounds, sample_ms = (3, 2.0) if args.quick else (25, 20.0)
    load_start = os.getloadavg()[0]
    aio = anyio.run(run_asyncio, rounds, sample_ms, backend="asyncio")
    trio = anyio.run(run_trio, rounds, sample_ms, backend="trio")
    load = f"{load_start:.1f}, {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    text = report(aio, trio, rounds, sample_ms, load)
    print(text)
    if not args.quick:
        write_section(
            "policies", "Retry, timeout, bulkhead and pipeline (benchmarks/bench_policies.py)", text
        )


if __name__ == "__main__":
    main()
