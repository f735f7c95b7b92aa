"""A PostgreSQL failover client over asyncpg: it follows the primary, and never writes elsewhere.

Quick start::

    from veritas_resilience.postgres import FailoverClient

    db = FailoverClient(["postgresql://app:secret@db1/app", "postgresql://app:secret@db2/app"])
    async with db:
        await db.execute("INSERT INTO orders (id) VALUES ($1)", 42)
        rows = await db.fetch("SELECT * FROM orders", route="prefer_standby")

Importing this module imports asyncpg (``import veritas_resilience`` does not). See
docs/postgres.md for the guarantees, the settings, and the failure modes it handles.
"""

from __future__ import annotations

from ._client import FailoverClient as FailoverClient
from ._client import NodeHealth as NodeHealth
from ._client import PostgresHealth as PostgresHealth
from ._client import WriteToken as WriteToken
from ._config import Node as Node
from ._config import Route as Route
from ._config import nodes_from_dsn as nodes_from_dsn
from ._errors import AcquireTimeoutError as AcquireTimeoutError
from ._errors import CommitOutcomeUnknownError as CommitOutcomeUnknownError
from ._errors import ConnectionLostError as ConnectionLostError
from ._errors import NodeFencedError as NodeFencedError
from ._errors import NoPrimaryError as NoPrimaryError
from ._errors import NotPrimaryError as NotPrimaryError
from ._errors import PostgresError as PostgresError
from ._errors import QueryTimeoutError as QueryTimeoutError
from ._errors import SplitBrainError as SplitBrainError
from ._errors import SystemIdentifierMismatchError as SystemIdentifierMismatchError
from ._events import PostgresCallFailed as PostgresCallFailed
from ._events import PostgresFailoverDetected as PostgresFailoverDetected
from ._events import PostgresFencingRecordFailed as PostgresFencingRecordFailed
from ._events import PostgresNodeChanged as PostgresNodeChanged
from ._events import PostgresNodeFenced as PostgresNodeFenced
from ._events import PostgresPromotionAttempted as PostgresPromotionAttempted
from ._events import PostgresWritesBlocked as PostgresWritesBlocked
from ._fencing import FencingRecord as FencingRecord
from ._fencing import FileFencingRecord as FileFencingRecord

__all__ = [
    "AcquireTimeoutError",
    "CommitOutcomeUnknownError",
    "ConnectionLostError",
    "FailoverClient",
    "FencingRecord",
    "FileFencingRecord",
    "NoPrimaryError",
    "Node",
    "NodeFencedError",
    "NodeHealth",
    "NotPrimaryError",
    "PostgresCallFailed",
    "PostgresError",
    "PostgresFailoverDetected",
    "PostgresFencingRecordFailed",
    "PostgresHealth",
    "PostgresNodeChanged",
    "PostgresNodeFenced",
    "PostgresPromotionAttempted",
    "PostgresWritesBlocked",
    "QueryTimeoutError",
    "Route",
    "SplitBrainError",
    "SystemIdentifierMismatchError",
    "WriteToken",
    "nodes_from_dsn",
]
