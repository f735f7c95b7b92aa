"""The Alertmanager webhook receiver: security, bad input, delivery semantics, escalation ladder,
cooldowns and budgets on a fake clock, dry run, audit journal, metrics, built-in actions."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _log_capture import LogCapture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from veritas_resilience import (
    CircuitBreakerRegistry,
    CircuitState,
    PrometheusHook,
    StaleCache,
    StructlogHook,
)
from veritas_resilience.recovery import (
    Alert,
    AlertsTruncated,
    NotificationRejected,
    Recovery,
    RecoveryDecision,
    Step,
    isolate_breaker,
    parse_notification,
    reset_breaker,
    serve_stale,
    webhook,
)
from veritas_resilience.recovery._serve import ops_app
from veritas_resilience.testing import FakeClock, RecordingHook

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def alert(
    alertname: str = "VeritasBreakerOpen",
    *,
    status: str = "firing",
    fingerprint: str = "1a30ba71cca2921f",
    starts_at: str = "2026-01-01T10:00:00.123456789Z",
    **labels: str,
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": alertname, "severity": "warning", **labels},
        "annotations": {"summary": "something"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-01-01T10:05:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint,
    }


def payload(*alerts: dict[str, Any], external_url: str = "http://am1:9093", **extra: Any) -> Any:
    body: dict[str, Any] = {
        "version": "4",
        "groupKey": '{}:{alertname="VeritasBreakerOpen"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "recovery",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": external_url,
        "alerts": list(alerts),
    }
    body.update(extra)
    return body


class Calls:
    """An action that records the alerts it ran for (and can be held until released)."""

    def __init__(self, name: str = "action") -> None:
        self.name = name
        self.alerts: list[Alert] = []
        self.release: anyio.Event | None = None
        self.fail: BaseException | None = None

    async def __call__(self, alert: Alert) -> None:
        self.alerts.append(alert)
        if self.release is not None:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail

    def __len__(self) -> int:
        return len(self.alerts)


@pytest.fixture
def recorder() -> RecordingHook:
    """Records the receiver's events."""
    return RecordingHook()


@pytest.fixture
def make(recorder: RecordingHook, clock: FakeClock) -> Callable[..., Recovery]:
    """Builds a receiver with a fake clock and the recorder."""

    def build(**kwargs: Any) -> Recovery:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("name", "recovery")
        return Recovery(clock=clock, hooks=[recorder], **kwargs)

    return build


async def post(recovery: Recovery, body: Any, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> httpx.Response:  # fmt: skip
    transport = httpx.ASGITransport(app=recovery.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        content = raw if raw is not None else json.dumps(body).encode()
        return await client.post(
            "/alerts", content=content, headers=AUTH if headers is None else headers
        )


def decided(recorder: RecordingHook, decision: str) -> list[RecoveryDecision]:
    return [
        e for e in recorder.events if isinstance(e, RecoveryDecision) and e.decision == decision
    ]


def decisions(recorder: RecordingHook) -> list[tuple[str, str, int | None]]:
    return [
        (e.alertname, e.decision, e.step)
        for e in recorder.events
        if isinstance(e, RecoveryDecision)
    ]


# -- construction -----------------------------------------------------------------------------


def test_a_receiver_without_credentials_is_refused() -> None:
    """An endpoint that acts must authenticate: no token and no basic auth is a ValueError."""
    with pytest.raises(ValueError, match="token or basic_auth"):
        Recovery()
    with pytest.raises(ValueError, match="token"):
        Recovery(token="")
    with pytest.raises(ValueError, match="basic_auth"):
        Recovery(basic_auth=("user", ""))
    with pytest.raises(ValueError, match="max_body"):
        Recovery(token=TOKEN, max_body=10)


def test_on_rejects_bad_rules() -> None:
    """Bad registrations name the parameter: ladder without escalate_after, negative cooldown."""
    recovery = Recovery(token=TOKEN)
    action = Calls()
    with pytest.raises(ValueError, match="alertname"):
        recovery.on("", action)
    with pytest.raises(ValueError, match="escalate_after"):
        recovery.on("A", [action, action])
    with pytest.raises(ValueError, match="escalate_after"):
        recovery.on("A", action, escalate=action)
    with pytest.raises(ValueError, match="cooldown"):
        recovery.on("A", action, cooldown=-1)
    with pytest.raises(ValueError, match="budget"):
        recovery.on("A", action, budget=0)
    with pytest.raises(ValueError, match="revert"):
        recovery.on("A", [action, action], revert=action, escalate_after=10)
    with pytest.raises(TypeError, match="action"):
        Step(action=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action"):
        recovery.on("A", [])
    with pytest.raises(ValueError, match="url"):
        webhook("ftp://pager.example/page")
    with pytest.raises(ValueError, match="timeout"):
        webhook("http://127.0.0.1:1/page", timeout=0)


# -- security and bad input -------------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_without_valid_credentials_get_401_and_run_nothing(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """No header, a wrong token, another scheme or a malformed basic header: 401, nothing runs."""
    recovery = make()
    action = Calls()
    recovery.on("VeritasBreakerOpen", action)
    body = payload(alert())
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer"},
    ):
        response = await post(recovery, body, headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
    await anyio.sleep(0.01)
    assert len(action) == 0
    rejected = [e for e in recorder.events if isinstance(e, NotificationRejected)]
    assert {e.reason for e in rejected} == {"unauthorized"}
    assert TOKEN not in repr(rejected)


@pytest.mark.anyio
async def test_bearer_token_and_basic_auth_are_both_accepted(
    make: Callable[..., Recovery],
) -> None:
    """What Alertmanager's http_config sends: ``authorization`` (Bearer) or ``basic_auth``."""
    recovery = make(token=["old-token", TOKEN], basic_auth=("alertmanager", "pa:ss"))
    ok = base64.b64encode(b"alertmanager:pa:ss").decode()
    bad = base64.b64encode(b"alertmanager:wrong").decode()
    assert (
        await post(recovery, payload(), {"Authorization": "Bearer old-token"})
    ).status_code == 200
    assert (
        await post(recovery, payload(), {"Authorization": f"bearer {TOKEN}"})
    ).status_code == 200
    assert (await post(recovery, payload(), {"Authorization": f"Basic {ok}"})).status_code == 200
    assert (await post(recovery, payload(), {"Authorization": f"Basic {bad}"})).status_code == 401


@pytest.mark.anyio
async def test_a_body_over_the_cap_gets_413_whether_announced_or_streamed(
    make: Callable[..., Recovery],
) -> None:
    """Content-Length over max_body is refused before reading; a streamed body when it grows."""
    recovery = make(max_body=2048)
    big = json.dumps(payload(alert(junk="x" * 4096))).encode()
    assert (await post(recovery, None, raw=big)).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    transport = httpx.ASGITransport(app=recovery.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        response = await client.post("/alerts", content=chunks(), headers=AUTH)
    assert response.status_code == 413


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "object"),
        (json.dumps(payload(version="3")).encode(), "version"),
        (json.dumps({k: v for k, v in payload().items() if k != "version"}).encode(), "version"),
        (json.dumps(payload(alerts="nope")).encode(), "alerts"),
        (json.dumps(payload({"status": "firing"})).encode(), "status|alertname"),
        (json.dumps(payload(alert(status="pending"))).encode(), "status"),
        (json.dumps(payload({**alert(), "fingerprint": ""})).encode(), "fingerprint"),
        (json.dumps(payload({**alert(), "labels": {"alertname": 3}})).encode(), "labels"),
        (json.dumps(payload(truncatedAlerts=-1)).encode(), "truncatedAlerts"),
        (b"[" * 100_000, "not JSON|nests"),
    ],
)
async def test_malformed_payloads_get_400_with_the_reason(
    make: Callable[..., Recovery], raw: bytes, message: str
) -> None:
    """Bad JSON, a wrong version or a broken alert: 400 saying what is wrong."""
    response = await post(make(), None, raw=raw)
    assert response.status_code == 400
    import re

    assert re.search(message, response.json()["error"])


@pytest.mark.anyio
async def test_other_paths_and_methods_get_404_and_405(make: Callable[..., Recovery]) -> None:
    """Only POST /alerts: GET /alerts is 405 with Allow, another path 404."""
    transport = httpx.ASGITransport(app=make().asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        response = await client.get("/alerts", headers=AUTH)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert (await client.post("/other", headers=AUTH)).status_code == 404


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=10), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda alerts, version, truncated: json.dumps(
                {"version": version, "alerts": alerts, "truncatedAlerts": truncated}
            ).encode(),
            st.lists(
                st.dictionaries(
                    st.sampled_from(["status", "labels", "fingerprint", "startsAt", "junk"]),
                    st.one_of(
                        st.sampled_from(["firing", "resolved", "x", ""]),
                        st.dictionaries(
                            st.sampled_from(["alertname", "name"]), st.text(max_size=5)
                        ),
                        st.integers(),
                    ),
                ),
                max_size=3,
            ),
            st.sampled_from(["4", "3", 4, None]),
            st.one_of(st.integers(-2, 2), st.text(max_size=2)),
        ),
    )
)
def test_the_receiver_never_crashes_on_any_body(body: bytes) -> None:
    """Any body gets 200 or 400, never a 500 or an exception out of the app."""

    async def check() -> None:
        recovery = Recovery(token=TOKEN, hooks=[])
        recovery.on("A", Calls())
        response = await post(recovery, None, raw=body)
        assert response.status_code in (200, 400), response.text

    anyio.run(check)


# -- delivery semantics ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_answer_comes_before_a_slow_action_finishes(
    make: Callable[..., Recovery],
) -> None:
    """2xx at once: the action runs in the background, not on the request."""
    recovery = make()
    action = Calls()
    action.release = anyio.Event()
    recovery.on("VeritasBreakerOpen", action)
    async with recovery:
        with anyio.fail_after(5):
            response = await post(recovery, payload(alert()))
        assert response.status_code == 200
        assert response.json() == {"status": "accepted", "alerts": 1}
        await anyio.sleep(0.01)
        assert len(action) == 1  # started, still running
        action.release.set()
        await recovery.wait_idle()


@pytest.mark.anyio
async def test_one_incident_runs_once_however_often_and_by_whom_it_is_delivered(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """Three deliveries by one Alertmanager and one by its HA peer: one run; a new start: two."""
    recovery = make()
    action = Calls()
    recovery.on("VeritasBreakerOpen", action)
    async with recovery:
        for url in ("http://am1:9093", "http://am1:9093", "http://am1:9093", "http://am2:9093"):
            assert (await post(recovery, payload(alert(), external_url=url))).status_code == 200
        await recovery.wait_idle()
        assert len(action) == 1
        # The same alert firing again later is another incident.
        await post(recovery, payload(alert(starts_at="2026-01-01T11:00:00Z")))
        await recovery.wait_idle()
    assert len(action) == 2
    assert [d for _, d, _ in decisions(recorder)].count("duplicate") == 3
    dup = decided(recorder, "duplicate")[0]
    assert "am1" in dup.detail


@pytest.mark.anyio
async def test_firing_and_resolved_are_handled_per_alert_in_one_notification(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """One POST resolving alert a and firing alert b: a's revert and b's action both run."""
    recovery = make()
    action, revert = Calls("act"), Calls("undo")
    recovery.on("VeritasBreakerOpen", action, revert=revert)
    async with recovery:
        await post(recovery, payload(alert(fingerprint="aaaa")))
        await recovery.wait_idle()
        mixed = payload(
            alert(fingerprint="aaaa", status="resolved"), alert(fingerprint="bbbb"),
            status="resolved",
        )  # fmt: skip
        await post(recovery, mixed)
        await recovery.wait_idle()
    assert [a.fingerprint for a in action.alerts] == ["aaaa", "bbbb"]
    assert [a.fingerprint for a in revert.alerts] == ["aaaa"]
    assert revert.alerts[0].status == "resolved"


@pytest.mark.anyio
async def test_resolved_runs_the_revert_once_and_only_for_what_ran(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """Resolved reverts once (duplicates ignored); a resolved never seen firing reverts nothing
    and a late copy of its firing alert starts nothing."""
    recovery = make()
    action, revert = Calls("act"), Calls("undo")
    recovery.on("VeritasBreakerOpen", action, revert=revert)
    async with recovery:
        await post(recovery, payload(alert()))
        await recovery.wait_idle()
        for _ in range(3):
            await post(recovery, payload(alert(status="resolved")))
        await recovery.wait_idle()
        assert len(revert) == 1
        late = alert(fingerprint="cccc", status="resolved")
        await post(recovery, payload(late))
        await post(recovery, payload(alert(fingerprint="cccc")))
        await recovery.wait_idle()
    assert len(action) == 1 and len(revert) == 1
    cccc = [e.decision for e in recorder.events
            if isinstance(e, RecoveryDecision) and e.fingerprint == "cccc"]  # fmt: skip
    assert cccc == ["resolved", "duplicate"]


@pytest.mark.anyio
async def test_a_resolved_alert_waits_for_its_running_action_before_reverting(
    make: Callable[..., Recovery],
) -> None:
    """A revert never overtakes the action it undoes."""
    order: list[str] = []
    gate, started = anyio.Event(), anyio.Event()

    async def act(alert: Alert) -> None:
        started.set()
        await gate.wait()
        order.append("act")

    async def undo(alert: Alert) -> None:
        order.append("undo")

    recovery = make()
    recovery.on("VeritasBreakerOpen", act, revert=undo)
    async with recovery:
        await post(recovery, payload(alert()))
        await started.wait()
        await post(recovery, payload(alert(status="resolved")))
        await anyio.sleep(0.01)
        assert order == []
        gate.set()
        await recovery.wait_idle()
    assert order == ["act", "undo"]


@pytest.mark.anyio
async def test_truncated_alerts_are_reported(recorder: RecordingHook) -> None:
    """truncatedAlerts > 0: an event (a warning log line) and a counter."""
    registry = CollectorRegistry()
    recovery = Recovery(token=TOKEN, name="recovery", hooks=[recorder, PrometheusHook(registry)])
    await post(recovery, payload(alert(), truncatedAlerts=7))
    events = [e for e in recorder.events if isinstance(e, AlertsTruncated)]
    assert [(e.count, e.group_key) for e in events] == [(7, '{}:{alertname="VeritasBreakerOpen"}')]
    assert (
        'veritas_recovery_truncated_alerts_total{name="recovery"} 7.0'
        in generate_latest(registry).decode()
    )
    level, message, _ = events[0].log_fields()
    assert (level, message) == ("warning", "recovery_alerts_truncated")


@pytest.mark.anyio
async def test_unmatched_alerts_are_recorded_without_their_name_in_metric_labels(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """An alert no rule handles is an ``unmatched`` decision; metric labels stay bounded."""
    recovery = make()
    recovery.on("VeritasBreakerOpen", Calls())
    await post(recovery, payload(alert("SomethingElse")))
    assert decisions(recorder) == [("SomethingElse", "unmatched", None)]
    assert recovery.decisions() == {("", "unmatched"): 1}


@pytest.mark.anyio
async def test_rules_match_on_labels_too(make: Callable[..., Recovery]) -> None:
    """``labels=`` narrows a rule to alerts carrying those label values."""
    recovery = make()
    payments, other = Calls(), Calls()
    recovery.on("VeritasBreakerOpen", payments, labels={"name": "payments"})
    recovery.on("VeritasBreakerOpen", other, labels={"name": "inventory"})
    async with recovery:
        await post(recovery, payload(alert(name="payments")))
        await recovery.wait_idle()
    assert len(payments) == 1 and len(other) == 0


# -- escalation, cooldown, budget, dry run (fake clock) ---------------------------------------


@pytest.mark.anyio
async def test_the_ladder_climbs_while_the_alert_fires_then_escalates(
    make: Callable[..., Recovery], clock: FakeClock, recorder: RecordingHook
) -> None:
    """Step 1 at once, step 2 after T, the escalation hook after another T; reverts last first."""
    first, second, page = Calls("first"), Calls("second"), Calls("page")
    undone: list[str] = []

    async def undo_first(alert: Alert) -> None:
        undone.append("first")

    async def undo_second(alert: Alert) -> None:
        undone.append("second")

    recovery = make()
    recovery.on(
        "VeritasPostgresNoPrimary",
        [Step(action=first, revert=undo_first), Step(action=second, revert=undo_second)],
        escalate_after=120,
        escalate=page,
    )
    async with recovery:
        await post(recovery, payload(alert("VeritasPostgresNoPrimary")))
        await recovery.wait_idle()
        await clock.wait_for_sleepers()
        assert (len(first), len(second), len(page)) == (1, 0, 0)
        clock.advance(119)
        await anyio.sleep(0.01)
        assert len(second) == 0  # not yet
        clock.advance(1)
        await clock.wait_for_sleepers()
        assert (len(first), len(second), len(page)) == (1, 1, 0)
        clock.advance(120)
        await recovery.wait_idle()
        assert len(page) == 1
        await post(recovery, payload(alert("VeritasPostgresNoPrimary", status="resolved")))
        await recovery.wait_idle()
    assert undone == ["second", "first"]
    assert [(d, s) for _, d, s in decisions(recorder)] == [
        ("ran", 0), ("ran", 1), ("escalated", None), ("reverted", 1), ("reverted", 0),
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_resolved_alert_stops_the_ladder(
    make: Callable[..., Recovery], clock: FakeClock
) -> None:
    """Resolution before T: the next rung and the escalation hook never run."""
    first, second, page = Calls("first"), Calls("second"), Calls("page")
    recovery = make(escalate=page)
    recovery.on("X", [first, second], escalate_after=60)
    async with recovery:
        await post(recovery, payload(alert("X")))
        await clock.wait_for_sleepers()
        await post(recovery, payload(alert("X", status="resolved")))
        await recovery.wait_idle()
        assert clock.sleepers == 0  # the timer was cancelled
        clock.advance(1000)
        await anyio.sleep(0.01)
    assert (len(first), len(second), len(page)) == (1, 0, 0)


@pytest.mark.anyio
async def test_cooldown_holds_a_step_back_then_lets_it_run(
    make: Callable[..., Recovery], clock: FakeClock, recorder: RecordingHook
) -> None:
    """A second incident inside the cooldown is a ``cooldown`` decision; after it, a run."""
    action = Calls()
    recovery = make()
    recovery.on("X", action, cooldown=300)
    async with recovery:
        await post(recovery, payload(alert("X", starts_at="t1")))
        await recovery.wait_idle()
        clock.advance(299)
        await post(recovery, payload(alert("X", starts_at="t2")))
        await recovery.wait_idle()
        clock.advance(1)
        await post(recovery, payload(alert("X", starts_at="t3")))
        await recovery.wait_idle()
    assert [a.starts_at for a in action.alerts] == ["t1", "t3"]
    assert [d for _, d, _ in decisions(recorder)] == ["ran", "cooldown", "ran"]
    held = decided(recorder, "cooldown")[0]
    assert "1.0s of cooldown left" in held.detail


@pytest.mark.anyio
async def test_budget_allows_n_runs_per_hour(
    make: Callable[..., Recovery], clock: FakeClock, recorder: RecordingHook
) -> None:
    """budget=2: the third run within an hour is ``budget_exhausted``; an hour later it runs."""
    action = Calls()
    recovery = make()
    recovery.on("X", action, budget=2)
    async with recovery:
        for i in range(3):
            await post(recovery, payload(alert("X", starts_at=f"t{i}")))
            await recovery.wait_idle()
            clock.advance(60)
        clock.advance(3600 - 180)
        await post(recovery, payload(alert("X", starts_at="t3")))
        await recovery.wait_idle()
    assert [a.starts_at for a in action.alerts] == ["t0", "t1", "t3"]
    assert [d for _, d, _ in decisions(recorder)] == ["ran", "ran", "budget_exhausted", "ran"]


@pytest.mark.anyio
async def test_dry_run_decides_and_records_but_runs_nothing(
    make: Callable[..., Recovery], tmp_path: Path, recorder: RecordingHook
) -> None:
    """Dry run: every decision is made and journaled, no action or revert runs."""
    action, revert = Calls(), Calls()
    journal = tmp_path / "journal.jsonl"
    recovery = make(dry_run=True, journal=journal)
    recovery.on("X", action, revert=revert, budget=1)
    async with recovery:
        await post(recovery, payload(alert("X")))
        await recovery.wait_idle()
        await post(recovery, payload(alert("X", starts_at="other")))
        await recovery.wait_idle()
        await post(recovery, payload(alert("X", status="resolved")))
        await recovery.wait_idle()
    recovery.close()
    assert len(action) == 0 and len(revert) == 0
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(r["decision"], r.get("detail")) for r in lines] == [
        ("dry_run", "would run"),
        ("budget_exhausted", "1 of 1 runs used in the last hour"),
        ("dry_run", "would revert"),
    ]
    assert all(r["dry_run"] for r in lines)


@pytest.mark.anyio
async def test_a_failing_or_hanging_action_is_a_failed_decision(
    make: Callable[..., Recovery], clock: FakeClock, recorder: RecordingHook
) -> None:
    """An action that raises, or outlives its timeout, is reported; nothing is reverted for it."""
    boom, revert = Calls(), Calls()
    boom.fail = RuntimeError("password=hunter2 refused")

    async def hang(alert: Alert) -> None:
        await anyio.sleep_forever()

    recovery = make()
    recovery.on("A", boom, revert=revert)
    recovery.on("B", Step(action=hang, timeout=0.05))
    async with recovery:
        await post(recovery, payload(alert("A"), alert("B", fingerprint="b")))
        await recovery.wait_idle()
        await post(recovery, payload(alert("A", status="resolved")))
        await recovery.wait_idle()
    failed = decided(recorder, "failed")
    assert {e.alertname for e in failed} == {"A", "B"}
    hung = next(e for e in failed if e.alertname == "B")
    assert hung.detail == "timed out after 0.05s"
    assert len(revert) == 0
    level, _, fields = next(e for e in failed if e.alertname == "A").log_fields()
    assert level == "warning" and "hunter2" not in fields["error"]


@pytest.mark.anyio
async def test_every_decision_is_a_metric_a_log_line_and_a_journal_line(
    clock: FakeClock, tmp_path: Path
) -> None:
    """Decisions reach Prometheus, structlog and the journal; the token appears in none."""
    registry = CollectorRegistry()
    logs = LogCapture()
    journal = tmp_path / "audit.jsonl"
    recovery = Recovery(
        token=TOKEN, name="ops", journal=journal, clock=clock,
        hooks=[PrometheusHook(registry), StructlogHook(logs)],
    )  # fmt: skip
    recovery.on("VeritasBreakerOpen", Calls())
    async with recovery:
        await post(recovery, payload(alert()))
        await recovery.wait_idle()
        await post(recovery, payload(alert()))
        await post(recovery, payload(alert()), headers={})
        await recovery.wait_idle()
    recovery.close()
    text = generate_latest(registry).decode()
    for line in (
        'veritas_recovery_decisions_total{alertname="VeritasBreakerOpen",decision="ran",'
        'name="ops"} 1.0',
        'veritas_recovery_decisions_total{alertname="VeritasBreakerOpen",decision="duplicate",'
        'name="ops"} 1.0',
        'veritas_recovery_notifications_total{name="ops",outcome="accepted"} 2.0',
        'veritas_recovery_notifications_total{name="ops",outcome="unauthorized"} 1.0',
        'veritas_recovery_incidents_active{name="ops"} 1.0',
    ):
        assert line in text
    messages = [(level, message, f.get("decision")) for level, message, f in logs.lines]
    assert ("info", "recovery_decision", "ran") in messages
    assert ("warning", "recovery_notification_rejected", None) in messages
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["decision"] for r in records] == ["ran", "duplicate"]
    first = records[0]
    assert first["alertname"] == "VeritasBreakerOpen"
    assert first["fingerprint"] == "1a30ba71cca2921f"
    assert first["labels"]["severity"] == "warning"
    assert first["action"] == "action" and first["step"] == 0
    everything = text + journal.read_text() + repr(logs.lines)
    assert TOKEN not in everything


# -- built-in actions ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_isolate_breaker_picks_the_breaker_named_by_the_alert_and_reset_reverts(
    make: Callable[..., Recovery],
) -> None:
    """isolate_breaker(registry): the alert's ``name`` label picks the breaker; resolve resets."""
    registry = CircuitBreakerRegistry(hooks=[])
    payments, inventory = registry.get("payments"), registry.get("inventory")
    recovery = make()
    recovery.on("VeritasHighErrorRate", isolate_breaker(registry))
    async with recovery:
        await post(recovery, payload(alert("VeritasHighErrorRate", name="payments")))
        await recovery.wait_idle()
        assert (payments.state, inventory.state) == (CircuitState.FORCED_OPEN, CircuitState.CLOSED)
        await post(recovery, payload(alert("VeritasHighErrorRate", status="resolved",
                                           name="payments")))  # fmt: skip
        await recovery.wait_idle()
    assert payments.state is CircuitState.CLOSED


@pytest.mark.anyio
async def test_reset_breaker_closes_a_breaker(make: Callable[..., Recovery]) -> None:
    """reset_breaker(breaker) closes it, whatever the alert's labels."""
    registry = CircuitBreakerRegistry(hooks=[])
    breaker = registry.get("db")
    breaker.isolate()
    recovery = make()
    recovery.on("VeritasBreakerOpen", reset_breaker(breaker))
    async with recovery:
        await post(recovery, payload(alert()))
        await recovery.wait_idle()
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.anyio
async def test_isolate_breaker_with_an_unknown_name_is_a_failed_decision(
    make: Callable[..., Recovery], recorder: RecordingHook
) -> None:
    """A label naming no breaker fails the step with a LookupError saying so."""
    recovery = make()
    recovery.on("VeritasBreakerOpen", isolate_breaker(CircuitBreakerRegistry(hooks=[])))
    async with recovery:
        await post(recovery, payload(alert(name="ghost")))
        await recovery.wait_idle()
    failed = decided(recorder, "failed")[0]
    assert isinstance(failed.error, LookupError) and "ghost" in str(failed.error)


@pytest.mark.anyio
async def test_serve_stale_answers_from_the_cache_without_calling_until_resolved(
    make: Callable[..., Recovery], clock: FakeClock
) -> None:
    """serve_stale(cache): stored values are served without calling; resolve calls again."""
    cache = StaleCache(name="catalog", max_staleness=600, clock=clock, hooks=[])
    calls: list[int] = []

    @cache
    async def get(key: int) -> str:
        calls.append(key)
        return f"value-{len(calls)}"

    assert await get(1) == "value-1"
    recovery = make()
    recovery.on("VeritasHighLatency", serve_stale(cache))
    async with recovery:
        await post(recovery, payload(alert("VeritasHighLatency")))
        await recovery.wait_idle()
        clock.advance(10)
        assert await get(1) == "value-1"  # stored, not called
        assert await get(2) == "value-2"  # nothing stored: called
        assert calls == [1, 2]
        assert cache.counts()["stale"] == 1
        await post(recovery, payload(alert("VeritasHighLatency", status="resolved")))
        await recovery.wait_idle()
    assert not cache.serving_stale
    assert await get(1) == "value-3"


# -- serving -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lifespan_runs_the_background_work(make: Callable[..., Recovery]) -> None:
    """Served with ASGI lifespan, the receiver runs actions in the task group it opened."""
    recovery = make()
    action = Calls()
    recovery.on("X", action)
    app = recovery.asgi()
    to_app_send, to_app_receive = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            await app({"type": "lifespan"}, to_app_receive.receive, from_app_send.send)

        tg.start_soon(serve)
        await to_app_send.send({"type": "lifespan.startup"})
        assert (await from_app_receive.receive())["type"] == "lifespan.startup.complete"
        assert recovery._tg is not None
        await post(recovery, payload(alert("X")))
        await recovery.wait_idle()
        await to_app_send.send({"type": "lifespan.shutdown"})
        assert (await from_app_receive.receive())["type"] == "lifespan.shutdown.complete"
    assert len(action) == 1 and recovery._tg is None


@pytest.mark.anyio
async def test_ops_app_routes_alerts_to_the_receiver_and_serves_metrics(
    make: Callable[..., Recovery],
) -> None:
    """Without a health app, ``/metrics`` is the process's exposition; ``/alerts`` the receiver."""
    recovery = make()
    action = Calls()
    recovery.on("X", action)
    transport = httpx.ASGITransport(app=ops_app(recovery=recovery))
    async with recovery, httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "python_info" in metrics.text
        response = await client.post("/alerts", json=payload(alert("X")), headers=AUTH)
        assert response.status_code == 200
        await recovery.wait_idle()
        assert (await client.get("/nope")).status_code == 404
    assert len(action) == 1
    with pytest.raises(ValueError, match="recovery"):
        ops_app()


def test_parse_notification_keeps_what_actions_need() -> None:
    """The documented v4 example parses into alerts with labels, annotations and the source."""
    body = payload(alert(name="db"), truncatedAlerts=2)
    notification = parse_notification(json.dumps(body).encode())
    assert notification.truncated_alerts == 2
    assert notification.receiver == "recovery"
    (parsed,) = notification.alerts
    assert parsed.alertname == "VeritasBreakerOpen"
    assert parsed.labels["name"] == "db"
    assert parsed.annotations == {"summary": "something"}
    assert parsed.external_url == "http://am1:9093"
    assert parsed.starts_at == "2026-01-01T10:00:00.123456789Z"


@pytest.mark.anyio
async def test_memory_is_bounded_and_forgotten_incidents_stay_duplicates(
    make: Callable[..., Recovery], clock: FakeClock, recorder: RecordingHook
) -> None:
    """Beyond max_incidents the oldest incident is forgotten, yet a late copy of it starts
    nothing; after the retention an incident that never resolved is forgotten too."""
    action = Calls()
    recovery = make(max_incidents=2, retention=3600)
    recovery.on("X", action)
    async with recovery:
        for fingerprint in ("a", "b", "c"):
            await post(recovery, payload(alert("X", fingerprint=fingerprint)))
            await recovery.wait_idle()
        assert len(recovery._incidents) == 2
        await post(recovery, payload(alert("X", fingerprint="a")))  # forgotten, still known
        await recovery.wait_idle()
        assert len(action) == 3
        clock.advance(3601)
        await post(recovery, payload(alert("X", fingerprint="d")))
        await recovery.wait_idle()
    assert len(recovery._incidents) == 1
    assert len(recovery._resolved_at) <= 2
    assert [d for _, d, _ in decisions(recorder)] == ["ran", "ran", "ran", "duplicate", "ran"]


@pytest.mark.anyio
async def test_mounted_without_lifespan_actions_still_run(make: Callable[..., Recovery]) -> None:
    """Outside ``async with`` and without ASGI lifespan, actions run in tasks of the loop."""
    recovery = make()
    action = Calls()
    recovery.on("X", action)
    assert (await post(recovery, payload(alert("X")))).status_code == 200
    with anyio.fail_after(5):
        await recovery.wait_idle()
    assert len(action) == 1


@pytest.mark.anyio
async def test_serve_stale_counts_fresh_within_fresh_for_and_stale_beyond(
    clock: FakeClock,
) -> None:
    """While serving stale, a value within ``fresh_for`` counts as fresh, an older one as stale,
    one past ``max_staleness`` calls the source; a failing call still falls back as before."""
    cache = StaleCache(name="prices", max_staleness=60, fresh_for=5, clock=clock, hooks=[])
    calls: list[int] = []
    fail = False

    @cache
    async def get(key: int) -> int:
        calls.append(key)
        if fail:
            raise ConnectionError("down")
        return len(calls)

    await get(1)
    cache.serve_stale()
    assert cache.serving_stale
    clock.advance(3)
    assert await get(1) == 1
    clock.advance(30)
    assert await get(1) == 1
    assert (cache.counts()["fresh"], cache.counts()["stale"], calls) == (1, 1, [1])
    clock.advance(60)  # past max_staleness: the source is called
    assert await get(1) == 2
    fail = True
    cache.serve_stale(False)
    clock.advance(10)  # past fresh_for: the source is called again, and fails
    assert await get(1) == 2  # the call fails: the stored value is served after the error
    assert calls == [1, 1, 1]


@pytest.mark.anyio
async def test_a_stalled_body_gets_408_and_holds_nothing(make: Callable[..., Recovery]) -> None:
    """A client that stops sending its body is answered 408 after read_timeout."""
    recovery = make(read_timeout=0.1)
    app = recovery.asgi()
    sent: list[MutableMapping[str, Any]] = []
    first = True

    async def receive() -> MutableMapping[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"version": "4", ', "more_body": True}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/alerts",
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}  # fmt: skip
    with anyio.fail_after(5):
        await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert recovery._n_notifications["timeout"] == 1
