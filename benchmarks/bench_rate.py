"""The rate limiter: the cost of a local permit, and the accuracy of one limit shared by processes.

Run: ``python -m benchmarks.bench_rate`` (``--quick`` for a smoke run that writes nothing).

1. Cost, in one process on asyncio (CPU time of the thread, medians of alternating rounds, as
   ``bench_policies``): a bare ``await op(x)``, then the same call through a local
   :class:`~veritas_resilience.RateLimiter` whose limit is never reached (GCRA and token bucket,
   as a decorator and through ``acquire()``), and through aiolimiter's ``AsyncLimiter`` when it
   is installed; a do-nothing async wrapper shows what any decorator costs. Target: a local
   permit costs at most 300 ns over the bare await.
2. Accuracy: 8 processes share one limit (100 calls per second, burst 10) through a real Redis
   started by the testing kit; each calls ``acquire()`` as fast as it can from 4 tasks for 10 s.
   Allowed calls in total, against the limit (``rate * 10 s + burst``). Target: within 1%.

It prints the tables and writes the "rate" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

from benchmarks._results import write_section
from benchmarks.bench_policies import BARE, FLOOR, Case, measure, op
from veritas_resilience import RateLimitedError, RateLimiter
from veritas_resilience._rate import RateLimitAlgorithm

# The shared limit: low enough that 8 processes on a busy 2-core machine keep it saturated
# through their scheduling pauses (the burst banks 100 ms of them), so what is measured is the
# limiter, not how fast the machine can ask.
RATE = 100.0
PROCESSES = 8
TASKS = 4
BURST = 10


def local_cases() -> dict[str, Case]:
    """The bare call and the rate-limited ones (a rate so high it never refuses)."""

    async def floor(*args: Any, **kwargs: Any) -> int:
        return await op(*args, **kwargs)

    cases: dict[str, Case] = {BARE: op, FLOOR: floor}
    algorithms: tuple[RateLimitAlgorithm, ...] = ("gcra", "token_bucket")
    for algorithm in algorithms:
        limiter = RateLimiter(1e12, burst=10**9, algorithm=algorithm, hooks=[])
        cases[f"veritas RateLimiter ({algorithm}), decorator"] = limiter(op)
    acquiring = RateLimiter(1e12, burst=10**9, hooks=[])

    async def with_acquire(x: int) -> int:
        await acquiring.acquire()
        return await op(x)

    cases["veritas RateLimiter (gcra), await acquire()"] = with_acquire
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

    async def run() -> tuple[int, int]:
        from redis.asyncio import Redis

        client = Redis(host=host, port=port)
        limiter = RateLimiter(
            RATE, burst=BURST, redis=client, redis_timeout=2.0, name="bench-shared", hooks=[]
        )
        await client.ping()
        ready.release()
        await asyncio.to_thread(go.wait)
        start_at = start.value
        stop_at = start_at + seconds
        allowed = attempts = 0

        async def task() -> None:
            nonlocal allowed, attempts
            while time.time() < stop_at:
                attempts += 1
                try:
                    await limiter.acquire()
                except RateLimitedError:
                    continue
                if time.time() < stop_at:
                    allowed += 1

        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(task() for _ in range(TASKS)))
        degraded = limiter.degraded or limiter._n_store_errors > 0
        await client.aclose()
        return (-1 if degraded else allowed), attempts

    queue.put(asyncio.run(run()))


def shared_accuracy(seconds: float) -> tuple[int, float, int]:
    """(allowed calls, the limit over the run, attempts) of all processes together."""
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
        counts = [queue.get(timeout=seconds + 60) for _ in workers]
        for worker in workers:
            worker.join()
    if any(allowed < 0 for allowed, _ in counts):
        raise RuntimeError("a process fell back to its local share: Redis did not answer")
    return sum(c[0] for c in counts), RATE * seconds + BURST, sum(c[1] for c in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    args = parser.parse_args()
    rounds, sample_ms, seconds = (3, 5.0, 2.0) if args.quick else (15, 20.0, 10.0)

    totals, overheads = asyncio.run(measure(local_cases(), rounds, sample_ms))
    lines = [
        "### Cost of a local permit (asyncio, CPU time per call, medians)",
        "",
        "| case | ns/call | over a bare await (ns) |",
        "|---|---:|---:|",
    ]
    for name in totals:
        extra = "" if name == BARE else f"+{overheads[name]:.0f}"
        lines.append(f"| {name} | {totals[name]:.0f} | {extra} |")
    decorator = overheads["veritas RateLimiter (gcra), decorator"]
    floor_overhead = overheads[FLOOR]
    allowed, limit, attempts = shared_accuracy(seconds)
    processes = PROCESSES
    error = (allowed - limit) / limit
    lines += [
        "",
        f"### One limit shared by {processes} processes through Redis",
        "",
        f"{processes} processes × {TASKS} tasks calling `acquire()` as fast as they can for "
        f"{seconds:g} s against one Redis 7 (the testing kit's), limit {RATE:.0f}/s, "
        f"burst {BURST}.",
        "",
        "| calls attempted | allowed | the limit (rate × time + burst) | error |",
        "|---:|---:|---:|---:|",
        f"| {attempts} | {allowed} | {limit:.0f} | {error:+.2%} |",
        "",
        "### Summary",
        "",
        f"- Local permit (GCRA, decorator) over a bare await: {decorator:.0f} ns "
        f"(target ≤ 300 ns: {'met' if decorator <= 300 else 'missed'}); any async decorator "
        f"(the do-nothing wrapper): {floor_overhead:.0f} ns.",
        f"- Shared limit, {processes} processes: {error:+.2%} from the limit "
        f"(target within 1%: {'met' if abs(error) <= 0.01 else 'missed'}).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("rate", "Rate limiter (benchmarks/bench_rate.py)", body)


if __name__ == "__main__":
    main()
