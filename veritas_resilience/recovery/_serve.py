"""One ASGI app for the ops endpoints: the health app and the recovery receiver side by side.

``POST /alerts`` goes to the receiver; every other path to the health app (``/health``, ``/ready``,
``/live``, ``/startup``, ``/metrics``), or, without one, ``/metrics`` to prometheus_client's
exposition of the process's registry. ``veritas-resilience serve`` runs it under uvicorn.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from ._asgi import Message, Receive, Scope, Send, _answer, _path
from ._recovery import Recovery

__all__ = ["load_object", "ops_app"]

App = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted).

    Raises:
        ValueError: If ``spec`` has no ``:`` or names nothing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


@contextlib.asynccontextmanager
async def _lifespan_of(app: App) -> AsyncIterator[None]:
    """Drive another app's ASGI lifespan: startup on enter, shutdown on exit."""
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](2)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](2)
    supported = True

    async def run() -> None:
        nonlocal supported
        try:
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                      to_app_receive.receive, from_app_send.send)  # fmt: skip
        except Exception:
            supported = False  # an app without lifespan support raises: fine, as servers do
        finally:
            from_app_send.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await to_app_send.send({"type": "lifespan.startup"})
        async for message in from_app_receive:
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"startup failed: {message.get('message', '')}")
            break
        try:
            yield
        finally:
            if supported:
                await to_app_send.send({"type": "lifespan.shutdown"})
                async for _ in from_app_receive:
                    break
            tg.cancel_scope.cancel()


def ops_app(*, recovery: Recovery | None = None, health: Any = None) -> App:
    """An ASGI app serving the receiver (``POST /alerts``) and the health endpoints together.

    Args:
        recovery: The receiver, served at ``/alerts``.
        health: A ``veritas_resilience.health.HealthRegistry`` (anything with ``asgi()``), or an
            ASGI app; serves every other path. Without it, ``/metrics`` serves the Prometheus
            exposition of the process's registry.

    Raises:
        ValueError: With neither.
    """
    if recovery is None and health is None:
        raise ValueError("give recovery, health, or both")
    receiver = recovery.asgi() if recovery is not None else None
    other: App
    if health is None:
        from prometheus_client import make_asgi_app

        metrics = make_asgi_app()

        async def other(scope: Scope, receive: Receive, send: Send) -> None:
            if _path(scope) == "/metrics":
                await metrics(scope, receive, send)
            else:
                await _answer(send, 404, {"error": "not found"})

    else:
        other = health.asgi() if hasattr(health, "asgi") else health

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            message = await receive()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if recovery is not None:
                        await stack.enter_async_context(recovery._running())
                    if health is not None:
                        await stack.enter_async_context(_lifespan_of(other))
                    await send({"type": "lifespan.startup.complete"})
                    while message["type"] != "lifespan.shutdown":
                        message = await receive()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.shutdown.complete"})
            return
        if kind != "http":
            return
        if receiver is not None and _path(scope) in ("/alerts", "/alerts/"):
            await receiver(scope, receive, send)
        else:
            await other(scope, receive, send)

    return app
