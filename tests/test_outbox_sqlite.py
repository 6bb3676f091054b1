"""The transactional outbox on SQLite: rows exist iff the transaction committed; relays publish each once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from queueable import App, PublishError, SerializationError, listener
from queueable import _wire as wire
from queueable.outbox import OUTBOX, Outbox, Relay, from_row, metadata, outbox_table
from queueable.outbox._relay import _Wakeup
from queueable.outbox._table import notify_channel
from queueable.sync import SyncDispatcher
from queueable.testing import TestTransport
from tests.fakes import Broken, CommentPosted, Recorder

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence
    from pathlib import Path

    from queueable import OutgoingMessage

COMMENT = CommentPosted(post_id=7, author="ann", text="first!")

domain = sa.MetaData()
comments = sa.Table("comments", domain, sa.Column("id", sa.Integer, primary_key=True), sa.Column("text", sa.Text))


class Clock:
    """A settable clock for leases and backoff."""

    def __init__(self) -> None:
        self.now = time.time() + 1

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="db_url")
def fixture_db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture(name="engine")
def fixture_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    metadata.create_all(engine)
    domain.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture(name="outbox_app")
def fixture_outbox_app(app: App) -> App:
    app.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    return app


@pytest.fixture(name="transport")
async def fixture_transport(outbox_app: App) -> AsyncIterator[TestTransport]:
    async with TestTransport(outbox_app) as transport:
        yield transport


@pytest.fixture(name="outbox")
def fixture_outbox(outbox_app: App, transport: TestTransport) -> Outbox:
    return Outbox(outbox_app)


def rows(engine: sa.Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(OUTBOX).order_by(OUTBOX.c.id)).mappings()]


def published(transport: TestTransport) -> list[OutgoingMessage]:
    return [m for queue in transport.queues.values() for m in queue]


async def test_a_committed_transaction_leaves_one_row_per_queued_listener(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport
):
    """The domain row and the event row are committed together; nothing is published by the web process."""
    with Session(engine) as session, session.begin():
        session.execute(sa.insert(comments).values(id=1, text="first!"))
        await outbox.dispatch(session, COMMENT)

    stored = rows(engine)
    assert len(stored) == 1
    assert stored[0]["queue"] == "queueable"
    assert stored[0]["headers"]["x-queueable-listener"] == "mailer:notify_author"  # type: ignore[index]
    assert transport.pending == 0


async def test_a_rolled_back_transaction_leaves_no_event(engine: sa.Engine, outbox: Outbox):
    """When the transaction rolls back, its events vanish with it."""
    with Session(engine) as session:
        session.begin()
        session.execute(sa.insert(comments).values(id=1, text="first!"))
        await outbox.dispatch(session, COMMENT)
        session.rollback()

    assert rows(engine) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(comments)).scalar_one() == 0


async def test_an_exception_inside_the_scope_writes_nothing(engine: sa.Engine, outbox_app: App, outbox: Outbox):
    """A block that raises drops its buffered messages before they reach the session."""

    async def handler(session: Session) -> None:
        async with outbox.bind(session):
            await outbox_app.dispatch(COMMENT)
            raise RuntimeError

    with Session(engine) as session:
        with pytest.raises(RuntimeError):
            await handler(session)
        session.commit()  # even a commit afterwards finds nothing to write
    assert rows(engine) == []


async def test_an_event_its_model_rejects_fails_the_scope_and_writes_no_row(
    engine: sa.Engine, outbox_app: App, outbox: Outbox
):
    """Validation runs when the outbox scope ends, inside the transaction: it raises, and nothing is written."""
    outbox_app.add_listener(lambda e: None, Broken, queue=True, id="broken")

    async def handler(session: Session) -> None:
        async with outbox.bind(session):
            await outbox_app.dispatch(COMMENT)
            await outbox_app.dispatch(Broken(value=1))

    with Session(engine) as session:
        with pytest.raises(SerializationError, match="its own model rejects"):
            await handler(session)
        session.commit()
    assert rows(engine) == []


async def test_the_relay_publishes_the_stored_message_unchanged_and_deletes_the_row(
    engine: sa.Engine, outbox_app: App, outbox: Outbox, transport: TestTransport, recorder: Recorder
):
    """The worker sees the very message a direct publish sends; the listener runs; the table is empty."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    stored = from_row(rows(engine)[0])

    result = await Relay(engine, transport).run_once()

    assert (result.claimed, result.published, result.failed) == (1, 1, 0)
    [sent] = published(transport)
    assert sent == stored
    assert sent.body == COMMENT.model_dump_json().encode()
    assert set(sent.headers) >= {wire.H_LISTENER, wire.H_EVENT, wire.H_VERSION, wire.H_ATTEMPT, wire.H_CREATED}
    assert rows(engine) == []
    await transport.run_until_idle()
    assert recorder.names == ["notify_author"]


async def test_an_async_session_writes_in_its_transaction(
    db_url: str, engine: sa.Engine, outbox: Outbox, transport: TestTransport
):
    """AsyncSession (aiosqlite): committed dispatches are stored, rolled back ones are not."""
    async_engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
    try:
        async with AsyncSession(async_engine) as session:
            async with session.begin():
                await outbox.dispatch(session, CommentPosted(post_id=1, author="a", text="kept"))
            await session.begin()
            await outbox.dispatch(session, CommentPosted(post_id=2, author="a", text="dropped"))
            await session.rollback()
    finally:
        await async_engine.dispose()

    assert [CommentPosted.model_validate_json(r["body"]).post_id for r in rows(engine)] == [1]  # type: ignore[arg-type]


async def test_a_core_connection_can_be_bound(engine: sa.Engine, outbox_app: App, outbox: Outbox):
    """A plain Connection in a transaction works like a Session."""
    with engine.begin() as conn, outbox.bind(conn) as scope:
        await outbox_app.dispatch(COMMENT)
        assert len(scope.messages) == 1
    assert len(rows(engine)) == 1


async def test_defer_true_goes_to_the_outbox_too(
    engine: sa.Engine, outbox_app: App, outbox: Outbox, recorder: Recorder
):
    """Publisher-decided deferral writes a row for the deferrable listener instead of calling it."""

    @outbox_app.service("audit")
    class Audit:
        @listener(deferrable=True)
        def record(self, event: CommentPosted) -> None:
            recorder.record("audit", event)

    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT, defer=True)

    assert recorder.names == []
    assert sorted(r["headers"]["x-queueable-listener"] for r in rows(engine)) == [  # type: ignore[index]
        "audit:record",
        "mailer:notify_author",
    ]


def test_a_sync_dispatcher_writes_through_the_callers_session(engine: sa.Engine, outbox_app: App):
    """Flask-style: a sync Session in the request thread, SyncDispatcher on its loop, rows in the transaction."""
    outbox = Outbox()
    with SyncDispatcher(outbox_app) as events:
        with Session(engine) as session, session.begin(), outbox.bind(session):
            events.dispatch(COMMENT)
            assert rows(engine) == []  # not visible before commit
        with Session(engine) as session:
            session.begin()
            with outbox.bind(session):
                events.dispatch(COMMENT)
            session.rollback()
    assert len(rows(engine)) == 1


async def test_a_relay_killed_mid_batch_loses_nothing_and_keeps_the_message_id(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport
):
    """Rows claimed by a relay that died are claimed again after the lease, with the same message ids."""
    with Session(engine) as session, session.begin():
        for n in range(3):
            await outbox.dispatch(session, CommentPosted(post_id=n, author="a", text="t"))
    original_ids = [r["message_id"] for r in rows(engine)]
    clock = Clock()

    dead = Relay(engine, transport, lease=30, clock=clock)
    assert len(dead._claim()) == 3  # claimed, then the process "dies" before publishing

    survivor = Relay(engine, transport, lease=30, clock=clock)
    assert (await survivor.run_once()).claimed == 0  # the lease still holds
    clock.now += 31
    assert (await survivor.run_once()).published == 3

    assert [m.message_id for m in published(transport)] == original_ids
    assert rows(engine) == []


async def test_a_late_relay_does_not_delete_rows_another_relay_reclaimed(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport
):
    """A relay whose lease expired cannot delete rows that are now another relay's."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    clock = Clock()
    slow = Relay(engine, transport, lease=1, clock=clock)
    [row] = slow._claim()
    clock.now += 2
    fast = Relay(engine, transport, lease=30, clock=clock)
    assert len(fast._claim()) == 1

    slow._delete([row["id"]])
    assert len(rows(engine)) == 1


async def test_two_relays_at_once_publish_every_row_exactly_once(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport
):
    """Concurrent relays (threads claiming against one SQLite file) never take the same row."""
    with Session(engine) as session, session.begin():
        for n in range(200):
            await outbox.dispatch(session, CommentPosted(post_id=n, author="a", text="t"))

    # Each publish takes a moment, as a broker's confirm does, so that the relays' claims interleave; with an
    # instant publish one relay may drain everything before the others' first claim (and the test flaked).
    slow = SlowPublish(transport)
    relays = [Relay(engine, slow, batch_size=7, interval=0) for _ in range(3)]  # type: ignore[arg-type]
    counts = await asyncio.gather(*(relay.drain() for relay in relays))

    ids = [m.message_id for m in published(transport)]
    assert len(ids) == 200
    assert len(set(ids)) == 200
    assert sum(counts) == 200
    assert sum(1 for c in counts if c) >= 2  # the work really was shared
    assert rows(engine) == []


class SlowPublish:
    """Publishes through ``inner`` after a pause of a few milliseconds."""

    def __init__(self, inner: TestTransport) -> None:
        self.inner = inner

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        await asyncio.sleep(0.003)
        await self.inner.publish(messages)

    async def close(self) -> None:
        pass


class PickyTransport:
    """Rejects messages for one post id, as a broker would reject an unroutable message: the others of the call
    are published, and the error names the rejected ones (the Transport contract).
    """

    def __init__(self, reject_post: int) -> None:
        self.reject_post = reject_post
        self.messages: list[OutgoingMessage] = []
        self.calls = 0

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.calls += 1
        bad = [m for m in messages if CommentPosted.model_validate_json(m.body).post_id == self.reject_post]
        self.messages.extend(m for m in messages if m not in bad)
        if bad:
            raise PublishError("unroutable", message_ids=[m.message_id for m in bad])

    async def close(self) -> None:
        pass


async def test_a_message_the_broker_rejects_waits_with_backoff_without_blocking_the_others(
    engine: sa.Engine, outbox: Outbox
):
    """The batch falls back to one-by-one; the bad row keeps its error and is retried later."""
    with Session(engine) as session, session.begin():
        for n in range(3):
            await outbox.dispatch(session, CommentPosted(post_id=n, author="a", text="t"))
    clock = Clock()
    picky = PickyTransport(reject_post=1)
    relay = Relay(engine, picky, clock=clock, retry_delay=10)

    result = await relay.run_once()

    assert (result.claimed, result.published, result.failed) == (3, 2, 1)
    assert len(picky.messages) == 2  # the two confirmed in the batch are not sent again one by one
    assert picky.calls == 2  # the batch, then the refused message alone
    [left] = rows(engine)
    assert left["last_error"] == "PublishError: unroutable"
    assert left["available_at"] == clock.now + 10
    assert left["claimed_by"] is None
    assert (await relay.run_once()).claimed == 0
    picky.reject_post = -1
    clock.now += 10
    assert (await relay.run_once()).published == 1
    assert rows(engine) == []


async def test_a_strict_drain_says_what_it_could_not_publish(engine: sa.Engine, outbox: Outbox):
    """``drain(strict=True)`` (the CLI's --once) raises once the rest is published, so a one-shot run cannot
    report success while due rows stayed in the table.
    """
    with Session(engine) as session, session.begin():
        for n in range(3):
            await outbox.dispatch(session, CommentPosted(post_id=n, author="a", text="t"))
    picky = PickyTransport(reject_post=1)
    with pytest.raises(PublishError, match=r"1 outbox message\(s\) not published \(2 were\): PublishError: unro"):
        await Relay(engine, picky).drain(strict=True)
    assert len(picky.messages) == 2
    assert len(rows(engine)) == 1
    assert await Relay(engine, PickyTransport(reject_post=-1)).drain(strict=True) == 0  # not due yet: backoff


async def test_a_drain_ends_when_a_round_publishes_nothing(engine: sa.Engine, outbox: Outbox):
    """With retry_delay=0 a refused row is available again at once: the drain must not claim it forever."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, CommentPosted(post_id=1, author="a", text="t"))
    picky = PickyTransport(reject_post=1)
    relay = Relay(engine, picky, retry_delay=0)
    with pytest.raises(PublishError, match=r"1 outbox message\(s\) not published \(0 were\)"):
        await asyncio.wait_for(relay.drain(strict=True), 10)
    assert len(rows(engine)) == 1


async def test_a_drain_stops_when_told(engine: sa.Engine, outbox: Outbox, transport: TestTransport):
    """--once under SIGTERM: the drain looks at the stop event between rounds."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    stop = asyncio.Event()
    stop.set()
    assert await Relay(engine, transport).drain(stop=stop) == 0
    assert len(rows(engine)) == 1


async def test_a_failing_round_backs_off_and_logs_one_traceback(
    db_url: str, transport: TestTransport, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A database that keeps failing (here: no outbox table) is retried after pauses that double up to 30 s,
    with one traceback and then one line per failure, instead of a traceback every second.
    """
    from queueable.outbox import _relay  # noqa: PLC0415

    pauses: list[float] = []
    stop = asyncio.Event()

    async def no_wait(_stop: asyncio.Event, seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1_100:  # past 1,024 failures 2 ** n overflowed a float and ended the relay
            stop.set()

    monkeypatch.setattr(_relay, "_wait", no_wait)
    relay = Relay(sa.create_engine(db_url), transport, interval=0.01, listen=False)  # the table was never made
    await asyncio.wait_for(relay.run(stop), 10)
    assert pauses == [1, 2, 4, 8, 16] + [30] * 1_095
    failures = [r for r in caplog.records if "relay round failed" in r.message]
    assert len(failures) == 1_100
    assert [r.exc_info is not None for r in failures] == [True] + [False] * 1_099
    assert all("\n" not in r.getMessage() for r in failures[1:])
    assert "no such table" in failures[1].getMessage()


async def test_run_relays_until_stopped(engine: sa.Engine, outbox: Outbox, transport: TestTransport):
    """The relay loop picks up rows committed while it runs and stops cleanly when told."""
    stop = asyncio.Event()
    relay = Relay(engine, transport, interval=0.01)
    task = asyncio.create_task(relay.run(stop))
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    for _ in range(500):
        if transport.pending:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert transport.pending == 1
    assert relay.pending() == 0


def test_binding_an_async_session_with_a_sync_with_is_an_error(db_url: str, outbox: Outbox):
    """An AsyncSession needs `async with`, and says so."""
    session = AsyncSession(create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://")))
    with pytest.raises(TypeError, match="async with"), outbox.bind(session):
        pass


def test_threads_share_no_outbox_scope(engine: sa.Engine, outbox_app: App):
    """A scope bound in one thread does not capture another thread's dispatches."""
    outbox = Outbox()
    seen: list[int] = []
    with (
        SyncDispatcher(outbox_app) as events,
        Session(engine) as session,
        session.begin(),
        outbox.bind(session) as scope,
    ):
        other = threading.Thread(target=lambda: events.dispatch(COMMENT))
        other.start()
        other.join()
        seen.append(len(scope.messages))
    assert seen == [0]


@pytest.fixture(name="app_module")
def fixture_app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "relay_cli_app.py").write_text(
        "from queueable import App, Settings\napp = App(settings=Settings(url='amqp://guest:guest@127.0.0.1:1/'))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "relay_cli_app:app"


def test_the_relay_command_refuses_the_memory_transport(app_module: str, db_url: str):
    """Relaying into an in-process memory transport would lose the rows: exit 5 with the reason."""
    from click.testing import CliRunner  # noqa: PLC0415

    from queueable.cli import main  # noqa: PLC0415

    result = CliRunner().invoke(main, ["relay", app_module, "--db", db_url, "--url", "memory://"])
    assert result.exit_code == 5
    assert "needs a broker" in result.output


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nosuchdb://x/y", "cannot use database URL"),
        ("postgresql+psycopg://app:s3cret@127.0.0.1:54x2/app", "cannot use database URL"),  # a typo in the port
        ("postgresql+psycopg_async://app:s3cret@127.0.0.1/app", "names an async driver"),
        ("sqlite+aiosqlite:///app.db", "names an async driver"),
        # urlsplit reads "12" as a port here; SQLAlchemy reads the password "12#s3cret"
        ("postgresql+psycopg_async://app:12#s3cret@127.0.0.1/app", "names an async driver"),
    ],
)
def test_the_relay_command_reports_a_bad_database_url(app_module: str, url: str, says: str):
    """A URL the relay cannot use is a configuration error (exit 5) in one line, without the password."""
    from click.testing import CliRunner  # noqa: PLC0415

    from queueable.cli import main  # noqa: PLC0415

    result = CliRunner().invoke(main, ["relay", app_module, "--db", url])
    assert result.exit_code == 5, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert "s3cret" not in result.output


def test_the_relay_command_needs_the_outbox_table(app_module: str, db_url: str):
    """A missing table (forgetting --create-table) is exit 5 with the hint, not a SQLAlchemy traceback."""
    from click.testing import CliRunner  # noqa: PLC0415

    from queueable.cli import main  # noqa: PLC0415

    result = CliRunner().invoke(main, ["relay", app_module, "--db", db_url, "--once"])
    assert result.exit_code == 5, result.output
    assert "no outbox table 'queueable_outbox'" in result.output
    assert "--create-table" in result.output


# aio-pika leaves the connection object of a failed connect_robust to the garbage collector, whose __del__
# creates a close() coroutine that is never awaited when it runs outside the loop's thread (here a
# SQLAlchemy worker thread): a RuntimeWarning of aio-pika's, not a leak of the relay's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_relay_once_exits_3_when_rows_could_not_be_published(
    app_module: str, db_url: str, engine: sa.Engine, tmp_path: Path
):
    """--once with the broker unreachable leaves the row in the table and says so with exit 3, not 0."""
    from click.testing import CliRunner  # noqa: PLC0415

    from queueable import OutgoingMessage  # noqa: PLC0415
    from queueable.cli import main  # noqa: PLC0415
    from queueable.outbox._table import to_row  # noqa: PLC0415

    with Session(engine) as session, session.begin():
        row = to_row(OutgoingMessage(queue="queueable", body=b"{}", headers={}), 0.0)
        session.execute(sa.insert(OUTBOX), [row])
    (tmp_path / "relay_quick_app.py").write_text(
        "from queueable import App, Settings\n"
        "app = App(settings=Settings(url='amqp://guest:guest@127.0.0.1:1/', publish_timeout=0.5))\n"
    )
    result = CliRunner().invoke(main, ["relay", "relay_quick_app:app", "--db", db_url, "--once"])
    assert result.exit_code == 3, result.output
    assert "1 outbox message(s) not published (0 were)" in result.output
    assert len(rows(engine)) == 1


def test_a_long_running_relay_waits_for_a_database_it_cannot_use_yet(app_module: str, tmp_path: Path):
    """A relay started before its database is up (or while it is locked) must not exit 5: it logs the problem
    once and backs off until the database answers, or until SIGTERM (exit 0).
    """
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    missing = f"sqlite:///{tmp_path / 'not-yet' / 'app.db'}"  # its folder does not exist: cannot be opened
    cli = "from queueable.cli import main; main()"
    command = [sys.executable, "-c", cli, "relay", app_module, "--db", missing, "--no-listen"]
    relay = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert relay.stderr is not None
        seen = ""
        deadline = time.monotonic() + 20
        while "relay round failed" not in seen and time.monotonic() < deadline:
            seen += relay.stderr.readline()
        assert relay.poll() is None, seen  # still running
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=20) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        if relay.stderr is not None:
            relay.stderr.close()
    assert "cannot check the outbox table now" in seen
    assert "unable to open database file" in seen


def test_the_notify_channel_is_the_tables_qualified_name():
    """Writers NOTIFY and relays LISTEN on the same channel: the table's name, with its schema if any."""
    assert notify_channel(OUTBOX) == "queueable_outbox"
    assert notify_channel(outbox_table(sa.MetaData(), "events", schema="app")) == "app.events"


def test_a_relay_on_sqlite_polls(engine: sa.Engine):
    """No LISTEN/NOTIFY outside PostgreSQL: the relay has nothing to listen with."""
    assert _Wakeup.for_engine(engine, "queueable_outbox") is None


def test_a_long_notify_channel_is_cut_to_postgres_limit_the_same_way_every_time():
    """pg_notify refuses channel names over 63 bytes; writer and relay must still agree on one."""

    def channel(length: int) -> str:
        return notify_channel(outbox_table(sa.MetaData(), "outbox_" + "x" * length, schema="tenant_" + "é" * 10))

    assert len(channel(60).encode()) <= 63
    assert channel(60) == channel(60)
    assert channel(60) != channel(61)


async def test_a_session_bound_per_table_writes_the_outbox(engine: sa.Engine, outbox: Outbox):
    """A Session with binds={table: engine} and no default bind: the write finds the outbox table's bind."""
    with Session(binds={OUTBOX: engine}) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    assert len(rows(engine)) == 1


def skew_this_host(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make this host's clock (``time.time``) run ``seconds`` ahead; the database's clock is not affected."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


async def test_a_relay_on_a_host_whose_clock_runs_ahead_does_not_take_leased_rows(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport, monkeypatch: pytest.MonkeyPatch
):
    """Leases are counted on the database's clock: skew between the relays' hosts cannot make a lease expire."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, COMMENT)
    holder = Relay(engine, transport, lease=30)
    [row] = holder._claim()
    assert abs(row["claimed_until"] - (time.time() + 30)) < 5

    skew_this_host(monkeypatch, 3600)
    assert Relay(engine, transport, lease=30)._claim() == []


async def test_rows_written_on_a_host_whose_clock_runs_ahead_are_available_at_once(
    engine: sa.Engine, outbox: Outbox, transport: TestTransport, monkeypatch: pytest.MonkeyPatch
):
    with monkeypatch.context() as patch:
        skew_this_host(patch, 3600)
        with Session(engine) as session, session.begin():
            await outbox.dispatch(session, COMMENT)
    [row] = rows(engine)
    assert abs(row["available_at"] - time.time()) < 5  # type: ignore[operator]
    assert (await Relay(engine, transport).run_once()).published == 1
