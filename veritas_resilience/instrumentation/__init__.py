"""Default hooks: Prometheus metrics exported at scrape time, and structlog log lines."""

from __future__ import annotations

from .prometheus import PrometheusHook as PrometheusHook
from .structlog import StructlogHook as StructlogHook

__all__ = ["PrometheusHook", "StructlogHook"]
