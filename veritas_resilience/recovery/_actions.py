"""Recovery actions: the rungs of an escalation ladder, and built-in ones on the library's parts.

An action is any ``async def action(alert: Alert)``. The built-in ones are objects that also carry
their natural revert (an isolated breaker is reset when the alert resolves) and, for the risky
ones, a default budget.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .._validate import Seconds, positive_int, seconds
from ._payload import Alert

if TYPE_CHECKING:
    from .._fallback import StaleCache
    from ..circuit_breaker import CircuitBreaker, CircuitBreakerRegistry
    from ..postgres import FailoverClient
    from ..redis import SentinelRedis

__all__ = [
    "Action",
    "BuiltinAction",
    "Step",
    "isolate_breaker",
    "reprobe_postgres",
    "reset_breaker",
    "sentinel_failover",
    "serve_stale",
    "webhook",
]


class Action(Protocol):
    """A recovery action, revert action or escalation hook: ``async def f(alert) -> None``.

    It gets the :class:`Alert` (labels, annotations, fingerprint) it runs for.
    """

    def __call__(self, alert: Alert, /) -> Awaitable[object]: ...


def action_name(action: object) -> str:
    """A short name of an action for events, journals and metrics."""
    name = getattr(action, "name", None)
    if isinstance(name, str) and name:
        return name
    qualname = getattr(action, "__qualname__", None) or type(action).__qualname__
    return str(qualname)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One rung of an escalation ladder: an action, its revert, and the limits on running it.

    Args:
        action: The coroutine function to run while the alert fires.
        revert: Run when the alert resolves, if ``action`` ran (and succeeded). ``None``: the
            action's own ``revert`` (built-in actions have one), else nothing.
        cooldown: Seconds after a run during which this step does not run again, for any
            incident of the rule (>= 0).
        budget: At most this many runs in any hour (>= 1), or ``None`` for no limit; ``None``
            also takes the action's own default budget (built-in failovers have one).
        timeout: Seconds the action (and its revert) may take before it is cancelled (> 0).
        name: The step's name in events and the journal; the action's name by default.

    Raises:
        ValueError: If a limit is out of range (the message names it).
    """

    action: Action
    revert: Action | None = None
    cooldown: Seconds = 0.0
    budget: int | None = None
    timeout: Seconds = 30.0
    name: str = ""
    _cooldown: float = field(init=False, repr=False, compare=False)
    _timeout: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.action):
            raise TypeError(f"action must be an async function of the alert, got {self.action!r}")
        if self.revert is not None and not callable(self.revert):
            raise TypeError(f"revert must be an async function of the alert, got {self.revert!r}")
        object.__setattr__(self, "_cooldown", seconds(self.cooldown, "cooldown", allow_zero=True))
        object.__setattr__(self, "_timeout", seconds(self.timeout, "timeout"))
        budget = self.budget
        if budget is None:
            budget = getattr(self.action, "default_budget", None)
            object.__setattr__(self, "budget", budget)
        if budget is not None:
            positive_int(budget, "budget")
        if self.revert is None:
            object.__setattr__(self, "revert", getattr(self.action, "revert", None))
        if not self.name:
            object.__setattr__(self, "name", action_name(self.action))


class BuiltinAction:
    """A built-in action: a coroutine function of the alert with a name, a revert and a budget.

    Attributes:
        name: Its name in events and the journal.
        revert: What undoes it when the alert resolves, or ``None``.
        default_budget: Runs per hour allowed unless the rule says otherwise, or ``None``.
    """

    def __init__(
        self,
        name: str,
        run: Action,
        revert: Action | None = None,
        default_budget: int | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self.revert = revert
        self.default_budget = default_budget

    async def __call__(self, alert: Alert) -> None:
        """Run the action for ``alert``."""
        await self._run(alert)

    def __repr__(self) -> str:
        return f"<BuiltinAction {self.name}>"


def _breakers(
    target: CircuitBreaker | CircuitBreakerRegistry, label: str
) -> Callable[[Alert], CircuitBreaker]:
    from ..circuit_breaker import CircuitBreaker, CircuitBreakerRegistry

    if isinstance(target, CircuitBreaker):
        return lambda alert: target
    if isinstance(target, CircuitBreakerRegistry):

        def pick(alert: Alert) -> CircuitBreaker:
            name = alert.labels.get(label)
            if name is None:
                raise LookupError(f"the alert has no {label!r} label naming a breaker")
            if name not in target:
                raise LookupError(f"no breaker named {name!r} in the registry")
            return target[name]

        return pick
    raise TypeError(f"target must be a CircuitBreaker or CircuitBreakerRegistry, got {target!r}")


def isolate_breaker(
    target: CircuitBreaker | CircuitBreakerRegistry, *, label: str = "name"
) -> BuiltinAction:
    """Force a breaker open (reject every call at once); reset it when the alert resolves.

    Args:
        target: A breaker, or a registry: then the breaker named by the alert's ``label``.
        label: The alert label naming the breaker (``name`` in the shipped alerts).
    """
    pick = _breakers(target, label)

    async def run(alert: Alert) -> None:
        pick(alert).isolate()

    async def revert(alert: Alert) -> None:
        pick(alert).reset()

    name = getattr(target, "name", None) or f"<{label}>"
    return BuiltinAction(f"isolate_breaker({name})", run, revert)


def reset_breaker(
    target: CircuitBreaker | CircuitBreakerRegistry, *, label: str = "name"
) -> BuiltinAction:
    """Close a breaker and forget its failures (e.g. once a dependency is known to be back).

    Args:
        target: A breaker, or a registry: then the breaker named by the alert's ``label``.
        label: The alert label naming the breaker.
    """
    pick = _breakers(target, label)

    async def run(alert: Alert) -> None:
        pick(alert).reset()

    name = getattr(target, "name", None) or f"<{label}>"
    return BuiltinAction(f"reset_breaker({name})", run)


def serve_stale(cache: StaleCache) -> BuiltinAction:
    """Make a stale cache answer from its stored values without calling the source.

    Takes load off a struggling dependency; keys with no stored value still call it. The revert
    makes the cache call the source again.
    """
    from .._fallback import StaleCache

    if not isinstance(cache, StaleCache):
        raise TypeError(f"cache must be a StaleCache, got {cache!r}")

    async def run(alert: Alert) -> None:
        cache.serve_stale(True)

    async def revert(alert: Alert) -> None:
        cache.serve_stale(False)

    return BuiltinAction(f"serve_stale({cache.name})", run, revert)


def reprobe_postgres(client: FailoverClient) -> BuiltinAction:
    """Probe every node of a PostgreSQL failover client now instead of at its next interval.

    The client then routes by what it found (a promoted standby, a node back up) at once.
    """

    async def run(alert: Alert) -> None:
        await client.health(refresh=True)

    return BuiltinAction(f"reprobe_postgres({client.name})", run)


def sentinel_failover(client: SentinelRedis, *, budget: int = 1) -> BuiltinAction:
    """Ask the client's Sentinels to fail the master over (``SENTINEL FAILOVER``).

    Sentinels are asked in turn until one accepts (or answers that a failover is already in
    progress). A failover loses the writes the master has not replicated, so the action is
    budgeted: ``budget`` runs an hour unless the rule says otherwise.

    Raises:
        ValueError: If ``budget`` < 1.
    """
    positive_int(budget, "budget")

    async def run(alert: Alert) -> None:
        import redis.asyncio
        from redis.exceptions import RedisError, ResponseError

        topology: Any = client._topology  # the addresses and credentials the client uses
        errors: list[str] = []
        for address, _up, _subscribed, _error in topology.sentinel_states():
            conn = redis.asyncio.Redis(
                host=address[0],
                port=address[1],
                socket_timeout=2.0,
                socket_connect_timeout=1.0,
                **topology._sentinel_kwargs,
            )
            try:
                await conn.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "FAILOVER", client.service_name
                )
                return
            except ResponseError as exc:
                if "INPROGRESS" in str(exc):
                    return
                errors.append(f"{address[0]}:{address[1]}: {exc}")
            except (RedisError, OSError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {type(exc).__name__}")
            finally:
                await conn.aclose()
        raise RuntimeError(
            f"no Sentinel started a failover of {client.service_name!r}: " + "; ".join(errors)
        )

    return BuiltinAction(f"sentinel_failover({client.name})", run, default_budget=budget)


def webhook(
    url: str, *, token: str | None = None, timeout: Seconds = 5.0, name: str | None = None
) -> BuiltinAction:
    """POST the alert as JSON to ``url``: an escalation hook for a pager or a chat.

    The body is ``{"alertname", "status", "labels", "annotations", "startsAt", "fingerprint",
    "generatorURL", "externalURL"}``. The request runs in a worker thread (the standard library's
    HTTP client), bounded by ``timeout``.

    Args:
        url: An ``http://`` or ``https://`` URL.
        token: Sent as ``Authorization: Bearer <token>``; never logged.
        timeout: Seconds the request may take (> 0).
        name: The hook's name in events and the journal; ``webhook(<host>)`` by default.

    Raises:
        ValueError: If ``url`` is not http(s) or ``timeout`` is out of range.
    """
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
    limit = seconds(timeout, "timeout")
    headers = {"Content-Type": "application/json", "User-Agent": "veritas-resilience"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def post(body: bytes) -> None:
        import urllib.request

        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=limit) as response:
            response.read()

    async def run(alert: Alert) -> None:
        import json

        import anyio.to_thread

        body = json.dumps(
            {
                "alertname": alert.alertname,
                "status": alert.status,
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "startsAt": alert.starts_at,
                "fingerprint": alert.fingerprint,
                "generatorURL": alert.generator_url,
                "externalURL": alert.external_url,
            }
        ).encode()
        # HTTPError (non-2xx), URLError and timeouts propagate: the decision says it failed.
        await anyio.to_thread.run_sync(post, body, abandon_on_cancel=True)

    return BuiltinAction(name or f"webhook({parsed.hostname})", run)
