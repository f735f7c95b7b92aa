"""A Jepsen-style set checker over acknowledged writes.

Clients add unique ids to a set; every attempt ends in one of three ways:

- **ok**: the store acknowledged the write. It must be in the final read, else it is *lost*.
- **fail**: the write certainly had no effect (nothing was sent, or the store refused it before
  applying it). If it shows up anyway, it is *unexpected*.
- **info** (indeterminate): a timeout, a connection lost after sending, a write that the store
  acknowledged but did not replicate as asked. It may or may not be there; either is allowed, and
  it is never called lost. Those found in the final read are *recovered*.

Reading an id that was never attempted is *unexpected* too. A correct system has no lost and no
unexpected ids.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["SetCheckResult", "SetChecker"]


@dataclass(frozen=True, slots=True)
class SetCheckResult:
    """The verdict of a :class:`SetChecker`.

    Attributes:
        attempted: Writes attempted.
        acknowledged: Writes that ended ok.
        failed: Writes that certainly had no effect.
        indeterminate: Writes whose outcome is unknown.
        lost: Acknowledged ids missing from the final read (sorted).
        unexpected: Ids read that were never attempted or certainly failed (sorted).
        recovered: Indeterminate ids found in the final read.
    """

    attempted: int
    acknowledged: int
    failed: int
    indeterminate: int
    lost: tuple[int, ...]
    unexpected: tuple[int, ...]
    recovered: int

    @property
    def valid(self) -> bool:
        """True when nothing acknowledged was lost and nothing unexpected appeared."""
        return not self.lost and not self.unexpected

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON-able data (at most 20 ids of each anomaly listed)."""
        return {
            "valid": self.valid,
            "attempted": self.attempted,
            "acknowledged": self.acknowledged,
            "failed": self.failed,
            "indeterminate": self.indeterminate,
            "recovered": self.recovered,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "lost_ids": list(self.lost[:20]),
            "unexpected_ids": list(self.unexpected[:20]),
        }


class SetChecker:
    """Records the outcome of each write of unique ids, then checks a final read against them.

    Example::

        checker = SetChecker()
        checker.ok(1)
        checker.info(2)          # timed out: may or may not be there
        checker.fail(3)          # refused: must not be there
        result = checker.check({1, 2})
        assert result.valid and result.recovered == 1

    Thread-safe: writers on several threads or tasks may record into one checker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok: set[int] = set()
        self._fail: set[int] = set()
        self._info: set[int] = set()

    def ok(self, item: int) -> None:
        """Record an acknowledged write."""
        with self._lock:
            self._ok.add(item)

    def fail(self, item: int) -> None:
        """Record a write that certainly had no effect."""
        with self._lock:
            self._fail.add(item)

    def info(self, item: int) -> None:
        """Record a write whose outcome is unknown."""
        with self._lock:
            self._info.add(item)

    @property
    def acknowledged(self) -> int:
        """Acknowledged writes so far."""
        return len(self._ok)

    def check(self, final_read: Iterable[int]) -> SetCheckResult:
        """Compare the final read of the set with what was recorded."""
        read = set(final_read)
        with self._lock:
            ok, fail, info = set(self._ok), set(self._fail), set(self._info)
        attempted = ok | fail | info
        return SetCheckResult(
            attempted=len(attempted),
            acknowledged=len(ok),
            failed=len(fail),
            indeterminate=len(info),
            lost=tuple(sorted(ok - read)),
            unexpected=tuple(sorted((read - attempted) | (read & fail))),
            recovered=len(read & info),
        )
