"""End to end with the real servers: PostgreSQL crashes, Prometheus scrapes a service using
``FailoverClient``, the shipped no-primary alert fires, two Alertmanagers post to the receiver,
the action runs once, and the revert runs once the standby is promoted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client import CollectorRegistry

from veritas_resilience import PrometheusHook
from veritas_resilience.recovery import Alert, Recovery, RecoveryDecision, render_rules
from veritas_resilience.recovery import reprobe_postgres as reprobe
from veritas_resilience.testing import PostgresClusterFactory, RecordingHook, free_port

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TOKEN = "e2e-token"
HOST = "127.0.0.1"


@pytest.fixture
def anyio_backend() -> str:
    """The PostgreSQL client and uvicorn run on asyncio."""
    return "asyncio"


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(f"{names[0]} is not installed (tests/run.sh installs it)")


class Processes:
    """Servers started by the test, always stopped (and their logs kept for failures)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> None:
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base)
        log.close()
        self.procs.append((name, proc))

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{(self.base / f'{name}.log').read_text()[-3000:]}"
            for name, _ in self.procs
        )

    def stop(self) -> None:
        for _, proc in self.procs:
            proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Starts processes in the test's folder and stops them all at the end."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


async def serve(app: Any, port: int) -> AsyncIterator[None]:
    import uvicorn

    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:
            await anyio.sleep(0.01)
        try:
            yield
        finally:
            server.should_exit = True


async def wait_for(predicate: Any, within: float, what: str, logs: Any = None) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            detail = logs() if logs else ""
            raise AssertionError(f"timed out after {within} s waiting for {what}\n{detail}")
        await anyio.sleep(0.05)


def start_monitoring(
    processes: Processes, base: Path, service_port: int, receiver_port: int
) -> tuple[int, list[int]]:
    """Prometheus (0.5 s scrape and evaluation) and two unclustered Alertmanagers."""
    prometheus = binary("prometheus")
    alertmanager = binary("prometheus-alertmanager", "alertmanager")
    am_ports = [free_port(), free_port()]
    for i, port in enumerate(am_ports):
        folder = base / f"am{i}"
        folder.mkdir()
        config = {
            "route": {
                "receiver": "recovery",
                "group_by": ["alertname", "client"],
                "group_wait": "100ms",
                "group_interval": "500ms",
                "repeat_interval": "1s",
            },
            "receivers": [
                {
                    "name": "recovery",
                    "webhook_configs": [
                        {
                            "url": f"http://{HOST}:{receiver_port}/alerts",
                            "send_resolved": True,
                            "http_config": {
                                "authorization": {"type": "Bearer", "credentials": TOKEN}
                            },
                        }
                    ],
                }
            ],
        }
        (folder / "alertmanager.yml").write_text(json.dumps(config))
        processes.start(
            f"alertmanager{i}", alertmanager,
            f"--config.file={folder / 'alertmanager.yml'}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            f"--web.external-url=http://{HOST}:{port}",
            "--cluster.listen-address=",
        )  # fmt: skip
    # Every shipped rule, so that the test also sees each one evaluate without error.
    rules = render_rules(for_overrides={"VeritasPostgresNoPrimary": "1s"})
    (base / "rules.yml").write_text(rules)
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(base / "rules.yml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"{HOST}:{p}" for p in am_ports]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "orders",
                "scrape_interval": "500ms",
                "scrape_timeout": "400ms",
                "static_configs": [{"targets": [f"{HOST}:{service_port}"]}],
            }
        ],
    }
    (base / "prometheus.yml").write_text(json.dumps(config))
    prom_port = free_port()
    processes.start(
        "prometheus", prometheus,
        f"--config.file={base / 'prometheus.yml'}",
        f"--storage.tsdb.path={base / 'tsdb'}",
        f"--web.listen-address={HOST}:{prom_port}",
        "--rules.alert.resend-delay=500ms",
    )  # fmt: skip
    return prom_port, am_ports


async def test_no_primary_alert_runs_the_action_once_and_the_revert_after_promotion(
    pg_cluster_factory: PostgresClusterFactory, processes: Processes, tmp_path: Path
) -> None:
    """Crash the primary: the alert fires through Prometheus and two Alertmanagers, the action
    runs once however often it is delivered; promote the standby: the alert resolves, the revert
    runs once. Prints the seconds from fault to action and from recovery to revert."""
    from veritas_resilience.health import HealthRegistry, checks
    from veritas_resilience.postgres import FailoverClient

    service_port, receiver_port = free_port(), free_port()
    # Prometheus and the Alertmanagers start while the PostgreSQL cluster does.
    prom_port, _ = start_monitoring(processes, tmp_path, service_port, receiver_port)
    prom = f"http://{HOST}:{prom_port}"
    cluster = await anyio.to_thread.run_sync(pg_cluster_factory, 1)
    registry = CollectorRegistry()
    recorder = RecordingHook()
    ran: list[tuple[float, Alert]] = []
    reverted: list[tuple[float, Alert]] = []

    async with FailoverClient(
        [n.dsn for n in cluster.nodes], name="orders-db", hooks=[PrometheusHook(registry)],
        failover_timeout=5.0,
    ) as db:  # fmt: skip
        reprobe_now = reprobe(db)
        # The service: the health app, whose /metrics Prometheus scrapes.
        health = HealthRegistry(service="orders", hooks=[PrometheusHook(registry)])
        health.add("postgres", checks.postgres(db), critical=True)
        service = health.asgi(metrics_registry=registry)

        async def act(alert: Alert) -> None:
            ran.append((time.monotonic(), alert))
            await reprobe_now(alert)

        async def undo(alert: Alert) -> None:
            reverted.append((time.monotonic(), alert))

        recovery = Recovery(token=TOKEN, journal=tmp_path / "journal.jsonl", hooks=[recorder])
        recovery.on("VeritasPostgresNoPrimary", act, revert=undo, labels={"client": "orders-db"})

        async with (
            recovery,
            httpx.AsyncClient(timeout=2.0) as http,
            _served(service, service_port),
            _served(recovery.asgi(), receiver_port),
        ):

            async def scraped() -> bool:
                try:
                    query = {"query": "veritas_postgres_primary_available"}
                    r = await http.get(f"{prom}/api/v1/query", params=query)
                except httpx.HTTPError:
                    return False
                result = r.json()["data"]["result"]
                return bool(result) and result[0]["value"][1] == "1"

            await wait_for(scraped, 30, "Prometheus to scrape the service", processes.logs)
            await check_rules_and_dashboard(http, prom)

            fault = time.monotonic()
            await anyio.to_thread.run_sync(cluster.kill_primary)

            async def acted() -> bool:
                return bool(ran)

            await wait_for(acted, 30, "the action", processes.logs)
            fault_to_action = ran[0][0] - fault

            def deliveries() -> list[RecoveryDecision]:
                return [e for e in recorder.events if isinstance(e, RecoveryDecision)
                        and e.decision in ("ran", "duplicate")]  # fmt: skip

            async def both_delivered_often() -> bool:
                sources = {e.detail for e in deliveries() if e.decision == "duplicate"}
                return len(deliveries()) >= 4 and len(sources) == 2

            # Repeats (repeat_interval 1 s) from both Alertmanagers: still one run.
            await wait_for(both_delivered_often, 20, "repeated deliveries", processes.logs)
            assert len(ran) == 1

            await anyio.to_thread.run_sync(cluster.promote, cluster.standbys[0])
            recovered = time.monotonic()

            async def undone() -> bool:
                return bool(reverted)

            await wait_for(undone, 30, "the revert", processes.logs)
            recovery_to_revert = reverted[0][0] - recovered
            await anyio.sleep(1.0)  # more resolved deliveries from both Alertmanagers
            await recovery.wait_idle()

    assert len(ran) == 1 and len(reverted) == 1
    alert = ran[0][1]
    assert alert.labels["client"] == "orders-db" and alert.labels["severity"] == "critical"
    assert alert.annotations["runbook_url"] == "docs/runbooks.md#veritaspostgresnoprimary"
    assert reverted[0][1].status == "resolved"
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in journal].count("ran") == 1
    assert [r["decision"] for r in journal].count("reverted") == 1
    print(
        f"\nfault -> action: {fault_to_action:.2f} s; recovery -> revert: "
        f"{recovery_to_revert:.2f} s; deliveries: {len(deliveries())}"
    )


@pytest.mark.parametrize("copies", [3])
async def test_one_alert_delivered_three_times_by_two_alertmanagers_runs_once(
    copies: int,
) -> None:
    """The same firing alert posted three times by one Alertmanager and once by another, over
    real HTTP to uvicorn, runs the action once; its resolution reverts once."""
    runs: list[str] = []
    reverts: list[str] = []

    async def act(alert: Alert) -> None:
        runs.append(alert.external_url)

    async def undo(alert: Alert) -> None:
        reverts.append(alert.external_url)

    recovery = Recovery(token=TOKEN, hooks=[])
    recovery.on("VeritasPostgresNoPrimary", act, revert=undo)
    port = free_port()

    def body(status: str, am: str) -> dict[str, Any]:
        return {
            "version": "4", "status": status, "receiver": "recovery", "groupKey": "{}:{}",
            "truncatedAlerts": 0, "externalURL": am, "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {},
            "alerts": [{
                "status": status, "fingerprint": "c0ffee", "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "labels": {"alertname": "VeritasPostgresNoPrimary", "client": "orders-db"},
                "annotations": {}, "generatorURL": "",
            }],
        }  # fmt: skip

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with recovery, _served(recovery.asgi(), port), httpx.AsyncClient() as http:
        url = f"http://{HOST}:{port}/alerts"
        for am in ["http://am1:9093"] * copies + ["http://am2:9093"]:
            assert (await http.post(url, json=body("firing", am), headers=headers)).is_success
        for am in ("http://am2:9093", "http://am1:9093"):
            assert (await http.post(url, json=body("resolved", am), headers=headers)).is_success
        await recovery.wait_idle()
    assert runs == ["http://am1:9093"]
    assert reverts == ["http://am2:9093"]


async def check_rules_and_dashboard(http: httpx.AsyncClient, prom: str) -> None:
    """Against the real Prometheus: every rule evaluates without error, every dashboard query
    runs, and the per-dependency panels show the client's series."""
    from veritas_resilience.recovery import dashboard_json

    async def evaluated() -> bool:
        groups = (await http.get(f"{prom}/api/v1/rules")).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    await wait_for(evaluated, 20, "every rule to be evaluated")

    async def samples() -> bool:  # rate() wants two of them
        query = {"query": 'count_over_time(veritas_postgres_primary_available{job="orders"}[1m])'}
        result = (await http.get(f"{prom}/api/v1/query", params=query)).json()["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) >= 3

    await wait_for(samples, 20, "three scrapes")
    groups = (await http.get(f"{prom}/api/v1/rules")).json()["data"]["groups"]
    broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
              if r["health"] != "ok"]  # fmt: skip
    assert not broken
    assert len(groups) == 6

    def targets(node: Any) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            if "panels" in node and "title" in node:
                for panel in node.get("panels", []):
                    yield from targets(panel)
            for target in node.get("targets", []):
                yield node.get("title", ""), target["expr"]
            for child in node.get("panels", []) if "title" not in node else []:
                yield from targets(child)
        elif isinstance(node, list):
            for child in node:
                yield from targets(child)

    has_data: dict[str, bool] = {}
    queries = list(targets(dashboard_json()["panels"]))
    assert len(queries) >= 12
    for title, expr in queries:
        for var, value in (("$__rate_interval", "1m"), ("$dependency", "orders-db"),
                           ("$job", "orders")):  # fmt: skip
            expr = expr.replace(var, value)
        answer = (await http.get(f"{prom}/api/v1/query", params={"query": expr})).json()
        assert answer["status"] == "success", (title, expr, answer)
        has_data[title] = has_data.get(title, False) or bool(answer["data"]["result"])
    # The client's panels show it: its breakers, their calls, its primary, its standby's lag.
    for title in ("Breaker state", "Calls by outcome", "Failovers", "Replication lag"):
        assert has_data[title], title


async def test_serve_command_runs_health_and_receiver_together(
    tmp_path: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``veritas-resilience serve`` serves /health, /metrics and POST /alerts in one server."""
    import sys

    (tmp_path / "ops_objects.py").write_text(
        "from veritas_resilience.health import HealthRegistry\n"
        "from veritas_resilience.recovery import Recovery\n"
        "health = HealthRegistry(service='orders')\n"
        f"recovery = Recovery(token={TOKEN!r})\n"
        "ran = []\n"
        "async def act(alert):\n"
        "    print('ACTION', alert.alertname, flush=True)\n"
        "recovery.on('VeritasBreakerOpen', act)\n"
    )
    port = free_port()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child imports ops_objects
    processes.start(
        "serve", sys.executable, "-m", "veritas_resilience", "serve",
        "--recovery", "ops_objects:recovery", "--health", "ops_objects:health",
        "--port", str(port),
    )  # fmt: skip
    log = tmp_path / "serve.log"
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=2.0) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/live")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(up, 20, "the server", lambda: log.read_text())
            assert (await http.get("/health")).status_code == 200
            assert "veritas_health_ready" in (await http.get("/metrics")).text
            body = {
                "version": "4", "status": "firing", "externalURL": "http://am:9093",
                "alerts": [{"status": "firing", "fingerprint": "f", "startsAt": "t",
                            "labels": {"alertname": "VeritasBreakerOpen"}}],
            }  # fmt: skip
            assert (await http.post("/alerts", json=body)).status_code == 401
            response = await http.post(
                "/alerts", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert response.status_code == 200

            async def acted() -> bool:
                return "ACTION VeritasBreakerOpen" in log.read_text()

            await wait_for(acted, 10, "the action", lambda: log.read_text())
    finally:
        processes.stop()


def _served(app: Any, port: int) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(serve)(app, port)


async def test_sentinel_failover_action_moves_the_master_within_its_budget(
    redis_sentinel_factory: Any,
) -> None:
    """sentinel_failover asks real Sentinels for a failover: the master moves; a second incident
    within the hour is held back by the action's default budget of one run."""
    from veritas_resilience.recovery import sentinel_failover
    from veritas_resilience.redis import SentinelRedis

    kit = await anyio.to_thread.run_sync(redis_sentinel_factory)
    await anyio.to_thread.run_sync(kit.wait_replicas_synced)
    old = kit.master
    recorder = RecordingHook()
    client = SentinelRedis(kit.sentinels, kit.service_name, name="sessions", hooks=[])
    recovery = Recovery(token=TOKEN, hooks=[recorder])
    recovery.on("VeritasRedisMasterLost", sentinel_failover(client))

    def alert(starts_at: str) -> Any:
        from veritas_resilience.recovery import Notification

        return Notification(
            receiver="r", status="firing", group_key="g", truncated_alerts=0, external_url="",
            alerts=(Alert(status="firing", labels={"alertname": "VeritasRedisMasterLost"},
                          starts_at=starts_at, fingerprint="f"),),
        )  # fmt: skip

    async with client, recovery:
        await client.set("k", "v")
        recovery.accept(alert("t1"))
        await recovery.wait_idle()
        new = await anyio.to_thread.run_sync(kit.wait_for_master_change, old)
        assert new != old
        recovery.accept(alert("t2"))
        await recovery.wait_idle()
    decided = [
        (e.decision, e.starts_at) for e in recorder.events if isinstance(e, RecoveryDecision)
    ]
    assert decided == [("ran", "t1"), ("budget_exhausted", "t2")]


async def test_webhook_escalation_posts_the_alert_to_a_pager() -> None:
    """After the last rung, the webhook hook POSTs the alert with the bearer token; a pager
    answering 500 makes an ``escalation_failed`` decision."""
    from veritas_resilience.recovery import Notification, webhook
    from veritas_resilience.testing import FakeClock

    received: list[tuple[bytes, dict[bytes, bytes]]] = []
    status = [200]

    async def pager(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        received.append((body, dict(scope["headers"])))
        await send({"type": "http.response.start", "status": status[0], "headers": []})
        await send({"type": "http.response.body", "body": b""})

    clock = FakeClock()
    recorder = RecordingHook()
    port = free_port()
    page = webhook(f"http://{HOST}:{port}/page", token="pager-token")
    recovery = Recovery(token=TOKEN, clock=clock, hooks=[recorder], escalate=page)

    async def first(alert: Alert) -> None:
        pass

    recovery.on("VeritasRedisMasterLost", first, escalate_after=60)

    def firing(starts_at: str) -> Notification:
        return Notification(
            receiver="r", status="firing", group_key="g", truncated_alerts=0,
            external_url="http://am:9093",
            alerts=(Alert(status="firing", labels={"alertname": "VeritasRedisMasterLost",
                                                   "name": "sessions"},
                          annotations={"summary": "no master"}, starts_at=starts_at,
                          fingerprint="f", external_url="http://am:9093"),),
        )  # fmt: skip

    async with _served(pager, port), recovery:
        recovery.accept(firing("t1"))
        await clock.wait_for_sleepers()
        clock.advance(60)
        await recovery.wait_idle()
        status[0] = 500
        recovery.accept(firing("t2"))
        await clock.wait_for_sleepers()
        clock.advance(60)
        await recovery.wait_idle()
    body, headers = received[0]
    sent = json.loads(body)
    assert sent["alertname"] == "VeritasRedisMasterLost"
    assert sent["labels"]["name"] == "sessions" and sent["annotations"]["summary"] == "no master"
    assert headers[b"authorization"] == b"Bearer pager-token"
    decided = [e.decision for e in recorder.events if isinstance(e, RecoveryDecision)]
    assert decided == ["ran", "escalated", "ran", "escalation_failed"]
    assert "pager-token" not in repr(recorder.events)
