"""The ``veritas-resilience`` command (also ``python -m veritas_resilience``).

Subcommands (``veritas-resilience COMMAND --help`` describes each):

- ``demo``: a breaker in front of a dependency that fails and then recovers. It prints every state
  change as it happens, then the Prometheus exposition of the breaker's metrics.
- ``rules``: the Prometheus rules (or, with ``--dashboard``, the Grafana dashboard), adapted.
- ``serve``: the health endpoints and the Alertmanager receiver in one uvicorn server.
- ``drill``: a failover drill on real servers (started on loopback, or yours); exits non-zero
  when a scenario fails.
- ``proxy``: the TCP fault proxy server with Toxiproxy's HTTP API.

The parser is built by ``_parser()``, one way for every subcommand: its module adds a subparser
with plain-text ``help``/``description`` (this docstring is for readers of the code; ``--help``
never shows it) and sets ``run`` with ``set_defaults(run=function)``; ``main()`` calls
``args.run(args)`` and exits with what it returns.
"""

from __future__ import annotations

import argparse
import importlib.util
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


_DESCRIPTION = "Resilience tools for Python services: circuit breakers, fallbacks, retries."


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .chaos import _cli as proxy_cli
    from .drill import _cli as drill_cli
    from .recovery import _cli as recovery_cli

    parser = argparse.ArgumentParser(prog="veritas-resilience", description=_DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="a breaker opening, half-opening and closing",
        description="Run a circuit breaker in front of a dependency that fails for a second and "
        "then recovers; print each state change, then the Prometheus metrics.",
    )
    demo.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="the event loop to run on (trio needs the 'trio' extra; default: asyncio)",
    )
    demo.set_defaults(run=_run_demo)
    recovery_cli.add_commands(sub)  # rules, serve
    drill = sub.add_parser(
        "drill",
        help="a failover drill on real servers",
        description="Run failover scenarios against PostgreSQL and Redis (started on loopback, "
        "or yours) under a workload, check what the clients saw, and report; the exit status "
        "is non-zero when a scenario fails.",
    )
    drill_cli.add_arguments(drill)
    drill.set_defaults(run=drill_cli.run)
    proxy = sub.add_parser(
        "proxy",
        help="a fault proxy with Toxiproxy's API",
        description="Serve the TCP fault proxy with Toxiproxy's HTTP API, so tools written for "
        "Toxiproxy can inject latency, cuts and black holes.",
    )
    proxy_cli.add_arguments(proxy)
    proxy.set_defaults(run=proxy_cli.run)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print(
            "veritas-resilience: --backend trio needs trio, which is not installed; "
            "install it with: pip install 'veritas-resilience[trio]'",
            file=sys.stderr,
        )
        return 2
    anyio.run(_demo, args.backend, backend=args.backend)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
