"""Prometheus export of breaker metrics, checked by parsing the exposition text."""

from __future__ import annotations

import gc

import pytest
from _log_capture import LogCapture
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from veritas_resilience import (
    CircuitBreaker,
    CircuitOpenError,
    ExponentialCircuitBreaker,
    PrometheusHook,
    get_hooks,
    set_hooks,
)
from veritas_resilience.instrumentation import prometheus as prometheus_module
from veritas_resilience.limits import Timeout
from veritas_resilience.testing import FakeClock

pytestmark = pytest.mark.anyio


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition text, keyed by name and labels."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry: CollectorRegistry, metric: str, /, **labels: str) -> float | None:
    return samples(registry).get((metric, frozenset(labels.items())))


async def boom() -> None:
    raise OSError("connection refused")


async def ok() -> int:
    return 1


def test_closed_state_series_exists_from_creation(prometheus: PrometheusHook) -> None:
    """A new breaker exports state=closed 1 and every other state 0 before any traffic."""
    breaker = CircuitBreaker(name="fresh", hooks=[prometheus])
    reg = prometheus.registry
    assert value(reg, "veritas_circuit_breaker_state", name="fresh", state="closed") == 1
    for state in ("open", "half_open", "forced_open", "disabled"):
        assert value(reg, "veritas_circuit_breaker_state", name="fresh", state=state) == 0
    assert value(reg, "veritas_circuit_breaker_calls_total", name="fresh", outcome="success") == 0
    assert breaker.state.value == "closed"


async def test_calls_transitions_and_open_seconds(
    prometheus: PrometheusHook, clock: FakeClock
) -> None:
    """Outcomes, transitions and the current break length appear in the exposition."""
    breaker = ExponentialCircuitBreaker(
        name="db", failure_threshold=2, base=4, clock=clock, hooks=[prometheus]
    )
    reg = prometheus.registry
    await breaker.call(ok)
    for _ in range(2):
        with pytest.raises(OSError):
            await breaker.call(boom)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    assert value(reg, "veritas_circuit_breaker_state", name="db", state="open") == 1
    assert value(reg, "veritas_circuit_breaker_state", name="db", state="closed") == 0
    assert value(reg, "veritas_circuit_breaker_open_seconds", name="db") == 4
    for outcome, expected in (("success", 1), ("failure", 2), ("rejected", 1)):
        assert value(reg, "veritas_circuit_breaker_calls_total", name="db", outcome=outcome) == (
            expected
        )
    clock.advance(4)
    with pytest.raises(OSError):
        await breaker.call(boom)  # failed probe: open again, for 8 s
    assert value(reg, "veritas_circuit_breaker_open_seconds", name="db") == 8
    t = "veritas_circuit_breaker_transitions_total"
    assert value(reg, t, name="db", from_state="closed", to_state="open") == 1
    assert value(reg, t, name="db", from_state="open", to_state="half_open") == 1
    assert value(reg, t, name="db", from_state="half_open", to_state="open") == 1


async def test_short_open_period_still_shows_in_transitions(
    prometheus: PrometheusHook, clock: FakeClock
) -> None:
    """An open period shorter than a scrape interval is visible through the transition counter."""
    breaker = CircuitBreaker(
        name="blip", failure_threshold=1, reset_timeout=0.01, clock=clock, hooks=[prometheus]
    )
    with pytest.raises(OSError):
        await breaker.call(boom)
    clock.advance(0.01)
    await breaker.call(ok)
    reg = prometheus.registry
    assert value(reg, "veritas_circuit_breaker_state", name="blip", state="closed") == 1
    assert (
        value(
            reg,
            "veritas_circuit_breaker_transitions_total",
            name="blip",
            from_state="closed",
            to_state="open",
        )
        == 1
    )


async def test_duration_histogram(prometheus: PrometheusHook, clock: FakeClock) -> None:
    """With record_duration on, durations land in the right buckets; off, no histogram."""
    timed = CircuitBreaker(name="timed", record_duration=True, clock=clock, hooks=[prometheus])
    CircuitBreaker(name="untimed", clock=clock, hooks=[prometheus])

    async def takes(seconds: float) -> None:
        clock.advance(seconds)

    for seconds in (0.003, 0.003, 0.2, 20.0):
        await timed.call(takes, seconds)
    reg = prometheus.registry
    h = "veritas_circuit_breaker_call_duration_seconds"
    assert value(reg, h + "_bucket", name="timed", le="0.001") == 0
    assert value(reg, h + "_bucket", name="timed", le="0.005") == 2
    assert value(reg, h + "_bucket", name="timed", le="0.25") == 3
    assert value(reg, h + "_bucket", name="timed", le="10.0") == 3
    assert value(reg, h + "_bucket", name="timed", le="+Inf") == 4
    assert value(reg, h + "_count", name="timed") == 4
    assert value(reg, h + "_sum", name="timed") == pytest.approx(20.206)
    assert value(reg, h + "_count", name="untimed") is None


def test_collected_breakers_leave_the_exposition(prometheus: PrometheusHook) -> None:
    """A breaker that is garbage-collected stops being exported (no leak through the hook)."""
    CircuitBreaker(name="temporary", hooks=[prometheus])
    gc.collect()
    assert value(prometheus.registry, "veritas_circuit_breaker_state", name="temporary",
                 state="closed") is None  # fmt: skip


def test_label_values_are_bounded(prometheus: PrometheusHook) -> None:
    """Labels are only name, state, outcome and transitions: never messages or arguments."""
    breaker = CircuitBreaker(name="bounded", hooks=[prometheus])
    assert breaker.name == "bounded"
    labels = {k for (_, ls) in samples(prometheus.registry) for k, _ in ls}
    assert labels <= {"name", "state", "outcome", "from_state", "to_state", "le"}


def test_two_breakers_with_one_name_never_duplicate_a_series(
    prometheus: PrometheusHook,
) -> None:
    """Two live breakers sharing a name export one series each, so the scrape stays valid."""
    a = CircuitBreaker(name="same", hooks=[prometheus])
    b = CircuitBreaker(name="same", hooks=[prometheus])
    text = generate_latest(prometheus.registry).decode()
    assert text.count('veritas_circuit_breaker_state{name="same",state="closed"}') == 1
    assert a is not b


async def test_components_sharing_a_name_add_up_and_a_warning_says_so(
    prometheus: PrometheusHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two breakers named alike: no count is dropped (their series add up) and it is logged."""
    log = LogCapture()
    monkeypatch.setattr(prometheus_module, "_log", log)
    a = CircuitBreaker(name="orders-db", failure_threshold=10, hooks=[prometheus])
    assert log.lines == []
    b = CircuitBreaker(name="orders-db", failure_threshold=10, hooks=[prometheus])
    for _ in range(2):
        await a.call(ok)
    for _ in range(3):
        await b.call(ok)
    with pytest.raises(OSError):
        await b.call(boom)
    reg = prometheus.registry
    assert value(reg, "veritas_circuit_breaker_calls_total", name="orders-db",
                 outcome="success") == 5  # fmt: skip
    assert value(reg, "veritas_circuit_breaker_calls_total", name="orders-db",
                 outcome="failure") == 1  # fmt: skip
    assert value(reg, "veritas_circuit_breaker_state", name="orders-db", state="closed") == 2
    [(level, message, fields)] = log.lines
    assert (level, message, fields["name"], fields["components"]) == (
        "warning",
        "metrics_name_shared",
        "orders-db",
        2,
    )


async def test_shared_name_histograms_add_up_at_the_bounds_both_have(
    prometheus: PrometheusHook, clock: FakeClock
) -> None:
    """Duration histograms of two same-named breakers merge exactly on their common buckets."""
    a = CircuitBreaker(
        name="h", record_duration=True, duration_buckets=(0.1, 1.0), clock=clock, hooks=[prometheus]
    )
    b = CircuitBreaker(
        name="h", record_duration=True, duration_buckets=(1.0, 5.0), clock=clock, hooks=[prometheus]
    )
    await a.call(ok)
    await b.call(ok)
    await b.call(ok)
    reg = prometheus.registry
    metric = "veritas_circuit_breaker_call_duration_seconds"
    assert value(reg, f"{metric}_bucket", name="h", le="1.0") == 3
    assert value(reg, f"{metric}_bucket", name="h", le="+Inf") == 3
    assert value(reg, f"{metric}_count", name="h") == 3
    assert value(reg, f"{metric}_bucket", name="h", le="0.1") is None


def test_components_of_different_kinds_may_share_a_name(
    prometheus: PrometheusHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A breaker and a timeout both named after their dependency are no conflict: no warning."""
    log = LogCapture()
    monkeypatch.setattr(prometheus_module, "_log", log)
    breaker = CircuitBreaker(name="payments", hooks=[prometheus])
    timeout = Timeout(1.0, name="payments", hooks=[prometheus])
    assert log.lines == []
    assert value(prometheus.registry, "veritas_timeout_total", name="payments") == 0
    assert breaker.name == timeout.name


async def test_default_hooks_follow_set_hooks(registry: CollectorRegistry) -> None:
    """Breakers without hooks= switch when set_hooks() changes the defaults; [] silences."""
    original = get_hooks()
    try:
        set_hooks([PrometheusHook(registry)])
        breaker = CircuitBreaker(name="defaults")
        assert value(registry, "veritas_circuit_breaker_state", name="defaults",
                     state="closed") == 1  # fmt: skip
        set_hooks([])
        assert value(registry, "veritas_circuit_breaker_state", name="defaults",
                     state="closed") is None  # fmt: skip
        set_hooks([PrometheusHook(registry)])
        await breaker.call(ok)
        assert value(registry, "veritas_circuit_breaker_calls_total", name="defaults",
                     outcome="success") == 1  # fmt: skip
    finally:
        set_hooks(original)


def test_default_hooks_export_to_the_global_registry() -> None:
    """With no configuration, breakers appear in prometheus_client's global registry."""
    from prometheus_client import REGISTRY

    set_hooks(None)
    breaker = CircuitBreaker(name="global-default")
    assert value(REGISTRY, "veritas_circuit_breaker_state", name="global-default",
                 state="closed") == 1  # fmt: skip
    del breaker
