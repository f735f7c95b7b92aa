"""The probes as a pure ASGI application: /health /ready /live /startup /metrics, no framework."""

from __future__ import annotations

import gzip
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from ._model import HealthReport
from ._registry import LIVENESS, READINESS, STARTUP, Details
from ._wire import CONTENT_TYPE, encode

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ._registry import HealthRegistry

__all__ = ["ASGIApp", "HealthApp"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application."""

_METRICS = object()
_ROUTES: dict[str, object] = {
    "/health": None,
    "/ready": READINESS,
    "/live": LIVENESS,
    "/startup": STARTUP,
}
_DETAILS = ("never", "always", "authorized")
_NO_STORE = (b"cache-control", b"no-store")
_HEALTH_TYPE = (b"content-type", CONTENT_TYPE.encode())


class HealthApp:
    """The health registry's probes as an ASGI 3 application, with no web framework.

    ========================  ===========================================================
    ``GET /live``             the liveness group: process checks only (event-loop lag)
    ``GET /ready``            the readiness group and the readiness state
    ``GET /startup``          503 until ``mark_started()``, then the startup group
    ``GET /health``           every check and the readiness state
    ``GET /health/<group>``   one group of the user's
    ``GET /metrics``          Prometheus exposition (OpenMetrics when asked, gzip when asked)
    ========================  ===========================================================

    Probe bodies are ``application/health+json``; ``pass`` and ``warn`` answer 200, ``fail``
    503; ``HEAD`` answers the same without a body; every answer carries
    ``Cache-Control: no-store``. Details (``output``, ``observedValue``, component ids, times,
    the service's identity) follow ``details``: ``"never"``, ``"always"``, or ``"authorized"``
    (the default): only requests with ``Authorization: Bearer <token>`` see them.

    It is a plain ASGI callable: mount it in Starlette or FastAPI (``app.mount("/", health_app)``
    after your own routes, or at a prefix), or give it your application as ``app``: it answers
    its own paths and passes every other request (and the lifespan) to ``app``, counting the
    requests in flight so that shutdown can drain them.

    On ASGI lifespan startup it runs the event-loop lag monitor; on shutdown it turns readiness
    to ``fail`` first (:meth:`HealthRegistry.shutdown`), waits ``shutdown_delay``, drains the
    in-flight requests within ``drain_timeout``, and only then lets ``app`` shut down.

    Args:
        registry: The health registry.
        app: An application for every other path (404 when omitted).
        details: Who sees details: ``"never"``, ``"always"`` or ``"authorized"``.
        token: The bearer token that shows details under ``"authorized"`` (nobody sees them
            without one). Compared in constant time; never logged or shown.
        metrics: Serve ``/metrics``.
        metrics_registry: The Prometheus registry ``/metrics`` serves (the global one by
            default: where the library's default hooks export).
        sigterm: Take SIGTERM during the lifespan (see :meth:`HealthRegistry.watch_sigterm`).

    Raises:
        ValueError: If ``details`` is not one of the three words, or ``token`` is empty or not
            printable ASCII.
    """

    def __init__(
        self,
        registry: HealthRegistry,
        app: ASGIApp | None = None,
        *,
        details: Details = "authorized",
        token: str | None = None,
        metrics: bool = True,
        metrics_registry: CollectorRegistry | None = None,
        sigterm: bool = False,
    ) -> None:
        if details not in _DETAILS:
            raise ValueError(f"details must be one of {', '.join(_DETAILS)}, got {details!r}")
        if token is not None and (
            not isinstance(token, str)
            or not token
            or not token.isascii()
            or not token.isprintable()
            or " " in token
        ):
            raise ValueError("token must be a non-empty printable ASCII string without spaces")
        if app is not None and not callable(app):
            raise ValueError(f"app must be an ASGI application, got {app!r}")
        self.registry = registry
        self.app = app
        self.details: Details = details
        self._token = None if token is None else token.encode("ascii")
        self._metrics = metrics
        self._metrics_registry = REGISTRY if metrics_registry is None else metrics_registry
        self._sigterm = sigterm
        self._bodies: dict[tuple[object, bool], tuple[HealthReport, bytes]] = {}

    def __repr__(self) -> str:
        # The token never appears here.
        return f"HealthApp({self.registry!r}, details={self.details!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        kind = scope["type"]
        if kind == "http":
            route = self._route(scope)
            if route is not _MISSING:
                await self._serve(route, scope, send)
                return
            if self.app is None:
                await _respond(send, 404, b"not found\n", b"text/plain; charset=utf-8", scope)
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self.app is None:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        self.registry._request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.registry._request_finished()

    def _route(self, scope: Scope) -> object:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        route = _ROUTES.get(path, _MISSING)
        if route is not _MISSING:
            return route
        if path == "/metrics":
            return _METRICS if self._metrics else _MISSING
        if path.startswith("/health/"):
            group = path[len("/health/") :]
            if group in self.registry.groups:
                return group
        return _MISSING

    async def _serve(self, route: object, scope: Scope, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(
                send,
                405,
                b"method not allowed\n",
                b"text/plain; charset=utf-8",
                scope,
                ((b"allow", b"GET, HEAD"),),
            )
            return
        if route is _METRICS:
            await self._serve_metrics(scope, send)
            return
        group = route if isinstance(route, str) else None
        report = await self.registry.run(group)
        details = self._shows_details(scope)
        key = (route, details)
        cached = self._bodies.get(key)
        if cached is not None and _same(cached[0], report):
            body = cached[1]
        else:
            body = encode(report, details=details)
            self._bodies[key] = (report, body)
        await _respond(send, report.http_status, body, _HEALTH_TYPE[1], scope)

    def _shows_details(self, scope: Scope) -> bool:
        if self.details == "always":
            return True
        if self.details == "never" or self._token is None:
            return False
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credentials.strip(), self._token)
        return False

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        accept = accept_encoding = ""
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
            elif name == b"accept-encoding":
                accept_encoding = value.decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._metrics_registry)
        extra: tuple[tuple[bytes, bytes], ...] = ((b"vary", b"Accept, Accept-Encoding"),)
        if "gzip" in accept_encoding.lower():
            body = gzip.compress(body, compresslevel=6)
            extra += ((b"content-encoding", b"gzip"),)
        await _respond(send, 200, body, content_type.encode(), scope, extra)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = self.registry
        async with anyio.create_task_group() as tg:
            await tg.start(registry.monitor.run)
            if self._sigterm:
                await tg.start(registry.watch_sigterm)
            if self.app is None:
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await registry.shutdown()
                        await send({"type": "lifespan.shutdown.complete"})
                        break
            else:

                async def receive_then_drain() -> Message:
                    message = await receive()
                    if message["type"] == "lifespan.shutdown":
                        # Readiness fails and in-flight requests drain before the
                        # application itself hears of the shutdown.
                        await registry.shutdown()
                    return message

                await self.app(scope, receive_then_drain, send)
            tg.cancel_scope.cancel()


_MISSING = object()


def _same(old: HealthReport, new: HealthReport) -> bool:
    if old.status is not new.status or len(old.checks) != len(new.checks):
        return False
    return all(a is b for a, b in zip(old.checks.values(), new.checks.values()))


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    scope: Scope,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        _NO_STORE,
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
