"""Simulation: an adaptive concurrency limit against a fixed bulkhead and no limit at all.

Run: ``python -m benchmarks.sim_adaptive`` (``--quick`` for a short run that writes nothing).

A discrete-event simulation in simulated time (fast and deterministic: a seeded random source). A
dependency has ``capacity`` workers and a FIFO queue in front of them; each call needs about
50 ms of work (normally distributed, 5% spread). Calls arrive at random (Poisson) at 1600 per
second, 80 concurrent calls' worth. The dependency's capacity is 100 workers, drops to 20 at
t = 10 s (a node lost, a noisy neighbour) and comes back at t = 20 s.

The client side is one of:

- no limit: every call goes to the dependency;
- a fixed bulkhead of 100 (sized for the healthy dependency): calls over 100 in flight are
  rejected at once;
- :class:`~veritas_resilience.AdaptiveLimit` (vegas, and gradient), driven through the same
  admission and completion code its ``call()`` uses, on a FakeClock set to the simulated time.

It reports, per phase, the p50/p99 latency of admitted calls, how many were served and rejected,
and for the adaptive limits how long the limit took to follow the capacity. Then it writes the
"sim_adaptive" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from benchmarks._results import write_section
from veritas_resilience import AdaptiveLimit, ConcurrencyLimitError
from veritas_resilience.testing import FakeClock

SERVICE = 0.050
SETTLE = 2.0  # seconds after a capacity change that the "settled" p99 leaves out
ARRIVALS_PER_S = 1600.0
PHASES = ((0.0, 100), (10.0, 20), (20.0, 100))  # (from time, capacity)


@dataclass
class Result:
    """What one client-side policy got, per phase."""

    name: str
    latencies: list[list[float]] = field(default_factory=lambda: [[], [], []])
    settled: list[list[float]] = field(default_factory=lambda: [[], [], []])
    rejected: list[int] = field(default_factory=lambda: [0, 0, 0])
    limit_trace: list[tuple[float, int]] = field(default_factory=list)


class Server:
    """``capacity`` workers and a FIFO queue; the capacity can change at any time."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.capacity = PHASES[0][1]
        self.busy = 0
        self.queue: deque[int] = deque()

    def service_time(self) -> float:
        return max(0.001, self.rng.gauss(SERVICE, SERVICE * 0.05))


def phase_of(t: float) -> int:
    return sum(1 for start, _ in PHASES[1:] if t >= start)


def simulate(
    name: str,
    duration: float,
    admit: Callable[[], object],
    finish: Callable[[object], None],
    limit: Callable[[], int] | None,
    clock: FakeClock,
    seed: int = 1,
) -> Result:
    """Run one policy through the whole scenario."""
    rng = random.Random(seed)
    server = Server(random.Random(seed + 1))
    result = Result(name)
    events: list[tuple[float, int, str, int]] = []
    seq = itertools.count()
    tickets: dict[int, tuple[float, object]] = {}
    call_ids = itertools.count()

    def push(t: float, kind: str, call: int = 0) -> None:
        heapq.heappush(events, (t, next(seq), kind, call))

    def start_work(t: float, call: int) -> None:
        server.busy += 1
        push(t + server.service_time(), "done", call)

    push(rng.expovariate(ARRIVALS_PER_S), "arrive")
    for start, capacity in PHASES[1:]:
        push(start, "capacity", capacity)
    next_trace = 0.0
    while events:
        t, _, kind, data = heapq.heappop(events)
        if t > duration:
            break
        clock.advance(t - clock.monotonic())  # the policies read the simulated time
        if limit is not None and t >= next_trace:
            result.limit_trace.append((t, limit()))
            next_trace += 0.1
        if kind == "arrive":
            push(t + rng.expovariate(ARRIVALS_PER_S), "arrive")
            try:
                ticket = admit()
            except ConcurrencyLimitError:
                result.rejected[phase_of(t)] += 1
                continue
            call = next(call_ids)
            tickets[call] = (t, ticket)
            if server.busy < server.capacity:
                start_work(t, call)
            else:
                server.queue.append(call)
        elif kind == "done":
            server.busy -= 1
            started, ticket = tickets.pop(data)
            finish(ticket)
            phase = phase_of(t)
            result.latencies[phase].append(t - started)
            if t - PHASES[phase][0] >= SETTLE:
                result.settled[phase].append(t - started)
            while server.queue and server.busy < server.capacity:
                start_work(t, server.queue.popleft())
        else:  # capacity change
            server.capacity = data
            while server.queue and server.busy < server.capacity:
                start_work(t, server.queue.popleft())
    return result


def run_policy(policy: str, duration: float) -> Result:
    """Build the client-side policy and simulate it."""
    clock = FakeClock(0.0)
    if policy.startswith("adaptive"):
        algorithm = policy.split("-", 1)[1]
        limiter = AdaptiveLimit(
            algorithm=algorithm,  # type: ignore[arg-type]
            initial_limit=20,
            max_limit=1000,
            clock=clock,
            hooks=[],
        )

        def finish(ticket: object) -> None:
            start, in_flight = cast("tuple[float, int]", ticket)
            limiter._finish(start, in_flight, "success")

        return simulate(
            f"AdaptiveLimit ({algorithm})",
            duration,
            limiter._admit,
            finish,
            lambda: limiter.limit,
            clock,
        )
    in_flight = [0]
    cap = 100 if policy == "bulkhead" else None

    def admit_fixed() -> object:
        if cap is not None and in_flight[0] >= cap:
            raise ConcurrencyLimitError("bulkhead", cap)
        in_flight[0] += 1
        return None

    def finish_fixed(ticket: object) -> None:
        in_flight[0] -= 1

    name = "fixed bulkhead of 100" if cap else "no limit"
    return simulate(name, duration, admit_fixed, finish_fixed, None, clock)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def follow_time(trace: list[tuple[float, int]], after: float, good: Callable[[int], bool]) -> float:
    """Seconds after ``after`` until the limit is ``good`` and stays so for a second."""
    candidate: float | None = None
    for t, value in trace:
        if t < after:
            continue
        if good(value):
            if candidate is None:
                candidate = t
            elif t - candidate >= 1.0:
                return candidate - after
        else:
            candidate = None
    return float("nan")


def _seconds(value: float) -> str:
    return "not within the phase" if math.isnan(value) else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; writes nothing")
    args = parser.parse_args()
    duration = 30.0
    policies = ["none", "bulkhead", "adaptive-vegas", "adaptive-gradient"]
    results = [run_policy(p, duration) for p in policies]
    lines = [
        f"Dependency: {SERVICE * 1000:.0f} ms of work per call (5% spread), FIFO queue; capacity "
        f"100 workers, 20 from t=10 s to t=20 s, then 100 again. Calls arrive at random at "
        f"{ARRIVALS_PER_S:.0f}/s (80 concurrent calls' worth). Simulated time, 30 s, seed 1.",
        "",
        "| client side | phase | served | rejected | p50 (ms) | p99 (ms) | p99 after 2 s (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    phase_names = ("0-10 s, capacity 100", "10-20 s, capacity 20", "20-30 s, capacity 100")
    for result in results:
        for i, phase in enumerate(phase_names):
            lat = result.latencies[i]
            lines.append(
                f"| {result.name} | {phase} | {len(lat)} | {result.rejected[i]} | "
                f"{percentile(lat, 50) * 1000:.0f} | {percentile(lat, 99) * 1000:.0f} | "
                f"{percentile(result.settled[i], 99) * 1000:.0f} |"
            )
    lines += [
        "",
        "| adaptive limit | limit at 9.9 s | at 19.9 s | at 29.9 s | "
        "down to ≤ 30 after the drop | back to ≥ 80 after the recovery |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if not result.limit_trace:
            continue
        trace = result.limit_trace

        def at(t: float, trace: list[tuple[float, int]] = trace) -> int:
            return [v for s, v in trace if s <= t][-1]

        down = follow_time(trace, 10.0, lambda v: v <= 30)
        up = follow_time(trace, 20.0, lambda v: v >= 80)
        lines.append(
            f"| {result.name} | {at(9.9)} | {at(19.9)} | {at(29.9)} | {_seconds(down)} | "
            f"{_seconds(up)} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section(
            "sim_adaptive",
            "Simulation: adaptive concurrency limit (benchmarks/sim_adaptive.py)",
            body,
        )


if __name__ == "__main__":
    main()
