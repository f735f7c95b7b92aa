"""The ``veritas-resilience`` command (also ``python -m veritas_resilience``).

Subcommands:

- ``demo``: a breaker in front of a dependency that fails and then recovers. It prints every state
  change as it happens, then the Prometheus exposition of the breaker's metrics.
- ``rules``: the Prometheus rules (or, with ``--dashboard``, the Grafana dashboard), adapted.
- ``serve``: the health endpoints and the Alertmanager receiver in one uvicorn server.
- ``drill``: a failover drill on real servers (started on loopback, or yours); exits non-zero
  when a scenario fails.
- ``proxy``: the TCP fault proxy server with Toxiproxy's HTTP API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio
from prometheus_client import CollectorRegistry, generate_latest

from .circuit_breaker import ExponentialCircuitBreaker
from .errors import CircuitOpenError
from .events import BreakerStateChanged, Event
from .instrumentation.prometheus import PrometheusHook

__all__ = ["main"]


class _PrintStateChanges:
    event_types = frozenset({BreakerStateChanged})

    def __init__(self, started: float) -> None:
        self._started = started

    def on_event(self, event: Event) -> None:
        assert isinstance(event, BreakerStateChanged)
        extra = f" for {event.open_for:.2f}s" if event.open_for is not None else ""
        print(
            f"  t={anyio.current_time() - self._started:5.2f}s  {event.name}: "
            f"{event.from_state.value} -> {event.to_state.value} ({event.reason}){extra}"
        )


async def _demo(backend_name: str) -> None:
    registry = CollectorRegistry()
    started = anyio.current_time()
    breaker = ExponentialCircuitBreaker(
        name="inventory-db",
        failure_threshold=3,
        success_threshold=2,
        base=0.2,
        maximum=1.0,
        hooks=[PrometheusHook(registry), _PrintStateChanges(started)],
    )
    healthy_after = started + 1.0  # the dependency fails for its first second, then recovers

    @breaker
    async def query(n: int) -> str:
        await anyio.sleep(0.01)
        if anyio.current_time() < healthy_after:
            raise ConnectionError("inventory-db: connection refused")
        return f"row {n}"

    print(f"veritas-resilience demo on {backend_name}: a dependency down for 1 s, then back")
    outcomes = {"ok": 0, "failed": 0, "rejected": 0}
    for n in range(60):
        try:
            await query(n)
            outcomes["ok"] += 1
        except CircuitOpenError:
            outcomes["rejected"] += 1
        except ConnectionError:
            outcomes["failed"] += 1
        await anyio.sleep(0.03)
    print(
        f"calls: {outcomes['ok']} ok, {outcomes['failed']} failed, "
        f"{outcomes['rejected']} rejected without touching the dependency"
    )
    print(f"final state: {breaker.state.value}\n")
    print("Prometheus exposition:")
    print(generate_latest(registry).decode())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="veritas-resilience", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a breaker opening, half-opening and closing")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    from .recovery._cli import add_commands as add_recovery_commands

    add_recovery_commands(sub)
    from .chaos import _cli as proxy_cli
    from .drill import _cli as drill_cli

    drill_cli.add_arguments(sub.add_parser("drill", help="a failover drill on real servers"))
    proxy_cli.add_arguments(sub.add_parser("proxy", help="a fault proxy with Toxiproxy's API"))
    args = parser.parse_args(argv)
    if args.command == "drill":
        return drill_cli.run(args)
    if args.command == "proxy":
        return proxy_cli.run(args)
    if args.command == "demo":
        anyio.run(_demo, args.backend, backend=args.backend)
    elif getattr(args, "run", None) is not None:
        return int(args.run(args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
