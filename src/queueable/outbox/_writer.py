"""``Outbox``: write the messages of events dispatched inside a database transaction into that transaction."""

from __future__ import annotations

import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Self, TypeGuard, TypeVar, cast

from sqlalchemy import Connection, event, func, insert, select
from sqlalchemy.engine.base import TwoPhaseTransaction
from sqlalchemy.orm import Session as _Session
from sqlalchemy.orm import scoped_session

from queueable._app import App
from queueable._dispatcher import EventDispatcher, close_scope, open_scope
from queueable.outbox._table import OUTBOX, database_now, notify_channel, to_row

if TYPE_CHECKING:
    import contextvars
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session, SessionTransaction

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

    A row's ``available_at`` is the database's clock, as the relays' leases are (``clock=`` overrides it, for
    tests). On PostgreSQL each write also runs ``pg_notify`` on the table's channel, so relays wake at the commit.
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
        clock: Callable[[], float] | None = None,
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

        While the scope is open it follows ``target``'s transaction: a SAVEPOINT (``begin_nested()``) or a
        transaction that rolls back drops the messages dispatched inside it, and a ``commit()`` inside the scope
        writes the messages dispatched before it into the transaction it commits.
        """
        return OutboxScope(self, target)

    async def dispatch(self, target: Target, event: E, *, defer: bool = False) -> E:
        """Dispatch ``event`` with its queued messages written to the outbox through ``target``."""
        async with self.bind(target):
            return await self.dispatcher.dispatch(event, defer=defer)

    def rows(self, messages: Sequence[OutgoingMessage]) -> list[dict[str, Any]]:
        """The rows for ``messages``, available now (``clock()``, or this host's clock)."""
        now = self.clock() if self.clock is not None else time.time()
        return [to_row(message, now) for message in messages]

    def write(self, target: Session | Connection, messages: Sequence[OutgoingMessage]) -> None:
        """Insert ``messages`` through a sync ``Session`` or ``Connection`` (in its current transaction).

        On PostgreSQL, also ``pg_notify`` the table's channel: delivered at commit, it wakes the relays.
        """
        if _is_async(target):  # its execute() is a coroutine: calling it here would write nothing
            kind = type(target).__name__
            msg = f"Outbox.write() takes a sync Session or Connection; await write_async() for {kind}"
            raise TypeError(msg)
        if messages:
            dialect = _dialect_name(target, self.table)
            target.execute(*self._insert(dialect, messages))
            if self.notify and dialect == "postgresql":
                target.execute(self._notify, **self._bind_of(target))

    async def write_async(self, target: Target, messages: Sequence[OutgoingMessage]) -> None:
        """Insert ``messages`` through any supported target, awaiting an async one."""
        if not messages:
            return
        if _is_async(target):
            dialect = _dialect_name(target, self.table)
            await target.execute(*self._insert(dialect, messages))
            if self.notify and dialect == "postgresql":
                await target.execute(self._notify, **self._bind_of(target))
        else:
            self.write(cast("Session | Connection", target), messages)

    def _insert(self, dialect: str, messages: Sequence[OutgoingMessage]) -> tuple[Any, list[dict[str, Any]]]:
        """The INSERT and its rows; ``available_at`` is the database's clock, as the relays' (unless ``clock``)."""
        rows = self.rows(messages)
        now = database_now(dialect) if self.clock is None else None
        if now is None:
            return insert(self.table), rows
        for row in rows:
            del row["available_at"]
        return insert(self.table).values(available_at=now), rows

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

    __slots__ = ("_follower", "_scope", "_token", "outbox", "target")

    def __init__(self, outbox: Outbox, target: Target) -> None:
        self.outbox = outbox
        self.target = _resolve(target)
        self._scope: _Scope | None = None
        self._token: contextvars.Token[_Scope | None] | None = None
        self._follower: _Follower | None = None

    @property
    def messages(self) -> list[OutgoingMessage]:
        """The messages buffered so far (a copy)."""
        return list(self._scope.messages) if self._scope is not None else []

    def _open(self) -> None:
        if self._scope is not None:
            msg = "an outbox scope cannot be entered twice"
            raise RuntimeError(msg)
        self._scope, self._token = open_scope(None)
        try:
            self._follower = _follow(self.outbox, self._scope, self.target)
        except BaseException:
            close_scope(self._scope, self._token, keep=False)
            raise

    def _close(self, exc: BaseException | None) -> list[OutgoingMessage]:
        assert self._scope is not None
        assert self._token is not None
        follower, self._follower = self._follower, None
        if follower is not None:
            _unfollow(follower)
        if exc is None and follower is not None and follower.stuck_in_savepoint:
            close_scope(self._scope, self._token, keep=False)
            msg = (
                "an outbox scope ended inside a SAVEPOINT begun in it: its rows would go into that SAVEPOINT, "
                "and the events dispatched before it would vanish if it rolled back. End the SAVEPOINT first"
            )
            raise RuntimeError(msg)
        try:
            messages, rejected = close_scope(self._scope, self._token, keep=exc is None)
        except ValueError as error:  # the token belongs to another context
            self._scope.closed = True
            msg = (
                "outbox.bind() ended in another context than the one it was entered in, so the events dispatched "
                "in between did not see it and were not written to the outbox (a FastAPI sync `yield` "
                "dependency does this: use an async dependency, or bind inside the endpoint)"
            )
            raise RuntimeError(msg) from error
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
        if exc is None and isinstance(self.target, _Session) and _flushable(self.target):
            self._flush_first(self.target.flush)
        messages = self._close(exc)
        self.outbox.write(cast("Session | Connection", self.target), messages)

    def _flush_first(self, flush: Callable[[], object]) -> None:
        """Flush the session before the scope ends: events that flush hooks dispatch for the block's changes
        belong to it (under ``with session.begin(), outbox.bind(session):`` the commit's flush comes after).
        Only for a session that autoflushes: one that does not may hold rows it cannot flush yet."""
        try:
            flush()
        except BaseException as exc:
            self._close(exc)
            raise

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        target = self.target
        if exc is None and isinstance(target, _Session) and _flushable(target):
            self._flush_first(target.flush)
        elif exc is None and _flushable(getattr(target, "sync_session", None)):  # AsyncSession
            try:
                await cast("AsyncSession", target).flush()
            except BaseException as error:
                self._close(error)
                raise
        await self.outbox.write_async(target, self._close(exc))


#: A position in an outbox scope's buffer: (messages ever buffered, refused dispatches ever buffered), counting
#: those already written (or raised), so a position taken before a write stays meaningful after it.
_Mark = tuple[int, int]


class _Follower:
    """Keeps an open outbox scope's buffer in step with the transaction of the session or connection it binds.

    - Each SAVEPOINT that begins while the scope is open remembers the buffer's length. When it rolls back, the
      messages buffered since it began are dropped (one that began before the scope drops them all): their rows
      would otherwise be written after it, into the enclosing transaction. Releasing one writes nothing: its
      messages stay buffered, so an enclosing SAVEPOINT that rolls back still drops them.
    - When the transaction rolls back, or ends without a commit (``Session.close()``), the buffer is dropped.
    - A commit of the transaction first writes what is buffered into it: the rows of a commit inside the scope
      would otherwise land in the next transaction, which nobody may commit. A Session writes again after each
      flush of the commit, for the events that flush hooks dispatch, and at the last moment on its connection
      (COMMIT, the RELEASE of a joined session's SAVEPOINT, PREPARE), for what later listeners dispatch.

    SQLAlchemy's events drive it (see :func:`_follow`). They run in the thread that drives the transaction,
    while no dispatch is running in the scope (a ``SyncDispatcher`` caller is blocked in ``dispatch()`` until
    its messages are buffered).
    """

    __slots__ = (
        "_committed",
        "_in_commit",
        "_marks",
        "_open",
        "_savepoints",
        "_subject",
        "_taken",
        "outbox",
        "scope",
    )

    def __init__(self, outbox: Outbox, scope: _Scope, subject: Session | Connection) -> None:
        self.outbox = outbox
        self.scope = scope
        self._subject = weakref.ref(subject)  # weak: a scope never exited must not keep its session alive
        self._taken: _Mark = (0, 0)
        # Session: savepoint -> mark at its start. Weak: a savepoint's rollback is reported after its end, and
        # again after a failed flush inside it, so the mark stays as long as SQLAlchemy holds the savepoint.
        self._marks: weakref.WeakKeyDictionary[SessionTransaction, _Mark] = weakref.WeakKeyDictionary()
        self._open: weakref.WeakSet[SessionTransaction] = weakref.WeakSet()  # Session: savepoints begun, open
        self._savepoints: list[_Mark] = []  # Connection: marks of the open savepoints begun in the scope
        self._committed = False  # Session: the transaction that is ending committed
        self._in_commit = False  # Session: the transaction's commit is under way (its before_commit ran)

    @property
    def subject(self) -> Session | Connection:
        subject = self._subject()
        assert subject is not None  # its events are running
        return subject

    @property
    def stuck_in_savepoint(self) -> bool:
        """Whether messages are buffered while a SAVEPOINT begun inside the scope is still open."""
        if not (self._savepoints or self._open) or not self.buffering:
            return False
        subject = self.subject
        return subject.in_nested_transaction() and subject.get_transaction() is not None

    def mark(self) -> _Mark:
        scope = self.scope
        built = scope.materialize()
        return self._taken[0] + len(built), self._taken[1] + len(scope.rejected)

    def cut(self, mark: _Mark) -> None:
        """Drop what was buffered after ``mark``."""
        scope = self.scope
        built = scope.materialize()
        del built[max(0, mark[0] - self._taken[0]) :]
        del scope.rejected[max(0, mark[1] - self._taken[1]) :]

    def cut_all(self) -> None:
        self.cut(self._taken)

    def write(self, target: Connection | None = None) -> None:
        """Write the buffer into the current transaction (through ``target``, else the subject), or raise for
        the dispatches refused. If the write fails, the messages stay buffered.
        """
        scope = self.scope
        refused = len(scope.rejected)
        messages, rejected = scope.take()
        if rejected is not None:
            scope.built[:0] = messages
            self._taken = (self._taken[0], self._taken[1] + refused)
            raise rejected
        try:
            self.outbox.write(target if target is not None else self.subject, messages)
        except BaseException:
            scope.built[:0] = messages
            raise
        self._taken = (self._taken[0] + len(messages), self._taken[1])

    # Session events (an AsyncSession's are its sync_session's).
    def session_began(self, transaction: SessionTransaction) -> None:
        if transaction.nested:
            self._marks[transaction] = self.mark()
            self._open.add(transaction)
        elif transaction.parent is None:
            self._committed = False

    def session_rolled_back(self, transaction: SessionTransaction) -> None:
        # A failed flush rolls back its subtransaction, whose boundary (the enclosing SAVEPOINT or the
        # transaction) is rolled back with it; the boundary's own rollback may follow: cutting is idempotent.
        boundary: SessionTransaction | None = transaction
        while boundary is not None and boundary.parent is not None and not boundary.nested:
            boundary = boundary.parent
        if boundary is not None and boundary.nested:
            self.cut(self._marks.get(boundary, self._taken))
        else:
            self.cut_all()

    def _committing(self) -> bool:
        """Whether the transaction itself (not a SAVEPOINT's release) is being committed.

        ``before_commit`` fires for a release too, with the SAVEPOINT current; the transaction's commit may
        come while a SAVEPOINT is still open (its commit releases them), and then the transaction is the one
        changing state (its rows go into the innermost SAVEPOINT, released by the same commit). A commit that
        raised is no longer changing state.
        """
        root = cast("Session", self.subject).get_transaction()
        # SQLAlchemy's own marker of a transaction whose state is changing (private: read directly, so that a
        # version without it fails loudly instead of skipping the write; see _CHANGE_IN_PROGRESS).
        return root is not None and root._next_state is _CHANGE_IN_PROGRESS  # noqa: SLF001

    def session_commits(self) -> None:
        if self._committing():
            self._in_commit = True
            self.write()
            # The outbox table's database must take part in this commit, so that its connection's commit event
            # (connection_commits) sees what later before_commit listeners dispatch.
            session = cast("Session", self.subject)
            session.connection(bind_arguments={"clause": self.outbox.table})

    @property
    def buffering(self) -> bool:
        scope = self.scope
        return bool(scope.pending or scope.built or scope.rejected)

    @property
    def committing_now(self) -> bool:
        """Whether the commit whose before_commit ran is still under way (one that raised is not)."""
        return self._in_commit and self._committing()

    def session_flushed(self, *_: object) -> None:
        # The commit flushes after every before_commit listener has run, including ones that add objects
        # whose flush hooks dispatch events: those are written here, still inside the transaction.
        if self.buffering and self.committing_now:
            self.write()

    def connection_commits(self, conn: Connection) -> None:
        """The last moment before the database commits: what later before_commit listeners dispatched."""
        if not (self.buffering and self.committing_now):
            return
        bind = cast("Session", self.subject).get_bind(clause=self.outbox.table)
        if conn is not bind and conn.engine is not bind:
            return  # another database of the session
        self._write_or_roll_back(conn)

    def session_committed(self) -> None:
        if not cast("Session", self.subject).in_nested_transaction():
            self._committed = True
            self._in_commit = False

    def session_ended(self, transaction: SessionTransaction) -> None:
        if transaction.nested:
            self._open.discard(transaction)
        elif transaction.parent is None:
            if not self._committed:  # closed (Session.close(), reset()) without a commit: rolled back
                self.cut_all()
            self._committed = self._in_commit = False

    # Connection events (an AsyncConnection's are its sync_connection's).
    def savepoint(self, *_: object) -> None:
        self._savepoints.append(self.mark())

    def released(self, *_: object) -> None:
        if self._savepoints:
            self._savepoints.pop()

    def savepoint_rolled_back(self, *_: object) -> None:
        self.cut(self._savepoints.pop() if self._savepoints else self._taken)

    def rolled_back(self) -> None:
        self.cut_all()
        self._savepoints.clear()

    def commits(self) -> None:
        self._savepoints.clear()
        self._write_or_roll_back(cast("Connection", self.subject))

    def _write_or_roll_back(self, conn: Connection) -> None:
        """:meth:`write` through ``conn`` from inside its commit; if it fails, roll ``conn`` back and raise.

        SQLAlchemy deactivates a transaction whose commit raised without rolling it back in the database (for a
        failed COMMIT there is nothing left to roll back); here the work is still pending there, and the next
        commit would carry it. Roll it back now, as the caller will believe it was.
        """
        try:
            self.write(conn)
        except BaseException:
            conn._rollback_impl()  # noqa: SLF001 - no public way to roll back beneath a deactivated transaction
            raise

    def begins_two_phase(self, *_: object) -> None:
        _refuse_two_phase()


#: The followers of the open scopes bound to each session or connection (the sync one of an async target).
#: SQLAlchemy advises against adding and removing listeners per unit of work ("a configurational operation", not
#: thread-safe against the event running): the listeners below are added once and look their followers up here.
_followers: weakref.WeakKeyDictionary[Session | Connection, list[_Follower]] = weakref.WeakKeyDictionary()
#: Connections a followed Session committed through, with that session (weakly): their ``commit`` event is the
#: last moment before the database commits, after every session-level listener.
_session_connections: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = weakref.WeakKeyDictionary()


def _follow(outbox: Outbox, scope: _Scope, target: Target) -> _Follower:
    """Start following ``target``'s transaction for ``scope``; :func:`_unfollow` when the scope ends."""
    if _CHANGE_IN_PROGRESS is None:  # pragma: no cover - see its definition
        msg = "outbox.bind() cannot follow transactions on this SQLAlchemy version (no state_changes module)"
        raise RuntimeError(msg)
    subject = _sync_subject(target)
    if isinstance(subject, Connection) and isinstance(subject.get_transaction(), TwoPhaseTransaction):
        _refuse_two_phase()
    follower = _Follower(outbox, scope, subject)
    followers = _followers_of(subject)
    if followers is None:
        followers = []
        try:
            _followers[subject] = followers
        except TypeError:  # a Session subclass with __eq__ and no __hash__
            subject.__dict__[_FOLLOWERS] = followers
        if isinstance(subject, Connection):
            # On this connection only, once: connection events on every connection would slow down every
            # statement the application runs (about 3 µs each, measured on SQLite).
            for name, hook in _CONNECTION_HOOKS.items():
                event.listen(subject, name, hook)
    if isinstance(subject, _Session):
        root = subject.get_transaction()
        # Connections begun before the scope: no after_begin to come. Private, read directly (as _next_state).
        for conn in list(root._connections if root is not None else ()):  # noqa: SLF001
            if isinstance(conn, Connection):
                _watch_session_connection(subject, conn)
    followers.append(follower)
    return follower


def _watch_session_connection(session: Session, conn: Connection) -> None:
    if conn not in _session_connections:
        event.listen(conn, "commit", _session_connection_commits)
        event.listen(conn, "release_savepoint", _session_savepoint_released)
        # Session(twophase=True) prepares, then commits with commit_twophase: PREPARE is its last moment.
        event.listen(conn, "prepare_twophase", _session_connection_commits)
    _session_connections[conn] = weakref.ref(session)


def _session_savepoint_released(conn: Connection, name: str, _context: object) -> None:
    """A session joined to an external transaction through a SAVEPOINT (``join_transaction_mode``
    ``create_savepoint``) commits by releasing it: that release is its last moment."""
    session = _session_of(conn)
    root = session.get_transaction() if session is not None else None
    entry = root._connections.get(conn) if root is not None else None  # noqa: SLF001 - as in _follow
    if entry is not None and getattr(entry[1], "_savepoint", None) == name:  # the session's own SAVEPOINT
        _session_connection_commits(conn)


def _session_began_on(session: Session, _transaction: SessionTransaction, conn: Connection) -> None:
    if _followers_of(session):
        _watch_session_connection(session, conn)


def _session_of(conn: Connection) -> Session | None:
    """The followed session that committed through ``conn`` last, if it is still alive."""
    ref = _session_connections.get(conn)
    return ref() if ref is not None else None


def _session_connection_commits(conn: Connection, *_: object) -> None:
    session = _session_of(conn)
    if session is not None:
        for follower in _followers_of(session) or ():
            follower.connection_commits(conn)


#: Where the followers of an unhashable session (a subclass defining ``__eq__``) are kept: on the session itself.
_FOLLOWERS = "_queueable_outbox_followers"


def _followers_of(target: Session | Connection) -> list[_Follower] | None:
    try:
        return _followers.get(target)
    except TypeError:  # unhashable: see _FOLLOWERS
        return cast("list[_Follower] | None", getattr(target, "__dict__", {}).get(_FOLLOWERS))


def _refuse_two_phase() -> None:
    msg = "an outbox scope cannot follow a two-phase transaction on a Connection"
    raise TypeError(msg)


def _unfollow(follower: _Follower) -> None:
    followers = _followers_of(follower.subject)
    if followers is not None and follower in followers:
        followers.remove(follower)


def _resolve(target: Target) -> Target:
    """``target`` itself, or the session a ``scoped_session`` (Flask-SQLAlchemy's ``db.session``) stands for."""
    if isinstance(target, scoped_session):
        return cast("Session", target())
    asyncio_module = sys.modules.get("sqlalchemy.ext.asyncio")
    if asyncio_module is not None and isinstance(target, asyncio_module.async_scoped_session):
        return cast("AsyncSession", target())
    if isinstance(target, _Session | Connection) or _is_async(target):
        return target
    msg = (
        f"outbox.bind() takes a Session, Connection, AsyncSession, AsyncConnection or scoped session, "
        f"not {type(target).__name__}"
    )
    raise TypeError(msg)


def _sync_subject(target: Target) -> Session | Connection:
    if isinstance(target, _Session | Connection):
        return target
    subject = getattr(target, "sync_session", None) or getattr(target, "sync_connection", None)
    if subject is None:
        msg = "bind an AsyncConnection once it is started (`async with engine.connect() as conn`)"
        raise TypeError(msg)
    return cast("Session | Connection", subject)


def _hook(method: Callable[..., None]) -> Callable[..., None]:
    """The listener that runs ``method`` (with the event's arguments after its target) for each follower."""

    def hook(target: Session | Connection, *args: Any) -> None:
        for follower in _followers_of(target) or ():
            method(follower, *args)

    return hook


_SESSION_HOOKS = {
    "after_transaction_create": _hook(_Follower.session_began),
    "after_soft_rollback": _hook(_Follower.session_rolled_back),
    "before_commit": _hook(_Follower.session_commits),
    "after_commit": _hook(_Follower.session_committed),
    "after_flush_postexec": _hook(_Follower.session_flushed),
    "after_transaction_end": _hook(_Follower.session_ended),
}
# Registered once, when this module is imported (an application's startup): adding class-wide listeners while
# other threads run session events would break their iteration of the listener list.
for _name, _session_hook in _SESSION_HOOKS.items():
    event.listen(_Session, _name, _session_hook)
event.listen(_Session, "after_begin", _session_began_on)

_CONNECTION_HOOKS = {
    "savepoint": _hook(_Follower.savepoint),
    "release_savepoint": _hook(_Follower.released),
    "rollback_savepoint": _hook(_Follower.savepoint_rolled_back),
    "rollback": _hook(_Follower.rolled_back),
    "commit": _hook(_Follower.commits),
    "begin_twophase": _hook(_Follower.begins_two_phase),
}


#: SQLAlchemy marks a SessionTransaction whose commit (or rollback) is under way with this state.
try:
    from sqlalchemy.orm.state_changes import _StateChangeStates
except ImportError:  # pragma: no cover - a SQLAlchemy this module was not written for: bind() refuses (_follow)
    _CHANGE_IN_PROGRESS: object = None
else:
    _CHANGE_IN_PROGRESS = _StateChangeStates.CHANGE_IN_PROGRESS


def _flushable(session: Session | None) -> bool:
    """Whether the end of a scope flushes ``session``: it autoflushes (one that does not may hold rows it
    cannot flush yet), and it is not flushing already (a scope opened in a flush hook)."""
    return session is not None and session.autoflush and not session._flushing  # noqa: SLF001


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
