"""Helpers for users' tests: run queued listeners in memory, by the same rules as the real consumer.

::

    from queueable.testing import TestTransport

    async def test_author_is_notified(app):
        async with TestTransport(app) as transport:
            await app.dispatch(CommentPosted(post_id=1, author="ann", text="hi"))
            assert transport.pending == 1                      # queued, not run: as in production
            await transport.run_until_idle(advance_time=True)  # run it, with every retry, in no real time
            assert transport.dead_letters == []

The transport is a :class:`~queueable.transport.memory.MemoryTransport` with a :class:`ManualClock`: messages go
through a JSON round trip, validation, the listener allow-list, the container, the retry policy and the
dead-letter rules, exactly as ``queueable-consume`` would treat them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from queueable.transport.memory import ManualClock, MemoryTransport, Processed

if TYPE_CHECKING:
    from types import TracebackType

    from queueable._app import App
    from queueable.abc import Transport

__all__ = ["ManualClock", "MemoryTransport", "Processed", "TestTransport"]


class TestTransport(MemoryTransport):
    """Swap an app's transport for a manual in-memory one for the duration of an ``async with`` block."""

    __test__ = False  # not a pytest test class

    def __init__(self, app: App, *, clock: ManualClock | None = None) -> None:
        super().__init__(clock=clock or ManualClock())
        self.app = app
        self._previous: Transport | None = None

    async def __aenter__(self) -> TestTransport:
        self._previous = self.app._transport  # noqa: SLF001 - restored on exit
        self.app.use_transport(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        self.app._transport = self._previous  # noqa: SLF001
        self.app._dispatcher = None  # noqa: SLF001
