"""The Jepsen-style set checker, and the drill's verdict on a write path that loses data."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from veritas_resilience.chaos import ProxyServer
from veritas_resilience.drill import (
    Drill,
    DrillTimings,
    Environment,
    Scenario,
    SetChecker,
)
from veritas_resilience.drill import _cli as drill_cli
from veritas_resilience.drill._workload import Outcome


def test_acknowledged_writes_missing_from_the_read_are_lost() -> None:
    """An ok write absent from the final read is lost; the check is then invalid."""
    checker = SetChecker()
    for item in (1, 2, 3):
        checker.ok(item)
    result = checker.check({1, 3})
    assert result.lost == (2,) and not result.valid


def test_indeterminate_writes_are_never_lost() -> None:
    """A write of unknown outcome may be present or absent: recovered if present, never lost."""
    checker = SetChecker()
    checker.info(1)
    checker.info(2)
    result = checker.check({1})
    assert result.valid and result.lost == () and result.indeterminate == 2
    assert result.recovered == 1


def test_failed_or_never_attempted_ids_are_unexpected() -> None:
    """An id that certainly failed, or was never written, must not be read."""
    checker = SetChecker()
    checker.fail(1)
    checker.ok(2)
    result = checker.check({1, 2, 99})
    assert result.unexpected == (1, 99) and not result.valid
    assert result.as_dict()["unexpected"] == 2


class LossyStore:
    """A write path that acknowledges every write and silently drops every fifth one."""

    name = "lossy"

    def __init__(self) -> None:
        self.data: dict[str, set[int]] = {}
        self.count = 0

    async def write(self, tag: str, item: int) -> None:
        self.count += 1
        if self.count % 5:
            self.data.setdefault(tag, set()).add(item)

    async def read(self, tag: str) -> object:
        return len(self.data.get(tag, ()))

    async def final_read(self, tag: str) -> set[int]:
        return set(self.data.get(tag, ()))

    def classify(self, error: BaseException) -> Outcome:
        return "info"


class HonestStore(LossyStore):
    """The same store without the bug."""

    name = "honest"

    async def write(self, tag: str, item: int) -> None:
        self.data.setdefault(tag, set()).add(item)


@dataclass
class NothingHappens(Scenario):
    """A fault that does nothing, so that only the write path is judged."""

    name: ClassVar[str] = "nothing"
    title: ClassVar[str] = "no fault"
    store: ClassVar[str] = "lossy"
    hold: float = 0.2


FAST = DrillTimings(warmup=0.4, window=0.3, settle_timeout=3, op_timeout=2, drain_timeout=1)


@contextlib.asynccontextmanager
async def memory_environment(*stores: LossyStore) -> AsyncIterator[Environment]:
    with ProxyServer() as proxies:
        yield Environment(
            stores=list(stores), proxies=proxies, capabilities=set(), description={"mode": "test"}
        )


@pytest.mark.anyio
async def test_drill_reports_lost_writes_of_a_broken_client() -> None:
    """The drill calls the lossy path's dropped acknowledged writes lost and fails the scenario."""
    async with memory_environment(LossyStore(), HonestStore()) as env:
        report = await Drill(env, [NothingHappens()], timings=FAST).run()
    (result,) = report.results
    assert not result.passed and not report.passed
    assert len(result.checks["lossy"].lost) > 0
    assert result.checks["honest"].valid and result.checks["honest"].acknowledged > 0
    failed = [h.name for h in result.hypotheses if not h.held]
    assert failed == ["lossy: no acknowledged write lost, nothing unexpected"]


def test_drill_command_exits_non_zero_on_lost_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`veritas-resilience drill` exits 1 when a write path loses acknowledged writes."""
    monkeypatch.setattr(drill_cli, "embedded_environment", lambda: memory_environment(LossyStore()))
    monkeypatch.setattr(drill_cli, "default_scenarios", lambda: [NothingHappens()])
    monkeypatch.setattr(drill_cli, "Drill", _fast_drill)
    args = argparse.Namespace(
        postgres=[],
        redis_sentinel=[],
        redis_service="mymaster",
        redis_wait_replicas=1,
        scenario=None,
        json=True,
        html=str(tmp_path / "report.html"),
    )
    assert drill_cli.run(args) == drill_cli.EXIT_FAILED
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and data["scenarios"][0]["lost"] > 0
    assert "FAIL" in (tmp_path / "report.html").read_text()


def _fast_drill(env: Environment, scenarios: list[Scenario], **kwargs: object) -> Drill:
    return Drill(env, scenarios, timings=FAST, **kwargs)  # type: ignore[arg-type]


def test_missing_binaries_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without server binaries the drill exits 2 and names the packages to install."""
    import shutil

    from veritas_resilience.drill import DrillError
    from veritas_resilience.drill._drill import _check_binaries

    monkeypatch.setenv("VERITAS_PG_BINDIR", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DrillError, match="apt-get install -y postgresql redis-server") as info:
        _check_binaries()
    assert "PostgreSQL server binaries" in str(info.value)


def test_unreachable_server_is_reported_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Pointed at a server that is down, the drill exits 2 and never prints the DSN's password."""
    from veritas_resilience.cli import main
    from veritas_resilience.testing import free_port

    dsn = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/app"
    assert main(["drill", "--postgres", dsn, "--html", ""]) == drill_cli.EXIT_CANNOT_RUN
    out = capsys.readouterr()
    assert "PostgreSQL not usable" in out.out + out.err
    assert "s3cret-pw" not in out.out + out.err


def test_html_report_says_how_to_get_charts_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without matplotlib the HTML report keeps its tables and names the extra to install."""
    from veritas_resilience.drill import DrillReport, ScenarioResult, _report

    result = ScenarioResult("nothing", "no fault", "lossy", passed=True, fault_at=1.0)
    result.timeline = {"lossy": [(-1.0, 10, 0), (0.0, 8, 2)]}
    report = DrillReport([result], {"mode": "test"}, "2026-01-01T00:00:00Z")
    monkeypatch.setattr(_report, "_charts_available", lambda: False)
    assert _report.write_html(report, tmp_path / "plain.html") is False
    plain = (tmp_path / "plain.html").read_text()
    assert "veritas-resilience[report]" in plain and "<svg" not in plain
    monkeypatch.undo()
    import matplotlib  # noqa: F401  (the `report` extra, part of `dev`)

    assert _report.write_html(report, tmp_path / "chart.html") is True
    assert (tmp_path / "chart.html").read_text().count("<svg") == 1


@pytest.mark.anyio
async def test_scenarios_that_stop_servers_never_run_on_servers_the_drill_did_not_start() -> None:
    """Without control of the servers, crash, kill and pause scenarios are skipped, not run."""
    from veritas_resilience.drill import PostgresPrimaryCrash, RedisMasterKill, RedisMasterPause

    async with memory_environment(HonestStore()) as env:
        env.capabilities = {"pg_proxy", "disk"}  # what pointing the drill at your servers gives
        scenarios = [PostgresPrimaryCrash(), RedisMasterKill(), RedisMasterPause()]
        report = await Drill(env, scenarios, timings=FAST).run()
    assert [r.skipped for r in report.results] == [
        "needs PostgreSQL started by the drill",
        "needs Redis started by the drill",
        "needs Redis started by the drill",
    ]
    assert not report.passed  # nothing ran: nothing was shown to work
