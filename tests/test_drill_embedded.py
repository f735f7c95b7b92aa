"""The default drill end to end on the embedded servers (one run for the whole suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veritas_resilience.cli import main
from veritas_resilience.drill import DrillError, default_scenarios
from veritas_resilience.drill._drill import _check_binaries

pytestmark = pytest.mark.integration


def test_default_drill_runs_every_scenario_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`veritas-resilience drill` plays every scenario; no acknowledged write is lost."""
    try:
        _check_binaries()
    except DrillError as exc:
        pytest.fail(str(exc))
    report = tmp_path / "report.html"
    status = main(["drill", "--json", "--html", str(report)])
    data = json.loads(capsys.readouterr().out)
    names = [s["name"] for s in data["scenarios"]]
    assert names == [s.name for s in default_scenarios()]
    for scenario in data["scenarios"]:
        assert scenario["skipped"] is None
        assert (scenario["lost"], scenario["unexpected"]) == (0, 0), scenario["set_checks"]
        assert scenario["writes_ok"] > 0
    html = report.read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # without the report extra: tables, and how to get the charts
        assert "veritas-resilience[report]" in html
    else:
        assert html.count("<svg") == len(names)
    failed = {
        s["name"]: [h for h in s["hypotheses"] if not h["held"]]
        for s in data["scenarios"]
        if not s["passed"]
    }
    assert status == (0 if not failed else 1)
    assert not failed, failed
