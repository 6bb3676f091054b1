"""Databases for the outbox integration tests: PostgreSQL on 127.0.0.1:5432 (database ``test``) and SQLite.

PostgreSQL is ``QUEUEABLE_TEST_PG_URL`` if set, else ``postgresql+psycopg://postgres@127.0.0.1:5432/test``
(trust auth). As with the broker, an unreachable database fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import TYPE_CHECKING

import aio_pika
import pytest
import sqlalchemy as sa

from queueable.outbox import outbox_table

if TYPE_CHECKING:
    from pathlib import Path

PG_URL = os.environ.get("QUEUEABLE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_engine() -> sa.Engine:
    """An engine on the test PostgreSQL; fails the test if it does not answer."""
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        pytest.fail(f"PostgreSQL at {PG_URL} does not answer: {exc}", pytrace=False)
    return engine


def db_url(kind: str, tmp_path: Path) -> str:
    """The URL of a database of ``kind`` (``postgresql`` or ``sqlite``)."""
    return PG_URL if kind == "postgresql" else f"sqlite:///{tmp_path / 'outbox.db'}"


def unique_table(engine: sa.Engine) -> sa.Table:
    """A fresh outbox table with a unique name, created in ``engine``'s database."""
    table = outbox_table(sa.MetaData(), f"qtest_outbox_{uuid.uuid4().hex[:10]}")
    table.create(engine)
    return table


def count(engine: sa.Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    """Rows of ``table`` matching ``where``."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


async def drain_ids(url: str, queue: str, expected: int, timeout: float = 20.0) -> list[str]:
    """Take messages from ``queue`` until ``expected`` arrived and the queue stays empty briefly; their ids."""
    ids: list[str] = []
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        declared = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            message = await declared.get(no_ack=True, fail=False)
            if message is not None:
                ids.append(message.message_id or "")
                quiet_since = None
                continue
            if len(ids) >= expected:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.5:  # long enough to see a late duplicate
                    break
            await asyncio.sleep(0.02)
    finally:
        await connection.close()
    return ids
