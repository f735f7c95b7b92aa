"""The recovery engine: alerts in, decisions out, actions run in the background.

Alertmanager delivers at least once: it re-sends a group every ``repeat_interval``, retries a
failed POST, and each member of an HA pair sends its own copy. So every decision about an alert
is taken when it arrives, before the answer is sent and without awaiting anything, keyed by
``(fingerprint, startsAt)``: the first copy of a firing alert starts an incident, every later copy
is a ``duplicate``. Actions then run in background tasks, never on the request.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .. import _hooks
from .._clock import MONOTONIC, Clock
from .._redact import redact
from .._validate import Seconds, positive_int, seconds
from ..events import Hook
from ..instrumentation.prometheus import HistogramValue
from ._actions import Action, Step, action_name
from ._events import DECISIONS, REJECTIONS, AlertsTruncated, NotificationRejected, RecoveryDecision
from ._payload import Alert, Notification

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._asgi import ReceiverApp

__all__ = ["Recovery", "RecoveryRule"]

_HOUR = 3600.0
_names = itertools.count(1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryRule:
    """What :meth:`Recovery.on` registered: which alerts, and the ladder of steps to climb.

    Attributes:
        alertname: The ``alertname`` it handles.
        labels: Labels the alert must also carry, with these values.
        steps: The rungs, in order.
        escalate_after: Seconds an alert may keep firing after a rung before the next one runs.
        escalate: The hook run after the last rung, if the alert still fires then.
    """

    alertname: str
    labels: Mapping[str, str]
    steps: tuple[Step, ...]
    escalate_after: float | None
    escalate: Action | None

    def matches(self, alert: Alert) -> bool:
        """Whether ``alert`` is one this rule handles."""
        labels = alert.labels
        return labels.get("alertname") == self.alertname and all(
            labels.get(k) == v for k, v in self.labels.items()
        )


@dataclass(slots=True, eq=False)
class _StepState:
    last_run: float | None = None
    runs: deque[float] = field(default_factory=deque)


@dataclass(slots=True, eq=False)
class _Incident:
    rule: RecoveryRule
    alert: Alert
    ran: list[int] = field(default_factory=list)
    resolved: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    timer: anyio.CancelScope | None = None
    wake_at: float | None = None
    started: float = 0.0


class Recovery(_hooks.Instrumented):
    """Runs recovery actions when Alertmanager says an alert fires, and reverts them when it ends.

    Register what to do per alert name, then serve :meth:`asgi` where Alertmanager's webhook
    points (``POST /alerts``)::

        recovery = Recovery(token=os.environ["RECOVERY_TOKEN"], journal="/var/log/recovery.jsonl")
        recovery.on("VeritasBreakerOpen", isolate_breaker(registry), cooldown=300)
        recovery.on(
            "VeritasPostgresNoPrimary",
            [reprobe_postgres(db), Step(action=promote_standby, budget=1)],
            escalate_after=120,
            escalate=page_oncall,
        )
        app = recovery.asgi()

    Each firing alert (one ``(fingerprint, startsAt)``) is an incident: the first rung runs at
    once; while the alert keeps firing, the next rung runs ``escalate_after`` seconds later, and
    after the last one the ``escalate`` hook. A rung in its ``cooldown`` or out of ``budget`` is
    skipped (and said so); the ladder goes on. When the alert resolves, the reverts of the rungs
    that ran are run, last first. Every decision is an event (metrics, a structlog line) and a
    line of the JSON-lines ``journal``.

    Args:
        token: The bearer token Alertmanager sends (``http_config.authorization``); several
            may be given while rotating.
        basic_auth: ``(username, password)`` Alertmanager sends (``http_config.basic_auth``).
            At least one of ``token`` and ``basic_auth`` is required: the endpoint acts.
        dry_run: Decide and record everything, run nothing.
        journal: Where to append one JSON object per decision: a path, or an open text file.
        escalate: The escalation hook of rules that do not name their own.
        max_body: The largest request body accepted, in bytes (413 beyond).
        read_timeout: Seconds a client may take to send its body (408 beyond), so a stalled
            connection cannot hold the receiver.
        retention: Seconds an incident is remembered after it resolved, so late duplicates of
            it are recognised.
        max_incidents: The most incidents remembered (the oldest resolved ones go first).
        name: The receiver's name in metrics, events and logs.
        clock: Time source of cooldowns, budgets and escalation delays.
        hooks: Hooks for this receiver; the process defaults when ``None``.

    Raises:
        ValueError: Without credentials, or with a setting out of range (the message names it).
    """

    def __init__(
        self,
        *,
        token: str | Sequence[str] | None = None,
        basic_auth: tuple[str, str] | None = None,
        dry_run: bool = False,
        journal: str | PathLike[str] | IO[str] | None = None,
        escalate: Action | None = None,
        max_body: int = 1024 * 1024,
        read_timeout: Seconds = 10.0,
        retention: Seconds = 24 * _HOUR,
        max_incidents: int = 10_000,
        name: str | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        tokens = (token,) if isinstance(token, str) else tuple(token or ())
        if any(not isinstance(t, str) or not t for t in tokens):
            raise ValueError("token must be a non-empty string (or a sequence of them)")
        if basic_auth is not None and (
            not isinstance(basic_auth, tuple)
            or len(basic_auth) != 2
            or not all(isinstance(p, str) and p for p in basic_auth)
        ):
            raise ValueError("basic_auth must be a (username, password) pair of non-empty strings")
        if not tokens and basic_auth is None:
            raise ValueError(
                "token or basic_auth is required: the receiver runs actions, so it must know "
                "who calls it"
            )
        if escalate is not None and not callable(escalate):
            raise TypeError(f"escalate must be an async function of the alert, got {escalate!r}")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
            raise ValueError(f"max_body must be an int >= 1024 bytes, got {max_body!r}")
        positive_int(max_incidents, "max_incidents")
        self._name = name if name else f"recovery-{next(_names)}"
        self._tokens = tokens
        self._basic_auth = basic_auth
        self._dry_run = bool(dry_run)
        self._escalate = escalate
        self._max_body = max_body
        self._read_timeout = seconds(read_timeout, "read_timeout")
        self._retention = seconds(retention, "retention")
        self._max_incidents = max_incidents
        self._clock = clock
        self._rules: list[RecoveryRule] = []
        self._steps: dict[int, _StepState] = {}
        self._incidents: OrderedDict[tuple[int, str, str], _Incident] = OrderedDict()
        self._resolved_at: dict[tuple[int, str, str], float] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._loose: set[Any] = set()
        self._busy = 0
        self._idle: anyio.Event | None = None
        self._journal_file: IO[str] | None = None
        self._journal_owned = False
        if journal is not None:
            if isinstance(journal, (str, PathLike)):
                self._journal_file = open(journal, "a", encoding="utf-8")  # noqa: SIM115
                self._journal_owned = True
            else:
                self._journal_file = journal
        self._n_notifications = dict.fromkeys(("accepted", *REJECTIONS), 0)
        self._n_decisions: dict[tuple[str, str], int] = {}
        self._n_truncated = 0
        self._init_hooks(hooks)

    # -- registration ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The receiver's name."""
        return self._name

    @property
    def dry_run(self) -> bool:
        """Whether actions are only recorded, not run."""
        return self._dry_run

    @property
    def rules(self) -> tuple[RecoveryRule, ...]:
        """The registered rules, in order."""
        return tuple(self._rules)

    def on(
        self,
        alertname: str,
        action: Action | Step | Sequence[Action | Step],
        *,
        revert: Action | None = None,
        labels: Mapping[str, str] | None = None,
        cooldown: Seconds = 0.0,
        budget: int | None = None,
        timeout: Seconds = 30.0,
        escalate_after: Seconds | None = None,
        escalate: Action | None = None,
    ) -> RecoveryRule:
        """Handle alerts called ``alertname`` (and carrying ``labels``) with an action, or a ladder.

        Args:
            alertname: The alert's name, e.g. ``"VeritasBreakerOpen"``.
            action: An ``async def action(alert)``, a :class:`Step`, or a sequence of them: the
                escalation ladder, first rung first.
            revert: What undoes a single ``action`` when the alert resolves (built-in actions
                bring their own). For a ladder, give each :class:`Step` its ``revert``.
            labels: Label values the alert must have too (``{"name": "payments"}``).
            cooldown: Seconds after a run during which a step does not run again (>= 0); for
                the steps given as plain actions.
            budget: Runs per hour allowed per step (>= 1), for the steps given as plain actions.
            timeout: Seconds an action or revert may run (> 0), for plain actions.
            escalate_after: Seconds between rungs while the alert keeps firing (> 0); needed with
                more than one rung or an escalation hook.
            escalate: Run after the last rung if the alert still fires ``escalate_after`` later
                (a pager webhook); the receiver's own ``escalate`` by default.

        Returns:
            The registered :class:`RecoveryRule`.

        Raises:
            ValueError: If a setting is out of range or missing (the message names it).
        """
        if not isinstance(alertname, str) or not alertname:
            raise ValueError(f"alertname must be a non-empty string, got {alertname!r}")
        ladder = list(action) if isinstance(action, Sequence) else [action]
        if not ladder:
            raise ValueError("action: give at least one action")
        if revert is not None and len(ladder) > 1:
            raise ValueError("revert: with a ladder, give each Step(action=..., revert=...)")
        steps = tuple(
            item
            if isinstance(item, Step)
            else Step(action=item, revert=revert, cooldown=cooldown, budget=budget, timeout=timeout)
            for item in ladder
        )
        hook = escalate if escalate is not None else self._escalate
        if hook is not None and not callable(hook):
            raise TypeError(f"escalate must be an async function of the alert, got {hook!r}")
        after = None if escalate_after is None else seconds(escalate_after, "escalate_after")
        if after is None and (len(steps) > 1 or escalate is not None):
            raise ValueError(
                "escalate_after is required with more than one step or an escalate hook: how "
                "long may the alert keep firing before the next rung?"
            )
        rule = RecoveryRule(
            alertname=alertname,
            labels=dict(labels or {}),
            steps=steps,
            escalate_after=after,
            escalate=hook if after is not None else None,
        )
        self._rules.append(rule)
        for step in steps:
            self._steps.setdefault(id(step), _StepState())
        return rule

    # -- serving --------------------------------------------------------------------------------

    def asgi(self) -> ReceiverApp:
        """The webhook receiver: a pure ASGI app answering ``POST /alerts``.

        Serve it with uvicorn or hypercorn, or mount it in Starlette or FastAPI. It runs its
        background work in a task group it opens at ASGI lifespan startup (or in the one of
        ``async with recovery:``); without either, in tasks of the running event loop.
        """
        from ._asgi import ReceiverApp

        return ReceiverApp(self)

    async def __aenter__(self) -> Recovery:
        if self._tg is not None:
            raise RuntimeError(f"recovery {self._name!r} is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """Run background work in a task group of our own, unless one is open already."""
        if self._tg is not None:
            yield
            return
        async with self:
            yield

    async def wait_idle(self) -> None:
        """Wait until no action, revert or escalation hook is running or about to run.

        Escalation timers count only once their time has come: before, they are waiting, not
        working.
        """
        while True:
            now = self._clock.monotonic()
            due = any(i.wake_at is not None and i.wake_at <= now for i in self._incidents.values())
            if due:
                await anyio.lowlevel.checkpoint()
            elif self._busy:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()
            else:
                return

    def close(self) -> None:
        """Close the journal file if the receiver opened it."""
        if self._journal_owned and self._journal_file is not None:
            self._journal_file.close()
            self._journal_file = None

    def __repr__(self) -> str:
        mode = " dry_run" if self._dry_run else ""
        return f"<Recovery {self._name!r} rules={len(self._rules)}{mode}>"

    # -- intake (synchronous: runs on the request, before the answer) ----------------------------

    def authorized(self, header: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the credentials.

        Compared in constant time (``hmac.compare_digest``) whatever the credential's length.
        """
        import base64
        import hmac

        if not header:
            return False
        scheme, _, value = header.partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        ok = False
        if scheme == b"bearer":
            for token in self._tokens:
                ok |= hmac.compare_digest(value, token.encode("utf-8"))
        elif scheme == b"basic" and self._basic_auth is not None:
            try:
                given = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            user, password = self._basic_auth
            ok = hmac.compare_digest(given, f"{user}:{password}".encode())
        return ok

    def rejected(self, status: int, reason: str, detail: str = "") -> None:
        """Count and report a request turned away."""
        self._n_notifications[reason] = self._n_notifications.get(reason, 0) + 1
        self._emit(NotificationRejected(name=self._name, status=status, reason=reason,
                                        detail=detail))  # fmt: skip

    def accept(self, notification: Notification) -> None:
        """Take every decision about a notification's alerts and start the work they call for."""
        self._n_notifications["accepted"] += 1
        if notification.truncated_alerts > 0:
            self._n_truncated += notification.truncated_alerts
            self._emit(
                AlertsTruncated(
                    name=self._name,
                    count=notification.truncated_alerts,
                    group_key=notification.group_key,
                )
            )
        for alert in notification.alerts:
            matched = False
            for rule_id, rule in enumerate(self._rules):
                if rule.matches(alert):
                    matched = True
                    self._intake(rule_id, rule, alert)
            if not matched:
                self._decide(alert, "unmatched", detail=f"from {alert.external_url}".rstrip())
        self._forget_old()

    def _intake(self, rule_id: int, rule: RecoveryRule, alert: Alert) -> None:
        key = (rule_id, alert.fingerprint, alert.starts_at)
        incident = self._incidents.get(key)
        source = f"from {alert.external_url}" if alert.external_url else ""
        if alert.status == "firing":
            if incident is not None or key in self._resolved_at:
                self._decide(alert, "duplicate", detail=source)
                return
            incident = _Incident(rule, alert, started=self._clock.monotonic())
            self._incidents[key] = incident
            self._spawn(self._climb, incident)
            return
        if incident is None or incident.resolved:
            if key not in self._resolved_at:
                # Resolved before we saw it fire (or before a restart): nothing of ours to undo,
                # but remember it, so a late copy of the firing alert starts nothing.
                self._resolved_at[key] = self._clock.monotonic()
                self._decide(alert, "resolved", detail="no action ran for this alert")
            else:
                self._decide(alert, "duplicate", detail=source)
            return
        incident.resolved = True
        incident.alert = alert
        self._resolved_at[key] = self._clock.monotonic()
        if incident.timer is not None:
            incident.timer.cancel()
        self._spawn(self._settle, incident)

    def _forget_old(self) -> None:
        now = self._clock.monotonic()
        for key, at in list(self._resolved_at.items()):
            if now - at > self._retention:
                del self._resolved_at[key]
                incident = self._incidents.get(key)
                if incident is not None and incident.resolved:
                    del self._incidents[key]
        for key, incident in list(self._incidents.items()):
            # Never resolved (send_resolved off, or the resolution lost): forgotten after the
            # retention too, counted from its start.
            if not incident.resolved and now - incident.started > self._retention:
                self._drop(key)
        excess = len(self._incidents) - self._max_incidents
        if excess > 0:
            resolved = [k for k, inc in self._incidents.items() if inc.resolved]
            done = set(resolved)
            oldest = [k for k in self._incidents if k not in done]
            for key in (resolved + oldest)[:excess]:
                self._drop(key)
        # The keys kept to recognise late copies: bounded too (oldest first, insertion order).
        for key in list(self._resolved_at)[: max(0, len(self._resolved_at) - self._max_incidents)]:
            del self._resolved_at[key]

    def _drop(self, key: tuple[int, str, str]) -> None:
        incident = self._incidents.pop(key)
        if incident.timer is not None:
            incident.timer.cancel()
        self._resolved_at.setdefault(key, self._clock.monotonic())  # late copies stay duplicates

    # -- background work ------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[_Incident], Any], incident: _Incident) -> None:
        self._busy += 1
        tg = self._tg
        if tg is not None:
            tg.start_soon(self._guarded, fn, incident)
            return
        # Mounted without lifespan and outside ``async with``: a task of the running loop.
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: trio
            import trio

            trio.lowlevel.spawn_system_task(self._guarded, fn, incident)
            return
        task = loop.create_task(self._guarded(fn, incident))
        self._loose.add(task)
        task.add_done_callback(self._loose.discard)

    async def _guarded(self, fn: Callable[[_Incident], Any], incident: _Incident) -> None:
        try:
            await fn(incident)
        except Exception as exc:  # a bug of ours must not take the task group down
            self._decide(incident.alert, "failed", detail="internal error", error=exc)
        finally:
            self._done()

    def _done(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def _climb(self, incident: _Incident) -> None:
        """Run the first rung now, then one more per ``escalate_after`` while the alert fires."""
        rule = incident.rule
        async with incident.lock:
            if not incident.resolved:
                await self._run_step(incident, 0)
        after = rule.escalate_after
        if after is None:
            return
        rungs: list[int | None] = [*range(1, len(rule.steps)), None]
        if rule.escalate is None:
            rungs.pop()
        with anyio.CancelScope() as scope:
            incident.timer = scope
            for rung in rungs:
                self._done()  # waiting is not working
                incident.wake_at = self._clock.monotonic() + after
                try:
                    await self._clock.sleep(after)
                finally:
                    incident.wake_at = None
                    self._busy += 1
                with anyio.CancelScope(shield=True):
                    async with incident.lock:
                        if incident.resolved:
                            return
                        if rung is None:
                            await self._escalate_now(incident)
                        else:
                            await self._run_step(incident, rung)

    async def _run_step(self, incident: _Incident, index: int) -> None:
        step = incident.rule.steps[index]
        alert = incident.alert
        state = self._steps[id(step)]
        now = self._clock.monotonic()
        if step._cooldown and state.last_run is not None and now - state.last_run < step._cooldown:
            left = step._cooldown - (now - state.last_run)
            self._decide(
                alert,
                "cooldown",
                step=index,
                action=step.name,
                detail=f"ran {now - state.last_run:.1f}s ago; {left:.1f}s of cooldown left",
            )
            return
        runs = state.runs
        while runs and now - runs[0] >= _HOUR:
            runs.popleft()
        if step.budget is not None and len(runs) >= step.budget:
            self._decide(
                alert,
                "budget_exhausted",
                step=index,
                action=step.name,
                detail=f"{len(runs)} of {step.budget} runs used in the last hour",
            )
            return
        state.last_run = now
        runs.append(now)
        if self._dry_run:
            self._decide(alert, "dry_run", step=index, action=step.name, detail="would run")
            incident.ran.append(index)
            return
        try:
            with anyio.fail_after(step._timeout):
                await step.action(alert)
        except Exception as exc:
            detail = f"timed out after {step._timeout:g}s" if isinstance(exc, TimeoutError) else ""
            self._decide(alert, "failed", step=index, action=step.name, error=exc, detail=detail)
            return
        incident.ran.append(index)
        self._decide(alert, "ran", step=index, action=step.name)

    async def _escalate_now(self, incident: _Incident) -> None:
        hook = incident.rule.escalate
        assert hook is not None
        alert = incident.alert
        name = action_name(hook)
        if self._dry_run:
            self._decide(alert, "dry_run", action=name, detail="would escalate")
            return
        try:
            with anyio.fail_after(30.0):
                await hook(alert)
        except Exception as exc:
            self._decide(alert, "escalation_failed", action=name, error=exc)
            return
        self._decide(alert, "escalated", action=name)

    async def _settle(self, incident: _Incident) -> None:
        """The alert resolved: revert what ran, last rung first (after a running one ends)."""
        async with incident.lock:
            alert = incident.alert
            reverts = [(i, incident.rule.steps[i]) for i in reversed(incident.ran)]
            reverts = [(i, s) for i, s in reverts if s.revert is not None]
            if not reverts:
                self._decide(alert, "resolved", detail="nothing to revert")
                return
            for index, step in reverts:
                revert = step.revert
                assert revert is not None
                name = action_name(revert)
                if self._dry_run:
                    self._decide(alert, "dry_run", step=index, action=name, detail="would revert")
                    continue
                try:
                    with anyio.fail_after(step._timeout):
                        await revert(alert)
                except Exception as exc:
                    self._decide(alert, "revert_failed", step=index, action=name, error=exc)
                    continue
                self._decide(alert, "reverted", step=index, action=name)

    # -- decisions: events, metrics, journal ----------------------------------------------------

    def _decide(
        self,
        alert: Alert,
        decision: str,
        *,
        step: int | None = None,
        action: str | None = None,
        error: BaseException | None = None,
        detail: str = "",
    ) -> None:
        assert decision in DECISIONS, decision
        alertname = alert.alertname
        if decision == "unmatched":
            alertname = ""  # label values come from registered rules only: bounded
        key = (alertname, decision)
        self._n_decisions[key] = self._n_decisions.get(key, 0) + 1
        dry = self._dry_run and decision in ("dry_run", "cooldown", "budget_exhausted")
        event = RecoveryDecision(
            name=self._name,
            alertname=alert.alertname,
            fingerprint=alert.fingerprint,
            starts_at=alert.starts_at,
            decision=decision,
            step=step,
            action=action,
            dry_run=dry,
            error=error,
            detail=detail,
        )
        self._emit(event)
        self._write_journal(event, alert)

    def _write_journal(self, event: RecoveryDecision, alert: Alert) -> None:
        file = self._journal_file
        if file is None:
            return
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "receiver": self._name,
            "decision": event.decision,
            "alertname": event.alertname,
            "fingerprint": event.fingerprint,
            "starts_at": event.starts_at,
            "status": alert.status,
            "labels": dict(alert.labels),
        }
        for key in ("step", "action", "detail"):
            value = getattr(event, key)
            if value not in (None, ""):
                record[key] = value
        if event.dry_run or self._dry_run:
            record["dry_run"] = True
        if event.error is not None:
            record["error_type"] = type(event.error).__name__
            record["error"] = redact(str(event.error))
        try:
            file.write(json.dumps(record, sort_keys=True) + "\n")
            file.flush()
        except (OSError, ValueError) as exc:
            # The journal must never stop a decision from being carried out.
            print(f"veritas-resilience: recovery journal write failed: {exc}", file=sys.stderr)

    def decisions(self) -> dict[tuple[str, str], int]:
        """Decisions so far, by ``(alertname, decision)``."""
        return dict(self._n_decisions)

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = self._name
        for outcome, count in self._n_notifications.items():
            yield "veritas_recovery_notifications", (name, outcome), float(count)
        for (alertname, decision), count in sorted(self._n_decisions.items()):
            yield "veritas_recovery_decisions", (name, alertname, decision), float(count)
        yield "veritas_recovery_truncated_alerts", (name,), float(self._n_truncated)
        active = sum(1 for inc in self._incidents.values() if not inc.resolved)
        yield "veritas_recovery_incidents_active", (name,), float(active)
