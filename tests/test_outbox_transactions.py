"""An outbox scope follows its transaction: savepoints that roll back drop their events, commits write theirs.

``bind()`` buffers the messages of the events dispatched inside it and writes them when it ends. Without watching
the transaction, an event dispatched inside a SAVEPOINT that rolled back was still written, and an event
dispatched before a ``commit()`` inside the scope was written after it, into a transaction nobody committed.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import subprocess
import sys
import weakref
from contextlib import suppress
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy import event, orm
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from queueable import App, SerializationError
from queueable.outbox import OUTBOX, Outbox, metadata, outbox_table
from queueable.outbox._writer import _followers
from queueable.sync import SyncDispatcher
from tests.fakes import Broken, CommentPosted

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.orm._typing import JoinTransactionMode

from tests.test_outbox_sqlite import fixture_db_url, fixture_engine, fixture_outbox, fixture_outbox_app  # noqa: F401


def comment(post_id: int) -> CommentPosted:
    return CommentPosted(post_id=post_id, author="ann", text="hi")


def stored(engine: sa.Engine) -> list[int]:
    """The post ids of the events in the outbox table, in insertion order."""
    with engine.connect() as conn:
        bodies = conn.execute(sa.select(OUTBOX.c.body).order_by(OUTBOX.c.id)).scalars()
        return [CommentPosted.model_validate_json(body).post_id for body in bodies]


def dispatch_at_each_new_row(session: Session, events: SyncDispatcher, post_id: int) -> None:
    """Domain events from a flush hook: one dispatch per new row, at each flush of ``session``."""

    @event.listens_for(session, "before_flush")
    def collect(session: Session, *_: object) -> None:
        for _row in session.new:
            events.dispatch(comment(post_id))


class BoomError(Exception):
    pass


async def test_a_rolled_back_savepoint_drops_the_events_dispatched_inside_it(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with Session(engine) as session, session.begin():
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError), session.begin_nested():
                await outbox_app.dispatch(comment(2))
                raise BoomError
            await outbox_app.dispatch(comment(3))
    assert stored(engine) == [1, 3]


async def test_a_released_savepoint_keeps_its_events_until_an_enclosing_one_rolls_back(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with Session(engine) as session, session.begin():
        async with outbox.bind(session):
            outer = session.begin_nested()
            await outbox_app.dispatch(comment(1))
            with session.begin_nested():
                await outbox_app.dispatch(comment(2))
            await outbox_app.dispatch(comment(3))
            outer.rollback()
            with session.begin_nested():
                await outbox_app.dispatch(comment(4))
    assert stored(engine) == [4]


async def test_a_savepoint_opened_before_the_scope_drops_everything_the_scope_buffered_when_it_rolls_back(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with Session(engine) as session, session.begin():
        savepoint = session.begin_nested()
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            savepoint.rollback()
            await outbox_app.dispatch(comment(2))
    assert stored(engine) == [2]


@pytest.mark.parametrize("ending", ["rollback", "close"])
async def test_a_rollback_inside_the_scope_drops_what_was_dispatched_before_it(
    engine: sa.Engine, outbox_app: App, outbox: Outbox, ending: str
):
    """``close()`` ends the transaction without a commit: a rollback too."""
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))  # before the transaction began: it still drops it
            session.execute(sa.select(1))
            getattr(session, ending)()
            await outbox_app.dispatch(comment(2))
        session.commit()
    assert stored(engine) == [2]


async def test_a_commit_inside_the_scope_writes_the_events_dispatched_before_it(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Commit-as-you-go: the rows go into the transaction being committed, not into the next one."""
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            session.commit()
            assert stored(engine) == [1]
            await outbox_app.dispatch(comment(2))  # in the next transaction, which is never committed
    assert stored(engine) == [1]


async def test_an_event_its_model_rejects_fails_the_commit_inside_the_scope(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """The commit raises, and a commit after the error still writes the messages that were accepted."""
    outbox_app.add_listener(lambda e: None, Broken, queue=True, id="broken")
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            await outbox_app.dispatch(Broken(value=1))
            with pytest.raises(SerializationError, match="its own model rejects"):
                session.commit()
            assert stored(engine) == []
            session.commit()
    assert stored(engine) == [1]


async def test_the_scope_stops_following_the_session_when_it_ends(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Two scopes in a row on one session: each message is written once, and nothing follows it afterwards."""
    with Session(engine) as session, session.begin():
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(2))
        assert _followers[session] == []
    with session.begin():
        session.execute(sa.select(1))
    assert stored(engine) == [1, 2]


async def test_a_core_connection_follows_its_savepoints_and_commits(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with engine.connect() as conn:
        async with outbox.bind(conn):
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError), conn.begin_nested():
                await outbox_app.dispatch(comment(2))
                raise BoomError
            with conn.begin_nested():
                await outbox_app.dispatch(comment(3))
            conn.commit()
            assert stored(engine) == [1, 3]
            await outbox_app.dispatch(comment(4))
            conn.execute(sa.select(1))  # a Connection's transaction begins with its first statement
            conn.rollback()
            await outbox_app.dispatch(comment(5))
        conn.commit()
    assert stored(engine) == [1, 3, 5]


async def test_an_async_session_follows_its_savepoints_and_commits(
    db_url: str, engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    async_engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
    try:
        async with AsyncSession(async_engine) as session, outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError):
                async with session.begin_nested():
                    await outbox_app.dispatch(comment(2))
                    raise BoomError
            await session.commit()
            await outbox_app.dispatch(comment(3))
            await session.rollback()
        async with async_engine.connect() as conn, outbox.bind(conn):
            await outbox_app.dispatch(comment(4))
            await conn.execute(sa.select(1))
            await conn.commit()
            await outbox_app.dispatch(comment(5))
    finally:
        await async_engine.dispose()
    assert stored(engine) == [1, 4]


def test_a_sync_dispatcher_follows_the_callers_savepoints(engine: sa.Engine, outbox_app: App):
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events, Session(engine) as session, session.begin(), outbox.bind(session):
        events.dispatch(comment(1))
        with suppress(BoomError), session.begin_nested():
            events.dispatch(comment(2))
            raise BoomError
    assert stored(engine) == [1]


async def test_an_async_connection_that_was_not_started_is_refused(db_url: str, outbox: Outbox):
    async_engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
    try:
        with pytest.raises(TypeError, match="once it is started"):
            async with outbox.bind(async_engine.connect()):
                pass
    finally:
        await async_engine.dispose()


# Found by review: a failed flush inside a savepoint, a commit with a savepoint still open, close(), deferred()
# blocks inside bind(), scoped sessions, flush hooks that dispatch, a failed write, two-phase connections.

unique = sa.Table("unique_names", sa.MetaData(), sa.Column("name", sa.Text, primary_key=True))


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


orm.registry().map_imperatively(Named, unique)


async def test_a_failed_statement_inside_a_savepoint_drops_only_that_savepoints_events(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Insert-or-skip: SQLAlchemy reports the savepoint's rollback twice (the failed flush, then the block)."""
    unique.create(engine)
    with Session(engine) as session, session.begin():
        session.execute(unique.insert().values(name="a"))
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with suppress(sa.exc.IntegrityError), session.begin_nested():
                await outbox_app.dispatch(comment(2))
                session.execute(unique.insert().values(name="a"))
            await outbox_app.dispatch(comment(3))
    assert stored(engine) == [1, 3]


async def test_a_failed_flush_inside_a_savepoint_drops_only_that_savepoints_events(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """The ORM form: the flush at the savepoint's release fails and rolls it back, then the block does again."""
    unique.create(engine)
    with Session(engine) as session, session.begin():
        session.add(Named("a"))
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with suppress(sa.exc.IntegrityError), session.begin_nested():
                await outbox_app.dispatch(comment(2))
                session.add(Named("a"))
            await outbox_app.dispatch(comment(3))
    assert stored(engine) == [1, 3]


async def test_committing_the_transaction_with_a_savepoint_still_open_writes_everything(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with Session(engine) as session:
        async with outbox.bind(session):
            with session.begin():
                await outbox_app.dispatch(comment(1))
                session.begin_nested()
                await outbox_app.dispatch(comment(2))
            # the block's commit released the savepoint with the transaction
            assert stored(engine) == [1, 2]
    assert stored(engine) == [1, 2]


async def test_a_deferred_block_inside_the_scope_is_refused(engine: sa.Engine, outbox_app: App, outbox: Outbox):
    """Its messages would miss the commits and savepoint rollbacks inside it, reaching the outbox only after."""
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with pytest.raises(RuntimeError, match=r"deferred\(\) inside outbox.bind\(\)"):
                async with outbox_app.dispatcher.deferred():
                    pass
            with SyncDispatcher(outbox_app) as events, pytest.raises(RuntimeError, match=r"inside outbox\.bind"):  # noqa: SIM117
                with events.deferred():
                    pass
            session.commit()
        async with outbox_app.dispatcher.deferred(), outbox.bind(session):  # the other way round is fine
            await outbox_app.dispatch(comment(2))
        session.commit()
    assert stored(engine) == [1, 2]


async def test_a_scoped_session_is_bound_as_the_session_it_stands_for(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Flask-SQLAlchemy's ``db.session`` is a scoped_session."""
    db = scoped_session(sessionmaker(engine))
    try:
        async with outbox.bind(db):
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError), db.begin_nested():
                await outbox_app.dispatch(comment(2))
                raise BoomError
        db.commit()
    finally:
        db.remove()
    assert stored(engine) == [1]


async def test_an_async_scoped_session_is_bound_as_the_session_it_stands_for(
    db_url: str, engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    async_engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
    db = async_scoped_session(async_sessionmaker(async_engine), scopefunc=asyncio.current_task)
    try:
        async with outbox.bind(db):
            await outbox_app.dispatch(comment(1))
        await db.commit()
        await db.remove()
    finally:
        await async_engine.dispose()
    assert stored(engine) == [1]


def test_binding_something_else_is_a_type_error(outbox: Outbox):
    with pytest.raises(TypeError, match="takes a Session, Connection"):
        outbox.bind("postgresql://app@db/app")  # type: ignore[arg-type]


def test_events_that_flush_hooks_dispatch_during_the_commit_are_committed_with_it(
    engine: sa.Engine, outbox_app: App
):
    """Domain events collected in ``before_flush``: the commit flushes before it writes the outbox rows."""
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:
        dispatch_at_each_new_row(session, events, 5)

        unique.create(engine)
        with outbox.bind(session):
            session.add(Named(name="x"))
            session.commit()
    assert stored(engine) == [5]


async def test_a_write_that_fails_at_the_commit_keeps_the_messages_for_the_next_commit(
    engine: sa.Engine, outbox_app: App
):
    table = outbox_table(sa.MetaData(), name="created_later")
    outbox = Outbox(outbox_app, table=table)
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with pytest.raises(sa.exc.OperationalError, match="no such table"):
                session.commit()
            table.create(engine)
            session.commit()
    with engine.connect() as conn:
        assert len(conn.execute(sa.select(table)).all()) == 1


def test_a_two_phase_transaction_on_a_connection_is_refused(engine: sa.Engine, outbox: Outbox):
    with engine.connect() as conn, outbox.bind(conn), pytest.raises(TypeError, match="two-phase"):
        conn.begin_twophase()


# Found by a second review: a Connection commit the outbox fails, nested scopes on two sessions, late flushes,
# a scope that ends inside its own savepoint, and a scope that is never exited.

orders = sa.Table("orders", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


async def test_a_connection_commit_that_fails_on_a_refused_event_rolls_its_work_back(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """SQLAlchemy deactivates the transaction without a rollback; the next commit must not carry the old work."""
    outbox_app.add_listener(lambda e: None, Broken, queue=True, id="broken")
    orders.create(engine)
    with engine.connect() as conn:
        async with outbox.bind(conn):
            conn.execute(orders.insert().values(id=1))
            await outbox_app.dispatch(comment(1))
            await outbox_app.dispatch(Broken(value=1))
            with pytest.raises(SerializationError):
                conn.commit()
            conn.rollback()
            conn.execute(orders.insert().values(id=2))
            await outbox_app.dispatch(comment(2))
            conn.commit()
        assert conn.execute(sa.select(orders.c.id)).scalars().all() == [2]
    assert stored(engine) == [2]


async def test_scopes_on_two_sessions_keep_their_own_events(
    engine: sa.Engine, outbox_app: App, outbox: Outbox, tmp_path: Path
):
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    metadata.create_all(other)
    try:
        with Session(engine) as outer, Session(other) as inner:
            async with outbox.bind(outer):
                async with outbox.bind(inner):
                    await outbox_app.dispatch(comment(1))
                    with suppress(BoomError), outer.begin_nested():
                        raise BoomError
                    outer.commit()
                inner.commit()
        assert (stored(engine), stored(other)) == ([], [1])
    finally:
        other.dispose()


def test_events_of_a_flush_after_the_outboxs_own_commit_hook_are_committed_too(engine: sa.Engine, outbox_app: App):
    """A before_commit listener of the application's adds a row after the outbox's hook ran; its flush's hooks
    dispatch an event."""
    outbox = Outbox()
    unique.create(engine)
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:
        dispatch_at_each_new_row(session, events, 99)

        @event.listens_for(session, "before_commit")
        def audit(session: Session) -> None:
            session.add(Named("audit"))

        with outbox.bind(session):
            session.execute(sa.select(1))
            session.commit()
    assert stored(engine) == [99]


async def test_a_scope_that_ends_inside_its_own_savepoint_is_an_error(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Its rows would go into the savepoint, with the events dispatched before the savepoint began."""
    with Session(engine) as session:
        scope = outbox.bind(session)
        await scope.__aenter__()
        await outbox_app.dispatch(comment(1))
        session.begin_nested()
        with pytest.raises(RuntimeError, match="ended inside a SAVEPOINT begun in it"):
            await scope.__aexit__(None, None, None)
        session.commit()
    with engine.connect() as conn:
        scope = outbox.bind(conn)
        await scope.__aenter__()
        await outbox_app.dispatch(comment(2))
        conn.begin_nested()
        with pytest.raises(RuntimeError, match="ended inside a SAVEPOINT"):
            await scope.__aexit__(None, None, None)
        conn.commit()
    assert stored(engine) == []


async def test_a_scope_with_nothing_to_write_may_end_inside_a_savepoint(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Test recipes and frameworks leave savepoints open: without messages, nothing can go into the wrong one."""
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            session.commit()  # written
            session.begin_nested()
        session.commit()
    assert stored(engine) == [1]


def test_a_scope_never_exited_does_not_keep_its_session_alive(engine: sa.Engine, outbox: Outbox):
    def abandon() -> weakref.ref[Session]:
        session = Session(engine)
        outbox.bind(session).__enter__()
        return weakref.ref(session)

    ref = contextvars.copy_context().run(abandon)  # its own context: the scope stays open there, not here
    gc.collect()
    assert ref() is None


# Found by a third review: late before_commit listeners, flushes outside the commit, listeners added at bind.


def test_events_a_later_before_commit_listener_dispatches_are_committed_too(engine: sa.Engine, outbox_app: App):
    """Domain events dispatched in the application's own before_commit hook, with nothing left to flush: the
    outbox writes them at the last moment, on the connection's commit."""
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:

        @event.listens_for(session, "before_commit")
        def publish_domain_events(session: Session) -> None:
            events.dispatch(comment(7))

        with outbox.bind(session):
            session.execute(sa.select(1))
            session.commit()
            assert stored(engine) == [7]
    assert stored(engine) == [7]


async def test_a_flush_outside_the_commit_writes_nothing(engine: sa.Engine, outbox_app: App, outbox: Outbox):
    """begin_nested() on a session with pending rows flushes them; that is not the commit's flush."""
    outbox_app.add_listener(lambda e: None, Broken, queue=True, id="broken")
    unique.create(engine)
    with Session(engine) as session:
        async with outbox.bind(session):
            await outbox_app.dispatch(Broken(value=1))
            session.add(Named("x"))
            with session.begin_nested():
                pass
            with pytest.raises(SerializationError):
                session.commit()
            session.rollback()
    assert stored(engine) == []


def test_the_session_listeners_are_added_at_import_not_at_the_first_bind():
    """Adding class-wide listeners while other threads run session events would break those threads' commits
    (the first request of a threaded server binding while others commit)."""
    code = (
        "from sqlalchemy import event; from sqlalchemy.orm import Session; import queueable.outbox; "
        "from queueable.outbox._writer import _SESSION_HOOKS; "
        "print(all(event.contains(Session, name, hook) for name, hook in _SESSION_HOOKS.items()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603 - this interpreter, fixed code
    assert result.stdout.strip() == "True"


# Found by a fourth review, in application-shaped code.


def test_events_of_the_blocks_changes_are_written_when_the_commit_comes_after_it(
    engine: sa.Engine, outbox_app: App
):
    """``with session.begin(), outbox.bind(session):`` commits after the scope ended: the scope flushes first, so
    the events that flush hooks dispatch for the block's changes still reach the outbox."""
    outbox = Outbox()
    unique.create(engine)
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:
        dispatch_at_each_new_row(session, events, 8)

        with session.begin(), outbox.bind(session):
            session.add(Named("x"))
    assert stored(engine) == [8]


def test_a_scope_ended_in_another_context_says_so(engine: sa.Engine, outbox: Outbox):
    """FastAPI runs a sync ``yield`` dependency's setup and teardown in different context copies: the
    dispatches in between never saw the scope."""
    with Session(engine) as session:
        scope = outbox.bind(session)
        contextvars.copy_context().run(scope.__enter__)
        with pytest.raises(RuntimeError, match="ended in another context"):
            scope.__exit__(None, None, None)
        assert _followers[session] == []


class EqualitySession(Session):  # noqa: PLW1641 - unhashable on purpose
    """A Session subclass that defines ``__eq__`` (so ``__hash__`` is ``None``)."""

    def __eq__(self, other: object) -> bool:
        return self is other


async def test_an_unhashable_session_subclass_works_bound_or_not(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    with EqualitySession(engine) as session:
        session.execute(sa.select(1))
        session.commit()  # session events with the module's listeners, not bound
        async with outbox.bind(session):
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError), session.begin_nested():
                await outbox_app.dispatch(comment(2))
                raise BoomError
            session.commit()
    assert stored(engine) == [1]


async def test_a_session_that_does_not_autoflush_is_not_flushed_at_the_end(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """It may hold rows it cannot flush yet: filled in after the block, before the commit."""
    unique.create(engine)
    with Session(engine, autoflush=False) as session:
        named = Named(None)  # type: ignore[arg-type]
        session.add(named)
        await outbox.dispatch(session, comment(1))
        named.name = "filled in later"
        session.commit()
    assert stored(engine) == [1]


# Found by a sixth review: state left by a commit that raised, scopes opened in flush hooks, sessions joined to
# an external transaction, commits with nothing to say to the outbox's database.


async def test_a_commit_that_raised_leaves_later_flushes_alone(engine: sa.Engine, outbox_app: App, outbox: Outbox):
    """After a refused commit, a savepoint's flush is not the commit's: nothing is written into that savepoint."""
    outbox_app.add_listener(lambda e: None, Broken, queue=True, id="broken")
    unique.create(engine)
    with Session(engine) as session:
        async with outbox.bind(session):
            session.execute(sa.select(1))
            await outbox_app.dispatch(Broken(value=1))
            with pytest.raises(SerializationError):
                session.commit()
            await outbox_app.dispatch(comment(1))
            with suppress(BoomError), session.begin_nested():
                session.add(Named("in the savepoint"))
                session.flush()
                raise BoomError
            await outbox_app.dispatch(comment(2))
            session.commit()
    assert stored(engine) == [1, 2]


def test_a_scope_opened_in_a_flush_hook_does_not_flush_again(engine: sa.Engine, outbox_app: App):
    outbox = Outbox()
    unique.create(engine)
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:

        @event.listens_for(session, "after_flush")
        def record(session: Session, *_: object) -> None:
            with outbox.bind(session):
                events.dispatch(comment(1))

        session.add(Named("a"))
        session.commit()
    assert stored(engine) == [1]


@pytest.mark.parametrize("mode", ["control_fully", "create_savepoint", "rollback_only", "conditional_savepoint"])
def test_a_session_joined_to_an_external_transaction_commits_late_events(
    engine: sa.Engine, outbox_app: App, mode: JoinTransactionMode
):
    """The test-suite recipe: the session's commit may be a RELEASE SAVEPOINT, not a COMMIT."""
    outbox = Outbox()
    unique.create(engine)
    with SyncDispatcher(outbox_app) as events, engine.connect() as conn:
        conn.begin()
        with Session(bind=conn, join_transaction_mode=mode) as session:
            event.listen(session, "before_commit", lambda _: events.dispatch(comment(2)))
            with outbox.bind(session):
                events.dispatch(comment(1))
                session.add(Named("a"))
                session.commit()
        if conn.in_transaction():
            conn.commit()
    assert stored(engine) == [1, 2]


def test_a_commit_with_no_statement_still_commits_late_events(engine: sa.Engine, outbox_app: App):
    """Commit-as-you-go: the second commit ran no statement, yet a before_commit listener dispatches."""
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events, Session(engine) as session:
        post_ids = iter([1, 2])
        event.listen(session, "before_commit", lambda _: events.dispatch(comment(next(post_ids))))
        with outbox.bind(session):
            session.execute(sa.select(1))
            session.commit()
            session.commit()
    assert stored(engine) == [1, 2]


# Found by a seventh review.


def test_a_two_phase_session_commits_late_events(
    engine: sa.Engine, outbox_app: App, monkeypatch: pytest.MonkeyPatch
):
    """Session(twophase=True) commits with PREPARE and COMMIT PREPARED, not COMMIT. SQLite has no two-phase
    commit (nor has this PostgreSQL): its dialect's four hooks become a plain transaction, SQLAlchemy's event
    flow stays its own."""
    dialect = engine.dialect
    monkeypatch.setattr(dialect, "do_begin_twophase", lambda conn, _xid: dialect.do_begin(conn.connection))
    monkeypatch.setattr(dialect, "do_prepare_twophase", lambda _conn, _xid: None)
    monkeypatch.setattr(dialect, "do_commit_twophase", lambda conn, *_, **__: dialect.do_commit(conn.connection))
    monkeypatch.setattr(
        dialect, "do_rollback_twophase", lambda conn, *_, **__: dialect.do_rollback(conn.connection)
    )
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events, Session(engine, twophase=True) as session:
        event.listen(session, "before_commit", lambda _: events.dispatch(comment(2)))
        with outbox.bind(session):
            events.dispatch(comment(1))
            session.execute(sa.select(1))
            session.commit()
    assert stored(engine) == [1, 2]


async def test_writing_through_an_async_session_needs_write_async(db_url: str, outbox: Outbox):
    async_engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
    try:
        async with AsyncSession(async_engine) as session:
            with pytest.raises(TypeError, match="await write_async"):
                outbox.write(session, [])  # type: ignore[arg-type]
    finally:
        await async_engine.dispose()
