"""The fencing record clients share: a JSON file that only ever raises a cluster's timeline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from veritas_resilience.postgres import FailoverClient, FencingRecord, FileFencingRecord
from veritas_resilience.testing import LocalPostgresCluster

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The file record runs its I/O in a thread of the asyncio loop."""
    return "asyncio"


async def test_file_record_starts_empty_and_only_raises_timelines(tmp_path: Path) -> None:
    """A missing file holds nothing; saves keep the highest timeline per cluster, across
    instances that name the same file."""
    path = tmp_path / "fence.json"
    first, second = FileFencingRecord(path), FileFencingRecord(path)
    assert isinstance(first, FencingRecord)
    assert await first.load(7) is None
    await first.save(7, 3)
    await second.save(7, 2)  # an older client late with its news: ignored
    await second.save(8, 1)
    assert await second.load(7) == 3 and await first.load(8) == 1
    await asyncio.gather(*(FileFencingRecord(path).save(7, tl) for tl in range(4, 12)))
    assert await first.load(7) == 11


async def test_a_corrupt_record_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A file that is not a record raises ValueError naming it, instead of reading as empty."""
    path = tmp_path / "fence.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"fence\.json"):
        await FileFencingRecord(path).load(7)
    path.write_text('{"7": "two"}')
    with pytest.raises(ValueError, match="timelines"):
        await FileFencingRecord(path).load(7)


def test_the_client_refuses_what_is_not_a_record() -> None:
    """fencing_record must have async load() and save(): a TypeError naming it otherwise."""
    with pytest.raises(TypeError, match="fencing_record"):
        FailoverClient([("127.0.0.1", 5432)], fencing_record="/tmp/fence.json")  # type: ignore[arg-type]


class SlowRecord:
    """A record whose saves take a while (a remote store), counting what it got."""

    def __init__(self) -> None:
        self.saved: list[int] = []

    async def load(self, system_identifier: int) -> int | None:
        return None

    async def save(self, system_identifier: int, timeline: int) -> None:
        await asyncio.sleep(0.2)
        self.saved.append(timeline)


async def test_closing_waits_for_a_timeline_being_saved(pg_cluster: LocalPostgresCluster) -> None:
    """A client closed while it saves its timeline lets the save finish (bounded by
    probe_timeout) and closes cleanly."""
    record = SlowRecord()
    db = FailoverClient([pg_cluster.primary.dsn], fencing_record=record, hooks=[])
    await db.start()
    assert await db.fetchval("SELECT 1") == 1
    await db.close()
    assert record.saved == [1]
