"""The outbox table: one row per built message, exactly what a direct publish would have sent.

Columns (``queueable_outbox`` by default):

==============  ==========================================================================================
id              insertion order (claims take the oldest rows first)
message_id      the message's id; stays the same if the relay publishes the row again after a crash
queue, body,    the :class:`~queueable.OutgoingMessage` fields, so the worker sees the very message a direct
headers, ...    publish sends (``headers`` as JSON: the wire headers are strings and integers)
available_at    epoch seconds before which no relay claims the row (now on insert; later after a failure)
claimed_by,     the relay holding the row and until when (a lease): a relay killed mid-batch leaves its rows
claimed_until   claimed until the lease expires, then any relay takes them again
attempts,       how many claims the row went through, and the last publish error
last_error
==============  ==========================================================================================

A row is deleted once the broker confirmed its message.

Times are the database's clock (:func:`database_now`), not the hosts': relays on several hosts compare leases
on one clock, so a host whose clock runs ahead cannot take rows another relay still holds, and a writer whose
clock runs ahead does not hold its rows back.

On PostgreSQL the writer also sends ``NOTIFY`` on :func:`notify_channel` in the same transaction, so the
notification goes out at commit (and never for a rollback); relays ``LISTEN`` on it and claim at once instead
of waiting for their next poll.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
    extract,
    func,
    literal,
)

from queueable._wire import OutgoingMessage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy import ColumnElement

__all__ = ["DEFAULT_TABLE_NAME", "OUTBOX", "from_row", "metadata", "outbox_table", "to_row"]

DEFAULT_TABLE_NAME = "queueable_outbox"

#: The metadata of the default outbox table: ``metadata.create_all(engine)``, or add ``outbox_table(your_md)``
#: to your own metadata so your migrations (Alembic) create it.
metadata = MetaData()


def outbox_table(
    target: MetaData | None = None, name: str = DEFAULT_TABLE_NAME, *, schema: str | None = None
) -> Table:
    """Define the outbox table on ``target`` (a fresh ``MetaData`` if ``None``)."""
    return Table(
        name,
        target if target is not None else MetaData(),
        # SQLite only autoincrements an INTEGER PRIMARY KEY.
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False, unique=True),
        Column("queue", String(255), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("correlation_id", String(255)),
        Column("message_type", String(255)),
        Column("content_type", String(255)),
        Column("timestamp", Double, nullable=False),
        Column("available_at", Double, nullable=False),
        Column("claimed_by", String(255)),
        Column("claimed_until", Double),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text),
        Index(f"ix_{name}_available_at", "available_at"),
        schema=schema,
    )


OUTBOX = outbox_table(metadata)


def database_now(dialect: str) -> ColumnElement[float] | None:
    """The database's current time in epoch seconds, as SQL for ``dialect`` (``None``: no known expression).

    PostgreSQL: the transaction's start (``now()``), which is the statement's for the relay's one-statement
    transactions; SQLite: ``julianday('now')`` (millisecond resolution, fixed for one statement).
    """
    if dialect == "postgresql":
        return cast(extract("epoch", func.now()), Double)
    if dialect == "sqlite":
        return (func.julianday("now") - literal(2440587.5)) * literal(86400.0)
    return None


def to_row(message: OutgoingMessage, available_at: float) -> dict[str, Any]:
    """The row that stores ``message``."""
    return {
        "message_id": message.message_id,
        "queue": message.queue,
        "body": message.body,
        "headers": message.headers,
        "correlation_id": message.correlation_id,
        "message_type": message.type,
        "content_type": message.content_type,
        "timestamp": message.timestamp,
        "available_at": available_at,
        "attempts": 0,
    }


def from_row(row: Mapping[str, Any]) -> OutgoingMessage:
    """The message a row stores, identical to the one built at dispatch."""
    return OutgoingMessage(
        queue=row["queue"],
        body=bytes(row["body"]),
        headers=dict(row["headers"]),
        message_id=row["message_id"],
        correlation_id=row["correlation_id"],
        timestamp=row["timestamp"],
        content_type=row["content_type"],
        type=row["message_type"],
    )


#: PostgreSQL's longest identifier in bytes (NAMEDATALEN - 1): a longer channel name is an error for pg_notify.
_MAX_CHANNEL_BYTES = 63


def notify_channel(table: Table) -> str:
    """The PostgreSQL notification channel of ``table``: its (schema-qualified) name.

    A name over 63 bytes is cut and suffixed with a hash of the whole, so writers and relays agree on it.
    """
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    if len(name.encode()) <= _MAX_CHANNEL_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[: _MAX_CHANNEL_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"
