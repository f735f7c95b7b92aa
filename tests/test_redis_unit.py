"""The Redis integration's logic without servers: what is safe to retry, whom to believe, errors."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from collections.abc import Awaitable
from typing import Any

import pytest
import redis.exceptions as rex

import veritas_resilience.redis as vredis
from veritas_resilience import CircuitBreaker, RetryBudgetExhaustedError
from veritas_resilience.errors import CircuitOpenError, ResilienceError
from veritas_resilience.redis import (
    NoMasterError,
    NoSentinelAvailableError,
    OutcomeUnknownError,
    PoolExhaustedError,
    RedisAuthenticationError,
    RedisCircuitOpenError,
    RedisUnavailableError,
    RetryPolicy,
    SentinelRedis,
    UnknownServiceError,
    retry_unknown_outcome,
)
from veritas_resilience.redis._commands import (
    FencedReplyError,
    RoleMismatchError,
    StaleConnectionError,
    classify,
    is_idempotent,
    mark_unsent,
)
from veritas_resilience.redis._retry import CallGuard
from veritas_resilience.redis._topology import (
    SentinelAnswer,
    SentinelTopology,
    choose_master,
    elect_master,
    failover_leader,
    healthy_replicas,
    parse_answer,
    role_problem,
)
from veritas_resilience.retry import RetryBudget
from veritas_resilience.testing import FakeClock


@pytest.fixture
def anyio_backend() -> str:
    """The Redis integration is asyncio-only (redis.asyncio)."""
    return "asyncio"


# -- what is safe to retry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason", "refresh"),
    [
        (rex.ReadOnlyError("You can't write against a read only replica."), "readonly", "readonly"),
        (rex.BusyLoadingError("Redis is loading the dataset in memory"), "loading", None),
        (rex.MasterDownError("Link with MASTER is down"), "masterdown", "readonly"),
        (rex.TryAgainError("Multiple keys request during rehashing of slot"), "tryagain", None),
        (rex.ResponseError("NOREPLICAS Not enough good replicas to write."), "noreplicas", None),
        (
            rex.ResponseError(
                "Command # 1 (BLPOP q 0) of pipeline caused error: UNBLOCKED force unblock"
            ),
            "unblocked",
            "readonly",
        ),
        (StaleConnectionError("older generation"), "stale_connection", None),
        (RoleMismatchError("ROLE slave"), "role_mismatch", "role_check"),
        (NoMasterError(name="m", service="m", reason="failover"), "no_master", None),
        (CircuitOpenError("redis:m", "open", 1.0), "circuit_open", None),
    ],
)
def test_replies_that_prove_nothing_ran_are_retryable_for_any_command(
    error: BaseException, reason: str, refresh: str | None
) -> None:
    """READONLY, LOADING, MASTERDOWN, TRYAGAIN, NOREPLICAS, UNBLOCKED, unsent: the command did
    not run."""
    failure = classify(error)
    assert failure is not None
    assert failure.reason == reason
    assert failure.executed is False
    assert failure.refresh == refresh


def test_a_connection_lost_after_sending_leaves_the_outcome_unknown() -> None:
    """A ConnectionError or TimeoutError after sending is 'unknown'; before sending, 'not run'."""
    lost = classify(rex.ConnectionError("Error while reading from 127.0.0.1:6380"))
    timeout = classify(rex.TimeoutError("Timeout reading from 127.0.0.1:6380"))
    unsent = classify(mark_unsent(rex.ConnectionError("Error 111 connecting to 127.0.0.1:6380")))
    assert lost is not None and lost.executed is None and lost.reason == "connection"
    assert timeout is not None and timeout.executed is None and timeout.reason == "timeout"
    assert unsent is not None and unsent.executed is False and unsent.reason == "connect"


@pytest.mark.parametrize(
    "error",
    [
        rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        rex.AuthenticationError("invalid password"),
        rex.MaxConnectionsError("Too many connections"),
        rex.DataError("Invalid input"),
        UnknownServiceError(name="m", service="nosuch", sentinels=["127.0.0.1:26379"]),
        ValueError("a bug"),
    ],
)
def test_errors_about_the_command_or_the_configuration_are_not_retried(error: Exception) -> None:
    """Server errors about the command, bad credentials, a full pool and bugs go to the caller."""
    assert classify(error) is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("GET", "k"), True),
        (("MGET", "a", "b"), True),
        (("SET", "k", "v"), True),
        (("SET", "k", "v", "EX", 10), True),
        (("SET", "k", "v", "NX"), False),
        ((b"SET", b"k", b"v", b"px", 5, b"xx"), False),
        (("SET", "k", "v", "GET"), False),
        (("INCR", "k"), False),
        (("DEL", "k"), False),
        (("HSET", "h", "f", "v"), False),
        (("CLIENT", "LIST"), True),
        (("CLIENT LIST",), True),
        (("CONFIG", "SET", "x", "y"), False),
        (("EVALSHA", "abc", 0), False),
    ],
)
def test_idempotent_commands_are_those_that_may_run_twice(
    args: tuple[Any, ...], expected: bool
) -> None:
    """Reads and plain SETs may run twice; INCR, DEL, SET NX/XX/GET may not."""
    assert is_idempotent(args) is expected


def test_callers_can_declare_more_commands_idempotent() -> None:
    """``RetryPolicy(idempotent_commands=...)`` extends the list, case-insensitively."""
    policy = RetryPolicy(idempotent_commands={"hset", "DEL"})
    assert is_idempotent(("HSET", "h", "f", "v"), policy.idempotent_commands)
    assert is_idempotent(("DEL", "k"), policy.idempotent_commands)
    assert not is_idempotent(("INCR", "k"), policy.idempotent_commands)


# -- whom to believe ------------------------------------------------------------------------------

S1, S2, S3 = ("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26379)
OLD, NEW = ("10.0.1.1", 6379), ("10.0.1.2", 6379)


def test_the_highest_config_epoch_wins_over_a_majority_of_stale_sentinels() -> None:
    """A Sentinel that ran the failover (higher epoch) is believed against two stale ones."""
    answers = [SentinelAnswer(S1, OLD, 3), SentinelAnswer(S2, OLD, 3), SentinelAnswer(S3, NEW, 4)]
    assert choose_master(answers, OLD) == (NEW, 4)


def test_a_stale_sentinel_cannot_move_the_client_back() -> None:
    """A restarted Sentinel naming the old master with an old epoch is outvoted (redis#12798)."""
    answers = [SentinelAnswer(S1, OLD, 3), SentinelAnswer(S2, NEW, 4)]
    assert choose_master(answers, NEW) == (NEW, 4)


def test_equal_epochs_go_by_votes_and_a_tie_keeps_the_current_master() -> None:
    """Among equal epochs the most named address wins; a tie keeps what the client has."""
    votes = [SentinelAnswer(S1, OLD, 1), SentinelAnswer(S2, NEW, 1), SentinelAnswer(S3, NEW, 1)]
    assert choose_master(votes, OLD) == (NEW, 1)
    tie = [SentinelAnswer(S1, OLD, 1), SentinelAnswer(S2, NEW, 1)]
    assert choose_master(tie, OLD) == (OLD, 1)
    assert choose_master(tie, NEW) == (NEW, 1)
    assert choose_master([SentinelAnswer(S1, None)], OLD) is None


FOREIGN, S4 = ("10.0.9.9", 6379), ("10.0.9.1", 26379)


def _replica(address: tuple[str, int]) -> tuple[tuple[str, int], frozenset[str], str]:
    return (address, frozenset({"slave"}), "ok")


def test_a_master_needs_a_quorum_of_the_configured_sentinels_behind_it() -> None:
    """A listed Sentinel naming another deployment's master with a higher epoch is outvoted and
    reported; a just-promoted replica that the others know as a replica is backed at once."""
    voters = {S1, S2, S3, S4}
    ours = [SentinelAnswer(s, OLD, 3, replicas=(_replica(NEW),)) for s in (S1, S2, S3)]
    foreign = SentinelAnswer(S4, FOREIGN, 9)
    election = elect_master([*ours, foreign], OLD, voters=voters, quorum=3)
    assert election.candidates == ((OLD, 3),)
    assert election.disagreeing == ((S4, FOREIGN),)
    promoted = [SentinelAnswer(S1, NEW, 4, replicas=(_replica(OLD),)), *ours[1:]]
    election = elect_master(promoted, OLD, voters={S1, S2, S3}, quorum=2)
    assert election.candidates[0] == (NEW, 4)
    assert election.disagreeing == ()


def test_without_a_quorum_nothing_is_elected_and_nobody_is_called_a_dissenter() -> None:
    """One Sentinel of three answering, or votes from Sentinels that are not configured, elect
    nothing; that is a lack of quorum, not a disagreement."""
    alone = elect_master([SentinelAnswer(S1, OLD, 3)], OLD, voters={S1, S2, S3}, quorum=2)
    assert alone.candidates == () and alone.disagreeing == () and alone.named
    outsiders = [SentinelAnswer(S4, FOREIGN, 9), SentinelAnswer(S1, OLD, 3)]
    assert elect_master(outsiders, None, voters={S1, S2, S3}, quorum=2).candidates == ()


def test_writes_are_held_while_a_leader_fails_the_master_over_until_it_promotes() -> None:
    """A master flagged failover_in_progress by its own record is held; once the leader names
    the promoted replica (its record still the old master), the new one is chosen."""
    flags = frozenset({"master", "failover_in_progress"})
    before = [SentinelAnswer(S1, OLD, 3), SentinelAnswer(S2, OLD, 3, flags, record=OLD)]
    assert failover_leader(before, OLD) == S2
    promoted = [SentinelAnswer(S1, OLD, 3), SentinelAnswer(S2, NEW, 4, flags, record=OLD)]
    assert choose_master(promoted, OLD) == (NEW, 4)
    assert failover_leader(promoted, NEW) is None


@pytest.mark.anyio
async def test_the_hold_outlasts_a_lookup_the_leader_missed_and_ends_when_it_answers() -> None:
    """While the leader is silent the old master stays held (up to a bound); its answer without
    the flag ends the hold."""
    clock = FakeClock(100.0)
    topology = _topology(clock)
    flags = frozenset({"master", "failover_in_progress"})
    assert topology._holding(
        [SentinelAnswer(S1, OLD, 3), SentinelAnswer(S2, OLD, 3, flags, record=OLD)], OLD
    )
    assert topology._holding([SentinelAnswer(S1, OLD, 3)], OLD)
    clock.advance(11)
    assert not topology._holding([SentinelAnswer(S1, OLD, 3)], OLD)
    assert topology._holding([SentinelAnswer(S2, OLD, 3, flags, record=OLD)], OLD)
    assert not topology._holding(
        [SentinelAnswer(S2, OLD, 3, frozenset({"master"}), record=OLD)], OLD
    )


def test_sentinel_replies_are_read_in_resp2_and_resp3_shapes() -> None:
    """Flat key/value lists (RESP2) and maps (RESP3) give the same answer."""
    master_resp2 = ["name", "mymaster", "ip", "10.0.1.2", "port", "6379", "flags", "master",
                    "config-epoch", "7"]  # fmt: skip
    replica_resp3 = {"ip": "10.0.1.1", "port": "6379", "flags": "slave",
                     "master-link-status": "ok"}  # fmt: skip
    answer = parse_answer(
        S1,
        [["10.0.1.2", "6379"], master_resp2, [replica_resp3], [{"ip": "10.0.0.2", "port": 26379}]],
    )
    assert answer.master == NEW
    assert answer.epoch == 7
    assert answer.replicas == ((OLD, frozenset({"slave"}), "ok"),)
    assert answer.sentinels == (S2,)
    unknown = parse_answer(S1, [None, rex.ResponseError("No such master with that name"), [], []])
    assert unknown.master is None


def test_replicas_that_are_down_or_cut_off_from_the_master_are_not_read_from() -> None:
    """s_down, o_down, disconnected and a master link not ``ok`` exclude a replica."""
    r = [(f"10.0.2.{i}", 6379) for i in range(5)]
    answer = SentinelAnswer(
        S1,
        NEW,
        2,
        replicas=(
            (r[0], frozenset({"slave"}), "ok"),
            (r[1], frozenset({"slave", "s_down"}), "ok"),
            (r[2], frozenset({"slave", "disconnected"}), "ok"),
            (r[3], frozenset({"slave"}), "err"),
            (r[4], frozenset({"slave", "o_down"}), "ok"),
        ),
    )
    assert healthy_replicas([answer], NEW) == [r[0]]


def test_role_replies_are_checked_for_the_role_and_the_replication_link() -> None:
    """A master must say master; a replica must say slave with its link ``connected``."""
    assert role_problem(["master", 10, []], "master") is None
    assert role_problem(["slave", "10.0.1.2", 6379, "connected", 10], "master") is not None
    assert role_problem([b"slave", b"10.0.1.2", 6379, b"connected", 10], "replica") is None
    assert "connect" in (role_problem(["slave", "10.0.1.2", 6379, "connect", -1], "replica") or "")
    assert role_problem(["master", 0, []], "replica") is not None


def _topology(clock: FakeClock | None = None) -> SentinelTopology:
    return SentinelTopology(
        [S1, S2],
        "mymaster",
        name="mymaster",
        sentinel_kwargs={},
        node_kwargs={},
        sentinel_timeout=0.5,
        poll_interval=10,
        degraded_poll_interval=0.5,
        subscribe=True,
        discover_sentinels=False,
        ping_interval=1.0,
        clock=clock or FakeClock(),
        hooks=[],
    )


@pytest.mark.anyio
async def test_only_events_about_the_service_trigger_a_lookup() -> None:
    """Events of other masters, and events without a master name, are ignored."""
    topology = _topology()
    asked: list[str] = []
    topology.request_refresh = lambda source: asked.append(source)  # type: ignore[assignment, method-assign, return-value]
    topology.on_event("+switch-master", "other 10.0.1.1 6379 10.0.1.2 6379")
    topology.on_event("+tilt", "#tilt mode entered")
    topology.on_event("+sdown", "slave 10.0.1.9:6379 10.0.1.9 6379 @ other 10.0.1.1 6379")
    assert asked == []
    topology.on_event("+switch-master", "mymaster 10.0.1.1 6379 10.0.1.2 6379")
    topology.on_event("+odown", "master mymaster 10.0.1.1 6379 #quorum 2/2")
    topology.on_event("+sdown", "slave 10.0.1.9:6379 10.0.1.9 6379 @ mymaster 10.0.1.1 6379")
    assert asked == ["event", "event", "event"]


# -- the guard: retries, deadline, breaker --------------------------------------------------------


class Script:
    """An attempt function that raises the given errors in turn, then returns ``"OK"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "OK"


def _guard(clock: FakeClock, **kwargs: Any) -> tuple[CallGuard, list[str]]:
    settled: list[str] = []

    async def settle(source: str, within: float) -> None:
        settled.append(source)

    policy = kwargs.pop("policy", RetryPolicy(deadline=5.0))
    guard = CallGuard(
        name="mymaster", policy=policy, breaker=None, settle=settle, clock=clock, hooks=[], **kwargs
    )
    return guard, settled


async def _recover(
    guard: CallGuard, script: Script, args: tuple[Any, ...], started: float
) -> Awaitable[Any] | Any:
    first = script.errors.pop(0)
    return await guard.recover(first, started, script, str(args[0]), lambda: is_idempotent(args))


@pytest.mark.anyio
async def test_a_readonly_write_is_retried_after_the_master_is_looked_up_again() -> None:
    """READONLY: any command is retried once the lookup it triggered is done."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, settled = _guard(clock)
    script = Script(rex.ReadOnlyError("You can't write against a read only replica."))
    assert await _recover(guard, script, ("INCR", "k"), clock.monotonic()) == "OK"
    assert settled == ["readonly"]
    assert guard.retries() == {"readonly": 1}
    assert script.calls == 1


@pytest.mark.anyio
async def test_a_write_whose_connection_broke_after_sending_is_not_repeated() -> None:
    """INCR after a lost connection raises OutcomeUnknownError and is not sent again."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock)
    script = Script(rex.ConnectionError("Error while reading from 127.0.0.1:6380"))
    with pytest.raises(OutcomeUnknownError) as caught:
        await _recover(guard, script, ("INCR", "k"), clock.monotonic())
    assert script.calls == 0
    assert caught.value.command == "INCR"
    assert caught.value.node == "127.0.0.1:6380"
    assert isinstance(caught.value.__cause__, rex.ConnectionError)


@pytest.mark.anyio
async def test_idempotent_and_opted_in_commands_are_retried_after_a_lost_connection() -> None:
    """GET is retried after a lost connection; INCR too inside retry_unknown_outcome()."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock)
    get = Script(rex.ConnectionError("lost"))
    assert await _recover(guard, get, ("GET", "k"), clock.monotonic()) == "OK"
    incr = Script(rex.TimeoutError("Timeout reading from 127.0.0.1:6380"))
    with retry_unknown_outcome():
        assert await _recover(guard, incr, ("INCR", "k"), clock.monotonic()) == "OK"
    assert guard.retries() == {"connection": 1, "timeout": 1}


@pytest.mark.anyio
async def test_retries_stop_at_the_deadline_with_the_last_error_as_cause() -> None:
    """A failover longer than the deadline ends in RedisUnavailableError after the deadline."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock, policy=RetryPolicy(deadline=2.0, backoff_max=0.25))
    errors = [NoMasterError(name="m", service="m", reason="failover") for _ in range(1000)]
    script = Script(*errors)
    with pytest.raises(RedisUnavailableError) as caught:
        await _recover(guard, script, ("SET", "k", "v"), clock.monotonic())
    assert caught.value.reason == "no_master"
    assert caught.value.attempts == script.calls + 1
    assert 2.0 <= clock.monotonic() - 100.0 <= 2.0 + 1e-6
    assert isinstance(caught.value.__cause__, NoMasterError)
    assert max(clock.slept) <= 0.25


@pytest.mark.anyio
async def test_max_attempts_bounds_the_retries() -> None:
    """``max_attempts=3`` makes three attempts in all."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock, policy=RetryPolicy(max_attempts=3))
    script = Script(*[rex.BusyLoadingError("loading") for _ in range(10)])
    with pytest.raises(RedisUnavailableError) as caught:
        await _recover(guard, script, ("GET", "k"), clock.monotonic())
    assert caught.value.attempts == 3
    assert script.calls == 2


@pytest.mark.anyio
async def test_a_server_error_about_the_command_reaches_the_caller_unchanged() -> None:
    """WRONGTYPE is not retried and is raised as redis-py raised it."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock)
    error = rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    script = Script(error)
    with pytest.raises(rex.ResponseError) as caught:
        await _recover(guard, script, ("INCR", "k"), clock.monotonic())
    assert caught.value is error
    assert guard.retries() == {}


@pytest.mark.anyio
async def test_a_replica_client_does_not_retry_a_write_refused_as_readonly() -> None:
    """On a replica client READONLY means a misrouted write: raised at once."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock, role="replica")
    script = Script(rex.ReadOnlyError("You can't write against a read only replica."))
    with pytest.raises(rex.ReadOnlyError):
        await _recover(guard, script, ("SET", "k", "v"), clock.monotonic())


@pytest.mark.anyio
async def test_a_shared_retry_budget_caps_the_retries() -> None:
    """With an empty RetryBudget the call fails with RetryBudgetExhaustedError."""
    clock = FakeClock(100.0, auto_advance=True)
    budget = RetryBudget(name="redis", capacity=1, refill_rate=0, clock=clock, hooks=[])
    guard, _ = _guard(clock, budget=budget)
    first = Script(rex.BusyLoadingError("loading"))
    assert await _recover(guard, first, ("GET", "k"), clock.monotonic()) == "OK"
    second = Script(rex.BusyLoadingError("loading"))
    with pytest.raises(RetryBudgetExhaustedError):
        await _recover(guard, second, ("GET", "k"), clock.monotonic())


@pytest.mark.anyio
async def test_an_open_breaker_is_waited_out_within_the_deadline_and_raised_beyond_it() -> None:
    """CircuitOpenError with retry_after inside the deadline is retried, else raised at once."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock, policy=RetryPolicy(deadline=5.0))
    short = Script(CircuitOpenError("redis:m", "open", 1.0))
    assert await _recover(guard, short, ("GET", "k"), clock.monotonic()) == "OK"
    assert max(clock.slept) >= 1.0
    long = Script(CircuitOpenError("redis:m", "open", 30.0))
    with pytest.raises(CircuitOpenError):
        await _recover(guard, long, ("GET", "k"), clock.monotonic())


@pytest.mark.anyio
async def test_the_breaker_counts_node_failures_and_ignores_waiting_for_a_master() -> None:
    """READONLY counts against the breaker; NoMasterError (nothing sent) does not."""
    from veritas_resilience.redis._client import _default_breaker

    breaker = _default_breaker("mymaster", FakeClock(), [])
    assert isinstance(breaker, CircuitBreaker)

    async def fail(error: Exception) -> None:
        raise error

    for _ in range(20):
        with pytest.raises(NoMasterError):
            await breaker.call(fail, NoMasterError(name="m", service="m", reason="x"))
    assert breaker.state.value == "closed"
    for _ in range(10):
        with pytest.raises(rex.ReadOnlyError):
            await breaker.call(fail, rex.ReadOnlyError("readonly"))
    assert breaker.state.value == "open"


def test_retry_policy_rejects_values_out_of_range_naming_the_field() -> None:
    """Bad settings raise ValueError (or TypeError) naming the parameter."""
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline=0)
    with pytest.raises(ValueError, match="backoff_max"):
        RetryPolicy(backoff_base=1.0, backoff_max=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError, match="idempotent_commands"):
        RetryPolicy(idempotent_commands="GET")
    policy = RetryPolicy(backoff_base=0.01, backoff_max=0.2)
    waits = [policy.backoff(n) for n in range(1, 30)]
    assert all(0 <= w <= 0.2 for w in waits)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sentinels": []}, "sentinels"),
        ({"sentinels": ["no-port"]}, "sentinels"),
        ({"sentinels": [("h", 0)]}, "sentinels"),
        ({"service_name": ""}, "service_name"),
        ({"read_from": "nearest"}, "read_from"),
        ({"max_connections": 0}, "max_connections"),
        ({"db": -1}, "db"),
        ({"sentinel_timeout": 0}, "sentinel_timeout"),
        ({"poll_interval": -1}, "poll_interval"),
    ],
)
def test_client_settings_are_checked_at_construction(kwargs: dict[str, Any], field: str) -> None:
    """A bad argument raises ValueError naming it, before anything connects."""
    args: dict[str, Any] = {"sentinels": [("127.0.0.1", 26379)], "service_name": "mymaster"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        SentinelRedis(args.pop("sentinels"), args.pop("service_name"), hooks=[], **args)


def test_address_remap_must_be_a_function() -> None:
    """address_remap that cannot be called is refused at construction, naming the parameter."""
    with pytest.raises(TypeError, match="address_remap must be a function"):
        SentinelRedis(
            [("127.0.0.1", 26379)],
            "mymaster",
            hooks=[],
            address_remap="10.0.0.1:6379",  # type: ignore[arg-type]
        )


# -- errors -----------------------------------------------------------------------------------


def test_errors_belong_to_both_the_library_tree_and_redis_py_s() -> None:
    """Every error is a ResilienceError and the redis-py error a redis-py caller would catch."""
    for error in (
        NoSentinelAvailableError(name="m", sentinels=["127.0.0.1:1"], errors=["refused"]),
        UnknownServiceError(name="m", service="x", sentinels=["127.0.0.1:1"]),
        NoMasterError(name="m", service="m", reason="failover", candidate="127.0.0.1:2"),
        vredis.NoReplicaError(name="m", service="m"),
        OutcomeUnknownError(name="m", command="INCR", node="127.0.0.1:2", attempts=1),
        RedisUnavailableError(name="m", command="SET", attempts=3, elapsed=1.0, reason="x"),
    ):
        assert isinstance(error, ResilienceError)
        assert isinstance(error, vredis.RedisError)
        assert isinstance(error, rex.ConnectionError)
        assert "127.0.0.1" in str(error) or "m" in str(error)
    assert not issubclass(UnknownServiceError, NoSentinelAvailableError)
    assert not issubclass(NoSentinelAvailableError, UnknownServiceError)


def test_no_sentinel_error_names_every_sentinel_and_no_password() -> None:
    """The message lists host:port of each Sentinel with its error; passwords are redacted."""
    from veritas_resilience.redis._topology import describe

    error = NoSentinelAvailableError(
        name="m",
        sentinels=["127.0.0.1:1", "127.0.0.1:2"],
        errors=[
            describe(rex.ConnectionError("Error 111 connecting to 127.0.0.1:1.")),
            describe(rex.AuthenticationError("redis://u:hunter2@127.0.0.1:2 password=hunter2")),
        ],
    )
    assert "127.0.0.1:1" in str(error) and "127.0.0.1:2" in str(error)
    assert "hunter2" not in str(error)


# -- public surface ---------------------------------------------------------------------------


def test_all_lists_exactly_the_public_names_sorted() -> None:
    """``__all__`` is sorted and holds every public name of the module, each documented."""
    public = {
        name
        for name, value in vars(vredis).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert sorted(vredis.__all__) == vredis.__all__
    assert set(vredis.__all__) == public
    for name in vredis.__all__:
        obj = getattr(vredis, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_importing_the_library_does_not_import_redis() -> None:
    """``import veritas_resilience`` leaves redis-py unimported; only the integration loads it."""
    code = (
        "import sys, veritas_resilience; assert 'redis' not in sys.modules, 'redis imported'; "
        "import veritas_resilience.redis; assert 'redis' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.anyio
async def test_a_reply_from_a_replaced_master_is_retried_or_has_an_unknown_outcome() -> None:
    """FencedReplyError: SET runs again (on the new master, at once); RPUSH fails with
    OutcomeUnknownError whose reason says the reply came from a replaced master."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock)
    assert await _recover(guard, Script(FencedReplyError("late")), ("SET", "k", "v"), 100.0) == "OK"
    assert guard.retries() == {"fenced_reply": 1}
    assert clock.slept == []
    with pytest.raises(OutcomeUnknownError) as caught:
        await _recover(guard, Script(FencedReplyError("late")), ("RPUSH", "l", "x"), 100.0)
    assert caught.value.reason == "fenced_reply"
    assert "switched to another master" in str(caught.value)


@pytest.mark.anyio
async def test_driver_errors_that_stand_for_ours_are_mapped_and_never_retried() -> None:
    """A raw AuthenticationError becomes RedisAuthenticationError, MaxConnectionsError
    PoolExhaustedError, CircuitOpenError RedisCircuitOpenError; none is retried."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock)
    cases = [
        (rex.AuthenticationError("invalid password"), RedisAuthenticationError),
        (rex.MaxConnectionsError("Too many connections"), PoolExhaustedError),
        (CircuitOpenError("redis:mymaster", "forced_open", math.inf), RedisCircuitOpenError),
    ]
    for error, expected in cases:
        with pytest.raises(expected) as caught:
            await _recover(guard, Script(error), ("GET", "k"), 100.0)
        assert caught.value.__cause__ is error
        assert isinstance(caught.value, rex.ConnectionError)
    assert guard.retries() == {}


@pytest.mark.anyio
async def test_running_out_of_time_with_no_sentinel_answering_says_so() -> None:
    """Retries through NoSentinelAvailableError end in a copy of it (not RedisUnavailableError),
    with its own traceback."""
    clock = FakeClock(100.0, auto_advance=True)
    guard, _ = _guard(clock, policy=RetryPolicy(deadline=1.0))
    errors = [
        NoSentinelAvailableError(name="m", sentinels=["127.0.0.1:1"], errors=["refused"])
        for _ in range(1000)
    ]
    with pytest.raises(NoSentinelAvailableError) as caught:
        await _recover(guard, Script(*errors), ("SET", "k", "v"), 100.0)
    assert caught.value.sentinels == ("127.0.0.1:1",)
    assert all(caught.value is not e for e in errors)
