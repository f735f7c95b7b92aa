"""Small shims over Python and redis-py versions."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout as async_timeout
else:  # pragma: no cover - redis-py depends on async-timeout before 3.11.3
    from async_timeout import timeout as async_timeout

__all__ = ["async_timeout"]
