"""The failover client's settings, validated on their own, before any pool or task exists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from .._validate import positive_int, seconds
from ._config import Route
from ._fencing import FencingRecord
from ._node import ConnectSettings

__all__ = ["ClientSettings"]

# What the client sets on every connection itself: connect_kwargs must leave them alone.
_OWN_CONNECT_ARGS = frozenset(
    {
        "dsn", "host", "port", "user", "password", "database", "ssl", "timeout", "loop",
        "command_timeout", "server_settings", "target_session_attrs", "connection_class",
        "record_class",
    }
)  # fmt: skip
# What the client decides for each node's breaker: breaker_options must leave them alone.
_OWN_BREAKER_OPTIONS = ("name", "failure_on", "ignore_on", "clock", "hooks")
_BREAKER_DEFAULTS: Mapping[str, Any] = {"failure_threshold": 5, "reset_timeout": 2.0}
# Durations: (field, zero allowed).
_DURATIONS = (
    ("connect_timeout", False),
    ("command_timeout", False),
    ("acquire_timeout", False),
    ("release_timeout", False),
    ("failover_timeout", False),
    ("monitor_interval", False),
    ("fast_interval", False),
    ("probe_timeout", False),
    ("ryw_timeout", False),
    ("promote_after", False),
    ("max_inactive_connection_lifetime", True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """Every setting of :class:`~veritas_resilience.postgres.FailoverClient` but its nodes, clock
    and hooks; the client's docstring says what each one does.

    Durations are given as seconds or a ``timedelta`` and kept as seconds (``float``);
    ``server_settings``, ``connect_kwargs`` and ``breaker_options`` are kept as complete dicts
    (``application_name`` and the breaker's defaults filled in).

    Raises:
        ValueError: If a setting is out of its range (the message names it).
        TypeError: If a setting has the wrong type (the message names it).
    """

    name: str = "postgres"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    ssl: Any = None
    server_settings: Mapping[str, str] | None = None
    connect_kwargs: Mapping[str, Any] | None = None
    read_route: Route = "primary"
    max_lag_bytes: int | None = 16 * 1024 * 1024
    max_lag_seconds: float | None = None
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    acquire_timeout: float = 5.0
    release_timeout: float = 1.0
    failover_timeout: float = 30.0
    monitor_interval: float = 0.5
    fast_interval: float = 0.025
    probe_timeout: float = 1.0
    fall: int = 2
    rise: int = 2
    min_size: int = 1
    max_size: int = 10
    max_queries: int = 50000
    max_inactive_connection_lifetime: float = 300.0
    init: Callable[[asyncpg.Connection[Any]], Awaitable[None]] | None = None
    setup: Callable[[Any], Awaitable[None]] | None = None
    record_class: type[Any] | None = None
    read_your_writes: bool = False
    ryw_timeout: float = 0.5
    auto_promote: bool = False
    promote_after: float = 5.0
    system_identifier: int | None = None
    min_timeline: int | None = None
    fencing_record: FencingRecord | None = None
    breaker_options: Mapping[str, Any] | None = None
    tcp_keepalive: bool = True
    tcp_user_timeout: float | None = 10.0

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.read_route not in ("primary", "prefer_standby"):
            raise ValueError(
                f"read_route must be 'primary' or 'prefer_standby', got {self.read_route!r}"
            )
        lag = self.max_lag_bytes
        if lag is not None and (isinstance(lag, bool) or not isinstance(lag, int) or lag < 0):
            raise ValueError(f"max_lag_bytes must be an int >= 0 or None, got {lag!r}")
        for name, allow_zero in _DURATIONS:
            put(self, name, seconds(getattr(self, name), name, allow_zero=allow_zero))
        for name in ("max_lag_seconds", "tcp_user_timeout"):
            value = getattr(self, name)
            if value is not None:
                put(self, name, seconds(value, name, allow_zero=name == "max_lag_seconds"))
        for name in ("fall", "rise", "max_size", "max_queries"):
            positive_int(getattr(self, name), name)
        if self.min_timeline is not None:
            positive_int(self.min_timeline, "min_timeline")
        size = self.min_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_size must be an int >= 0, got {size!r}")
        if size > self.max_size:
            raise ValueError(f"min_size must be <= max_size ({self.max_size}), got {size!r}")
        sysid = self.system_identifier
        if sysid is not None and (isinstance(sysid, bool) or not isinstance(sysid, int)):
            raise TypeError(f"system_identifier must be an int or None, got {sysid!r}")
        record = self.fencing_record
        if record is not None and not isinstance(record, FencingRecord):
            raise TypeError(
                f"fencing_record must be a FencingRecord (async load() and save()), got {record!r}"
            )
        for name in ("read_your_writes", "auto_promote", "tcp_keepalive"):
            put(self, name, bool(getattr(self, name)))

        clash = sorted(set(self.connect_kwargs or {}) & _OWN_CONNECT_ARGS)
        if clash:
            raise ValueError(
                f"connect_kwargs must not set {', '.join(clash)}: the client sets them (use the "
                "client's own arguments: connect_timeout, command_timeout, ssl, ...)"
            )
        put(self, "connect_kwargs", dict(self.connect_kwargs or {}))
        put(
            self, "server_settings", {"application_name": self.name, **(self.server_settings or {})}
        )
        breaker = {**_BREAKER_DEFAULTS, **(self.breaker_options or {})}
        for reserved in _OWN_BREAKER_OPTIONS:
            if reserved in breaker:
                raise ValueError(f"breaker_options must not set {reserved!r}: the client does")
        put(self, "breaker_options", breaker)

    def connect_settings(self) -> ConnectSettings:
        """How every connection to a node is made."""
        return ConnectSettings(
            user=self.user,
            password=self.password,
            database=self.database,
            ssl=self.ssl,
            server_settings=dict(self.server_settings or {}),
            connect_kwargs=dict(self.connect_kwargs or {}),
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            tcp_keepalive=self.tcp_keepalive,
            tcp_user_timeout=self.tcp_user_timeout,
        )
