"""The drill's outputs: a terminal table (rich), JSON, and an HTML report with one timeline
chart per scenario (matplotlib, rendered to inline SVG; the ``report`` extra)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._drill import DrillReport, ScenarioResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["render_table", "to_json", "write_html"]

_REPORT_HINT = "pip install 'veritas-resilience[report]'"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _errors(result: ScenarioResult, limit: int = 3) -> str:
    if not result.errors:
        return "-"
    items = list(result.errors.items())
    text = ", ".join(f"{name} {count}" for name, count in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text


def summary_table(report: DrillReport) -> Table:
    """The final table, as a rich ``Table``."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="veritas-resilience drill", title_justify="left")
    for column, justify in (
        ("scenario", "left"),
        ("result", "left"),
        ("detect s", "right"),
        ("1st write s", "right"),
        ("writes ok", "right"),
        ("lost", "right"),
        ("unexp.", "right"),
        ("indet.", "right"),
        ("fallback", "right"),
        ("errors by type", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in report.results:
        if r.skipped is not None:
            table.add_row(r.name, f"[dim]skipped ({r.skipped})[/]", *["-"] * 8)
            continue
        verdict = "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]"
        table.add_row(
            r.name,
            verdict,
            _seconds(r.detection),
            _seconds(r.first_write),
            str(r.writes_ok),
            f"[red]{r.lost}[/]" if r.lost else "0",
            f"[red]{r.unexpected}[/]" if r.unexpected else "0",
            str(r.indeterminate),
            str(r.fallback_served),
            escape(_errors(r)),
        )
    return table


def render_table(report: DrillReport, console: Console) -> None:
    """Print the final table and every hypothesis that did not hold."""
    from rich.markup import escape

    if not console.is_terminal:
        console.width = max(console.width, 132)
    console.print(summary_table(report))
    for r in report.results:
        for h in r.hypotheses:
            if not h.held:
                console.print(f"[red]✗[/] {r.name}: {escape(h.name)}: {escape(h.detail)}")
    verdict = "[green]every scenario passed[/]" if report.passed else "[bold red]FAILED[/]"
    setup = "" if report.setup is None else f" (+{report.setup:.1f}s to start the servers)"
    console.print(f"{verdict}: scenarios took {report.duration:.1f}s{setup}")


def to_json(report: DrillReport) -> str:
    """The report as JSON."""
    return json.dumps(report.as_dict(), indent=2)


def _chart_svg(result: ScenarioResult) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    palette = {"postgres": "#336791", "redis": "#d82c20", "disk": "#6b8e23"}
    for store, points in result.timeline.items():
        if not points:
            continue
        xs = [p[0] for p in points]
        color = palette.get(store, "#444444")
        ax.step(xs, [p[1] for p in points], where="post", color=color, label=f"{store} writes ok/s")
        errors = [p[2] for p in points]
        if any(errors):
            ax.step(
                xs, errors, where="post", color=color, linestyle="--", label=f"{store} errors/s"
            )
    if result.fault_at is not None:
        end = (result.recovered_at or result.end_at or result.fault_at) - result.fault_at
        ax.axvspan(0, max(end, 0.05), color="#f4a261", alpha=0.25, label="fault until recovery")
        ax.axvline(0, color="#e76f51", linewidth=1.5)
        if result.repair_at is not None and result.repair_at - result.fault_at > 0.05:
            ax.axvline(
                result.repair_at - result.fault_at,
                color="#2a9d8f",
                linestyle=":",
                linewidth=1.5,
                label="repair starts",
            )
        for (t, label), style in zip(result.marks, ("-.", (0, (5, 1)), (0, (1, 1)), "--")):
            ax.axvline(t - result.fault_at, color="#6a4c93", linestyle=style, label=label)
    ax.set_xlabel("seconds since the fault")
    ax.set_ylabel("per second")
    ax.set_title(result.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def _charts_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_html(report: DrillReport, path: Path) -> bool:
    """Write the HTML report; return whether it has charts (matplotlib installed).

    Without matplotlib the report has every table and says how to get the charts.
    """
    charts = _charts_available()
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>veritas-resilience drill</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}.pass{color:#2a7d2a;font-weight:bold}.fail{color:#c62828;"
        "font-weight:bold}.skip{color:#888}svg{max-width:100%;height:auto}</style></head><body>",
        "<h1>veritas-resilience drill</h1>",
        f"<p>Started {esc(report.started)}, took {report.duration:.1f}s. Verdict: "
        + ("<span class='pass'>PASS</span>" if report.passed else "<span class='fail'>FAIL</span>")
        + "</p>",
        "<table>"
        + "".join(
            f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
            for k, v in report.environment.items()
        )
        + "</table>",
        "<h2>Summary</h2><table><tr><th>scenario</th><th>result</th><th>detection s</th>"
        "<th>first write s</th><th>writes ok</th><th>lost</th><th>unexpected</th>"
        "<th>indeterminate</th><th>fallback</th><th>errors by type</th></tr>",
    ]
    for r in report.results:
        if r.skipped is not None:
            parts.append(
                f"<tr><td>{esc(r.name)}</td><td class='skip' colspan='9'>skipped: "
                f"{esc(r.skipped)}</td></tr>"
            )
            continue
        verdict = "<span class='pass'>PASS</span>" if r.passed else "<span class='fail'>FAIL</span>"
        parts.append(
            f"<tr><td><a href='#{esc(r.name)}'>{esc(r.name)}</a></td><td>{verdict}</td>"
            f"<td>{_seconds(r.detection)}</td><td>{_seconds(r.first_write)}</td>"
            f"<td>{r.writes_ok}</td><td>{r.lost}</td><td>{r.unexpected}</td>"
            f"<td>{r.indeterminate}</td><td>{r.fallback_served}</td>"
            f"<td>{esc(_errors(r, 10))}</td></tr>"
        )
    parts.append("</table>")
    if not charts:
        parts.append(f"<p><em>Timeline charts need matplotlib: {esc(_REPORT_HINT)}</em></p>")
    for r in report.results:
        if r.skipped is not None:
            continue
        parts.append(f"<h2 id='{esc(r.name)}'>{esc(r.title)}</h2>")
        if charts and r.timeline:
            parts.append(_chart_svg(r))
        parts.append("<table><tr><th>hypothesis</th><th>held</th><th>observed</th></tr>")
        for h in r.hypotheses:
            held = "<span class='pass'>yes</span>" if h.held else "<span class='fail'>no</span>"
            parts.append(f"<tr><td>{esc(h.name)}</td><td>{held}</td><td>{esc(h.detail)}</td></tr>")
        parts.append("</table>")
        rows: list[tuple[str, Any]] = [
            ("detection (s)", _seconds(r.detection)),
            ("first successful write after the fault (s)", _seconds(r.first_write)),
            ("reads served by the stale cache", r.fallback_served),
            ("errors by type", _errors(r, 20)),
        ]
        parts.append(
            "<table>"
            + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
            + "</table>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return charts
