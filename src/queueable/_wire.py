"""The wire format (version 1): what a queued listener's message looks like on the broker.

The body is the event's JSON and nothing else, so producers in any language can publish. Everything queueable
needs besides the body travels in AMQP properties and ``x-queueable-*`` headers; see ``docs/wire-format.md``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "H_ATTEMPT",
    "H_EVENT",
    "H_LISTENER",
    "H_VERSION",
    "H_WIRE",
    "WIRE_VERSION",
    "IncomingMessage",
    "OutgoingMessage",
    "iso_now",
]

WIRE_VERSION = 1
CONTENT_TYPE = "application/json"

H_WIRE = "x-queueable-wire"
H_LISTENER = "x-queueable-listener"
H_EVENT = "x-queueable-event"
H_VERSION = "x-queueable-event-version"
H_ATTEMPT = "x-queueable-attempt"
H_CREATED = "x-queueable-created-at"
H_REPLAYS = "x-queueable-replays"

# Added when a message fails (retry copies carry the last error; dead letters carry all of these).
H_DEAD_REASON = "x-queueable-dead-reason"
H_ERROR_TYPE = "x-queueable-error-type"
H_ERROR_MESSAGE = "x-queueable-error-message"
H_ERROR_TRACEBACK = "x-queueable-error-traceback"
H_FIRST_FAILURE = "x-queueable-first-failure-at"
H_LAST_FAILURE = "x-queueable-last-failure-at"
H_ORIGINAL_QUEUE = "x-queueable-original-queue"
H_DEAD_AT = "x-queueable-dead-at"
H_CONSUMER_HOST = "x-queueable-consumer-host"
H_CONSUMER_PID = "x-queueable-consumer-pid"


def iso_now(clock: float | None = None) -> str:
    """An ISO 8601 UTC timestamp with milliseconds."""
    ts = time.time() if clock is None else clock
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def new_message_id() -> str:
    """A fresh, unique message id (also the idempotency key a listener may use)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for one queued listener, ready for a transport.

    ``queue`` is the work queue it is for (the transport routes it there); ``message_id`` stays the same across
    retries and dead-lettering, so listeners can use it to make their work idempotent.
    """

    queue: str
    body: bytes
    headers: dict[str, Any]
    message_id: str = field(default_factory=new_message_id)
    correlation_id: str | None = None
    timestamp: float = field(default_factory=time.time)
    content_type: str | None = CONTENT_TYPE
    type: str | None = None


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A delivery as the consumer sees it, independent of the transport it came from."""

    queue: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None = None
    correlation_id: str | None = None
    timestamp: float | None = None
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    type: str | None = None
    redelivered: bool = False

    def header(self, name: str) -> Any:
        """A header's value, or ``None``."""
        return self.headers.get(name)

    def to_outgoing(self, queue: str, headers: dict[str, Any]) -> OutgoingMessage:
        """The same body and identity, bound for ``queue`` with ``headers``."""
        return OutgoingMessage(
            queue=queue,
            body=self.body,
            headers=headers,
            message_id=self.message_id or new_message_id(),
            correlation_id=self.correlation_id,
            timestamp=self.timestamp if self.timestamp is not None else time.time(),
            content_type=self.content_type,
            type=self.type,
        )
