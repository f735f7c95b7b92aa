"""Helpers shared by the PostgreSQL client's integration tests (not a test module)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

from veritas_resilience.postgres import FailoverClient
from veritas_resilience.testing import LocalPostgresCluster, PostgresNode

T = TypeVar("T")

# Fast enough that a whole failover takes a fraction of a second on loopback.
FAST: dict[str, Any] = {
    "monitor_interval": 0.2,
    "fast_interval": 0.02,
    "connect_timeout": 1.0,
    "command_timeout": 2.0,
    "probe_timeout": 0.5,
    "failover_timeout": 10.0,
    "release_timeout": 0.5,
    "min_size": 1,
    "max_size": 5,
    "breaker_options": {"reset_timeout": 0.5},
    "hooks": [],
}


@asynccontextmanager
async def client(nodes: Any, **options: Any) -> AsyncIterator[FailoverClient]:
    """A started client with the fast test settings (overridable), closed afterwards."""
    db = FailoverClient(nodes, **{**FAST, **options})
    await db.start()
    try:
        yield db
    finally:
        await db.close()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    limit: float = 10.0,
    what: str = "the condition",
) -> float:
    """Poll ``check`` until it is true; return how long that took, or fail after ``limit`` s."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await anyio.sleep(0.01)


async def query(cluster: LocalPostgresCluster, node: PostgresNode, sql: str) -> str:
    """Run SQL through the kit (psql) without blocking the event loop."""
    return await anyio.to_thread.run_sync(cluster.query, node, sql)


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Run one of the kit's blocking operations in a worker thread."""
    return await anyio.to_thread.run_sync(fn, *args)


def readable(db: FailoverClient, node: str) -> Callable[[], bool]:
    """A check: the client routes reads to the node called ``node``."""
    state = db._topology.nodes[[n.name for n in db.nodes].index(node)]
    return lambda: state in db._topology.readable


def name(node: PostgresNode) -> str:
    """The client's name for a kit node."""
    return f"{node.host}:{node.port}"


HELD_PATHS = (
    "transaction",
    "prepared statement",
    "cursor",
    "cursor iteration",
    "acquire",
    "acquire + own transaction",
)


async def hold(db: FailoverClient, path: str, ready: asyncio.Event, go: asyncio.Event) -> str:
    """Hold a connection along ``path``; once ``go`` is set, use it again. Return the type name
    of what the block raised, and of what leaving it raised when that differs."""
    inside = "nothing"
    try:
        session = db.acquire() if path.startswith("acquire") else db.transaction()
        async with session as conn:
            if path == "acquire + own transaction":
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    ready.set()
                    await go.wait()
                    try:
                        await conn.execute("SELECT 2")
                    except Exception as exc:
                        inside = type(exc).__name__
                        raise
            statement = await conn.prepare("SELECT generate_series(1, 10)")
            cursor = (
                await conn.cursor("SELECT generate_series(1, 10)") if "cursor" in path else None
            )
            ready.set()
            await go.wait()
            try:
                if path in ("transaction", "acquire"):
                    await conn.execute("SELECT 2")
                elif path == "prepared statement":
                    await statement.fetch()
                elif path == "cursor":
                    assert cursor is not None
                    await cursor.fetch(5)
                else:
                    async for _ in conn.cursor("SELECT generate_series(1, 10)"):
                        pass
            except Exception as exc:
                inside = type(exc).__name__
                raise
    except Exception as exc:
        outside = type(exc).__name__
        return inside if outside == inside else f"{inside} then {outside}"
    return inside


async def held_outcomes(
    db: FailoverClient, fault: Callable[[], Awaitable[object]]
) -> dict[str, str]:
    """Hold a connection along every path of HELD_PATHS, run ``fault``, use them all again;
    return what each path raised (see :func:`hold`)."""
    go = asyncio.Event()
    readies = [asyncio.Event() for _ in HELD_PATHS]
    tasks = [
        asyncio.create_task(hold(db, path, ready, go)) for path, ready in zip(HELD_PATHS, readies)
    ]
    await asyncio.gather(*(r.wait() for r in readies))
    await fault()
    go.set()
    return dict(zip(HELD_PATHS, await asyncio.gather(*tasks)))
