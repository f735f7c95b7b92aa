"""Rate limiting: a token bucket or GCRA, per process or shared by every process through Redis.

:class:`RateLimiter` admits at most ``rate`` calls per second on average and ``burst`` at once.
A call over the limit is rejected at once with :class:`~veritas_resilience.RateLimitedError`
(which carries ``retry_after``), or, with ``max_wait``, waits for its turn when that turn comes
soon enough. Waiting reserves a future permit; a waiter that is cancelled hands that permit back
when nobody reserved after it, and otherwise lets it lapse: it never gives back more than it took.

Two algorithms give the same answers (they are two bookkeepings of one limit):

- ``"gcra"`` (the generic cell rate algorithm) keeps one number, the theoretical arrival time of
  the next call, which is also what the Redis script keeps;
- ``"token_bucket"`` keeps tokens and the time they were counted.

Given ``redis=``, the limit is shared by every process using the same name and Redis: one Lua
script, run atomically by the server with the server's clock (``TIME``), keeps the GCRA state, so
a hundred processes together keep one limit whatever their clocks say. When Redis does not answer
within ``redis_timeout``, the process falls back to its own share of the limit
(``fallback_share``) and says so (an event, a log line, the ``veritas_rate_limit_degraded``
gauge), trying Redis again every ``fallback_retry`` seconds.

With ``key=``, each key (a tenant, a user) gets its own limit. Local state is kept for the
``max_keys`` most recently used keys (least recently used first out), so memory stays bounded;
keys never appear in metric labels, logs or Redis key names (these hold a hash).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, ParamSpec, TypeAlias, TypeVar

import anyio

from . import _hooks, _validate
from ._clock import MONOTONIC, Clock
from ._validate import Seconds
from ._validate import fraction as _fraction
from ._validate import number as _number
from ._validate import positive_int as _positive_int
from ._validate import seconds as _seconds
from .errors import RateLimitedError
from .events import Event, Hook
from .instrumentation.prometheus import HistogramValue, define_metric
from .instrumentation.structlog import LOGGED_EVENTS, error_fields

if TYPE_CHECKING:  # redis is imported by whoever builds the client, never by this module
    from redis.asyncio import Redis

__all__ = [
    "RateLimitAlgorithm",
    "RateLimitRejected",
    "RateLimitStoreFailed",
    "RateLimitStoreRecovered",
    "RateLimiter",
]

P = ParamSpec("P")
T = TypeVar("T")

RateLimitAlgorithm: TypeAlias = Literal["gcra", "token_bucket"]

# Clocks are floats; sums of float intervals land a hair off exact multiples. A nanosecond of
# slack makes "exactly on time" count as on time without admitting anything measurable early.
_EPSILON = 1e-9

_OUTCOMES = ("allowed", "delayed", "rejected", "cancelled")

define_metric(
    "veritas_rate_limit_calls",
    "counter",
    "Calls seen by a rate limiter, by outcome: allowed (at once), delayed (after waiting for "
    "a permit), rejected, cancelled (while waiting).",
    ("name", "outcome"),
)
define_metric(
    "veritas_rate_limit_waiting", "gauge", "Calls waiting for a rate limiter's permit.", ("name",)
)
define_metric(
    "veritas_rate_limit_degraded",
    "gauge",
    "1 while a shared rate limiter cannot reach Redis and applies its local share of the limit.",
    ("name",),
)
define_metric(
    "veritas_rate_limit_store_errors",
    "counter",
    "Redis calls of a shared rate limiter that failed or timed out.",
    ("name",),
)
define_metric(
    "veritas_rate_limit_keys", "gauge", "Keys a keyed rate limiter holds state for.", ("name",)
)
define_metric(
    "veritas_rate_limit_keys_evicted",
    "counter",
    "Keys a keyed rate limiter forgot to stay within max_keys (least recently used first).",
    ("name",),
)


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitRejected(Event):
    """A rate limiter refused a call.

    Attributes:
        retry_after: Seconds until a permit will be free.
    """

    kind: ClassVar[str] = "rate_limiter"
    retry_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitStoreFailed(Event):
    """A shared rate limiter could not reach Redis and now applies its local share of the limit.

    Sent once when the limiter falls back, not for every failed call.

    Attributes:
        error: What went wrong (a timeout is a ``TimeoutError``).
        local_rate: The rate this process now allows on its own, per second.
    """

    kind: ClassVar[str] = "rate_limiter"
    error: BaseException
    local_rate: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """A warning: the limit is now enforced per process."""
        return (
            "warning",
            "rate_limit_store_unavailable",
            {"rate_limiter": self.name, "local_rate": self.local_rate, **error_fields(self.error)},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitStoreRecovered(Event):
    """A shared rate limiter reached Redis again and applies the shared limit once more.

    Attributes:
        degraded_for: Seconds it spent on its local share.
    """

    kind: ClassVar[str] = "rate_limiter"
    degraded_for: float

    def log_fields(self) -> tuple[str, str, dict[str, Any]]:
        """Info: back to the shared limit."""
        return (
            "info",
            "rate_limit_store_recovered",
            {"rate_limiter": self.name, "degraded_for": round(self.degraded_for, 6)},
        )


LOGGED_EVENTS.update({RateLimitStoreFailed, RateLimitStoreRecovered})


# -- local state --------------------------------------------------------------------------------


class _Gcra:
    """GCRA state: ``tat``, the theoretical arrival time of the next call."""

    __slots__ = ("interval", "last", "tat", "tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tolerance = burst * self.interval + _EPSILON
        self.tat = -float("inf")
        self.last = 0  # the id of the newest reservation still allowed to hand its permits back

    def reserve(self, now: float, permits: int, max_wait: float) -> float:
        """Take ``permits`` now or within ``max_wait``: return the wait, or -retry_after."""
        tat = self.tat if self.tat > now else now
        tat += permits * self.interval
        wait = tat - now - self.tolerance
        if wait > max_wait:
            return -max(wait, _EPSILON)
        self.tat = tat
        return wait if wait > 0.0 else 0.0

    def give_back(self, permits: int) -> None:
        self.tat -= permits * self.interval


class _TokenBucket:
    """Token bucket state: ``tokens`` as counted at ``updated``; negative while reserved ahead."""

    __slots__ = ("burst", "last", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = -float("inf")
        self.last = 0

    def reserve(self, now: float, permits: int, max_wait: float) -> float:
        """Take ``permits`` now or within ``max_wait``: return the wait, or -retry_after."""
        if now > self.updated:
            tokens = self.tokens + (now - self.updated) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.updated = now
        missing = permits - self.tokens
        wait = missing / self.rate - _EPSILON if missing > 0 else 0.0
        if wait > max_wait:
            return -max(wait, _EPSILON)
        self.tokens -= permits
        return wait if wait > 0.0 else 0.0

    def give_back(self, permits: int) -> None:
        self.tokens += permits


_State: TypeAlias = "_Gcra | _TokenBucket"

# -- Redis --------------------------------------------------------------------------------------

# GCRA in microseconds of the server's clock. KEYS[1]: the state; ARGV: interval per permit,
# tolerance (burst * interval), permits, longest wait (0: none). Returns {1, wait, new tat} when
# the permits are taken (now, or after ``wait``), {0, retry_after} when they are not.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + tonumber(ARGV[3]) * interval
local wait = tat - now - tolerance
if wait > max_wait then
  return {0, wait}
end
if wait < 0 then wait = 0 end
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
return {1, wait, string.format('%d', tat)}
"""

# Hand back a reservation if it is still the newest one: KEYS[1]; ARGV: its tat, its cost.
_GIVE_BACK = """
local tat = redis.call('GET', KEYS[1])
if tat and tat == ARGV[1] then
  redis.call('SET', KEYS[1], string.format('%d', tonumber(tat) - tonumber(ARGV[2])), 'KEEPTTL')
  return 1
end
return 0
"""


# -- the limiter --------------------------------------------------------------------------------

_reservations = itertools.count(1)


class RateLimiter(_hooks.Instrumented):
    """Admit at most ``rate`` calls per second (``burst`` at once); reject or delay the rest.

    As a decorator, through :meth:`call`, or by asking for a permit yourself::

        search_limit = RateLimiter(50, burst=10, name="search-api")

        @search_limit
        async def search(query: str) -> list[str]: ...

        try:
            await search("shoes")
        except RateLimitedError as exc:
            response.headers["Retry-After"] = str(math.ceil(exc.retry_after))

    Per-tenant limits, shared by every process through Redis, waiting up to 200 ms for a permit::

        per_tenant = RateLimiter(
            20, burst=40, key=lambda tenant, *args, **kwargs: tenant,
            max_wait=0.2, redis=redis_client, fallback_share=0.1, name="tenant-api",
        )

    A limiter without ``redis=`` belongs to one event loop (asyncio or trio), like a
    :class:`~veritas_resilience.Bulkhead`: its state is not locked. A limiter with ``redis=``
    needs a ``redis.asyncio`` client and so asyncio.

    Args:
        rate: Permits (> 0) per second, on average over time.
        burst: Permits (>= 1) that may be taken at once after a quiet spell; one second's worth
            (``ceil(rate)``) by default.
        algorithm: ``"gcra"`` (the default) or ``"token_bucket"``: the same limit, kept two
            ways. Shared (Redis) limits always use GCRA.
        max_wait: Seconds (>= 0) a call may wait for its permit; 0 or None rejects at once.
        key: A function of the call's arguments returning the key whose limit applies (per
            tenant, per user); one limit for all calls when None.
        max_keys: Keys (>= 1) whose state is kept in memory; the least recently used is
            forgotten (and starts afresh) beyond that.
        redis: A ``redis.asyncio`` client to share the limit through; None keeps it local.
        redis_prefix: Prepended to the Redis key names.
        redis_timeout: Seconds (> 0) a Redis call may take before the local share applies.
        fallback_share: The fraction (0 < share <= 1) of ``rate`` and ``burst`` this process
            allows on its own while Redis is unreachable: ``1 / number of processes`` keeps the
            total near the limit.
        fallback_retry: Seconds (> 0) between attempts to reach Redis again while degraded.
        name: Used in errors, events and metric labels; ``rate-limiter-N`` by default.
        clock: Time source; :class:`~veritas_resilience.testing.FakeClock` in tests.
        hooks: Hooks for this limiter only; the process-wide defaults when None.

    Raises:
        ValueError: If a setting is outside its allowed range (the message names it).
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int | None = None,
        algorithm: RateLimitAlgorithm = "gcra",
        max_wait: Seconds | None = None,
        key: Callable[..., Hashable] | None = None,
        max_keys: int = 10_000,
        redis: Redis | None = None,
        redis_prefix: str = "veritas:rate:",
        redis_timeout: Seconds = 0.05,
        fallback_share: float = 1.0,
        fallback_retry: Seconds = 1.0,
        name: str | None = None,
        clock: Clock = MONOTONIC,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self._rate = _number(rate, "rate")
        self._burst = (
            max(1, -int(-self._rate // 1)) if burst is None else _positive_int(burst, "burst")
        )
        if algorithm not in ("gcra", "token_bucket"):
            raise ValueError(f"algorithm must be 'gcra' or 'token_bucket', got {algorithm!r}")
        self._algorithm: RateLimitAlgorithm = algorithm
        self._max_wait = (
            0.0 if max_wait is None else _seconds(max_wait, "max_wait", allow_zero=True)
        )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the call's arguments, got {key!r}")
        self._key = key
        self._max_keys = _positive_int(max_keys, "max_keys")
        self._name = _validate.name(name, "rate-limiter")
        self._clock = _validate.clock(clock, sleeps=True)
        self._now = clock.monotonic
        self._state: _State = self._new_state(self._rate, self._burst)
        self._keys: OrderedDict[Hashable, _State] = OrderedDict()
        self._n_evicted = 0
        self._n_allowed = itertools.count()  # apart from the others: the hot path counts it
        self._counts = dict.fromkeys(_OUTCOMES[1:], 0)
        self._waiting = 0
        # Shared through Redis.
        self._redis = redis
        if not isinstance(redis_prefix, str):
            raise TypeError(f"redis_prefix must be a string, got {redis_prefix!r}")
        self._redis_key = f"{redis_prefix}{self._name}"
        self._redis_timeout = _seconds(redis_timeout, "redis_timeout")
        self._share = _fraction(fallback_share, "fallback_share")
        self._fallback_retry = _seconds(fallback_retry, "fallback_retry")
        self._local_rate = self._rate * self._share
        self._local_burst = max(1, int(self._burst * self._share))
        self._fallback: _State = self._new_state(self._local_rate, self._local_burst)
        self._fallback_keys: OrderedDict[Hashable, _State] = OrderedDict()
        self._degraded_since: float | None = None
        self._retry_redis_at = 0.0
        self._n_store_errors = 0
        self._interval_us = max(1, round(1e6 / self._rate))
        self._scripts: tuple[Any, Any] | None = None
        if redis is not None and algorithm != "gcra":
            raise ValueError("algorithm must be 'gcra' for a limit shared through Redis")
        self._init_hooks(hooks)

    # -- properties ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    @property
    def rate(self) -> float:
        """Permits per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Permits that may be taken at once."""
        return self._burst

    @property
    def algorithm(self) -> RateLimitAlgorithm:
        """``"gcra"`` or ``"token_bucket"``."""
        return self._algorithm

    @property
    def max_wait(self) -> float:
        """Seconds a call may wait for its permit (0: none)."""
        return self._max_wait

    @property
    def shared(self) -> bool:
        """Whether the limit is shared through Redis."""
        return self._redis is not None

    @property
    def degraded(self) -> bool:
        """Whether a shared limiter is applying its local share because Redis is unreachable."""
        return self._degraded_since is not None

    @property
    def keys(self) -> int:
        """Keys whose state is held in memory now."""
        return len(self._keys) + len(self._fallback_keys)

    @property
    def waiting(self) -> int:
        """Calls waiting for a permit now."""
        return self._waiting

    def counts(self) -> dict[str, int]:
        """Calls by outcome: allowed, delayed, rejected, cancelled."""
        return {"allowed": _hooks.read_count(self._n_allowed), **self._counts}

    def __repr__(self) -> str:
        where = "redis" if self._redis is not None else "local"
        return (
            f"<RateLimiter {self._name!r} {self._rate:g}/s burst={self._burst} "
            f"{self._algorithm} {where}>"
        )

    def _on_hooks_changed(self) -> None:
        self._w_rejected = self._hookset.wants(RateLimitRejected)

    # -- local bookkeeping -----------------------------------------------------------------------

    def _new_state(self, rate: float, burst: int) -> _State:
        return _Gcra(rate, burst) if self._algorithm == "gcra" else _TokenBucket(rate, burst)

    def _state_for(self, key: Hashable, fallback: bool = False) -> _State:
        if key is None:
            return self._fallback if fallback else self._state
        states = self._fallback_keys if fallback else self._keys
        state = states.get(key)
        if state is None:
            if fallback:
                state = self._new_state(self._local_rate, self._local_burst)
            else:
                state = self._new_state(self._rate, self._burst)
            states[key] = state
            if len(states) > self._max_keys:
                states.popitem(last=False)
                self._n_evicted += 1
        else:
            states.move_to_end(key)
        return state

    def _check_permits(self, permits: int) -> int:
        if permits != 1:
            _positive_int(permits, "permits")
            if permits > self._burst:
                raise ValueError(f"permits must be <= burst ({self._burst}), got {permits!r}")
        return permits

    def try_acquire(self, key: Hashable = None, *, permits: int = 1) -> bool:
        """Take ``permits`` now if the limit allows it; never waits (local limiters only).

        Args:
            key: Whose limit to take from (for keyed limiters); None for the one limit.
            permits: How many permits (1 to ``burst``).

        Returns:
            Whether the permits were taken.

        Raises:
            TypeError: If the limiter is shared through Redis (use :meth:`acquire`).
        """
        if self._redis is not None:
            raise TypeError("a limiter shared through Redis is async: use await acquire()")
        if permits == 1 and key is None:
            state = self._state
        else:
            self._check_permits(permits)
            state = self._state_for(key)
        wait = state.reserve(self._now(), permits, 0.0)
        if wait < 0.0:
            self._rejected(-wait)
            return False
        next(self._n_allowed)
        return True

    def _rejected(self, retry_after: float) -> RateLimitedError:
        self._counts["rejected"] += 1
        if self._w_rejected:
            self._emit(RateLimitRejected(name=self._name, retry_after=retry_after))
        return RateLimitedError(self._name, retry_after)

    # -- acquiring -------------------------------------------------------------------------------

    async def acquire(self, key: Hashable = None, *, permits: int = 1) -> None:
        """Take ``permits``, waiting up to ``max_wait`` for them.

        A wait that is cancelled hands its reservation back when no later call reserved after
        it (otherwise the reservation lapses: the limit is never exceeded).

        Args:
            key: Whose limit to take from (for keyed limiters); None for the one limit.
            permits: How many permits (1 to ``burst``).

        Raises:
            RateLimitedError: If the permits are not free now nor within ``max_wait``.
        """
        if permits == 1 and key is None and self._redis is None:
            state = self._state  # the common case, without the lookups below
        else:
            self._check_permits(permits)
            if self._redis is not None and self._now() >= self._retry_redis_at:
                shared = await self._acquire_shared(key, permits)
                if shared:
                    return
            state = self._state_for(key, self._redis is not None)
        wait = state.reserve(self._now(), permits, self._max_wait)
        if wait == 0.0:
            next(self._n_allowed)
            return
        if wait < 0.0:
            raise self._rejected(-wait)
        reservation = state.last = next(_reservations)
        self._waiting += 1
        try:
            await self._clock.sleep(wait)
        except BaseException:
            self._counts["cancelled"] += 1
            if state.last == reservation:  # nobody reserved after us: hand our permits back
                state.give_back(permits)
                state.last = 0
            raise
        finally:
            self._waiting -= 1
        self._counts["delayed"] += 1

    async def _acquire_shared(self, key: Hashable, permits: int) -> bool:
        """Take permits from the Redis limit; False when Redis failed (the local share applies)."""
        redis_key = self._redis_key if key is None else f"{self._redis_key}:{_digest(key)}"
        acquire, give_back = self._scripts or self._load_scripts()
        max_wait = round(self._max_wait * 1e6)
        args = (self._interval_us, self._interval_us * self._burst, permits, max_wait)
        try:
            with anyio.fail_after(self._redis_timeout):
                reply = await acquire(keys=[redis_key], args=args)
        except Exception as exc:
            self._store_failed(exc)
            return False
        self._store_ok()
        if int(reply[0]) == 0:
            raise self._rejected(max(int(reply[1]), 1) / 1e6)
        wait = int(reply[1]) / 1e6
        if wait <= 0.0:
            next(self._n_allowed)
            return True
        self._waiting += 1
        try:
            await self._clock.sleep(wait)
        except BaseException:
            self._counts["cancelled"] += 1
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._redis_timeout):
                try:
                    await give_back(keys=[redis_key], args=(reply[2], permits * self._interval_us))
                except Exception as exc:  # the reservation lapses; the limit still holds
                    self._store_failed(exc)
            raise
        finally:
            self._waiting -= 1
        self._counts["delayed"] += 1
        return True

    def _load_scripts(self) -> tuple[Any, Any]:
        assert self._redis is not None
        self._scripts = (
            self._redis.register_script(_ACQUIRE),
            self._redis.register_script(_GIVE_BACK),
        )
        return self._scripts

    def _store_failed(self, exc: Exception) -> None:
        self._n_store_errors += 1
        now = self._now()
        self._retry_redis_at = now + self._fallback_retry
        if self._degraded_since is None:
            self._degraded_since = now
            if isinstance(exc, TimeoutError) and not str(exc):
                exc = TimeoutError(f"no answer from Redis within {self._redis_timeout:g}s")
            self._emit(
                RateLimitStoreFailed(name=self._name, error=exc, local_rate=self._local_rate)
            )

    def _store_ok(self) -> None:
        since = self._degraded_since
        if since is not None:
            self._degraded_since = None
            self._fallback_keys.clear()
            self._emit(RateLimitStoreRecovered(name=self._name, degraded_for=self._now() - since))

    # -- calls -----------------------------------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Take a permit (waiting up to ``max_wait``), then run ``await fn(*args, **kwargs)``.

        Raises:
            RateLimitedError: If no permit is free in time; ``fn`` is not called.
        """
        await self.acquire(None if self._key is None else self._key(*args, **kwargs))
        return await fn(*args, **kwargs)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` function so every call first takes a permit."""
        _validate.require_async(fn, "RateLimiter")
        if self._key is not None or self._redis is not None or self._max_wait > 0:
            call = self.call

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                return await call(fn, *args, **kwargs)

        elif isinstance(self._state, _Gcra):
            # The common case inlined: one local GCRA limit that rejects at once.
            limiter = self
            allowed = self._n_allowed
            gcra = self._state
            interval, tolerance = gcra.interval, gcra.tolerance
            now = self._now if self._clock is not MONOTONIC else time.monotonic

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                t = now()
                tat = gcra.tat
                if tat <= t:  # no debt: one permit always fits (burst >= 1), the usual case
                    gcra.tat = t + interval
                    next(allowed)
                    return await fn(*args, **kwargs)
                tat += interval
                if tat - t <= tolerance:
                    gcra.tat = tat
                    next(allowed)
                    return await fn(*args, **kwargs)
                raise limiter._rejected(max(tat - t - tolerance, _EPSILON))

        else:
            limiter = self
            allowed = self._n_allowed
            bucket = self._state
            now = self._now if self._clock is not MONOTONIC else time.monotonic

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                wait = bucket.reserve(now(), 1, 0.0)
                if wait == 0.0:
                    next(allowed)
                    return await fn(*args, **kwargs)
                raise limiter._rejected(-wait)

        wrapper.rate_limiter = self  # type: ignore[attr-defined]
        return wrapper

    def _metric_samples(self) -> Iterator[tuple[str, tuple[str, ...], float | HistogramValue]]:
        name = (self._name,)
        for outcome, count in self.counts().items():
            yield "veritas_rate_limit_calls", (self._name, outcome), float(count)
        yield "veritas_rate_limit_waiting", name, float(self._waiting)
        if self._redis is not None:
            yield "veritas_rate_limit_degraded", name, 1.0 if self.degraded else 0.0
            yield "veritas_rate_limit_store_errors", name, float(self._n_store_errors)
        if self._key is not None:
            yield "veritas_rate_limit_keys", name, float(self.keys)
            yield "veritas_rate_limit_keys_evicted", name, float(self._n_evicted)


def _digest(key: Hashable) -> str:
    """The key's name in Redis: a hash, so tenant or user ids never appear there."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:32]
