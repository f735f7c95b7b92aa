"""Free TCP ports on a loopback address, for servers the testing kit starts."""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port"]

# Ports handed out by this process. The kernel may give the same free port to two callers that
# ask before either binds it (a cluster asks for all its ports first, then starts the servers),
# so ports already handed out are skipped.
_handed_out: set[tuple[str, int]] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on at ``host`` right now.

    The kernel picks the port from its ephemeral range, so well-known ports such as PostgreSQL's
    5432 or Redis's 6379 are never returned. The port is not reserved: another process can take it
    before the caller binds it, which is unlikely but possible. A port is never returned twice to
    the same process.

    Args:
        host: The local address the port must be free on.

    Returns:
        The port number.
    """
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return port
    raise RuntimeError(f"could not find a free TCP port on {host}")  # pragma: no cover
