"""The shipped Prometheus rules and Grafana dashboard: valid, tested by promtool, and naming real
metrics of a real exposition of the library."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from veritas_resilience import (
    Bulkhead,
    CircuitBreaker,
    FallbackChain,
    PrometheusHook,
    Retry,
    RetryBudget,
    StaleCache,
    Timeout,
)
from veritas_resilience.cli import main
from veritas_resilience.health import HealthRegistry
from veritas_resilience.instrumentation.prometheus import describe_metrics
from veritas_resilience.recovery import (
    RULE_GROUPS,
    dashboard_json,
    render_dashboard,
    render_rules,
    rule_files,
)
from veritas_resilience.testing import LocalPostgresCluster, PostgresClusterFactory

ROOT = Path(__file__).resolve().parent.parent
RULES = resources.files("veritas_resilience.recovery") / "rules"
TESTED_GROUPS = [g for g in RULE_GROUPS if g != "recording"]


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary (Debian's ``prometheus`` package; tests/run.sh installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def alerts_of(text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", text, re.MULTILINE)


def all_alerts() -> list[str]:
    return [name for text in rule_files().values() for name in alerts_of(text)]


def expressions(text: str) -> list[str]:
    """Every ``expr`` of a rule file (single-line and block forms)."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("expr:"):
            continue
        rest = stripped[len("expr:") :].strip()
        if rest not in ("|", ">", "|-", ">-"):
            out.append(rest)
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        out.append(" ".join(block))
    return out


def dashboard_queries(node: Any) -> Iterator[tuple[str, str]]:
    """``(kind, query)`` for every panel target and template variable of the dashboard."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield "expr", node["expr"]
        if isinstance(node.get("definition"), str):
            yield "variable", node["definition"]
        for value in node.values():
            yield from dashboard_queries(value)
    elif isinstance(node, list):
        for value in node:
            yield from dashboard_queries(value)


def metric_names(query: str) -> set[str]:
    """Metric names a PromQL query reads (``veritas_*``), string literals left out."""
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    return set(re.findall(r"(?<![\w:])(veritas_[a-zA-Z0-9_]*)(?![\w:(])", query))


def recorded(query: str) -> set[str]:
    query = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    return set(re.findall(r"[a-zA-Z_][\w]*:[\w:]+", query))


def grafana_to_promql(query: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    for var, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
        ("$dependency", "orders-db"),
        ("$job", ".+"),
    ):
        query = query.replace(var, value)
    return query


@pytest.fixture(scope="module")
def exposition() -> set[str]:
    """Sample names of a real exposition: every kind of component, the clients on real servers."""
    from veritas_resilience.postgres import FailoverClient
    from veritas_resilience.redis import SentinelRedis

    registry = CollectorRegistry()
    hooks = [PrometheusHook(registry)]
    keep: list[object] = [
        CircuitBreaker(name="db", record_duration=True, hooks=hooks),
        Retry(
            on=ConnectionError, name="db", budget=RetryBudget(name="db", hooks=hooks), hooks=hooks
        ),
        Timeout(1.0, name="db", hooks=hooks),
        Bulkhead(4, name="db", hooks=hooks),
        FallbackChain(StaleCache(name="db", hooks=hooks), name="db", hooks=hooks),
    ]

    async def clients() -> None:
        health = HealthRegistry(service="orders", hooks=hooks)

        async def failing() -> None:
            raise OSError("disk on fire")

        health.add("disk", failing)
        await health.run()
        keep.append(health)
        with LocalPostgresCluster(1) as cluster:
            async with FailoverClient(
                [n.dsn for n in cluster.nodes], name="orders-db", max_lag_seconds=30, hooks=hooks
            ) as db:
                await db.execute("SELECT 1")
                for _ in range(100):  # until the standby's lag is known
                    state = await db.health(refresh=True)
                    if all(n.lag_seconds is not None for n in state.nodes if n.role == "standby"):
                        break
                    await asyncio.sleep(0.05)
                # A Redis client whose Sentinel does not answer: its errors and retries count.
                redis = SentinelRedis([("127.0.0.1", 1)], "mymaster", name="sessions", hooks=hooks)
                try:
                    await asyncio.wait_for(redis.set("k", "v"), 2.0)
                except Exception:
                    pass
                keep.append(redis)
                text = generate_latest(registry).decode()
        keep.append(text)

    asyncio.run(clients())
    text = keep[-1]
    assert isinstance(text, str)
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
    return names


def test_every_shipped_rule_file_passes_promtool_check(promtool: str) -> None:
    """promtool check rules accepts each shipped file."""
    for group in RULE_GROUPS:
        path = RULES / f"{group}.yml"
        out = run_promtool(promtool, "check", "rules", str(path))
        assert "SUCCESS" in out


@pytest.mark.parametrize("group", TESTED_GROUPS)
def test_promtool_unit_tests_of_each_group_pass(promtool: str, group: str) -> None:
    """The group's promtool test file passes: firing, not firing when healthy, pending at for:."""
    tests = Path(str(RULES / "tests"))
    out = run_promtool(promtool, "test", "rules", f"{group}_test.yml", cwd=tests)
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    """Each alert appears in its group's test file with an expected alert and an empty one."""
    for group in TESTED_GROUPS:
        text = (RULES / "tests" / f"{group}_test.yml").read_text()
        for alert in alerts_of(rule_files()[group]):
            cases = re.findall(
                rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n  - name|\Z)",
                text,
                re.DOTALL,
            )
            assert any(c.strip().startswith("[]") for c in cases), f"{alert}: no not-firing case"
            assert any("exp_labels" in c for c in cases), f"{alert}: no firing case"


def test_the_issue_list_of_alerts_is_covered() -> None:
    """Every alert the operations guide promises exists."""
    assert set(all_alerts()) == {
        "VeritasBreakerOpen",
        "VeritasManyBreakersOpen",
        "VeritasHighErrorRate",
        "VeritasHighLatency",
        "VeritasPostgresNoPrimary",
        "VeritasPostgresWritesBlocked",
        "VeritasPostgresNodeFenced",
        "VeritasPostgresReplicationLag",
        "VeritasPostgresFailoverFlapping",
        "VeritasRedisMasterLost",
        "VeritasRedisFailoverFlapping",
        "VeritasRetryBudgetExhausted",
        "VeritasStaleDataServed",
        "VeritasHealthCheckFailing",
    }


def test_every_alert_has_severity_summary_description_and_a_runbook_anchor() -> None:
    """Each alert carries the four fields, and its runbook URL points at a heading that exists."""
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^#+ (.+)$", runbooks, re.MULTILINE)}
    for text in rule_files().values():
        for block in re.split(r"\n\s+- (?=alert:|record:)", text)[1:]:
            if not block.startswith("alert:"):
                continue
            name = block.split()[1]
            assert re.search(r"severity: (critical|warning|info)\b", block), name
            for field in ("summary:", "description:"):
                assert field in block, f"{name} lacks {field}"
            url = re.search(r'runbook_url: "docs/runbooks\.md#(\w+)"', block)
            assert url is not None and url.group(1) == name.lower(), name
            assert name.lower() in anchors, f"docs/runbooks.md has no heading {name}"


@pytest.mark.integration
def test_rules_and_dashboard_name_only_metrics_a_real_exposition_has(
    exposition: set[str],
) -> None:
    """Every metric a rule or a dashboard query reads is in a real scrape of the library."""
    files = rule_files()
    records = {m for text in files.values() for m in re.findall(r"- record: (\S+)", text)}
    queries = [q for text in files.values() for q in expressions(text)]
    queries += [q for _, q in dashboard_queries(dashboard_json())]
    named: set[str] = set()
    for query in queries:
        named |= metric_names(query)
        assert recorded(query) <= records, f"unknown recording rule in {query}"
    assert named, "no metric found in the queries"
    missing = sorted(named - exposition)
    assert not missing, f"not in the library's exposition: {missing}"


def test_rules_and_dashboard_name_only_described_metrics() -> None:
    """The same check against the library's own list of metric families (all of them)."""
    series = {s for d in describe_metrics() for s in d.series}
    files = rule_files()
    queries = [q for text in files.values() for q in expressions(text)]
    queries += [q for _, q in dashboard_queries(dashboard_json())]
    named = set().union(*(metric_names(q) for q in queries))
    assert not sorted(named - series)


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is PromQL that promtool accepts."""
    queries = [q for kind, q in dashboard_queries(dashboard_json()) if kind == "expr"]
    assert len(queries) >= 12
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": grafana_to_promql(q)}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    run_promtool(promtool, "check", "rules", str(path))


def test_dashboard_has_a_row_per_dependency_with_the_promised_panels() -> None:
    """A repeated row per dependency holds the six panels the operations guide lists."""
    panels = dashboard_json()["panels"]
    rows = [p for p in panels if p["type"] == "row" and p.get("repeat") == "dependency"]
    assert len(rows) == 1
    after = panels[panels.index(rows[0]) + 1 :]
    titles = {p["title"] for p in after}
    assert titles == {
        "Breaker state",
        "Calls by outcome",
        "Failovers",
        "Replication lag",
        "Fallbacks served",
        "Retries",
    }
    state = next(p for p in after if p["title"] == "Breaker state")
    assert state["type"] == "state-timeline"


def test_rendered_rules_with_every_option_still_pass_promtool(
    promtool: str, tmp_path: Path
) -> None:
    """A prefix, a selector, extra labels, runbook base and for: overrides give valid rules."""
    text = render_rules(
        prefix="app_",
        selector='job=~"orders|billing", env="prod"',
        labels={"team": "payments", "severity": "page"},
        runbook_base="https://docs.example/runbooks/",
        for_overrides={"VeritasPostgresNoPrimary": "5s", "VeritasPostgresWritesBlocked": "10s"},
    )
    path = tmp_path / "rules.yml"
    path.write_text(text)
    run_promtool(promtool, "check", "rules", str(path))
    assert not metric_names("\n".join(expressions(text)))  # recording rules keep their names
    for expr in expressions(text):
        for match in re.finditer(r"(?<![\w:])app_\w+(?![\w:(])(\{[^}]*\})?", expr):
            assert 'env="prod"' in (match.group(1) or ""), expr
    assert text.count('team: "payments"') == len(all_alerts())
    assert "severity: warning" not in text and "severity: critical" not in text
    assert "https://docs.example/runbooks/#veritasbreakeropen" in text
    no_primary = text.split("- alert: VeritasPostgresNoPrimary")[1].split("- alert:")[0]
    assert "for: 5s" in no_primary
    blocked = text.split("- alert: VeritasPostgresWritesBlocked")[1].split("- alert:")[0]
    assert "for: 10s" in blocked  # added where the shipped alert has none


def test_rendered_dashboard_follows_the_prefix_and_selector() -> None:
    """The dashboard's queries read the renamed metrics, each with the extra matcher."""
    data = json.loads(render_dashboard(prefix="app_", selector={"env": "prod"}))
    for kind, query in dashboard_queries(data):
        assert not metric_names(query), query
        for match in re.finditer(r"(?<![\w:])app_\w+(?![\w:(])(\{[^}]*\})?", query):
            assert 'env="prod"' in (match.group(1) or ""), (kind, query)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": ["nope"]}, "groups"),
        ({"prefix": "9x"}, "prefix"),
        ({"selector": "job=orders"}, "selector"),
        ({"labels": {"bad-name": "x"}}, "labels"),
        ({"for_overrides": {"VeritasBreakerOpen": "soon"}}, "for_overrides"),
        ({"for_overrides": {"NoSuchAlert": "1m"}}, "for_overrides"),
    ],
)
def test_render_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    """A bad option is a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        render_rules(**kwargs)


def test_cli_prints_rules_and_dashboard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``veritas-resilience rules`` prints the adapted rules, the dashboard, or writes both."""
    assert main(["rules", "--prefix", "app_", "--selector", 'job="orders"',
                 "--label", "team=db", "--group", "postgres"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert 'app_postgres_primary_available{job="orders"} == 0' in out
    assert 'team: "db"' in out and "VeritasBreakerOpen" not in out
    assert main(["rules", "--dashboard"]) == 0
    assert json.loads(capsys.readouterr().out)["uid"] == "veritas-resilience"
    assert main(["rules", "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "veritas-rules.yml").read_text() == render_rules()
    assert json.loads((tmp_path / "veritas-dashboard.json").read_text())["panels"]
    with pytest.raises(SystemExit):
        main(["rules", "--label", "no-equals-sign"])


@pytest.mark.integration
def test_writes_blocked_and_lag_limit_gauges_follow_the_client(
    pg_cluster_factory: PostgresClusterFactory,
) -> None:
    """The series the writes-blocked and lag alerts read: 1 for the reason while two nodes claim
    to be primary (two clusters: split brain, or different system identifiers), no primary
    available, the lag limits as configured and absent when unset."""
    from veritas_resilience.postgres import FailoverClient

    first, second = pg_cluster_factory(0), pg_cluster_factory(0)
    registry = CollectorRegistry()

    def samples() -> dict[tuple[str, str], float]:
        out = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in family.samples:
                out[(s.name, s.labels.get("reason", ""))] = s.value
        return out

    async def scenario() -> tuple[str | None, dict[tuple[str, str], float]]:
        async with FailoverClient(
            [first.primary.dsn, second.primary.dsn], name="mixed", max_lag_bytes=1024,
            hooks=[PrometheusHook(registry)],
        ) as db:  # fmt: skip
            for _ in range(200):
                blocked = (await db.health(refresh=True)).writes_blocked
                if blocked is not None:
                    break
                await asyncio.sleep(0.02)
            return blocked, samples()

    reason, seen = asyncio.run(scenario())
    assert reason in ("split_brain", "system_identifier")
    other = "system_identifier" if reason == "split_brain" else "split_brain"
    assert seen[("veritas_postgres_writes_blocked", reason)] == 1.0
    assert seen[("veritas_postgres_writes_blocked", other)] == 0.0
    assert seen[("veritas_postgres_primary_available", "")] == 0.0
    assert seen[("veritas_postgres_replication_lag_limit_bytes", "")] == 1024.0
    assert ("veritas_postgres_replication_lag_limit_seconds", "") not in seen
