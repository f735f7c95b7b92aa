"""The health model: statuses, one check's result, a report, and how statuses aggregate."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CheckResult", "HealthReport", "Observation", "Status", "aggregate", "worst"]


class Status(str, enum.Enum):
    """A health status, in the words of the IETF health check draft.

    ``PASS`` is healthy, ``WARN`` healthy with concerns, ``FAIL`` unhealthy. ``pass`` and ``warn``
    answer HTTP 200, ``fail`` answers 503. :meth:`parse` accepts the draft's aliases too.
    """

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """0 for pass, 1 for warn, 2 for fail: the larger is the worse."""
        return _RANK[self]

    @property
    def http_status(self) -> int:
        """The HTTP status a probe answers with: 200 for pass and warn, 503 for fail."""
        return 503 if self is Status.FAIL else 200

    @classmethod
    def parse(cls, value: str | Status) -> Status:
        """Read a status, case-insensitively, with the draft's aliases (ok/up, error/down).

        Raises:
            ValueError: For any other word.
        """
        if isinstance(value, Status):
            return value
        try:
            return _ALIASES[value.strip().lower()]
        except (KeyError, AttributeError):
            raise ValueError(
                f"status must be one of pass/ok/up, warn, fail/error/down, got {value!r}"
            ) from None


_RANK = {Status.PASS: 0, Status.WARN: 1, Status.FAIL: 2}
_ALIASES = {
    "pass": Status.PASS,
    "ok": Status.PASS,
    "up": Status.PASS,
    "warn": Status.WARN,
    "fail": Status.FAIL,
    "error": Status.FAIL,
    "down": Status.FAIL,
}


def worst(statuses: Iterable[Status]) -> Status:
    """The worst of ``statuses`` (``PASS`` for none)."""
    out = Status.PASS
    for status in statuses:
        if _RANK[status] > _RANK[out]:
            out = status
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """One reading of one component: a detail object of the health+json format.

    Attributes:
        status: This reading's status.
        measurement: What was measured (``"utilization"``, ``"responseTime"``,
            ``"connections"``...); the wire key is ``"check:measurement"``.
        component_id: Which instance (a node's ``host:port``, a breaker's name).
        component_type: ``"component"``, ``"datastore"``, ``"system"`` or a URI.
        observed_value: The value read (any JSON value).
        observed_unit: Its unit (``"s"``, ``"ms"``, ``"percent"``, ``"bytes"``...).
        output: Why it is not ``pass``; left out of the wire format on pass.
    """

    status: Status
    measurement: str | None = None
    component_id: str | None = None
    component_type: str | None = None
    observed_value: Any = None
    observed_unit: str | None = None
    output: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """What one check found, and when.

    A check returns one (or something simpler that the registry turns into one: a
    :class:`Status`, a status word, a bool, a number, or ``None`` for pass).

    Example:
        >>> CheckResult(status=Status.WARN, observed_value=0.42, observed_unit="s",
        ...             output="replication lag 0.42 s").status
        <Status.WARN: 'warn'>

    Attributes:
        status: The check's status.
        output: Why it is not ``pass`` (the error's text for a check that raised).
        observed_value: The value read, for a check with one reading.
        observed_unit: Its unit.
        measurement: What was measured, for a check with one reading.
        component_type: The kind of component, for a check with one reading.
        observations: The readings of a check of several nodes or measurements; when given,
            they replace the single reading described by the fields above, and the wire format
            shows the check's own status and output under its bare name beside them.
        time: Wall-clock time (seconds since the epoch) the reading was taken; the registry
            sets it, and it stays while the result is served from the cache.
        duration: Seconds the check took; set by the registry.
    """

    status: Status
    output: str | None = None
    observed_value: Any = None
    observed_unit: str | None = None
    measurement: str | None = None
    component_type: str | None = None
    observations: tuple[Observation, ...] = ()
    time: float | None = None
    duration: float | None = None

    def readings(self) -> tuple[Observation, ...]:
        """The observations, or the one reading the top-level fields describe."""
        if self.observations:
            return self.observations
        return (
            Observation(
                status=self.status,
                measurement=self.measurement,
                component_type=self.component_type,
                observed_value=self.observed_value,
                observed_unit=self.observed_unit,
                output=self.output,
            ),
        )


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The result of one probe: the aggregate status and each check's result.

    Attributes:
        status: The aggregate: the worst check status, except that a failing check that is not
            critical counts as ``warn``.
        checks: Each check's result by check name, in registration order.
        critical: The names of the critical checks among them.
        service_id: The service's id (``serviceId``).
        version: The service's version.
        release_id: The service's release id.
        description: A human description of the service.
    """

    status: Status
    checks: Mapping[str, CheckResult]
    critical: frozenset[str] = frozenset()
    service_id: str | None = None
    version: str | None = None
    release_id: str | None = None
    description: str | None = None

    @property
    def http_status(self) -> int:
        """200 for pass and warn, 503 for fail."""
        return self.status.http_status


def aggregate(results: Mapping[str, CheckResult], critical: frozenset[str]) -> Status:
    """The worst status, a non-critical ``fail`` counting as ``warn``."""
    out = Status.PASS
    for name, result in results.items():
        status = result.status
        if status is Status.FAIL and name not in critical:
            status = Status.WARN
        if _RANK[status] > _RANK[out]:
            out = status
            if out is Status.FAIL:
                break
    return out
