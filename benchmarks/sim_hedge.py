"""Simulation: hedged calls against a dependency with a long tail (1% of calls 50x slower).

Run: ``python -m benchmarks.sim_hedge`` (``--quick`` for a short run that writes nothing).

The real :class:`~veritas_resilience.Hedge` runs under trio with a ``MockClock`` that jumps to
the next deadline whenever every task is waiting: simulated time, so the run is fast and
deterministic (a seeded random source). Calls arrive at random (Poisson) at 1000 per second; each
attempt takes 10 ms (normally distributed, 10% spread), except 1% of attempts, drawn
independently, which take 50 times longer (500 ms): a GC pause, a cold cache, a slow disk.

It reports p50, p99 and p99.9 of the calls' latency and the extra load (attempts per call
beyond one) with no hedging, with hedging after the observed p95, and after a fixed 20 ms, then
writes the "sim_hedge" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field

import trio
import trio.testing

from benchmarks._results import write_section
from veritas_resilience import Hedge

BASE = 0.010
SLOW_FACTOR = 50
SLOW_SHARE = 0.01
RATE = 1000.0


class TrioClock:
    """The simulated time of trio's MockClock, as a veritas Clock."""

    def monotonic(self) -> float:
        return trio.current_time()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


@dataclass
class Outcome:
    """Latencies of the calls and the attempts they made."""

    name: str
    latencies: list[float] = field(default_factory=list)
    attempts: int = 0
    calls: int = 0


async def run_case(name: str, hedge: Hedge | None, calls: int, seed: int) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome(name)

    async def dependency() -> str:
        outcome.attempts += 1
        latency = max(0.001, rng.gauss(BASE, BASE * 0.1))
        if rng.random() < SLOW_SHARE:
            latency *= SLOW_FACTOR
        await trio.sleep(latency)
        return "ok"

    async def one_call() -> None:
        started = trio.current_time()
        if hedge is None:
            await dependency()
        else:
            await hedge.call(dependency)
        outcome.latencies.append(trio.current_time() - started)
        outcome.calls += 1

    async with trio.open_nursery() as nursery:
        for _ in range(calls):
            nursery.start_soon(one_call)
            await trio.sleep(rng.expovariate(RATE))
    return outcome


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def simulate(calls: int) -> list[Outcome]:
    clock = TrioClock()
    cases: list[tuple[str, Hedge | None]] = [
        ("no hedging", None),
        (
            "Hedge(delay=None: observed p95, budget 10%)",
            Hedge(idempotent=True, delay=None, budget_percent=10, clock=clock, hooks=[]),
        ),
        (
            "Hedge(delay=0.02, budget 10%)",
            Hedge(idempotent=True, delay=0.02, budget_percent=10, clock=clock, hooks=[]),
        ),
        (
            "Hedge(delay=None: observed p95, max_attempts=3, budget 10%)",
            Hedge(
                idempotent=True,
                delay=None,
                max_attempts=3,
                budget_percent=10,
                clock=clock,
                hooks=[],
            ),
        ),
    ]
    results = []
    for name, hedge in cases:
        results.append(
            trio.run(
                run_case,
                name,
                hedge,
                calls,
                1,
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; writes nothing")
    args = parser.parse_args()
    calls = 2_000 if args.quick else 50_000
    results = simulate(calls)
    lines = [
        f"Dependency: {BASE * 1000:.0f} ms per attempt (10% spread), {SLOW_SHARE:.0%} of attempts "
        f"{SLOW_FACTOR}x slower, drawn independently. {calls} calls arriving at random at "
        f"{RATE:.0f}/s. Simulated time (trio MockClock), seed 1; the real Hedge class.",
        "",
        "| policy | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | extra load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat = r.latencies
        lines.append(
            f"| {r.name} | {percentile(lat, 50) * 1000:.1f} | {percentile(lat, 99) * 1000:.1f} | "
            f"{percentile(lat, 99.9) * 1000:.1f} | {max(lat) * 1000:.1f} | "
            f"{(r.attempts / r.calls - 1):+.1%} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("sim_hedge", "Simulation: hedged calls (benchmarks/sim_hedge.py)", body)


if __name__ == "__main__":
    main()
