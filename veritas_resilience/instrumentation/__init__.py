"""Default hooks: Prometheus metrics exported at scrape time, and structlog log lines."""

from __future__ import annotations

from .prometheus import MetricDescription as MetricDescription
from .prometheus import PrometheusHook as PrometheusHook
from .prometheus import describe_metrics as describe_metrics
from .structlog import StructlogHook as StructlogHook

__all__ = ["MetricDescription", "PrometheusHook", "StructlogHook", "describe_metrics"]
