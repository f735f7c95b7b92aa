"""Shared fixtures: every core test runs under asyncio and trio unless a module narrows it."""

from __future__ import annotations

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from veritas_resilience import PrometheusHook
from veritas_resilience.testing import FakeClock

# The property tests with a fifth of their examples, for the runs on other CPythons in
# tests/run.sh (`--hypothesis-profile=other-pythons`): the main run keeps the full count.
settings.register_profile("other-pythons", max_examples=20)


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
