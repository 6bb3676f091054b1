"""``queueable relay APP --db URL``: publish the transactional outbox's rows to RabbitMQ."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

import click

from queueable._settings import mask_url
from queueable.cli._common import (
    EXIT_BROKER,
    CliError,
    app_argument,
    cli_errors,
    configure_logging,
    resolve_settings,
    url_option,
)
from queueable.errors import ConfigurationError, PublishError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from queueable.outbox import Relay

__all__ = ["relay"]

log = logging.getLogger("queueable.relay")


@click.command(
    "relay",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  queueable relay myproject.events:app --db postgresql+psycopg://app@db/app
  queueable relay myproject.events:app --db sqlite:///app.db --once      # drain, then exit

\b
Exit codes: 0 stopped cleanly (signal, or --once published everything that was due),
3 the broker was unreachable or did not confirm some messages (--once: they stay in the outbox),
5 the app, the database URL or the outbox table is wrong, or the database cannot be used.""",
)
@app_argument(required=True)
@click.option(
    "--db",
    envvar="QUEUEABLE_OUTBOX_DB",
    show_envvar=True,
    required=True,
    metavar="URL",
    help="SQLAlchemy URL (sync driver) of the database holding the outbox table.",
)
@click.option("--table", default="queueable_outbox", show_default=True, help="Name of the outbox table.")
@click.option("--schema", default=None, help="Database schema of the outbox table.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Rows claimed and published per round (one confirmed publish call each).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="Pause between polls when the outbox is empty. On PostgreSQL a commit that wrote rows wakes the relay "
    "at once (LISTEN/NOTIFY); the poll is then the fallback.",
)
@click.option(
    "--no-listen",
    is_flag=True,
    help="Poll only, no LISTEN (PostgreSQL behind a transaction-pooling PgBouncer cannot deliver notifications).",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a claimed batch stays reserved; a relay that dies mid-batch releases it after this. "
    "Keep it well above the publish timeout.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="First backoff for a message the broker rejected (doubles per attempt, at most 300 s).",
)
@click.option("--once", is_flag=True, help="Publish everything available now, then exit.")
@click.option("--create-table", is_flag=True, help="Create the outbox table if it does not exist.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@url_option
@cli_errors
def relay(  # noqa: PLR0917 - click passes options by keyword; this is its calling convention
    app: str,
    db: str,
    table: str,
    schema: str | None,
    batch_size: int,
    interval: float,
    lease: float,
    retry_delay: float,
    no_listen: bool,
    once: bool,
    create_table: bool,
    log_level: str,
    log_format: str,
    url: str | None,
) -> None:
    """Publish the outbox rows that APP's transactions committed, then delete them.

    Claims batches atomically (FOR UPDATE SKIP LOCKED on PostgreSQL, a write-locked claim on SQLite), so
    several relays can run at once; publishes each batch to RabbitMQ (--url or QUEUEABLE_URL) with publisher
    confirms; deletes a row only after its message is confirmed. A relay killed mid-batch loses nothing: its
    rows are published again, with the same message ids, once the lease expires. On PostgreSQL it LISTENs
    for the writers' NOTIFY, sent at commit, and claims at once; otherwise it polls every --interval.
    SIGTERM or SIGINT finishes the current batch and exits.
    """
    loaded, settings = resolve_settings(app, url)
    assert loaded is not None
    if settings.scheme == "memory":
        msg = "queueable relay needs a broker: set QUEUEABLE_URL=amqp://... or pass --url"
        raise ConfigurationError(msg)
    try:
        import sqlalchemy as sa  # noqa: PLC0415

        from queueable.outbox import Relay, outbox_table  # noqa: PLC0415
        from queueable.transport.rabbitmq import RabbitMQTransport  # noqa: PLC0415
    except ImportError as exc:
        msg = f"{exc}: pip install 'queueable[sqlalchemy]'"
        raise ConfigurationError(msg) from exc
    configure_logging(log_level, log_format)
    engine = _engine(db)
    outbox = outbox_table(sa.MetaData(), table, schema=schema)
    try:
        if create_table:
            outbox.create(engine, checkfirst=True)
        elif not sa.inspect(engine).has_table(table, schema=schema):
            name = f"{schema}.{table}" if schema else table
            msg = f"no outbox table {name!r} in {_mask_db(db)}: create it with --create-table (or migrations)"
            raise ConfigurationError(msg)
    except sa.exc.SQLAlchemyError as exc:
        if once or create_table:
            raise _database_error(db, exc) from exc
        # Not reachable now (still starting, locked, a failover): a long-running relay waits for it, backing off.
        log.warning("cannot check the outbox table now (%s); the relay retries", _database_error(db, exc))
    transport = RabbitMQTransport(settings, queues=loaded.provider.queue_names)
    worker = Relay(
        engine,
        transport,
        table=outbox,
        batch_size=batch_size,
        lease=lease,
        interval=interval,
        retry_delay=retry_delay,
        listen=not no_listen,
    )
    try:
        asyncio.run(_run(worker, once=once))
    except PublishError as exc:  # --once: some rows could not be published
        raise CliError(str(exc), EXIT_BROKER) from exc
    except sa.exc.SQLAlchemyError as exc:  # --once: a round failed on the database
        raise _database_error(db, exc) from exc
    finally:
        engine.dispose()


def _mask_db(db: str) -> str:
    """``db`` with its password hidden, read as SQLAlchemy reads it (``user:12#s3cret@host`` has the password
    ``12#s3cret`` for SQLAlchemy, while urlsplit takes ``12`` for a port and would hide nothing)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    try:
        return make_url(db).render_as_string(hide_password=True)
    except Exception:  # unreadable by SQLAlchemy: the generic masking
        return mask_url(db)


def _engine(db: str) -> Engine:
    """The relay's engine for ``db``; ``ConfigurationError`` for a URL it cannot use."""
    import sqlalchemy as sa  # noqa: PLC0415

    try:
        engine = sa.create_engine(db, pool_pre_ping=True)  # a port that is not a number: ValueError
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        msg = f"cannot use database URL {_mask_db(db)}: {exc}"
        raise ConfigurationError(msg) from exc
    if engine.dialect.is_async:
        engine.dispose()
        msg = (
            f"database URL {_mask_db(db)} names an async driver: the relay needs a sync "
            "driver, such as postgresql+psycopg:// or sqlite://"
        )
        raise ConfigurationError(msg)
    return engine


def _database_error(db: str, exc: Exception) -> ConfigurationError:
    """One line for a database failure (SQLAlchemy's own message adds the statement and a help link)."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ConfigurationError(f"cannot use the outbox database {_mask_db(db)}: {type(cause).__name__}: {text}")


async def _run(worker: Relay, *, once: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("relay pid %d publishing %s", os.getpid(), worker.table.name)
    try:
        if once:
            published = await worker.drain(strict=True, stop=stop)
            log.info("published %d message(s); the outbox has nothing available now", published)
        else:
            await worker.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await worker.transport.close()
