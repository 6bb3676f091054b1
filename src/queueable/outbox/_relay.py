"""``Relay``: claim outbox rows atomically, publish them with confirms, delete them.

The claim protocol (one short transaction, never held open across the network)::

    UPDATE outbox SET claimed_by = :me, claimed_until = :now + :lease, attempts = attempts + 1
     WHERE id IN (SELECT id FROM outbox
                   WHERE available_at <= :now AND (claimed_until IS NULL OR claimed_until < :now)
                   ORDER BY id LIMIT :batch
                   FOR UPDATE SKIP LOCKED)          -- PostgreSQL; see below for SQLite
    RETURNING *

then ``transport.publish(batch)`` (returns only when the broker confirmed every message), then
``DELETE ... WHERE id IN (batch) AND claimed_by = :me``.

- Several relays: on PostgreSQL ``SKIP LOCKED`` makes concurrent claims take disjoint rows without waiting, and
  a row another relay claimed a moment ago fails the ``claimed_until`` re-check. On SQLite, which has no row
  locks, the claim runs in ``BEGIN IMMEDIATE``: claims are serialized by the database's single write lock, so
  the second relay sees the first one's lease. Either way, in the normal case every row is published once.
- A relay killed mid-batch (before its ``DELETE`` committed) leaves its rows claimed; when the lease expires any
  relay claims and publishes them again. Nothing is lost; a message may be published twice, with the same
  ``message_id``, so listeners can detect the duplicate.
- A batch the broker rejects is retried message by message; a message that still fails goes back to the table
  with ``last_error`` and is retried after an exponential backoff, without holding up the others.
- Waking up: on PostgreSQL (psycopg 3) the relay ``LISTEN``s on the table's channel, and the writer's
  ``pg_notify`` (sent in the writing transaction, so at commit) wakes it at once. ``interval`` stays the
  fallback poll, for rows that become available later (a retry's backoff, an expired lease) and for any time
  the listening connection is down (it is reopened, at most every ``LISTEN_RETRY`` seconds). Elsewhere the
  relay polls every ``interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, delete, func, select, update

from queueable.errors import PublishError
from queueable.outbox._table import OUTBOX, database_now, from_row, notify_channel

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy import ColumnElement, Connection, Engine, Table

    from queueable.abc import Transport

__all__ = ["Relay", "RelayResult"]

log = logging.getLogger("queueable.relay")

MAX_ERROR = 2_000
#: The longest pause between rounds while the database or the broker keeps failing.
MAX_FAILURE_PAUSE = 30.0
#: Seconds between attempts to reopen the LISTEN connection (polling goes on meanwhile).
LISTEN_RETRY = 5.0
#: The longest a wait for a notification runs before the stop event is looked at again.
_LISTEN_SLICE = 0.5


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What one :meth:`Relay.run_once` did."""

    claimed: int
    published: int
    failed: int
    error: str | None = None  # why the last of the failed ones was not published


class Relay:
    """Moves outbox rows to the broker through any :class:`~queueable.abc.Transport`.

    ``engine`` is a SQLAlchemy ``Engine`` (sync driver) or a URL. ``lease`` must comfortably exceed the time a
    batch takes to publish (the transport's publish timeout): a lease that expires mid-publish lets another
    relay publish the same rows too. Leases and backoff are counted on the database's clock (PostgreSQL,
    SQLite; this host's clock on other databases), or on ``clock`` if given (tests).
    """

    def __init__(
        self,
        engine: Engine | str,
        transport: Transport,
        *,
        table: Table = OUTBOX,
        batch_size: int = 100,
        lease: float = 60.0,
        interval: float = 0.5,
        retry_delay: float = 5.0,
        max_retry_delay: float = 300.0,
        relay_id: str | None = None,
        clock: Callable[[], float] | None = None,
        listen: bool = True,
    ) -> None:
        if batch_size < 1 or lease <= 0 or interval < 0:
            msg = "batch_size must be >= 1, lease > 0 and interval >= 0"
            raise ValueError(msg)
        self.engine = create_engine(engine, pool_pre_ping=True) if isinstance(engine, str) else engine
        self.transport = transport
        self.table = table
        self.batch_size = batch_size
        self.lease = lease
        self.interval = interval
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.listen = listen
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._database_now = database_now(self.engine.dialect.name)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until ``stop`` is set; a batch in progress is finished first.

        A round that fails (the database is down, say) is retried after a pause that doubles from
        ``max(interval, 1)`` up to 30 s. The first failure is logged with its traceback, the next ones on one
        line each, and the recovery once.
        """
        stop = stop or asyncio.Event()
        wakeup = _Wakeup.for_engine(self.engine, notify_channel(self.table)) if self.listen else None
        log.info("relay %s started on %s", self.relay_id, self.table.name)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    result = await self.run_once()
                except Exception as exc:
                    failures += 1
                    pause = min(max(self.interval, 1.0) * 2 ** min(failures - 1, 16), MAX_FAILURE_PAUSE)
                    if failures == 1:
                        log.exception("relay round failed; retrying in %.1f s", pause)
                    else:
                        log.warning(
                            "relay round failed again (%d in a row): %s: %s; retrying in %.1f s",
                            failures,
                            type(exc).__name__,
                            _first_line(exc),
                            pause,
                        )
                    await _wait(stop, pause)
                    continue
                if failures:
                    log.info("relay round succeeded after %d failed one(s)", failures)
                    failures = 0
                if result.claimed < self.batch_size:
                    await self._idle(stop, wakeup)
        finally:
            if wakeup is not None:
                await wakeup.close()
        log.info("relay %s stopped", self.relay_id)

    async def _idle(self, stop: asyncio.Event, wakeup: _Wakeup | None) -> None:
        """Wait ``interval`` seconds, or less if a notification arrives (never raises: polling is the floor)."""
        if wakeup is None:
            await _wait(stop, self.interval)
            return
        try:
            await wakeup.wait(stop, self.interval)
        except Exception:
            log.exception("waiting for outbox notifications failed; polling")
            await _wait(stop, self.interval)

    async def drain(self, *, strict: bool = False, stop: asyncio.Event | None = None) -> int:
        """Relay until no row is available now (or ``stop`` is set); return how many messages were published.

        A message the broker did not confirm goes back to the table for a later attempt (after a backoff, so
        usually not available now). A round that publishes nothing ends the drain too: with ``retry_delay=0`` the
        same refused rows would otherwise be claimed again forever. With ``strict``, messages that stayed behind
        make ``drain`` raise ``PublishError`` at the end, saying how many and why (for a one-shot run, whose
        success must mean that the outbox holds nothing that was due).
        """
        total = failed = 0
        last: str | None = None
        while stop is None or not stop.is_set():
            result = await self.run_once()
            total += result.published
            failed += result.failed
            if result.error is not None:
                last = result.error
            if result.claimed == 0 or result.published == 0:
                break
        if strict and failed:
            msg = (
                f"{failed} outbox message(s) not published ({total} were): {last or 'unknown'}; "
                "they stay in the outbox and are retried after a backoff"
            )
            raise PublishError(msg)
        return total

    async def run_once(self) -> RelayResult:
        """Claim one batch, publish it, delete what the broker confirmed."""
        rows = await asyncio.to_thread(self._claim)
        if not rows:
            return RelayResult(0, 0, 0)
        messages = [from_row(row) for row in rows]
        ids = [row["id"] for row in rows]
        try:
            await self.transport.publish(messages)
        except Exception as exc:
            # The error names what may not be published (Transport's contract): the others are, and must not be
            # sent again. What it names is retried one by one, so that one bad message holds up no other.
            named = set(exc.message_ids) if isinstance(exc, PublishError) else set()
            published = [row["id"] for row in rows if named and row["message_id"] not in named]
            kept = set(published)
            retry = [(row, message) for row, message in zip(rows, messages, strict=True) if row["id"] not in kept]
            log.warning(
                "publishing a batch of %d failed (%s); %d confirmed, retrying %d one by one",
                len(messages),
                exc,
                len(published),
                len(retry),
            )
            outcomes = await asyncio.gather(
                *(self.transport.publish([message]) for _, message in retry), return_exceptions=True
            )
            done = published + [row["id"] for (row, _), out in zip(retry, outcomes, strict=True) if out is None]
            failed = [
                (row, out) for (row, _), out in zip(retry, outcomes, strict=True) if isinstance(out, BaseException)
            ]
            await asyncio.to_thread(self._delete, done)
            await asyncio.to_thread(self._release, failed)
            for row, out in failed:
                log.error(  # noqa: TRY400 - the cause is a publish outcome, not the exception being handled
                    "message %s (%s) not published, attempt %d: %s",
                    row["message_id"],
                    row["headers"].get("x-queueable-listener"),
                    row["attempts"],
                    out,
                )
            error = f"{type(failed[-1][1]).__name__}: {failed[-1][1]}" if failed else None
            return RelayResult(len(rows), len(done), len(failed), error)
        await asyncio.to_thread(self._delete, ids)
        log.debug("relayed %d message(s)", len(ids))
        return RelayResult(len(rows), len(ids), 0)

    # -- database (run in a worker thread) ---------------------------------------------------------

    def _now(self) -> float | ColumnElement[float]:
        """The time leases and backoff count from: ``clock()`` if given, else the database's own clock (one clock
        for every relay, whatever their hosts' clocks say), else this host's."""
        if self.clock is not None:
            return self.clock()
        return self._database_now if self._database_now is not None else time.time()

    def _claim(self) -> list[dict[str, Any]]:
        table = self.table
        now = self._now()
        candidates = (
            select(table.c.id)
            .where(
                table.c.available_at <= now,
                (table.c.claimed_until.is_(None)) | (table.c.claimed_until < now),
            )
            .order_by(table.c.id)
            .limit(self.batch_size)
            .with_for_update(skip_locked=True)  # rendered on PostgreSQL (and MySQL 8); ignored by SQLite
        )
        claim = (
            update(table)
            .where(table.c.id.in_(candidates))
            .values(claimed_by=self.relay_id, claimed_until=now + self.lease, attempts=table.c.attempts + 1)
            .returning(*table.c)
        )
        with self.engine.connect() as conn:
            self._begin_write(conn)
            rows = [dict(row) for row in conn.execute(claim).mappings()]
            conn.commit()
        return sorted(rows, key=lambda row: row["id"])

    def _begin_write(self, conn: Connection) -> None:
        if self._sqlite:
            # No row locks in SQLite: take the database write lock up front, so that concurrent claims
            # serialize (waiting up to the driver's busy timeout) instead of failing at lock upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _delete(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        table = self.table
        with self.engine.connect() as conn:
            self._begin_write(conn)
            conn.execute(delete(table).where(table.c.id.in_(ids), table.c.claimed_by == self.relay_id))
            conn.commit()

    def _release(self, failed: Sequence[tuple[dict[str, Any], BaseException]]) -> None:
        if not failed:
            return
        table = self.table
        now = self._now()
        with self.engine.connect() as conn:
            self._begin_write(conn)
            for row, exc in failed:
                delay = min(self.retry_delay * 2 ** max(row["attempts"] - 1, 0), self.max_retry_delay)
                conn.execute(
                    update(table)
                    .where(table.c.id == row["id"], table.c.claimed_by == self.relay_id)
                    .values(
                        claimed_by=None,
                        claimed_until=None,
                        available_at=now + delay,
                        last_error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR],
                    )
                )
            conn.commit()

    def pending(self) -> int:
        """Rows in the outbox (claimed or not)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())

    def __repr__(self) -> str:
        return f"<Relay {self.relay_id} table={self.table.name!r} batch={self.batch_size} lease={self.lease}>"


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (SQLAlchemy appends the statement and a help link on others)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Wakeup:
    """A PostgreSQL connection that ``LISTEN``s on the outbox's channel; :meth:`wait` returns at a notification.

    The connection comes from the relay's own engine (so ``connect_args``, a ``creator`` or a ``do_connect``
    hook apply as for its claims), is detached from the pool, set to autocommit and used for nothing else;
    notifications that arrive while the relay is busy wait in psycopg's backlog and wake the next :meth:`wait`
    at once. psycopg's blocking ``notifies()`` runs in a worker thread, in slices of ``_LISTEN_SLICE`` seconds
    so that ``stop`` is seen. Connecting also runs in a thread and is never waited for past the caller's
    timeout. A failed or lost connection is logged and tried again after ``LISTEN_RETRY`` seconds; meanwhile
    :meth:`wait` just sleeps, and polling carries on.
    """

    def __init__(self, engine: Engine, channel: str) -> None:
        self.engine = engine
        self.channel = channel
        self._conn: Any = None  # the listening psycopg connection, detached from the engine's pool
        self._connecting: asyncio.Future[Any] | None = None
        self._listening: asyncio.Future[bool] | None = None  # the thread waiting in notifies(), if any
        self._retry_at = 0.0

    @classmethod
    def for_engine(cls, engine: Engine, channel: str) -> _Wakeup | None:
        """A wakeup for ``engine``'s database, or ``None`` unless it is PostgreSQL through psycopg 3."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            if engine.dialect.name == "postgresql":
                log.info("the relay polls: LISTEN needs the psycopg (3) driver, not %s", engine.dialect.driver)
            return None
        return cls(engine, channel)

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Return at the first notification, when ``stop`` is set, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn = await self._connection(min(left, _LISTEN_SLICE))
            left = deadline - time.monotonic()  # connecting took some of it
            if left <= 0:
                return
            if conn is None:
                await _wait(stop, min(left, _LISTEN_SLICE))
                continue
            # The thread keeps the connection until it returns, even if this task is cancelled meanwhile:
            # close() waits for it before closing the connection under it.
            self._listening = asyncio.ensure_future(
                asyncio.to_thread(_next_notification, conn, min(left, _LISTEN_SLICE))
            )
            try:
                if await asyncio.shield(self._listening):
                    return
            except Exception as exc:  # any failure of the listening connection: poll instead
                log.warning("the relay's LISTEN connection failed (%s); polling until it is back", _brief(exc))
                self._drop()

    async def _connection(self, patience: float) -> Any:
        """The listening connection; ``None`` while it is being (re)opened or after a failure."""
        if self._conn is not None:
            return self._conn
        if self._connecting is None:
            if time.monotonic() < self._retry_at:
                return None
            self._connecting = asyncio.ensure_future(asyncio.to_thread(self._open))
        with contextlib.suppress(Exception):  # a timeout, or the failure that result() raises below
            await asyncio.wait_for(asyncio.shield(self._connecting), patience)
        if not self._connecting.done():
            return None
        connecting, self._connecting = self._connecting, None
        try:
            self._conn = connecting.result()
        except Exception as exc:  # the database is down, refuses us, ...: poll meanwhile
            self._retry_at = time.monotonic() + LISTEN_RETRY
            log.warning(
                "the relay cannot LISTEN on %r (%s); polling, trying again in %g s",
                self.channel,
                _brief(exc),
                LISTEN_RETRY,
            )
            return None
        log.info("relay listening on channel %r", self.channel)
        return self._conn

    def _open(self) -> Any:
        """Check a psycopg connection out of the engine, detach it from the pool and LISTEN (in a thread)."""
        from psycopg import sql  # noqa: PLC0415 - the driver is psycopg (for_engine checked)

        raw = self.engine.raw_connection()
        conn: Any = raw.driver_connection
        raw.detach()  # never back to the pool with a LISTEN on it: closing it closes it
        try:
            conn.rollback()  # out of any transaction, so that autocommit can be set
            conn.autocommit = True
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._retry_at = time.monotonic() + LISTEN_RETRY
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    async def close(self) -> None:
        """Close the listening connection, after the thread waiting on it returned (a slice at most).

        A connection still being opened is closed when it arrives, without holding the shutdown up.
        """
        listening, self._listening = self._listening, None
        if listening is not None and not listening.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(listening), _LISTEN_SLICE + 1)
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.add_done_callback(_close_result)
        self._drop()


def _close_result(future: asyncio.Future[Any]) -> None:
    """Close the connection a finished opening attempt produced (none if it failed or was cancelled)."""
    if future.cancelled() or future.exception() is not None:
        return
    with contextlib.suppress(Exception):
        future.result().close()


def _next_notification(conn: Any, timeout: float) -> bool:
    """Whether a notification arrived on ``conn`` within ``timeout`` seconds (blocking; run in a thread).

    ``stop_after=1`` ends psycopg's generator by itself, which releases the connection's lock.
    """
    woken = False
    for _ in conn.notifies(timeout=timeout, stop_after=1):
        woken = True
    return woken


def _brief(exc: BaseException) -> str:
    """An exception on one line, without a DBAPI error's SQL or parameters."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
    text = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(orig if orig is not None else exc).__name__}: {text[0] if text else ''}"
