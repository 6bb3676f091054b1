"""Every exception queueable raises, in one hierarchy.

::

    QueueableError
    ├── ConfigurationError (also ValueError)    registration and settings mistakes, raised early
    ├── UnknownServiceError (also LookupError)  the container has no service with that id
    ├── SerializationError (also ValueError)    the event cannot become valid JSON; raised at the emitter
    ├── PublishError                            the broker did not confirm, the message was unroutable,
    │                                           or the publish timed out
    ├── TransportClosedError                    the transport was used after close()
    └── ListenerControl                         raised *by a listener* to steer the consumer
        ├── Retry(delay=...)                    try again later, after `delay` seconds
        └── Reject(reason)                      never retry: straight to the dead-letter queue

Catch ``QueueableError`` to catch everything the library raises on its own behalf.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from queueable._wire import OutgoingMessage

__all__ = [
    "ConfigurationError",
    "ListenerControl",
    "PublishError",
    "QueueableError",
    "Reject",
    "Retry",
    "SerializationError",
    "TransportClosedError",
    "UnknownServiceError",
]


class QueueableError(Exception):
    """Base class of every exception raised by queueable."""


class ConfigurationError(QueueableError, ValueError):
    """A listener, service, event or setting is wrongly configured.

    Raised as early as possible: at registration or at start-up, never while a message is in flight.
    """


class UnknownServiceError(QueueableError, LookupError):
    """The container has no service registered under ``service_id``."""

    def __init__(self, service_id: str, known: list[str] | None = None) -> None:
        self.service_id = service_id
        msg = f"no service registered with id {service_id!r}"
        if known:
            msg += f" (known: {', '.join(sorted(known))})"
        super().__init__(msg)


class SerializationError(QueueableError, ValueError):
    """An event could not be turned into JSON that its own model accepts back.

    Raised at the emitter, so a bad event never reaches a worker: by ``dispatch()``, or, for an event
    dispatched inside a deferral scope whose JSON its model rejects, when the scope flushes. ``messages`` then
    holds the messages that were refused (the other messages of the scope were published).
    """

    def __init__(self, message: str, *, messages: Sequence[OutgoingMessage] = ()) -> None:
        super().__init__(message)
        self.messages: list[OutgoingMessage] = list(messages)


class PublishError(QueueableError):
    """The broker did not confirm a message: it nacked it, could not route it, or did not answer in time.

    ``dispatch()`` raises this instead of reporting success for a message that may not exist.
    """

    def __init__(self, message: str, *, message_ids: list[str] | None = None) -> None:
        self.message_ids = message_ids or []
        super().__init__(message)


class MessageTooLargeError(PublishError):
    """A message's properties and headers do not fit in one AMQP frame of the connection (``frame_max``).

    AMQP cannot split them, and a broker that received such a frame would close the whole connection; the
    transport refuses the message alone instead. Publishing it again cannot succeed.
    """


class TransportClosedError(QueueableError):
    """The transport was used after it was closed."""


class ListenerControl(QueueableError):  # noqa: N818 - control flow signals, not errors
    """Base of the exceptions a listener raises to tell the consumer what to do with its message."""


class Retry(ListenerControl):
    """Raise from a listener to have the message retried after ``delay`` seconds.

    The attempt still counts against the listener's ``RetryPolicy.max_attempts``; ``delay=None`` uses the
    policy's backoff.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            msg = f"Retry delay must be a finite number of seconds >= 0, got {delay}"
            raise ValueError(msg)
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class Reject(ListenerControl):
    """Raise from a listener to send the message straight to the dead-letter queue, without retries."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
