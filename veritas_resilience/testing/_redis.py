"""Real Redis topologies on loopback: a Sentinel-managed master with replicas, and a Redis Cluster.

Both kits start ``redis-server`` processes on free ``127.0.0.1`` ports inside a temporary folder,
with persistence off and every failure-detection timer turned down so that a failover takes a
couple of seconds instead of half a minute. They never touch a Redis that was already running on
the machine (such as the usual one on port 6379), and :meth:`~LocalRedisSentinel.stop` kills every
process they started and removes the folder (an ``atexit`` hook does the same as a last resort).

The API is synchronous and blocking, which suits pytest fixtures. From async code, run the slow
calls (``start()``, ``failover()``, ``wait_for_master_change()``...) in a worker thread, e.g.
``await anyio.to_thread.run_sync(kit.failover)``, so the event loop keeps serving the clients under
test while the topology changes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.asyncio.cluster import ClusterNode
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._ports import free_port

__all__ = ["LocalRedisCluster", "LocalRedisSentinel"]

_HOST = "127.0.0.1"
_T = TypeVar("_T")
_Address = tuple[str, int]

# Ports for cluster nodes are drawn from here: the cluster bus listens on port + 10000, and both
# ranges stay below Linux's ephemeral range (32768 and up), where outgoing connections take their
# local ports, and away from Redis's own 6379.
_CLUSTER_PORTS = range(12000, 22000)
_CLUSTER_BUS_OFFSET = 10000

_INSTALL_HINT = (
    "install Redis 7 (Debian/Ubuntu: `apt-get install redis-server`, which also provides "
    "redis-cli; macOS: `brew install redis`) or put the binaries on PATH"
)


# -- helpers ----------------------------------------------------------------------------------


def _find_binary(name: str, explicit: str | None = None) -> str:
    """Return the path of a Redis binary, or raise a RuntimeError that says how to install it."""
    if explicit is not None:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise RuntimeError(f"{name} not found at {explicit!r}: {_INSTALL_HINT}")
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        f"{name} is missing (not on PATH, nor in /usr/bin or /usr/local/bin): {_INSTALL_HINT}"
    )


def _quote(value: str) -> str:
    """Quote a value for redis.conf (double quotes with backslash escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


_cluster_ports_lock = threading.Lock()
_cluster_ports_handed_out: set[int] = set()


def _free_cluster_port() -> int:
    """Return a free port whose cluster-bus port (port + 10000) is free as well."""
    with _cluster_ports_lock:
        for _ in range(2000):
            port = random.choice(_CLUSTER_PORTS)
            bus = port + _CLUSTER_BUS_OFFSET
            if port in _cluster_ports_handed_out or bus in _cluster_ports_handed_out:
                continue
            if _port_is_free(port) and _port_is_free(bus):
                _cluster_ports_handed_out.update((port, bus))
                return port
    raise RuntimeError("could not find a free pair of loopback ports for a Redis Cluster node")


def _client(address: _Address, password: str | None, timeout: float = 1.0) -> redis.Redis:
    """A short-lived admin connection that gives raw replies and fails fast (no retries)."""
    client = redis.Redis(
        host=address[0],
        port=address[1],
        password=password,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    # Raw replies: the kit parses ROLE, INFO, SENTINEL and CLUSTER replies itself, so it does
    # not depend on how a given redis-py version post-processes them.
    client.response_callbacks.clear()
    return client


def _call(address: _Address, password: str | None, *args: str | int, timeout: float = 1.0) -> Any:
    with _client(address, password, timeout) as client:
        return client.execute_command(*args)


def _info(address: _Address, password: str | None, *command: str) -> dict[str, str]:
    """Parse an INFO-style reply (``INFO <section>``, or ``CLUSTER INFO``) into a dict."""
    text = _call(address, password, *command)
    fields: dict[str, str] = {}
    for line in str(text).splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _pairs(reply: Any) -> dict[str, str]:
    """Turn a flat ``[key, value, key, value...]`` reply (or a dict) into a dict of strings."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _role(address: _Address, password: str | None) -> str:
    """Return ``"master"`` or ``"slave"`` as the node itself reports it (ROLE)."""
    return str(_call(address, password, "ROLE")[0])


def _wait_until(
    check: Callable[[], _T | None], *, timeout: float, what: str, interval: float = 0.05
) -> _T:
    """Poll ``check`` until it returns something other than None or False.

    Redis and socket errors count as "not yet": servers refuse connections while they start,
    answer LOADING while they sync, and so on.

    Raises:
        TimeoutError: If ``timeout`` seconds pass first; the message names ``what`` and the last
            error seen.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError) as exc:
            last_error, result = exc, None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


class _PortInUse(Exception):
    """The server could not bind its port (another process took it first)."""


class _Server:
    """One ``redis-server`` process (a data node or a Sentinel), its folder, config and log."""

    def __init__(self, binary: str, name: str, folder: Path, port: int, *, sentinel: bool) -> None:
        self.binary = binary
        self.name = name
        self.folder = folder
        self.port = port
        self.sentinel = sentinel
        self.conf = folder / ("sentinel.conf" if sentinel else "redis.conf")
        self.log = folder / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> _Address:
        return (_HOST, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, lines: Iterable[str]) -> None:
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def spawn(self, extra_args: Sequence[str] = (), *, fresh_log: bool = False) -> None:
        argv = [self.binary, str(self.conf)]
        if self.sentinel:
            argv.append("--sentinel")
        argv.extend(extra_args)
        with open(self.log, "wb" if fresh_log else "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.paused = False

    def wait_ready(self, password: str | None, timeout: float) -> None:
        """Wait until the server answers PING.

        Raises:
            _PortInUse: If the server exited because its port was taken.
            RuntimeError: If it exited for another reason (the message holds its log's tail).
        """

        def ready() -> bool | None:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _PortInUse(self.name)
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited with code {code}; its log ends:\n{tail}")
            return bool(_call(self.address, password, "PING", timeout=0.5)) or None

        _wait_until(ready, timeout=timeout, what=f"{self.name} to answer PING", interval=0.02)

    def send(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process (a stopped one too) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
        self.paused = False

    def terminate(self, timeout: float = 5.0) -> None:
        """Shut the process down with SIGTERM, falling back to SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.paused = False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _start_with_port_retry(
    make: Callable[[int], _Server],
    password: str | None,
    timeout: float,
    pick_port: Callable[[], int],
) -> _Server:
    """Start a server on a fresh port, picking another one if the port was taken meanwhile."""
    for _ in range(5):
        server = make(pick_port())
        server.spawn(fresh_log=True)
        try:
            server.wait_ready(password, timeout)
        except _PortInUse:
            server.kill()
            continue
        except BaseException:
            server.kill()
            raise
        return server
    raise RuntimeError("could not start redis-server: every port tried was taken")


class _Topology:
    """What both kits share: the temporary folder, the processes, and cleanup."""

    _prefix = "veritas-redis-"

    def __init__(self, start_timeout: float) -> None:
        if not start_timeout > 0:
            raise ValueError(f"start_timeout must be > 0 seconds, got {start_timeout!r}")
        self._start_timeout = start_timeout
        self._lock = threading.RLock()
        self._folder: Path | None = None

    @property
    def directory(self) -> Path | None:
        """The temporary folder holding configs and logs while started, else None."""
        return self._folder

    def _servers(self) -> list[_Server]:
        raise NotImplementedError

    def _make_folder(self) -> Path:
        self._folder = Path(tempfile.mkdtemp(prefix=self._prefix))
        atexit.register(self.stop)
        return self._folder

    def stop(self) -> None:
        """Kill every process this kit started and remove its temporary folder.

        Safe to call more than once, and after a failed ``start()``.
        """
        with self._lock:
            for server in self._servers():
                server.kill()
            self._forget_servers()
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None
            atexit.unregister(self.stop)

    def _forget_servers(self) -> None:
        raise NotImplementedError

    def _require_started(self) -> None:
        if self._folder is None:
            raise RuntimeError(f"{type(self).__name__} is not started; call start() first")


# -- Sentinel ---------------------------------------------------------------------------------


class LocalRedisSentinel(_Topology):
    """A real Redis master, its replicas and three Sentinels on loopback, for tests and drills.

    Every node runs ``redis-server`` (Sentinels with ``--sentinel``) on a free ``127.0.0.1``
    port, without persistence, in a temporary folder. The Sentinels use a quorum of 2, a short
    ``down-after-milliseconds`` and ``failover-timeout``, and faster internal timers
    (``SENTINEL DEBUG``: INFO every second, hello messages every 0.5 s), so a killed master is
    replaced in about three seconds::

        with LocalRedisSentinel() as kit:
            sentinel = redis.asyncio.Sentinel(kit.sentinels)
            old = kit.kill_master()
            new = kit.wait_for_master_change(old, timeout=10)
            kit.restart_node(old)            # comes back as a replica of ``new``

    The kit asks the Sentinels where the master is (:attr:`master`); it keeps no opinion of its
    own, so what it reports is what a client would be told.

    Args:
        num_replicas: How many replicas to start next to the master.
        num_sentinels: How many Sentinels to start.
        quorum: Sentinels that must agree the master is down; defaults to a majority.
        service_name: The name the Sentinels monitor the master under.
        password: Password of the data nodes (``requirepass``/``masterauth``; the Sentinels get
            it as ``auth-pass``). None means no password.
        sentinel_password: Password of the Sentinels themselves (``requirepass``). None means
            none.
        down_after_ms: ``down-after-milliseconds``: how long a silent master takes to be
            considered down.
        failover_timeout_ms: ``failover-timeout``. A failover that is not done within it is
            abandoned, and the same master is not failed over again within twice that time.
        parallel_syncs: ``parallel-syncs``: replicas reconfigured at once after a failover.
        fast_timers: Whether to shorten the Sentinels' internal timers with ``SENTINEL DEBUG``.
            False keeps Redis's defaults (slower, e.g. a demoted master is converted to a
            replica only after 10 to 20 s).
        start_timeout: Seconds to wait for the topology to come up.
        redis_server: Path of the ``redis-server`` binary; found on PATH (or in /usr/bin,
            /usr/local/bin) when None.

    Raises:
        ValueError: If a count, quorum or duration is out of range.
    """

    _prefix = "veritas-redis-sentinel-"

    def __init__(
        self,
        *,
        num_replicas: int = 2,
        num_sentinels: int = 3,
        quorum: int | None = None,
        service_name: str = "mymaster",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        parallel_syncs: int = 1,
        fast_timers: bool = True,
        start_timeout: float = 30.0,
        redis_server: str | None = None,
    ) -> None:
        super().__init__(start_timeout)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas!r}")
        if num_sentinels < 1:
            raise ValueError(f"num_sentinels must be >= 1, got {num_sentinels!r}")
        quorum = num_sentinels // 2 + 1 if quorum is None else quorum
        if not 1 <= quorum <= num_sentinels:
            raise ValueError(f"quorum must be between 1 and {num_sentinels}, got {quorum!r}")
        if not service_name or not service_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"service_name must be a non-empty word, got {service_name!r}")
        for field, value in (("down_after_ms", down_after_ms), ("parallel_syncs", parallel_syncs)):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value!r}")
        if failover_timeout_ms < 1000:
            raise ValueError(f"failover_timeout_ms must be >= 1000, got {failover_timeout_ms!r}")
        self._num_replicas = num_replicas
        self._num_sentinels = num_sentinels
        self._quorum = quorum
        self._service_name = service_name
        self._password = password
        self._sentinel_password = sentinel_password
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._parallel_syncs = parallel_syncs
        self._fast_timers = fast_timers
        self._redis_server = redis_server
        self._data: list[_Server] = []
        self._sentinel_nodes: list[_Server] = []
        self._resume_timer: threading.Timer | None = None

    def __repr__(self) -> str:
        state = "started" if self._folder is not None else "stopped"
        return (
            f"<LocalRedisSentinel {self._service_name!r} {state}, {len(self._data)} data nodes, "
            f"{len(self._sentinel_nodes)} sentinels>"
        )

    # -- lifecycle --

    def __enter__(self) -> LocalRedisSentinel:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the master, the replicas and the Sentinels, and wait until all agree.

        Returns once every replica is in sync and every Sentinel knows the master, every
        replica and every other Sentinel, so a failover can start at once.

        Raises:
            RuntimeError: If ``redis-server`` is missing, the kit is already started, or a server
                fails to start (with the tail of its log). Whatever was started is stopped.
            TimeoutError: If the topology is not ready within ``start_timeout``.
        """
        with self._lock:
            if self._folder is not None:
                raise RuntimeError("LocalRedisSentinel is already started")
            binary = _find_binary("redis-server", self._redis_server)
            folder = self._make_folder()
            try:
                self._start_data_nodes(binary, folder)
                self._start_sentinels(binary, folder)
                _wait_until(
                    lambda: all(self._sentinel_ready(s) for s in self._sentinel_nodes),
                    timeout=self._start_timeout,
                    what="every Sentinel to know the master, its replicas and its peers",
                )
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Kill every process this kit started and remove its temporary folder.

        Safe to call more than once, and after a failed ``start()``.
        """
        with self._lock:
            if self._resume_timer is not None:
                self._resume_timer.cancel()
                self._resume_timer = None
            super().stop()

    def _servers(self) -> list[_Server]:
        return [*self._sentinel_nodes, *self._data]

    def _forget_servers(self) -> None:
        self._data = []
        self._sentinel_nodes = []

    def _data_config(self, folder: Path, port: int, master_port: int | None) -> list[str]:
        lines = [
            f"port {port}",
            f"bind {_HOST}",
            "protected-mode no",
            "daemonize no",
            f"dir {_quote(str(folder))}",
            'save ""',
            "appendonly no",
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
            "replica-serve-stale-data yes",
            f"replica-announce-ip {_HOST}",
            "enable-debug-command local",
        ]
        if self._password is not None:
            lines += [
                f"requirepass {_quote(self._password)}",
                f"masterauth {_quote(self._password)}",
            ]
        if master_port is not None:
            lines.append(f"replicaof {_HOST} {master_port}")
        return lines

    def _start_data_nodes(self, binary: str, folder: Path) -> None:
        master_port: int | None = None
        for index in range(self._num_replicas + 1):
            name = f"redis-{index}"
            node_folder = folder / name

            def make(
                port: int,
                name: str = name,
                folder: Path = node_folder,
                of: int | None = master_port,
            ) -> _Server:
                server = _Server(binary, name, folder, port, sentinel=False)
                server.write_config(self._data_config(folder, port, of))
                return server

            server = _start_with_port_retry(make, self._password, self._start_timeout, free_port)
            self._data.append(server)
            if master_port is None:
                master_port = server.port
        _wait_until(
            self._replicas_in_sync_with(self._data[0].address),
            timeout=self._start_timeout,
            what="the replicas to finish their first sync",
        )

    def _sentinel_config(self, server: _Server, ids: dict[int, str], master_port: int) -> list[str]:
        name = self._service_name
        lines = [
            f"port {server.port}",
            f"bind {_HOST}",
            "protected-mode no",
            "daemonize no",
            f"dir {_quote(str(server.folder))}",
            f"sentinel myid {ids[server.port]}",
            "sentinel resolve-hostnames no",
            "sentinel announce-hostnames no",
            f"sentinel announce-ip {_HOST}",
            f"sentinel monitor {name} {_HOST} {master_port} {self._quorum}",
            f"sentinel down-after-milliseconds {name} {self._down_after_ms}",
            f"sentinel failover-timeout {name} {self._failover_timeout_ms}",
            f"sentinel parallel-syncs {name} {self._parallel_syncs}",
        ]
        if self._password is not None:
            lines.append(f"sentinel auth-pass {name} {_quote(self._password)}")
        if self._sentinel_password is not None:
            lines += [
                f"requirepass {_quote(self._sentinel_password)}",
                f"sentinel sentinel-pass {_quote(self._sentinel_password)}",
            ]
        # Telling each Sentinel about the replicas and its peers up front saves the seconds it
        # would otherwise spend discovering them through INFO and hello messages.
        lines += [f"sentinel known-replica {name} {_HOST} {r.port}" for r in self._data[1:]]
        lines += [
            f"sentinel known-sentinel {name} {_HOST} {port} {run_id}"
            for port, run_id in ids.items()
            if port != server.port
        ]
        return lines

    def _start_sentinels(self, binary: str, folder: Path) -> None:
        # The Sentinels' configs name each other, so on a port clash all of them start over.
        for _ in range(5):
            servers = [
                _Server(
                    binary, f"sentinel-{i}", folder / f"sentinel-{i}", free_port(), sentinel=True
                )
                for i in range(self._num_sentinels)
            ]
            ids = {server.port: secrets.token_hex(20) for server in servers}
            for server in servers:
                server.write_config(self._sentinel_config(server, ids, self._data[0].port))
                server.spawn(fresh_log=True)
            self._sentinel_nodes = servers
            try:
                for server in servers:
                    server.wait_ready(self._sentinel_password, self._start_timeout)
                    self._tune_sentinel(server)
            except _PortInUse:
                for server in servers:
                    server.kill()
                self._sentinel_nodes = []
                continue
            return
        raise RuntimeError("could not start the Sentinels: every port tried was taken")

    def _tune_sentinel(self, server: _Server) -> None:
        if self._fast_timers:
            _call(
                server.address,
                self._sentinel_password,
                *("SENTINEL", "DEBUG", "info-period", 1000, "publish-period", 500),
                *("ping-period", 250, "ask-period", 250),
            )

    def _sentinel_ready(self, server: _Server) -> bool:
        name, password = self._service_name, self._sentinel_password
        master = _pairs(_call(server.address, password, "SENTINEL", "MASTER", name))
        if master.get("flags") != "master" or master.get("port") != str(self._data[0].port):
            return False
        if int(master.get("num-other-sentinels", "0")) != self._num_sentinels - 1:
            return False
        replicas = [
            _pairs(r) for r in _call(server.address, password, "SENTINEL", "REPLICAS", name)
        ]
        good = [
            r for r in replicas if r.get("flags") == "slave" and r.get("master-link-status") == "ok"
        ]
        if len(good) != self._num_replicas:
            return False
        peers = [_pairs(p) for p in _call(server.address, password, "SENTINEL", "SENTINELS", name)]
        return len(peers) == self._num_sentinels - 1 and all(
            p.get("flags") == "sentinel" for p in peers
        )

    # -- what the topology looks like --

    @property
    def service_name(self) -> str:
        """The name the Sentinels monitor the master under (``"mymaster"`` by default)."""
        return self._service_name

    @property
    def password(self) -> str | None:
        """The data nodes' password, or None."""
        return self._password

    @property
    def sentinel_password(self) -> str | None:
        """The Sentinels' own password, or None."""
        return self._sentinel_password

    @property
    def sentinels(self) -> list[_Address]:
        """Every Sentinel's ``(host, port)``, stopped ones included, in a fixed order."""
        return [s.address for s in self._sentinel_nodes]

    @property
    def nodes(self) -> list[_Address]:
        """Every data node's ``(host, port)`` (master and replicas, killed ones included)."""
        return [n.address for n in self._data]

    @property
    def master(self) -> _Address:
        """The master's address as the first running Sentinel that answers reports it.

        Raises:
            RuntimeError: If the kit is not started or no running Sentinel answers.
        """
        self._require_started()
        errors: list[str] = []
        for server in self._sentinel_nodes:
            if not server.running:
                continue
            try:
                reply = _call(
                    server.address,
                    self._sentinel_password,
                    *("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._service_name),
                )
            except redis.RedisError as exc:
                errors.append(f"{server.name}: {exc!r}")
                continue
            if reply:
                return (str(reply[0]), int(reply[1]))
            errors.append(f"{server.name}: does not know {self._service_name!r}")
        raise RuntimeError("no running Sentinel reported the master: " + "; ".join(errors))

    @property
    def replicas(self) -> list[_Address]:
        """The running data nodes other than the current :attr:`master`."""
        master = self.master
        return [n.address for n in self._data if n.running and n.address != master]

    def _sentinel_answers(self) -> list[_Address | None]:
        answers: list[_Address | None] = []
        for server in self._sentinel_nodes:
            if server.running:
                reply = _call(
                    server.address,
                    self._sentinel_password,
                    *("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._service_name),
                )
                answers.append((str(reply[0]), int(reply[1])) if reply else None)
        return answers

    def _node(self, address: _Address) -> _Server:
        for server in self._data:
            if server.address == (address[0], int(address[1])):
                return server
        raise ValueError(f"{address!r} is not a data node of this kit")

    def _sentinel(self, index: int) -> _Server:
        self._require_started()
        if not 0 <= index < len(self._sentinel_nodes):
            raise IndexError(
                f"sentinel index must be in [0, {len(self._sentinel_nodes)}), got {index}"
            )
        return self._sentinel_nodes[index]

    # -- waiting --

    def wait_for_master_change(self, old: _Address, timeout: float = 30.0) -> _Address:
        """Wait until every running Sentinel names the same master, other than ``old``.

        The new master must also say so itself (``ROLE`` is ``master``).

        Args:
            old: The master's address before the change.
            timeout: Seconds to wait.

        Returns:
            The new master's address.

        Raises:
            TimeoutError: If the Sentinels have not agreed on a new master in time.
        """
        self._require_started()
        old = (old[0], int(old[1]))

        def changed() -> _Address | None:
            answers = set(self._sentinel_answers())
            if len(answers) != 1:
                return None
            new = answers.pop()
            if new is None or new == old or _role(new, self._password) != "master":
                return None
            return new

        return _wait_until(changed, timeout=timeout, what=f"a master other than {old}")

    def _replicas_in_sync_with(self, master: _Address) -> Callable[[], bool | None]:
        """A check that every running data node other than ``master`` replicates it, caught up
        with the master's offset as it was at the first check."""
        target: list[int] = []

        def check() -> bool | None:
            role = _call(master, self._password, "ROLE")
            if role[0] != "master":
                return None
            if not target:
                target.append(int(role[1]))
            for server in self._data:
                if not server.running or server.address == master:
                    continue
                info = _info(server.address, self._password, "INFO", "replication")
                if (
                    info.get("role") != "slave"
                    or (info.get("master_host"), info.get("master_port"))
                    != (master[0], str(master[1]))
                    or info.get("master_link_status") != "up"
                    or int(info.get("slave_repl_offset", "-1")) < target[0]
                ):
                    return None
            return True

        return check

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Wait until every running data node other than the master replicates it and has
        caught up with the master's replication offset as it was when the wait began.

        Args:
            timeout: Seconds to wait.

        Raises:
            TimeoutError: If a replica is not in sync in time (a paused node never is).
        """
        master = self.master
        _wait_until(
            self._replicas_in_sync_with(master),
            timeout=timeout,
            what=f"every replica to be in sync with {master}",
        )

    def _replicas_seen_by_sentinels(self, master: _Address) -> Callable[[], bool]:
        """A check that every running Sentinel sees every other running data node as a
        replica of ``master`` with its link up."""
        expected = {n.address for n in self._data if n.running and n.address != master}

        def check() -> bool:
            for server in self._sentinel_nodes:
                if not server.running:
                    continue
                replies = _call(
                    server.address,
                    self._sentinel_password,
                    *("SENTINEL", "REPLICAS", self._service_name),
                )
                seen = set()
                for reply in replies:
                    fields = _pairs(reply)
                    if fields.get("flags") == "slave" and fields.get("master-link-status") == "ok":
                        seen.add((fields["ip"], int(fields["port"])))
                if not expected <= seen:
                    return False
            return True

        return check

    # -- faults --

    def failover(self, timeout: float = 30.0) -> _Address:
        """Force a failover with ``SENTINEL FAILOVER`` and wait until it is done.

        Done means every running Sentinel names the new master and the new master's ``ROLE``
        is ``master``. The old master keeps running; Sentinel converts it into a replica of the
        new one a few seconds later (poll its ``ROLE``, or call :meth:`wait_replicas_synced`).

        First it waits (for at most half the time left) for the topology to settle: replicas in
        sync, and every Sentinel seeing them as replicas. A failover asked for right after
        another can pick a node that a Sentinel which missed the last change then turns back,
        and Sentinel aborts it (``-failover-abort-slave-timeout``). If a failover is aborted
        anyway, it settles and asks again, until ``timeout``.

        Args:
            timeout: Seconds to wait, for the topology to settle, for a Sentinel to accept the
                command (it refuses while another failover is in progress or no replica is
                fit) and for the switch.

        Returns:
            The new master's address.

        Raises:
            TimeoutError: If the failover does not complete in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            old = self.master
            # Best effort, within half the time left: a paused or lagging node never settles,
            # and Sentinel can still fail over without it.
            settle_by = time.monotonic() + max(deadline - time.monotonic(), 0.2) / 2
            with contextlib.suppress(TimeoutError):
                _wait_until(
                    self._replicas_in_sync_with(old),
                    timeout=max(settle_by - time.monotonic(), 0.1),
                    what=f"every replica to be in sync with {old} before the failover",
                )
                _wait_until(
                    self._replicas_seen_by_sentinels(old),
                    timeout=max(settle_by - time.monotonic(), 0.1),
                    what="every Sentinel to see the replicas as replicas before the failover",
                )
            self._ask_failover(deadline)
            # A failover that has not switched in 10 s was aborted: Sentinel's own limit for
            # the promotion with the kit's timers is a few seconds.
            attempt = min(10.0, max(deadline - time.monotonic(), 0.1))
            try:
                return self.wait_for_master_change(old, attempt)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def _ask_failover(self, deadline: float) -> None:
        """Send ``SENTINEL FAILOVER`` to the first running Sentinel that accepts it."""

        def ask() -> bool:
            error: redis.RedisError | None = None
            for server in self._sentinel_nodes:
                if server.running:
                    try:
                        _call(
                            server.address,
                            self._sentinel_password,
                            *("SENTINEL", "FAILOVER", self._service_name),
                        )
                    except redis.ResponseError as exc:  # INPROG, NOGOODSLAVE
                        error = exc
                        continue
                    return True
            if error is not None:
                raise error
            raise RuntimeError("no Sentinel is running")

        _wait_until(
            ask,
            timeout=max(deadline - time.monotonic(), 0.1),
            what="a Sentinel to accept SENTINEL FAILOVER",
            interval=0.2,
        )

    def kill_master(self) -> _Address:
        """SIGKILL the current master (as the Sentinels report it).

        The Sentinels promote a replica after ``down_after_ms`` plus a second or two; use
        :meth:`wait_for_master_change` to wait for it and :meth:`restart_node` to bring the
        killed node back.

        Returns:
            The killed master's address.

        Raises:
            RuntimeError: If the reported master is not running (already killed).
        """
        address = self.master
        with self._lock:
            node = self._node(address)
            if not node.running:
                raise RuntimeError(f"the master {address} is not running")
            node.kill()
        return address

    def kill_node(self, address: _Address) -> None:
        """SIGKILL one data node (master or replica).

        Args:
            address: The node's ``(host, port)``.

        Raises:
            ValueError: If the address is not a data node of this kit.
        """
        self._require_started()
        with self._lock:
            self._node(address).kill()

    def restart_node(
        self, address: _Address, *, as_replica: bool = True, timeout: float = 30.0
    ) -> None:
        """Start a killed data node again on the same port with its last config.

        Args:
            address: The node's ``(host, port)``.
            as_replica: Start it as a replica of the current master (what an operator does,
                and quick). With False it starts as whatever its config says, so a killed
                master comes back believing it is the master until Sentinel converts it,
                which takes a few seconds: the stale-master scenario.
            timeout: Seconds to wait for it to answer and, with ``as_replica``, to sync.

        Raises:
            ValueError: If the address is not a data node of this kit.
            RuntimeError: If the node is running.
            TimeoutError: If it is not up (and in sync) in time.
        """
        self._require_started()
        with self._lock:
            node = self._node(address)
            if node.running:
                raise RuntimeError(f"{node.address} is running; kill it first")
            master = self.master if as_replica else None
            replicate = master is not None and master != node.address
            extra = ["--replicaof", master[0], str(master[1])] if replicate and master else []
            node.spawn(extra)
        node.wait_ready(self._password, timeout)
        if replicate and master is not None:
            _wait_until(
                self._replicas_in_sync_with(master),
                timeout=timeout,
                what=f"{node.address} to sync with {master}",
            )

    def pause_master(self, seconds: float | None = None) -> _Address:
        """Freeze the master with SIGSTOP: its port stays open but nothing answers.

        A pause longer than ``down_after_ms`` makes the Sentinels fail over; when it resumes,
        the old master believes it is the master until Sentinel converts it.

        Args:
            seconds: Resume automatically after this many seconds (in a timer thread); None
                waits for :meth:`resume_master`.

        Returns:
            The paused master's address.

        Raises:
            RuntimeError: If a node is already paused.
        """
        address = self.master
        with self._lock:
            if any(n.paused for n in self._data):
                raise RuntimeError("a node is already paused; resume_master() first")
            node = self._node(address)
            node.send(signal.SIGSTOP)
            node.paused = True
            if seconds is not None:
                self._resume_timer = threading.Timer(seconds, self.resume_master)
                self._resume_timer.daemon = True
                self._resume_timer.start()
        return address

    def resume_master(self) -> None:
        """Wake the node frozen by :meth:`pause_master` (SIGCONT). Does nothing if none is."""
        with self._lock:
            if self._resume_timer is not None:
                self._resume_timer.cancel()
                self._resume_timer = None
            for node in self._data:
                if node.paused:
                    node.send(signal.SIGCONT)
                    node.paused = False

    def stop_sentinel(self, index: int) -> None:
        """Shut one Sentinel down (SIGTERM); :meth:`start_sentinel` brings it back.

        Args:
            index: Its position in :attr:`sentinels`.
        """
        with self._lock:
            self._sentinel(index).terminate()

    def start_sentinel(self, index: int, timeout: float = 30.0) -> None:
        """Start a stopped Sentinel again on the same port, and wait until it sees the master.

        It keeps what it knew when it stopped (Sentinels rewrite their config file) and learns
        about any failover since from its peers.

        Args:
            index: Its position in :attr:`sentinels`.
            timeout: Seconds to wait.

        Raises:
            RuntimeError: If it is running already.
            TimeoutError: If it does not come up in time.
        """
        with self._lock:
            server = self._sentinel(index)
            if server.running:
                raise RuntimeError(f"{server.name} is running")
            server.spawn()
        server.wait_ready(self._sentinel_password, timeout)
        self._tune_sentinel(server)

        def connected() -> bool:
            master = _pairs(
                _call(
                    server.address,
                    self._sentinel_password,
                    "SENTINEL",
                    "MASTER",
                    self._service_name,
                )
            )
            return "disconnected" not in master.get("flags", "disconnected")

        _wait_until(connected, timeout=timeout, what=f"{server.name} to reach the master")


# -- Cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ClusterEntry:
    """One line of CLUSTER NODES."""

    node_id: str
    address: _Address
    flags: frozenset[str]
    master_id: str
    slots: tuple[str, ...]

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    @classmethod
    def parse(cls, line: str) -> _ClusterEntry:
        fields = line.split()
        host_port = fields[1].split(",")[0].split("@")[0]
        host, _, port = host_port.rpartition(":")
        return cls(
            node_id=fields[0],
            address=(host, int(port)),
            flags=frozenset(fields[2].split(",")),
            master_id=fields[3],
            slots=tuple(fields[8:]),
        )


class LocalRedisCluster(_Topology):
    """A real Redis Cluster (3 masters, one replica each, by default) on loopback.

    The nodes run ``redis-server`` with ``cluster-enabled yes`` on free ``127.0.0.1`` ports
    (each with its bus port, port + 10000, free too), without persistence, in a temporary
    folder; the cluster is created with ``redis-cli --cluster create``. ``cluster-node-timeout``
    is short, so a killed master is replaced within about two seconds::

        with LocalRedisCluster() as kit:
            client = redis.asyncio.RedisCluster(startup_nodes=kit.startup_nodes)
            master = kit.masters()[0]
            kit.failover(master)             # its replica takes over, it becomes the replica

    Args:
        num_masters: How many masters share the 16384 slots (at least 3).
        replicas_per_master: Replicas per master.
        password: Password of every node (``requirepass``/``masterauth``), or None.
        node_timeout_ms: ``cluster-node-timeout``: how long a silent node takes to be
            considered failing.
        start_timeout: Seconds to wait for the cluster to come up.
        redis_server: Path of ``redis-server``; found on PATH (or /usr/bin, /usr/local/bin) when
            None.
        redis_cli: Path of ``redis-cli``, found the same way.

    Raises:
        ValueError: If a count or duration is out of range.
    """

    _prefix = "veritas-redis-cluster-"

    def __init__(
        self,
        *,
        num_masters: int = 3,
        replicas_per_master: int = 1,
        password: str | None = None,
        node_timeout_ms: int = 1000,
        start_timeout: float = 60.0,
        redis_server: str | None = None,
        redis_cli: str | None = None,
    ) -> None:
        super().__init__(start_timeout)
        if num_masters < 3:
            raise ValueError(
                f"num_masters must be >= 3 (a Redis Cluster minimum), got {num_masters!r}"
            )
        if replicas_per_master < 0:
            raise ValueError(f"replicas_per_master must be >= 0, got {replicas_per_master!r}")
        if node_timeout_ms < 100:
            raise ValueError(f"node_timeout_ms must be >= 100, got {node_timeout_ms!r}")
        self._num_masters = num_masters
        self._replicas_per_master = replicas_per_master
        self._password = password
        self._node_timeout_ms = node_timeout_ms
        self._redis_server = redis_server
        self._redis_cli = redis_cli
        self._cluster_nodes: list[_Server] = []

    def __repr__(self) -> str:
        state = "started" if self._folder is not None else "stopped"
        return f"<LocalRedisCluster {state}, {len(self._cluster_nodes)} nodes>"

    # -- lifecycle --

    def __enter__(self) -> LocalRedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the nodes, create the cluster, and wait until it is fully up.

        Fully up means ``cluster_state:ok`` on every node, all nodes agreeing on which masters
        own slots, and every replica's link to its master up.

        Raises:
            RuntimeError: If ``redis-server`` or ``redis-cli`` is missing, the kit is already
                started, or a server or ``redis-cli --cluster create`` fails (with its output).
                Whatever was started is stopped.
            TimeoutError: If the cluster is not up within ``start_timeout``.
        """
        with self._lock:
            if self._folder is not None:
                raise RuntimeError("LocalRedisCluster is already started")
            binary = _find_binary("redis-server", self._redis_server)
            cli = _find_binary("redis-cli", self._redis_cli)
            folder = self._make_folder()
            try:
                count = self._num_masters * (1 + self._replicas_per_master)
                for index in range(count):
                    name = f"node-{index}"

                    def make(port: int, name: str = name) -> _Server:
                        server = _Server(binary, name, folder / name, port, sentinel=False)
                        server.write_config(self._config(server))
                        return server

                    self._cluster_nodes.append(
                        _start_with_port_retry(
                            make, self._password, self._start_timeout, _free_cluster_port
                        )
                    )
                self._create(cli)
                self._wait_healthy(self._start_timeout, "the cluster to come up")
            except BaseException:
                self.stop()
                raise

    def _config(self, server: _Server) -> list[str]:
        lines = [
            f"port {server.port}",
            f"bind {_HOST}",
            "protected-mode no",
            "daemonize no",
            f"dir {_quote(str(server.folder))}",
            'save ""',
            "appendonly no",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self._node_timeout_ms}",
            f"cluster-announce-ip {_HOST}",
            # A replica may take over however long it was cut off from its master, and replicas
            # never migrate between masters on their own: tests get a topology they can predict.
            "cluster-replica-validity-factor 0",
            "cluster-allow-replica-migration no",
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
            "replica-serve-stale-data yes",
            "enable-debug-command local",
        ]
        if self._password is not None:
            lines += [
                f"requirepass {_quote(self._password)}",
                f"masterauth {_quote(self._password)}",
            ]
        return lines

    def _create(self, cli: str) -> None:
        argv = [cli, "--cluster", "create"]
        argv += [f"{host}:{port}" for host, port in self.nodes]
        argv += ["--cluster-replicas", str(self._replicas_per_master), "--cluster-yes"]
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self._password is not None:
            env["REDISCLI_AUTH"] = self._password  # not on the command line, where ps shows it
        try:
            result = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self._start_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"redis-cli --cluster create did not finish in {exc.timeout:g} s"
            ) from exc
        if result.returncode != 0 or "[OK] All 16384 slots covered" not in result.stdout:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise RuntimeError(
                f"redis-cli --cluster create failed (exit code {result.returncode}):\n{output}"
            )

    def _servers(self) -> list[_Server]:
        return list(self._cluster_nodes)

    def _forget_servers(self) -> None:
        self._cluster_nodes = []

    # -- what the topology looks like --

    @property
    def password(self) -> str | None:
        """The nodes' password, or None."""
        return self._password

    @property
    def nodes(self) -> list[_Address]:
        """Every node's ``(host, port)``, killed ones included, in a fixed order."""
        return [n.address for n in self._cluster_nodes]

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        """A new list of ``redis.asyncio.cluster.ClusterNode``, one per node, for
        ``RedisCluster(startup_nodes=..., password=kit.password)``."""
        return [ClusterNode(host, port) for host, port in self.nodes]

    def _view(self) -> list[_ClusterEntry]:
        """CLUSTER NODES as the first running node that answers sees it."""
        self._require_started()
        error: Exception | None = None
        for server in self._cluster_nodes:
            if server.running:
                try:
                    return self._view_of(server.address)
                except redis.RedisError as exc:
                    error = exc
        raise RuntimeError(
            f"no running cluster node answered CLUSTER NODES (last error: {error!r})"
        )

    def _view_of(self, address: _Address) -> list[_ClusterEntry]:
        text = str(_call(address, self._password, "CLUSTER", "NODES"))
        return [_ClusterEntry.parse(line) for line in text.splitlines() if line.strip()]

    def masters(self) -> list[_Address]:
        """The masters that own slots and are not failing, ordered by their first slot.

        Returns:
            Their addresses, as a running node sees the cluster now.
        """
        owners = [e for e in self._view() if "master" in e.flags and e.slots and not e.failed]

        def first_slot(entry: _ClusterEntry) -> int:
            return int(entry.slots[0].split("-")[0].lstrip("["))

        return [e.address for e in sorted(owners, key=first_slot)]

    def replicas_of(self, master: _Address) -> list[_Address]:
        """The replicas of ``master`` that are not failing.

        Args:
            master: The master's ``(host, port)``.

        Raises:
            ValueError: If no node has that address.
        """
        view = self._view()
        entry = self._entry(view, master)
        return [
            e.address
            for e in view
            if "slave" in e.flags and e.master_id == entry.node_id and not e.failed
        ]

    @staticmethod
    def _entry(view: list[_ClusterEntry], address: _Address) -> _ClusterEntry:
        address = (address[0], int(address[1]))
        for entry in view:
            if entry.address == address:
                return entry
        raise ValueError(f"{address!r} is not a node of this cluster")

    def _server(self, address: _Address) -> _Server:
        for server in self._cluster_nodes:
            if server.address == (address[0], int(address[1])):
                return server
        raise ValueError(f"{address!r} is not a node of this cluster")

    def _healthy(self) -> bool | None:
        """Whether every running node says ``cluster_state:ok``, sees every running node as
        healthy, agrees with the others on which masters own slots, and (for replicas) has its
        link to its master up."""
        owner_sets: set[frozenset[_Address]] = set()
        running = [s for s in self._cluster_nodes if s.running]
        for server in running:
            if (
                _info(server.address, self._password, "CLUSTER", "INFO").get("cluster_state")
                != "ok"
            ):
                return None
            view = self._view_of(server.address)
            by_address = {e.address: e for e in view}
            for other in running:
                entry = by_address.get(other.address)
                if entry is None or entry.failed:
                    return None
            owner_sets.add(
                frozenset(
                    e.address for e in view if "master" in e.flags and e.slots and not e.failed
                )
            )
            if "slave" in by_address[server.address].flags:
                replication = _info(server.address, self._password, "INFO", "replication")
                if replication.get("master_link_status") != "up":
                    return None
        return len(owner_sets) == 1 or None

    def _wait_healthy(self, timeout: float, what: str) -> None:
        _wait_until(self._healthy, timeout=timeout, what=what, interval=0.1)

    # -- faults --

    def failover(self, node: _Address, timeout: float = 30.0) -> _Address:
        """Swap a master with one of its replicas using ``CLUSTER FAILOVER`` on the replica.

        Waits until the replica reports ``ROLE`` master, the old master reports ``ROLE`` slave,
        and the whole cluster is healthy again.

        Args:
            node: A master (one of its healthy replicas takes over) or a replica (it takes over
                from its master).
            timeout: Seconds to wait.

        Returns:
            The new master's address.

        Raises:
            ValueError: If ``node`` is not a node of the cluster, or a master without a healthy
                replica.
            TimeoutError: If the swap does not complete in time.
        """
        view = self._view()
        entry = self._entry(view, node)
        if "master" in entry.flags:
            replicas = [
                e
                for e in view
                if "slave" in e.flags and e.master_id == entry.node_id and not e.failed
            ]
            if not replicas:
                raise ValueError(f"master {entry.address} has no healthy replica to fail over to")
            replica, master = replicas[0], entry
        else:
            replica, master = entry, next(e for e in view if e.node_id == entry.master_id)
        _call(replica.address, self._password, "CLUSTER", "FAILOVER")

        def swapped() -> bool | None:
            if _role(replica.address, self._password) != "master":
                return None
            if self._server(master.address).running:
                if _role(master.address, self._password) != "slave":
                    return None
                # Gossip takes a moment: wait until every running node sees the old master as
                # the new master's replica, so masters() and replicas_of() agree at once.
                for server in self._cluster_nodes:
                    if not server.running:
                        continue
                    seen = self._entry(self._view_of(server.address), master.address)
                    if "slave" not in seen.flags or seen.master_id != replica.node_id:
                        return None
            return self._healthy()

        _wait_until(
            swapped,
            timeout=timeout,
            what=f"{replica.address} to take over from {master.address}",
            interval=0.1,
        )
        return replica.address

    def kill(self, node: _Address, *, wait: bool = True, timeout: float = 30.0) -> _Address | None:
        """SIGKILL one node.

        Args:
            node: The node's ``(host, port)``.
            wait: For a master, wait until one of its replicas has been promoted and the cluster
                is healthy again (about ``node_timeout_ms`` plus one or two seconds); for a
                replica, until the cluster is healthy without it. A master without replicas is
                not waited for: its slots stay uncovered until :meth:`restart`.
            timeout: Seconds to wait.

        Returns:
            The replica that took over a killed master, if ``wait`` and there was one; else None.

        Raises:
            ValueError: If ``node`` is not a node of the cluster.
            TimeoutError: If the cluster is not healthy again in time.
        """
        view = self._view()
        entry = self._entry(view, node)
        replicas = {e.address for e in view if "slave" in e.flags and e.master_id == entry.node_id}
        was_master = "master" in entry.flags and bool(entry.slots)
        with self._lock:
            self._server(node).kill()
        if not wait or (was_master and not replicas):
            return None  # a master without replicas leaves its slots uncovered until restart()
        if not was_master:
            self._wait_healthy(timeout, f"the cluster to be healthy without {entry.address}")
            return None

        def promoted() -> _Address | None:
            if not self._healthy():
                return None
            winners = replicas.intersection(self.masters())
            return winners.pop() if winners else None

        return _wait_until(
            promoted,
            timeout=timeout,
            what=f"a replica of {entry.address} to be promoted",
            interval=0.1,
        )

    def restart(self, node: _Address, timeout: float = 30.0) -> None:
        """Start a killed node again on the same port, keeping its cluster identity.

        A former master finds its slots taken over and rejoins as a replica of the node that
        took them. Waits until the cluster is healthy with the node in it.

        Args:
            node: The node's ``(host, port)``.
            timeout: Seconds to wait.

        Raises:
            ValueError: If ``node`` is not a node of the cluster.
            RuntimeError: If the node is running.
            TimeoutError: If the cluster is not healthy in time.
        """
        self._require_started()
        with self._lock:
            server = self._server(node)
            if server.running:
                raise RuntimeError(f"{server.address} is running; kill it first")
            server.spawn()
        server.wait_ready(self._password, timeout)
        self._wait_healthy(timeout, f"the cluster to be healthy with {server.address} back")
