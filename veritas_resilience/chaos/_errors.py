"""The exceptions of :mod:`veritas_resilience.chaos`::

ResilienceError
└── ChaosError                  base of the chaos package's errors
    ├── InjectedFaultError      the default fault a FaultInjector raises
    └── ProxyError              a proxy or toxic request the fault proxy cannot honour
                                (``status``: the HTTP status its API answers with)
"""

from __future__ import annotations

from ..errors import ResilienceError

__all__ = ["ChaosError", "InjectedFaultError", "ProxyError"]


class ChaosError(ResilienceError):
    """Base of the errors of the chaos package."""


class InjectedFaultError(ChaosError, ConnectionError):
    """The fault a :class:`~veritas_resilience.chaos.FaultInjector` raises when given none.

    It is a ``ConnectionError`` too, so retries and breakers configured for connection failures
    react to it as they would to a real one.

    Attributes:
        name: The injector's name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"fault injected by {name!r}")
        self.name = name


class ProxyError(ChaosError):
    """A request to the fault proxy that cannot be honoured.

    Attributes:
        status: The HTTP status the proxy's API answers with: 400 (bad request), 404 (no such
            proxy or toxic), 409 (a proxy or toxic of that name exists, or the address is taken).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
