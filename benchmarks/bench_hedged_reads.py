"""Hedged standby reads on a real PostgreSQL primary with two standbys.

Run: ``python -m benchmarks.bench_hedged_reads`` (``--quick`` for a short run that writes nothing).

Reads are routed ``prefer_standby``, so without hedging they all go to the first standby. That
standby stalls on a share of the reads (``pg_sleep`` on the server, decided per read by a seeded
random source): a checkpoint, a vacuum, a busy disk. The reads run one after the other, with and
without a :class:`~veritas_resilience.Hedge` (fixed delay), in alternating rounds; the report
gives p50, p99 and p99.9 of the read latency, and the extra queries the hedge cost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from benchmarks._results import write_section
from veritas_resilience import Hedge
from veritas_resilience.postgres import FailoverClient
from veritas_resilience.testing import LocalPostgresCluster

# Sleeps $2 seconds when run on the server at port $1, else answers at once.
QUERY = (
    "SELECT 1 FROM pg_sleep(CASE WHEN current_setting('port')::int = $1 THEN $2::float8 ELSE 0 END)"
)
STALL = 0.1
STALL_SHARE = 0.02
DELAY = 0.01


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def reads(db: FailoverClient, slow_port: int, count: int, rng: random.Random) -> list[float]:
    """Latencies of ``count`` reads; the slow standby stalls on a share of them."""
    out = []
    for _ in range(count):
        stall = STALL if rng.random() < STALL_SHARE else 0.0
        start = time.perf_counter()
        await db.fetchval(QUERY, slow_port, stall, route="prefer_standby")
        out.append(time.perf_counter() - start)
    return out


async def measure(cluster: LocalPostgresCluster, rounds: int, per_round: int) -> dict[str, Any]:
    """Alternate rounds with and without the hedge; return the latencies and the hedge."""
    dsns = [cluster.primary.dsn, *(s.dsn for s in cluster.standbys)]
    slow_port = cluster.standbys[0].port
    hedge = Hedge(idempotent=True, delay=DELAY, max_attempts=2, budget_percent=5, name="bench")
    common: dict[str, Any] = {"monitor_interval": 0.2, "max_size": 4, "hooks": []}
    plain = FailoverClient(dsns, name="plain", **common)
    hedged = FailoverClient(dsns, name="hedged", hedge=hedge, **common)
    results: dict[str, list[float]] = {"plain": [], "hedged": []}
    async with plain, hedged:
        for _ in range(200):  # both standbys serving reads, within 10 s
            if len(plain._topology.readable) == len(hedged._topology.readable) == 2:
                break
            await asyncio.sleep(0.05)
        for client in (plain, hedged):  # warm up: connections open, statements prepared
            await reads(client, slow_port, 50, random.Random(0))
        before = hedge.counts()
        for r in range(rounds):
            for key, client in (("plain", plain), ("hedged", hedged)):
                results[key] += await reads(client, slow_port, per_round, random.Random(r))
        after = hedge.counts()
    return {
        "results": results,
        "extra": after["attempts"] - before["attempts"],
        "won": after["hedge"] - before["hedge"],
    }


def report(data: dict[str, Any]) -> str:
    """The RESULTS.md section body."""
    results = data["results"]
    n = len(results["hedged"])
    lines = [
        f"{n} sequential reads per setting, routed `prefer_standby`, in alternating rounds. The "
        f"first standby stalls {STALL * 1000:.0f} ms on {STALL_SHARE:.0%} of the reads "
        f"(`pg_sleep` on the server); the hedge sends a second attempt to the other standby "
        f"after {DELAY * 1000:.0f} ms (max_attempts=2, budget 5%).",
        "",
        "| setting | p50 | p99 | p99.9 | mean |",
        "|---|---|---|---|---|",
    ]
    for key in ("plain", "hedged"):
        values = results[key]
        lines.append(
            f"| {key} | {quantile(values, 0.5) * 1000:.2f} ms | "
            f"{quantile(values, 0.99) * 1000:.2f} ms | {quantile(values, 0.999) * 1000:.2f} ms | "
            f"{statistics.fmean(values) * 1000:.2f} ms |"
        )
    lines += [
        "",
        f"Extra queries: {data['extra']} for {n} reads ({data['extra'] / n:.1%}); reads won by "
        f"the hedge: {data['won']}. A cancelled attempt's statement is cancelled on the server.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write its section of RESULTS.md (unless ``--quick``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing")
    args = parser.parse_args()
    rounds, per_round = (2, 100) if args.quick else (10, 500)
    with LocalPostgresCluster(standbys=2) as cluster:
        data = asyncio.run(measure(cluster, rounds, per_round))
    text = report(data)
    print(text)
    if not args.quick:
        write_section(
            "hedged_reads", "Hedged standby reads (benchmarks/bench_hedged_reads.py)", text
        )


if __name__ == "__main__":
    main()
