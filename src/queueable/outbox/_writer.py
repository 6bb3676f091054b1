"""``Outbox``: write the messages of events dispatched inside a database transaction into that transaction."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Self, TypeGuard, TypeVar, cast

from sqlalchemy import func, insert, select

from queueable._app import App
from queueable._dispatcher import EventDispatcher, close_scope, open_scope
from queueable.outbox._table import OUTBOX, notify_channel, to_row

if TYPE_CHECKING:
    import contextvars
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from sqlalchemy import Connection, Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

    from queueable._dispatcher import _Scope
    from queueable._wire import OutgoingMessage

    Target = Session | Connection | AsyncSession | AsyncConnection

__all__ = ["Outbox", "OutboxScope"]

E = TypeVar("E")


class Outbox:
    """Routes queued messages into an outbox table inside the caller's transaction.

    ::

        outbox = Outbox(app)

        async with session.begin():                    # an AsyncSession (or Session, Connection, ...)
            session.add(order)
            await outbox.dispatch(session, OrderPlaced(order_id=order.id))
        # committed: the order and its event rows exist together; rolled back: neither does

    In-process listeners run at dispatch as usual; every queued listener's message (serialized at dispatch,
    validated when the scope ends) becomes one row, inserted through ``session``/``connection`` before the
    block ends, hence in its transaction. ``queueable relay APP`` publishes the rows afterwards. Nothing talks
    to the broker here.

    On PostgreSQL each write also runs ``pg_notify`` on the table's channel, so relays wake at the commit.
    PostgreSQL serializes the commits of notifying transactions; under a very high rate of outbox writes,
    ``notify=False`` trades that for the relays' polling delay.

    ``bind(target)`` is the scope form, for code that dispatches through the app (or a ``SyncDispatcher``)
    somewhere deeper::

        with Session(engine) as session, session.begin():
            with outbox.bind(session):
                events.dispatch(OrderPlaced(order_id=42))     # events = SyncDispatcher(app)
    """

    def __init__(
        self,
        dispatcher: App | EventDispatcher | None = None,
        *,
        table: Table = OUTBOX,
        clock: Callable[[], float] = time.time,
        notify: bool = True,
    ) -> None:
        self.target = dispatcher
        self.table = table
        self.clock = clock
        self.notify = notify

    @property
    def dispatcher(self) -> EventDispatcher:
        """The dispatcher :meth:`dispatch` uses."""
        if self.target is None:
            msg = "Outbox() was created without an app or dispatcher: use bind() with your own dispatch"
            raise TypeError(msg)
        return self.target.dispatcher if isinstance(self.target, App) else self.target

    def bind(self, target: Target) -> OutboxScope:
        """A scope: queued messages dispatched inside it are inserted through ``target`` when it ends.

        Use ``with`` for a sync ``Session``/``Connection`` and ``async with`` for either kind. On an exception
        the buffered messages are dropped (the transaction is about to roll back anyway).
        """
        return OutboxScope(self, target)

    async def dispatch(self, target: Target, event: E, *, defer: bool = False) -> E:
        """Dispatch ``event`` with its queued messages written to the outbox through ``target``."""
        async with self.bind(target):
            return await self.dispatcher.dispatch(event, defer=defer)

    def rows(self, messages: Sequence[OutgoingMessage]) -> list[dict[str, Any]]:
        """The rows for ``messages``, available now."""
        now = self.clock()
        return [to_row(message, now) for message in messages]

    def write(self, target: Session | Connection, messages: Sequence[OutgoingMessage]) -> None:
        """Insert ``messages`` through a sync ``Session`` or ``Connection`` (in its current transaction).

        On PostgreSQL, also ``pg_notify`` the table's channel: delivered at commit, it wakes the relays.
        """
        if messages:
            target.execute(insert(self.table), self.rows(messages))
            if self.notify and _dialect_name(target, self.table) == "postgresql":
                target.execute(self._notify, **self._bind_of(target))

    async def write_async(self, target: Target, messages: Sequence[OutgoingMessage]) -> None:
        """Insert ``messages`` through any supported target, awaiting an async one."""
        if not messages:
            return
        if _is_async(target):
            await target.execute(insert(self.table), self.rows(messages))
            if self.notify and _dialect_name(target, self.table) == "postgresql":
                await target.execute(self._notify, **self._bind_of(target))
        else:
            self.write(cast("Session | Connection", target), messages)

    def _bind_of(self, target: Target) -> dict[str, Any]:
        # SELECT pg_notify(...) names no table: a session that binds tables apart must be told which bind.
        return {"bind_arguments": {"clause": self.table}} if hasattr(target, "get_bind") else {}

    @property
    def _notify(self) -> Any:
        # PostgreSQL folds the notifications of one transaction on the same channel and payload into one.
        return select(func.pg_notify(notify_channel(self.table), ""))

    def __repr__(self) -> str:
        return f"<Outbox table={self.table.name!r}>"


class OutboxScope:
    """What :meth:`Outbox.bind` returns: a sync and async context manager around one outbox scope."""

    __slots__ = ("_scope", "_token", "outbox", "target")

    def __init__(self, outbox: Outbox, target: Target) -> None:
        self.outbox = outbox
        self.target = target
        self._scope: _Scope | None = None
        self._token: contextvars.Token[_Scope | None] | None = None

    @property
    def messages(self) -> list[OutgoingMessage]:
        """The messages buffered so far (a copy)."""
        return list(self._scope.messages) if self._scope is not None else []

    def _open(self) -> None:
        if self._scope is not None:
            msg = "an outbox scope cannot be entered twice"
            raise RuntimeError(msg)
        self._scope, self._token = open_scope(None)

    def _close(self, exc: BaseException | None) -> list[OutgoingMessage]:
        assert self._scope is not None
        assert self._token is not None
        messages, rejected = close_scope(self._scope, self._token, keep=exc is None)
        if rejected is not None:  # no rows at all: the exception rolls the transaction back with its data
            raise rejected
        return messages

    def __enter__(self) -> Self:
        if _is_async(self.target):
            msg = f"use `async with outbox.bind(...)` for {type(self.target).__name__}"
            raise TypeError(msg)
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        messages = self._close(exc)
        self.outbox.write(cast("Session | Connection", self.target), messages)

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.outbox.write_async(self.target, self._close(exc))


def _dialect_name(target: Target, table: Table) -> str:
    """The SQL dialect that ``target`` (Session, Connection, AsyncSession, AsyncConnection) uses for ``table``."""
    dialect = getattr(target, "dialect", None)  # Connection, AsyncConnection
    if dialect is None:  # Session, AsyncSession: the bind for this table (a session may bind tables apart)
        dialect = target.get_bind(clause=table).dialect  # type: ignore[union-attr]
    return str(dialect.name)


def _is_async(target: Target) -> TypeGuard[AsyncSession | AsyncConnection]:
    # Importing sqlalchemy.ext.asyncio needs greenlet; if nobody imported it, the target cannot be async.
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module is not None and isinstance(target, module.AsyncSession | module.AsyncConnection)
