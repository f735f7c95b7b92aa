"""Which event loop is running, cheaply, so primitives notice state left behind by a closed loop.

A primitive shared by several event loops in turn (one ``asyncio.run()`` after another, as in
tests and scripts) may hold asyncio objects of a loop that closed with calls still pending: a
queued waiter nobody will wake, a slot nobody will give back, a coalesced call nobody will
finish. Such state must be recognised and dropped, not waited on. trio needs none of this: a
``trio.run()`` returns only after all its tasks have ended and released what they held.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

try:  # trio requires sniffio and sets its name; without sniffio, trio is not running
    from sniffio import thread_local as _sniffio
except ImportError:  # pragma: no cover - depends on what is installed
    _sniffio = None  # type: ignore[assignment]

__all__ = ["LoopTracker", "is_closed"]

_get_ident = threading.get_ident
_current_task = asyncio.current_task
_get_running_loop = asyncio._get_running_loop


class LoopTracker:
    """Finds the running asyncio loop with a cache, since the plain lookup costs a system call.

    The cache is the loop this tracker saw last and its thread: if that loop has a current task
    and we are in its thread, it is the running loop (a thread runs one loop at a time).
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[int, Any] = (0, None)

    def current(self) -> asyncio.AbstractEventLoop | None:
        """The running asyncio loop, or None under trio (or outside any loop)."""
        thread, loop = self._last
        if loop is not None and thread == _get_ident() and _current_task(loop) is not None:
            return loop  # type: ignore[no-any-return]
        if getattr(_sniffio, "name", None) == "trio":
            return None
        loop = _get_running_loop()
        self._last = (_get_ident(), loop)
        return loop


def is_closed(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` is an asyncio loop that has been closed (its pending calls are dead)."""
    return loop is not None and loop.is_closed()
