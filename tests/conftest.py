"""Shared fixtures: every core test runs under asyncio and trio unless a module narrows it."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry

from veritas_resilience import PrometheusHook, circuit_breaker
from veritas_resilience.testing import FakeClock


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test once per backend (integration modules override it)."""
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at 1000 s."""
    return FakeClock(1000.0)


@pytest.fixture
def registry() -> CollectorRegistry:
    """A Prometheus registry of the test's own."""
    return CollectorRegistry()


@pytest.fixture
def prometheus(registry: CollectorRegistry) -> PrometheusHook:
    """A Prometheus hook exporting to the test's own registry."""
    return PrometheusHook(registry)


@pytest.fixture(params=["compiled", "python"])
def breaker_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a breaker test once on the compiled fast path and once in pure Python.

    Breakers choose at creation, so the breakers a test creates use the implementation of its
    parameter. Without the compiled module the "compiled" run is skipped, unless the build was
    required to compile it (as CI does), where it fails.
    """
    if request.param == "python":
        monkeypatch.setattr(circuit_breaker, "_speedups", None)
    elif circuit_breaker._speedups is None:
        if os.environ.get("VERITAS_RESILIENCE_REQUIRE_EXTENSIONS"):
            pytest.fail("the compiled fast path was required but is not built")
        pytest.skip("the compiled fast path is not built")
    return str(request.param)
