"""Composition of policies in one fixed, documented order.

Wrapping policies by hand invites the classic mistakes: a retry inside the breaker (the breaker
counts one failure for many attempts, and the retry hammers an open breaker), a timeout around the
retries (one deadline for all attempts, so the last attempt gets what is left), a fallback inside
the retry (the retry never sees a failure). :class:`Pipeline` always nests them the same way,
outermost first::

    fallback ─► retry ─► rate limiter ─► circuit breaker ─► adaptive limit ─► bulkhead
             ─► hedge ─► timeout ─► (chaos) ─► your function

- **fallback** is outermost: it answers only when everything inside has given up.
- **retry** wraps the breaker: every attempt is one call the breaker counts, and an open breaker
  stops the retries (unless it reopens before the next wait).
- **rate limiter** sits inside the retry, so every attempt takes a permit (retries are load too),
  and outside the breaker, so its own rejections never count as failures of the dependency.
- **circuit breaker** wraps the concurrency limits: an open breaker rejects at once, without
  queueing.
- **adaptive limit** wraps the bulkhead and what is inside: it measures the latency of the
  dependency, and rejects at once when its learned limit is reached.
- **bulkhead** wraps the hedge and the timeout: time spent queueing for a slot is not charged to
  the call, and a hedged call holds one slot however many attempts it races.
- **hedge** wraps the timeout: each attempt gets the full time, and the first success wins.
- **timeout** comes next: each attempt gets the full time, and each expiry is one failure for
  the breaker and one retryable ``TimeoutError`` for the retry (counted once by each).
- **chaos** (:mod:`veritas_resilience.chaos` injectors), when given, is innermost: an injected
  fault or delay reaches every policy exactly as a real one would.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from . import _hooks, _validate
from ._adaptive import AdaptiveLimit
from ._fallback import FallbackChain, FallbackStep, StaleCache
from ._hedge import Hedge
from ._rate import RateLimiter
from ._validate import Seconds
from .circuit_breaker import CircuitBreaker
from .limits import Bulkhead, Timeout
from .retry import Retry

__all__ = ["ORDER", "Pipeline"]

P = ParamSpec("P")
T = TypeVar("T")

ORDER = (
    "fallback",
    "retry",
    "rate_limiter",
    "circuit_breaker",
    "adaptive_limit",
    "bulkhead",
    "hedge",
    "timeout",
)
"""The order policies are applied in, outermost first (chaos injectors, if any, go inside)."""
_KINDS = (*ORDER, "chaos")


class ChaosStep(Protocol):
    """What ``Pipeline(chaos=...)`` takes: a named decorator, such as a chaos injector."""

    @property
    def name(self) -> str:
        """The step's name."""
        ...

    def __call__(self, fn: Callable[..., Awaitable[Any]], /) -> Callable[..., Awaitable[Any]]:
        """Wrap ``fn``."""
        ...


class _ChaosSteps:
    """Several chaos steps applied in the order given, the first outermost."""

    def __init__(self, steps: Sequence[ChaosStep]) -> None:
        for step in steps:
            if not (callable(step) and isinstance(getattr(step, "name", None), str)):
                raise TypeError(f"chaos steps must be injectors (named decorators), got {step!r}")
        self.steps = tuple(steps)
        self.name = "+".join(step.name for step in self.steps)

    def __call__(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        for step in reversed(self.steps):
            fn = step(fn)
        return fn


class Pipeline:
    """Policies composed in the one safe order (:data:`ORDER`), fallback outermost.

    Give it the policies you want (any subset), then decorate functions with it or call through
    it. The same pipeline, and so the same breaker, bulkhead and budget, can guard several
    functions of one dependency::

        orders = Pipeline(
            name="orders-db",
            fallback=FallbackChain(orders_from_cache, name="orders"),
            retry=Retry(on=(ConnectionError, TimeoutError), attempts=3),
            breaker=CircuitBreaker(name="orders-db", failure_threshold=5, reset_timeout=30),
            timeout=2.0,
        )

        @orders
        async def load_order(order_id: int) -> Order: ...

        assert orders.describe() == ["fallback", "retry", "circuit_breaker", "timeout"]

    Args:
        name: Names the policies built here from shorthands (``timeout=2.0``, ``bulkhead=10``,
            ``fallback=[...]``) and the policies given without a name of their own (a
            ``CircuitBreaker()`` that would be ``breaker-N``, and the stale cache of the fallback
            chain); ``pipeline-N`` by default, which renames nothing.
        fallback: A :class:`~veritas_resilience.FallbackChain`, or a sequence of steps
            to build one from.
        retry: A :class:`~veritas_resilience.retry.Retry`.
        breaker: A :class:`~veritas_resilience.CircuitBreaker`.
        bulkhead: A :class:`~veritas_resilience.limits.Bulkhead`, or its ``max_concurrent``.
        timeout: A :class:`~veritas_resilience.limits.Timeout`, or its seconds.
        rate_limiter: A :class:`~veritas_resilience.RateLimiter`.
        adaptive_limit: An :class:`~veritas_resilience.AdaptiveLimit`.
        hedge: A :class:`~veritas_resilience.Hedge` (only for calls safe to repeat).
        chaos: A :mod:`~veritas_resilience.chaos` injector or a list of them (the first
            outermost), applied inside every other policy.

    Raises:
        TypeError: If a policy is of the wrong type.
        ValueError: If a shorthand value is out of range, or no policy is given.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        fallback: FallbackChain
        | Sequence[Callable[..., Any] | StaleCache | FallbackStep]
        | None = None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        bulkhead: Bulkhead | int | None = None,
        timeout: Timeout | Seconds | None = None,
        rate_limiter: RateLimiter | None = None,
        adaptive_limit: AdaptiveLimit | None = None,
        hedge: Hedge | None = None,
        chaos: ChaosStep | Sequence[ChaosStep] | None = None,
    ) -> None:
        self._name = _validate.name(name, "pipeline")
        if fallback is not None and not isinstance(fallback, FallbackChain):
            if not isinstance(fallback, (list, tuple)):
                raise TypeError(
                    f"fallback must be a FallbackChain or a list of steps, got {fallback!r}"
                )
            fallback = FallbackChain(*fallback, name=self._name)
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry, got {retry!r}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        for field, value, kind in (
            ("rate_limiter", rate_limiter, RateLimiter),
            ("adaptive_limit", adaptive_limit, AdaptiveLimit),
            ("hedge", hedge, Hedge),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{field} must be a {kind.__name__}, got {value!r}")
        if bulkhead is not None and not isinstance(bulkhead, Bulkhead):
            bulkhead = Bulkhead(_validate.positive_int(bulkhead, "bulkhead"), name=self._name)
        if timeout is not None and not isinstance(timeout, Timeout):
            timeout = Timeout(_validate.seconds(timeout, "timeout"), name=self._name)
        chaos_steps = None
        if chaos is not None:
            chaos_steps = _ChaosSteps(
                list(chaos) if isinstance(chaos, (list, tuple)) else [chaos]  # type: ignore[list-item]
            )
        policies: list[tuple[str, Any]] = [
            (kind, policy)
            for kind, policy in zip(
                _KINDS,
                (
                    fallback,
                    retry,
                    rate_limiter,
                    breaker,
                    adaptive_limit,
                    bulkhead,
                    hedge,
                    timeout,
                    chaos_steps,
                ),
            )
            if policy is not None
        ]
        if not policies:
            raise ValueError("a pipeline needs at least one policy (fallback, retry, breaker, ...)")
        if name is not None:
            # Parts the user left unnamed (``breaker-3``) take the pipeline's name, as the parts
            # built from shorthands do: one name per dependency in metrics, logs and errors.
            for _, policy in policies:
                if isinstance(policy, _hooks.Instrumented):  # not the chaos steps (test-time)
                    policy._adopt_name(self._name)  # a chain passes it on to its stale cache
        self._policies = tuple(policies)
        self._fallback = fallback
        self._retry = retry
        self._breaker = breaker
        self._bulkhead = bulkhead
        self._timeout = timeout
        self._rate_limiter = rate_limiter
        self._adaptive_limit = adaptive_limit
        self._hedge = hedge
        self._wrapped: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self._name

    @property
    def fallback(self) -> FallbackChain | None:
        """The fallback chain, if any."""
        return self._fallback

    @property
    def retry(self) -> Retry | None:
        """The retry policy, if any."""
        return self._retry

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The circuit breaker, if any."""
        return self._breaker

    @property
    def bulkhead(self) -> Bulkhead | None:
        """The bulkhead, if any."""
        return self._bulkhead

    @property
    def timeout(self) -> Timeout | None:
        """The timeout policy, if any."""
        return self._timeout

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The rate limiter, if any."""
        return self._rate_limiter

    @property
    def adaptive_limit(self) -> AdaptiveLimit | None:
        """The adaptive concurrency limit, if any."""
        return self._adaptive_limit

    @property
    def hedge(self) -> Hedge | None:
        """The hedge, if any."""
        return self._hedge

    @property
    def policies(self) -> tuple[tuple[str, Any], ...]:
        """``(kind, policy)`` pairs in the order they apply, outermost first."""
        return self._policies

    def describe(self) -> list[str]:
        """The kinds of policy applied, outermost first, e.g. ``["retry", "circuit_breaker"]``.

        The order is always a subsequence of :data:`ORDER`.
        """
        return [kind for kind, _ in self._policies]

    def __repr__(self) -> str:
        inner = " -> ".join(f"{kind}({policy.name})" for kind, policy in self._policies)
        return f"<Pipeline {self._name!r}: {inner}>"

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function with every policy, in order."""
        _validate.require_async(fn, "Pipeline")
        wrapped: Callable[..., Any] = fn
        # Innermost first: each policy's decorator wraps what the ones inside it built.
        for _, policy in reversed(self._policies):
            wrapped = policy(wrapped)
        wrapped.pipeline = self  # type: ignore[attr-defined]
        return wrapped

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` through every policy.

        The policies' wrapper for ``fn`` is built on first use and kept while ``fn`` lives (a
        bound method is a new object at each access: decorate the function instead).
        """
        wrapped = self._wrapped.get(fn)
        if wrapped is None:
            wrapped = self._wrapped[fn] = self(fn)
        return await wrapped(*args, **kwargs)  # type: ignore[no-any-return]
