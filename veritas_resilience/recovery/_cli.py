"""The ``rules`` and ``serve`` subcommands of ``veritas-resilience``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def add_commands(sub: Any) -> None:
    """Add ``rules`` and ``serve`` to the command's subparsers (each sets ``run``)."""
    from ._rules import RULE_GROUPS

    rules = sub.add_parser(
        "rules",
        help="print the Prometheus rules (or the Grafana dashboard), adapted to a deployment",
        description="Print the shipped Prometheus recording and alerting rules as one rule file "
        "(or the Grafana dashboard with --dashboard), adapted to renamed metrics, extra label "
        "matchers and routing labels.",
    )
    rules.add_argument("--prefix", default="veritas_", help="metric name prefix (veritas_)")
    rules.add_argument(
        "--selector", help="label matchers added to every selector, e.g. 'job=\"orders\"'"
    )
    rules.add_argument(
        "--label", action="append", type=_label, default=[], metavar="NAME=VALUE",
        help="a label added to every alert (repeatable; replaces a shipped one of that name)",
    )  # fmt: skip
    rules.add_argument("--runbook-base", help="URL where docs/runbooks.md is served")
    rules.add_argument(
        "--for", dest="for_", action="append", type=_label, default=[], metavar="ALERT=DURATION",
        help="replace an alert's for: duration (repeatable)",
    )  # fmt: skip
    rules.add_argument(
        "--group", action="append", choices=RULE_GROUPS, help="only these rule groups"
    )
    rules.add_argument("--dashboard", action="store_true", help="print the dashboard JSON")
    rules.add_argument(
        "--output-dir", type=Path,
        help="write veritas-rules.yml and veritas-dashboard.json there instead of printing",
    )  # fmt: skip
    rules.set_defaults(run=_rules)

    serve = sub.add_parser(
        "serve",
        help="serve the health endpoints and the Alertmanager receiver (uvicorn)",
        description="Serve POST /alerts (a Recovery) and /health /ready /live /startup /metrics "
        "(a HealthRegistry) in one uvicorn server. Objects are given as module:attribute.",
    )
    serve.add_argument("--recovery", metavar="MODULE:ATTR", help="a Recovery object")
    serve.add_argument("--health", metavar="MODULE:ATTR", help="a HealthRegistry object")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level (info)")
    serve.set_defaults(run=_serve)


def _rules(args: argparse.Namespace) -> int:
    from ._rules import render_dashboard, render_rules

    try:
        text = render_rules(
            groups=args.group,
            prefix=args.prefix,
            selector=args.selector,
            labels=dict(args.label),
            runbook_base=args.runbook_base,
            for_overrides=dict(args.for_),
        )
        dashboard = render_dashboard(prefix=args.prefix, selector=args.selector)
    except ValueError as exc:
        print(f"veritas-resilience rules: {exc}", file=sys.stderr)
        return 2
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "veritas-rules.yml").write_text(text, encoding="utf-8")
        (args.output_dir / "veritas-dashboard.json").write_text(dashboard, encoding="utf-8")
        print(f"wrote {args.output_dir / 'veritas-rules.yml'} and veritas-dashboard.json")
    else:
        sys.stdout.write(dashboard if args.dashboard else text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ._serve import load_object, ops_app

    try:
        import uvicorn
    except ImportError:
        print("veritas-resilience serve needs uvicorn: pip install uvicorn", file=sys.stderr)
        return 2
    if args.recovery is None and args.health is None:
        print("veritas-resilience serve: give --recovery, --health, or both", file=sys.stderr)
        return 2
    try:
        recovery = load_object(args.recovery) if args.recovery else None
        health = load_object(args.health) if args.health else None
        app = ops_app(recovery=recovery, health=health)
    except (ValueError, ImportError) as exc:
        print(f"veritas-resilience serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    return 0
