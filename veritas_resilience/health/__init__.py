"""Health, readiness and liveness probes and the metrics endpoint, as one pure ASGI app.

Quick start::

    from veritas_resilience.health import HealthRegistry, checks

    health = HealthRegistry(service="orders", version="1.4.2")
    health.add("postgres", checks.postgres(db), critical=True)
    health.add("redis", checks.redis(cache))
    health.add("disk", checks.disk("/var/lib/orders", warn=0.80, fail=0.95))
    health.add("memory", checks.memory(warn=0.85, fail=0.95))
    health.add("breakers", checks.breakers(registry))
    app.mount("/", health.asgi())   # /health /ready /live /startup /metrics

Bodies follow the IETF health check draft (``application/health+json``): ``pass`` and ``warn``
answer 200, ``fail`` 503. ``/live`` answers from the process alone; ``/ready`` from the critical
dependencies and the readiness state; ``/startup`` is 503 until ``mark_started()``.
"""

from __future__ import annotations

from . import checks as checks
from ._asgi import ASGIApp as ASGIApp
from ._asgi import HealthApp as HealthApp
from ._events import HealthCheckChanged as HealthCheckChanged
from ._events import HealthProbeChanged as HealthProbeChanged
from ._events import HealthShutdownDrained as HealthShutdownDrained
from ._model import CheckResult as CheckResult
from ._model import HealthReport as HealthReport
from ._model import Observation as Observation
from ._model import Status as Status
from ._registry import Check as Check
from ._registry import CheckReturn as CheckReturn
from ._registry import HealthRegistry as HealthRegistry
from ._watchdog import LoopLagMonitor as LoopLagMonitor
from ._wire import CONTENT_TYPE as CONTENT_TYPE
from ._wire import to_dict as to_dict

__all__ = [
    "ASGIApp",
    "CONTENT_TYPE",
    "Check",
    "CheckResult",
    "CheckReturn",
    "HealthApp",
    "HealthCheckChanged",
    "HealthProbeChanged",
    "HealthRegistry",
    "HealthReport",
    "HealthShutdownDrained",
    "LoopLagMonitor",
    "Observation",
    "Status",
    "checks",
    "to_dict",
]
