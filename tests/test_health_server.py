"""The health app over real HTTP: uvicorn and hypercorn, mounted in Starlette and FastAPI, a
thousand concurrent probes, and SIGTERM turning readiness to fail before the server stops."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _health_support import uvicorn_server, validate
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from veritas_resilience.health import HealthRegistry, checks
from veritas_resilience.testing import free_port

pytestmark = pytest.mark.anyio

PATHS = ("/health", "/ready", "/live", "/startup")


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn runs on asyncio (the hypercorn test chooses its own backends)."""
    return "asyncio"


def registry(**kwargs: Any) -> HealthRegistry:
    kwargs.setdefault("hooks", [])
    return HealthRegistry(service="orders", version="1.4.2", **kwargs)


async def test_uvicorn_serves_hung_and_raising_checks_without_an_error() -> None:
    """Over real HTTP, a hung critical check makes /ready 503 with its timeout as output, a
    raising non-critical one makes /health warn, /live stays 200, and every body fits the
    draft's schema."""
    health = registry()

    async def hang() -> None:
        await asyncio.Event().wait()

    async def boom() -> None:
        raise RuntimeError("cache exploded")

    health.add("db", hang, critical=True, timeout=0.3)
    health.add("cache", boom, groups=("readiness", "cache"))
    health.add("disk", checks.disk("/"))
    async with (
        uvicorn_server(health.asgi(details="always")) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for path in (*PATHS, "/health/cache"):
            response = await http.get(path)
            assert response.headers["content-type"] == "application/health+json"
            assert response.headers["cache-control"] == "no-store"
            validate(response.json())
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["db"][0]["output"] == "timed out after 0.3 s"
        cache = await http.get("/health/cache")
        assert cache.status_code == 200 and cache.json()["status"] == "warn"
        assert cache.json()["checks"]["cache"][0]["output"] == "RuntimeError: cache exploded"
        assert (await http.get("/live")).status_code == 200
        head = await http.head("/ready")
        assert head.status_code == 503 and head.content == b""
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "# TYPE" in metrics.text


async def test_a_thousand_concurrent_http_probes_run_each_check_once() -> None:
    """1,000 probes in flight at once over real connections share one run of each check.

    The probes are plain HTTP/1.1 requests on their own sockets: one httpx client with a
    thousand connections spends more CPU in its pool than the server does in answering.
    """
    health = registry()
    runs = {"db": 0, "cache": 0}
    arrived = 0
    all_in = asyncio.Event()

    def counting(name: str) -> Any:
        async def check() -> str:
            runs[name] += 1
            await all_in.wait()
            return "pass"

        return check

    health.add("db", counting("db"), critical=True, pass_ttl=0, fail_ttl=0, timeout=60)
    health.add("cache", counting("cache"), pass_ttl=0, fail_ttl=0, timeout=60)
    probes = health.asgi()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal arrived
        if scope["type"] == "http":
            arrived += 1
        await probes(scope, receive, send)

    async def release() -> None:
        # Let the checks finish only once every probe is in and both checks are running.
        while arrived < 1000 or 0 in runs.values():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        all_in.set()

    async with uvicorn_server(app, backlog=2048) as url:
        port = int(url.rsplit(":", 1)[1])
        releaser = asyncio.create_task(release())
        codes = await asyncio.gather(*(raw_get(port, "/ready") for _ in range(1000)))
        await releaser
    assert codes == [200] * 1000
    assert runs == {"db": 1, "cache": 1}


async def raw_get(port: int, path: str) -> int:
    """One HTTP/1.1 GET on a new connection; the response's status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        response = await reader.read()
    finally:
        writer.close()
    return int(response.split(b" ", 2)[1])


async def test_mounted_in_starlette_and_fastapi() -> None:
    """The app answers its paths mounted at the root of a Starlette app (after its routes) and
    at a prefix of a FastAPI app, whose lifespan runs health.lifespan."""
    health = registry()
    health.add("db", lambda: "pass", critical=True)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    starlette = Starlette(routes=[Route("/hello", hello), Mount("/", app=health.asgi())])
    async with uvicorn_server(starlette) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/hello")).text == "hello"
        for path in (*PATHS, "/metrics"):
            response = await http.get(path)
            assert response.status_code in (200, 503)
            if path != "/metrics":
                validate(response.json())
        assert (await http.get("/ready")).status_code == 200

    other = registry()
    fastapi = FastAPI(lifespan=other.lifespan)

    @fastapi.get("/orders")
    async def orders() -> dict[str, int]:
        return {"orders": 3}

    fastapi.mount("/ops", other.asgi(details="always"))
    async with uvicorn_server(fastapi) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/orders")).json() == {"orders": 3}
        assert other.monitor.running
        ready = await http.get("/ops/ready")
        assert ready.status_code == 200
        validate(ready.json())
        assert (await http.get("/ops/startup")).status_code == 503
        other.mark_started()
        assert (await http.get("/ops/startup")).status_code == 200
        assert (await http.get("/ops/metrics")).status_code == 200
        assert (await http.get("/ready")).status_code == 404
    assert other.shutting_down and not other.monitor.running


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_hypercorn_serves_it_on_asyncio_and_trio(backend: str) -> None:
    """hypercorn serves the app on asyncio and on trio (the app depends on no event loop)."""
    from hypercorn.config import Config

    health = registry()
    health.add("disk", checks.disk("/"))
    health.add("fails", lambda: "fail", critical=True, groups=("extra",))
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    config.accesslog = None

    async def main() -> None:
        if backend == "trio":
            from hypercorn.trio import serve
        else:
            from hypercorn.asyncio import serve  # type: ignore[assignment]
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            app: Any = health.asgi()
            tg.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                with anyio.fail_after(20):
                    while True:
                        try:
                            live = await http.get("/live")
                            break
                        except httpx.ConnectError:
                            await anyio.sleep(0.05)
                assert live.status_code == 200
                for path in PATHS:
                    validate((await http.get(path)).json())
                assert (await http.get("/ready")).status_code == 200
                assert (await http.get("/health/extra")).status_code == 503
                assert health.monitor.running  # the lifespan started it
            stop.set()
        assert health.shutting_down

    anyio.run(main, backend=backend)


SIGTERM_APP = textwrap.dedent(
    """
    import asyncio, sys
    import uvicorn
    from veritas_resilience.health import HealthRegistry

    health = HealthRegistry(service="orders", hooks=[], shutdown_delay=1.0, drain_timeout=10)

    async def slow(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await asyncio.sleep(2.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"slow done"})

    app = health.asgi(slow, sigterm=True)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


async def test_sigterm_fails_readiness_first_then_drains_then_uvicorn_stops(
    tmp_path: Path,
) -> None:
    """With sigterm=True, SIGTERM makes /ready answer 503 while uvicorn still serves and a slow
    request still runs; the request completes, then the server exits."""
    script = tmp_path / "serve.py"
    script.write_text(SIGTERM_APP)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(port))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        if (await http.get("/ready")).status_code == 200:
                            break
                    except httpx.ConnectError:
                        await anyio.sleep(0.05)
            slow = asyncio.create_task(http.get("/orders"))
            await anyio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(5):
                while (await http.get("/ready")).status_code != 503:
                    await anyio.sleep(0.02)
            assert not slow.done()
            assert (await http.get("/live")).status_code == 200
            response = await slow
            assert response.status_code == 200 and response.text == "slow done"
        with anyio.fail_after(20):
            returncode = await proc.wait()
        assert returncode in (0, -signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
