"""The health registry and its ASGI app, in process: model, wire format, isolation, caching,
probe doctrine, shutdown, metrics and events (asyncio and trio)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from _health_support import validate
from _log_capture import LogCapture
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from veritas_resilience import CircuitBreaker, CircuitBreakerRegistry, PrometheusHook, StructlogHook
from veritas_resilience.health import (
    CheckResult,
    HealthCheckChanged,
    HealthProbeChanged,
    HealthRegistry,
    HealthShutdownDrained,
    LoopLagMonitor,
    Observation,
    Status,
    checks,
    to_dict,
)
from veritas_resilience.testing import FakeClock, RecordingHook

pytestmark = pytest.mark.anyio

TOKEN = "tok-3b1f9e"
DSN_PASSWORD = "pg-Secret-41d8"
REDIS_PASSWORD = "redis-Secret-77aa"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://health")


def registry(**kwargs: Any) -> HealthRegistry:
    kwargs.setdefault("hooks", [])
    kwargs.setdefault("service", "orders")
    kwargs.setdefault("version", "1.4.2")
    return HealthRegistry(**kwargs)


def returning(value: Any) -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        return value

    return check


# -- model -----------------------------------------------------------------------------------------


def test_status_words_and_aliases() -> None:
    """Statuses read the draft's aliases case-insensitively and reject other words."""
    assert Status.parse("OK") is Status.PASS
    assert Status.parse("up") is Status.PASS
    assert Status.parse("Down") is Status.FAIL
    assert Status.parse("error") is Status.FAIL
    assert Status.parse("warn") is Status.WARN
    assert [s.http_status for s in Status] == [200, 200, 503]
    with pytest.raises(ValueError, match="status"):
        Status.parse("green")


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "pass"),
        ([("pass", True), ("pass", False)], "pass"),
        ([("warn", False), ("pass", True)], "warn"),
        ([("warn", True)], "warn"),
        ([("fail", False)], "warn"),
        ([("fail", False), ("warn", True)], "warn"),
        ([("fail", True)], "fail"),
        ([("fail", True), ("fail", False), ("pass", True)], "fail"),
        ([("pass", True), ("fail", False), ("warn", False)], "warn"),
    ],
)
async def test_the_worst_status_wins_but_a_non_critical_failure_only_warns(
    statuses: list[tuple[str, bool]], expected: str
) -> None:
    """Aggregation: worst status, except that a non-critical fail counts as warn."""
    health = registry()
    for i, (status, critical) in enumerate(statuses):
        health.add(f"c{i}", returning(status), critical=critical)
    report = await health.run("readiness")
    assert report.status.value == expected
    assert report.http_status == (503 if expected == "fail" else 200)


async def test_what_a_check_may_return() -> None:
    """Results, statuses, words, bools, numbers and None are read; another type fails the check."""
    health = registry()
    health.add("result", returning(CheckResult(status=Status.WARN, output="slow")))
    health.add("status", returning(Status.FAIL))
    health.add("word", returning("down"))
    health.add("true", returning(True))
    health.add("false", returning(False))
    health.add("number", returning(42))
    health.add("none", returning(None))
    health.add("sync", lambda: "warn")
    health.add("odd", returning(object()))
    report = await health.run()
    got = {name: r.status.value for name, r in report.checks.items() if name != "event_loop"}
    assert got == {
        "result": "warn",
        "status": "fail",
        "word": "fail",
        "true": "pass",
        "false": "fail",
        "number": "pass",
        "none": "pass",
        "sync": "warn",
        "odd": "fail",
    }
    assert report.checks["number"].observed_value == 42
    assert "TypeError" in (report.checks["odd"].output or "")


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda h: h.add("", returning(None)), "name"),
        (lambda h: h.add("a:b", returning(None)), "name"),
        (lambda h: h.add("event_loop", returning(None)), "already registered"),
        (lambda h: h.add("readiness", returning(None)), "reserved"),
        (lambda h: h.add("x", "not callable"), "check"),
        (lambda h: h.add("x", returning(None), timeout=0), "timeout"),
        (lambda h: h.add("x", returning(None), timeout=-1.0), "timeout"),
        (lambda h: h.add("x", returning(None), pass_ttl=-1), "pass_ttl"),
        (lambda h: h.add("x", returning(None), fail_ttl=float("nan")), "fail_ttl"),
        (lambda h: h.add("x", returning(None), groups=("Bad Group",)), "groups"),
        (lambda h: h.add("x", returning(None), groups=("liveness",)), "groups"),
        (lambda h: checks.disk("/", warn=0.9, fail=0.8), "warn"),
        (lambda h: checks.disk("/", warn=0.0, fail=0.8), "warn"),
        (lambda h: checks.disk("/", warn=0.5, fail=1.5), "fail"),
        (lambda h: checks.memory(warn=0.99, fail=0.9), "warn"),
        (lambda h: checks.memory(rss_limit=0), "rss_limit"),
        (lambda h: checks.event_loop_lag(warn=5, fail=1), "warn"),
        (lambda h: checks.postgres(object()), "client"),  # type: ignore[arg-type]
        (lambda h: checks.redis(object()), "client"),  # type: ignore[arg-type]
        (lambda h: checks.breakers(42), "source"),  # type: ignore[arg-type]
        (lambda h: h.asgi(details="sometimes"), "details"),
        (lambda h: h.asgi(token=""), "token"),
        (lambda h: HealthRegistry(service=""), "service"),
        (lambda h: HealthRegistry(loop_lag_warn=6, loop_lag_fail=5), "warn"),
        (lambda h: HealthRegistry(drain_timeout=-1), "drain_timeout"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(
    call: Callable[[HealthRegistry], object], parameter: str
) -> None:
    """Bad settings fail at construction with a ValueError naming the parameter."""
    with pytest.raises(ValueError, match=parameter):
        call(registry())


def test_liveness_takes_process_checks_only_unless_told() -> None:
    """A dependency check in liveness is refused unless allow_in_liveness=True; process checks
    (memory, loop lag) are accepted."""
    health = registry()
    with pytest.raises(ValueError, match="allow_in_liveness"):
        health.add("db", returning(True), groups=("liveness", "readiness"))
    health.add("db", returning(True), groups=("liveness",), allow_in_liveness=True)
    health.add("memory", checks.memory(), groups=("liveness",))
    assert "db" in health and "memory" in health


async def test_a_check_without_groups_serves_health_and_ready_never_live() -> None:
    """The default group is readiness: /health and /ready run the check, /live does not."""
    health = registry()
    health.add("db", returning("fail"), critical=True)
    assert "db" in (await health.run()).checks
    assert "db" in (await health.run("readiness")).checks
    live = await health.run("liveness")
    assert "db" not in live.checks and live.status is Status.PASS


# -- isolation -------------------------------------------------------------------------------------


async def test_a_hung_check_fails_with_its_timeout_and_the_probe_still_answers() -> None:
    """A check that never returns gives fail "timed out after 0.3 s" and the probe answers
    within its timeout (plus a generous margin), while the other checks are unaffected."""
    health = registry()

    async def hang() -> None:
        await anyio.sleep_forever()

    health.add("hung", hang, critical=True, timeout=0.3)
    health.add("ok", returning(True), critical=True)
    async with client(health.asgi(details="always")) as http:
        started = time.monotonic()
        response = await http.get("/ready")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["hung"][0]["output"] == "timed out after 0.3 s"
    assert body["checks"]["ok"][0]["status"] == "pass"
    assert elapsed < 0.3 + 0.5


async def test_checks_run_concurrently() -> None:
    """Ten checks of 0.2 s each take about 0.2 s together, not 2 s."""
    health = registry()
    for i in range(10):

        async def slow() -> None:
            await anyio.sleep(0.2)

        health.add(f"slow{i}", slow)
    started = time.monotonic()
    report = await health.run()
    assert report.status is Status.PASS
    assert time.monotonic() - started < 1.0


async def test_a_raising_check_fails_with_its_text_never_http_500() -> None:
    """An exception in a check is a fail with the error's type and text, and a 503, not a 500."""
    health = registry()

    async def boom() -> None:
        raise ConnectionRefusedError("connection refused by db1:5432")

    health.add("db", boom, critical=True)
    async with client(health.asgi(details="always")) as http:
        response = await http.get("/health")
    assert response.status_code == 503
    [item] = response.json()["checks"]["db"]
    assert item["output"] == "ConnectionRefusedError: connection refused by db1:5432"


async def test_pass_and_fail_results_are_cached_for_their_own_lifetimes(clock: FakeClock) -> None:
    """A pass is reused for pass_ttl, a fail for fail_ttl, and the reading keeps its time."""
    health = registry(clock=clock)
    calls = 0
    answers = iter(["pass", "pass", "fail", "fail", "pass"])

    async def check() -> str:
        nonlocal calls
        calls += 1
        return next(answers)

    health.add("db", check, pass_ttl=10.0, fail_ttl=2.0)
    first = await health.run("readiness")
    clock.advance(9.9)
    again = await health.run("readiness")
    assert calls == 1 and again.checks["db"] is first.checks["db"]
    clock.advance(0.1)
    await health.run("readiness")
    assert calls == 2
    clock.advance(10.0)
    failed = await health.run("readiness")
    assert calls == 3 and failed.status is Status.WARN
    clock.advance(1.9)
    await health.run("readiness")
    assert calls == 3
    clock.advance(0.1)
    await health.run("readiness")
    assert calls == 4


async def test_concurrent_probes_share_one_run_of_each_check() -> None:
    """1,000 concurrent probes run each check once (single flight), and all see its result."""
    health = registry()
    calls = {"a": 0, "b": 0}
    gate = anyio.Event()

    def make(name: str) -> Callable[[], Awaitable[str]]:
        async def check() -> str:
            calls[name] += 1
            await gate.wait()
            return "warn"

        return check

    health.add("a", make("a"), pass_ttl=0, fail_ttl=0)
    health.add("b", make("b"), pass_ttl=0, fail_ttl=0)
    statuses: list[Status] = []

    async def probe() -> None:
        statuses.append((await health.run("readiness")).status)

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(probe)
        await anyio.sleep(0.05)
        gate.set()
    assert calls == {"a": 1, "b": 1}
    assert statuses == [Status.WARN] * 1000


async def test_a_cancelled_probe_does_not_leave_the_check_stuck() -> None:
    """When the probe running a check is cancelled, the next probe runs it again."""
    health = registry()
    calls = 0
    gate = anyio.Event()

    async def check() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        return "pass"

    health.add("db", check)
    with anyio.move_on_after(0.05):
        await health.run("readiness")
    report = await health.run("readiness")
    assert calls == 2 and report.status is Status.PASS


# -- wire format and the app -----------------------------------------------------------------------


async def test_every_endpoint_serves_health_json_that_fits_the_draft() -> None:
    """Each probe's body (with and without details) validates against the draft's schema; the
    content type is application/health+json and output is left out on pass."""
    health = registry(description="order service")
    result = CheckResult(
        status=Status.PASS,
        observed_value=3,
        observed_unit="ms",
        measurement="responseTime",
        output="ignored",
    )
    health.add("db", returning(result))
    health.add("cache", returning("warn"))
    health.add("jobs", returning("pass"), groups=("batch",))
    health.add("warmup", returning("pass"), groups=("startup",))
    app = health.asgi(token=TOKEN)
    async with client(app) as http:
        for path in ("/health", "/ready", "/live", "/startup", "/health/batch"):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                response = await http.get(path, headers=headers)
                assert response.headers["content-type"] == "application/health+json"
                validate(response.json())
    detailed = (await http_get(app, "/ready", {"Authorization": f"Bearer {TOKEN}"})).json()
    assert detailed["serviceId"] == "orders" and detailed["version"] == "1.4.2"
    assert detailed["checks"]["db:responseTime"] == [
        {
            "status": "pass",
            "observedValue": 3,
            "observedUnit": "ms",
            "time": detailed["checks"]["db:responseTime"][0]["time"],
        }
    ]
    assert detailed["checks"]["cache"][0]["status"] == "warn"


async def http_get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with client(app) as http:
        return await http.get(path, headers=headers or {})


async def test_details_follow_never_always_and_authorized() -> None:
    """Without the bearer token (or with a wrong one) a body holds statuses only; "always"
    shows details to all, "never" to none."""
    health = registry()
    health.add("db", returning(CheckResult(status=Status.WARN, output="lagging", observed_value=7)))
    authorized = health.asgi(token=TOKEN)
    minimal = {"status": "warn"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        body = (await http_get(authorized, "/ready", headers)).json()
        assert body == {**minimal, "checks": {"db": [{"status": "warn"}]}}
    body = (await http_get(authorized, "/ready", {"Authorization": f"bearer {TOKEN}"})).json()
    assert body["checks"]["db"][0]["output"] == "lagging"
    assert (await http_get(health.asgi(details="always"), "/ready")).json()["checks"]["db"][0][
        "observedValue"
    ] == 7
    never = health.asgi(details="never", token=TOKEN)
    body = (await http_get(never, "/ready", {"Authorization": f"Bearer {TOKEN}"})).json()
    assert body["checks"]["db"] == [{"status": "warn"}]
    assert (await http_get(health.asgi(), "/ready", {"Authorization": f"Bearer {TOKEN}"})).json()[
        "checks"
    ]["db"] == [{"status": "warn"}]


async def test_head_cache_control_and_status_codes() -> None:
    """HEAD answers like GET without a body; every answer says no-store; other methods get 405,
    unknown paths 404; fail is 503, warn 200."""
    health = registry()
    health.add("db", returning("fail"), critical=True)
    health.add("cache", returning("fail"), groups=("cache",))
    app = health.asgi()
    async with client(app) as http:
        head = await http.head("/ready")
        get = await http.get("/ready")
        assert head.status_code == get.status_code == 503
        assert head.content == b""
        assert head.headers["content-length"] == str(len(get.content))
        assert get.headers["cache-control"] == "no-store"
        assert (await http.get("/health/cache")).status_code == 200  # non-critical: warn
        assert (await http.get("/live")).status_code == 200
        post = await http.post("/ready")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
        assert (await http.get("/nope")).status_code == 404
        assert (await http.get("/health/nope")).status_code == 404
        assert (await http.get("/ready/")).status_code == 503


async def test_metrics_serve_prometheus_openmetrics_and_gzip() -> None:
    """/metrics serves the registry's one-hot status and duration histogram, in OpenMetrics when
    the scraper asks for it and gzipped when it accepts gzip."""
    prom = CollectorRegistry()
    health = registry(hooks=[PrometheusHook(prom)])
    health.add("db", returning("warn"))
    await health.run()
    app = health.asgi(metrics_registry=prom)
    async with client(app) as http:
        text = await http.get("/metrics", headers={"Accept-Encoding": "identity"})
        om = await http.get(
            "/metrics",
            headers={
                "Accept": "application/openmetrics-text; version=1.0.0",
                "Accept-Encoding": "identity",
            },
        )
        zipped = await http.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert text.headers["content-type"].startswith("text/plain")
    assert text.headers["cache-control"] == "no-store"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.text)
        for s in f.samples
    }
    status = "veritas_health_status"
    for word, value in (("pass", 0.0), ("warn", 1.0), ("fail", 0.0)):
        key = (status, (("check", "db"), ("name", "orders"), ("status", word)))
        assert samples[key] == value
    count = ("veritas_health_check_duration_seconds_count", (("check", "db"), ("name", "orders")))
    assert samples[count] == 1.0
    assert samples[("veritas_health_ready", (("name", "orders"),))] == 1.0
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    assert zipped.headers["content-encoding"] == "gzip"
    # httpx decodes the body: it arrived smaller than it is.
    assert b"veritas_health_status" in zipped.content
    assert zipped.num_bytes_downloaded < len(zipped.content)


async def test_status_changes_are_events_and_log_lines() -> None:
    """A check's status change (and only a change) is an event; the structlog hook logs it."""
    recorder = RecordingHook()
    log = LogCapture()
    health = registry(hooks=[recorder, StructlogHook(log)])
    answers = iter(["pass", "pass", "fail", "fail", "pass"])
    health.add("db", lambda: next(answers), critical=True, pass_ttl=0, fail_ttl=0)
    for _ in range(5):
        await health.run("readiness")
    changes = [(e.from_status, e.to_status) for e in recorder.of(HealthCheckChanged)]
    assert changes == [
        (None, Status.PASS),
        (Status.PASS, Status.FAIL),
        (Status.FAIL, Status.PASS),
    ]
    lines = [(level, fields["to_status"]) for level, msg, fields in log.lines
             if msg == "health_check_changed" and fields["check"] == "db"]  # fmt: skip
    assert lines == [("info", "pass"), ("error", "fail"), ("info", "pass")]


# -- probe doctrine --------------------------------------------------------------------------------


async def test_readiness_state_startup_and_liveness() -> None:
    """set_ready(False) fails /ready (not /live); /startup is 503 until mark_started()."""
    recorder = RecordingHook()
    health = registry(hooks=[recorder])
    app = health.asgi(details="always")
    async with client(app) as http:
        assert (await http.get("/ready")).status_code == 200
        health.set_ready(False)
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["readiness:state"][0]["output"] == "not ready"
        assert (await http.get("/live")).status_code == 200
        health.set_ready(True)
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/startup")).status_code == 503
        health.mark_started()
        assert (await http.get("/startup")).status_code == 200
    assert [(e.probe, e.ok) for e in recorder.of(HealthProbeChanged)] == [
        ("readiness", False),
        ("readiness", True),
        ("startup", True),
    ]


async def test_loop_lag_monitor_measures_lateness(clock: FakeClock) -> None:
    """The heartbeat reports how late it wakes, and a stalled heartbeat's lag keeps growing."""
    monitor = LoopLagMonitor(interval=1.0, clock=clock)
    check = checks.event_loop_lag(monitor, warn=2.0, fail=5.0)
    assert monitor.lag() is None
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        assert monitor.running
        assert (await check()).status is Status.PASS
        clock.advance(3.5)  # no tick ran: the beat is 2.5 s overdue
        result = await check()
        assert result.status is Status.WARN and result.observed_value == pytest.approx(2.5)
        clock.advance(3.0)
        assert (await check()).status is Status.FAIL
        tg.cancel_scope.cancel()
    assert not monitor.running


async def test_live_fails_when_the_loop_lags() -> None:
    """/live answers 503 when the event loop is later than loop_lag_fail."""
    clock = FakeClock(0.0)
    health = registry(clock=clock, loop_lag_warn=0.5, loop_lag_fail=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(health.monitor.run)
        assert (await http_get(health.asgi(), "/live")).status_code == 200
        clock.advance(health.monitor.interval + 2.0)
        assert (await http_get(health.asgi(), "/live")).status_code == 503
        tg.cancel_scope.cancel()


async def test_the_loop_check_passes_for_one_heartbeat_and_an_unchanged_body_is_reused() -> None:
    """A passing event-loop reading is reused for one heartbeat, so probes in between get the
    very same body; after a heartbeat it is read again, and a lagging loop is never cached."""
    clock = FakeClock(0.0)
    health = registry(clock=clock, loop_lag_warn=0.5, loop_lag_fail=1.0)
    health.add("db", returning("pass"), pass_ttl=60.0)
    app = health.asgi(details="always")
    sent: list[bytes] = []

    async def probe() -> bytes:
        scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message["body"])

        await app(scope, receive, send)
        return sent[-1]

    async with anyio.create_task_group() as tg:
        await tg.start(health.monitor.run)
        first = await probe()
        assert await probe() is first
        clock.advance(health.monitor.interval)
        await anyio.lowlevel.checkpoint()  # the heartbeat ticks
        refreshed = await probe()
        assert refreshed is not first
        assert json.loads(refreshed)["checks"]["event_loop:lag"][0]["status"] == "pass"
        clock.advance(health.monitor.interval + 2.0)  # the heartbeat cannot run: overdue
        lagging = await probe()
        assert json.loads(lagging)["status"] == "fail"
        assert await probe() is not lagging  # a fail is read again at every probe
        tg.cancel_scope.cancel()


async def test_shutdown_fails_readiness_first_then_drains_in_flight_requests() -> None:
    """During shutdown /ready answers 503 at once while a request of the wrapped app still
    runs; shutdown returns once that request has finished."""
    recorder = RecordingHook()
    health = registry(hooks=[recorder])
    release = anyio.Event()
    entered = anyio.Event()

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    app = health.asgi(inner)
    order: list[str] = []
    async with client(app) as http, anyio.create_task_group() as tg:

        async def slow_request() -> None:
            response = await http.get("/orders")
            order.append(f"request {response.text}")

        async def shut_down() -> None:
            drained = await health.shutdown()
            order.append(f"drained {drained}")

        tg.start_soon(slow_request)
        await entered.wait()
        assert health.in_flight == 1
        tg.start_soon(shut_down)
        await anyio.sleep(0.05)
        assert (await http.get("/ready")).status_code == 503
        assert (await http.get("/live")).status_code == 200
        assert order == []
        release.set()
    assert order == ["request done", "drained True"]
    assert [e.drained for e in recorder.of(HealthShutdownDrained)] == [True]


async def test_drain_gives_up_after_its_timeout() -> None:
    """A request that never ends does not hold shutdown past drain_timeout."""
    recorder = RecordingHook()
    health = registry(hooks=[recorder], drain_timeout=0.1)
    health._request_started()
    assert await health.shutdown() is False
    [event] = recorder.of(HealthShutdownDrained)
    assert event.remaining == 1 and not event.drained


async def test_lifespan_shutdown_fails_readiness_before_the_wrapped_app_hears_of_it() -> None:
    """On ASGI lifespan shutdown the wrapped app gets the message only after readiness failed;
    the lag monitor runs between startup and shutdown."""
    health = registry()
    seen: list[tuple[str, bool]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append((message["type"], health.ready))
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    send_in, receive_in = anyio.create_memory_object_stream[dict[str, Any]](10)
    send_out, receive_out = anyio.create_memory_object_stream[dict[str, Any]](10)
    app = health.asgi(inner)
    async with anyio.create_task_group() as tg:
        scope = {"type": "lifespan"}
        tg.start_soon(app, scope, receive_in.receive, send_out.send)  # type: ignore[arg-type]
        await send_in.send({"type": "lifespan.startup"})
        assert (await receive_out.receive())["type"] == "lifespan.startup.complete"
        assert health.monitor.running
        await send_in.send({"type": "lifespan.shutdown"})
        assert (await receive_out.receive())["type"] == "lifespan.shutdown.complete"
    assert seen == [("lifespan.startup", True), ("lifespan.shutdown", False)]
    assert not health.monitor.running


async def test_lifespan_context_runs_the_monitor_and_shuts_down() -> None:
    """health.lifespan() (a framework's lifespan) runs the monitor and fails readiness on exit."""
    health = registry()
    async with health.lifespan():
        assert health.monitor.running and health.ready
    after = (health.shutting_down, health.ready, health.monitor.running)
    assert after == (True, False, False)


# -- built-in checks -------------------------------------------------------------------------------


async def test_breakers_open_warns_and_critical_open_fails(clock: FakeClock) -> None:
    """An open breaker warns, a critical one fails, a half-open one warns; closed pass."""
    breakers = CircuitBreakerRegistry(failure_threshold=1, reset_timeout=10, clock=clock, hooks=[])
    check = checks.breakers(breakers, critical={"payments"})
    breakers.get("payments")
    breakers.get("search")
    assert (await check()).status is Status.PASS
    breakers.get("search").isolate()
    result = await check()
    assert result.status is Status.WARN and result.output == "search is forced_open"
    breakers.get("payments").isolate()
    result = await check()
    assert result.status is Status.FAIL
    assert {o.component_id: o.status for o in result.observations} == {
        "payments": Status.FAIL,
        "search": Status.WARN,
    }
    lone = CircuitBreaker(name="lone", failure_threshold=1, reset_timeout=1, clock=clock, hooks=[])
    with pytest.raises(ZeroDivisionError):
        await lone.call(_divide)
    assert (await checks.breakers([lone])()).status is Status.WARN
    clock.advance(1.0)
    assert lone.state.value == "half_open"
    assert (await checks.breakers([lone], critical=lambda n: True)()).status is Status.WARN


async def _divide() -> float:
    return 1 / 0


async def test_disk_and_memory_grade_against_their_thresholds() -> None:
    """Disk and memory read psutil and grade used ratios against warn and fail."""
    assert (await checks.disk("/", warn=0.999, fail=1.0)()).status is Status.PASS
    warned = await checks.disk("/", warn=0.0001, fail=1.0)()
    assert warned.status is Status.WARN and warned.observed_unit == "percent"
    assert (await checks.disk("/", warn=0.0001, fail=0.0001)()).status is Status.FAIL
    relaxed = await checks.memory(warn=0.999, fail=1.0)()
    assert relaxed.status is Status.PASS
    rss = {o.measurement: o for o in relaxed.observations}["rss"]
    assert isinstance(rss.observed_value, int) and rss.observed_value > 0
    tight = await checks.memory(warn=0.5, fail=0.9, rss_limit=1)()
    assert tight.status is Status.FAIL and "resident set" in (tight.output or "")


async def test_a_disk_check_of_a_missing_path_fails_with_the_reason() -> None:
    """A disk check of a path that does not exist is a fail, not an error."""
    health = registry()
    health.add("disk", checks.disk("/no/such/path"))
    assert (await health.run()).checks["disk"].status is Status.FAIL


# -- secrets ---------------------------------------------------------------------------------------


async def test_no_password_or_token_ever_appears_in_any_output() -> None:
    """Errors that carry a DSN password or a Redis password are redacted in bodies, events,
    logs and metrics; the token is in no body, header or repr."""
    recorder = RecordingHook()
    log = LogCapture()
    prom = CollectorRegistry()
    health = registry(hooks=[recorder, StructlogHook(log), PrometheusHook(prom)])

    async def db() -> None:
        raise OSError(f"cannot connect to postgresql://app:{DSN_PASSWORD}@db1:5432/orders")

    async def cache() -> CheckResult:
        return CheckResult(
            status=Status.FAIL,
            observations=(
                Observation(
                    status=Status.FAIL, output=f"AUTH failed: requirepass {REDIS_PASSWORD}"
                ),
            ),
            output=f"redis://:{REDIS_PASSWORD}@cache:6379/0 refused",
        )

    health.add("db", db, critical=True)
    health.add("cache", cache)
    app = health.asgi(token=TOKEN, metrics_registry=prom)
    seen = [repr(app), repr(health)]
    async with client(app) as http:
        for path in ("/health", "/ready", "/live", "/startup", "/metrics"):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                response = await http.get(path, headers=headers)
                seen.append(response.text)
                seen.extend(f"{k}: {v}" for k, v in response.headers.items())
    seen.extend(repr(e) for e in recorder.events)
    seen.extend(repr(line) for line in log.lines)
    seen.append(json.dumps(to_dict(await health.run(), details=True)))
    everything = "\n".join(seen)
    assert "app:***@db1" in everything
    for secret in (DSN_PASSWORD, REDIS_PASSWORD, TOKEN):
        assert secret not in everything


async def test_concurrent_shutdowns_both_return_when_the_last_request_ends() -> None:
    """Two shutdown() calls waiting together both see the drain end, not their timeout."""
    health = registry(drain_timeout=5)
    health._request_started()
    drained: list[bool] = []

    async def shut_down() -> None:
        drained.append(await health.shutdown())

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shut_down)
        tg.start_soon(shut_down)
        await anyio.sleep(0.05)
        health._request_finished()
    assert drained == [True, True]
    assert time.monotonic() - started < 4
