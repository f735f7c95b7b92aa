"""Health endpoint under load: the registry's ASGI app vs a hand-written FastAPI health endpoint.

Both serve ``/health`` under uvicorn (one process each) with the same five checks: PostgreSQL
(``SELECT 1`` through an asyncpg pool), Redis (``PING``), disk, memory and five circuit breakers,
against real servers the testing kit starts on loopback. The FastAPI endpoint runs the checks on
every request (concurrently, with ``asyncio.gather``), as hand-written endpoints do; the registry
caches each result for its TTL (1 s) and shares one run among concurrent probes.

A separate process generates the load, at 100 and then 1,000 concurrent probes, each run
bounded by a request count and a time limit; the targets alternate within each concurrency
level. Two load generators run in turn: httpx async clients (10 connections each: httpx pools
slow down sharply with many connections), and a minimal keep-alive HTTP/1.1 client that costs
far less CPU than the server it loads (on a small machine the httpx generator saturates before
the server does). A third run paces the probes (``PACED_RATE`` requests per second in total,
each connection on its own period, as Kubernetes probes come) to compare latency below
saturation. Reported: requests per second and the latency percentiles seen by the client.

Run: ``python -m benchmarks.bench_health`` (``--quick`` for a short validation run,
``--no-write`` to leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

TARGETS = ("veritas", "fastapi")
PACED_RATE = 250.0
"""Requests per second, in total, of the paced load (as probes that come every few seconds)."""


# -- the checks, shared by both servers ------------------------------------------------------------


class Dependencies:
    """The five checks, over connections opened on first use."""

    def __init__(self, dsn: str, redis_host: str, redis_port: int) -> None:
        self.dsn = dsn
        self.redis_host = redis_host
        self.redis_port = redis_port
        self._pool: Any = None
        self._redis: Any = None
        self._lock = asyncio.Lock()
        from veritas_resilience import CircuitBreakerRegistry

        self.breakers = CircuitBreakerRegistry(hooks=[])
        for name in ("payments", "search", "users", "stock", "mail"):
            self.breakers.get(name)

    async def _connect(self) -> None:
        async with self._lock:
            if self._pool is None:
                import asyncpg
                import redis.asyncio

                self._redis = redis.asyncio.Redis(host=self.redis_host, port=self.redis_port)
                self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10)

    async def postgres(self) -> float:
        """``SELECT 1``; its round trip in ms."""
        if self._pool is None:
            await self._connect()
        started = time.perf_counter()
        await self._pool.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000.0

    async def redis(self) -> float:
        """``PING``; its round trip in ms."""
        if self._redis is None:
            await self._connect()
        started = time.perf_counter()
        await self._redis.ping()
        return (time.perf_counter() - started) * 1000.0


def veritas_app(deps: Dependencies) -> Any:
    """The registry with the five checks, as its ASGI app."""
    from veritas_resilience.health import HealthRegistry, checks

    health = HealthRegistry(service="bench", version="1", hooks=[])
    health.add("postgres", deps.postgres, critical=True)
    health.add("redis", deps.redis)
    health.add("disk", checks.disk("/"))
    health.add("memory", checks.memory())
    health.add("breakers", checks.breakers(deps.breakers))
    return health.asgi(details="always")


def fastapi_app(deps: Dependencies) -> Any:
    """A hand-written FastAPI health endpoint running the same checks on every request."""
    import psutil
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        results: dict[str, Any] = {}

        async def run(name: str, check: Callable[[], Awaitable[float]]) -> None:
            try:
                results[name] = {"status": "pass", "observedValue": await check()}
            except Exception as exc:
                results[name] = {"status": "fail", "output": str(exc)}

        await asyncio.gather(run("postgres", deps.postgres), run("redis", deps.redis))
        usage = psutil.disk_usage("/")
        results["disk"] = {"status": "pass", "observedValue": usage.percent}
        memory = psutil.virtual_memory()
        results["memory"] = {"status": "pass", "observedValue": memory.percent}
        results["breakers"] = {
            "status": "pass",
            "observedValue": {b.name: b.state.value for b in deps.breakers},
        }
        failed = results["postgres"]["status"] == "fail"
        return JSONResponse(
            {"status": "fail" if failed else "pass", "checks": results},
            status_code=503 if failed else 200,
        )

    return app


def serve(target: str, port: int, dsn: str, redis_host: str, redis_port: int, http: str) -> None:
    """Serve one target with uvicorn on a loopback port (a child process).

    ``http`` is uvicorn's HTTP/1.1 implementation: ``h11`` (pure Python) or ``httptools`` (C,
    with uvloop as the event loop: what ``uvicorn[standard]`` installs).
    """
    import uvicorn

    deps = Dependencies(dsn, redis_host, redis_port)
    app = veritas_app(deps) if target == "veritas" else fastapi_app(deps)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="error",
        access_log=False,
        backlog=4096,
        http=http,
        loop="uvloop" if http == "httptools" else "asyncio",
    )


# -- the load generator ----------------------------------------------------------------------------


class _RawClient:
    """A minimal HTTP/1.1 keep-alive client on one connection: a load generator that costs the
    loop far less than the server it measures."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self._address = (host, int(port))
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        if self._streams is None:
            self._streams = await asyncio.open_connection(*self._address)
        reader, writer = self._streams
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


async def load(
    url: str, concurrency: int, requests: int, duration: float, kind: str = "httpx"
) -> dict[str, Any]:
    """Send ``requests`` GETs of /health from ``concurrency`` tasks (or stop at ``duration``).

    ``kind`` is ``"httpx"`` (httpx async clients of 10 connections each) or ``"raw"`` (one
    minimal keep-alive connection per task).
    """
    import httpx

    per_client = 10  # httpx pools slow down sharply with many connections each
    clients = [
        httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client),
            timeout=60.0,
        )
        for _ in range(math.ceil(concurrency / per_client))
    ]
    raws = [_RawClient(url) for _ in range(concurrency)] if kind in ("raw", "paced") else []
    pace = 0.0
    origin = 0.0
    latencies: list[float] = []
    errors = 0
    left = requests
    deadline = 0.0

    async def worker(index: int) -> None:
        nonlocal left, errors
        client = clients[index % len(clients)]
        sent = 0
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            if pace:
                # Each connection probes on its own schedule; together they send PACED_RATE/s.
                due = origin + (sent * concurrency + index) / pace
                sent += 1
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            try:
                if raws:
                    status = await raws[index].get("/health")
                else:
                    status = (await client.get("/health")).status_code
                if status != 200:
                    errors += 1
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    # Warm up: open the connections and the servers' pools.
    deadline = time.perf_counter() + 30.0
    left = concurrency
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    latencies.clear()
    errors = 0
    left = requests
    pace = PACED_RATE if kind == "paced" else 0.0
    origin = time.perf_counter()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    for raw in raws:
        await raw.aclose()
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000.0

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


# -- the orchestration -----------------------------------------------------------------------------


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer /health with 200 within {timeout} s")


def run_load(
    url: str, concurrency: int, requests: int, duration: float, kind: str
) -> dict[str, Any]:
    """Run the load generator in its own process and return what it measured."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_health",
            "load",
            url,
            str(concurrency),
            str(requests),
            str(duration),
            kind,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main_run(quick: bool, http: str, kinds: tuple[str, ...]) -> str:
    """Start the servers, measure both targets at 100 and 1,000 probes, return the report."""
    from veritas_resilience.testing import LocalPostgresCluster, LocalRedisSentinel, free_port

    rounds = 1 if quick else 2
    levels = {100: 500 if quick else 5000, 1000: 1000 if quick else 10000}
    duration = 5.0 if quick else 12.0
    with (
        LocalPostgresCluster(standbys=0) as cluster,
        LocalRedisSentinel(num_replicas=1, num_sentinels=1) as kit,
    ):
        redis_host, redis_port = kit.master
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for target in TARGETS:
                port = free_port()
                args = [target, str(port), cluster.primary.dsn, redis_host, str(redis_port), http]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_health", "serve", *args]
                )
                servers[target] = (proc, f"http://127.0.0.1:{port}")
            for _, url in servers.values():
                _wait_ready(url)
            reports = []
            for kind in kinds:
                results: dict[tuple[str, int], list[dict[str, Any]]] = {}
                for concurrency, requests in levels.items():
                    for _ in range(rounds):
                        for target in TARGETS:
                            url = servers[target][1]
                            count = requests if kind != "paced" else int(PACED_RATE * duration)
                            got = run_load(url, concurrency, count, duration, kind)
                            results.setdefault((target, concurrency), []).append(got)
                            print(kind, target, concurrency, json.dumps(got), flush=True)
                reports.append(report(results, levels, rounds, kind, http))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    return "\n".join(reports)


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def report(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    levels: dict[int, int],
    rounds: int,
    kind: str,
    http: str,
) -> str:
    """The Markdown table and summary of one load generator."""
    generator = {
        "httpx": "httpx async clients of 10 connections each",
        "raw": "a minimal keep-alive HTTP/1.1 client, one connection per probe",
        "paced": f"paced probes: {PACED_RATE:.0f} requests/s in total over the connections, "
        "each connection on its own schedule (the minimal client)",
    }[kind]
    server = "h11" if http == "h11" else "httptools, uvloop"
    lines = [
        f"### Load from {generator}",
        "",
        f"Five checks (PostgreSQL `SELECT 1`, Redis `PING`, disk, memory, 5 breakers) on real "
        f"loopback servers; uvicorn ({server}), one process per target; load from a separate "
        f"process; median of {rounds} alternating round(s) per row.",
        "",
        "| target | concurrent probes | requests/s | p50 (ms) | p99 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    summary: dict[tuple[str, int], tuple[float, float]] = {}
    for concurrency in levels:
        for target in TARGETS:
            runs = results[(target, concurrency)]
            rps = _median([r["rps"] for r in runs])
            p50 = _median([r["p50_ms"] for r in runs])
            p99 = _median([r["p99_ms"] for r in runs])
            errors = sum(r["errors"] for r in runs)
            summary[(target, concurrency)] = (rps, p99)
            label = "veritas HealthApp" if target == "veritas" else "hand-written FastAPI"
            lines.append(
                f"| {label} | {concurrency} | {rps:,.0f} | {p50:.1f} | {p99:.1f} | {errors} |"
            )
    low, high = sorted(levels)
    ratios = [summary[("veritas", c)][0] / summary[("fastapi", c)][0] for c in levels]
    growth = summary[("veritas", high)][1] / summary[("veritas", low)][1]
    fa_growth = summary[("fastapi", high)][1] / summary[("fastapi", low)][1]
    lines.append("")
    if kind != "paced":
        lines.append(
            f"- Requests/s, veritas over FastAPI: {ratios[0]:.1f}× at {low} probes, "
            f"{ratios[1]:.1f}× at {high} "
            f"(target ≥ 5×: {'met' if min(ratios) >= 5 else 'not met'})."
        )
    lines.append(
        f"- p99 from {low} to {high} concurrent probes: veritas ×{growth:.1f}, "
        f"FastAPI ×{fa_growth:.1f}."
    )
    return "\n".join(lines) + "\n"


READING = {
    "h11": """\
Reading these numbers: each row's server, database, Redis and load generator share the
machine's two cores. With uvicorn's default pure-Python HTTP/1.1 parser (h11) the HealthApp rows
are bound by parsing and writing HTTP, not by the checks: in process the app answers far more
probes a second than h11 can parse, because an unchanged body is reused. With httpx the load
generator saturates before either server. The section "uvicorn with httptools and uvloop" runs
the same app under `uvicorn[standard]`, the usual production install. The paced rows send probes
the way Kubernetes does, each connection on its own period: there p99 stays flat from 100 to
1,000 probers for the HealthApp. In the closed-loop rows both servers are saturated, and latency
grows with the number of probers for both (Little's law: latency = probers / throughput).
""",
    "httptools": """\
Reading these numbers: with uvicorn's C parser (httptools on uvloop) the HTTP layer no
longer bounds the HealthApp, and the ≥ 5× target is read from these rows. The paced rows send
probes the way Kubernetes does, each connection on its own period: p99 stays flat from 100 to
1,000 probers. In the closed-loop rows the servers are saturated, so latency grows with the number
of probers for both (Little's law: latency = probers / throughput); the hand-written endpoint's
grows faster because every probe queues for its pool's PostgreSQL connections.
""",
}


def main() -> None:
    """Command line: run the benchmark, or one of its child processes."""
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _, _, target, port, dsn, host, redis_port, http = sys.argv
        serve(target, int(port), dsn, host, int(redis_port), http)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        _, _, url, concurrency, requests, duration, kind = sys.argv
        result = asyncio.run(load(url, int(concurrency), int(requests), float(duration), kind))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short validation run")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--http",
        choices=("h11", "httptools"),
        default="h11",
        help="uvicorn's HTTP implementation (httptools runs on uvloop); each has its own section",
    )
    parser.add_argument(
        "--kinds",
        default="httpx,raw,paced",
        help="load generators to run, comma-separated (httpx, raw, paced)",
    )
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - {"httpx", "raw", "paced"}
    if unknown or not kinds:
        parser.error(f"--kinds takes httpx, raw and paced, got {args.kinds!r}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    body = main_run(args.quick, args.http, kinds) + "\n" + READING[args.http]
    print(body)
    if not args.no_write and not args.quick:
        from benchmarks._results import write_section

        key, title = "health", "Health endpoint: HealthApp vs a hand-written FastAPI endpoint"
        if args.http != "h11":
            key, title = f"health-{args.http}", f"{title} (uvicorn with {args.http} and uvloop)"
        write_section(key, title, body)


if __name__ == "__main__":
    main()
