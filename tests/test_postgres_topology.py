"""The topology model: hysteresis, fencing, system identifiers, lag, failover accounting."""

from __future__ import annotations

from typing import TypeVar

import pytest

from veritas_resilience.postgres import (
    PostgresFailoverDetected,
    PostgresNodeChanged,
    PostgresNodeFenced,
    PostgresWritesBlocked,
)
from veritas_resilience.postgres._topology import NodeState, Observation, Topology
from veritas_resilience.testing import FakeClock

SYSID = 7000
T = TypeVar("T")


def now(x: T) -> T:
    """The object itself: reading state through a call keeps mypy from narrowing it for good."""
    return x


def primary(
    tl: int = 1,
    lsn: int = 1000,
    *,
    sysid: int = SYSID,
    ro: bool = False,
    started: float | None = None,
) -> Observation:
    return Observation(
        in_recovery=False,
        read_only=ro,
        system_identifier=sysid,
        timeline=tl,
        lsn=lsn,
        started_at=started,
    )


def standby(tl: int = 1, lsn: int = 1000, *, sysid: int = SYSID) -> Observation:
    return Observation(
        in_recovery=True, system_identifier=sysid, timeline=tl, lsn=lsn, receive_lsn=lsn
    )


def make(clock: FakeClock, n: int = 2, **kwargs: object) -> tuple[Topology, list[NodeState]]:
    topo = Topology([f"n{i + 1}" for i in range(n)], clock=clock, **kwargs)  # type: ignore[arg-type]
    return topo, list(topo.nodes)


def test_first_probe_counts_at_once(clock: FakeClock) -> None:
    """The first probe of each node sets its role without waiting for confirmations."""
    topo, (n1, n2) = make(clock)
    events = topo.observe(n1, primary())
    assert now(topo).primary is n1
    assert [type(e) for e in events] == [PostgresNodeChanged]
    topo.observe(n2, standby())
    assert now(topo).readable == (n2,)
    assert now(topo).probed and not now(topo).all_down


def test_one_failed_probe_keeps_the_node_fall_failures_drop_it(clock: FakeClock) -> None:
    """A reachable node is marked down only after ``fall`` failed probes in a row."""
    topo, (n1, n2) = make(clock, fall=3)
    topo.observe(n1, primary())
    topo.observe(n2, standby())
    for _ in range(2):
        topo.observe(n1, None, "ConnectionRefusedError")
        assert now(topo).primary is n1
    topo.observe(n1, primary())  # a good probe resets the count
    topo.observe(n1, None, "ConnectionRefusedError")
    topo.observe(n1, None, "ConnectionRefusedError")
    assert now(topo).primary is n1
    events = topo.observe(n1, None, "ConnectionRefusedError")
    assert now(topo).primary is None
    assert now(n1).reachable is False and now(n1).last_error == "ConnectionRefusedError"
    assert any(isinstance(e, PostgresNodeChanged) and not e.reachable for e in events)


def test_a_node_comes_back_after_rise_good_probes(clock: FakeClock) -> None:
    """A down node serves again only after ``rise`` good probes in a row."""
    topo, (n1, _) = make(clock, fall=1, rise=3)
    topo.observe(n1, primary())
    topo.observe(n1, None, "OSError")
    assert now(topo).primary is None
    topo.observe(n1, primary())
    topo.observe(n1, primary())
    assert now(topo).primary is None
    topo.observe(n1, primary())
    assert now(topo).primary is n1


def test_promotion_needs_rise_confirmations_demotion_is_immediate(clock: FakeClock) -> None:
    """A standby seen as primary takes writes after ``rise`` probes; a demoted primary at once."""
    topo, (n1, n2) = make(clock, fall=1, rise=2)
    topo.observe(n1, primary())
    topo.observe(n2, standby())
    topo.observe(n1, None, "OSError")
    assert now(topo).primary is None
    topo.observe(n2, primary(tl=2))
    assert now(topo).primary is None and now(n2).pending_role == "primary" and now(n2).suspect
    events = topo.observe(n2, primary(tl=2))
    assert now(topo).primary is n2
    failover = [e for e in events if isinstance(e, PostgresFailoverDetected)]
    assert failover and failover[0].old_primary == "n1" and failover[0].new_primary == "n2"
    generation = n2.generation
    topo.observe(n2, standby(tl=2))
    assert now(topo).primary is None and now(n2).role == "standby"
    assert now(n2).generation > generation


def test_a_flapping_role_does_not_promote(clock: FakeClock) -> None:
    """Alternating primary/standby answers never reach ``rise`` in a row: no promotion."""
    topo, (n1, n2) = make(clock, rise=2)
    topo.observe(n1, primary())
    topo.observe(n2, standby())
    for _ in range(5):
        topo.observe(n2, primary(tl=1))
        topo.observe(n2, standby())
    assert now(n2).role == "standby"


def test_generation_bumps_on_every_change_that_evicts(clock: FakeClock) -> None:
    """Down, back up, promoted and fenced all bump the node's generation."""
    topo, (n1, _) = make(clock, fall=1, rise=1)
    topo.observe(n1, primary())
    seen = [n1.generation]
    topo.observe(n1, None, "OSError")
    seen.append(n1.generation)
    topo.observe(n1, primary())
    seen.append(n1.generation)
    assert seen == sorted(set(seen))


def test_old_primary_back_on_an_older_timeline_is_fenced(clock: FakeClock) -> None:
    """Split brain: a primary on TL1 next to one on TL2 is fenced; writes stay on TL2."""
    topo, (n1, n2) = make(clock, fall=1, rise=1)
    topo.observe(n1, primary(tl=1))
    topo.observe(n2, standby(tl=1))
    topo.observe(n1, None, "OSError")
    topo.observe(n2, primary(tl=2))
    assert now(topo).primary is n2
    events = topo.observe(n1, primary(tl=1))
    assert now(topo).primary is n2
    assert now(n1).fenced == "stale_timeline"
    fenced = [e for e in events if isinstance(e, PostgresNodeFenced)]
    assert fenced and fenced[0].fenced and fenced[0].winner == "n2"
    assert now(topo).fencings == 1


def test_stale_primary_stays_fenced_when_it_is_the_only_primary(clock: FakeClock) -> None:
    """With the TL2 primary gone, the TL1 primary still gets no writes: timelines are remembered."""
    topo, (n1, n2) = make(clock, fall=1, rise=1)
    topo.observe(n1, primary(tl=1))
    topo.observe(n2, primary(tl=2))  # promoted while n1 was still up
    assert now(topo).primary is n2 and now(n1).fenced == "stale_timeline"
    topo.observe(n2, None, "OSError")
    topo.observe(n1, primary(tl=1))
    assert now(topo).primary is None and now(n1).fenced == "stale_timeline"
    assert topo.promotion_candidate() is None


def test_fenced_node_is_released_when_it_returns_as_a_standby(clock: FakeClock) -> None:
    """After pg_rewind the old primary comes back as a standby on TL2 and serves reads."""
    topo, (n1, n2) = make(clock, fall=1, rise=1)
    topo.observe(n1, primary(tl=1))
    topo.observe(n2, primary(tl=2))
    assert now(n1).fenced
    topo.observe(n1, None, "OSError")
    assert now(n1).fenced  # an unreachable node keeps its fence
    events = topo.observe(n1, standby(tl=2, lsn=1000))
    topo.observe(n2, primary(tl=2, lsn=1000))
    assert now(n1).fenced is None and now(topo).readable == (n1,)
    released = [e for e in events if isinstance(e, PostgresNodeFenced)]
    assert released and not released[0].fenced and released[0].reason == "stale_timeline"


def test_two_primaries_on_one_timeline_stop_writes(clock: FakeClock) -> None:
    """Equal timelines cannot be ranked: both are fenced and writes are blocked until one yields."""
    topo, (n1, n2) = make(clock, rise=1)
    topo.observe(n1, primary(tl=2))
    events = topo.observe(n2, primary(tl=2))
    assert now(topo).primary is None
    assert now(topo).writes_blocked == ("split_brain", ("n1", "n2"))
    assert now(n1).fenced == now(n2).fenced == "split_brain"
    assert any(isinstance(e, PostgresWritesBlocked) and e.blocked for e in events)
    events = topo.observe(n2, standby(tl=2))
    assert now(topo).writes_blocked is None and now(topo).primary is n1 and now(n1).fenced is None
    assert any(isinstance(e, PostgresWritesBlocked) and not e.blocked for e in events)


def test_a_foreign_system_identifier_stops_writes(clock: FakeClock) -> None:
    """Without a pinned identifier, a node of another cluster stops writes altogether."""
    topo, (n1, n2) = make(clock)
    topo.observe(n1, primary())
    topo.observe(n2, standby(sysid=SYSID + 1))
    assert now(topo).system_identifier == SYSID
    assert now(topo).primary is None
    blocked = now(topo).writes_blocked
    assert blocked is not None and blocked[0] == "system_identifier"
    assert now(n2).fenced == "system_identifier" and n2 not in now(topo).readable
    topo.observe(n2, None, "OSError")
    topo.observe(n2, None, "OSError")
    assert now(topo).writes_blocked is None and now(topo).primary is n1


def test_a_pinned_identifier_fences_only_the_foreign_node(clock: FakeClock) -> None:
    """With the identifier given, the foreign node is fenced and the real primary keeps writing."""
    topo, (n1, n2) = make(clock, system_identifier=SYSID)
    topo.observe(n1, primary(sysid=SYSID + 1))
    topo.observe(n2, primary(sysid=SYSID))
    assert now(topo).primary is n2 and now(n1).fenced == "system_identifier"
    assert now(topo).writes_blocked is None


def test_read_only_primary_takes_no_writes(clock: FakeClock) -> None:
    """A primary running with default_transaction_read_only is not writable."""
    topo, (n1,) = make(clock, n=1)
    topo.observe(n1, primary(ro=True))
    assert now(topo).primary is None and now(topo).read_only_primary is n1
    topo.observe(n1, primary(ro=False))
    assert now(topo).primary is n1 and now(topo).read_only_primary is None


def test_a_lagging_standby_serves_no_reads_until_it_catches_up(clock: FakeClock) -> None:
    """Over max_lag_bytes the standby leaves the readers; it needs rise good probes to return."""
    topo, (n1, n2) = make(clock, rise=2, max_lag_bytes=100)
    topo.observe(n1, primary(lsn=1000))
    topo.observe(n2, standby(lsn=1000))
    assert now(topo).readable == (n2,)
    topo.observe(n1, primary(lsn=5000))
    assert now(n2).lag_bytes == 4000 and now(n2).lagging and now(topo).readable == ()
    topo.observe(n2, standby(lsn=4950))
    assert now(n2).lag_bytes == 50 and now(topo).readable == ()  # one good probe is not enough
    topo.observe(n2, standby(lsn=5000))
    assert now(topo).readable == (n2,)


def test_lag_hysteresis_does_not_flap(clock: FakeClock) -> None:
    """A standby that crosses the limit back and forth stays out of the readers."""
    topo, (n1, n2) = make(clock, rise=3, max_lag_bytes=100)
    topo.observe(n1, primary(lsn=1000))
    topo.observe(n2, standby(lsn=1000))
    for lsn in (2000, 3000, 4000):
        topo.observe(n1, primary(lsn=lsn))
        topo.observe(n2, standby(lsn=lsn))
        topo.observe(n2, standby(lsn=lsn - 500))
    assert now(n2).lagging


def test_unknown_lag_keeps_a_standby_out_until_the_primary_is_seen(clock: FakeClock) -> None:
    """With a lag limit, a standby discovered before the primary serves no reads yet."""
    topo, (n1, n2) = make(clock, max_lag_bytes=100)
    topo.observe(n2, standby(lsn=1000))
    assert now(topo).readable == ()
    topo.observe(n1, primary(lsn=1000))
    assert now(topo).readable == (n2,)


def test_lag_in_seconds_is_estimated_from_primary_positions(clock: FakeClock) -> None:
    """Lag seconds: how long ago the primary first had WAL the standby has not replayed."""
    topo, (n1, n2) = make(clock, max_lag_seconds=1.0)
    topo.observe(n1, primary(lsn=1000))
    topo.observe(n2, standby(lsn=1000))
    assert now(n2).lag_seconds == 0.0 and now(topo).readable == (n2,)
    clock.advance(0.5)
    topo.observe(n1, primary(lsn=2000))
    clock.advance(1.0)
    topo.observe(n1, primary(lsn=2000))  # idle primary: the estimate keeps growing for n2 only
    topo.observe(n2, standby(lsn=1000))
    assert now(n2).lag_seconds == pytest.approx(1.0)
    clock.advance(0.5)
    topo.observe(n2, standby(lsn=1000))
    assert now(n2).lag_seconds == pytest.approx(1.5) and now(n2).lagging
    topo.observe(n2, standby(lsn=2000))
    assert now(n2).lag_seconds == 0.0


def test_lag_is_not_compared_across_timelines(clock: FakeClock) -> None:
    """A standby still on TL1 next to a TL2 primary has no comparable lag and serves no reads."""
    topo, (n1, n2, n3) = make(clock, n=3, rise=1)
    topo.observe(n1, primary(tl=2, lsn=9000))
    topo.observe(n2, standby(tl=1, lsn=100))
    topo.observe(n3, standby(tl=2, lsn=9000))
    assert now(n2).lag_bytes is None
    assert now(topo).readable == (n3,)


def test_time_without_primary_and_failovers_are_counted(clock: FakeClock) -> None:
    """no_primary_seconds accumulates the gaps; failovers count moves to another node."""
    topo, (n1, n2) = make(clock, fall=1, rise=1)
    topo.observe(n1, primary())
    topo.observe(n2, standby())
    topo.observe(n1, None, "OSError")
    clock.advance(2.5)
    assert topo.no_primary_for() == pytest.approx(2.5)
    topo.observe(n2, primary(tl=2))
    assert now(topo).failovers == 1
    assert topo.no_primary_seconds() == pytest.approx(2.5)
    assert topo.no_primary_for() == 0.0


def test_same_primary_returning_is_not_a_failover(clock: FakeClock) -> None:
    """A primary that restarts and comes back is downtime, not a failover."""
    topo, (n1,) = make(clock, n=1, fall=1, rise=1)
    topo.observe(n1, primary())
    topo.observe(n1, None, "OSError")
    clock.advance(1.0)
    topo.observe(n1, primary())
    assert now(topo).failovers == 0 and topo.no_primary_seconds() == pytest.approx(1.0)


def test_all_down_only_after_every_node_was_probed(clock: FakeClock) -> None:
    """all_down needs a failed probe of every node, not just the absence of answers."""
    topo, (n1, n2) = make(clock, fall=1)
    assert not now(topo).all_down
    topo.observe(n1, None, "OSError")
    assert not now(topo).all_down
    topo.observe(n2, None, "OSError")
    assert now(topo).all_down
    topo.observe(n2, standby())  # one good probe: coming back, not confirmed, but not hopeless
    assert not now(topo).all_down and now(n2).reachable is False


def test_promotion_candidate_is_the_most_advanced_standby(clock: FakeClock) -> None:
    """auto_promote picks the reachable standby with the most WAL received, then list order."""
    topo, (n1, n2, n3) = make(clock, n=3, fall=1)
    topo.observe(n1, primary(lsn=5000))
    topo.observe(n2, standby(lsn=4000))
    topo.observe(n3, standby(lsn=4500))
    assert topo.promotion_candidate() is None  # a primary answers
    topo.observe(n1, None, "OSError")
    assert topo.promotion_candidate() is n3
    topo.observe(n3, standby(lsn=4000))
    assert topo.promotion_candidate() is n2


def test_hint_marks_the_node_suspect_until_the_next_probe(clock: FakeClock) -> None:
    """An error hint makes a node suspect; its next probe clears it."""
    topo, (n1,) = make(clock, n=1)
    topo.observe(n1, primary())
    topo.hint(n1)
    assert now(n1).suspect
    topo.observe(n1, primary())
    assert not now(n1).suspect


def test_status_snapshot(clock: FakeClock) -> None:
    """status() describes a node without exposing the model's internals."""
    topo, (n1, n2) = make(clock)
    topo.observe(n1, primary(lsn=2000))
    topo.observe(n2, standby(lsn=1500))
    s1, s2 = topo.status(n1), topo.status(n2)
    assert s1.active and s1.role == "primary" and not s1.readable
    assert s2.readable and s2.lag_bytes == 500 and s2.timeline == 1


def test_one_server_under_two_names_is_one_primary(clock: FakeClock) -> None:
    """Two names of one server (same identifier, timeline and start time) are not a split brain:
    the first name takes the writes, the other is its alias; switching between them is no
    failover. Another start time is another server: writes stop."""
    topo, (n1, n2, n3) = make(clock, n=3, rise=1)
    topo.observe(n1, primary(tl=2, started=100.0))
    topo.observe(n2, primary(tl=2, started=100.0))
    topo.observe(n3, standby(tl=2))
    assert now(topo).writes_blocked is None and now(topo).primary is n1
    assert now(n1).fenced is None and now(n2).fenced is None
    assert topo.status(n2).alias_of == "n1" and topo.status(n1).alias_of is None
    topo.observe(n1, None, "OSError")
    topo.observe(n1, None, "OSError")
    assert now(topo).primary is n2 and now(topo).failovers == 0
    topo.observe(n1, primary(tl=2, started=100.0))
    topo.observe(n2, primary(tl=2, started=200.0))  # restarted elsewhere: another server
    assert now(topo).writes_blocked == ("split_brain", ("n1", "n2"))
    assert topo.status(n2).alias_of is None


def test_min_timeline_fences_an_older_primary_from_the_start(clock: FakeClock) -> None:
    """With min_timeline=2, a lone primary on TL1 (seen first, nothing newer reachable) is fenced
    as stale; a primary on TL2 takes writes."""
    topo, (n1, n2) = make(clock, rise=1, min_timeline=2)
    topo.observe(n1, primary(tl=1))
    topo.observe(n2, None, "OSError")
    assert now(topo).primary is None and now(n1).fenced == "stale_timeline"
    topo.observe(n2, primary(tl=2))
    assert now(topo).primary is n2


def test_a_name_that_leads_to_a_promoted_server_is_a_failover(clock: FakeClock) -> None:
    """A name (a pooler, a moved address) whose primary comes back on a new timeline is counted
    as a failover, and the connections opened before are evicted."""
    topo, (n1,) = make(clock, n=1, rise=1)
    topo.observe(n1, primary(tl=1, started=100.0))
    generation = n1.generation
    events = topo.observe(n1, primary(tl=2, started=200.0))
    assert now(topo).primary is n1 and now(topo).failovers == 1
    assert any(isinstance(e, PostgresFailoverDetected) for e in events)
    assert now(n1).generation > generation


def test_writes_wait_for_the_fencing_record_and_its_floor_fences(clock: FakeClock) -> None:
    """Awaiting a fencing record, no node takes writes; the record's timeline then fences an
    older primary, as if a node had reported it."""
    topo, (n1, n2) = make(clock, rise=1, await_floor=True)
    topo.observe(n1, primary(tl=1))
    topo.observe(n2, None, "OSError")
    assert now(topo).primary is None and topo.promotion_candidate() is None
    topo.set_timeline_floor(2)
    assert now(topo).primary is None and now(n1).fenced == "stale_timeline"
    other, (m1,) = make(clock, n=1, await_floor=True)
    other.observe(m1, primary(tl=1))
    other.set_timeline_floor(None)  # nothing recorded yet: writes go ahead
    assert now(other).primary is m1
