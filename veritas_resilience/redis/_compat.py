"""Small shims over Python and redis-py versions."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import redis.asyncio
import redis.exceptions as rex

if sys.version_info >= (3, 11):
    from asyncio import timeout as async_timeout
else:  # pragma: no cover - redis-py depends on async-timeout before 3.11.3
    from async_timeout import timeout as async_timeout

__all__ = ["DirectSendConnection", "async_timeout", "expired"]


def expired(scope: Any) -> bool:
    """Whether a timeout scope of :func:`async_timeout` ran out (its API differs by version)."""
    state = scope.expired
    return bool(state() if callable(state) else state)


class DirectSendConnection(redis.asyncio.Connection):
    """A ``redis.asyncio.Connection`` that writes without ``asyncio.wait_for`` (internal)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Write a packed command (refused on a fenced connection, see :meth:`_may_send`).

        Unlike redis-py, the write is not wrapped in ``asyncio.wait_for``: on Python 3.11 that
        can swallow a cancellation arriving as the write completes (the caller's task then runs
        on as if never cancelled), and it costs a task per command. The socket timeout applies
        only when the write actually has to wait for the socket.
        """
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health and self.health_check_interval:
            await self.check_health()  # type: ignore[no-untyped-call]
        # No await between this check and the write: nothing can switch in between.
        if not self._may_send():
            await self._refuse()
        writer = self._writer
        assert writer is not None
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                writer.write(command)
            else:
                writer.writelines(command)
            if writer.transport.get_write_buffer_size() and self.socket_timeout:
                async with async_timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()
        except asyncio.TimeoutError:
            await self.disconnect(nowait=True)
            raise rex.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise rex.ConnectionError(
                f"Error while writing to {self.host}:{self.port}: {exc}"
            ) from exc
        except BaseException:
            # A command half written cannot be taken back: the connection is unusable.
            await self.disconnect(nowait=True)
            raise

    def _may_send(self) -> bool:
        return True

    async def _refuse(self) -> None:
        raise rex.ConnectionError("the connection may not send")
