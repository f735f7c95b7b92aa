"""The topology model: what the client believes about each node, and which node may take what.

Pure logic, no I/O: the monitor feeds it one probe result at a time (:meth:`Topology.observe`)
and routes calls by what it concludes (:attr:`Topology.primary`, :attr:`Topology.readable`).
Time comes from an injected clock, so tests drive it with a fake one.

The rules, in the order they apply after every probe:

1. **Hysteresis.** A reachable node is marked down after ``fall`` failed probes in a row, and back
   up after ``rise`` good ones. A standby must be seen as a primary ``rise`` times in a row before
   it takes writes; a primary seen in recovery is demoted at once (stopping writes is always
   safe, starting them needs confirmation). The first probe of a node counts at once.
2. **One cluster.** Every node must report the same ``system_identifier``: the one pinned by
   configuration, else the one learned from the first node seen. A node with another one is
   fenced; without a pinned identifier, writes stop altogether while it is reachable.
3. **One primary.** The highest timeline any node of the cluster ever reported is remembered. A
   primary on a lower timeline is the stale side of a split brain and is fenced, even when it is
   the only primary left (``min_timeline`` sets the floor before any node reported one). Two
   primaries on the highest timeline fence each other and stop writes, unless they are one
   server under two names (a pooler and the server behind it, two addresses of one host): the
   same system identifier, timeline and postmaster start time. Then the first name in the
   configured order takes the writes and the others stand by as its aliases. A fenced node is
   released when it comes back as a standby.
4. **Fresh reads.** A standby serves reads only on the primary's timeline, and only while its
   replay lag (bytes behind the primary's WAL position, and seconds behind it) is within the
   limits; once over, it needs ``rise`` good probes in a row to serve reads again.

Every change that makes a node's open connections suspect bumps its ``generation``: the client
evicts that node's pooled connections when it sees the bump.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .._clock import MONOTONIC, Clock
from ..events import Event
from ._events import (
    PostgresFailoverDetected,
    PostgresNodeChanged,
    PostgresNodeFenced,
    PostgresWritesBlocked,
)

__all__ = ["NodeState", "NodeStatus", "Observation", "Topology"]

Role = Literal["primary", "standby", "unknown"]

_MAX_SAMPLES = 600


@dataclass(frozen=True, slots=True)
class Observation:
    """What one successful probe of a node reported.

    Attributes:
        in_recovery: ``pg_is_in_recovery()``: true on a standby.
        read_only: ``default_transaction_read_only`` is on (a primary that takes no writes).
        system_identifier: The cluster's ``system_identifier`` (``pg_control_system()``).
        timeline: The timeline: from the current WAL file on a primary, the received one on a
            standby; ``None`` when unknown.
        lsn: ``pg_current_wal_lsn()`` on a primary, ``pg_last_wal_replay_lsn()`` on a standby.
        receive_lsn: ``pg_last_wal_receive_lsn()`` on a standby.
        streaming: Whether the standby's WAL receiver is streaming (``None`` when unknown).
        started_at: ``pg_postmaster_start_time()`` as a POSIX timestamp: with the system
            identifier and the timeline it tells one server reached under two names.
    """

    in_recovery: bool
    read_only: bool = False
    system_identifier: int | None = None
    timeline: int | None = None
    lsn: int | None = None
    receive_lsn: int | None = None
    streaming: bool | None = None
    started_at: float | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A read-only picture of one node, as the client sees it.

    Attributes:
        name: The node's name (``host:port`` unless named otherwise).
        reachable: Whether it answers probes (``None`` before the first probe).
        role: ``"primary"``, ``"standby"`` or ``"unknown"``.
        active: Whether it is the primary that takes the writes now.
        readable: Whether it serves reads routed to standbys now.
        fenced: Why it is fenced, or ``None``.
        timeline: Its timeline, when known.
        read_only: Whether it runs with ``default_transaction_read_only``.
        lag_bytes: Replay lag behind the primary, in bytes (standbys; ``None`` when unknown).
        lag_seconds: Replay lag in seconds, estimated from the primary's WAL positions over
            time (``None`` when unknown).
        lagging: Whether the lag is over the limit (it serves no reads).
        generation: Bumped at every change that evicts its connections.
        last_error: The type of the last probe error, when the last probe failed.
        alias_of: The node that takes the writes for the same server reached under another
            name, when this node is such an alias; else ``None``.
    """

    name: str
    reachable: bool | None
    role: Role
    active: bool
    readable: bool
    fenced: str | None
    timeline: int | None
    read_only: bool
    lag_bytes: int | None
    lag_seconds: float | None
    lagging: bool
    generation: int
    last_error: str | None
    alias_of: str | None = None


class NodeState:
    """The client's running belief about one node (mutable; owned by :class:`Topology`)."""

    __slots__ = (
        "alias_of",
        "fail_streak",
        "fenced",
        "generation",
        "hinted",
        "index",
        "lag_bytes",
        "lag_judged",
        "lag_ok_streak",
        "lag_seconds",
        "lagging",
        "last_error",
        "lsn",
        "name",
        "observed_at",
        "ok_streak",
        "pending_role",
        "pending_streak",
        "reachable",
        "read_only",
        "receive_lsn",
        "role",
        "started_at",
        "streaming",
        "system_identifier",
        "timeline",
    )

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.reachable: bool | None = None
        self.role: Role = "unknown"
        self.read_only = False
        self.system_identifier: int | None = None
        self.timeline: int | None = None
        self.lsn: int | None = None
        self.receive_lsn: int | None = None
        self.streaming: bool | None = None
        self.started_at: float | None = None
        self.alias_of: NodeState | None = None
        self.observed_at: float | None = None
        self.ok_streak = 0
        self.fail_streak = 0
        self.pending_role: Role | None = None
        self.pending_streak = 0
        self.fenced: str | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.lagging = False
        self.lag_judged = False
        self.lag_ok_streak = 0
        self.generation = 0
        self.hinted = False
        self.last_error: str | None = None

    @property
    def suspect(self) -> bool:
        """Whether something hints that what is believed about the node is out of date."""
        return self.hinted or self.fail_streak > 0 or self.pending_role is not None

    def __repr__(self) -> str:
        return (
            f"<NodeState {self.name} reachable={self.reachable} role={self.role} "
            f"tl={self.timeline} fenced={self.fenced} gen={self.generation}>"
        )


class Topology:
    """Decides, from probe results, which node is the primary and which standbys serve reads.

    Args:
        names: The nodes' names, in the configured order (the order breaks ties).
        client: The client's name, for events.
        fall: Failed probes in a row (>= 1) that mark a reachable node down.
        rise: Good probes in a row (>= 1) that bring a node back, confirm a promotion, and let a
            lagging standby serve reads again.
        max_lag_bytes: Replay lag in bytes above which a standby serves no reads (``None``: no
            limit).
        max_lag_seconds: Replay lag in seconds above which a standby serves no reads.
        system_identifier: The cluster's ``system_identifier``, if known in advance: nodes that
            report another one are fenced and the others keep working. Learned from the first
            node otherwise, and a mismatch stops writes altogether.
        min_timeline: The lowest timeline a primary may be on to take writes, as if a node had
            reported it (a primary below it is fenced as stale); ``None``: no floor.
        await_floor: Take no writes until :meth:`set_timeline_floor` is called (the client
            reads its fencing record first).
        clock: Time source.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        client: str = "postgres",
        fall: int = 2,
        rise: int = 2,
        max_lag_bytes: int | None = None,
        max_lag_seconds: float | None = None,
        system_identifier: int | None = None,
        min_timeline: int | None = None,
        await_floor: bool = False,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.client = client
        self.nodes: tuple[NodeState, ...] = tuple(NodeState(i, n) for i, n in enumerate(names))
        self._fall = fall
        self._rise = rise
        self._max_lag_bytes = max_lag_bytes
        self._max_lag_seconds = max_lag_seconds
        self._pinned_sysid = system_identifier
        self._learned_sysid: int | None = None
        self._clock = clock
        self.primary: NodeState | None = None
        """The node that takes writes now, or ``None``."""
        self.readable: tuple[NodeState, ...] = ()
        """Standbys that serve reads now, in the configured order."""
        self.writes_blocked: tuple[str, tuple[str, ...]] | None = None
        """``(reason, nodes)`` while writes are stopped altogether, else ``None``."""
        self.read_only_primary: NodeState | None = None
        """The primary when it runs with ``default_transaction_read_only`` (it takes no writes)."""
        self.max_timeline = min_timeline or 0
        """The highest timeline any node of the cluster reported (at least ``min_timeline``)."""
        self.floor_pending = await_floor
        """Whether writes wait for :meth:`set_timeline_floor` (a fencing record to be read)."""
        self.failovers = 0
        """How many times the primary moved to another node."""
        self.fencings = 0
        """How many times a node was fenced."""
        self.version = 0
        """Bumped at every change of :attr:`primary`, :attr:`readable` or a node's state."""
        self._last_primary: NodeState | None = None
        self._last_timeline: int | None = None
        self._no_primary_since: float | None = None
        self._no_primary_total = 0.0
        self._samples: deque[tuple[float, int]] = deque(maxlen=_MAX_SAMPLES)
        self._sample_timeline: int | None = None
        if max_lag_bytes is not None or max_lag_seconds is not None:
            # A standby's lag is unknown until the primary has been probed: no reads until then.
            for n in self.nodes:
                n.lagging = True

    # -- inspection ---------------------------------------------------------------------------

    @property
    def system_identifier(self) -> int | None:
        """The identifier nodes are checked against (pinned or learned), if known yet."""
        return self._pinned_sysid if self._pinned_sysid is not None else self._learned_sysid

    @property
    def all_down(self) -> bool:
        """Whether every node is down and its latest probe failed too (none is coming back)."""
        return all(n.reachable is False and n.fail_streak > 0 for n in self.nodes)

    @property
    def probed(self) -> bool:
        """Whether every node has been probed at least once."""
        return all(n.reachable is not None for n in self.nodes)

    def no_primary_seconds(self) -> float:
        """Total seconds without a writable primary since the first probe, the current gap too."""
        total = self._no_primary_total
        if self._no_primary_since is not None:
            total += self._clock.monotonic() - self._no_primary_since
        return total

    def no_primary_for(self) -> float:
        """Seconds since the client last had a writable primary (0.0 while it has one)."""
        if self._no_primary_since is None:
            return 0.0
        return self._clock.monotonic() - self._no_primary_since

    def status(self, node: NodeState) -> NodeStatus:
        """A snapshot of one node."""
        return NodeStatus(
            name=node.name,
            reachable=node.reachable,
            role=node.role,
            active=node is self.primary,
            readable=node in self.readable,
            fenced=node.fenced,
            timeline=node.timeline,
            read_only=node.read_only,
            lag_bytes=node.lag_bytes,
            lag_seconds=node.lag_seconds,
            lagging=node.lagging,
            generation=node.generation,
            last_error=node.last_error,
            alias_of=None if node.alias_of is None else node.alias_of.name,
        )

    def promotion_candidate(self) -> NodeState | None:
        """The standby to promote when no node claims to be primary, or ``None``.

        The most advanced reachable, unfenced standby of the cluster on the highest timeline
        (by received WAL, then replayed WAL, then configured order). ``None`` while any reachable
        node claims to be primary or writes are blocked.
        """
        if self.writes_blocked is not None or self.floor_pending:
            return None
        if any(n.reachable and n.role == "primary" for n in self.nodes):
            return None
        sysid = self.system_identifier
        best: NodeState | None = None
        best_key: tuple[int, int, int] | None = None
        for n in self.nodes:
            if not n.reachable or n.role != "standby" or n.fenced is not None:
                continue
            if sysid is not None and n.system_identifier != sysid:
                continue
            if n.timeline is not None and n.timeline < self.max_timeline:
                continue
            key = (n.receive_lsn or n.lsn or 0, n.lsn or 0, -n.index)
            if best_key is None or key > best_key:
                best, best_key = n, key
        return best

    # -- input --------------------------------------------------------------------------------

    def set_timeline_floor(self, timeline: int | None) -> list[Event]:
        """Raise the highest timeline to ``timeline`` (as read from a fencing record) and let
        writes go ahead; return the events of the decision taken again."""
        self.floor_pending = False
        if timeline is not None and timeline > self.max_timeline:
            self.max_timeline = timeline
        self.version += 1
        events: list[Event] = []
        self._decide(None, self._clock.monotonic(), events)
        return events

    def hint(self, node: NodeState) -> None:
        """Note that a call saw an error hinting that the node's role or health changed."""
        node.hinted = True

    def observe(
        self, node: NodeState, observation: Observation | None, error: str | None = None
    ) -> list[Event]:
        """Take one probe result and re-decide; return the events to report.

        Args:
            node: The node that was probed.
            observation: What it reported, or ``None`` when the probe failed.
            error: The probe error's type name, when it failed.
        """
        now = self._clock.monotonic()
        events: list[Event] = []
        node.hinted = False
        if observation is None:
            self._observe_failure(node, error, events)
        else:
            self._observe_success(node, observation, now, events)
        self._decide(node, now, events)
        return events

    def _observe_failure(self, node: NodeState, error: str | None, events: list[Event]) -> None:
        node.fail_streak += 1
        node.ok_streak = 0
        node.pending_role, node.pending_streak = None, 0
        node.last_error = error
        if node.reachable is None or (node.reachable and node.fail_streak >= self._fall):
            node.reachable = False
            node.generation += 1
            self.version += 1
            events.append(self._node_event(node, node.role, "probe_failed"))

    def _observe_success(
        self, node: NodeState, obs: Observation, now: float, events: list[Event]
    ) -> None:
        node.fail_streak = 0
        node.ok_streak += 1
        node.last_error = None
        seen: Role = "standby" if obs.in_recovery else "primary"
        old_role = node.role
        if node.read_only != obs.read_only:
            self.version += 1
        node.read_only = obs.read_only
        server_changed = node.reachable is True and (
            (node.timeline is not None and obs.timeline != node.timeline)
            or (node.started_at is not None and obs.started_at != node.started_at)
        )
        node.system_identifier = obs.system_identifier
        node.timeline = obs.timeline
        node.lsn = obs.lsn
        node.receive_lsn = obs.receive_lsn
        node.streaming = obs.streaming
        node.started_at = obs.started_at
        node.observed_at = now

        if node.reachable is None:
            # The first probe of a node counts at once: the client must route from the start.
            node.reachable = True
            node.role = seen
            node.generation += 1
            self.version += 1
            events.append(self._node_event(node, old_role, "discovered"))
            return
        if not node.reachable:
            if node.role != seen:
                node.role = seen
                node.generation += 1
            if node.ok_streak >= self._rise:
                node.reachable = True
                node.generation += 1
                self.version += 1
                events.append(self._node_event(node, old_role, "probe_ok"))
            return
        if seen == node.role:
            node.pending_role, node.pending_streak = None, 0
            if server_changed and seen == "primary":
                # Another server answers under this name now (a moved address, a retargeted
                # pooler, a restart): connections opened before belong to the old one.
                node.generation += 1
                self.version += 1
            return
        if seen == "standby":
            # A primary in recovery was demoted (restarted as a standby): stop writes at once.
            node.pending_role, node.pending_streak = None, 0
            node.role = "standby"
            node.generation += 1
            self.version += 1
            events.append(self._node_event(node, old_role, "demoted"))
            return
        if node.pending_role == seen:
            node.pending_streak += 1
        else:
            node.pending_role, node.pending_streak = seen, 1
        if node.pending_streak >= self._rise:
            node.pending_role, node.pending_streak = None, 0
            node.role = seen
            node.generation += 1
            self.version += 1
            events.append(self._node_event(node, old_role, "promoted"))

    # -- decision -------------------------------------------------------------------------------

    def _decide(self, probed: NodeState | None, now: float, events: list[Event]) -> None:
        reachable = [n for n in self.nodes if n.reachable]
        sysid = self._reference_sysid(reachable)
        foreign = [
            n
            for n in reachable
            if sysid is not None and n.system_identifier is not None
            and n.system_identifier != sysid
        ]  # fmt: skip
        own = [n for n in reachable if n not in foreign]
        for n in own:
            if n.timeline is not None and n.timeline > self.max_timeline:
                self.max_timeline = n.timeline

        fence: dict[int, str] = {n.index: "system_identifier" for n in foreign}
        candidates = [n for n in own if n.role == "primary"]
        contenders = []
        for n in candidates:
            if n.timeline is not None and n.timeline < self.max_timeline:
                fence[n.index] = "stale_timeline"
            else:
                contenders.append(n)
        blocked: tuple[str, tuple[str, ...]] | None = None
        aliases = _aliases(contenders)
        if aliases:
            # One server under several names: the first name takes the writes.
            contenders = [n for n in contenders if n.index not in aliases]
        if len(contenders) > 1:
            for n in contenders:
                fence[n.index] = "split_brain"
            blocked = ("split_brain", tuple(n.name for n in contenders))
            aliases = {}
        if foreign and self._pinned_sysid is None:
            names = tuple(n.name for n in reachable)
            blocked = ("system_identifier", names)
        winner = contenders[0] if len(contenders) == 1 else None
        for n in self.nodes:
            alias_of = aliases.get(n.index)
            if alias_of is not n.alias_of:
                n.alias_of = alias_of
                self.version += 1

        self._apply_fences(fence, winner, events)
        if blocked != self.writes_blocked:
            old = self.writes_blocked
            self.writes_blocked = blocked
            self.version += 1
            if blocked is not None:
                events.append(
                    PostgresWritesBlocked(
                        name=self.client, blocked=True, reason=blocked[0], nodes=blocked[1]
                    )
                )
            elif old is not None:
                events.append(
                    PostgresWritesBlocked(
                        name=self.client, blocked=False, reason=old[0], nodes=old[1]
                    )
                )

        writable = winner if winner is not None and not winner.read_only else None
        if blocked is not None or self.floor_pending:
            writable = None
        self.read_only_primary = winner if winner is not None and winner.read_only else None
        self._set_primary(writable, now, events)
        self._update_lag(probed, winner, now)
        readable = tuple(
            n
            for n in own
            if n.role == "standby"
            and n.fenced is None
            and not n.lagging
            and (n.timeline is None or n.timeline >= self.max_timeline)
        )
        if readable != self.readable:
            self.readable = readable
            self.version += 1

    def _reference_sysid(self, reachable: list[NodeState]) -> int | None:
        if self._pinned_sysid is not None:
            return self._pinned_sysid
        if self._learned_sysid is None:
            # Learn from a primary when one answers, else from the first node in order.
            known = [n for n in reachable if n.system_identifier is not None]
            primaries = [n for n in known if n.role == "primary"]
            sources = primaries or known
            if sources:
                self._learned_sysid = sources[0].system_identifier
        return self._learned_sysid

    def _apply_fences(
        self, fence: dict[int, str], winner: NodeState | None, events: list[Event]
    ) -> None:
        for n in self.nodes:
            if not n.reachable:
                continue  # keep what was decided: an unreachable node proves nothing
            reason = fence.get(n.index)
            if reason == n.fenced:
                continue
            old = n.fenced
            n.fenced = reason
            n.generation += 1
            self.version += 1
            if reason is not None:
                self.fencings += 1
            events.append(
                PostgresNodeFenced(
                    name=self.client,
                    node=n.name,
                    fenced=reason is not None,
                    reason=reason or old or "",
                    timeline=n.timeline,
                    winner=winner.name if winner is not None else None,
                )
            )

    def _set_primary(self, primary: NodeState | None, now: float, events: list[Event]) -> None:
        if primary is self.primary:
            if primary is None and self._no_primary_since is None:
                self._no_primary_since = now
            elif primary is not None and primary.timeline != self._last_timeline:
                # The same name now leads to a promoted server (a pooler or an address moved
                # to the new primary): a failover all the same.
                self._failover(primary, primary, 0.0, events)
            return
        self.primary = primary
        self.version += 1
        if primary is None:
            self._no_primary_since = now
            return
        without = 0.0
        if self._no_primary_since is not None:
            without = now - self._no_primary_since
            self._no_primary_total += without
            self._no_primary_since = None
        last = self._last_primary
        if last is None:
            self._last_primary, self._last_timeline = primary, primary.timeline
        elif (last is not primary and not _same_server(last, primary)) or (
            primary.timeline != self._last_timeline
        ):
            self._failover(last, primary, without, events)
        else:
            self._last_primary = primary

    def _failover(
        self, last: NodeState, primary: NodeState, without: float, events: list[Event]
    ) -> None:
        self._last_primary, self._last_timeline = primary, primary.timeline
        self.failovers += 1
        events.append(
            PostgresFailoverDetected(
                name=self.client,
                old_primary=last.name,
                new_primary=primary.name,
                timeline=primary.timeline,
                without_primary=without,
            )
        )

    # -- replication lag -------------------------------------------------------------------------

    def _update_lag(self, probed: NodeState | None, winner: NodeState | None, now: float) -> None:
        if winner is not None and winner.lsn is not None:
            if winner.timeline != self._sample_timeline:
                self._samples.clear()
                self._sample_timeline = winner.timeline
            if probed is winner and (not self._samples or self._samples[-1][1] != winner.lsn):
                self._samples.append((now, winner.lsn))
        for n in self.nodes:
            if n.role != "standby" or not n.reachable:
                continue
            if winner is None:
                continue  # the last judgement stands: nothing new is being written
            if winner.timeline == n.timeline and winner.lsn is not None and n.lsn is not None:
                n.lag_bytes = max(0, winner.lsn - n.lsn)
                n.lag_seconds = self._lag_seconds(n.lsn, now)
            else:
                n.lag_bytes = n.lag_seconds = None  # another timeline: not comparable
            over = self._over_limit(n)
            if not n.lag_judged:
                n.lag_judged = True
                if n.lagging != over:
                    n.lagging = over
                    self.version += 1
            elif over:
                if not n.lagging:
                    n.lagging = True
                    self.version += 1
                n.lag_ok_streak = 0
            elif n.lagging and n is probed:
                n.lag_ok_streak += 1
                if n.lag_ok_streak >= self._rise:
                    n.lagging = False
                    n.lag_ok_streak = 0
                    self.version += 1

    def _over_limit(self, n: NodeState) -> bool:
        limit = self._max_lag_bytes
        if limit is not None and (n.lag_bytes is None or n.lag_bytes > limit):
            return True
        seconds = self._max_lag_seconds
        return seconds is not None and (n.lag_seconds is None or n.lag_seconds > seconds)

    def _lag_seconds(self, replayed: int, now: float) -> float | None:
        samples = self._samples
        if not samples:
            return None
        if replayed >= samples[-1][1]:
            return 0.0
        # The standby has not replayed what the primary had written at the first sample past
        # its position: it is at least that old. Unlike now() - pg_last_xact_replay_timestamp(),
        # this does not grow while the primary is idle.
        for t, lsn in samples:
            if lsn > replayed:
                return max(0.0, now - t)
        return 0.0  # pragma: no cover - the last sample is past the position (checked above)

    def _node_event(self, node: NodeState, from_role: Role, reason: str) -> PostgresNodeChanged:
        return PostgresNodeChanged(
            name=self.client,
            node=node.name,
            reachable=bool(node.reachable),
            from_role=from_role,
            to_role=node.role,
            timeline=node.timeline,
            reason=reason,
        )


def _same_server(a: NodeState, b: NodeState) -> bool:
    """Whether two nodes are one server reached under two names (as their last probes say)."""
    return (
        a.started_at is not None
        and a.started_at == b.started_at
        and a.system_identifier == b.system_identifier
        and a.timeline == b.timeline
    )


def _aliases(contenders: list[NodeState]) -> dict[int, NodeState]:
    """Among primaries on one timeline, the ones that are another's server under another name.

    Returns ``{index: the node it is an alias of}``; the first name of each server (in the
    configured order) is the one kept.
    """
    aliases: dict[int, NodeState] = {}
    for i, n in enumerate(contenders):
        if n.index in aliases:
            continue
        for other in contenders[i + 1 :]:
            if other.index not in aliases and _same_server(n, other):
                aliases[other.index] = n
    return aliases
