"""Alertmanager's webhook payload (version 4), parsed and checked.

The receiver accepts a notification only when its shape is right, so an action never sees a
half-read alert. Fields the receiver does not use are kept as they came where they are part of
:class:`Alert`, and ignored otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import PayloadError

__all__ = ["Alert", "Notification", "parse_notification"]

_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert of a notification, as actions, revert actions and escalation hooks get it.

    Attributes:
        status: ``"firing"`` or ``"resolved"``.
        labels: The alert's labels (``alertname`` among them).
        annotations: Its annotations (``summary``, ``description``, ``runbook_url``...).
        starts_at: When it started firing, as Alertmanager wrote it (RFC 3339).
        ends_at: When it resolved; ``"0001-01-01T00:00:00Z"`` while firing.
        fingerprint: Alertmanager's hash of the labels: with ``starts_at``, one incident.
        generator_url: The link to the expression in Prometheus.
        external_url: The Alertmanager that delivered it.
    """

    status: Literal["firing", "resolved"]
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: str
    ends_at: str = ""
    fingerprint: str
    generator_url: str = ""
    external_url: str = ""

    @property
    def alertname(self) -> str:
        """The ``alertname`` label."""
        return self.labels["alertname"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    """A whole webhook notification: a group of alerts, firing and resolved ones mixed."""

    receiver: str
    status: str
    group_key: str
    truncated_alerts: int
    external_url: str
    alerts: tuple[Alert, ...]


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise PayloadError(f"the JSON nests deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise PayloadError(f"{what} must be an object of strings")
    return dict(value)


def _str(obj: Mapping[str, Any], key: str, what: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise PayloadError(f"{what}.{key} must be a non-empty string" if required else
                           f"{what}.{key} must be a string")  # fmt: skip
    return value


def parse_notification(body: bytes) -> Notification:
    """Parse and check a webhook body.

    Raises:
        PayloadError: If the body is not UTF-8 JSON, not an object, of another ``version``
            than ``"4"``, or an alert lacks ``status``, ``labels.alertname``, ``fingerprint`` or
            ``startsAt``.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"the body is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise PayloadError("the body must be a JSON object")
    _depth(data, _MAX_DEPTH)
    version = data.get("version")
    if version != "4":
        raise PayloadError(f'version must be "4" (Alertmanager\'s webhook), got {version!r}')
    alerts = data.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    truncated = data.get("truncatedAlerts", 0)
    if truncated is None:
        truncated = 0
    if isinstance(truncated, bool) or not isinstance(truncated, int) or truncated < 0:
        raise PayloadError(f"truncatedAlerts must be an integer >= 0, got {truncated!r}")
    external_url = _str(data, "externalURL", "payload")
    parsed = []
    for index, raw in enumerate(alerts):
        what = f"alerts[{index}]"
        if not isinstance(raw, dict):
            raise PayloadError(f"{what} must be an object")
        status = raw.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f'{what}.status must be "firing" or "resolved", got {status!r}')
        labels = _str_map(raw.get("labels"), f"{what}.labels")
        if not labels.get("alertname"):
            raise PayloadError(f"{what}.labels.alertname is missing")
        parsed.append(
            Alert(
                status=status,
                labels=labels,
                annotations=_str_map(raw.get("annotations"), f"{what}.annotations"),
                starts_at=_str(raw, "startsAt", what, required=True),
                ends_at=_str(raw, "endsAt", what),
                fingerprint=_str(raw, "fingerprint", what, required=True),
                generator_url=_str(raw, "generatorURL", what),
                external_url=external_url,
            )
        )
    return Notification(
        receiver=_str(data, "receiver", "payload"),
        status=_str(data, "status", "payload"),
        group_key=_str(data, "groupKey", "payload"),
        truncated_alerts=truncated,
        external_url=external_url,
        alerts=tuple(parsed),
    )
