"""Where the master is: Sentinel discovery from events and polls, confirmed by ROLE, fenced by
generations.

One :class:`SentinelTopology` serves every client of a service (the master client and its replica
siblings). It learns the master from two sources:

- **events**: a dedicated connection per Sentinel (all of them by default, so at least two)
  pattern-subscribes to every Sentinel event; any event about the service triggers a lookup, and
  so does every (re)subscription, because events sent while it was down are lost. A subscription
  that stops answering PINGs counts as lost.
- **polls**: a lookup every ``poll_interval`` seconds, every ``degraded_poll_interval`` seconds
  while degraded (no master, a lost subscription, a Sentinel down, a recent failure).

A lookup asks every Sentinel at once, in one round trip each, for ``GET-MASTER-ADDR-BY-NAME``,
``SENTINEL MASTER`` (for the config epoch), ``SENTINEL REPLICAS`` and ``SENTINEL SENTINELS``. The
answer with the highest config epoch wins: a Sentinel that restarted with an old configuration, or
missed the failover, carries an older epoch and is outvoted however loud it is (redis#12798). The
candidate is then asked ``ROLE`` directly, and accepted only if it says ``master``. Only one lookup
runs at a time; every task that wants one shares it.

Accepting a different master bumps the **generation**. Connections remember the generation they
were opened under; pools close idle connections of older generations at once, in-use ones when
they are released, and a connection refuses to send on an older generation (so nothing goes to
the old master after the switch is seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import _hooks
from .._clock import MONOTONIC, Clock
from .._redact import redact
from ..events import Hook
from ..instrumentation.prometheus import HistogramValue, cumulative_buckets
from ._compat import DirectSendConnection, async_timeout
from ._errors import (
    NoMasterError,
    NoReplicaError,
    NoSentinelAvailableError,
    NotASentinelError,
    RedisAuthenticationError,
    RedisConfigurationError,
    UnknownServiceError,
)
from ._events import (
    RedisMasterLost,
    RedisMasterSwitched,
    RedisReplicasChanged,
    RedisSentinelDisagreement,
    RedisSentinelStateChanged,
)

__all__ = [
    "Address",
    "Election",
    "Fence",
    "SentinelAnswer",
    "SentinelTopology",
    "choose_master",
    "elect_master",
    "failover_leader",
    "fmt",
]

Address: TypeAlias = "tuple[str, int]"
Role: TypeAlias = 'Literal["master", "replica"]'

OUTAGE_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LOOKUP_RESULTS = ("ok", "no_sentinel", "unknown_service", "no_master")
_SWITCH_SOURCES = (
    "initial",
    "event",
    "poll",
    "readonly",
    "connection_error",
    "role_check",
    "manual",
)
# Below this interval a lookup asked for by a failing connection reuses the last result instead:
# a thousand tasks failing at once make one lookup, not a thousand.
_MIN_LOOKUP_GAP = 0.1
# How long writes wait for a failover that a Sentinel announced, if that Sentinel then stops
# answering: past this the master it was failing over is trusted again (if ROLE says master).
_FAILOVER_HOLD = 10.0
_REPLICA_CHECK = 1.0
# How long aclose() waits for its background tasks to end; each is cancelled again every
# _CLOSE_STEP seconds meanwhile (a cancellation swallowed by a driver's wait_for is repeated).
_CLOSE_WAIT = 2.0
_CLOSE_STEP = 0.05


def fmt(address: Address | None) -> str | None:
    """``host:port`` of an address (None stays None)."""
    return None if address is None else f"{address[0]}:{address[1]}"


def parse_address(value: Any, field: str) -> Address:
    """Accept ``("host", port)`` or ``"host:port"``; raise ValueError naming ``field``."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"{field} must hold ('host', port) pairs or 'host:port', got {value!r}"
            )
        value = (host, int(port))
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not isinstance(value[0], str)
        or not value[0]
        or isinstance(value[1], bool)
        or not isinstance(value[1], int)
        or not 0 < value[1] < 65536
    ):
        raise ValueError(f"{field} must hold ('host', port) pairs or 'host:port', got {value!r}")
    return (value[0], int(value[1]))


class Fence:
    """A generation counter shared by a topology and the connections it fences."""

    __slots__ = ("gen",)

    def __init__(self) -> None:
        self.gen = 0

    def __repr__(self) -> str:
        return f"Fence(gen={self.gen})"


@dataclass(frozen=True, slots=True)
class SentinelAnswer:
    """What one Sentinel said in one lookup.

    Attributes:
        sentinel: Who answered.
        master: Its ``GET-MASTER-ADDR-BY-NAME`` reply, or None when it does not know the name.
        epoch: The ``config-epoch`` of its ``SENTINEL MASTER`` reply (-1 when absent).
        flags: The master's flags as it sees them (``master``, ``s_down``, ``o_down``...).
        replicas: ``(address, flags, master-link-status)`` of each replica it knows.
        sentinels: The other Sentinels it knows.
        record: The address in its ``SENTINEL MASTER`` record. During a failover it stays the old
            master's until the new one is confirmed, while ``GET-MASTER-ADDR-BY-NAME`` already
            names the promoted replica.
    """

    sentinel: Address
    master: Address | None
    epoch: int = -1
    flags: frozenset[str] = frozenset()
    replicas: tuple[tuple[Address, frozenset[str], str], ...] = ()
    sentinels: tuple[Address, ...] = ()
    record: Address | None = None


@dataclass(frozen=True, slots=True)
class Election:
    """Which masters the Sentinels' answers support (see :func:`elect_master`).

    Attributes:
        candidates: ``(address, epoch)`` of every master backed by a quorum, best first.
        disagreeing: ``(sentinel, the master it names)`` for each answer naming a master that no
            quorum backs, while another one is backed: a Sentinel that monitors something else
            under the same name. Empty when nothing is backed (then it is a lack of quorum).
        named: Whether any answer names a master at all.
    """

    candidates: tuple[tuple[Address, int], ...]
    disagreeing: tuple[tuple[Address, Address], ...]
    named: bool


def elect_master(
    answers: Sequence[SentinelAnswer],
    current: Address | None = None,
    *,
    voters: Collection[Address] | None = None,
    quorum: int = 1,
) -> Election:
    """Rank the masters the Sentinels name, keeping only those a quorum of ``voters`` backs.

    A voter backs an address when it names it as the master or knows it as one of the
    service's replicas: right after a failover the leader names the promoted replica while the
    others still name the old master but know the new one as its replica, so a real switch is
    backed at once, while the master of another deployment under the same service name is not
    known to any of them. Among the backed masters the highest config epoch wins (an epoch only
    grows through an elected failover, so a stale Sentinel cannot outvote the newest
    configuration), then the most Sentinels naming it, then ``current``.

    Args:
        answers: What each Sentinel said.
        current: The master in use now.
        voters: The Sentinels whose answers count (the configured ones); None: every answer.
        quorum: Voters that must back a master.
    """
    known = [a for a in answers if a.master is not None]
    voting = [a for a in known if voters is None or a.sentinel in voters]

    def backing(address: Address) -> int:
        return sum(
            1 for a in voting if a.master == address or any(r[0] == address for r in a.replicas)
        )

    ranked: list[tuple[int, int, bool, Address]] = []
    for address in {a.master for a in known if a.master is not None}:
        if backing(address) < quorum:
            continue
        namers = [a for a in known if a.master == address]
        ranked.append((-max(a.epoch for a in namers), -len(namers), address != current, address))
    ranked.sort()
    backed = {r[3] for r in ranked}
    disagreeing: tuple[tuple[Address, Address], ...] = ()
    if backed:
        disagreeing = tuple(
            sorted(
                (a.sentinel, a.master)
                for a in known
                if a.master is not None and a.master not in backed
            )
        )
    return Election(
        candidates=tuple((r[3], -r[0]) for r in ranked),
        disagreeing=disagreeing,
        named=bool(known),
    )


def choose_master(
    answers: Sequence[SentinelAnswer], current: Address | None = None
) -> tuple[Address, int] | None:
    """Pick the master the Sentinels name: highest config epoch first, then most votes.

    :func:`elect_master` with every answer counting and a quorum of one.

    Returns:
        ``(address, epoch)``, or None when no answer names a master.
    """
    election = elect_master(answers, current)
    return election.candidates[0] if election.candidates else None


def failover_leader(answers: Sequence[SentinelAnswer], candidate: Address) -> Address | None:
    """The Sentinel failing ``candidate`` over without having promoted a replica yet, if any.

    The leader of a failover flags the master ``failover_in_progress`` before it sends
    ``REPLICAOF NO ONE`` to the chosen replica; once it sees the promotion, its
    ``GET-MASTER-ADDR-BY-NAME`` names the new master. In between, a write to ``candidate`` is
    acknowledged and then lost when it is demoted, so the client holds writes instead.
    """
    for a in answers:
        if "failover_in_progress" in a.flags and a.master == candidate and a.record == candidate:
            return a.sentinel
    return None


def healthy_replicas(answers: Sequence[SentinelAnswer], master: Address | None) -> list[Address]:
    """Replicas the most up-to-date Sentinel sees as up with their link to the master ``ok``."""
    known = [a for a in answers if a.master is not None]
    if not known:
        return []
    best = max(a.epoch for a in known)
    source = max((a for a in known if a.epoch == best), key=lambda a: len(a.replicas))
    out: list[Address] = []
    for address, flags, link in source.replicas:
        if address == master or link != "ok":
            continue
        if flags & {"s_down", "o_down", "disconnected", "master"}:
            continue
        out.append(address)
    return sorted(set(out))


def _pairs(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _addr(fields: Mapping[str, str]) -> Address | None:
    try:
        return (fields["ip"], int(fields["port"]))
    except (KeyError, ValueError):
        return None


def parse_answer(sentinel: Address, replies: Sequence[Any]) -> SentinelAnswer:
    """Build a :class:`SentinelAnswer` from the four raw pipeline replies."""
    addr_reply, master_reply, replicas_reply, sentinels_reply = replies
    if isinstance(addr_reply, Exception):
        raise addr_reply
    master = None
    if addr_reply:
        master = (str(addr_reply[0]), int(addr_reply[1]))
    epoch, flags, record = -1, frozenset[str](), None
    if master is not None and not isinstance(master_reply, Exception) and master_reply:
        fields = _pairs(master_reply)
        with contextlib.suppress(ValueError):
            epoch = int(fields.get("config-epoch", "-1"))
        flags = frozenset(fields.get("flags", "").split(","))
        record = _addr(fields)
    replicas: list[tuple[Address, frozenset[str], str]] = []
    if not isinstance(replicas_reply, Exception) and replicas_reply:
        for item in replicas_reply:
            fields = _pairs(item)
            address = _addr(fields)
            if address is not None:
                replicas.append(
                    (
                        address,
                        frozenset(fields.get("flags", "").split(",")),
                        fields.get("master-link-status", ""),
                    )
                )
    sentinels: list[Address] = []
    if not isinstance(sentinels_reply, Exception) and sentinels_reply:
        for item in sentinels_reply:
            address = _addr(_pairs(item))
            if address is not None:
                sentinels.append(address)
    return SentinelAnswer(sentinel, master, epoch, flags, tuple(replicas), tuple(sentinels), record)


def describe(exc: BaseException) -> str:
    """A short, password-free description of an error: its type and redacted message."""
    text = redact(str(exc)).strip()
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _SentinelNode:
    __slots__ = ("address", "client", "error", "events", "subscribed", "task", "up")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.client: redis.asyncio.Redis | None = None
        self.events: DirectSendConnection | None = None
        self.up: bool | None = None
        self.error: str | None = None
        self.subscribed = False
        self.task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class TopologySnapshot:
    """The topology at one instant (for health and tests)."""

    master: Address | None
    generation: int
    replica_generation: int
    replicas: tuple[Address, ...]
    sentinels: tuple[Address, ...]
    sentinels_up: int
    subscriptions_up: int
    degraded: bool
    unwritable_for: float
    last_switch_source: str | None
    last_error: str | None
    switches: dict[str, int]
    disagreeing: tuple[tuple[Address, Address], ...] = ()


class SentinelTopology(_hooks.Instrumented):
    """Tracks the master and replicas of one Sentinel service (internal; see SentinelRedis).

    Args are those of :class:`~veritas_resilience.redis.SentinelRedis` of the same names.
    """

    def __init__(
        self,
        sentinels: Sequence[Address],
        service_name: str,
        *,
        name: str,
        sentinel_kwargs: Mapping[str, Any],
        node_kwargs: Mapping[str, Any],
        sentinel_timeout: float,
        poll_interval: float,
        degraded_poll_interval: float,
        subscribe: bool,
        discover_sentinels: bool,
        ping_interval: float,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
        rng: random.Random | None = None,
        address_remap: Callable[[Address], Address | str] | None = None,
    ) -> None:
        self._name = name
        self.service = service_name
        self._remap = address_remap
        self._seeds = list(dict.fromkeys(sentinels))
        # Only the configured Sentinels vote, and a master needs a majority of them: a
        # discovered or misconfigured one can report, not decide.
        self._voters = frozenset(self._seeds)
        self.quorum = len(self._seeds) // 2 + 1
        rng = rng or random.Random()
        self._rng = rng
        order = list(self._seeds)
        rng.shuffle(order)  # spread the clients of many processes over the Sentinels
        self._nodes: dict[Address, _SentinelNode] = {a: _SentinelNode(a) for a in order}
        self._sentinel_kwargs = dict(sentinel_kwargs)
        self._node_kwargs = dict(node_kwargs)
        self._timeout = sentinel_timeout
        self._poll = poll_interval
        self._fast_poll = degraded_poll_interval
        self._subscribe = subscribe
        self._discover = discover_sentinels
        self._ping_interval = ping_interval
        self._clock = clock
        self._now = clock.monotonic

        self.master: Address | None = None
        self.epoch = -1
        self.master_fence = Fence()
        self.replica_fence = Fence()
        self.replicas: tuple[Address, ...] = ()
        self._rr = itertools.count(rng.randrange(1 << 16))
        self._last_master: Address | None = None
        self._changed = asyncio.Event()
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._listeners: list[weakref.ReferenceType[Any]] = []
        self._replica_users = 0
        self._users = 0

        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lookup_task: asyncio.Task[None] | None = None
        self._again = False
        self._pending_source: str | None = None
        self._last_lookup_end = -math.inf
        self._last_error: BaseException | None = None
        self._suspect = False
        self._fast_until = -math.inf
        self._unwritable_since: float | None = None
        self._last_switch_source: str | None = None
        self._hold: tuple[Address, Address, float] | None = None
        self._disagreeing: tuple[tuple[Address, Address], ...] = ()
        self._disagreements = 0

        self._switches: dict[str, int] = dict.fromkeys(_SWITCH_SOURCES, 0)
        self._lookups: dict[str, int] = dict.fromkeys(_LOOKUP_RESULTS, 0)
        self._unwritable_total = 0.0
        self._outage_hist = [0] * (len(OUTAGE_BUCKETS) + 1)
        self._outage_sum = 0.0
        self._init_hooks(hooks)

    def dial_address(self, address: Address) -> Address:
        """Where to connect to the data node the Sentinels announce as ``address``.

        ``address`` itself, or what ``address_remap`` maps it to.

        Raises:
            ValueError: If ``address_remap`` returned something that is not an address.
        """
        if self._remap is None:
            return address
        return parse_address(self._remap(address), f"address_remap({fmt(address)})")

    # -- identity and hooks ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The client's name (metric label)."""
        return self._name

    def _on_hooks_changed(self) -> None:
        hooks = self._hookset
        self._w_switch = hooks.wants(RedisMasterSwitched)
        self._w_lost = hooks.wants(RedisMasterLost)
        self._w_sentinel = hooks.wants(RedisSentinelStateChanged)
        self._w_replicas = hooks.wants(RedisReplicasChanged)
        self._w_disagree = hooks.wants(RedisSentinelDisagreement)

    # -- users ----------------------------------------------------------------------------------

    def register_pool(self, pool: Any) -> None:
        """Let a pool hear of fence changes (held weakly)."""
        self._pools.add(pool)
        if pool.role == "replica":
            self._replica_users += 1

    def unregister_pool(self, pool: Any) -> None:
        """Forget a pool (its client was closed)."""
        if pool in self._pools:
            self._pools.discard(pool)
            if pool.role == "replica":
                self._replica_users -= 1

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (a bound method, held weakly) after every master switch."""
        self._listeners.append(weakref.WeakMethod(callback))

    def acquire(self) -> None:
        """One more client uses this topology."""
        self._users += 1

    async def release_user(self) -> None:
        """One client stopped using it; the last one closes it."""
        self._users -= 1
        if self._users <= 0:
            await self.aclose()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closing

    @property
    def started(self) -> bool:
        """Whether background discovery runs."""
        return self._started

    async def start(self) -> None:
        """Start the event subscriptions and the poll, and run the first lookup.

        The background tasks keep running even if the first lookup fails, so a client created
        while the Sentinels are down recovers by itself.

        Raises:
            NoSentinelAvailableError: No Sentinel answered the first lookup.
            UnknownServiceError: No Sentinel knows the service name.
            NoMasterError: The Sentinels name no usable master yet.
        """
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.started:  # another task started it while this one waited
                return
            self._closing = False
            self._spawn(self._poll_loop(), "poll")
            if self._subscribe:
                for node in self._nodes.values():
                    self._start_subscriber(node)
            self._started = True
        await self.refresh("initial")
        if self.master is None:
            raise self.no_master_error()

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"veritas-redis-{what}-{self._name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_subscriber(self, node: _SentinelNode) -> None:
        if node.task is None or node.task.done():
            node.task = self._spawn(self._subscribe_loop(node), f"events-{fmt(node.address)}")

    async def aclose(self) -> None:
        """Stop every background task and close the connections to the Sentinels.

        Returns within about two seconds whatever the tasks were doing: each is cancelled again
        until it ends (a driver's ``asyncio.wait_for`` can swallow one cancellation on Python
        3.11), the loops check :attr:`closing`, and a task still running after that is left to
        finish by itself (it stops at its next check).
        """
        self._closing = True
        self._started = False
        tasks = list(self._tasks)
        if self._lookup_task is not None:
            tasks.append(self._lookup_task)
        for node in self._nodes.values():
            conn = node.events
            if conn is not None and conn._writer is not None:
                conn._writer.transport.abort()  # the subscription's read ends now
        loop = asyncio.get_running_loop()
        until = loop.time() + _CLOSE_WAIT
        pending = {t for t in tasks if not t.done()}
        while pending and loop.time() < until:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_STEP)
        self._tasks.clear()
        self._lookup_task = None
        for node in self._nodes.values():
            node.task = None
            node.subscribed = False
            if node.client is not None:
                client, node.client = node.client, None
                with contextlib.suppress(Exception):
                    async with async_timeout(self._timeout):
                        await client.aclose()

    # -- what clients ask -----------------------------------------------------------------------

    @property
    def last_error(self) -> BaseException | None:
        """What the last lookup failed with (None when it succeeded)."""
        return self._last_error

    def no_master_error(self) -> NoMasterError:
        """The error that says why there is no master now (a copy for each caller)."""
        error = self._last_error
        if isinstance(
            error,
            (NoMasterError, NoSentinelAvailableError, UnknownServiceError, RedisConfigurationError),
        ):
            return error.clone()  # type: ignore[return-value]
        return NoMasterError(
            name=self._name, service=self.service, reason="no master confirmed yet"
        )

    async def master_address(self) -> tuple[Address, int]:
        """The current master and its generation, looking it up if none is known.

        Raises:
            NoMasterError: No confirmed master (a failover is under way).
            NoSentinelAvailableError: No master is known and no Sentinel answers.
            UnknownServiceError: No Sentinel knows the service.
        """
        master = self.master
        if master is not None:
            return master, self.master_fence.gen
        if not self._started:
            await self.start()
        elif (
            self._lookup_task is not None or self._now() - self._last_lookup_end >= _MIN_LOOKUP_GAP
        ):
            await self.refresh("connection_error")
        master = self.master
        if master is None:
            raise self.no_master_error()
        return master, self.master_fence.gen

    async def replica_address(self, fallback_to_master: bool) -> tuple[Address, int, Role]:
        """The next replica fit for reads (round robin), its replica generation and role.

        Args:
            fallback_to_master: Use the master when no replica is fit (replica-preferred).

        Raises:
            NoReplicaError: No replica is fit and ``fallback_to_master`` is false.
        """
        if not self._started:
            with contextlib.suppress(NoMasterError):
                await self.start()
        replicas = self.replicas
        if replicas:
            return replicas[next(self._rr) % len(replicas)], self.replica_fence.gen, "replica"
        if fallback_to_master:
            master, _ = await self.master_address()
            return master, self.replica_fence.gen, "master"
        raise NoReplicaError(name=self._name, service=self.service)

    def report_failure(self, source: str, *, master: bool = True) -> None:
        """A client saw a sign that the topology may have changed: look again, poll fast.

        Args:
            source: What it saw, as a switch source (``readonly``, ``connection_error``...).
            master: Whether it happened on the master (else on a replica).
        """
        self._fast_until = self._now() + 5.0
        if master:
            self._suspect = True
            if self._unwritable_since is None:
                self._unwritable_since = self._now()
        # A node that says it is not the master is proof enough to look at once; connection
        # errors come in storms, and one lookup per _MIN_LOOKUP_GAP serves them all.
        if (
            source != "connection_error"
            or self._lookup_task is not None
            or self._now() - self._last_lookup_end >= _MIN_LOOKUP_GAP
        ):
            self.request_refresh(source)

    def lookup_in_flight(self) -> asyncio.Task[None] | None:
        """The lookup running now, if any."""
        return self._lookup_task

    async def wait_changed(self, timeout: float) -> None:
        """Wait until the generation changes or ``timeout`` seconds pass."""
        if timeout <= 0:
            await asyncio.sleep(0)
            return
        event = self._changed
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    # -- lookups --------------------------------------------------------------------------------

    def request_refresh(self, source: str) -> asyncio.Task[None]:
        """Make sure a lookup starts after now; return the task running it (shared)."""
        if self._pending_source is None or self._pending_source == "poll":
            self._pending_source = source
        task = self._lookup_task
        if task is None or task.done():
            task = self._lookup_task = asyncio.ensure_future(self._lookup_loop())
            task.set_name(f"veritas-redis-lookup-{self._name}")
        else:
            self._again = True
        return task

    async def refresh(self, source: str = "manual") -> None:
        """Run a lookup (or join the one that will run next) and wait for it.

        Errors are not raised here: they are kept for :meth:`no_master_error` and health.
        """
        task = self.request_refresh(source)
        await asyncio.shield(task)

    async def _lookup_loop(self) -> None:
        try:
            while True:
                self._again = False
                source = self._pending_source or "poll"
                self._pending_source = None
                try:
                    await self._lookup(source)
                    self._last_error = None
                except (
                    NoMasterError,
                    NoSentinelAvailableError,
                    UnknownServiceError,
                    RedisConfigurationError,
                ) as exc:
                    self._last_error = exc
                finally:
                    self._last_lookup_end = self._now()
                if not self._again or self._closing:
                    return
        finally:
            if self._lookup_task is asyncio.current_task():
                self._lookup_task = None

    async def _ask(self, node: _SentinelNode) -> SentinelAnswer:
        client = node.client
        if client is None:
            client = node.client = redis.asyncio.Redis(
                host=node.address[0],
                port=node.address[1],
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
                max_connections=4,
                **self._sentinel_kwargs,
            )
            # Raw replies: parsed here, so the answer does not depend on redis-py's callbacks.
            client.response_callbacks.clear()
        pipe = client.pipeline(transaction=False)
        name = self.service
        pipe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        pipe.execute_command("SENTINEL", "MASTER", name)
        pipe.execute_command("SENTINEL", "REPLICAS", name)
        pipe.execute_command("SENTINEL", "SENTINELS", name)
        async with async_timeout(self._timeout * 2):
            replies = await pipe.execute(raise_on_error=False)
        return parse_answer(node.address, replies)

    async def _probe(self, address: Address, want: Role) -> str | None:
        """Ask ``address`` for ROLE; return None when it is fit for ``want``, else why not."""
        host, port = self.dial_address(address)
        client = redis.asyncio.Redis(
            host=host,
            port=port,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            **self._node_kwargs,
        )
        client.response_callbacks.clear()
        try:
            async with async_timeout(self._timeout * 2):
                reply = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
        except rex.AuthenticationError as exc:
            raise RedisAuthenticationError(
                name=self._name, role="data node", node=fmt(address) or "", detail=describe(exc)
            ) from exc
        except (rex.RedisError, OSError) as exc:
            return f"it does not answer ROLE ({describe(exc)})"
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        return role_problem(reply, want)

    async def _lookup(self, source: str) -> None:
        nodes = list(self._nodes.values())
        results = await asyncio.gather(*(self._ask(n) for n in nodes), return_exceptions=True)
        answers: list[SentinelAnswer] = []
        errors: list[str] = []
        refusals: list[tuple[_SentinelNode, BaseException]] = []
        for node, result in zip(nodes, results):
            if isinstance(result, SentinelAnswer):
                answers.append(result)
                self._set_sentinel(node, up=True, what="lookup", error=None)
            else:
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
                if _is_misconfiguration(result):
                    refusals.append((node, result))
                text = describe(result)
                errors.append(text)
                self._set_sentinel(node, up=False, what="lookup", error=text)
        if not answers:
            self._lookups["no_sentinel"] += 1
            self._fast_until = self._now() + self._poll
            if refusals:
                # Not an outage: the client is set up wrong, and retrying will not fix it.
                raise self._misconfiguration(*refusals[0])
            raise NoSentinelAvailableError(
                name=self._name, sentinels=[fmt(n.address) or "" for n in nodes], errors=errors
            )
        if len(answers) < len(nodes):
            self._fast_until = self._now() + self._poll
        election = elect_master(answers, self.master, voters=self._voters, quorum=self.quorum)
        if not election.named:
            self._lookups["unknown_service"] += 1
            raise UnknownServiceError(
                name=self._name,
                service=self.service,
                sentinels=[fmt(a.sentinel) or "" for a in answers],
            )
        self._note_disagreement(election.disagreeing)
        if not election.candidates:
            # Without a quorum nothing is learnt: the current master (if any) stays in use.
            self._lookups["no_master"] += 1
            voted = sum(1 for a in answers if a.sentinel in self._voters)
            raise NoMasterError(
                name=self._name,
                service=self.service,
                reason=(
                    f"no master is backed by a quorum of {self.quorum} of the "
                    f"{len(self._voters)} configured Sentinels ({voted} answered)"
                ),
            )
        candidate, epoch = election.candidates[0]
        if self._holding(answers, candidate):
            self._lookups["no_master"] += 1
            reason = "a failover is under way: writes wait for the promoted replica"
            await self._lose_master(candidate, reason)
            raise NoMasterError(
                name=self._name, service=self.service, reason=reason, candidate=fmt(candidate)
            )
        check = (
            candidate != self.master
            or self._suspect
            or self._unwritable_since is not None
            or source in ("initial", "manual")
        )
        if check:
            self._suspect = False
            problem = await self._probe(candidate, "master")
            for other, other_epoch in election.candidates[1:]:
                if problem is None:
                    break
                # The best-ranked master is not one; another that a quorum names may be.
                named = sum(1 for a in answers if a.master == other and a.sentinel in self._voters)
                if named >= self.quorum and await self._probe(other, "master") is None:
                    candidate, epoch, problem = other, other_epoch, None
            if problem is not None:
                self._lookups["no_master"] += 1
                await self._lose_master(candidate, problem)
                raise NoMasterError(
                    name=self._name, service=self.service, reason=problem, candidate=fmt(candidate)
                )
        self._lookups["ok"] += 1
        self.epoch = epoch
        agreeing = [a for a in answers if a.master == candidate]
        self._learn_sentinels(agreeing)
        if candidate != self.master:
            await self._switch(candidate, source)
        self._end_outage()
        await self._refresh_replicas(agreeing)

    def _misconfiguration(self, node: _SentinelNode, exc: BaseException) -> RedisConfigurationError:
        where = fmt(node.address) or ""
        if isinstance(exc, rex.AuthenticationError):
            error: RedisConfigurationError = RedisAuthenticationError(
                name=self._name, role="Sentinel", node=where, detail=describe(exc)
            )
        else:
            error = NotASentinelError(name=self._name, node=where, detail=describe(exc))
        error.__cause__ = exc
        return error

    def _note_disagreement(self, pairs: tuple[tuple[Address, Address], ...]) -> None:
        if pairs == self._disagreeing:
            return
        self._disagreeing = pairs
        if not pairs:
            return
        self._disagreements += 1
        if self._w_disagree:
            self._emit(
                RedisSentinelDisagreement(
                    name=self._name,
                    service=self.service,
                    master=fmt(self.master),
                    sentinels=tuple(fmt(s) or "" for s, _ in pairs),
                    named=tuple(fmt(m) or "" for _, m in pairs),
                )
            )

    def _holding(self, answers: Sequence[SentinelAnswer], candidate: Address) -> bool:
        """Whether writes to ``candidate`` must wait because it is being failed over.

        Once a leader has said so, the hold lasts until that leader answers without the flag
        (the failover ended or was aborted), another master is named, or ``_FAILOVER_HOLD``
        seconds pass: a leader that misses one lookup must not let the old master back in.
        """
        leader = failover_leader(answers, candidate)
        now = self._now()
        if leader is not None:
            self._hold = (candidate, leader, now + _FAILOVER_HOLD)
            return True
        hold = self._hold
        if hold is None:
            return False
        address, leader, until = hold
        if address == candidate and now < until and all(a.sentinel != leader for a in answers):
            return True
        self._hold = None
        return False

    def _learn_sentinels(self, answers: Iterable[SentinelAnswer]) -> None:
        if not self._discover:
            return
        for answer in answers:
            for address in answer.sentinels:
                if address not in self._nodes:
                    node = self._nodes[address] = _SentinelNode(address)
                    if self._subscribe and self._started:
                        self._start_subscriber(node)

    def _set_sentinel(self, node: _SentinelNode, *, up: bool, what: str, error: str | None) -> None:
        if what == "lookup":
            changed = node.up is not up
            node.up = up
            node.error = error
        else:
            changed = node.subscribed is not up
            node.subscribed = up
        if not up:
            self._fast_until = self._now() + self._poll
        if changed and self._w_sentinel and (up or what == "subscription" or node.up is False):
            self._emit(
                RedisSentinelStateChanged(
                    name=self._name, sentinel=fmt(node.address) or "", up=up, what=what, error=error
                )
            )

    # -- state changes --------------------------------------------------------------------------

    async def _switch(self, new: Address, source: str) -> None:
        old = self.master if self.master is not None else self._last_master
        self.master = new
        self._last_master = new
        self.master_fence.gen += 1
        self.replica_fence.gen += 1
        moved = old != new
        if moved:
            # The same master accepted again after a spell without one is not a switch.
            self._switches[source if source in self._switches else "manual"] += 1
            self._last_switch_source = source
        self._fast_until = self._now() + self._poll
        changed, self._changed = self._changed, asyncio.Event()
        closed = 0
        for pool in list(self._pools):
            closed += await pool.fence_changed()
        for ref in list(self._listeners):
            callback = ref()
            if callback is None:
                self._listeners.remove(ref)
            else:
                callback()
        changed.set()
        if self._w_switch and moved:
            self._emit(
                RedisMasterSwitched(
                    name=self._name,
                    service=self.service,
                    old=fmt(old),
                    new=fmt(new) or "",
                    generation=self.master_fence.gen,
                    source=source,
                    idle_closed=closed,
                )
            )

    async def _lose_master(self, candidate: Address, problem: str) -> None:
        if self._unwritable_since is None:
            self._unwritable_since = self._now()
        self._fast_until = self._now() + self._poll
        if self.master is None:
            return
        self.master = None
        # Fence off the connections to it: it does not answer as a master any more, so nothing
        # more may be sent on them, and new connections wait for the next accepted master.
        self.master_fence.gen += 1
        self.replica_fence.gen += 1
        for pool in list(self._pools):
            await pool.fence_changed()
        if self._w_lost:
            self._emit(
                RedisMasterLost(
                    name=self._name,
                    service=self.service,
                    candidate=fmt(candidate),
                    reason=problem,
                )
            )

    def _end_outage(self) -> None:
        since = self._unwritable_since
        if since is None:
            return
        self._unwritable_since = None
        length = max(0.0, self._now() - since)
        self._unwritable_total += length
        self._outage_hist[_bucket(OUTAGE_BUCKETS, length)] += 1
        self._outage_sum += length

    async def _refresh_replicas(self, answers: Sequence[SentinelAnswer]) -> None:
        candidates = healthy_replicas(answers, self.master)
        if self._replica_users and candidates:
            problems = await asyncio.gather(*(self._probe(a, "replica") for a in candidates))
            candidates = [a for a, p in zip(candidates, problems) if p is None]
        replicas = tuple(candidates)
        if replicas == self.replicas:
            return
        self.replicas = replicas
        self.replica_fence.gen += 1
        for pool in list(self._pools):
            if pool.role == "replica":
                await pool.fence_changed()
        if self._w_replicas:
            self._emit(
                RedisReplicasChanged(
                    name=self._name,
                    replicas=tuple(fmt(r) or "" for r in replicas),
                    generation=self.replica_fence.gen,
                )
            )

    # -- background tasks -----------------------------------------------------------------------

    @property
    def fast_polling(self) -> bool:
        """Whether the poll runs at its fast pace (degraded, or something just happened)."""
        return self.degraded or self._now() < self._fast_until

    @property
    def degraded(self) -> bool:
        """Whether part of the discovery is not working: no master, an outage under way, the
        last lookup failed, a Sentinel does not answer, or no event subscription is alive."""
        nodes = self._nodes.values()
        return (
            self.master is None
            or self._unwritable_since is not None
            or self._last_error is not None
            or any(n.up is False for n in nodes)
            or (self._subscribe and self._started and not any(n.subscribed for n in nodes))
        )

    async def _poll_loop(self) -> None:
        last = self._now()
        while True:
            interval = self._fast_poll if self.fast_polling else self._poll
            if self._replica_users:
                # Sentinel reports a replica's broken link late (its INFO period); replica
                # readers need to hear of it within a second, so look (and ROLE-check) that often.
                interval = min(interval, _REPLICA_CHECK)
            wait = last + interval - self._now()
            if wait > 0:
                # Sleep in short steps so that becoming degraded shortens the current wait.
                await self._clock.sleep(min(wait, self._fast_poll, _REPLICA_CHECK))
                continue
            last = self._now()
            with contextlib.suppress(Exception):
                await self.refresh("poll")

    async def _subscribe_loop(self, node: _SentinelNode) -> None:
        delay = 0.05
        while not self._closing:
            # Writes without asyncio.wait_for, which can swallow the cancellation of aclose().
            conn = node.events = DirectSendConnection(
                host=node.address[0],
                port=node.address[1],
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
                **self._sentinel_kwargs,
            )
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("PSUBSCRIBE", "*")
                # RESP3 delivers Pub/Sub replies as push messages: ask for them.
                reply = await conn.read_response(push_request=True)
                if not reply or str(reply[0]).lower() != "psubscribe":
                    raise rex.ConnectionError("unexpected reply to PSUBSCRIBE")
                self._set_sentinel(node, up=True, what="subscription", error=None)
                # Events sent while the subscription was down are lost: look now (lettuce#2007).
                self.request_refresh("event")
                delay = 0.05
                await self._read_events(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._set_sentinel(node, up=False, what="subscription", error=describe(exc))
            finally:
                node.subscribed = False
                node.events = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            if self.closing:
                return
            await self._clock.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, 2.0)

    async def _read_events(self, conn: redis.asyncio.Connection) -> None:
        ping_sent: float | None = None
        while not self._closing:
            timeout = self._ping_interval if ping_sent is None else self._timeout
            message = await conn.read_response(
                timeout=timeout, disconnect_on_error=False, push_request=True
            )
            if message is None:
                if ping_sent is not None:
                    raise rex.TimeoutError("the subscription did not answer PING")
                await conn.send_command("PING", check_health=False)
                ping_sent = self._now()
                continue
            if isinstance(message, list) and message:
                kind = str(message[0]).lower()
            else:  # RESP3 answers PING in subscribed mode with a plain PONG
                kind = str(message).lower()
            if kind == "pong":
                ping_sent = None
            elif kind == "pmessage" and len(message) >= 4:
                self.on_event(str(message[2]), str(message[3]))

    def on_event(self, channel: str, data: str) -> None:
        """Handle one Sentinel event: a lookup for any event about this service."""
        words = data.split()
        if not words:
            return
        ours = (
            (channel == "+switch-master" and words[0] == self.service)
            or (len(words) >= 2 and words[0] == "master" and words[1] == self.service)
            or (
                "@" in words
                and words.index("@") + 1 < len(words)
                and words[words.index("@") + 1] == self.service
            )
        )
        if not ours:
            return
        if channel in ("+sdown", "+odown", "+try-failover", "+new-epoch") or channel.startswith(
            "+failover-state"
        ):
            self._fast_until = self._now() + self._poll
        self.request_refresh("event")

    # -- inspection -----------------------------------------------------------------------------

    def snapshot(self) -> TopologySnapshot:
        """A consistent picture of the topology now."""
        since = self._unwritable_since
        return TopologySnapshot(
            master=self.master,
            generation=self.master_fence.gen,
            replica_generation=self.replica_fence.gen,
            replicas=self.replicas,
            sentinels=tuple(self._nodes),
            sentinels_up=sum(1 for n in self._nodes.values() if n.up),
            subscriptions_up=sum(1 for n in self._nodes.values() if n.subscribed),
            degraded=self.degraded,
            unwritable_for=0.0 if since is None else max(0.0, self._now() - since),
            last_switch_source=self._last_switch_source,
            last_error=None if self._last_error is None else describe(self._last_error),
            switches=dict(self._switches),
            disagreeing=self._disagreeing,
        )

    def sentinel_states(self) -> Iterator[tuple[Address, bool | None, bool, str | None]]:
        """``(address, answers, subscribed, last error)`` of each Sentinel."""
        for node in self._nodes.values():
            yield node.address, node.up, node.subscribed, node.error

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for source, count in self._switches.items():
            yield "veritas_redis_master_switches", (name, source), float(count)
        for result, count in self._lookups.items():
            yield "veritas_redis_lookups", (name, result), float(count)
        yield "veritas_redis_generation", (name,), float(self.master_fence.gen)
        nodes = self._nodes.values()
        yield "veritas_redis_sentinels_up", (name,), float(sum(1 for n in nodes if n.up))
        yield "veritas_redis_sentinels_known", (name,), float(len(self._nodes))
        yield (
            "veritas_redis_sentinel_subscriptions_up",
            (name,),
            float(sum(1 for n in nodes if n.subscribed)),
        )
        yield "veritas_redis_writable_master", (name,), 0.0 if self.master is None else 1.0
        since = self._unwritable_since
        ongoing = 0.0 if since is None else max(0.0, self._now() - since)
        yield "veritas_redis_no_writable_master_seconds", (name,), self._unwritable_total + ongoing
        yield (
            "veritas_redis_unavailable_seconds",
            (name,),
            HistogramValue(cumulative_buckets(OUTAGE_BUCKETS, self._outage_hist), self._outage_sum),
        )
        yield "veritas_redis_replicas", (name,), float(len(self.replicas))
        yield "veritas_redis_sentinel_disagreements", (name,), float(self._disagreements)

    def __repr__(self) -> str:
        return (
            f"<SentinelTopology {self.service!r} master={fmt(self.master)} "
            f"gen={self.master_fence.gen}>"
        )


def role_problem(reply: Any, want: Role) -> str | None:
    """Why a ROLE reply does not fit ``want`` (None when it does)."""
    if not isinstance(reply, (list, tuple)) or not reply:
        return "it gave an unexpected reply to ROLE"
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if want == "master":
        return None if role == "master" else f"it answers ROLE {role}"
    if role != "slave":
        return f"it answers ROLE {role}"
    state = reply[3] if len(reply) > 3 else ""
    state = state.decode() if isinstance(state, bytes) else str(state)
    if state != "connected":
        return f"its link to the master is {state or 'down'}"
    return None


def _is_misconfiguration(exc: object) -> bool:
    """Whether a Sentinel's failure is one no retry can fix: it refused the credentials, or it
    is not a Sentinel at all (a data node answers ``unknown command 'SENTINEL'``)."""
    if isinstance(exc, rex.AuthenticationError):
        return True
    return (
        isinstance(exc, rex.ResponseError)
        and "unknown command" in str(exc).lower()
        and "sentinel" in str(exc).lower()
    )


def _bucket(bounds: Sequence[float], value: float) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)
