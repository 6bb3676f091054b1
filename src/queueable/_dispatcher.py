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
from queueable._provider import ListenerProvider
from queueable.errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from queueable._provider import Listener
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
#: its JSON (serialized at dispatch, not yet validated back), the queued listeners, the correlation id of the
#: dispatching context (``None``: a fresh one each) and the dispatch time (the messages' timestamp and
#: created-at header).
_Pending = tuple[type, bytes, "Sequence[Listener]", "str | None", float]


class _Scope:
    """A buffer that dispatches in this context append to instead of publishing.

    ``owner`` is the dispatcher whose dispatches it buffers (``None``: any dispatcher, as for an outbox).
    Dispatches serialize the event (so the message is a snapshot, and an event that cannot become JSON fails on
    the line that dispatched it) and append a compact record to ``pending``. :meth:`materialize` validates each
    body back into its model and builds the messages once (so their ids are stable); the messages of a body
    its model rejects go to ``rejected`` instead, with the reason, and are never published. That keeps the
    request's share to serializing the event: validating is as costly again, and it runs at the flush, after
    the response.
    """

    __slots__ = ("built", "closed", "owner", "parent", "pending", "rejected")

    def __init__(self, owner: EventDispatcher | None, parent: _Scope | None) -> None:
        self.built: list[_wire.OutgoingMessage] = []
        self.pending: list[_Pending] = []
        self.rejected: list[tuple[str, list[_wire.OutgoingMessage]]] = []
        self.owner = owner
        self.parent = parent
        self.closed = False  # set when its block ends; a task that copied the context may still see it

    @property
    def messages(self) -> list[_wire.OutgoingMessage]:
        """The buffered messages that will be published, in dispatch order (the scope's own list)."""
        return self.materialize()

    def materialize(self) -> list[_wire.OutgoingMessage]:
        """Validate and build the pending dispatches; return the scope's own list of built messages."""
        pending = self.pending
        if pending:
            built = self.built
            for cls, body, listeners, corr, now in pending:
                messages = _build(cls, body, listeners, corr, now)
                problem = _rejection(cls, body)
                if problem is None:
                    built.extend(messages)
                else:
                    self.rejected.append((problem, messages))
            pending.clear()
        return self.built

    def take(self) -> tuple[list[_wire.OutgoingMessage], SerializationError | None]:
        """The buffered messages and an error for those refused (``None``: none), leaving the buffer empty."""
        messages = self.materialize()
        self.built = []
        rejected, self.rejected = self.rejected, []
        return messages, _rejected_error(rejected)

    def accepts(self, dispatcher: EventDispatcher) -> bool:
        return self.owner is None or self.owner is dispatcher


def _buffer_for(scope: _Scope | None, dispatcher: EventDispatcher | None) -> _Scope | None:
    """The innermost open scope from ``scope`` outwards that buffers ``dispatcher``'s messages (``None``:
    publish now). Skips closed scopes, which a task keeps in its copy of the context after the block that opened
    them ended (a buffer nobody flushes any more), and scopes of other dispatchers nested inside this one's.
    ``dispatcher=None`` (a scope handing its messages over) takes only ownerless scopes.
    """
    while scope is not None:
        if not scope.closed and (scope.owner is None or scope.owner is dispatcher):
            return scope
        scope = scope.parent
    return None


#: The innermost deferral scope of this context (a request, a task): concurrent requests never share one.
_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("queueable_deferral", default=None)
_scope_get = _scope.get
_scope_set = _scope.set
_time = time.time
_correlation_get = correlation_id.get
_outgoing = _wire.outgoing
_new_id = _wire.new_message_id


def open_scope(owner: EventDispatcher | None) -> tuple[_Scope, contextvars.Token[_Scope | None]]:
    """Start buffering in this context; close with :func:`close_scope` in the same context."""
    parent = _scope.get()
    if owner is not None and parent is not None:
        _refuse_inside_outbox(parent)
    scope = _Scope(owner, parent)
    return scope, _scope.set(scope)


def _refuse_inside_outbox(scope: _Scope | None) -> None:
    """``RuntimeError`` if ``scope`` or an enclosing scope is an open outbox scope (a scope without an owner).

    Inside an outbox scope, events already wait for the transaction's commit; a deferral scope there would hold
    them past the commits and savepoint rollbacks the outbox follows, and hand them to it afterwards.
    """
    while scope is not None:
        if scope.owner is None and not scope.closed:
            msg = (
                "deferred() inside outbox.bind(): the outbox already holds the events until the transaction "
                "commits; dispatch without deferred() there"
            )
            raise RuntimeError(msg)
        scope = scope.parent


def close_scope(
    scope: _Scope, token: contextvars.Token[_Scope | None], *, keep: bool
) -> tuple[list[_wire.OutgoingMessage], SerializationError | None]:
    """Stop buffering; return the messages the caller must deliver itself (none if a parent takes them).

    With ``keep=False`` the buffer is discarded. Otherwise an enclosing scope that accepts the same dispatcher
    takes the messages over, unvalidated (a nested scope flushes with the outermost one). A scope without an
    owner (an outbox, bound to one database transaction) always delivers its messages itself.

    The second item is a ``SerializationError`` for the messages whose event JSON its model rejects; they are
    not in the list. The caller delivers the list, then raises or reports the error.
    """
    _scope.reset(token)
    scope.closed = True
    if not keep:
        scope.pending = []
        scope.built = []
        scope.rejected = []
        return [], None
    parent = _buffer_for(scope.parent, scope.owner) if scope.owner is not None else None
    if parent is not None:
        # Handed over as they are: unvalidated records stay unvalidated until the outermost flush, and the
        # order stays dispatch order (records built early, by reading ``messages``, go after the parent's).
        if scope.built:
            parent.materialize().extend(scope.built)
        parent.pending.extend(scope.pending)
        parent.rejected.extend(scope.rejected)
        scope.pending, scope.built, scope.rejected = [], [], []
        return [], None
    return scope.take()


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
    body = _serialize(cls, event)
    try:
        cls.__pydantic_validator__.validate_json(body)  # what model_validate_json runs, without its frame
    except ValidationError as exc:
        raise SerializationError(_rejected_message(cls, exc)) from exc
    return body


def _serialize(cls: type[BaseModel], event: object) -> bytes:
    """The JSON of ``event``, an instance of ``cls`` (not validated back); raises ``SerializationError``."""
    try:
        return cls.__pydantic_serializer__.to_json(event)
    except PydanticSerializationError as exc:
        raise _serialization_error(cls, exc) from exc


def _serialization_error(cls: type, exc: PydanticSerializationError) -> SerializationError:
    return SerializationError(f"cannot serialize {cls.__qualname__} to JSON: {exc}")


def _serialize_event(event: object) -> bytes:
    """:func:`_serialize` for any object: raises ``SerializationError`` if it is not a pydantic model."""
    if not isinstance(event, BaseModel):
        return encode_event(event)  # raises, with the message
    return _serialize(type(event), event)


def _rejected_message(cls: type, exc: ValidationError) -> str:
    return (
        f"{cls.__qualname__} serialized to JSON that its own model rejects, so a worker could not read it: {exc}"
    )


def _rejection(cls: type[BaseModel], body: bytes) -> str | None:
    """Why a worker could not read ``body`` as ``cls`` (``None``: it can); the deferred half of encode_event."""
    try:
        cls.__pydantic_validator__.validate_json(body)
    except ValidationError as exc:
        return _rejected_message(cls, exc)
    except Exception as exc:  # a validator raising what pydantic does not wrap (KeyError, TypeError, ...)
        return f"validating {cls.__qualname__}'s own JSON raised {type(exc).__name__}: {exc}"
    return None


def _rejected_error(rejected: list[tuple[str, list[_wire.OutgoingMessage]]]) -> SerializationError | None:
    """One error for the messages a scope refused to publish (``None`` if it refused none)."""
    if not rejected:
        return None
    messages = [message for _, batch in rejected for message in batch]
    reasons = "; ".join(dict.fromkeys(problem for problem, _ in rejected))
    ids = ", ".join(message.message_id for message in messages)
    msg = f"{len(messages)} buffered message(s) not published (ids: {ids}): {reasons}"
    return SerializationError(msg, messages=messages)


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
        corr = _new_id()
    created = _wire.iso_now(now)
    return [
        _outgoing(
            entry.queue_name,
            body,
            {
                _wire.H_WIRE: _wire.WIRE_VERSION,
                _wire.H_LISTENER: entry.id,
                _wire.H_EVENT: name,
                _wire.H_VERSION: version,
                _wire.H_ATTEMPT: 1,
                _wire.H_CREATED: created,
            },
            _new_id(),
            corr,
            now,
            _wire.CONTENT_TYPE,
            name,
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

    Inside :meth:`deferred` the event is serialized at dispatch time (the messages keep that moment's
    correlation id and time), then validated and published only when the block ends, all at once.
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
        # Per event class: its listeners, whether all are queued (the fast path), and the provider generation
        # they were worked out for. A provider subclass that overrides listeners_for is asked every time.
        self._plans: dict[type, tuple[Sequence[Listener], bool, int]] = {}
        self._cacheable = type(provider).listeners_for is ListenerProvider.listeners_for

    async def dispatch(self, event: E, *, defer: bool = False) -> E:
        """Deliver ``event`` to its listeners and return it.

        Returns once in-process listeners have run and every queued listener's message is confirmed by the
        transport. Raises ``SerializationError`` if a queued listener's event is not valid JSON (nothing is
        published then) and ``PublishError`` if the broker did not confirm.

        ``defer=True``: the publisher decides that *every* listener runs in a worker, also those registered
        without ``queue=True``; each must be queued or a service listener registered with ``deferrable=True``
        (``ConfigurationError`` otherwise, before anything is published). Nothing runs in this process.
        """
        cls = type(event)
        plan = self._plans.get(cls)
        if plan is None or plan[2] != self.provider.generation or not self._cacheable:
            plan = self._plan(cls, event)
        listeners, all_queued, _ = plan
        if not listeners:
            return event
        if defer:
            await self.publish(event, _deferrable(event, listeners))
            return event
        if all_queued:
            # Every listener is queued and the event cannot stop propagation: nothing runs here.
            scope = _scope_get()
            if scope is not None and (scope.closed or (scope.owner is not self and scope.owner is not None)):
                scope = _buffer_for(scope.parent, self)  # not this one: the nearest open one out from it
            if scope is not None:
                # Inline, as the hot path of a request: serialize (the snapshot) and buffer; validated at flush.
                try:
                    body = cls.__pydantic_serializer__.to_json(event)  # type: ignore[attr-defined]
                except PydanticSerializationError as exc:
                    raise _serialization_error(cls, exc) from exc
                if self.transport is None and scope.owner is not None:
                    self._no_transport(event, listeners)
                scope.pending.append((cls, body, listeners, _correlation_get(), _time()))
                return event
            await self.publish(event, listeners)
            return event
        await self._call_and_publish(event, listeners)
        return event

    def _plan(self, cls: type, event: object) -> tuple[Sequence[Listener], bool, int]:
        provider = self.provider
        generation = provider.generation
        listeners = provider.listeners_for(event)
        plan = self._plans[cls] = (listeners, _all_queued(cls, listeners), generation)
        return plan

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
        scope = _buffer_for(_scope_get(), self)
        if scope is not None:
            body = _serialize_event(event)
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
                await dispatcher.dispatch(OrderPlaced(...))   # serialized now, not yet published
            # here every buffered message is validated, published at once and confirmed

        The event is serialized at dispatch: the message is a snapshot, and an event that cannot become JSON
        raises ``SerializationError`` there. Validating that JSON back into the model (what a worker will do)
        runs when the scope flushes, before anything is published: a message that fails it is never sent, the
        others are, and leaving the block raises ``SerializationError`` naming the refused messages. (Validation
        costs about as much as serializing; at the flush it stays out of the request.)

        In-process listeners still run at dispatch time. When the block raises, the buffer is discarded
        (``discard_on_error=False`` publishes it anyway, then the exception propagates). A nested scope hands
        its messages to the enclosing one, unvalidated, so they are validated and published when the outermost
        scope ends, and a refused message is reported there (under the ASGI middleware: logged and passed to
        ``on_publish_error``), not when the nested block exits. Entering one inside an outbox scope
        (``outbox.bind()``) raises ``RuntimeError``: the outbox already holds events until the commit. The
        scope is a context variable: concurrent
        tasks each have their own.
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
        self.rejected = []
        self.owner = self.dispatcher = dispatcher
        self.parent = None
        self.closed = False
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
        parent = self.parent = _scope_get()
        if parent is not None:
            _refuse_inside_outbox(parent)
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
        messages, rejected = close_scope(self, self._token, keep=keep)
        await self._deliver(messages, rejected, exc)

    async def flush(self) -> None:
        """Publish what is buffered now (within the scope), and keep buffering afterwards.

        Raises ``SerializationError`` (after publishing the rest) if an event's JSON fails validation.
        """
        if self.pending or self.built or self.rejected:
            messages, rejected = self.take()
            await self._deliver(messages, rejected, None)

    async def _deliver(
        self,
        messages: list[_wire.OutgoingMessage],
        rejected: SerializationError | None,
        exc: BaseException | None,
    ) -> None:
        """Publish ``messages``; then raise ``rejected``, or add it as a note to the exception already raised."""
        if messages:
            transport = self.dispatcher.transport
            assert transport is not None  # checked when the messages were buffered
            try:
                await transport.publish(messages)
            except Exception as error:
                if rejected is not None:
                    error.add_note(str(rejected))
                raise
        if rejected is None:
            return
        if exc is not None:  # the block's own exception propagates (discard_on_error=False); this goes with it
            exc.add_note(str(rejected))
            return
        raise rejected

    def __repr__(self) -> str:
        buffered = len(self.built) + sum(len(pending[2]) for pending in self.pending)
        if self.rejected:
            return f"<Deferred buffered={buffered} rejected={sum(len(r[1]) for r in self.rejected)}>"
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
