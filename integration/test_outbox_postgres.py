"""The transactional outbox on a real PostgreSQL, relayed to the real RabbitMQ."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import TYPE_CHECKING

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from _outbox_db import PG_URL, count, drain_ids, pg_engine, unique_table
from apps.recorder import Job
from queueable import correlation_id
from queueable.outbox import Outbox, Relay, from_row

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _consumer_process import World
    from queueable import App


@pytest.fixture(name="engine")
def fixture_engine() -> Iterator[sa.Engine]:
    engine = pg_engine()
    yield engine
    engine.dispose()


@pytest.fixture(name="table")
def fixture_table(engine: sa.Engine) -> Iterator[sa.Table]:
    table = unique_table(engine)
    yield table
    table.drop(engine)


@pytest.fixture(name="app")
async def fixture_app(world: World) -> App:
    return await world.app()


@pytest.fixture(name="outbox")
def fixture_outbox(app: App, table: sa.Table) -> Outbox:
    return Outbox(app, table=table)


async def fill(engine: sa.Engine, outbox: Outbox, app: App, n: int) -> list[str]:
    """Commit ``n`` Job events in one transaction; their message ids."""
    with engine.connect() as conn, conn.begin(), outbox.bind(conn) as scope:
        for i in range(n):
            await app.dispatch(Job(id=f"job-{i}"))
        return [m.message_id for m in scope.messages]


async def test_commit_stores_and_rollback_discards_with_a_sync_session(
    engine: sa.Engine, table: sa.Table, outbox: Outbox
):
    """On PostgreSQL too, the event row shares the fate of the transaction."""
    with Session(engine) as session, session.begin():
        await outbox.dispatch(session, Job(id="kept"))
    with Session(engine) as session:
        session.begin()
        await outbox.dispatch(session, Job(id="dropped"))
        session.rollback()

    with engine.connect() as conn:
        bodies = [Job.model_validate_json(r.body).id for r in conn.execute(sa.select(table))]
    assert bodies == ["kept"]


async def test_an_async_session_on_psycopg_writes_in_its_transaction(table: sa.Table, outbox: Outbox, engine):
    """AsyncSession over the psycopg async driver: committed rows only."""
    async_engine = create_async_engine(PG_URL)
    try:
        async with AsyncSession(async_engine) as session:
            async with session.begin():
                await outbox.dispatch(session, Job(id="kept"))
            await session.begin()
            await outbox.dispatch(session, Job(id="dropped"))
            await session.rollback()
    finally:
        await async_engine.dispose()
    assert count(engine, table) == 1


async def test_the_relay_publishes_the_very_message_a_direct_publish_sends(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """Body, headers, message id, correlation id and type reach RabbitMQ unchanged; the row is deleted."""
    token = correlation_id.set("req-outbox-1")
    try:
        with Session(engine) as session, session.begin():
            await outbox.dispatch(session, Job(id="j1"))
    finally:
        correlation_id.reset(token)
    with engine.connect() as conn:
        stored = from_row(conn.execute(sa.select(table)).mappings().one())

    result = await Relay(engine, app.transport, table=table).run_once()
    assert result.published == 1

    connection = await aio_pika.connect(world.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(world.queue, passive=True)
        got = await queue.get(no_ack=True, timeout=5)
    finally:
        await connection.close()
    assert got.body == stored.body
    assert got.message_id == stored.message_id
    assert got.correlation_id == "req-outbox-1"
    assert got.type == stored.type == "qtest.job"
    assert got.headers["x-queueable-listener"] == stored.headers["x-queueable-listener"]
    assert got.headers["x-queueable-attempt"] == 1
    assert count(engine, table) == 0


async def test_skip_locked_claims_around_rows_another_transaction_holds(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App
):
    """A claim never waits for locked rows: it takes the next free ones (FOR UPDATE SKIP LOCKED)."""
    await fill(engine, outbox, app, 20)
    relay = Relay(engine, app.transport, table=table, batch_size=10)
    with engine.connect() as holder, holder.begin():
        locked = (
            holder.execute(sa.select(table.c.id).order_by(table.c.id).limit(5).with_for_update()).scalars().all()
        )
        claimed = await asyncio.wait_for(asyncio.to_thread(relay._claim), 5)
    assert len(claimed) == 10
    assert not set(locked) & {row["id"] for row in claimed}
    assert min(row["id"] for row in claimed) > max(locked)


async def test_three_relays_at_once_publish_every_row_exactly_once(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """Concurrent relays on PostgreSQL share the rows without publishing any twice."""
    ids = await fill(engine, outbox, app, 300)
    relays = [Relay(engine, app.transport, table=table, batch_size=7, interval=0) for _ in range(3)]

    counts = await asyncio.gather(*(relay.drain() for relay in relays))

    published = await drain_ids(world.url, world.queue, expected=300)
    duplicates = [k for k, n in collections.Counter(published).items() if n > 1]
    assert duplicates == []
    assert sorted(published) == sorted(ids)
    assert sum(counts) == 300
    assert sum(1 for c in counts if c) >= 2
    assert count(engine, table) == 0


async def test_a_batch_with_one_unroutable_row_publishes_the_others_once(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """The broker refuses one message of a batch: the confirmed ones are deleted, not sent again one by one
    (every good row used to be published twice), and the refused row waits for its backoff.
    """
    from dataclasses import replace  # noqa: PLC0415

    from queueable.outbox import to_row  # noqa: PLC0415

    ids = await fill(engine, outbox, app, 3)
    with engine.connect() as conn, conn.begin(), outbox.bind(conn) as scope:
        await app.dispatch(Job(id="lost"))
        [lost] = scope.messages
    with engine.begin() as conn:  # the same message, bound for a queue nobody declared: unroutable
        conn.execute(sa.delete(table).where(table.c.message_id == lost.message_id))
        conn.execute(sa.insert(table), [to_row(replace(lost, queue=f"{world.queue}.nowhere"), 0.0)])
    relay = Relay(engine, app.transport, table=table, batch_size=10, listen=False)

    result = await relay.run_once()

    assert (result.claimed, result.published, result.failed) == (4, 3, 1)
    published = await drain_ids(world.url, world.queue, expected=3)
    assert sorted(published) == sorted(ids)  # each once
    assert count(engine, table) == 1


async def test_rows_of_a_relay_that_died_after_claiming_are_published_after_the_lease(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """A claimed-but-unpublished batch is not lost: it is taken again once the lease expires."""
    ids = await fill(engine, outbox, app, 5)
    dead = Relay(engine, app.transport, table=table, lease=0.5)
    assert len(dead._claim()) == 5
    survivor = Relay(engine, app.transport, table=table)
    assert (await survivor.run_once()).claimed == 0

    await asyncio.sleep(0.6)
    assert (await survivor.run_once()).published == 5

    assert sorted(await drain_ids(world.url, world.queue, expected=5)) == sorted(ids)
    assert count(engine, table) == 0


@pytest.fixture(name="short_listen_retry")
def fixture_short_listen_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("queueable.outbox._relay.LISTEN_RETRY", 0.2)


async def _relay_until(relay: Relay, done: asyncio.Future[None]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await done
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_commit_wakes_a_listening_relay_long_before_its_next_poll(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """The writer NOTIFYs in its transaction; the relay (polling only every 60 s) publishes within seconds.

    Rows written while the relay was busy wake it too (psycopg keeps the notification), and a rolled-back
    transaction sends no notification and no row.
    """
    await app.transport.connect()  # type: ignore[attr-defined] # declares the work queue drain_ids reads
    relay = Relay(engine, app.transport, table=table, interval=60)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(_relay_until(relay, done))
    try:
        await asyncio.sleep(0.5)  # the relay has claimed nothing and is waiting
        ids = await fill(engine, outbox, app, 3)
        assert sorted(await drain_ids(world.url, world.queue, expected=3, timeout=10)) == sorted(ids)
        with Session(engine) as session:
            session.begin()
            await outbox.dispatch(session, Job(id="rolled-back"))
            session.rollback()
        ids = await fill(engine, outbox, app, 2)
        assert sorted(await drain_ids(world.url, world.queue, expected=2, timeout=10)) == sorted(ids)
        assert count(engine, table) == 0
    finally:
        done.set_result(None)
        await running


@pytest.mark.usefixtures("short_listen_retry")
async def test_a_relay_whose_listen_connection_is_killed_keeps_relaying_and_listens_again(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, world: World
):
    """pg_terminate_backend on the LISTEN connection: the relay polls meanwhile, then reopens it."""
    await app.transport.connect()  # type: ignore[attr-defined]
    relay = Relay(engine, app.transport, table=table, interval=1.0)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(_relay_until(relay, done))
    try:
        await asyncio.sleep(0.5)
        with engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query = :listen AND pid <> pg_backend_pid()"
                ),
                {"listen": f'LISTEN "{table.name}"'},
            ).all()
        assert killed == [(True,)]
        ids = await fill(engine, outbox, app, 2)  # found by the poll, or by the reopened LISTEN
        assert sorted(await drain_ids(world.url, world.queue, expected=2, timeout=10)) == sorted(ids)
        for _ in range(50):  # listening again
            with engine.connect() as conn:
                listening = conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE query = :listen"),
                    {"listen": f'LISTEN "{table.name}"'},
                ).scalar_one()
            if listening:
                break
            await asyncio.sleep(0.1)
        assert listening == 1
    finally:
        done.set_result(None)
        await running


async def test_a_session_that_binds_the_outbox_table_apart_writes_and_notifies(
    engine: sa.Engine, table: sa.Table, outbox: Outbox
):
    """Session(binds={table: engine}) with no default bind: the INSERT and the table-less pg_notify both find
    their bind.
    """
    with Session(binds={table: engine}) as session, session.begin():
        await outbox.dispatch(session, Job(id="bound-apart"))
    assert count(engine, table) == 1


async def test_savepoints_and_commits_inside_a_scope_on_postgres(
    engine: sa.Engine, table: sa.Table, outbox: Outbox
):
    """Real SAVEPOINTs: an event dispatched in one that rolls back is not written, nor one in a savepoint released
    inside another that rolls back; a commit inside the scope writes what came before it, and only that."""
    app = outbox.dispatcher
    async_engine = create_async_engine(PG_URL)
    try:
        async with AsyncSession(async_engine) as session, outbox.bind(session):
            await app.dispatch(Job(id="kept-1"))
            with contextlib.suppress(LookupError):
                async with session.begin_nested():
                    await app.dispatch(Job(id="savepoint-rolled-back"))
                    raise LookupError
            outer = await session.begin_nested()
            async with session.begin_nested():
                await app.dispatch(Job(id="released-then-rolled-back"))
            await outer.rollback()
            await session.commit()
            await app.dispatch(Job(id="after-the-commit-never-committed"))
    finally:
        await async_engine.dispose()

    with engine.connect() as conn:
        bodies = [Job.model_validate_json(r.body).id for r in conn.execute(sa.select(table).order_by(table.c.id))]
    assert bodies == ["kept-1"]


async def test_leases_and_availability_are_on_postgres_clock(
    engine: sa.Engine, table: sa.Table, outbox: Outbox, app: App, monkeypatch: pytest.MonkeyPatch
):
    """A writer and a relay on a host whose clock runs an hour ahead: the row is available at once, and the
    lease another relay holds still holds, because both are counted on PostgreSQL's clock."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    await fill(engine, outbox, app, 1)
    with engine.connect() as conn:
        [available_at] = conn.execute(sa.select(table.c.available_at)).scalars()
    assert abs(available_at - real()) < 5

    holder = Relay(engine, app.transport, table=table, lease=30, listen=False)
    [row] = holder._claim()
    assert abs(row["claimed_until"] - (real() + 30)) < 5
    assert Relay(engine, app.transport, table=table, lease=30, listen=False)._claim() == []
