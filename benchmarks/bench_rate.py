"""Rate limiter, hedge, adaptive limit: their cost, and the accuracy of a limit shared by processes.

Run: ``python -m benchmarks.bench_rate`` (``--quick`` for a smoke run that writes nothing).

1. Cost, on every CPython 3.10-3.14 installed (one process each, in its venv under .venvs/ with
   the ``benchmarks`` extra), on asyncio (CPU time of the thread, medians of alternating rounds,
   as ``bench_policies``): a bare ``await op(x)``, then the same call through a local
   :class:`~veritas_resilience.RateLimiter` whose limit is never reached (GCRA and token bucket,
   as a decorator, through ``acquire()`` and ``try_acquire()``), through a GCRA decorator whose
   limit is in debt within its burst, and through aiolimiter's ``AsyncLimiter`` when it is
   installed; a do-nothing async wrapper shows what any decorator costs. Target: a local
   permit costs at most 300 ns over the bare await. The success path of an ``AdaptiveLimit``
   and of a ``Hedge`` whose first attempt answers in time are measured the same way.
2. Accuracy: 8 processes share one limit (100 calls per second, burst 25) through a real Redis
   started by the testing kit; each calls ``acquire()`` as fast as it can from 4 tasks for 10 s.
   Allowed calls in total, against the limit (``rate * 10 s + burst``). Target: within 1%.

It prints the tables and writes the "rate" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import time
from pathlib import Path
from typing import Any

from benchmarks._pythons import run_on_each
from benchmarks._results import write_section
from benchmarks.bench_policies import BARE, FLOOR, Case, measure, op
from veritas_resilience import AdaptiveLimit, Hedge, RateLimitedError, RateLimiter
from veritas_resilience._rate import RateLimitAlgorithm

# The shared limit: low enough that 8 processes on a busy 2-core machine keep it saturated, with a
# burst that banks 250 ms of the scheduling pauses such a machine has, so what is measured is the
# limiter, not how fast the machine can ask.
RATE = 100.0
PROCESSES = 8
TASKS = 4
BURST = 25
DECORATOR = "veritas RateLimiter (gcra), decorator"
IN_DEBT = "veritas RateLimiter (gcra, in debt within the burst), decorator"


def local_cases() -> dict[str, Case]:
    """The bare call and the rate-limited ones (a rate so high it never refuses)."""

    async def floor(*args: Any, **kwargs: Any) -> int:
        return await op(*args, **kwargs)

    cases: dict[str, Case] = {BARE: op, FLOOR: floor}
    algorithms: tuple[RateLimitAlgorithm, ...] = ("gcra", "token_bucket")
    for algorithm in algorithms:
        limiter = RateLimiter(1e12, burst=10**9, algorithm=algorithm, hooks=[])
        cases[DECORATOR.replace("gcra", algorithm)] = limiter(op)
    # A limit of 1e6/s called faster than that: every call finds debt, within a huge burst.
    in_debt = RateLimiter(1e6, burst=10**9, hooks=[])
    cases[IN_DEBT] = in_debt(op)
    acquiring = RateLimiter(1e12, burst=10**9, hooks=[])

    async def with_acquire(x: int) -> int:
        await acquiring.acquire()
        return await op(x)

    cases["veritas RateLimiter (gcra), await acquire()"] = with_acquire

    async def with_try_acquire(x: int) -> int:
        if not acquiring.try_acquire():
            raise RateLimitedError(acquiring.name, 1.0)
        return await op(x)

    cases["veritas RateLimiter (gcra), try_acquire()"] = with_try_acquire
    cases["veritas AdaptiveLimit, decorator"] = AdaptiveLimit(hooks=[])(op)
    # A hedge runs its attempts in a task group: what every call pays when no hedge is needed.
    cases["veritas Hedge (answer within the delay), decorator"] = Hedge(
        idempotent=True, delay=1.0, hooks=[]
    )(op)
    try:
        from aiolimiter import AsyncLimiter
    except ImportError:  # pragma: no cover - an optional peer
        return cases
    peer = AsyncLimiter(1e12, 1.0)

    async def aiolimiter_case(x: int) -> int:
        async with peer:
            return await op(x)

    cases["aiolimiter AsyncLimiter (async with)"] = aiolimiter_case
    return cases


def _worker(
    host: str, port: int, seconds: float, ready: Any, go: Any, start: Any, queue: Any
) -> None:
    """One process: acquire from TASKS tasks during the common window; report allowed calls."""

    async def run() -> tuple[list[float], int, float]:
        from redis.asyncio import Redis

        client = Redis(host=host, port=port)
        limiter = RateLimiter(
            RATE, burst=BURST, redis=client, redis_timeout=2.0, name="bench-shared", hooks=[]
        )
        # Warm up on a limit of its own: a connection per task, the script in the server's cache
        # and every lazy import done, so the run measures the limiter, not the first call's set-up.
        warm_up = RateLimiter(1e6, redis=client, redis_timeout=10.0, name="warm-up", hooks=[])
        await asyncio.gather(*(warm_up.acquire() for _ in range(TASKS)))
        ready.release()
        await asyncio.to_thread(go.wait)
        start_at = start.value
        stop_at = start_at + seconds
        granted: list[float] = []  # when each granted acquire() returned
        attempts = 0

        async def task() -> None:
            nonlocal attempts
            while time.time() < stop_at:
                attempts += 1
                try:
                    await limiter.acquire()
                except RateLimitedError:
                    continue
                granted.append(time.time())

        await asyncio.sleep(max(0.0, start_at - time.time()))
        first = time.time()
        await asyncio.gather(*(task() for _ in range(TASKS)))
        if limiter.degraded or limiter._n_store_errors > 0:
            raise RuntimeError("a process fell back to its local share: Redis did not answer")
        await client.aclose()
        return granted, attempts, first

    queue.put(asyncio.run(run()))


def shared_accuracy(seconds: float) -> dict[str, float]:
    """Run the processes; return what they were allowed, against the limit over the window.

    The window runs from the moment the first process started asking to the moment the last
    granted answer arrived: every permit was granted by the server inside it. The limit over a
    window of ``w`` seconds that starts with a full bucket is ``burst + rate * w``. (Answers
    reach busy processes late, so the window is a little longer than the server's view of it,
    and the error reads a little below zero for a limiter that is exact.)
    """
    from veritas_resilience.testing import LocalRedisSentinel

    with LocalRedisSentinel(num_replicas=1, num_sentinels=1) as kit:
        host, port = kit.master
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        ready = context.Semaphore(0)
        go = context.Event()
        start = context.Value("d", 0.0)
        workers = [
            context.Process(target=_worker, args=(host, port, seconds, ready, go, start, queue))
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:  # every process has imported, connected and is waiting
            if not ready.acquire(timeout=120):
                raise RuntimeError("a worker process did not start")
        start.value = time.time() + 0.5
        go.set()
        results = [queue.get(timeout=seconds + 60) for _ in workers]
        for worker in workers:
            worker.join()
    first = min(r[2] for r in results)
    granted = sorted(t for r in results for t in r[0])
    window = granted[-1] - first
    per_second = [sum(1 for t in granted if i <= t - first < i + 1) for i in range(int(window))]
    return {
        "allowed": len(granted),
        "attempts": sum(r[1] for r in results),
        "window": window,
        "limit": BURST + RATE * window,
        "min_per_second": min(per_second),
        "max_per_second": max(per_second),
    }


def local_costs(quick: bool) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """Measure the local cases on every CPython found; the tables, and the target row on each."""
    lines: list[str] = []
    decorators: dict[str, float] = {}
    in_debt: dict[str, float] = {}
    for numbers, load in run_on_each("benchmarks.bench_rate", "--local-json", quick):
        totals, overheads = numbers["totals"], numbers["overheads"]
        decorators[numbers["python"]] = overheads[DECORATOR]
        in_debt[numbers["python"]] = overheads[IN_DEBT]
        lines += [
            f"#### CPython {numbers['python']}",
            "",
            load,
            "",
            "| case | ns/call | over a bare await (ns) |",
            "|---|---:|---:|",
        ]
        for name in totals:
            extra = "" if name == BARE else f"{overheads[name]:+.0f}"
            lines.append(f"| {name} | {totals[name]:.0f} | {extra} |")
        lines.append("")
    return lines, decorators, in_debt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    parser.add_argument(
        "--local-json",
        type=Path,
        help="measure the local cost on this Python only and write the numbers to this file",
    )
    args = parser.parse_args()
    rounds, sample_ms, seconds = (3, 5.0, 2.0) if args.quick else (15, 20.0, 10.0)
    if args.local_json:
        totals, overheads = asyncio.run(measure(local_cases(), rounds, sample_ms))
        numbers = {"python": platform.python_version(), "totals": totals, "overheads": overheads}
        args.local_json.write_text(json.dumps(numbers, indent=1), encoding="utf-8")
        return

    tables, decorators, in_debt = local_costs(args.quick)
    lines = [
        "### Cost on the success path (asyncio, CPU time per call, medians)",
        "",
        f"{rounds} rounds on each CPython, one process each, as bench_policies measures (CPU time "
        "of the thread, each case paired with a bare await). The floor is a do-nothing async "
        "wrapper: what any decorator of an `async def` costs in pure Python.",
        "",
        *tables,
    ]
    shared = shared_accuracy(seconds)
    processes = PROCESSES
    allowed, limit, attempts = shared["allowed"], shared["limit"], shared["attempts"]
    error = (allowed - limit) / limit
    worst = max(decorators.values())
    per_version = ", ".join(f"{v} {ns:+.0f} ns" for v, ns in decorators.items())
    per_version_in_debt = ", ".join(f"{v} {ns:+.0f} ns" for v, ns in in_debt.items())
    lines += [
        f"### One limit shared by {processes} processes through Redis",
        "",
        f"{processes} processes × {TASKS} tasks calling `acquire()` as fast as they can for "
        f"{seconds:g} s against one Redis 7 (the testing kit's), limit {RATE:.0f}/s, "
        f"burst {BURST}, on CPython {platform.python_version()}.",
        "",
        "| calls attempted | window (s) | allowed | the limit (burst + rate × window) | error "
        "| allowed per second (min–max) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {attempts:.0f} | {shared['window']:.3f} | {allowed:.0f} | {limit:.1f} | {error:+.2%} "
        f"| {shared['min_per_second']:.0f}–{shared['max_per_second']:.0f} |",
        "",
        "### Summary",
        "",
        f"- Local permit (GCRA, decorator) over a bare await: {per_version} "
        f"(target ≤ 300 ns on each: {'met' if worst <= 300 else 'missed'}); with the limit in "
        f"debt (calls closer together than 1/rate, within the burst): {per_version_in_debt}.",
        f"- Shared limit, {processes} processes: {error:+.2%} from the limit "
        f"(target within 1%: {'met' if abs(error) <= 0.01 else 'missed'}).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section(
            "rate", "Rate limiter, hedge and adaptive limit (benchmarks/bench_rate.py)", body
        )


if __name__ == "__main__":
    main()
