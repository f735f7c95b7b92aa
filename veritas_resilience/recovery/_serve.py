"""One ASGI app for the ops endpoints: the health app and the recovery receiver side by side.

``POST /alerts`` goes to the receiver; every other path to the health app (``/health``, ``/ready``,
``/live``, ``/startup``, ``/metrics``), or, without one, ``/metrics`` to prometheus_client's
exposition of the process's registry. ``veritas-resilience serve`` runs it under uvicorn.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

from ._asgi import Receive, Scope, Send, _answer, _path
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


def ops_app(*, recovery: Recovery | None = None, health: Any = None) -> App:
    """An ASGI app serving the receiver (``POST /alerts``) and the health endpoints together.

    With a health registry, its app serves ``/health``, ``/ready``, ``/live``, ``/startup`` and
    ``/metrics`` and hands every other request, and the ASGI lifespan, to the receiver (so on
    shutdown readiness fails and requests drain first). Without one, ``/metrics`` serves the
    Prometheus exposition of the process's registry.

    Args:
        recovery: The receiver, served at ``/alerts``.
        health: A :class:`~veritas_resilience.health.HealthRegistry`.

    Raises:
        ValueError: With neither.
    """
    if recovery is None and health is None:
        raise ValueError("give recovery, health, or both")
    receiver = recovery.asgi() if recovery is not None else None
    if health is not None:
        app: App = health.asgi(receiver)
        return app
    assert receiver is not None
    from prometheus_client import make_asgi_app

    metrics = make_asgi_app()

    async def with_metrics(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _path(scope) == "/metrics":
            await metrics(scope, receive, send)
        elif scope["type"] == "http" and _path(scope) not in ("/alerts", "/alerts/"):
            await _answer(send, 404, {"error": "not found"})
        else:
            await receiver(scope, receive, send)

    return with_metrics
