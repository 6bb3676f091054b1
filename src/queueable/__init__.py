"""queueable: a PSR-14-style event dispatcher whose queued listeners run in RabbitMQ workers.

Dispatch pydantic events; listeners registered with ``queue=True`` are published as validated JSON (one
confirmed message per listener) and run by ``queueable-consume`` with retries and a dead-letter queue.
"""

from __future__ import annotations

from queueable._app import App, load_app
from queueable._consumer import DeadLetter, DeadReason, Handled, Outcome, Processor, RetryLater
from queueable._container import Container, SvcsContainer
from queueable._dispatcher import EventDispatcher, correlation_id
from queueable._events import Stoppable, event, event_name, event_version
from queueable._provider import Listener, ListenerProvider, listener
from queueable._retry import RetryPolicy
from queueable._settings import Settings, mask_url
from queueable._wire import IncomingMessage, OutgoingMessage
from queueable.errors import (
    ConfigurationError,
    MessageTooLargeError,
    PublishError,
    QueueableError,
    Reject,
    Retry,
    SerializationError,
    TransportClosedError,
    UnknownServiceError,
)

__all__ = [
    "App",
    "ConfigurationError",
    "Container",
    "DeadLetter",
    "DeadReason",
    "EventDispatcher",
    "Handled",
    "IncomingMessage",
    "Listener",
    "ListenerProvider",
    "MessageTooLargeError",
    "Outcome",
    "OutgoingMessage",
    "Processor",
    "PublishError",
    "QueueableError",
    "Reject",
    "Retry",
    "RetryLater",
    "RetryPolicy",
    "SerializationError",
    "Settings",
    "Stoppable",
    "SvcsContainer",
    "TransportClosedError",
    "UnknownServiceError",
    "correlation_id",
    "event",
    "event_name",
    "event_version",
    "listener",
    "load_app",
    "mask_url",
]

__version__ = "0.1.0"
