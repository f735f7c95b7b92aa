"""The PostgreSQL failover client against plain asyncpg: throughput, and writes through a failover.

Run: ``python -m benchmarks.bench_postgres`` (``--quick`` for a smoke run that writes nothing).
It needs the PostgreSQL server binaries (the testing kit starts its own clusters on loopback).

1. **Throughput**: ``SELECT 1`` and a small ``INSERT`` from 32 concurrent tasks, through
   :class:`~veritas_resilience.postgres.FailoverClient` and through a raw ``asyncpg`` pool to the
   same primary, in the same process, with pools of 10 (calls wait for connections) and of 32.
   Both pools have the same size and ``command_timeout``; the client runs with its default hooks
   (Prometheus and structlog). Each round runs every case once, in a new random order; the table
   reports medians, and the median of the per-round ratios.
2. **Failover**: writers insert rows in a loop; the primary crashes (``pg_ctl stop -m
   immediate``), or its link freezes (a network partition, through the testing kit's
   ``FaultProxy``), and the standby is promoted (``pg_promote()``). For the client, and for a
   plain asyncpg pool over both hosts with ``target_session_attrs="read-write"`` (whose writers
   retry every error after 10 ms), it reports the time from the promotion to the first
   successful write, and the errors the writers saw. Same fault, fresh cluster for each run.

It prints the tables and writes the "postgres" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from asyncpg.connect_utils import SessionAttribute

from benchmarks._results import write_section
from veritas_resilience.postgres import FailoverClient
from veritas_resilience.testing._postgres import LocalPostgresCluster
from veritas_resilience.testing._proxy import FaultProxy

TASKS = 32
POOL_SIZE = 10
COMMAND_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


async def _rate(op: Callable[[], Awaitable[Any]], seconds: float) -> float:
    """Calls per second of ``op`` from TASKS concurrent tasks for ``seconds``."""
    count = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < stop:
            await op()
            count += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return count / (time.monotonic() - start)


@dataclass
class Throughput:
    name: str
    pool_size: int
    raw: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [c / r for c, r in zip(self.client, self.raw)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """The interquartile range of the per-round ratios."""
        q = statistics.quantiles(self.ratios, n=4)
        return q[0], q[2]


async def _throughput_with(
    cluster: LocalPostgresCluster, size: int, rounds: int, seconds: float
) -> list[Throughput]:
    ids = itertools.count(size * 10_000_000)
    insert = "INSERT INTO bench VALUES ($1, 'x')"
    raw = await asyncpg.create_pool(
        cluster.primary.dsn, min_size=size, max_size=size, command_timeout=COMMAND_TIMEOUT
    )
    db = FailoverClient(
        [n.dsn for n in cluster.nodes],
        name="bench",
        min_size=size,
        max_size=size,
        command_timeout=COMMAND_TIMEOUT,
    )
    await db.start()
    select = Throughput("SELECT 1", size)
    write = Throughput("INSERT one row", size)
    ops: dict[str, tuple[list[float], Callable[[], Awaitable[Any]]]] = {
        "raw select": (select.raw, lambda: raw.fetchval("SELECT 1")),
        "client select": (select.client, lambda: db.fetchval("SELECT 1")),
        "raw insert": (write.raw, lambda: raw.execute(insert, next(ids))),
        "client insert": (write.client, lambda: db.execute(insert, next(ids))),
    }
    try:
        for _, op in ops.values():  # warm up both pools and statement caches
            await _rate(op, 0.2)
        for _ in range(rounds):
            # A new random order every round, so that drift in the machine's load (the server
            # runs on the same two cores) falls on both sides alike.
            order = list(ops)
            random.shuffle(order)
            for key in order:
                samples, op = ops[key]
                samples.append(await _rate(op, seconds))
    finally:
        await db.close()
        await raw.close()
    return [select, write]


async def throughput(rounds: int, seconds: float) -> list[Throughput]:
    with LocalPostgresCluster(standbys=1) as cluster:
        cluster.query(cluster.primary, "CREATE TABLE bench (id bigint PRIMARY KEY, v text)")
        results: list[Throughput] = []
        for size in (POOL_SIZE, TASKS):
            results += await _throughput_with(cluster, size, rounds, seconds)
        return results


@dataclass
class FailoverRun:
    from_command: float  # seconds from the promote command to the first successful write
    from_promoted: float  # seconds from pg_promote() returning to the first successful write
    errors: Counter[str]


FAULTS = {
    "crash": "the primary crashes (`pg_ctl stop -m immediate`)",
    "partition": "the primary is cut off: its link freezes (packets held, nothing closed, like a "
    "network partition), new connections to it hang",
}
RESUME_LIMIT = 15.0


async def _failover_once(kind: str, writers: int, fault: str) -> FailoverRun:
    with LocalPostgresCluster(standbys=1) as cluster:
        primary, standby = cluster.primary, cluster.standbys[0]
        cluster.query(primary, "CREATE TABLE bench (id bigint PRIMARY KEY)")
        cluster.wait_replayed(standby)
        proxy = FaultProxy(primary.host, primary.port)
        first = (proxy.host, proxy.port) if fault == "partition" else (primary.host, primary.port)
        hosts = [first, (standby.host, standby.port)]
        db: FailoverClient | None = None
        pool: asyncpg.Pool[Any] | None = None
        if kind == "client":
            db = FailoverClient(
                hosts,
                name="bench-failover",
                user="postgres",
                database="postgres",
                max_size=POOL_SIZE,
                connect_timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                failover_timeout=30.0,
            )
            await db.start()
            execute: Callable[..., Awaitable[Any]] = db.execute
        else:
            pool = await asyncpg.create_pool(
                host=[h for h, _ in hosts],
                port=[p for _, p in hosts],
                user="postgres",
                database="postgres",
                target_session_attrs=SessionAttribute.read_write,
                min_size=POOL_SIZE,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
            execute = pool.execute
        ids = itertools.count(1)
        successes: list[float] = []
        errors: Counter[str] = Counter()
        stop = asyncio.Event()
        warm = asyncio.Event()
        resumed = asyncio.Event()
        command = math.inf

        async def writer() -> None:
            while not stop.is_set():
                try:
                    await execute("INSERT INTO bench VALUES ($1)", next(ids))
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                    if kind != "client":
                        await asyncio.sleep(0.01)  # the usual retry loop around a plain pool
                else:
                    now = time.monotonic()
                    successes.append(now)
                    if len(successes) >= 200:
                        warm.set()
                    if now > command:
                        resumed.set()

        tasks = [asyncio.create_task(writer()) for _ in range(writers)]
        try:
            await warm.wait()
            errors.clear()
            if fault == "crash":
                await asyncio.to_thread(cluster.kill_primary)
            else:
                await asyncio.to_thread(proxy.freeze)
            promoter = await asyncpg.connect(standby.dsn)
            command = time.monotonic()
            await promoter.fetchval("SELECT pg_promote(true, 30)")
            promoted = time.monotonic()
            await promoter.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resumed.wait(), RESUME_LIMIT)
            await asyncio.sleep(0.3)  # let the errors of the transition show up
        finally:
            proxy.close()  # unfreezes nothing: closes every proxied connection
            stop.set()
            await asyncio.gather(*tasks)
            if db is not None:
                await db.close()
            if pool is not None:
                pool.terminate()
        # Writes that went through only once the proxy closed (at the end) do not count.
        limit = command + RESUME_LIMIT
        first_write = min((t for t in successes if command < t <= limit), default=math.inf)
        return FailoverRun(first_write - command, first_write - promoted, errors)


async def failover(runs: int, writers: int) -> dict[str, dict[str, list[FailoverRun]]]:
    results: dict[str, dict[str, list[FailoverRun]]] = {}
    for fault in FAULTS:
        results[fault] = {"client": [], "asyncpg": []}
        for _ in range(runs):
            for kind, out in results[fault].items():
                out.append(await _failover_once(kind, writers, fault))
    return results


def _ms(seconds: float) -> str:
    if math.isinf(seconds):
        return f"none within {RESUME_LIMIT:g} s"
    return f"{seconds * 1000:.0f}"


def report(tput: list[Throughput], fo: dict[str, dict[str, list[FailoverRun]]], rounds: int,
           seconds: float, writers: int) -> str:  # fmt: skip
    lines = [
        f"{TASKS} concurrent tasks; both sides use pools of the same size with command_timeout="
        f"{COMMAND_TIMEOUT:g}s; one primary and one streaming standby on loopback (the server "
        f"shares the 2 cores with the client). {rounds} rounds of {seconds:g}s per case, in a "
        "new random order each round; the client runs with its default hooks (Prometheus and "
        "structlog). With a pool smaller than the number of tasks, most calls wait for a "
        "connection, and the client bounds that wait (acquire_timeout); asyncpg does not.",
        "",
        "### Throughput (calls per second)",
        "",
        "| operation | pool size | raw asyncpg pool | FailoverClient | client / raw "
        "(median of per-round ratios) | interquartile range |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in tput:
        lines.append(
            f"| {t.name} | {t.pool_size} | {statistics.median(t.raw):,.0f} | "
            f"{statistics.median(t.client):,.0f} | {t.ratio:.1%} | "
            f"{t.spread[0]:.1%} to {t.spread[1]:.1%} |"
        )
    lines += [
        "",
        "### Writes through a failover",
        "",
        f"{writers} writers insert rows in a loop, then the fault strikes and the standby is "
        "promoted with `pg_promote(true)` (which returns up to 100 ms after the server accepts "
        f"writes). Both sides: connect timeout {CONNECT_TIMEOUT:g} s, command_timeout "
        f"{COMMAND_TIMEOUT:g} s, pools of {POOL_SIZE}. The plain pool's writers retry every "
        "error after 10 ms. Fresh cluster per run; median over "
        f"{len(fo['crash']['client'])} runs, each run's errors summed.",
        "",
        "| fault | client | first write after the promote command (ms) | after pg_promote() "
        "returned (ms) | errors seen by writers |",
        "|---|---|---:|---:|---|",
    ]
    labels = {
        "client": "FailoverClient",
        "asyncpg": 'asyncpg pool, both hosts, `target_session_attrs="read-write"`',
    }
    for fault, by_kind in fo.items():
        for kind, runs in by_kind.items():
            total: Counter[str] = Counter()
            for r in runs:
                total.update(r.errors)
            errs = ", ".join(f"{n} {name}" for name, n in total.most_common()) or "none"
            lines.append(
                f"| {fault} | {labels[kind]} | "
                f"{_ms(statistics.median(r.from_command for r in runs))} | "
                f"{_ms(statistics.median(r.from_promoted for r in runs))} | {errs} |"
            )
    lines += [""] + [f"- **{fault}**: {text}." for fault, text in FAULTS.items()]
    lines += [
        "",
        "FailoverClient's errors are the writes in flight when the primary failed: their "
        "outcome is unknown, so it raises `CommitOutcomeUnknownError` instead of retrying them "
        "(after a partition, when their statements time out or when the client fences the old "
        "primary, whichever comes first). Every other write waits for the new primary. The "
        "plain pool walks its host list for every new connection with one timeout for the "
        "whole walk (asyncpg#1155): behind a silent first host it never reaches the new primary.",
    ]
    return "\n".join(lines)


def main() -> None:
    # asyncpg logs every failed attempt to refill a pool's floor (the crashed primary): noise here.
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing")
    args = parser.parse_args()
    rounds, seconds, runs, writers = (4, 0.3, 1, 8) if args.quick else (40, 0.5, 2, 16)
    tput = asyncio.run(throughput(rounds, seconds))
    fo = asyncio.run(failover(runs, writers))
    text = report(tput, fo, rounds, seconds, writers)
    print(text)
    if not args.quick:
        write_section("postgres", "PostgreSQL failover client (benchmarks/bench_postgres.py)", text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
