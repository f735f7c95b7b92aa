"""``veritas-resilience drill``: arguments, live progress, outputs, exit status."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ._drill import Drill, DrillReport, ScenarioResult, embedded_environment, external_environment
from ._errors import DrillError
from ._scenarios import default_scenarios
from ._workload import Workload

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

__all__ = ["add_arguments", "run"]

EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the drill's options to its subcommand parser."""
    names = [s.name for s in default_scenarios()]
    parser.add_argument(
        "--postgres",
        action="append",
        default=[],
        metavar="DSN",
        help="a node of your PostgreSQL cluster (repeat per node); put the password in "
        "PGPASSWORD rather than in the DSN. Only proxy scenarios run on your servers.",
    )
    parser.add_argument(
        "--redis-sentinel",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="one of your Redis Sentinels (repeat per Sentinel)",
    )
    parser.add_argument("--redis-service", default="mymaster", help="the Sentinel service name")
    parser.add_argument(
        "--redis-wait-replicas",
        type=int,
        default=1,
        help="replicas that must confirm a Redis write before it counts as acknowledged "
        "(WAIT; 0 to skip)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=names,
        help="run only these scenarios (repeatable); all by default",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument(
        "--html",
        default="drill-report.html",
        metavar="PATH",
        help="where to write the HTML report with charts (default: drill-report.html; '' for none)",
    )


class _LiveProgress:
    """Live status lines in the terminal while the drill runs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.scenario = "setup"
        self.phase_name = "starting"
        self.live: Live | None = None

    def __enter__(self) -> _LiveProgress:
        from rich.live import Live

        self.live = Live(
            self._render(None), console=self.console, refresh_per_second=4, transient=True
        )
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def phase(self, scenario: str, phase: str) -> None:
        self.scenario, self.phase_name = scenario, phase

    def tick(self, workload: Workload) -> None:
        if self.live is not None:
            self.live.update(self._render(workload))

    def result(self, result: ScenarioResult) -> None:
        if result.skipped is not None:
            self.console.print(f"[dim]- {result.name}: skipped ({result.skipped})[/]")
            return
        verdict = "[green]✓ PASS[/]" if result.passed else "[bold red]✗ FAIL[/]"
        self.console.print(
            f"{verdict} {result.title}: lost {result.lost}, unexpected {result.unexpected}, "
            f"indeterminate {result.indeterminate}, detection "
            f"{'-' if result.detection is None else f'{result.detection:.2f}s'}, first write "
            f"{'-' if result.first_write is None else f'{result.first_write:.2f}s'}"
        )

    def _render(self, workload: Workload | None) -> Table:
        from rich.markup import escape
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_row(f"[bold]{self.scenario}[/]", f"[cyan]{self.phase_name}[/]")
        if workload is not None:
            now = workload.now()
            for store in workload.stores:
                ops = [
                    op for op in workload.window(now - 1.0, now, store.name) if op.kind != "health"
                ]
                ok = sum(op.kind == "write" and op.outcome == "ok" for op in ops)
                errors = Counter(op.error for op in ops if op.outcome != "ok")
                stale = sum(op.fallback for op in ops)
                err = escape(", ".join(f"{e} {n}" for e, n in errors.most_common(2)) or "0")
                table.add_row(
                    f"  {store.name}",
                    f"writes ok/s [green]{ok}[/]  errors/s [red]{err}[/]  stale reads/s {stale}",
                )
        return table


async def _run(args: argparse.Namespace, console: Console) -> DrillReport:
    external = bool(args.postgres or args.redis_sentinel)
    scenarios = [s for s in default_scenarios() if not args.scenario or s.name in args.scenario]
    if external:
        env_cm = external_environment(
            postgres=args.postgres,
            redis_sentinels=args.redis_sentinel,
            redis_service=args.redis_service,
            redis_password=os.environ.get("VERITAS_DRILL_REDIS_PASSWORD") or None,
            sentinel_password=os.environ.get("VERITAS_DRILL_SENTINEL_PASSWORD") or None,
            redis_wait_replicas=args.redis_wait_replicas,
        )
    else:
        env_cm = embedded_environment()
    started = time.monotonic()
    with _LiveProgress(console) as progress:
        async with env_cm as env:
            setup = time.monotonic() - started
            progress.phase("setup", f"servers up in {setup:.1f}s; starting the workload")
            report = await Drill(env, scenarios, progress=progress).run()
            report.setup = setup
            return report


def run(args: argparse.Namespace) -> int:
    """Run the drill; return the exit status (0 pass, 1 a scenario failed, 2 cannot run)."""
    from rich.console import Console
    from rich.markup import escape

    from ._report import render_table, to_json, write_html

    console = Console(stderr=args.json)
    try:
        report = anyio.run(_run, args, console)
    except DrillError as exc:
        console.print(f"[bold red]cannot run the drill:[/] {escape(str(exc))}", highlight=False)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        return 130
    render_table(report, console)
    if args.html:
        path = Path(args.html)
        charts = write_html(report, path)
        note = "" if charts else " (no charts: pip install 'veritas-resilience[report]')"
        console.print(f"HTML report: {path.resolve()}{note}", markup=False, highlight=False)
    if args.json:
        sys.stdout.write(to_json(report) + "\n")
    return 0 if report.passed else EXIT_FAILED
