"""A fencing record the clients share: the highest timeline seen, so a restart cannot forget it.

A client remembers the highest timeline of its cluster only while it runs. A client started
while only an old primary answers (the new one is down or unreachable from here) would take it
for the real one. With a :class:`FencingRecord`, every client saves the highest timeline it sees
and reads it back before its first write: the old primary is fenced from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["FencingRecord", "FileFencingRecord"]


@runtime_checkable
class FencingRecord(Protocol):
    """Where clients keep the highest timeline of each cluster (by ``system_identifier``).

    Implement it over any store your clients share (a file on a shared volume, Redis, etcd, a
    config service). Both methods are bounded by the client's ``probe_timeout`` and never run
    on a call's path.
    """

    async def load(self, system_identifier: int) -> int | None:
        """Return the highest timeline recorded for the cluster, or ``None`` if none is.

        Raises:
            Exception: If the record cannot be read; the client then takes no writes until it
                can (it tries again every ``monitor_interval``).
        """
        ...

    async def save(self, system_identifier: int, timeline: int) -> None:
        """Record ``timeline`` for the cluster, unless a higher one is recorded already."""
        ...


class FileFencingRecord:
    """A :class:`FencingRecord` in a JSON file, shared by the clients that name the same path.

    The file maps system identifiers to timelines (``{"7312...": 2}``). Writes go to a temporary
    file in the same folder that then replaces it, so readers never see half a file, under an
    advisory lock (on POSIX) so that concurrent writers keep the highest timeline.

    Example::

        db = FailoverClient(dsns, fencing_record=FileFencingRecord("/var/lib/app/pg-fence.json"))

    Args:
        path: The file. Its folder must exist; the file is created on the first save.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileFencingRecord({str(self.path)!r})"

    async def load(self, system_identifier: int) -> int | None:
        """Read the file's timeline for the cluster (``None`` if the file or entry is absent).

        Raises:
            ValueError: If the file is not a record (not JSON, or not a map of timelines).
            OSError: If it cannot be read.
        """
        record = await asyncio.to_thread(self._read)
        return record.get(str(system_identifier))

    async def save(self, system_identifier: int, timeline: int) -> None:
        """Raise the file's timeline for the cluster to ``timeline`` (never lower it)."""
        await asyncio.to_thread(self._raise_to, str(system_identifier), timeline)

    def _read(self) -> dict[str, int]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"fencing record {self.path} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in data.values()
        ):
            raise ValueError(f"fencing record {self.path} must map system identifiers to timelines")
        return data

    def _raise_to(self, key: str, timeline: int) -> None:
        with self._locked():
            record = self._read()
            if record.get(key, 0) >= timeline:
                return
            record[key] = timeline
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(record, f, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    @contextlib.contextmanager
    def _locked(self) -> Any:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: the replace is still atomic
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
