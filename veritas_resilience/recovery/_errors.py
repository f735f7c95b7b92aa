"""The errors of the recovery package::

ResilienceError
└── PayloadError    a webhook body that is not Alertmanager's version 4 payload (also a
                    ``ValueError``); the receiver answers it with 400 and its message
"""

from __future__ import annotations

from ..errors import ResilienceError

__all__ = ["PayloadError"]


class PayloadError(ResilienceError, ValueError):
    """The body is not an Alertmanager webhook payload of version 4 (the message says why)."""
