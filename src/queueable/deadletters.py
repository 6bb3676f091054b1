"""Dead letters from Python: browse, show, replay, purge, export and import (what ``queueable dead`` runs).

::

    from queueable.deadletters import DeadFilter, DeadLetterAdmin, parse_since

    async with DeadLetterAdmin(settings, ["emails"]) as admin:
        letters = await admin.browse(DeadFilter(error="SMTPException", since=parse_since("1h")))
        moved = await admin.replay(DeadFilter(listener="mailer:*"), rate=50)

Semantics, guarantees and the way queues are read without changing them: ``docs/operations.md``.
"""

from __future__ import annotations

from queueable._deadletters import (
    DeadFilter,
    DeadLetterAdmin,
    DeadLetterNotFoundError,
    DeadLettersBusyError,
    DeadMessage,
    DryRunResult,
    ExportFormatError,
    QueueNotFoundError,
    QueueStatus,
    parse_since,
)

__all__ = [
    "DeadFilter",
    "DeadLetterAdmin",
    "DeadLetterNotFoundError",
    "DeadLettersBusyError",
    "DeadMessage",
    "DryRunResult",
    "ExportFormatError",
    "QueueNotFoundError",
    "QueueStatus",
    "parse_since",
]
