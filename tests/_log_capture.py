"""A structlog-like logger for tests that keeps what the structlog hook logs."""

from __future__ import annotations

from typing import Any


class LogCapture:
    """A structlog-like logger that keeps (level, message, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message, **fields: self.lines.append((level, message, fields))
