"""veritas-resilience: keep a Python service answering while its database or cache fails over.

Quick start::

    from veritas_resilience import CircuitBreaker, CircuitOpenError

    breaker = CircuitBreaker(name="orders-db", failure_threshold=5, reset_timeout=30)

    @breaker
    async def load_order(order_id: int) -> dict: ...

The PostgreSQL and Redis clients live in ``veritas_resilience.postgres`` and
``veritas_resilience.redis``; importing this package imports neither driver.
"""

from __future__ import annotations

from ._clock import Clock as Clock
from ._clock import MonotonicClock as MonotonicClock
from ._hooks import get_hooks as get_hooks
from ._hooks import set_hooks as set_hooks
from ._redact import redact as redact
from .circuit_breaker import BreakerSnapshot as BreakerSnapshot
from .circuit_breaker import CircuitBreaker as CircuitBreaker
from .circuit_breaker import CircuitBreakerRegistry as CircuitBreakerRegistry
from .circuit_breaker import ExponentialBackoff as ExponentialBackoff
from .circuit_breaker import ExponentialCircuitBreaker as ExponentialCircuitBreaker
from .circuit_breaker import FailureRate as FailureRate
from .errors import BulkheadFullError as BulkheadFullError
from .errors import CircuitOpenError as CircuitOpenError
from .errors import ResilienceError as ResilienceError
from .errors import ResilienceTimeoutError as ResilienceTimeoutError
from .errors import RetryBudgetExhaustedError as RetryBudgetExhaustedError
from .errors import ServiceUnavailableError as ServiceUnavailableError
from .events import BreakerCallCancelled as BreakerCallCancelled
from .events import BreakerCallFailed as BreakerCallFailed
from .events import BreakerCallIgnored as BreakerCallIgnored
from .events import BreakerCallRejected as BreakerCallRejected
from .events import BreakerCallSucceeded as BreakerCallSucceeded
from .events import BreakerStateChanged as BreakerStateChanged
from .events import CircuitState as CircuitState
from .events import Event as Event
from .events import Hook as Hook
from .instrumentation import PrometheusHook as PrometheusHook
from .instrumentation import StructlogHook as StructlogHook

__version__ = "0.1.0"

__all__ = [
    "BreakerCallCancelled",
    "BreakerCallFailed",
    "BreakerCallIgnored",
    "BreakerCallRejected",
    "BreakerCallSucceeded",
    "BreakerSnapshot",
    "BreakerStateChanged",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitBreakerRegistry",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "Event",
    "ExponentialBackoff",
    "ExponentialCircuitBreaker",
    "FailureRate",
    "Hook",
    "MonotonicClock",
    "PrometheusHook",
    "ResilienceError",
    "ResilienceTimeoutError",
    "RetryBudgetExhaustedError",
    "ServiceUnavailableError",
    "StructlogHook",
    "get_hooks",
    "redact",
    "set_hooks",
]
