"""The ``application/health+json`` wire format (draft-inadarei-api-health-check)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from ._model import HealthReport, Observation

__all__ = ["CONTENT_TYPE", "encode", "to_dict"]

CONTENT_TYPE = "application/health+json"
"""The media type of every health response (IETF draft-inadarei-api-health-check)."""


def _iso(timestamp: float) -> str:
    stamp = datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def to_dict(report: HealthReport, *, details: bool) -> dict[str, Any]:
    """The report as health+json data.

    Args:
        report: The report.
        details: Include ``output``, ``observedValue``, ``observedUnit``, component ids and types,
            times and the service's identity. Without details, the body holds the status and
            each check's status only.
    """
    body: dict[str, Any] = {"status": report.status.value}
    if details:
        for key, value in (
            ("version", report.version),
            ("releaseId", report.release_id),
            ("serviceId", report.service_id),
            ("description", report.description),
        ):
            if value is not None:
                body[key] = value
    checks: dict[str, list[dict[str, Any]]] = {}
    for name, result in report.checks.items():
        stamp = None if result.time is None or not details else _iso(result.time)
        if result.observations:
            # The check's own verdict, beside its readings: its status can differ from the
            # worst reading's (a degraded cluster), and its output says why.
            verdict = Observation(
                status=result.status, component_type=result.component_type, output=result.output
            )
            checks[name] = [_item(verdict, stamp, details)]
        for reading in result.readings():
            key = name if reading.measurement is None else f"{name}:{reading.measurement}"
            checks.setdefault(key, []).append(_item(reading, stamp, details))
    if checks:
        body["checks"] = checks
    return body


def _item(reading: Observation, stamp: str | None, details: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"status": reading.status.value}
    if not details:
        return item
    if reading.component_id is not None:
        item["componentId"] = reading.component_id
    if reading.component_type is not None:
        item["componentType"] = reading.component_type
    if reading.observed_value is not None:
        item["observedValue"] = reading.observed_value
        if reading.observed_unit is not None:
            item["observedUnit"] = reading.observed_unit
    if stamp is not None:
        item["time"] = stamp
    if reading.output is not None and reading.status.value != "pass":
        item["output"] = reading.output
    return item


def encode(report: HealthReport, *, details: bool) -> bytes:
    """The report as a compact health+json body."""
    return json.dumps(to_dict(report, details=details), separators=(",", ":"), default=str).encode()
