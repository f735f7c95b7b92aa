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

from ._adaptive import AdaptiveLimit as AdaptiveLimit
from ._adaptive import AdaptiveLimitChanged as AdaptiveLimitChanged
from ._adaptive import AdaptiveLimitRejected as AdaptiveLimitRejected
from ._cache import MemoryStaleStore as MemoryStaleStore
from ._cache import StaleStore as StaleStore
from ._clock import Clock as Clock
from ._clock import MonotonicClock as MonotonicClock
from ._fallback import FallbackChain as FallbackChain
from ._fallback import FallbackStep as FallbackStep
from ._fallback import FallbackTracker as FallbackTracker
from ._fallback import FallbackUse as FallbackUse
from ._fallback import StaleCache as StaleCache
from ._fallback import fallback as fallback
from ._fallback import track_fallbacks as track_fallbacks
from ._hedge import Hedge as Hedge
from ._hedge import HedgeBudgetExhausted as HedgeBudgetExhausted
from ._hedge import HedgeSkipped as HedgeSkipped
from ._hedge import HedgeStarted as HedgeStarted
from ._hooks import get_hooks as get_hooks
from ._hooks import set_hooks as set_hooks
from ._rate import RateLimiter as RateLimiter
from ._rate import RateLimitRejected as RateLimitRejected
from ._rate import RateLimitStoreFailed as RateLimitStoreFailed
from ._rate import RateLimitStoreRecovered as RateLimitStoreRecovered
from ._redact import redact as redact
from ._redis_store import RedisStaleStore as RedisStaleStore
from .circuit_breaker import BreakerSnapshot as BreakerSnapshot
from .circuit_breaker import CircuitBreaker as CircuitBreaker
from .circuit_breaker import CircuitBreakerRegistry as CircuitBreakerRegistry
from .circuit_breaker import ExponentialBackoff as ExponentialBackoff
from .circuit_breaker import ExponentialCircuitBreaker as ExponentialCircuitBreaker
from .circuit_breaker import FailureRate as FailureRate
from .errors import BulkheadFullError as BulkheadFullError
from .errors import CacheMissError as CacheMissError
from .errors import CircuitOpenError as CircuitOpenError
from .errors import ConcurrencyLimitError as ConcurrencyLimitError
from .errors import RateLimitedError as RateLimitedError
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
from .events import BulkheadRejected as BulkheadRejected
from .events import CircuitState as CircuitState
from .events import Event as Event
from .events import FallbackExhausted as FallbackExhausted
from .events import FallbackServed as FallbackServed
from .events import Hook as Hook
from .events import RetryBudgetDenied as RetryBudgetDenied
from .events import RetryExhausted as RetryExhausted
from .events import RetryScheduled as RetryScheduled
from .events import StaleStoreFailed as StaleStoreFailed
from .events import StaleValueServed as StaleValueServed
from .events import StaleWritesDropped as StaleWritesDropped
from .events import TimeoutExpired as TimeoutExpired
from .instrumentation import PrometheusHook as PrometheusHook
from .instrumentation import StructlogHook as StructlogHook
from .limits import Bulkhead as Bulkhead
from .limits import SchedulingClock as SchedulingClock
from .limits import Timeout as Timeout
from .pipeline import Pipeline as Pipeline
from .retry import Retry as Retry
from .retry import RetryBudget as RetryBudget

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLimit",
    "AdaptiveLimitChanged",
    "AdaptiveLimitRejected",
    "BreakerCallCancelled",
    "BreakerCallFailed",
    "BreakerCallIgnored",
    "BreakerCallRejected",
    "BreakerCallSucceeded",
    "BreakerSnapshot",
    "BreakerStateChanged",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadRejected",
    "CacheMissError",
    "CircuitBreaker",
    "CircuitBreakerRegistry",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "ConcurrencyLimitError",
    "Event",
    "ExponentialBackoff",
    "ExponentialCircuitBreaker",
    "FailureRate",
    "FallbackChain",
    "FallbackExhausted",
    "FallbackServed",
    "FallbackStep",
    "FallbackTracker",
    "FallbackUse",
    "Hedge",
    "HedgeBudgetExhausted",
    "HedgeSkipped",
    "HedgeStarted",
    "Hook",
    "MemoryStaleStore",
    "MonotonicClock",
    "Pipeline",
    "PrometheusHook",
    "RateLimitRejected",
    "RateLimitStoreFailed",
    "RateLimitStoreRecovered",
    "RateLimitedError",
    "RateLimiter",
    "RedisStaleStore",
    "ResilienceError",
    "ResilienceTimeoutError",
    "Retry",
    "RetryBudget",
    "RetryBudgetDenied",
    "RetryBudgetExhaustedError",
    "RetryExhausted",
    "RetryScheduled",
    "SchedulingClock",
    "ServiceUnavailableError",
    "StaleCache",
    "StaleStore",
    "StaleStoreFailed",
    "StaleValueServed",
    "StaleWritesDropped",
    "StructlogHook",
    "Timeout",
    "TimeoutExpired",
    "fallback",
    "get_hooks",
    "redact",
    "set_hooks",
    "track_fallbacks",
]
