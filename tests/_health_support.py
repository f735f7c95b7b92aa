"""Helpers shared by the health tests that serve the ASGI app over real HTTP (not a test module)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import uvicorn

SCHEMA = json.loads((Path(__file__).parent / "health_json_schema.json").read_text())


def validate(body: dict[str, Any]) -> None:
    """Validate a body against the draft's JSON schema, and each ``time`` as ISO 8601."""
    jsonschema.Draft202012Validator(SCHEMA).validate(body)
    for items in body.get("checks", {}).values():
        for item in items:
            if "time" in item:
                datetime.fromisoformat(item["time"].replace("Z", "+00:00"))


def loopback_socket() -> socket.socket:
    """A listening socket on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


@asynccontextmanager
async def uvicorn_server(app: Any, **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with a real uvicorn on a free loopback port; yield its base URL."""
    sock = loopback_socket()
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {"lifespan": "on", "log_level": "warning", "access_log": False}
    server = uvicorn.Server(uvicorn.Config(app, **{**settings, **config}))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
