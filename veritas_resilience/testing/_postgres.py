"""A real PostgreSQL primary with streaming standbys on loopback, for tests and failover drills.

:class:`LocalPostgresCluster` runs the server binaries of an installed PostgreSQL (13 or newer; 15
is what the project tests with) in a temporary folder, on free ports of ``127.0.0.1``, and tears
everything down again. It then plays the parts that a failover client must survive::

    with LocalPostgresCluster(standbys=1) as cluster:
        old, new = cluster.primary, cluster.standbys[0]
        cluster.kill_primary()                 # crash, as pg_ctl stop -m immediate
        cluster.promote(new)                   # new primary on timeline 2
        cluster.restart_as_primary(old)        # split brain: two primaries, timelines 1 and 2
        cluster.rewind_as_standby(old)         # pg_rewind: the old primary follows the new one

The methods are synchronous and serialised by a lock, so async tests can run them in a worker
thread while their own event loop keeps going: ``await anyio.to_thread.run_sync(cluster.promote,
node)``.

Running as root: ``initdb`` and ``postgres`` refuse to run as root, so every server binary runs as
an unprivileged system user (``postgres`` by default) and the temporary folder belongs to it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from ._ports import free_port

__all__ = [
    "LocalPostgresCluster",
    "PostgresClusterFactory",
    "PostgresNode",
    "PostgresQueryError",
]

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
Role = Literal["primary", "standby"]
SettingValue = str | int | float | bool

_REQUIRED_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "pg_rewind", "postgres")
_MIN_MAJOR = 13  # pg_rewind -R and wal_keep_size
_INSTALL_HINT = (
    "Install the PostgreSQL server binaries (on Debian/Ubuntu: "
    "`apt-get install -y postgresql-15`), or pass bindir= / set VERITAS_PG_BINDIR to the folder "
    "that holds initdb and pg_ctl."
)
_BINDIR_ENV = "VERITAS_PG_BINDIR"
_SQLSTATE = re.compile(r"\b(?:ERROR|FATAL|PANIC):\s+([0-9A-Z]{5}):")
# A duration as PostgreSQL reads a time setting: a number, then an optional unit (none: the
# setting's own unit, milliseconds for recovery_min_apply_delay).
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|min|h|d)?\s*")
_MS_PER_UNIT = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def _default_settings(host: str) -> dict[str, SettingValue]:
    # Tuned for speed on a test machine, but with the durability semantics of a real one:
    # synchronous_commit stays on (with fsync off it costs nothing, and turning it off would
    # make replicas lag by wal_writer_delay).
    return {
        "listen_addresses": host,
        "unix_socket_directories": "",  # TCP only: no socket path length limits, no clashes
        "fsync": False,
        "synchronous_commit": True,
        "full_page_writes": True,  # pg_rewind needs it
        "wal_log_hints": True,  # pg_rewind needs it (or data checksums)
        "wal_level": "replica",
        "wal_keep_size": "256MB",  # lets a rewound node stream from the fork point
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "hot_standby": True,
        "shared_buffers": "32MB",
        "max_connections": 100,
        "checkpoint_timeout": "30min",
        "wal_receiver_status_interval": "1s",
        "wal_retrieve_retry_interval": "200ms",
        "jit": False,
        "log_min_messages": "warning",
    }


def _duration_ms(value: SettingValue) -> int:
    """Milliseconds of a duration such as ``"500ms"``, rounded as PostgreSQL rounds it."""
    match = _DURATION.fullmatch(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise ValueError(f"delay must be a duration such as '500ms' or '2s', got {value!r}")
    number, unit = match.groups()
    return round(float(number) * _MS_PER_UNIT.get(unit, 1))


def _format_setting(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


class PostgresClusterFactory(Protocol):
    """The type of the ``pg_cluster_factory`` fixture, for annotating tests."""

    def __call__(self, standbys: int = 1, **kwargs: Any) -> LocalPostgresCluster:
        """Start and return a cluster; ``kwargs`` go to :class:`LocalPostgresCluster`."""
        ...


class PostgresQueryError(RuntimeError):
    """A statement run by :meth:`LocalPostgresCluster.query` failed.

    Attributes:
        node: The name of the node the statement ran on.
        sqlstate: The five-character SQLSTATE (``"25006"`` for a write on a standby), or ``None``
            when the server could not be reached at all.
        message: What ``psql`` printed on its standard error.
    """

    def __init__(self, node: str, sqlstate: str | None, message: str) -> None:
        super().__init__(f"query on {node} failed ({sqlstate or 'no SQLSTATE'}): {message}")
        self.node = node
        self.sqlstate = sqlstate
        self.message = message


class PostgresNode:
    """One server of a :class:`LocalPostgresCluster`.

    Nodes are created by the cluster; tests read them and pass them back to the cluster's methods.

    Attributes:
        name: A stable name (``n1``, ``n2``, ...). It is also the node's ``application_name`` in
            ``primary_conninfo``, which is what ``synchronous_standby_names`` refers to.
        host: The loopback address the node listens on.
        port: The node's TCP port; it never changes, across restarts, promotion and rewind.
        data_dir: The node's data directory.
        log_path: The server log (written by ``pg_ctl -l``, outside the data directory).
        role: What the kit last made of the node: ``"primary"`` or ``"standby"``. After a crash
            it keeps its last role; check :attr:`is_running`.
        upstream: The node a standby streams from, ``None`` for a primary.
    """

    def __init__(self, name: str, host: str, port: int, data_dir: Path, log_path: Path) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.role: Role = "primary"
        self.upstream: PostgresNode | None = None

    @property
    def dsn(self) -> str:
        """A libpq/asyncpg URL: user ``postgres``, database ``postgres``, no password."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """The same connection as :attr:`dsn`, in libpq ``key=value`` form."""
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the node runs, else ``None``."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if _process_alive(pid) else None

    @property
    def is_running(self) -> bool:
        """Whether the node's postmaster process is alive."""
        return self.pid is not None

    def __repr__(self) -> str:
        return f"<PostgresNode {self.name} {self.role} {self.host}:{self.port}>"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    # A killed process whose parent never reaps it (PID 1 in some containers) stays a zombie.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # pragma: no cover - no /proc
        return True
    return fields[0] not in ("Z", "X")


def find_postgres_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """Find the folder that holds the PostgreSQL server binaries.

    Looks at ``bindir``, then ``$VERITAS_PG_BINDIR``, then ``pg_config --bindir``, then
    ``/usr/lib/postgresql/*/bin`` (highest version first), then ``PATH``.

    Raises:
        RuntimeError: If no folder holds ``initdb``, ``pg_ctl``, ``pg_basebackup``, ``pg_rewind``
            and ``postgres``; the message says how to install them.
    """
    explicit = bindir if bindir is not None else os.environ.get(_BINDIR_ENV)
    if explicit:
        path = Path(explicit)
        missing = [t for t in _REQUIRED_TOOLS if not (path / t).is_file()]
        if missing:
            raise RuntimeError(
                f"PostgreSQL binaries not found in {path} (missing: {', '.join(missing)}). "
                + _INSTALL_HINT
            )
        return path
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version_key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for path in candidates:
        if all((path / t).is_file() for t in _REQUIRED_TOOLS):
            return path
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup, pg_rewind, postgres) were "
        "not found via pg_config, /usr/lib/postgresql/*/bin or PATH. " + _INSTALL_HINT
    )


_live_clusters: weakref.WeakSet[LocalPostgresCluster] = weakref.WeakSet()
# initdb output, keyed by (bindir, server uid/gid, parent folder): initdb is the slowest step of
# a start, and copying its result is ten times faster.
_templates: dict[tuple[str, tuple[int, int] | None, str], Path] = {}
_templates_lock = threading.Lock()


@atexit.register
def _clean_up_at_exit() -> None:  # pragma: no cover - only on interpreter exit
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.stop()
    for template in _templates.values():
        shutil.rmtree(template.parent, ignore_errors=True)


class LocalPostgresCluster:
    """A PostgreSQL primary and ``standbys`` streaming standbys, on loopback, in a temp folder.

    ``start()`` (or ``with``) copies a data directory made by ``initdb`` (once per process) for
    every node, makes all but the first standbys of it (``standby.signal`` and
    ``primary_conninfo``, as ``pg_basebackup -R`` would), starts them on free ports of ``host``
    and waits until every standby streams. ``stop()`` kills every server and deletes the
    folder; it also runs at interpreter exit for a cluster that was never stopped. The
    machine's own PostgreSQL is never touched.

    Ports are given on the ``pg_ctl`` command line, never in a config file: ``pg_rewind`` copies
    the source's config files, ``postgresql.auto.conf`` included, onto the target. For the same
    reason the kit rewrites ``primary_conninfo`` and ``recovery_min_apply_delay`` in a node's
    ``postgresql.auto.conf`` itself whenever it makes the node a standby.

    Example::

        with LocalPostgresCluster() as cluster:
            cluster.query(cluster.primary, "CREATE TABLE t (x int)")
            cluster.wait_replayed(cluster.standbys[0])

    Args:
        standbys: How many streaming standbys to start (0 or more).
        synchronous: Make replication synchronous: the primary waits for ``ANY 1`` of the other
            nodes before a commit returns. Needs at least one standby. The setting follows the
            data directories, so a promoted standby is synchronous too and, with no other standby
            streaming, its commits wait (as a real one's would).
        host: The loopback address to listen on.
        settings: ``postgresql.conf`` settings that override or add to the kit's fast defaults
            (``fsync=off``, ``wal_log_hints=on``, ``wal_keep_size=256MB``, ``shared_buffers=32MB``,
            ``max_connections=100``, ...). Strings are quoted for you; bools become on/off.
        bindir: Folder of the PostgreSQL binaries; found automatically when omitted (see
            :func:`find_postgres_bindir`).
        base_dir: Where to create the temporary folder (default: the system temp folder). When
            running as root, the server user must be able to traverse every parent of it. The
            first cluster also leaves an ``initdb`` template there (``veritas-pg-template-*``),
            which later clusters copy and which is deleted when the interpreter exits.
        server_user: The OS user the servers run as when the kit runs as root (default
            ``postgres``). Ignored otherwise: the servers run as the current user.
        timeout: Seconds to wait for any one step (start, promotion, streaming, ...).

    Raises:
        ValueError: If ``standbys`` is negative, or ``synchronous`` is set without a standby.
    """

    def __init__(
        self,
        standbys: int = 1,
        *,
        synchronous: bool = False,
        host: str = "127.0.0.1",
        settings: Mapping[str, SettingValue] | None = None,
        bindir: str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        server_user: str = "postgres",
        timeout: float = 30.0,
    ) -> None:
        if standbys < 0:
            raise ValueError(f"standbys must be >= 0, got {standbys!r}")
        if synchronous and standbys == 0:
            raise ValueError("synchronous=True needs at least one standby (standbys >= 1)")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.host = host
        self.timeout = timeout
        self._standby_count = standbys
        self._synchronous = synchronous
        self._settings = dict(settings or {})
        self._bindir_arg = bindir
        self._base_dir_arg = base_dir
        self._server_user = server_user
        self._lock = threading.RLock()
        self._nodes: list[PostgresNode] = []
        self._primary: PostgresNode | None = None
        self._apply_delay: dict[str, str] = {}
        self._base: Path | None = None
        self._bindir: Path | None = None
        self._uid_gid: tuple[int, int] | None = None
        self._started = False
        self.server_version: int | None = None
        """The server's major version (e.g. 15), known once started."""

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path | None:
        """The temporary folder holding every node's data and log, while the cluster exists."""
        return self._base

    def start(self) -> LocalPostgresCluster:
        """Create and start the primary and the standbys; a no-op when already started.

        Returns:
            The cluster itself.

        Raises:
            RuntimeError: If PostgreSQL is not installed, the server user is missing, or a
                server fails to start. Everything started so far is stopped and deleted first.
        """
        with self._lock:
            if self._started:
                return self
            try:
                self._start()
            except BaseException:
                self.stop()
                raise
            self._started = True
            _live_clusters.add(self)
            return self

    def _start(self) -> None:
        self._bindir = find_postgres_bindir(self._bindir_arg)
        self.server_version = self._major_version()
        self._uid_gid = self._resolve_server_user()
        parent = Path(self._base_dir_arg) if self._base_dir_arg else Path(tempfile.gettempdir())
        self._base = Path(tempfile.mkdtemp(prefix="veritas-pg-", dir=parent))
        self._check_traversable(self._base)
        self._chown(self._base)
        names = [f"n{i}" for i in range(1, self._standby_count + 2)]
        self._nodes = [
            PostgresNode(
                name, self.host, free_port(self.host), self._base / name, self._base / f"{name}.log"
            )
            for name in names
        ]
        primary = self._nodes[0]
        template = self._template(parent)
        settings = _default_settings(self.host)
        if self._synchronous:
            settings["synchronous_standby_names"] = f"ANY 1 ({', '.join(names)})"
        settings.update(self._settings)
        conf = "".join(f"{k} = {_format_setting(v)}\n" for k, v in settings.items())

        # Every node starts as a copy of the same never-started data directory: for the
        # standbys that is a cold base backup of the primary, without pg_basebackup's checkpoint
        # and WAL streaming. The copies run in parallel (they are most of the start time).
        def prepare(node: PostgresNode) -> None:
            self._copy_data_dir(template, node.data_dir)
            with (node.data_dir / "postgresql.conf").open("a") as f:
                f.write("\n# veritas-resilience testing kit\n" + conf)
            if node is not primary:
                self._make_standby(node, primary)

        with ThreadPoolExecutor(len(self._nodes)) as pool:
            list(pool.map(prepare, self._nodes))
            self._pg_ctl_start(primary)
            self._primary = primary
            list(pool.map(self._pg_ctl_start, self._nodes[1:]))
        for node in self._nodes[1:]:
            self.wait_streaming(node)

    def _template(self, parent: Path) -> Path:
        """A data directory fresh from ``initdb``, made once per process and copied per cluster."""
        assert self._bindir is not None
        key = (str(self._bindir), self._uid_gid, str(parent))
        with _templates_lock:
            template = _templates.get(key)
            if template is not None and (template / "PG_VERSION").is_file():
                return template
            holder = Path(tempfile.mkdtemp(prefix="veritas-pg-template-", dir=parent))
            try:
                self._chown(holder)
                template = holder / "data"
                self._run_server_tool(
                    "initdb", "-D", str(template), "-U", "postgres", "--auth=trust", "--no-sync",
                    "--no-instructions", "-E", "UTF8", "--locale=C",
                )  # fmt: skip
            except BaseException:
                shutil.rmtree(holder, ignore_errors=True)
                raise
            _templates[key] = template
            return template

    def _copy_data_dir(self, source: Path, target: Path) -> None:
        shutil.copytree(source, target, symlinks=True)
        if self._uid_gid is not None:
            for root, dirs, files in os.walk(target):
                os.chown(root, *self._uid_gid)
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), *self._uid_gid)

    def stop(self) -> None:
        """Kill every server (``-m immediate``) and delete the temporary folder.

        Safe to call more than once, and after a failed :meth:`start`. No server process is left
        running: one that does not stop within 10 s is killed with SIGKILL.
        """
        with self._lock:
            # Signal them all first, then wait: the servers shut down in parallel.
            pids = [(node, node.pid) for node in self._nodes]
            for _, pid in pids:
                if pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGQUIT)
            for node, pid in pids:
                if pid is not None:
                    self._wait_exit(node, pid, timeout=10.0)
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self._started = False
            self._primary = None
            _live_clusters.discard(self)

    def __enter__(self) -> LocalPostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LocalPostgresCluster nodes={self._nodes!r} primary={self._primary!r}>"

    # -- topology ------------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[PostgresNode, ...]:
        """Every node, in creation order (``n1`` was the first primary)."""
        return tuple(self._nodes)

    @property
    def primary(self) -> PostgresNode:
        """The node the kit takes for the primary: the first one, or the last one promoted.

        It stays the primary after :meth:`kill_primary` (until a promotion) and after
        :meth:`restart_as_primary` of another node (that one is the stale side of a split brain).

        Raises:
            RuntimeError: If the cluster is not started.
        """
        if self._primary is None:
            raise RuntimeError("the cluster is not started")
        return self._primary

    @property
    def standbys(self) -> tuple[PostgresNode, ...]:
        """The nodes the kit last made standbys, in creation order."""
        return tuple(n for n in self._nodes if n.role == "standby")

    @property
    def dsn(self) -> str:
        """A multi-host URL listing every node in creation order (asyncpg and libpq accept it)."""
        hosts = ",".join(f"{n.host}:{n.port}" for n in self._nodes)
        return f"postgresql://postgres@{hosts}/postgres"

    def node(self, name: str) -> PostgresNode:
        """Return the node called ``name``.

        Raises:
            KeyError: If there is no such node.
        """
        for n in self._nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- faults and operations -----------------------------------------------------------------

    def kill_primary(self) -> PostgresNode:
        """Crash the current primary (SIGQUIT, as ``pg_ctl stop -m immediate``) and return it.

        The kit still takes it for the primary until :meth:`promote` names another one.
        """
        with self._lock:
            node = self.primary
            self.stop_node(node, mode="immediate")
            return node

    def stop_node(self, node: PostgresNode, mode: StopMode = "fast", *, wait: bool = True) -> None:
        """Stop one node the way ``pg_ctl stop -m mode`` does.

        Args:
            node: The node to stop.
            mode: ``"smart"`` (wait for sessions to end; new connections get 57P03), ``"fast"``
                (clean shutdown, sessions get 57P01) or ``"immediate"`` (crash, no checkpoint).
            wait: Wait until the server has stopped. Use ``False`` with ``"smart"`` to leave a
                node shutting down while a test holds a session open.

        Raises:
            RuntimeError: If the server does not stop within the timeout.
        """
        with self._lock:
            pid = node.pid
            if pid is None:
                return
            # What pg_ctl stop sends, without its 100 ms polling.
            os.kill(pid, _STOP_SIGNALS[mode])
            if wait and not self._wait_exit(node, pid, self.timeout, kill=False):
                raise RuntimeError(
                    f"{node.name} did not stop ({mode}) within {self.timeout} s\n"
                    f"--- {node.name} log (tail) ---\n{self._log_tail(node)}"
                )

    def start_node(self, node: PostgresNode) -> None:
        """Start a stopped node as it is: a standby if it has ``standby.signal``, else a primary.

        Raises:
            RuntimeError: If the server does not start within the timeout.
        """
        with self._lock:
            if not node.is_running:
                self._pg_ctl_start(node)

    def promote(self, node: PostgresNode) -> None:
        """Promote a standby and make it the kit's primary.

        Runs ``pg_ctl promote``, waits until ``pg_is_in_recovery()`` is false, then runs a
        ``CHECKPOINT`` so that ``pg_control_checkpoint().timeline_id`` shows the new timeline at
        once and ``pg_rewind`` can use the node as a source. A ``recovery_min_apply_delay`` set by
        :meth:`set_apply_delay` is removed (a primary has no use for it, and nodes cloned or
        rewound from this one would inherit it).

        Other standbys keep following the old primary; see :meth:`follow`.

        Raises:
            RuntimeError: If the node is not a running standby or promotion times out.
        """
        with self._lock:
            if not self.is_in_recovery(node):
                raise RuntimeError(f"{node.name} is not a standby; cannot promote it")
            self._pg_ctl(node, "-W", "promote")  # then poll faster than pg_ctl's 100 ms
            self._wait(lambda: not self.is_in_recovery(node), f"{node.name} to leave recovery")
            self.query(node, "CHECKPOINT")
            if self._apply_delay.pop(node.name, None) is not None:
                self.query(node, "ALTER SYSTEM RESET recovery_min_apply_delay")
                self._reload(node)
            node.role, node.upstream = "primary", None
            self._primary = node

    def follow(self, node: PostgresNode, source: PostgresNode | None = None) -> None:
        """Point a running standby at another primary (``primary_conninfo`` + reload).

        This is enough after a promotion when the standby has not replayed past the point where
        the new primary's timeline forked; otherwise use :meth:`rewind_as_standby`.

        Args:
            node: A running standby.
            source: Its new upstream; the kit's current primary when omitted.

        Raises:
            RuntimeError: If the standby does not stream from ``source`` within the timeout.
        """
        with self._lock:
            source = source or self.primary
            conninfo = self._primary_conninfo(node, source)
            self.query(node, f"ALTER SYSTEM SET primary_conninfo = {_format_setting(conninfo)}")
            self._reload(node)
            node.upstream = source
            self.wait_streaming(node)

    def rewind_as_standby(self, node: PostgresNode, source: PostgresNode | None = None) -> None:
        """Turn a node (typically an old, crashed primary) into a standby of ``source``.

        Stops the node if it runs, runs ``pg_rewind -R`` against ``source`` (which also recovers
        a crashed target first), rewrites its replication settings (see below), starts it and
        waits until it streams.

        ``pg_rewind`` copies the source's ``postgresql.auto.conf`` onto the target, so an
        ``ALTER SYSTEM`` made on the node itself is lost and the source's ones are inherited. The
        kit therefore writes ``primary_conninfo`` (with the node's own ``application_name``) and
        the node's own :meth:`set_apply_delay` value back after the rewind; other ``ALTER
        SYSTEM`` settings come from the source.

        Args:
            node: The node to rewind.
            source: The primary to follow; the kit's current primary when omitted.

        Raises:
            RuntimeError: If ``pg_rewind`` fails (for instance when the source no longer holds
                the WAL from the fork point; :meth:`rebuild_as_standby` always works) or the node
                does not stream within the timeout.
        """
        with self._lock:
            source = source or self.primary
            if source is node:
                raise ValueError("a node cannot be rewound onto itself")
            if node.is_running:
                self.stop_node(node, mode="fast")
            self.query(source, "CHECKPOINT")  # pg_rewind reads the source's timeline from it
            self._run_server_tool(
                "pg_rewind",
                f"--target-pgdata={node.data_dir}",
                f"--source-server={self._primary_conninfo(node, source)} dbname=postgres",
                "--write-recovery-conf",
                "--no-sync",
            )
            self._make_standby(node, source)
            self._pg_ctl_start(node)
            self.wait_streaming(node)

    def rebuild_as_standby(self, node: PostgresNode, source: PostgresNode | None = None) -> None:
        """Throw a node's data away and clone it afresh from ``source`` with ``pg_basebackup``.

        Slower than :meth:`rewind_as_standby` but works whatever state the node is in.

        Args:
            node: The node to rebuild.
            source: The primary to clone and follow; the kit's current primary when omitted.

        Raises:
            RuntimeError: If the clone fails or the node does not stream within the timeout.
        """
        with self._lock:
            source = source or self.primary
            if source is node:
                raise ValueError("a node cannot be rebuilt from itself")
            if node.is_running:
                self.stop_node(node, mode="immediate")
            shutil.rmtree(node.data_dir)
            self._basebackup(node, source)
            self._pg_ctl_start(node)
            self.wait_streaming(node)

    def restart_as_primary(self, node: PostgresNode) -> None:
        """Start a node as a primary on its own timeline: the split-brain case.

        Removes ``standby.signal`` (an old primary has none anyway) and starts the node, which
        recovers from its crash and accepts writes next to the real primary. The kit's
        :attr:`primary` does not change.

        Raises:
            RuntimeError: If the node does not come up as a primary within the timeout.
        """
        with self._lock:
            if node.is_running:
                self.stop_node(node, mode="fast")
            for signal_file in ("standby.signal", "recovery.signal"):
                (node.data_dir / signal_file).unlink(missing_ok=True)
            self._pg_ctl_start(node)
            self._wait(lambda: not self.is_in_recovery(node), f"{node.name} to run as a primary")
            node.role, node.upstream = "primary", None

    def set_apply_delay(
        self, node: PostgresNode, delay: str | None, *, timeout: float | None = None
    ) -> None:
        """Make a standby replay commits late (``recovery_min_apply_delay``), to create lag.

        Applied with ``ALTER SYSTEM`` and a reload, so the node keeps streaming. Returns once the
        standby runs with the new value: a commit made on the primary after this returns is
        replayed with the new delay. The kit remembers the value: :meth:`rewind_as_standby`
        writes it back after ``pg_rewind`` has replaced the node's ``postgresql.auto.conf``, and
        :meth:`promote` drops it.

        Args:
            node: A running standby.
            delay: A PostgreSQL duration such as ``"500ms"`` or ``"2s"`` (no unit: milliseconds);
                ``None`` or ``"0"`` removes it.
            timeout: Seconds to wait for the standby to take the new value (default: the
                cluster's ``timeout``).

        Raises:
            ValueError: If ``delay`` is not a duration.
            TimeoutError: If the standby has not reloaded its configuration within ``timeout``
                (the message shows the end of its log).
            RuntimeError: If it reloaded but runs with another value (the message says which).
        """
        with self._lock:
            if delay is None or delay.strip() in ("", "0"):
                # Without the kit's value, the one of postgresql.conf applies again.
                expected = _duration_ms(self._settings.get("recovery_min_apply_delay", 0))
                self._apply_delay.pop(node.name, None)
                self.query(node, "ALTER SYSTEM RESET recovery_min_apply_delay")
            else:
                expected = _duration_ms(delay)
                self._apply_delay[node.name] = delay
                self.query(
                    node, f"ALTER SYSTEM SET recovery_min_apply_delay = {_format_setting(delay)}"
                )
            self._reload(node, timeout)
            actual = self.query(
                node, "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
            )
            if actual != str(expected):
                raise RuntimeError(
                    f"{node.name} reloaded its configuration but runs with "
                    f"recovery_min_apply_delay = {actual} ms, not {expected} ms"
                )

    def alter_system(self, node: PostgresNode, setting: str, value: SettingValue | None) -> None:
        """Change a setting with ``ALTER SYSTEM`` and reload (``None`` resets it).

        For example ``alter_system(primary, "default_transaction_read_only", True)`` gives a
        read-only primary. Returns once the node has reloaded its configuration, so new sessions
        see the new value. Settings that need a restart take effect at the next start.

        Raises:
            ValueError: If ``setting`` is not a plain identifier.
            TimeoutError: If the node does not reload its configuration within the timeout.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", setting):
            raise ValueError(f"setting must be a configuration parameter name, got {setting!r}")
        if value is None:
            self.query(node, f"ALTER SYSTEM RESET {setting}")
        else:
            self.query(node, f"ALTER SYSTEM SET {setting} = {_format_setting(value)}")
        self._reload(node)

    # -- inspection and waiting ----------------------------------------------------------------

    def query(self, node: PostgresNode, sql: str) -> str:
        """Run SQL on a node with ``psql -XAt`` and return what it prints, without the last newline.

        Rows come one per line with columns separated by ``|``; booleans are ``t``/``f``. With
        several statements, only the last one's result is returned.

        Raises:
            PostgresQueryError: If a statement fails or the node cannot be reached; it carries
                the SQLSTATE (``"25006"`` for a write on a standby).
        """
        if self._bindir is None:
            raise RuntimeError("the cluster is not started")
        psql = self._bindir / "psql"
        cmd = [
            str(psql if psql.is_file() else shutil.which("psql") or "psql"),
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-d",
            node.conninfo + " connect_timeout=5 application_name=veritas-testing-kit",
            "-c",
            sql,
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=self.timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            match = _SQLSTATE.search(proc.stderr)
            raise PostgresQueryError(node.name, match and match.group(1), proc.stderr.strip())
        return proc.stdout.removesuffix("\n")

    def is_in_recovery(self, node: PostgresNode) -> bool:
        """Return ``pg_is_in_recovery()`` of a running node (true for a standby)."""
        return self.query(node, "SELECT pg_is_in_recovery()") == "t"

    def timeline(self, node: PostgresNode) -> int:
        """Return the timeline a running node is on.

        On a primary this is read from its current WAL file name, which is exact even before the
        first checkpoint after a promotion; on a standby it is the timeline it receives.
        """
        out = self.query(
            node,
            "SELECT CASE WHEN pg_is_in_recovery() THEN coalesce("
            "(SELECT received_tli FROM pg_stat_wal_receiver),"
            " (SELECT timeline_id FROM pg_control_checkpoint()))"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
        )
        return int(out)

    def wait_streaming(self, node: PostgresNode, timeout: float | None = None) -> None:
        """Wait until a standby streams from its upstream.

        Both sides must agree: the standby's ``pg_stat_wal_receiver.status`` is ``streaming`` and
        the upstream lists the node's ``application_name`` in ``pg_stat_replication`` with state
        ``streaming`` (so a synchronous standby can acknowledge commits).

        Raises:
            RuntimeError: If the node is not a standby the kit knows of.
            TimeoutError: If it does not stream within ``timeout`` (default: the cluster's).
        """
        upstream = node.upstream
        if upstream is None:
            raise RuntimeError(f"{node.name} is not a standby")

        def streaming() -> bool:
            try:
                receiver = self.query(node, "SELECT status FROM pg_stat_wal_receiver")
                if receiver != "streaming":
                    return False
                sender = self.query(
                    upstream,
                    f"SELECT state FROM pg_stat_replication WHERE application_name = '{node.name}'",
                )
            except PostgresQueryError:
                return False
            return "streaming" in sender.splitlines()

        self._wait(streaming, f"{node.name} to stream from {upstream.name}", timeout)

    def wait_replayed(self, node: PostgresNode, timeout: float | None = None) -> None:
        """Wait until a standby has replayed everything its upstream has flushed so far.

        The target is the upstream's ``pg_current_wal_flush_lsn()`` when called, which covers
        every transaction committed before the call (the kit keeps ``synchronous_commit`` on).
        With :meth:`set_apply_delay`, this waits for the delay too.

        Raises:
            RuntimeError: If the node is not a standby the kit knows of.
            TimeoutError: If the standby does not catch up within ``timeout``.
        """
        upstream = node.upstream
        if upstream is None:
            raise RuntimeError(f"{node.name} is not a standby")
        target = self.query(upstream, "SELECT pg_current_wal_flush_lsn()")

        def replayed() -> bool:
            try:
                done = self.query(node, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
            except PostgresQueryError:
                return False
            return done == "t"

        self._wait(replayed, f"{node.name} to replay up to {target}", timeout)

    # -- internals -----------------------------------------------------------------------------

    def _reload(self, node: PostgresNode, timeout: float | None = None) -> None:
        """``pg_reload_conf()``, then wait until the node runs with its new configuration.

        ``pg_reload_conf()`` only signals the postmaster and returns. The postmaster re-reads the
        files, stamps ``pg_conf_load_time()`` and passes the signal on to its children in one go,
        never while it starts a session. So once a new session reports a later load time, every
        new session sees the new values, and the other processes have been signalled: the
        startup process of a standby takes the new values before it replays its next record.
        """
        before = self.query(node, "SELECT pg_conf_load_time()")
        self.query(node, "SELECT pg_reload_conf()")
        check = f"SELECT pg_conf_load_time() > '{before}'::timestamptz"
        limit = self.timeout if timeout is None else timeout
        what = f"{node.name} to reload its configuration after pg_reload_conf()"
        try:
            self._wait(lambda: self.query(node, check) == "t", what, limit)
        except TimeoutError as exc:
            # A configuration file that does not parse is not loaded at all; the log says why.
            raise TimeoutError(
                f"{exc} ({limit:g} s)\n--- {node.name} log (tail) ---\n{self._log_tail(node)}"
            ) from None

    def _wait_exit(self, node: PostgresNode, pid: int, timeout: float, kill: bool = True) -> bool:
        """Wait until the postmaster ``pid`` has exited; SIGKILL it on timeout if ``kill``."""
        deadline = time.monotonic() + timeout
        while _process_alive(pid):
            if time.monotonic() >= deadline:
                if not kill:
                    return False
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                kill = False
            time.sleep(0.005)
        # A postmaster killed with SIGKILL leaves its pid file (and may leave children, which
        # exit on their own when they notice it is gone).
        with contextlib.suppress(OSError):
            first = (node.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            if first.strip() == str(pid):
                (node.data_dir / "postmaster.pid").unlink()
        return True

    def _wait(self, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.01
        while not done():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _primary_conninfo(self, node: PostgresNode, source: PostgresNode) -> str:
        return f"host={source.host} port={source.port} user=postgres application_name={node.name}"

    def _basebackup(self, node: PostgresNode, source: PostgresNode) -> None:
        self._run_server_tool(
            "pg_basebackup",
            "-d",
            self._primary_conninfo(node, source),
            "-D",
            str(node.data_dir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        self._make_standby(node, source)

    def _make_standby(self, node: PostgresNode, source: PostgresNode) -> None:
        # pg_basebackup -R and pg_rewind -R append to postgresql.auto.conf, which holds whatever
        # the source had (including its own old primary_conninfo and apply delay): replace the
        # replication lines with this node's own.
        auto = node.data_dir / "postgresql.auto.conf"
        drop = ("primary_conninfo", "primary_slot_name", "recovery_min_apply_delay")
        lines = [
            line
            for line in (auto.read_text().splitlines() if auto.exists() else [])
            if line.split("=", 1)[0].strip() not in drop
        ]
        lines.append(f"primary_conninfo = {_format_setting(self._primary_conninfo(node, source))}")
        delay = self._apply_delay.get(node.name)
        if delay is not None:
            lines.append(f"recovery_min_apply_delay = {_format_setting(delay)}")
        self._write(auto, "\n".join(lines) + "\n")
        self._write(node.data_dir / "standby.signal", "")
        node.role, node.upstream = "standby", source

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self._chown(path)
        path.chmod(0o600)

    def _pg_ctl_start(self, node: PostgresNode) -> None:
        # The port goes on the command line only (see the class docstring).
        self._pg_ctl(
            node, "-l", str(node.log_path), "-o", f"-p {node.port}", "-w", "-t",
            str(int(self.timeout)), "start",
        )  # fmt: skip

    def _pg_ctl(self, node: PostgresNode, *args: str, check: bool = True) -> None:
        try:
            self._run_server_tool("pg_ctl", "-D", str(node.data_dir), *args, check=check)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}\n--- {node.name} log (tail) ---\n{self._log_tail(node)}"
            ) from None

    def _log_tail(self, node: PostgresNode, lines: int = 20) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _run_server_tool(self, tool: str, *args: str, check: bool = True) -> None:
        assert self._bindir is not None, "the cluster is not started"
        assert self._base is not None, "the cluster is not started"
        cmd = [str(self._bindir / tool), *args]
        env = self._env()
        env["HOME"] = str(self._base)
        uid, gid = self._uid_gid or (None, None)
        try:
            proc = subprocess.run(
                cmd,
                user=uid,
                group=gid,
                extra_groups=None if uid is None else [],
                capture_output=True,
                text=True,
                env=env,
                cwd=self._base,
                timeout=self.timeout + 30,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{tool} timed out: {' '.join(cmd)}") from exc
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{tool} failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
                f"{proc.stdout}{proc.stderr}".rstrip()
            )

    def _env(self) -> dict[str, str]:
        # PG* variables (PGHOST, PGPORT, PGSERVICE, PGTARGETSESSIONATTRS, ...) would redirect
        # or alter the kit's own connections.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _major_version(self) -> int:
        assert self._bindir is not None
        out = subprocess.run(
            [str(self._bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        match = re.search(r"\)\s*(\d+)", out)
        major = int(match.group(1)) if match else 0
        if major < _MIN_MAJOR:
            raise RuntimeError(
                f"PostgreSQL {_MIN_MAJOR} or newer is needed, found {out.strip()!r} in "
                f"{self._bindir}. " + _INSTALL_HINT
            )
        return major

    def _resolve_server_user(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self._server_user)
        except KeyError:
            raise RuntimeError(
                f"running as root, but the user {self._server_user!r} that the PostgreSQL "
                "servers must run as (initdb and postgres refuse root) does not exist. Install "
                "PostgreSQL (`apt-get install -y postgresql-15` creates 'postgres'), or create "
                f"the user: `useradd --system --user-group --no-create-home {self._server_user}`."
            ) from None
        if entry.pw_uid == 0:
            raise RuntimeError(f"server_user {self._server_user!r} must not be root")
        return entry.pw_uid, entry.pw_gid

    def _chown(self, path: Path) -> None:
        if self._uid_gid is not None:
            os.chown(path, *self._uid_gid)

    def _check_traversable(self, base: Path) -> None:
        if self._uid_gid is None:
            return
        for parent in base.parents:
            st = parent.stat()
            if not st.st_mode & stat.S_IXOTH and st.st_uid != self._uid_gid[0]:
                raise RuntimeError(
                    f"the server user {self._server_user!r} cannot enter {parent}; pass "
                    "base_dir= (or set TMPDIR) to a folder every user can traverse, like /tmp"
                )
