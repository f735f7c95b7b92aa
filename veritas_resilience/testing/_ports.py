"""Free TCP ports on a loopback address, for servers the testing kit starts."""

from __future__ import annotations

import random
import socket
import threading

__all__ = ["free_port"]

# Servers of the kit are stopped and restarted on the same port (a crashed primary comes back as
# a standby), so their ports are taken below the kernel's ephemeral range: there, no outgoing
# connection can grab the port while the server is down.
_LOWEST = 15000
_DEFAULT_EPHEMERAL_START = 32768

# Ports handed out by this process: the kernel may find the same port free twice before either
# caller binds it (a cluster picks all its ports first, then starts the servers).
_handed_out: set[tuple[str, int]] = set()
_lock = threading.Lock()
_random = random.Random()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def _bindable(host: str, port: int) -> bool:
    # No SO_REUSEADDR: a port with connections in TIME_WAIT counts as taken too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing uses at ``host`` right now.

    The port is picked at random below the kernel's ephemeral range (from 15000 up), so no
    outgoing connection takes it later, and a server can be stopped and restarted on it. When
    that range is full, a port from the ephemeral range is returned instead. Well-known ports
    such as PostgreSQL's 5432 or Redis's 6379 are never returned. The port is not reserved:
    another process can take it before the caller binds it, which is unlikely. A port is never
    returned twice by the same process.

    Args:
        host: The local address the port must be free on.

    Returns:
        The port number.
    """
    with _lock:
        high = _ephemeral_start()
        if high - _LOWEST > 100:
            for _ in range(200):
                port = _random.randrange(_LOWEST, high)
                if (host, port) not in _handed_out and _bindable(host, port):
                    _handed_out.add((host, port))
                    return port
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return int(port)
    raise RuntimeError(f"could not find a free TCP port on {host}")  # pragma: no cover
