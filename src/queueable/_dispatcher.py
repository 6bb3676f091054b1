"""``EventDispatcher``: calls in-process listeners and publishes one message per queued listener."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from queueable import _wire
from queueable._events import event_name, event_version
from queueable.errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from queueable._provider import Listener, ListenerProvider
    from queueable.abc import Container, Transport

__all__ = ["EventDispatcher", "build_messages", "correlation_id", "encode_event"]

E = TypeVar("E")

#: The correlation id stamped on messages published from this context (a request, a consumed message).
#: The consumer sets it to the incoming message's correlation id while a listener runs, so events dispatched
#: by listeners carry it on.
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "queueable_correlation_id", default=None
)


def encode_event(event: object) -> bytes:
    """The event's JSON, checked by validating it back into its own model; raises ``SerializationError``.

    Done once per dispatch at the emitter, so an event a worker could not read never leaves the process.
    """
    if not isinstance(event, BaseModel):
        msg = (
            f"{type(event).__qualname__} is not a pydantic model: queued listeners need events that "
            "serialize to validated JSON"
        )
        raise SerializationError(msg)
    cls = type(event)
    try:
        body = cls.__pydantic_serializer__.to_json(event)
    except PydanticSerializationError as exc:
        msg = f"cannot serialize {cls.__qualname__} to JSON: {exc}"
        raise SerializationError(msg) from exc
    try:
        cls.model_validate_json(body)
    except ValidationError as exc:
        msg = (
            f"{cls.__qualname__} serialized to JSON that its own model rejects, so a worker could not read "
            f"it: {exc}"
        )
        raise SerializationError(msg) from exc
    return body


def build_messages(
    event: object, listeners: Sequence[Listener], *, body: bytes | None = None
) -> list[_wire.OutgoingMessage]:
    """One message per queued listener, all sharing the event's body and a correlation id."""
    if body is None:
        body = encode_event(event)
    cls = type(event)
    name = event_name(cls)
    version = event_version(cls)
    corr = correlation_id.get() or _wire.new_message_id()
    now = time.time()
    created = _wire.iso_now(now)
    return [
        _wire.OutgoingMessage(
            queue=entry.queue_name,
            body=body,
            headers={
                _wire.H_WIRE: _wire.WIRE_VERSION,
                _wire.H_LISTENER: entry.id,
                _wire.H_EVENT: name,
                _wire.H_VERSION: version,
                _wire.H_ATTEMPT: 1,
                _wire.H_CREATED: created,
            },
            correlation_id=corr,
            timestamp=now,
            type=name,
        )
        for entry in listeners
    ]


async def call_listener(
    entry: Listener, event: object, container: Container | None, *, timeout: float | None = None
) -> None:
    """Invoke one listener with ``event``: await it if async, run it in a worker thread if sync."""
    target = entry.resolve(container)
    is_async = entry.is_async
    if is_async is None:
        is_async = asyncio.iscoroutinefunction(target)
    limit = entry.timeout if timeout is None else timeout
    if is_async:
        if limit is None:
            await target(event)
        else:
            async with asyncio.timeout(limit):
                await target(event)
        return
    if not entry.in_thread:
        result = target(event)
    elif limit is None:
        result = await asyncio.to_thread(target, event)
    else:
        # The thread cannot be cancelled; the timeout stops the wait, and the error says so.
        result = await asyncio.wait_for(asyncio.to_thread(target, event), limit)
    if asyncio.iscoroutine(result):  # a sync callable that returned a coroutine (e.g. a functools.partial)
        await result


class EventDispatcher:
    """Dispatches events to their listeners (PSR-14 ``EventDispatcherInterface``).

    In-process listeners are called in order; each queued listener becomes one message, and all the messages of
    one dispatch are published together (concurrently, confirmed) after the in-process listeners ran. If an
    in-process listener raises, the exception propagates and nothing is published.
    """

    def __init__(
        self,
        provider: ListenerProvider,
        transport: Transport | None = None,
        *,
        container: Container | None = None,
    ) -> None:
        self.provider = provider
        self.transport = transport
        self.container = container if container is not None else provider.container

    async def dispatch(self, event: E) -> E:
        """Deliver ``event`` to its listeners and return it.

        Returns once in-process listeners have run and every queued listener's message is confirmed by the
        transport. Raises ``SerializationError`` if a queued listener's event is not valid JSON (nothing is
        published then) and ``PublishError`` if the broker did not confirm.
        """
        listeners = self.provider.listeners_for(event)
        if not listeners:
            return event
        stoppable = getattr(event, "is_propagation_stopped", None)
        queued: list[Listener] | None = None
        for entry in listeners:
            if stoppable is not None and stoppable():
                break
            if entry.queue:
                if queued is None:
                    queued = []
                queued.append(entry)
            else:
                await call_listener(entry, event, self.container)
        if queued:
            await self.publish(event, queued)
        return event

    async def publish(self, event: object, listeners: Sequence[Listener]) -> None:
        """Publish ``event`` to ``listeners`` through the transport (one message each)."""
        messages = build_messages(event, listeners)
        if self.transport is None:
            msg = (
                f"{len(messages)} queued listener(s) for {type(event).__qualname__} but the dispatcher has no "
                "transport (use App, or pass transport=)"
            )
            raise ConfigurationError(msg)
        await self.transport.publish(messages)

    def __repr__(self) -> str:
        return f"<EventDispatcher provider={self.provider!r} transport={self.transport!r}>"
