"""The write paths a drill exercises: PostgreSQL, Redis, and a journal file on disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._workload import Outcome

if TYPE_CHECKING:
    from ..postgres import FailoverClient
    from ..redis import SentinelRedis

__all__ = ["JournalStore", "PostgresStore", "RedisStore"]

TABLE = "veritas_drill_writes"
KEY_PREFIX = "veritas-drill:"


class PostgresStore:
    """Writes rows through a :class:`~veritas_resilience.postgres.FailoverClient`.

    Each id is one ``INSERT`` into ``veritas_drill_writes`` (created if missing; the drill deletes
    its rows at the end). Reads go to a standby when one is fit (``prefer_standby``).
    """

    name = "postgres"

    def __init__(self, client: FailoverClient) -> None:
        self.client = client

    async def setup(self) -> None:
        """Create the table."""
        await self.client.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (tag text NOT NULL, id bigint NOT NULL, "
            "PRIMARY KEY (tag, id))",
            idempotent=True,
        )

    async def write(self, tag: str, item: int) -> None:
        """Insert one row."""
        await self.client.execute(f"INSERT INTO {TABLE} (tag, id) VALUES ($1, $2)", tag, item)

    async def read(self, tag: str) -> object:
        """Count the rows of the set."""
        return await self.client.fetchval(
            f"SELECT count(*) FROM {TABLE} WHERE tag = $1", tag, route="prefer_standby"
        )

    async def health(self) -> str:
        """The client's own health status: ``ok``, ``degraded`` or ``down``."""
        return (await self.client.health()).status

    async def cached_read(self, tag: str) -> object:
        """The same count, on the primary (the read behind the stale cache)."""
        return await self.client.fetchval(f"SELECT count(*) FROM {TABLE} WHERE tag = $1", tag)

    async def final_read(self, tag: str) -> set[int]:
        """Every id of the set, read on the primary."""
        rows = await self.client.fetch(f"SELECT id FROM {TABLE} WHERE tag = $1", tag)
        return {int(row["id"]) for row in rows}

    async def cleanup(self, tags: list[str]) -> None:
        """Delete the drill's rows."""
        await self.client.execute(f"DELETE FROM {TABLE} WHERE tag = ANY($1::text[])", tags)

    def classify(self, error: BaseException) -> Outcome:
        """Errors the client marks ``safe_to_retry`` had no effect; anything else may have."""
        from ..postgres import PostgresError

        if isinstance(error, PostgresError) and error.safe_to_retry:
            return "fail"
        return "info"


class NotReplicatedError(Exception):
    """The master acknowledged a write that no replica confirmed within the WAIT timeout."""


class RedisStore:
    """Adds ids to a Redis set through a :class:`~veritas_resilience.redis.SentinelRedis`.

    Each write is ``SADD`` then ``WAIT <replicas> <timeout>`` on the same connection (a
    non-transactional pipeline): a write counts as acknowledged only once ``replicas`` replicas
    have it, since Redis replicates asynchronously and a failover may otherwise drop it. A write
    the replicas did not confirm is indeterminate, never lost. ``replicas=0`` skips ``WAIT``.
    """

    name = "redis"

    def __init__(self, client: SentinelRedis, *, replicas: int = 1, wait_ms: int = 500) -> None:
        self.client = client
        self.replicas = replicas
        self.wait_ms = wait_ms

    async def write(self, tag: str, item: int) -> None:
        """SADD, then WAIT for the replicas."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(KEY_PREFIX + tag, item)
            if self.replicas:
                pipe.execute_command("WAIT", self.replicas, self.wait_ms)
            results: list[Any] = await pipe.execute()
        if self.replicas and int(results[-1]) < self.replicas:
            raise NotReplicatedError(
                f"{results[-1]} of {self.replicas} replicas confirmed within {self.wait_ms} ms"
            )

    async def read(self, tag: str) -> object:
        """SCARD of the set."""
        return await self.client.scard(KEY_PREFIX + tag)

    async def health(self) -> str:
        """The client's own health status: ``ok``, ``degraded`` or ``down``."""
        return str((await self.client.health()).status)

    async def final_read(self, tag: str) -> set[int]:
        """SMEMBERS of the set, on the master."""
        members = await self.client.smembers(KEY_PREFIX + tag)
        return {int(m) for m in members}

    async def cleanup(self, tags: list[str]) -> None:
        """Delete the drill's keys."""
        if tags:
            await self.client.delete(*(KEY_PREFIX + tag for tag in tags))

    def classify(self, error: BaseException) -> Outcome:
        """Only errors raised before anything was sent are definite failures."""
        from ..redis import NoMasterError, NoSentinelAvailableError, UnknownServiceError

        if isinstance(error, (NoMasterError, NoSentinelAvailableError, UnknownServiceError)):
            return "fail"
        return "info"


class JournalStore:
    """Appends ids to a journal file, one line each, flushed and fsynced before acknowledging.

    The file is reached through a symbolic link (``path``) to the real file (``path.data``). The
    disk-full scenario points the link at ``/dev/full``, on which every ``write(2)`` fails with a
    real ``ENOSPC`` from the kernel, and points it back afterwards. This needs no privilege, fills
    no real disk, and exercises the application's real write path (open, write, flush, fsync).
    """

    name = "disk"

    def __init__(self, directory: Path) -> None:
        self.data = directory / "journal.data"
        self.path = directory / "journal"
        self.data.touch()
        self.point_at(self.data)

    def point_at(self, target: Path) -> None:
        """Atomically point the journal's link at ``target``."""
        tmp = self.path.with_suffix(".link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.path)

    async def write(self, tag: str, item: int) -> None:
        """Append one line and fsync it (in a worker thread)."""
        await anyio.to_thread.run_sync(self._append, f"{tag} {item}\n".encode())

    def _append(self, line: bytes) -> None:
        with open(self.path, "ab", buffering=0) as f:
            written = f.write(line)
            if written != len(line):  # pragma: no cover - a short write on a regular file
                raise OSError(errno.EIO, "short write to the journal")
            os.fsync(f.fileno())

    async def read(self, tag: str) -> object:
        """The journal's size."""
        return (await anyio.to_thread.run_sync(os.stat, self.path)).st_size

    async def final_read(self, tag: str) -> set[int]:
        """Every id of ``tag`` in the real file."""
        text = await anyio.to_thread.run_sync(self.data.read_text)
        prefix = tag + " "
        return {int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)}

    async def cleanup(self, tags: list[str]) -> None:
        """Nothing: the journal lives in the drill's temporary folder."""

    def classify(self, error: BaseException) -> Outcome:
        """A failed write(2) wrote nothing (the line is written in one call); else unknown."""
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return "fail"
        return "info"
