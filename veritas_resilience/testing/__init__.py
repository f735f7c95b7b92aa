"""Tools for testing code that uses veritas-resilience, and for testing the library itself.

- :class:`FakeClock` makes time-based behaviour instant and exact.
"""

from __future__ import annotations

from ._clock import FakeClock as FakeClock

__all__ = ["FakeClock"]
