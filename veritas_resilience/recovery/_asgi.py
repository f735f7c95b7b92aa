"""The webhook receiver as a pure ASGI app: ``POST /alerts``, answered before any action runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import PayloadError
from ._payload import parse_notification

if TYPE_CHECKING:
    from ._recovery import Recovery

__all__ = ["ReceiverApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_PATHS = ("/alerts", "/alerts/")


class _TooLarge(Exception):
    pass


def _path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    # Starlette's Mount keeps the full path and sets root_path; other servers strip it.
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


async def _answer(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class ReceiverApp:
    """The ASGI app of a :class:`~veritas_resilience.recovery.Recovery` (from ``asgi()``).

    ``POST /alerts`` with Alertmanager's webhook payload (version 4) answers 200 as soon as the
    alerts are decided on; the actions run afterwards. 401 without valid credentials, 413 for a
    body over ``max_body``, 408 for a body not sent within ``read_timeout``, 400 for anything
    that is not a version 4 payload, 405 for another method, 404 for another path. Handles ASGI
    lifespan (it runs the receiver's task group).
    """

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            try:
                await self._http(scope, receive, send)
            except Exception as exc:  # never let one request take the server's worker down
                self.recovery.rejected(500, "internal_error", type(exc).__name__)
                await _answer(send, 500, {"error": "internal error"})
        # websocket: not ours; closing the handshake is the server's default

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.recovery._running():
                await send({"type": "lifespan.startup.complete"})
                started = True
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        recovery = self.recovery
        if _path(scope) not in _PATHS:
            recovery.rejected(404, "not_found")
            await _answer(send, 404, {"error": "not found: the receiver serves POST /alerts"})
            return
        if scope.get("method") != "POST":
            recovery.rejected(405, "method_not_allowed")
            await _answer(send, 405, {"error": "method not allowed"}, [(b"allow", b"POST")])
            return
        headers = scope.get("headers") or []
        auth = next((v for k, v in headers if k.lower() == b"authorization"), None)
        if not recovery.authorized(auth):
            recovery.rejected(401, "unauthorized", "no credentials" if auth is None else "")
            challenge = b'Bearer realm="alerts"' if recovery._tokens else b'Basic realm="alerts"'
            await _answer(send, 401, {"error": "unauthorized"}, [(b"www-authenticate", challenge)])
            return
        body = None
        try:
            with anyio.move_on_after(recovery._read_timeout):
                body = await self._body(headers, receive)
        except _TooLarge:
            recovery.rejected(413, "too_large", f"over {recovery._max_body} bytes")
            await _answer(send, 413, {"error": f"body over {recovery._max_body} bytes"})
            return
        if body is None:
            detail = f"body not received within {recovery._read_timeout:g}s"
            recovery.rejected(408, "timeout", detail)
            await _answer(send, 408, {"error": detail})
            return
        try:
            notification = parse_notification(body)
        except PayloadError as exc:
            recovery.rejected(400, "bad_request", str(exc))
            await _answer(send, 400, {"error": str(exc)})
            return
        recovery.accept(notification)
        await _answer(send, 200, {"status": "accepted", "alerts": len(notification.alerts)})

    async def _body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
        cap = self.recovery._max_body
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None:
            try:
                if int(length) > cap:
                    raise _TooLarge
            except ValueError:
                pass  # the server rejects a malformed length itself; count what arrives
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def __repr__(self) -> str:
        return f"<ReceiverApp {self.recovery.name!r}>"
