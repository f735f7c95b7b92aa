"""Node addresses: how the client is told where the servers are, without ever showing a password."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["Node", "NodeSpec", "Route", "nodes_from_dsn"]

Route: TypeAlias = Literal["primary", "prefer_standby"]
"""Where a read may go: only the primary (``'primary'``), or a standby within the lag limits, else
the primary (``'prefer_standby'``)."""
Route.__doc__ = (  # an alias has no docstring of its own; help() and doc tools read this one
    "Where a read may go: only the primary (``'primary'``), or a standby within the lag limits, "
    "else the primary (``'prefer_standby'``)."
)

_SCHEMES = ("postgresql", "postgres")
# The client chooses nodes itself; a per-node DSN must not make asyncpg refuse or skip a node.
_DROPPED_PARAMS = frozenset({"target_session_attrs"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """One PostgreSQL server the client may use.

    Give either ``host`` (and ``port``), or a single-host ``dsn``; connection settings shared by
    all nodes (user, password, database, ssl) go to the client. The ``dsn`` is never shown: not in
    ``repr``, errors, logs, metrics or health output, where the node appears by ``name``.

    Example:
        >>> Node(host="db1.internal", port=5432)
        Node(host='db1.internal', port=5432, name='db1.internal:5432')
        >>> Node.from_dsn("postgresql://app:s3cret@db2:5433/app").name
        'db2:5433'

    Args:
        host: Host name or address.
        port: TCP port (1-65535).
        name: How the node is named in errors, logs, metrics and health; ``host:port`` by
            default. Keep it stable: it is a metric label.
        dsn: A ``postgresql://`` URL for this one node; its user, password, database and options
            override the client's.

    Raises:
        ValueError: If ``host`` is empty or ``port`` is out of range.
    """

    host: str
    port: int = 5432
    name: str = ""
    dsn: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an int in 1..65535, got {self.port!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be an int in 1..65535, got {self.port!r}")
        if not self.name:
            host = f"[{self.host}]" if ":" in self.host else self.host
            object.__setattr__(self, "name", f"{host}:{self.port}")

    @classmethod
    def from_dsn(cls, dsn: str, *, name: str | None = None) -> Node:
        """Make a node from a single-host ``postgresql://`` URL.

        Raises:
            ValueError: If the URL is not a PostgreSQL URL or names several hosts (use
                :func:`nodes_from_dsn` for those).
        """
        nodes = nodes_from_dsn(dsn)
        if len(nodes) != 1:
            raise ValueError(
                f"dsn names {len(nodes)} hosts; use nodes_from_dsn() for a multi-host URL"
            )
        node = nodes[0]
        return cls(host=node.host, port=node.port, name=name or node.name, dsn=node.dsn)


NodeSpec: TypeAlias = "Node | str | tuple[str, int]"
"""A node as the client accepts it: a :class:`Node`, a single-host DSN, or ``(host, port)``."""


def nodes_from_dsn(dsn: str) -> list[Node]:
    """Split a (possibly multi-host) ``postgresql://`` URL into one :class:`Node` per host.

    ``postgresql://app:pw@db1:5432,db2:5433/app`` gives two nodes, each with a single-host DSN
    that keeps the user, password, database and options (``target_session_attrs`` is dropped:
    the client picks nodes by their probed role).

    Raises:
        ValueError: If ``dsn`` is not a ``postgresql://`` or ``postgres://`` URL, or has no host.
    """
    if not isinstance(dsn, str):
        raise ValueError("dsn must be a postgresql:// URL string")
    try:
        parts = urlsplit(dsn)
    except ValueError:
        raise ValueError("dsn is not a valid postgresql:// URL") from None
    if parts.scheme not in _SCHEMES:
        # Never echo the DSN: it may hold a password.
        raise ValueError("dsn must start with postgresql:// or postgres://")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
         if k not in _DROPPED_PARAMS]
    )  # fmt: skip
    nodes: list[Node] = []
    for item in hostlist.split(","):
        host, port = _split_host_port(item)
        if not host:
            raise ValueError("dsn has an empty host; name every host explicitly")
        netloc = f"{userinfo}{at}{_format_host(host)}:{port}"
        single = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        nodes.append(Node(host=host, port=port, dsn=single))
    return nodes


def _split_host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not port_text:
        return host, 5432
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("dsn has a port that is not a number") from None
    return host, port


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def coerce_nodes(nodes: Sequence[NodeSpec] | str) -> tuple[Node, ...]:
    """Turn what the client was given into :class:`Node` objects (internal)."""
    if isinstance(nodes, str):
        result = nodes_from_dsn(nodes)
    else:
        result = []
        for spec in nodes:
            if isinstance(spec, Node):
                result.append(spec)
            elif isinstance(spec, str):
                result.extend(nodes_from_dsn(spec))
            elif isinstance(spec, tuple) and len(spec) == 2:
                result.append(Node(host=spec[0], port=spec[1]))
            else:
                raise ValueError(
                    "nodes must hold Node objects, postgresql:// URLs or (host, port) tuples, "
                    f"got {type(spec).__name__}"
                )
    if not result:
        raise ValueError("nodes must name at least one node")
    names = [n.name for n in result]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique, got {names!r}")
    return tuple(result)
