"""The PostgreSQL failover client against plain asyncpg: throughput, and writes through a failover.

Run: ``python -m benchmarks.bench_postgres`` (``--quick`` for a smoke run that writes nothing).
It needs the PostgreSQL server binaries (the testing kit starts its own clusters on loopback).

1. **Throughput**: ``SELECT 1`` and a small ``INSERT`` from 32 concurrent tasks, through
   :class:`~veritas_resilience.postgres.FailoverClient` and through a raw ``asyncpg`` pool to the
   same primary, in the same process, with pools of 10 (calls wait for connections) and of 32.
   Both pools have the same size and ``command_timeout``; the client runs with its default hooks
   (Prometheus and structlog). Each round runs every case once, in a new random order; the table
   reports medians, and the median of the per-round ratios. It runs twice: with the server and
   the client sharing the cores (the target's setting), then with the client on a CPU of its own
   (``--no-pin`` skips that run), where the client's CPU cost per call shows undiluted.
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
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
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


def _cluster_pids(cluster: LocalPostgresCluster) -> list[int]:
    """The PIDs of every server process of ``cluster`` (postmasters and their children)."""
    postmasters = set()
    for node in cluster.nodes:
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmasters.add(int((node.data_dir / "postmaster.pid").read_text().split()[0]))
    pids = set(postmasters)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = open(f"/proc/{entry.name}/stat").read()  # noqa: SIM115
                if int(stat.rsplit(")", 1)[1].split()[1]) in postmasters:
                    pids.add(int(entry.name))
    return sorted(pids)


@contextlib.contextmanager
def _pinned(cluster: LocalPostgresCluster, enabled: bool) -> Iterator[str]:
    """Run the servers on the first CPU and this process on the last, if there are two or more.

    Shared, the client's overhead is diluted by the server's work on the same cores. Pinned, the
    client process has one CPU of its own and is the bottleneck, as an application server in
    front of a separate database machine is when it runs flat out: the ratio then shows the
    client's CPU cost per call undiluted. New server backends inherit the postmaster's CPU.
    Yields a description of what was done, for the report.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled or len(cpus) < 2:
        yield "not pinned"
        return
    mine = os.sched_getaffinity(0)
    server, client = set(cpus[:-1]), {cpus[-1]}
    for pid in _cluster_pids(cluster):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, server)
    os.sched_setaffinity(0, client)
    try:
        yield f"servers pinned to CPU {sorted(server)}, the benchmark to CPU {sorted(client)}"
    finally:
        os.sched_setaffinity(0, mine)


async def throughput(rounds: int, seconds: float, pin: bool) -> tuple[list[Throughput], str]:
    with LocalPostgresCluster(standbys=1) as cluster:
        cluster.query(cluster.primary, "CREATE TABLE bench (id bigint PRIMARY KEY, v text)")
        results: list[Throughput] = []
        with _pinned(cluster, pin) as placement:
            for size in (POOL_SIZE, TASKS):
                results += await _throughput_with(cluster, size, rounds, seconds)
        return results, placement


def _throughput_table(tput: list[Throughput]) -> list[str]:
    lines = [
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
    lowest = min(tput, key=lambda t: t.ratio)
    lines += [
        "",
        f"Lowest median ratio: {lowest.ratio:.1%} ({lowest.name}, pool {lowest.pool_size}).",
    ]
    return lines


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


def report(shared: list[Throughput], pinned: tuple[list[Throughput], str] | None,
           fo: dict[str, dict[str, list[FailoverRun]]], rounds: int, seconds: float,
           writers: int) -> str:  # fmt: skip
    lowest = min(shared, key=lambda t: t.ratio)
    lines = [
        f"{TASKS} concurrent tasks; both sides use pools of the same size with command_timeout="
        f"{COMMAND_TIMEOUT:g}s; one primary and one streaming standby on loopback. {rounds} "
        f"rounds of {seconds:g}s per case, in a new random order each round; the client runs "
        "with its default hooks (Prometheus and structlog). With a pool smaller than the number "
        "of tasks, most calls wait for a connection, and the client bounds that wait "
        "(acquire_timeout); asyncpg does not.",
        "",
        "### Throughput (calls per second), server and client sharing the 2 cores",
        "",
        *_throughput_table(shared),
        f"Target ≥ 95%: {'met' if lowest.ratio >= 0.95 else 'NOT met'}.",
    ]
    if pinned is not None:
        lines += [
            "",
            "### Throughput, the client on a CPU of its own",
            "",
            f"The same, with the {pinned[1]}: the client process is the bottleneck, as an "
            "application server in front of a separate database machine is when it runs flat "
            "out, so the ratio shows the client's CPU cost per call undiluted by the server's "
            "work.",
            "",
            *_throughput_table(pinned[0]),
        ]
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
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="skip the second throughput run with the client on a CPU of its own",
    )
    args = parser.parse_args()
    rounds, seconds, runs, writers = (4, 0.3, 1, 8) if args.quick else (40, 0.5, 2, 16)
    shared, _ = asyncio.run(throughput(rounds, seconds, pin=False))
    pinned = None if args.no_pin else asyncio.run(throughput(rounds, seconds, pin=True))
    fo = asyncio.run(failover(runs, writers))
    text = report(shared, pinned, fo, rounds, seconds, writers)
    print(text)
    if not args.quick:
        write_section("postgres", "PostgreSQL failover client (benchmarks/bench_postgres.py)", text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
