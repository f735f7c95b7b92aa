"""Prometheus export: components count in plain integers, a custom collector reads them at scrape.

A ``Counter.inc()`` costs about 280 ns and ``Histogram.observe()`` about 600 ns on the machines this
library targets, more than a whole breaker call should. So components keep their own counters and
bucket counts, and :class:`PrometheusHook` attaches them to one collector per registry that turns
those numbers into metric families when Prometheus scrapes. The hot path pays nothing for metrics.

Each component type declares its metric families once with :func:`define_metric`, and exposes its
samples through a ``_metric_samples()`` method yielding ``(family, label_values, value)``; value
is a number, or a :class:`HistogramValue` for histograms.

Two live components of one kind and one name (two breakers both called ``"orders-db"``) export
one series per label set, their sum: counters and histogram buckets add up, and so do gauges
(the breaker state gauge then counts the breakers of that name in each state). No count is
dropped, and a warning (``metrics_name_shared``) is logged when the second one is attached, since
two components sharing a name are usually a mistake: name each after what it guards.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..events import Event

__all__ = [
    "METRIC_MODULES",
    "HistogramValue",
    "MetricDescription",
    "PrometheusHook",
    "define_metric",
    "describe_metrics",
]

_log = structlog.get_logger("veritas_resilience.metrics")

MetricType = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    type: MetricType
    documentation: str
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """A histogram sample: cumulative ``(bound, count)`` pairs ending with ``+Inf``, and a sum."""

    buckets: Sequence[tuple[str, float]]
    sum: float


class _Instrumented(Protocol):
    @property
    def name(self) -> str: ...

    def _metric_samples(self) -> Iterable[tuple[str, tuple[str, ...], float | HistogramValue]]: ...


_FAMILIES: dict[str, _Family] = {}


def define_metric(name: str, type: MetricType, documentation: str, labels: Sequence[str]) -> None:
    """Declare a metric family (without ``_total`` for counters); idempotent for equal specs."""
    family = _Family(name, type, documentation, tuple(labels))
    existing = _FAMILIES.setdefault(name, family)
    if existing != family:
        raise ValueError(f"metric {name!r} is already defined differently: {existing!r}")


class _Collector(Collector):
    def __init__(self) -> None:
        self._components: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, component: _Instrumented) -> None:
        with self._lock:
            others = [
                c for c in self._components if c is not component and c.name == component.name
            ]
            self._components.add(component)
        if others:
            families = _families_of(component)
            if any(families & _families_of(other) for other in others):
                _log.warning(
                    "metrics_name_shared",
                    name=component.name,
                    kind=type(component).__name__,
                    components=len(others) + 1,
                    detail="their metrics are exported added up, as one series per label set",
                )

    def discard(self, component: _Instrumented) -> None:
        with self._lock:
            self._components.discard(component)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            components = sorted(self._components, key=lambda c: (type(c).__name__, c.name))
        # Samples of components that share a name are added up, never dropped (Prometheus
        # would reject a scrape holding one series twice).
        samples: dict[tuple[str, tuple[str, ...]], float | HistogramValue] = {}
        for component in components:
            for family_name, label_values, value in component._metric_samples():
                key = (family_name, label_values)
                seen = samples.get(key)
                samples[key] = value if seen is None else _add(seen, value)
        families: dict[str, Metric] = {}
        for (family_name, label_values), value in samples.items():
            metric = families.get(family_name)
            if metric is None:
                metric = families[family_name] = _new_family(_FAMILIES[family_name])
            if isinstance(value, HistogramValue):
                assert isinstance(metric, HistogramMetricFamily)
                metric.add_metric(list(label_values), list(value.buckets), value.sum)
            else:
                metric.add_metric(list(label_values), value)  # type: ignore[attr-defined]
        yield from families.values()


def _families_of(component: _Instrumented) -> set[str]:
    return {family for family, _, _ in component._metric_samples()}


def _add(a: float | HistogramValue, b: float | HistogramValue) -> float | HistogramValue:
    """The sum of two samples of one series (two components of one name)."""
    if isinstance(a, HistogramValue) and isinstance(b, HistogramValue):
        # Cumulative counts add up exactly at the bounds both have (+Inf always among them).
        theirs = dict(b.buckets)
        buckets = [(bound, count + theirs[bound]) for bound, count in a.buckets if bound in theirs]
        return HistogramValue(buckets, a.sum + b.sum)
    if isinstance(a, HistogramValue) or isinstance(b, HistogramValue):
        raise TypeError("a histogram and a plain sample share one series")
    return a + b


def _new_family(family: _Family) -> Metric:
    if family.type == "counter":
        return CounterMetricFamily(family.name, family.documentation, labels=family.labels)
    if family.type == "gauge":
        return GaugeMetricFamily(family.name, family.documentation, labels=family.labels)
    return HistogramMetricFamily(family.name, family.documentation, labels=family.labels)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _Collector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _Collector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _Collector()
            registry.register(collector)
        return collector


class PrometheusHook:
    """Exports the metrics of every component it is installed on, read at scrape time.

    It wants no events: components count calls, outcomes, transitions and durations in plain
    integers, and this hook's collector reads them when the registry is scraped, so a call pays
    nothing for metrics. The CLOSED state series exists from the moment a breaker is created.

    Args:
        registry: Where to export; the global ``prometheus_client.REGISTRY`` by default. Use your
            own ``CollectorRegistry`` in tests to keep them apart.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> registry = CollectorRegistry()
        >>> breaker = CircuitBreaker(name="db", hooks=[PrometheusHook(registry)])  # doctest: +SKIP
        >>> print(generate_latest(registry).decode())  # doctest: +SKIP
    """

    event_types: frozenset[type[Event]] = frozenset()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        self._collector = _collector_for(self.registry)

    def on_event(self, event: Event) -> None:
        """Do nothing: metrics are read from the components at scrape time."""

    def attach(self, component: _Instrumented) -> None:
        """Export ``component``'s metrics from now on."""
        self._collector.add(component)

    def detach(self, component: _Instrumented) -> None:
        """Stop exporting ``component``'s metrics."""
        self._collector.discard(component)

    def __repr__(self) -> str:
        where = "global" if self.registry is REGISTRY else f"0x{id(self.registry):x}"
        return f"PrometheusHook(registry={where})"


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Turn per-bucket counts (the last one for +Inf) into Prometheus' cumulative pairs."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(bounds, counts):
        total += count
        out.append((_format_bound(bound), float(total)))
    total += counts[-1]
    out.append(("+Inf", float(total)))
    return out


def _format_bound(bound: float) -> str:
    return repr(float(bound))


@dataclass(frozen=True, slots=True)
class MetricDescription:
    """One metric family the library exports: what the metrics reference lists.

    Attributes:
        name: The family's name; counters are exposed as ``<name>_total``, histograms as
            ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``.
        type: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        documentation: The help text shown in the exposition.
        labels: The label names, in order.
    """

    name: str
    type: MetricType
    documentation: str
    labels: tuple[str, ...]

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this family."""
        if self.type == "counter":
            return (f"{self.name}_total",)
        if self.type == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


METRIC_MODULES: tuple[str, ...] = (
    "veritas_resilience.circuit_breaker",
    "veritas_resilience.retry",
    "veritas_resilience.limits",
    "veritas_resilience._fallback",
    "veritas_resilience.postgres._client",
    "veritas_resilience.redis._events",
    "veritas_resilience.health._registry",
    "veritas_resilience.recovery._events",
    "veritas_resilience.chaos._inject",
    "veritas_resilience._rate",
    "veritas_resilience._hedge",
    "veritas_resilience._adaptive",
)
"""Every module of the library that declares metric families (importing them declares them all)."""


def describe_metrics() -> list[MetricDescription]:
    """Every metric family the library can export, sorted by name.

    Imports each part of the library that declares metrics (the PostgreSQL and Redis clients
    included, so their drivers are imported too).

    Returns:
        One :class:`MetricDescription` per family.
    """
    import importlib

    for module in METRIC_MODULES:
        importlib.import_module(module)
    return [
        MetricDescription(f.name, f.type, f.documentation, f.labels)
        for f in sorted(_FAMILIES.values(), key=lambda f: f.name)
    ]
