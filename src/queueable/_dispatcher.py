"""``EventDispatcher``: calls in-process listeners and publishes one message per queued listener."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING, NoReturn, Self, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from queueable import _wire
from queueable._events import event_name, event_version
from queueable.errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from queueable._provider import Listener, ListenerProvider
    from queueable.abc import Container, Transport

__all__ = ["Deferred", "EventDispatcher", "build_messages", "correlation_id", "encode_event"]

E = TypeVar("E")

#: The correlation id stamped on messages published from this context (a request, a consumed message).
#: The consumer sets it to the incoming message's correlation id while a listener runs, so events dispatched
#: by listeners carry it on.
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "queueable_correlation_id", default=None
)


#: What one dispatch inside a scope buffers, turned into messages only when someone needs them: the event class,
#: its validated JSON, the queued listeners, the correlation id of the dispatching context (``None``: a fresh one
#: each) and the dispatch time (the messages' timestamp and created-at header).
_Pending = tuple[type, bytes, "Sequence[Listener]", "str | None", float]


class _Scope:
    """A buffer that dispatches in this context append to instead of publishing.

    ``owner`` is the dispatcher whose dispatches it buffers (``None``: any dispatcher, as for an outbox).
    Dispatches append a compact record to ``pending``; :attr:`messages` builds the messages from it once (so
    their ids are stable), keeping dispatch-time work to serializing and validating the event.
    """

    __slots__ = ("built", "owner", "parent", "pending")

    def __init__(self, owner: EventDispatcher | None, parent: _Scope | None) -> None:
        self.built: list[_wire.OutgoingMessage] = []
        self.pending: list[_Pending] = []
        self.owner = owner
        self.parent = parent

    @property
    def messages(self) -> list[_wire.OutgoingMessage]:
        """The buffered messages, in dispatch order (the scope's own list)."""
        return self.materialize()

    def materialize(self) -> list[_wire.OutgoingMessage]:
        """Build the messages of the pending dispatches; return the scope's own list of built messages."""
        pending = self.pending
        if pending:
            built = self.built
            for cls, body, listeners, corr, now in pending:
                built.extend(_build(cls, body, listeners, corr, now))
            pending.clear()
        return self.built

    def take(self) -> list[_wire.OutgoingMessage]:
        """The buffered messages, leaving the buffer empty."""
        messages = self.materialize()
        self.built = []
        return messages

    def accepts(self, dispatcher: EventDispatcher) -> bool:
        return self.owner is None or self.owner is dispatcher


#: The innermost deferral scope of this context (a request, a task): concurrent requests never share one.
_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("queueable_deferral", default=None)
_scope_get = _scope.get
_scope_set = _scope.set
_time = time.time
_correlation_get = correlation_id.get


def open_scope(owner: EventDispatcher | None) -> tuple[_Scope, contextvars.Token[_Scope | None]]:
    """Start buffering in this context; close with :func:`close_scope` in the same context."""
    scope = _Scope(owner, _scope.get())
    return scope, _scope.set(scope)


def close_scope(
    scope: _Scope, token: contextvars.Token[_Scope | None], *, keep: bool
) -> list[_wire.OutgoingMessage]:
    """Stop buffering; return the messages the caller must deliver itself (none if a parent takes them).

    With ``keep=False`` the buffer is discarded. Otherwise an enclosing scope that accepts the same dispatcher
    takes the messages over (a nested scope flushes with the outermost one). A scope without an owner (an
    outbox, bound to one database transaction) always delivers its messages itself.
    """
    _scope.reset(token)
    if not keep:
        scope.pending = []
        scope.built = []
        return []
    messages = scope.take()
    parent = scope.parent
    if parent is not None and scope.owner is not None and parent.accepts(scope.owner):
        parent.materialize().extend(messages)
        return []
    return messages


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
    return _encode_model(type(event), event)


def _encode_model(cls: type[BaseModel], event: object) -> bytes:
    """:func:`encode_event` for an instance of ``cls``, a model class (the caller checked)."""
    try:
        body = cls.__pydantic_serializer__.to_json(event)
    except PydanticSerializationError as exc:
        msg = f"cannot serialize {cls.__qualname__} to JSON: {exc}"
        raise SerializationError(msg) from exc
    try:
        cls.__pydantic_validator__.validate_json(body)  # what model_validate_json runs, without its frame
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
    return _build(type(event), body, listeners, _correlation_get(), time.time())


def _build(
    cls: type, body: bytes, listeners: Sequence[Listener], corr: str | None, now: float
) -> list[_wire.OutgoingMessage]:
    name = event_name(cls)
    version = event_version(cls)
    if not corr:
        corr = _wire.new_message_id()
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

    Inside :meth:`deferred` the event is serialized and validated at dispatch time (the messages keep that
    moment's correlation id and time) but published only when the block ends, all at once.
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
        # Per event class: the listeners tuple this was worked out for, and whether all are queued (fast path).
        self._plans: dict[type, tuple[Sequence[Listener], bool]] = {}

    async def dispatch(self, event: E, *, defer: bool = False) -> E:
        """Deliver ``event`` to its listeners and return it.

        Returns once in-process listeners have run and every queued listener's message is confirmed by the
        transport. Raises ``SerializationError`` if a queued listener's event is not valid JSON (nothing is
        published then) and ``PublishError`` if the broker did not confirm.

        ``defer=True``: the publisher decides that *every* listener runs in a worker, also those registered
        without ``queue=True``; each must be queued or a service listener registered with ``deferrable=True``
        (``ConfigurationError`` otherwise, before anything is published). Nothing runs in this process.
        """
        listeners = self.provider.listeners_for(event)
        if not listeners:
            return event
        if defer:
            await self.publish(event, _deferrable(event, listeners))
            return event
        cls = type(event)
        plan = self._plans.get(cls)
        if plan is None or plan[0] is not listeners:
            plan = self._plans[cls] = (listeners, _all_queued(cls, listeners))
        if plan[1]:
            # Every listener is queued and the event cannot stop propagation: nothing runs here.
            scope = _scope_get()
            if scope is not None and (scope.owner is self or scope.owner is None):
                body = _encode_model(cls, event)  # type: ignore[arg-type] # plan[1]: cls is a model
                if self.transport is None and scope.owner is not None:
                    self._no_transport(event, listeners)
                scope.pending.append((cls, body, listeners, _correlation_get(), _time()))
                return event
            await self.publish(event, listeners)
            return event
        await self._call_and_publish(event, listeners)
        return event

    async def _call_and_publish(self, event: object, listeners: Sequence[Listener]) -> None:
        """Call the in-process listeners in order, then publish to the queued ones (the general path)."""
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

    async def publish(self, event: object, listeners: Sequence[Listener]) -> None:
        """Publish ``event`` to ``listeners`` through the transport (one message each).

        Inside a deferral scope the built messages are buffered instead.
        """
        scope = _scope_get()
        if scope is not None and scope.accepts(self):
            body = encode_event(event)
            if scope.owner is not None and self.transport is None:
                self._no_transport(event, listeners)
            scope.pending.append((type(event), body, tuple(listeners), _correlation_get(), _time()))
            return
        messages = build_messages(event, listeners)
        if self.transport is None:
            self._no_transport(event, messages)
        await self.transport.publish(messages)

    def deferred(self, *, discard_on_error: bool = True) -> Deferred:
        """A scope that holds this dispatcher's queued messages and publishes them when it ends.

        ::

            async with dispatcher.deferred():
                await dispatcher.dispatch(OrderPlaced(...))   # serialized and validated now, not yet published
            # here every buffered message is published at once and confirmed

        In-process listeners still run at dispatch time. When the block raises, the buffer is discarded
        (``discard_on_error=False`` publishes it anyway, then the exception propagates). A nested scope hands
        its messages to the enclosing one, so they are published when the outermost scope ends. The scope is a
        context variable: concurrent tasks each have their own.
        """
        return Deferred(self, discard_on_error=discard_on_error)

    def _no_transport(self, event: object, messages: Sequence[object]) -> NoReturn:
        msg = (
            f"{len(messages)} queued listener(s) for {type(event).__qualname__} but the dispatcher has no "
            "transport (use App, or pass transport=)"
        )
        raise ConfigurationError(msg)

    def __repr__(self) -> str:
        return f"<EventDispatcher provider={self.provider!r} transport={self.transport!r}>"


class Deferred(_Scope):
    """What :meth:`EventDispatcher.deferred` returns: an async context manager around one deferral scope.

    ``messages`` shows what is buffered so far; :meth:`flush` publishes it early. It is its own scope object,
    so entering costs one context variable set and nothing else.
    """

    __slots__ = ("_token", "discard_on_error", "dispatcher")

    def __init__(self, dispatcher: EventDispatcher, *, discard_on_error: bool = True) -> None:
        self.built = []
        self.pending = []
        self.owner = self.dispatcher = dispatcher
        self.parent = None
        self.discard_on_error = discard_on_error
        self._token: contextvars.Token[_Scope | None] | None = None

    @property
    def messages(self) -> list[_wire.OutgoingMessage]:
        """The buffered messages (a copy)."""
        return list(self.materialize())

    async def __aenter__(self) -> Self:
        if self._token is not None:
            msg = "a Deferred scope cannot be entered twice"
            raise RuntimeError(msg)
        self.parent = _scope_get()
        self._token = _scope_set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._token is not None
        keep = exc is None or not self.discard_on_error
        messages = close_scope(self, self._token, keep=keep)
        if messages:
            await self._publish(messages)

    async def flush(self) -> None:
        """Publish what is buffered now (within the scope), and keep buffering afterwards."""
        if not self.pending and not self.built:
            return
        await self._publish(self.take())

    async def _publish(self, messages: list[_wire.OutgoingMessage]) -> None:
        transport = self.dispatcher.transport
        assert transport is not None  # checked when the messages were buffered
        await transport.publish(messages)

    def __repr__(self) -> str:
        buffered = len(self.built) + sum(len(pending[2]) for pending in self.pending)
        return f"<Deferred buffered={buffered} discard_on_error={self.discard_on_error}>"


def _all_queued(cls: type, listeners: Sequence[Listener]) -> bool:
    """Whether a dispatch of ``cls`` to ``listeners`` only publishes: all queued, a model, not stoppable."""
    return (
        issubclass(cls, BaseModel)
        and getattr(cls, "is_propagation_stopped", None) is None
        and all(entry.queue for entry in listeners)
    )


def _deferrable(event: object, listeners: Sequence[Listener]) -> list[Listener]:
    """All of ``listeners``, after checking each can run in a worker; raises ``ConfigurationError``."""
    problems: list[str] = []
    for entry in listeners:
        if entry.queue or entry.deferrable:
            continue
        if entry.is_service:
            problems.append(
                f"{entry.id!r} is an in-process service listener not registered with deferrable=True, so "
                "a worker would refuse its message"
            )
        else:
            problems.append(
                f"{entry.id!r} is a plain callable: only container service listeners can be deferred (a "
                "worker cannot resolve a callable that was not registered as queued)"
            )
    if problems:
        msg = f"cannot dispatch {type(event).__qualname__} with defer=True: " + "; ".join(problems)
        raise ConfigurationError(msg)
    return list(listeners)
