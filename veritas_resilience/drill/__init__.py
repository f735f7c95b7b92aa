"""Failover drills: real faults against real servers, with a Jepsen-style check of the writes.

``veritas-resilience drill`` runs one. With no arguments it starts the embedded default (a
PostgreSQL primary and standby, a Redis master, two replicas and three Sentinels, all on loopback),
runs a workload through :class:`~veritas_resilience.postgres.FailoverClient`,
:class:`~veritas_resilience.redis.SentinelRedis` and a fallback chain with a stale cache, and
plays each :class:`Scenario` in turn. Each scenario checks a steady-state hypothesis before and
after its fault, checks every acknowledged write with a :class:`SetChecker`, and measures how long
callers took to notice and to write again.
"""

from __future__ import annotations

from ._check import SetChecker as SetChecker
from ._check import SetCheckResult as SetCheckResult
from ._drill import Drill as Drill
from ._drill import DrillReport as DrillReport
from ._drill import DrillTimings as DrillTimings
from ._drill import Environment as Environment
from ._drill import Hypothesis as Hypothesis
from ._drill import Progress as Progress
from ._drill import ScenarioResult as ScenarioResult
from ._drill import embedded_environment as embedded_environment
from ._drill import external_environment as external_environment
from ._errors import DrillError as DrillError
from ._scenarios import DiskFull as DiskFull
from ._scenarios import PostgresLatency as PostgresLatency
from ._scenarios import PostgresPartition as PostgresPartition
from ._scenarios import PostgresPrimaryCrash as PostgresPrimaryCrash
from ._scenarios import RedisLatency as RedisLatency
from ._scenarios import RedisMasterKill as RedisMasterKill
from ._scenarios import RedisMasterPause as RedisMasterPause
from ._scenarios import RedisPartition as RedisPartition
from ._scenarios import Scenario as Scenario
from ._scenarios import default_scenarios as default_scenarios
from ._stores import JournalStore as JournalStore
from ._stores import PostgresStore as PostgresStore
from ._stores import RedisStore as RedisStore
from ._workload import Op as Op
from ._workload import Store as Store
from ._workload import Workload as Workload

__all__ = [
    "DiskFull",
    "Drill",
    "DrillError",
    "DrillReport",
    "DrillTimings",
    "Environment",
    "Hypothesis",
    "JournalStore",
    "Op",
    "PostgresLatency",
    "PostgresPartition",
    "PostgresPrimaryCrash",
    "PostgresStore",
    "Progress",
    "RedisLatency",
    "RedisMasterKill",
    "RedisMasterPause",
    "RedisPartition",
    "RedisStore",
    "Scenario",
    "ScenarioResult",
    "SetCheckResult",
    "SetChecker",
    "Store",
    "Workload",
    "default_scenarios",
    "embedded_environment",
    "external_environment",
]
