"""The protocols users implement or depend on: ``Container``, ``StoppableEvent`` and ``Transport``.

Structural typing throughout: any object with the right methods qualifies, no inheritance needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from queueable._wire import OutgoingMessage

__all__ = ["Container", "StoppableEvent", "Transport"]


@runtime_checkable
class Container(Protocol):
    """A service locator in the spirit of PSR-11: ``get(service_id)`` returns the service or raises.

    Implementations raise :class:`queueable.errors.UnknownServiceError` (a ``LookupError``) for an id they do
    not know. ``has()`` lets queueable check listener registrations before any service is built.
    """

    def get(self, service_id: str) -> object:
        """Return the service registered under ``service_id``."""
        ...

    def has(self, service_id: str) -> bool:
        """Whether ``service_id`` is known, without building the service."""
        ...


@runtime_checkable
class StoppableEvent(Protocol):
    """An event whose propagation a listener may stop (PSR-14 ``StoppableEventInterface``)."""

    def is_propagation_stopped(self) -> bool:
        """Whether later listeners must not be called."""
        ...


class Transport(Protocol):
    """Where the publisher closures of queued listeners send their messages.

    ``publish`` returns only once *every* message is durably accepted (for RabbitMQ: confirmed by the broker);
    otherwise it raises :class:`queueable.errors.PublishError`. Several messages are published concurrently.
    The error's ``message_ids`` name every message that may not have been accepted (possibly more, never
    fewer): the others were, and a caller such as the outbox relay counts them as published.
    """

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish ``messages``; return when all are confirmed, raise ``PublishError`` otherwise."""
        ...

    async def close(self) -> None:
        """Release connections; publishing afterwards raises ``TransportClosedError``."""
        ...
