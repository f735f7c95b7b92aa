"""The shipped Prometheus rules and Grafana dashboard, and how to adapt them to a deployment.

The files live in ``rules/`` (one file per rule group, with its ``promtool test rules`` file in
``rules/tests/``) and ``grafana/`` beside this module, and ship in the wheel. They name the
library's metrics as it exports them; :func:`render_rules` and :func:`render_dashboard` adapt them
to a deployment that renamed the metrics (``metric_relabel_configs``), scrapes several services
(an extra label matcher), routes on labels of its own, or hosts the runbooks elsewhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

__all__ = ["RULE_GROUPS", "dashboard_json", "render_dashboard", "render_rules", "rule_files"]

_PREFIX = "veritas_"
_RUNBOOKS = "docs/runbooks.md"

RULE_GROUPS: tuple[str, ...] = (
    "recording",
    "breakers",
    "dependencies",
    "postgres",
    "redis",
    "degradation",
)
"""The rule files, by name (``rules/<name>.yml``); ``recording`` is read by the others."""

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_MATCHER = re.compile(r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*$')


def _package_text(*parts: str) -> str:
    return resources.files(__package__).joinpath(*parts).read_text(encoding="utf-8")


def rule_files() -> dict[str, str]:
    """The shipped rule files, unchanged: ``{group: YAML text}`` in :data:`RULE_GROUPS` order."""
    return {group: _package_text("rules", f"{group}.yml") for group in RULE_GROUPS}


def dashboard_json() -> dict[str, Any]:
    """The shipped Grafana dashboard, unchanged, as a JSON object."""
    data: dict[str, Any] = json.loads(_package_text("grafana", "veritas-resilience.json"))
    return data


def _metric_pattern(prefix: str) -> re.Pattern[str]:
    # A metric name, not part of a recording rule's name (``job_name:veritas_x:rate5m``), with
    # its label matchers if any.
    return re.compile(r"(?<![\w:])" + re.escape(prefix) + r"[a-zA-Z0-9_]*(?![\w:(])(\{[^}]*\})?")


def _matchers_text(selector: str | Mapping[str, str] | None) -> str:
    if selector is None:
        return ""
    if isinstance(selector, Mapping):
        parts = []
        for key, value in selector.items():
            if not _NAME.match(key):
                raise ValueError(f"selector: {key!r} is not a valid label name")
            parts.append(f"{key}={json.dumps(str(value))}")
        return ", ".join(parts)
    text = selector.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    for part in _split_matchers(text):
        if not _MATCHER.match(part):
            raise ValueError(
                f'selector: {part!r} is not a label matcher (name="value", !=, =~ or !~)'
            )
    return text.strip()


def _split_matchers(text: str) -> list[str]:
    parts, current, quoted, escaped = [], "", False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append(current)
            current = ""
            continue
        current += char
    if current.strip():
        parts.append(current)
    return parts


def _rewrite_expr(text: str, prefix: str, matchers: str) -> str:
    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        braces = match.group(1) or ""
        name = prefix + whole[len(_PREFIX) : len(whole) - len(braces)]
        if not matchers:
            return name + braces
        inner = braces[1:-1].strip() if braces else ""
        return name + "{" + (f"{inner}, {matchers}" if inner else matchers) + "}"

    return _metric_pattern(_PREFIX).sub(one, text)


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", prefix):
        raise ValueError(f"prefix must be a metric name prefix such as 'veritas_', got {prefix!r}")


def _render_file(
    text: str,
    *,
    prefix: str,
    matchers: str,
    labels: Mapping[str, str],
    runbook_base: str | None,
    for_overrides: Mapping[str, str],
    seen: set[str],
) -> Iterator[str]:
    alert: str | None = None
    in_expr = False
    expr_indent = 0
    pending_for: str | None = None
    labels_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_expr and stripped and indent <= expr_indent:
            in_expr = False
        if labels_indent is not None and stripped:
            if indent <= labels_indent:
                labels_indent = None
            elif stripped.split(":", 1)[0].strip() in labels:
                continue  # replaced by the caller's value
        if stripped.startswith(("- alert:", "- record:")):
            alert = stripped.split(":", 1)[1].strip() if stripped.startswith("- alert:") else None
            if alert is not None:
                seen.add(alert)
            pending_for = for_overrides.get(alert) if alert is not None else None
        if stripped.startswith("expr:"):
            expr_indent = indent
            in_expr = stripped in ("expr: |", "expr: >", "expr: |-", "expr: >-")
            line = _rewrite_expr(line, prefix, matchers)
        elif in_expr:
            line = _rewrite_expr(line, prefix, matchers)
        elif stripped.startswith("for:") and pending_for is not None:
            line = f"{' ' * indent}for: {pending_for}"
            pending_for = None
        elif stripped == "labels:" and alert is not None:
            if pending_for is not None:  # an alert without ``for:`` gets one
                yield f"{' ' * indent}for: {pending_for}"
                pending_for = None
            yield line
            labels_indent = indent
            for key, value in labels.items():
                yield f"{' ' * (indent + 2)}{key}: {json.dumps(value)}"
            continue
        if runbook_base is not None and "runbook_url:" in line:
            line = line.replace(f'"{_RUNBOOKS}#', f'"{runbook_base}#')
        yield line


def render_rules(
    *,
    groups: Sequence[str] | None = None,
    prefix: str = _PREFIX,
    selector: str | Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    runbook_base: str | None = None,
    for_overrides: Mapping[str, str] | None = None,
) -> str:
    """The rules as one Prometheus rule file, adapted to a deployment.

    Args:
        groups: Which files of :data:`RULE_GROUPS` to include (all by default; the alerts of
            ``dependencies`` and ``degradation`` read series of ``recording``).
        prefix: The metric name prefix, if relabelling renamed ``veritas_`` (e.g. ``"app_"``).
        selector: Label matchers added to every selector of the library's metrics, as text
            (``'job="orders"'``) or a mapping of equalities (``{"job": "orders"}``).
        labels: Labels added to every alert (routing keys such as ``team``); they may replace
            the shipped ``severity``.
        runbook_base: Where docs/runbooks.md is served (``https://docs.example/runbooks/``);
            each alert's ``runbook_url`` becomes ``<base>#<alert name in lower case>``.
        for_overrides: ``{alert name: duration}`` replacing the ``for:`` of those alerts
            (``"30s"``, ``"2m"``), e.g. to make a test environment fire sooner.

    Returns:
        The YAML text of one rule file with every chosen group.

    Raises:
        ValueError: If a group, prefix, matcher, label name, duration or alert name is invalid
            (the message names it).
    """
    chosen = list(RULE_GROUPS if groups is None else groups)
    unknown = sorted(set(chosen) - set(RULE_GROUPS))
    if unknown:
        raise ValueError(f"groups: unknown {unknown}; choose from {list(RULE_GROUPS)}")
    _check_prefix(prefix)
    matchers = _matchers_text(selector)
    extra = dict(labels or {})
    for key in extra:
        if not _NAME.match(key) or key.startswith("__"):
            raise ValueError(f"labels: {key!r} is not a valid label name")
    overrides = dict(for_overrides or {})
    for name, duration in overrides.items():
        if not isinstance(duration, str) or not _DURATION.match(duration):
            raise ValueError(
                f"for_overrides[{name!r}] must be a Prometheus duration such as '30s', "
                f"got {duration!r}"
            )
    files = rule_files()
    out = [
        "# Prometheus rules for veritas-resilience (veritas-resilience rules).",
        "groups:",
    ]
    seen: set[str] = set()
    for group in chosen:
        lines = files[group].splitlines()
        start = lines.index("groups:")
        out.extend("  " + line if line.strip() else line for line in lines[:start])
        out.extend(
            _render_file(
                "\n".join(lines[start + 1 :]),
                prefix=prefix,
                matchers=matchers,
                labels=extra,
                runbook_base=runbook_base,
                for_overrides=overrides,
                seen=seen,
            )
        )
    missing = sorted(set(overrides) - seen)
    if missing:
        raise ValueError(f"for_overrides: no alert named {missing} in the chosen groups")
    return "\n".join(out) + "\n"


def render_dashboard(
    *, prefix: str = _PREFIX, selector: str | Mapping[str, str] | None = None
) -> str:
    """The Grafana dashboard as JSON text, with the same metric adaptations as the rules.

    Args:
        prefix: The metric name prefix, if relabelling renamed ``veritas_``.
        selector: Label matchers added to every selector of the library's metrics.

    Raises:
        ValueError: If the prefix or a matcher is invalid.
    """
    _check_prefix(prefix)
    matchers = _matchers_text(selector)
    data = dashboard_json()

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: _rewrite_expr(v, prefix, matchers)
                if k in ("expr", "query", "definition") and isinstance(v, str)
                else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return json.dumps(walk(data), indent=2) + "\n"
