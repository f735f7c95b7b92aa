"""The exceptions of :mod:`veritas_resilience.drill`::

ResilienceError
└── DrillError          the drill cannot run: missing server binaries (the message says how
                        to install them), an unreachable server, a bad option
"""

from __future__ import annotations

from ..errors import ResilienceError

__all__ = ["DrillError"]


class DrillError(ResilienceError):
    """The drill cannot run; the message says why and what to do."""
