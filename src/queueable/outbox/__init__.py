"""The transactional outbox: an event exists if and only if the transaction that dispatched it committed.

Needs the ``sqlalchemy`` extra (``pip install 'queueable[sqlalchemy]'``).

- :class:`Outbox` writes the messages of events dispatched inside a database transaction into the outbox table
  through the same session or connection, hence in the same transaction.
- :class:`Relay` (``queueable relay APP --db URL``) claims rows atomically, publishes them with confirms and
  deletes them; several relays may run at once, and one killed mid-batch loses nothing.

.. versionadded:: 0.1
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    msg = "queueable.outbox needs SQLAlchemy: pip install 'queueable[sqlalchemy]'"
    raise ImportError(msg) from exc

from queueable.outbox._relay import Relay, RelayResult
from queueable.outbox._table import DEFAULT_TABLE_NAME, OUTBOX, from_row, metadata, outbox_table, to_row
from queueable.outbox._writer import Outbox, OutboxScope

__all__ = [
    "DEFAULT_TABLE_NAME",
    "OUTBOX",
    "Outbox",
    "OutboxScope",
    "Relay",
    "RelayResult",
    "from_row",
    "metadata",
    "outbox_table",
    "to_row",
]
