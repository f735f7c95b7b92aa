"""Hook dispatch: the default hook set, per-component hook sets, and isolation of raising hooks."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import structlog

from . import _validate
from .errors import public_type_name
from .events import Event, Hook, wanted_event_types

__all__ = [
    "HookSet",
    "Instrumented",
    "default_hook_set",
    "get_hooks",
    "read_count",
    "set_hooks",
    "subscribe_defaults",
]

_log = structlog.get_logger("veritas_resilience.hooks")


class _Component(Protocol):
    def _hooks_changed(self, hooks: HookSet) -> None: ...


class HookSet:
    """An immutable list of hooks plus the set of those disabled after raising."""

    __slots__ = ("__weakref__", "_disabled", "_hooks", "_lock", "_wants_cache")

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self._hooks: tuple[Hook, ...] = _validate.hooks(hooks) or ()
        self._disabled: set[int] = set()
        self._lock = threading.Lock()
        self._wants_cache: dict[type[Event], bool] = {}

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The hooks, in dispatch order, including disabled ones."""
        return self._hooks

    def wants(self, event_type: type[Event]) -> bool:
        """Whether any enabled hook wants events of ``event_type``."""
        cached = self._wants_cache.get(event_type)
        if cached is not None:
            return cached
        result = False
        for hook in self._hooks:
            if id(hook) in self._disabled:
                continue
            types = wanted_event_types(hook)
            if types is None or any(issubclass(event_type, t) for t in types):
                result = True
                break
        self._wants_cache[event_type] = result
        return result

    def emit(self, event: Event) -> None:
        """Send ``event`` to every enabled hook that wants it; a raising hook is disabled."""
        for hook in self._hooks:
            if id(hook) in self._disabled:
                continue
            types = wanted_event_types(hook)
            if types is not None and not isinstance(event, tuple(types)):
                continue
            try:
                hook.on_event(event)
            except Exception as exc:
                with self._lock:
                    self._disabled.add(id(hook))
                    self._wants_cache.clear()
                _log.error(
                    "hook_disabled",
                    hook=repr(hook),
                    event_type=type(event).__name__,
                    error_type=public_type_name(exc),
                    error=str(exc),
                )

    def attach(self, component: object) -> None:
        """Tell every hook with an ``attach`` method that ``component`` uses it."""
        for hook in self._hooks:
            attach = getattr(hook, "attach", None)
            if attach is not None:
                attach(component)

    def detach(self, component: object) -> None:
        """Tell every hook with a ``detach`` method that ``component`` no longer uses it."""
        for hook in self._hooks:
            detach = getattr(hook, "detach", None)
            if detach is not None:
                detach(component)

    def is_disabled(self, hook: Hook) -> bool:
        """Whether ``hook`` was disabled after raising."""
        return id(hook) in self._disabled

    def __repr__(self) -> str:
        return f"HookSet({list(self._hooks)!r})"


_state_lock = threading.Lock()
_default: HookSet | None = None
_subscribers: weakref.WeakSet[Any] = weakref.WeakSet()


def _make_defaults() -> HookSet:
    from .instrumentation.prometheus import PrometheusHook
    from .instrumentation.structlog import StructlogHook

    return HookSet([PrometheusHook(), StructlogHook()])


def default_hook_set() -> HookSet:
    """Return the process-wide default hook set, creating the default hooks on first use."""
    global _default
    hooks = _default
    if hooks is None:
        with _state_lock:
            if _default is None:
                _default = _make_defaults()
            hooks = _default
    return hooks


def subscribe_defaults(component: _Component) -> HookSet:
    """Register ``component`` to follow the default hooks; return the current default set."""
    hooks = default_hook_set()
    with _state_lock:
        _subscribers.add(component)
    hooks.attach(component)
    return hooks


def get_hooks() -> tuple[Hook, ...]:
    """Return the default hooks used by every component created without ``hooks=``."""
    return default_hook_set().hooks


def set_hooks(hooks: Sequence[Hook] | None) -> None:
    """Replace the default hooks of every component that did not get its own ``hooks=``.

    Args:
        hooks: The new default hooks; ``[]`` silences all instrumentation, ``None`` restores the
            built-in defaults (Prometheus on the global registry, and structlog).

    Existing components switch at once: they detach from the old hooks and attach to the new.
    """
    global _default
    new = _make_defaults() if hooks is None else HookSet(hooks)
    with _state_lock:
        old = _default
        _default = new
        components = list(_subscribers)
    for component in components:
        if old is not None:
            old.detach(component)
        new.attach(component)
        component._hooks_changed(new)


def read_count(counter: itertools.count[int]) -> int:
    """The value of a hot-path counter (an ``itertools.count``) without advancing it."""
    # repr is "count(N)": the only way to read a count without advancing it on every version.
    return int(repr(counter)[6:-1])


class Instrumented:
    """Base of every component that sends events to hooks and exports metrics.

    Call :meth:`_init_hooks` from ``__init__`` (after ``self.name`` works), override
    :meth:`_on_hooks_changed` to cache which events are wanted (``self._hookset.wants(...)``), and
    define ``_metric_samples()`` to export metrics declared with
    :func:`veritas_resilience.instrumentation.prometheus.define_metric`.
    """

    _hookset: HookSet
    _name: str
    _auto_named: bool = False
    """Whether the name was made up (``breaker-3``): a :class:`Pipeline` then gives it its own."""

    def _adopt_name(self, name: str) -> None:
        """Take ``name`` if this component was auto-named; keep a name the user gave."""
        if not self._auto_named:
            return
        exporters = [h for h in self._hookset.hooks if callable(getattr(h, "detach", None))]
        for hook in exporters:
            hook.detach(self)  # type: ignore[attr-defined]
        self._name = name
        self._auto_named = False
        for hook in exporters:
            hook.attach(self)  # type: ignore[attr-defined]

    def _init_hooks(self, hooks: Sequence[Hook] | None) -> None:
        if hooks is None:
            self._hookset = subscribe_defaults(self)
        else:
            self._hookset = HookSet(hooks)
            self._hookset.attach(self)
        self._on_hooks_changed()

    def _hooks_changed(self, hooks: HookSet) -> None:
        self._hookset = hooks
        self._on_hooks_changed()

    def _on_hooks_changed(self) -> None:
        """Recompute what depends on the hooks (which events are wanted)."""

    def _emit(self, event: Event) -> None:
        self._hookset.emit(event)
