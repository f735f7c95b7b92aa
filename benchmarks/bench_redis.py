"""The Sentinel client against raw redis-py: throughput, and a failover side by side.

Run: ``python -m benchmarks.bench_redis`` (``--quick`` for a smoke run that writes nothing).

1. **Throughput.** GET/SET through :class:`~veritas_resilience.redis.SentinelRedis` (default hooks:
   Prometheus and structlog) and through a plain ``redis.asyncio.Redis`` connected straight to the
   same master, in alternating rounds in one process, with 1 and with 32 concurrent tasks. Each
   round is timed in wall time and in CPU time of this process (the machine is shared; CPU time
   per operation is the steadier measure of client overhead). Target: >= 95 % of raw.
2. **Failover.** The same fault for two clients on fresh topologies: our client with its defaults,
   and redis-py's ``Sentinel(...).master_for()`` as its documentation sets it up. Twenty tasks
   write unique keys; a Sentinel's ``+switch-master`` is timestamped by a separate subscriber.
   After the failover has settled, every acknowledged key is looked up on the new master: a key
   that is missing was acknowledged by the old master and lost when it was demoted. Reported:
   time from ``+switch-master`` to the first acknowledged write that survived, the longest gap
   between surviving writes, errors seen by callers, and acknowledged writes lost.
   Faults: ``SENTINEL FAILOVER`` and ``kill -9`` of the master.
3. **A paused master** (``--sigstop``, its own section "redis-sigstop"). The master is frozen with
   SIGSTOP for 4.5 s (the Sentinels fail over after about 2 s) while 200 tasks RPUSH unique ids,
   each call under a 3 s deadline: the client's ``RetryPolicy(deadline=3)`` for ours,
   ``asyncio.wait_for(..., 3)`` around each call for ``master_for()`` (redis-py has no
   deadline of its own). Reported: the longest call, caller errors by type, acknowledged ids
   missing from the new master once the old one has been demoted, and the time from
   ``+switch-master`` to the first acknowledged write that survived.

It prints the tables and writes the "redis" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import redis.asyncio
import redis.asyncio.sentinel

from benchmarks._results import write_section
from veritas_resilience.redis import RetryPolicy, SentinelRedis
from veritas_resilience.testing import LocalRedisSentinel

Address = tuple[str, int]


# -- throughput -----------------------------------------------------------------------------------


async def _round(client: redis.asyncio.Redis, tasks: int, ops: int) -> tuple[float, float]:
    """Run ``ops`` GET/SET pairs split over ``tasks`` tasks; return (wall s, CPU s)."""
    per_task = ops // tasks

    async def work(index: int) -> None:
        key = f"bench:{index}"
        for i in range(per_task):
            if i & 1:
                await client.get(key)
            else:
                await client.set(key, i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(work(i) for i in range(tasks)))
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Throughput:
    tasks: int
    ops: int
    raw_wall: list[float] = field(default_factory=list)
    raw_cpu: list[float] = field(default_factory=list)
    ours_wall: list[float] = field(default_factory=list)
    ours_cpu: list[float] = field(default_factory=list)

    def row(self) -> str:
        raw_ops = self.ops / statistics.median(self.raw_wall)
        our_ops = self.ops / statistics.median(self.ours_wall)
        raw_us = statistics.median(self.raw_cpu) / self.ops * 1e6
        our_us = statistics.median(self.ours_cpu) / self.ops * 1e6
        return (
            f"| {self.tasks} | {raw_ops:,.0f} | {our_ops:,.0f} | {our_ops / raw_ops:.1%} "
            f"| {raw_us:.1f} | {our_us:.1f} | {raw_us / our_us:.1%} |"
        )


async def throughput(quick: bool) -> tuple[list[Throughput], str]:
    kit = LocalRedisSentinel()
    await asyncio.to_thread(kit.start)
    try:
        master = kit.master
        raw = redis.asyncio.Redis(host=master[0], port=master[1])
        ours = SentinelRedis(kit.sentinels, kit.service_name)
        await ours.initialize()
        results = []
        rounds = 3 if quick else 9
        for tasks, ops in ((1, 4_000 if quick else 20_000), (32, 8_000 if quick else 40_000)):
            result = Throughput(tasks, ops)
            await _round(raw, tasks, ops // 4)  # warm both pools up to `tasks` connections
            await _round(ours, tasks, ops // 4)
            for i in range(rounds):
                order = [
                    (raw, result.raw_wall, result.raw_cpu),
                    (ours, result.ours_wall, result.ours_cpu),
                ]
                for client, walls, cpus in order if i % 2 == 0 else reversed(order):
                    wall, cpu = await _round(client, tasks, ops)
                    walls.append(wall)
                    cpus.append(cpu)
            results.append(result)
        await raw.aclose()
        await ours.aclose()
        load = os.getloadavg()[0]
        return results, f"{rounds} alternating rounds per case; load average at the end {load:.1f}"
    finally:
        kit.stop()


# -- failover -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    client: str
    fault: str
    resume: float | None  # +switch-master to the first surviving acknowledged write
    gap: float  # longest gap between surviving acknowledged writes around the fault
    errors: int
    lost: int
    acked: int


async def _switch_time(sentinel: Address, found: asyncio.Future[float]) -> None:
    client = redis.asyncio.Redis(host=sentinel[0], port=sentinel[1])
    pubsub = client.pubsub()
    await pubsub.subscribe("+switch-master")
    try:
        async for message in pubsub.listen():
            if message["type"] == "message" and not found.done():
                found.set_result(time.monotonic())
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await client.aclose()


async def failover_run(which: str, fault: str) -> Outcome:
    kit = LocalRedisSentinel()
    await asyncio.to_thread(kit.start)
    sentinel_manager = None
    try:
        if which == "veritas SentinelRedis":
            client: redis.asyncio.Redis = SentinelRedis(kit.sentinels, kit.service_name, hooks=[])
            await client.initialize()
        else:
            sentinel_manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
                kit.sentinels, socket_timeout=0.5
            )
            client = sentinel_manager.master_for(kit.service_name, socket_timeout=0.5)
        found: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        watcher = asyncio.ensure_future(_switch_time(kit.sentinels[0], found))
        acked: list[tuple[float, str]] = []
        errors = 0
        stop = False

        async def writer(index: int) -> None:
            nonlocal errors
            seq = 0
            while not stop:
                seq += 1
                key = f"w:{index}:{seq}"
                try:
                    await client.set(key, seq)
                except Exception:
                    errors += 1
                    await asyncio.sleep(0.01)
                else:
                    acked.append((time.monotonic(), key))
                await asyncio.sleep(0.005)

        writers = [asyncio.ensure_future(writer(i)) for i in range(20)]
        await asyncio.sleep(0.5)
        # Replicas in sync before the fault: a replica still in its first full sync is empty,
        # and promoting it would lose writes whichever client made them.
        await asyncio.to_thread(kit.wait_replicas_synced, 30)
        fault_at = time.monotonic()
        if fault == "SENTINEL FAILOVER":
            await asyncio.to_thread(kit.failover, 15.0)
        else:
            old = await asyncio.to_thread(kit.kill_master)
            await asyncio.to_thread(kit.wait_for_master_change, old, 30.0)
        switched = await asyncio.wait_for(found, 30)
        await asyncio.sleep(4.0)  # past the old master's conversion and the clients' recovery
        stop = True
        await asyncio.gather(*writers)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(kit.wait_replicas_synced, 30)
        master = kit.master
        check = redis.asyncio.Redis(host=master[0], port=master[1])
        present: list[int] = []
        keys = [key for _, key in acked]
        for start in range(0, len(keys), 500):
            pipe = check.pipeline(transaction=False)
            for key in keys[start : start + 500]:
                pipe.exists(key)
            present.extend(await pipe.execute())
        await check.aclose()
        surviving = sorted(t for (t, _), p in zip(acked, present) if p)
        after = [t for t in surviving if t >= switched]
        window = [t for t in surviving if t >= fault_at - 0.1]
        gap = max((b - a for a, b in itertools.pairwise(window)), default=0.0)
        await client.aclose()
        return Outcome(
            which,
            fault,
            resume=(after[0] - switched) if after else None,
            gap=gap,
            errors=errors,
            lost=len(present) - sum(present),
            acked=len(acked),
        )
    finally:
        if sentinel_manager is not None:
            await sentinel_manager.aclose()
        kit.stop()


async def failovers(quick: bool) -> list[list[Outcome]]:
    runs = 1 if quick else 3
    table: list[list[Outcome]] = []
    for fault in ("SENTINEL FAILOVER", "kill -9"):
        for which in ("veritas SentinelRedis", "redis-py Sentinel.master_for()"):
            table.append([await failover_run(which, fault) for _ in range(runs)])
    return table


# -- a paused master (SIGSTOP) --------------------------------------------------------------------

PAUSE = 4.5
DEADLINE = 3.0
WRITERS = 200


@dataclass
class Stall:
    client: str
    longest: float  # the longest call, failed or not
    resume: float | None  # +switch-master to the first surviving acknowledged write
    lost: int
    acked: int
    errors: dict[str, int]


async def sigstop_run(which: str) -> Stall:
    """One 4.5 s SIGSTOP of the master under 200 writers with a 3 s deadline per call."""
    kit = LocalRedisSentinel()
    await asyncio.to_thread(kit.start)
    sentinel_manager = None
    try:
        ours = which == "veritas SentinelRedis"
        if ours:
            client: redis.asyncio.Redis = SentinelRedis(
                kit.sentinels, kit.service_name, retry=RetryPolicy(deadline=DEADLINE), hooks=[]
            )
            await client.initialize()
        else:
            # Short timeouts towards the Sentinels; redis-py's default ones towards the data
            # nodes, as for ours (the deadline is the caller's asyncio.wait_for).
            sentinel_manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
                kit.sentinels, sentinel_kwargs={"socket_timeout": 0.5}
            )
            client = sentinel_manager.master_for(kit.service_name)
        found: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        watcher = asyncio.ensure_future(_switch_time(kit.sentinels[0], found))
        acked: list[tuple[float, str]] = []
        errors: dict[str, int] = {}
        longest = 0.0
        stop = False

        async def push(ident: str) -> None:
            if ours:
                await client.rpush("ids", ident)
            else:
                await asyncio.wait_for(client.rpush("ids", ident), DEADLINE)

        async def writer(index: int) -> None:
            nonlocal longest
            seq = 0
            while not stop:
                seq += 1
                ident = f"{index}:{seq}"
                started = time.monotonic()
                try:
                    await push(ident)
                except Exception as exc:
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                    await asyncio.sleep(0.01)
                else:
                    acked.append((time.monotonic(), ident))
                longest = max(longest, time.monotonic() - started)
                await asyncio.sleep(0.005)

        writers = [asyncio.ensure_future(writer(i)) for i in range(WRITERS)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(kit.wait_replicas_synced, 30)
        try:
            old = kit.pause_master(PAUSE)
            await asyncio.to_thread(kit.wait_for_master_change, old, 30.0)
            switched = await asyncio.wait_for(found, 30)
            await asyncio.sleep(PAUSE + 3.0)  # the old master wakes, is demoted, clients recover
        finally:
            kit.resume_master()
        stop = True
        await asyncio.gather(*writers)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(kit.wait_replicas_synced, 30)
        master = kit.master
        check = redis.asyncio.Redis(host=master[0], port=master[1], decode_responses=True)
        present = set(await check.lrange("ids", 0, -1))
        await check.aclose()
        surviving = sorted(t for t, ident in acked if ident in present)
        after = [t for t in surviving if t >= switched]
        await client.aclose()
        return Stall(
            which,
            longest=longest,
            resume=(after[0] - switched) if after else None,
            lost=sum(1 for _, ident in acked if ident not in present),
            acked=len(acked),
            errors=errors,
        )
    finally:
        kit.resume_master()
        if sentinel_manager is not None:
            await sentinel_manager.aclose()
        kit.stop()


async def sigstops(quick: bool) -> list[list[Stall]]:
    runs = 1 if quick else 3
    table: list[list[Stall]] = [[], []]
    for _ in range(runs):  # alternate the clients, so both see the same machine load
        table[0].append(await sigstop_run("veritas SentinelRedis"))
        table[1].append(await sigstop_run("redis-py Sentinel.master_for()"))
    return table


def report_sigstop(table: list[list[Stall]]) -> str:
    lines = [
        f"### Master paused (SIGSTOP) for {PAUSE:g} s: {WRITERS} writers, {DEADLINE:g} s deadline",
        "",
        "Each task RPUSHes unique ids; fresh topology per run (`down-after-milliseconds` 1000). "
        "Medians of the runs, the worst in brackets. *longest*: the longest call, failed or not. "
        "*resume*: from `+switch-master` to the first acknowledged write that survived (target "
        "<= 0.5 s). *lost*: acknowledged ids missing from the new master after the old one was "
        "demoted. Errors: what callers got, summed over the runs.",
        "",
        "| client | runs | longest call (s) | resume (s) | acked | acked then lost | errors |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for runs in table:
        resumes = [r.resume for r in runs if r.resume is not None]
        longest = [r.longest for r in runs]
        errors: dict[str, int] = {}
        for r in runs:
            for name, count in r.errors.items():
                errors[name] = errors.get(name, 0) + count
        lines.append(
            f"| {runs[0].client} | {len(runs)} "
            f"| {_median(longest):.2f} [{max(longest):.2f}] "
            f"| {_median(resumes):.3f} [{max(resumes, default=float('nan')):.3f}] "
            f"| {statistics.median(r.acked for r in runs):.0f} "
            f"| {statistics.median(r.lost for r in runs):.0f} [{max(r.lost for r in runs)}] "
            f"| {', '.join(f'{n} {c}' for n, c in sorted(errors.items())) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: list[Throughput], note: str, table: list[list[Outcome]]) -> str:
    lines = [
        "### Throughput: GET/SET through SentinelRedis vs raw redis.asyncio.Redis (same master)",
        "",
        f"Alternating GET and SET on a few keys. {note}. Medians.",
        "",
        "| tasks | raw ops/s | ours ops/s | ours / raw (wall) | raw CPU µs/op | ours CPU µs/op "
        "| ours / raw (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(r.row() for r in results),
        "",
        "### Failover: 20 writers of unique keys, same fault, fresh topology per run",
        "",
        "Medians of the runs (and the worst run in brackets). *resume*: from the Sentinels' "
        "`+switch-master` to the first write acknowledged after it that survived. *gap*: the "
        "longest time without a surviving write around the fault (for SentinelRedis under "
        "SENTINEL FAILOVER: the writes it holds from the start of the failover to the promotion "
        "of the replica). *lost*: writes acknowledged by the old master after the replica's "
        "promotion, gone once it was demoted.",
        "",
        "| fault | client | runs | resume (s) | gap (s) | caller errors | acked then lost |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for runs in table:
        first = runs[0]
        resumes = [r.resume for r in runs if r.resume is not None]
        gaps = [r.gap for r in runs]
        lines.append(
            f"| {first.fault} | {first.client} | {len(runs)} "
            f"| {_median(resumes):.3f} [{max(resumes, default=float('nan')):.3f}] "
            f"| {_median(gaps):.3f} [{max(gaps):.3f}] "
            f"| {statistics.median(r.errors for r in runs):.0f} [{max(r.errors for r in runs)}] "
            f"| {statistics.median(r.lost for r in runs):.0f} [{max(r.lost for r in runs)}] |"
        )
    return "\n".join(lines) + "\n"


async def main_async(quick: bool) -> str:
    results, note = await throughput(quick)
    table = await failovers(quick)
    return report(results, note, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing")
    parser.add_argument(
        "--sigstop", action="store_true", help="only the paused-master comparison (own section)"
    )
    args = parser.parse_args()
    if args.sigstop:
        text = report_sigstop(asyncio.run(sigstops(args.quick)))
        print(text)
        if not args.quick:
            title = "Redis: a paused master (benchmarks/bench_redis.py --sigstop)"
            write_section("redis-sigstop", title, text)
        return
    text = asyncio.run(main_async(args.quick))
    print(text)
    if not args.quick:
        write_section("redis", "Redis Sentinel client (benchmarks/bench_redis.py)", text)


if __name__ == "__main__":
    main()
