"""MkDocs hook: the metrics reference page's table is generated from the code at build time."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- metrics-table -->"


def metrics_table() -> str:
    """A Markdown table of every metric family the library exports."""
    from veritas_resilience.instrumentation import describe_metrics

    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in describe_metrics():
        series = ", ".join(f"`{name}`" for name in metric.series)
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "none"
        meaning = metric.documentation.replace("|", "\\|")
        rows.append(f"| {series} | {metric.type} | {labels} | {meaning} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker on the metrics page with the generated table."""
    if MARKER in markdown:
        return markdown.replace(MARKER, metrics_table())
    return markdown
