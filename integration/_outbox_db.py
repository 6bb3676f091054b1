"""Databases for the outbox integration tests: PostgreSQL on 127.0.0.1:5432 (database ``test``) and SQLite.

PostgreSQL is ``QUEUEABLE_TEST_PG_URL`` if set, else ``postgresql+psycopg://postgres@127.0.0.1:5432/test``
(trust auth). As with the broker, an unreachable database fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
import sqlalchemy as sa

import queueable
from queueable.outbox import outbox_table

if TYPE_CHECKING:
    from collections.abc import Sequence

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


def stored_ids(engine: sa.Engine, table: sa.Table) -> list[str]:
    """The message ids of the rows in ``table``, sorted."""
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(table.c.message_id)).scalars())


@dataclass(frozen=True, slots=True)
class Drained:
    """One message taken from a queue, with what a mismatch report needs to tell where it came from."""

    message_id: str
    body: bytes
    headers: dict[str, Any]
    delivery_mode: int | None

    def describe(self) -> str:
        ours = sorted(k for k in self.headers if k.startswith("x-queueable-"))
        hint = "" if ours else " (no x-queueable-* headers: not the properties built at dispatch)"
        return f"{self.message_id} body={self.body[:60]!r} delivery_mode={self.delivery_mode} headers={ours}{hint}"


async def drain(url: str, queue: str, expected: int, timeout: float = 20.0) -> list[Drained]:
    """Take messages from ``queue`` until ``expected`` arrived and the queue stays empty briefly."""
    taken: list[Drained] = []
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
                headers = dict(message.headers or {})
                taken.append(Drained(message.message_id or "", message.body, headers, message.delivery_mode))
                quiet_since = None
                continue
            if len(taken) >= expected:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.5:  # long enough to see a late duplicate
                    break
            await asyncio.sleep(0.02)
    finally:
        await connection.close()
    return taken


async def drain_ids(url: str, queue: str, expected: int, timeout: float = 20.0) -> list[str]:
    """Take messages from ``queue`` until ``expected`` arrived and the queue stays empty briefly; their ids."""
    return [message.message_id for message in await drain(url, queue, expected, timeout)]


def id_report(published: Sequence[Drained], ids: Sequence[str]) -> str:
    """For an assertion message: missing, extra and repeated message ids, each with a count and samples."""
    wanted = set(ids)
    counts = collections.Counter(message.message_id for message in published)
    missing = sorted(wanted - counts.keys())
    extra = [message for message in published if message.message_id not in wanted]
    repeated = sorted(k for k, n in counts.items() if n > 1 and k in wanted)
    summary = (
        f"{len(published)} message(s) drained for {len(ids)} expected id(s): {len(missing)} missing, "
        f"{len(extra)} extra (not among the expected ids), {len(repeated)} expected id(s) more than once "
        f"({sum(counts[k] - 1 for k in repeated)} duplicate(s))"
    )
    lines = [summary]
    if missing:
        lines.append(f"missing ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        lines.append(f"extra ({len(extra)}), the first ones:")
        lines.extend(f"  {message.describe()}" for message in extra[:5])
    if repeated:
        lines.append(f"repeated ({len(repeated)}): {[(k, counts[k]) for k in repeated[:10]]}")
    changed = changed_sources()
    if changed:
        lines.append(
            "queueable's source changed on disk during this run, and child processes (relay, consumer) import "
            f"the live tree: {changed[:10]}"
        )
    return "\n".join(lines)


# -- the product source this session started with --------------------------------------------------------------

_SOURCE = Path(queueable.__file__).resolve().parent


def _source_state() -> dict[str, int]:
    state: dict[str, int] = {}
    for path in _SOURCE.rglob("*.py"):
        with contextlib.suppress(FileNotFoundError):  # a file removed while we look
            state[str(path.relative_to(_SOURCE))] = path.stat().st_mtime_ns
    return state


_SOURCE_AT_START = _source_state()


def changed_sources() -> list[str]:
    """Files of the ``queueable`` package added, removed or modified since this test session imported it."""
    now = _source_state()
    names = _SOURCE_AT_START.keys() | now.keys()
    return sorted(name for name in names if _SOURCE_AT_START.get(name) != now.get(name))
