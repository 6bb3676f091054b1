"""``ListenerProvider``: who listens to what (PSR-14 ``ListenerProviderInterface``).

Listeners are plain callables or methods of services that a container builds by id. Matching is by type along
the event's MRO, so a listener on a base class receives every subclass event (a listener on ``object``, or on
``pydantic.BaseModel`` for queued ones, is a "firehose"). Order is by priority (higher first), then by
registration.
"""

from __future__ import annotations

import inspect
import itertools
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from queueable._events import EventRegistry
from queueable._retry import RetryPolicy
from queueable.errors import ConfigurationError, UnknownServiceError

if TYPE_CHECKING:
    from collections.abc import Callable

    from queueable.abc import Container

__all__ = ["DEFAULT_QUEUE", "Listener", "ListenerProvider", "listener"]

DEFAULT_QUEUE = "queueable"

F = TypeVar("F", bound="Callable[..., Any]")
C = TypeVar("C", bound=type[Any])

_MARK = "__queueable_listeners__"


@dataclass(frozen=True, slots=True, eq=False)
class Listener:
    """One registration: which event type, which target, and how it runs.

    ``id`` is the stable, readable name a queued message carries (``"mailer:notify_author"``). The consumer
    only ever invokes listeners found by this id among the registered ones.
    """

    id: str
    event_type: type
    queue: bool
    priority: int
    order: int
    retry: RetryPolicy
    queue_name: str
    timeout: float | None = None
    func: Callable[..., Any] | None = None
    service_id: str | None = None
    method: str | None = None
    service_type: type | None = None
    in_thread: bool = True
    is_async: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: An in-process service listener that ``dispatch(event, defer=True)`` may send through the queue; the
    #: worker's allow-list (:meth:`ListenerProvider.queued`) then accepts messages for it.
    deferrable: bool = False

    @property
    def is_service(self) -> bool:
        """Whether the target is a method of a container service."""
        return self.service_id is not None

    def resolve(self, container: Container | None) -> Callable[..., Any]:
        """The callable to invoke: the function itself, or the method of the service built by ``container``."""
        if self.func is not None:
            return self.func
        assert self.service_id is not None
        assert self.method is not None
        if container is None:
            msg = f"listener {self.id!r} needs a container to build service {self.service_id!r}"
            raise ConfigurationError(msg)
        return typing.cast("Callable[..., Any]", getattr(container.get(self.service_id), self.method))

    def __repr__(self) -> str:
        mode = f"queue={self.queue_name!r}" if self.queue else "in-process"
        return f"<Listener {self.id!r} on {self.event_type.__qualname__} {mode} priority={self.priority}>"


def listener(
    event_type: type | None = None,
    *,
    queue: bool = False,
    priority: int = 0,
    retry: RetryPolicy | None = None,
    queue_name: str | None = None,
    timeout: float | None = None,
    in_thread: bool = True,
    deferrable: bool = False,
) -> Callable[[F], F]:
    """Mark a method of a service class as a listener; :meth:`ListenerProvider.service` registers it.

    ::

        @provider.service("mailer")
        class Mailer:
            @listener(queue=True)
            async def notify_author(self, event: CommentPosted) -> None: ...

    The event type defaults to the annotation of the method's event parameter.
    """
    options = {
        "event_type": event_type,
        "queue": queue,
        "priority": priority,
        "retry": retry,
        "queue_name": queue_name,
        "timeout": timeout,
        "in_thread": in_thread,
        "deferrable": deferrable,
    }

    def mark(func: F) -> F:
        marks: list[dict[str, Any]] = func.__dict__.setdefault(_MARK, [])
        marks.append(options)
        return func

    return mark


class ListenerProvider:
    """Registers listeners and answers :meth:`listeners_for` (PSR-14 ``getListenersForEvent``).

    ``container`` builds the services of service listeners; when it can tell a service's type without building
    it (the built-in container can), a missing method or a signature that cannot take the event is an error at
    registration time. Otherwise the check runs on :meth:`validate`, which the consumer calls at start.
    """

    def __init__(
        self,
        container: Container | None = None,
        *,
        default_queue: str = DEFAULT_QUEUE,
        default_retry: RetryPolicy | None = None,
    ) -> None:
        self.container = container
        self.default_queue = default_queue
        self.default_retry = default_retry or RetryPolicy()
        self._listeners: list[Listener] = []
        self._by_type: dict[type, list[Listener]] = {}
        self._queued: dict[str, list[Listener]] = {}
        self._cache: dict[type, tuple[Listener, ...]] = {}
        #: Bumped by every registration: a dispatcher's per-class plans are valid for one generation.
        self.generation = 0
        self._queue_watchers: list[Callable[[str], object]] = []
        self._order = itertools.count()
        #: The wire names of queued events: what a worker can turn a message's event name into.
        self.events = EventRegistry()

    # -- registration ------------------------------------------------------------------------------

    def add_listener(
        self,
        func: Callable[..., Any],
        event_type: type | None = None,
        *,
        queue: bool = False,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        queue_name: str | None = None,
        timeout: float | None = None,
        in_thread: bool = True,
        id: str | None = None,  # noqa: A002 - the natural name in this API
    ) -> Listener:
        """Register a plain callable (sync or async) for ``event_type`` (default: its parameter annotation).

        A queued callable must be importable by the worker under a stable name: a lambda or a nested function
        needs an explicit ``id``. Sync listeners run in a worker thread (``in_thread=False`` runs them inline on
        the event loop, for trivial ones).
        """
        if not callable(func):
            msg = f"listener must be callable, got {func!r}"
            raise ConfigurationError(msg)
        event_type = _event_type_of(func, event_type, where=_callable_id(func))
        listener_id = id or _callable_id(func)
        if queue and id is None and ("<locals>" in listener_id or "<lambda>" in listener_id):
            msg = (
                f"queued listener {listener_id!r} is a lambda or nested function: give it a stable id= "
                "so that a worker can find the same registration"
            )
            raise ConfigurationError(msg)
        return self._add(
            Listener(
                id=listener_id,
                event_type=event_type,
                queue=queue,
                priority=priority,
                order=next(self._order),
                retry=retry or self.default_retry,
                queue_name=queue_name or self.default_queue,
                timeout=timeout,
                func=func,
                in_thread=in_thread,
                is_async=_is_async(func),
            )
        )

    def add_listener_service(
        self,
        service_id: str,
        method: str,
        event_type: type | None = None,
        *,
        queue: bool = False,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        queue_name: str | None = None,
        timeout: float | None = None,
        in_thread: bool = True,
        service_type: type | None = None,
        deferrable: bool = False,
    ) -> Listener:
        """Register method ``method`` of the service ``service_id`` that the container builds.

        Its id on the wire is ``"service_id:method"``. ``service_type`` (or a container that knows the type)
        lets the method and its signature be checked now; ``event_type`` defaults to the method's annotation.
        ``deferrable=True`` lets an in-process listener be sent through the queue by
        ``dispatch(event, defer=True)`` (its ``queue_name`` and ``retry`` apply then); workers accept it.
        """
        if not service_id or not method:
            raise ConfigurationError("service_id and method must be non-empty strings")
        if self.container is not None and not self.container.has(service_id):
            raise ConfigurationError(str(UnknownServiceError(service_id)))
        service_type = service_type or self._type_of(service_id)
        is_async: bool | None = None
        if service_type is not None:
            func = _method_of(service_type, service_id, method)
            event_type = _event_type_of(func, event_type, where=f"{service_type.__qualname__}.{method}")
            is_async = _is_async(func)
        elif event_type is None:
            msg = (
                f"cannot infer the event type of {service_id}:{method} without the service's type: "
                "pass event_type= or service_type="
            )
            raise ConfigurationError(msg)
        return self._add(
            Listener(
                id=f"{service_id}:{method}",
                event_type=event_type,
                queue=queue,
                priority=priority,
                order=next(self._order),
                retry=retry or self.default_retry,
                queue_name=queue_name or self.default_queue,
                timeout=timeout,
                service_id=service_id,
                method=method,
                service_type=service_type,
                in_thread=in_thread,
                is_async=is_async,
                deferrable=deferrable,
            )
        )

    @overload
    def listen(self, func: F, /) -> F: ...
    @overload
    def listen(
        self,
        event_type: type | None = None,
        *,
        queue: bool = False,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        queue_name: str | None = None,
        timeout: float | None = None,
        in_thread: bool = True,
        id: str | None = None,
    ) -> Callable[[F], F]: ...

    def listen(self, event_type: Any = None, **options: Any) -> Any:
        """Decorator form of :meth:`add_listener`: ``@provider.listen`` or ``@provider.listen(queue=True)``."""
        if callable(event_type) and not isinstance(event_type, type) and not options:
            self.add_listener(event_type)
            return event_type

        def register(func: F) -> F:
            self.add_listener(func, event_type, **options)
            return func

        return register

    def service(self, service_id: str) -> Callable[[C], C]:
        """Class decorator: register every :func:`listener`-marked method of the class as service listeners.

        With the built-in :class:`queueable.Container`, the class is also registered as the service's factory
        (a singleton) unless ``service_id`` is already registered.
        """

        def register(cls: C) -> C:
            from queueable._container import Container as BuiltIn  # noqa: PLC0415 - avoid a cycle

            if isinstance(self.container, BuiltIn) and not self.container.has(service_id):
                self.container.register(service_id, cls)
            found = False
            for name, attr in inspect.getmembers(cls):
                for options in getattr(attr, _MARK, ()):
                    found = True
                    self.add_listener_service(service_id, name, service_type=cls, **options)
            if not found:
                msg = f"{cls.__qualname__} has no method marked with @listener"
                raise ConfigurationError(msg)
            return cls

        return register

    def _add(self, entry: Listener) -> Listener:
        if entry.queue or entry.deferrable:
            if not (isinstance(entry.event_type, type) and issubclass(entry.event_type, BaseModel)):
                kind = "queued" if entry.queue else "deferrable"
                msg = (
                    f"{kind} listener {entry.id!r} listens to {entry.event_type!r}, which is not a pydantic "
                    "model: queued events travel as validated JSON (use BaseModel for a queued firehose)"
                )
                raise ConfigurationError(msg)
            same = self._queued.setdefault(entry.id, [])
            if any(existing.event_type is entry.event_type for existing in same):
                msg = f"queued listener {entry.id!r} is already registered for {entry.event_type!r}"
                raise ConfigurationError(msg)
            new_queue = entry.queue_name not in self.queue_names
            same.append(entry)
            self.events.register(entry.event_type)
        else:
            new_queue = False
        self._listeners.append(entry)
        self._by_type.setdefault(entry.event_type, []).append(entry)
        self._cache.clear()
        self.generation += 1
        if new_queue:  # after the registration is complete: a watcher that raises leaves no half-registration
            for watcher in self._queue_watchers:
                watcher(entry.queue_name)
        return entry

    def watch_queues(self, watcher: Callable[[str], object]) -> None:
        """Call ``watcher(name)`` whenever a registration adds a work queue to :attr:`queue_names`.

        The app uses it so that a listener registered after its transport was created gets its queue
        declared before the next publish, instead of that publish failing as unroutable.
        """
        self._queue_watchers.append(watcher)

    def _type_of(self, service_id: str) -> type | None:
        type_of = getattr(self.container, "type_of", None)
        return type_of(service_id) if type_of is not None else None

    # -- lookup ------------------------------------------------------------------------------------

    def listeners_for(self, event: object) -> tuple[Listener, ...]:
        """The listeners for ``event``, in call order: by priority (higher first), then registration."""
        cls = type(event)
        try:
            return self._cache[cls]
        except KeyError:
            pass
        matched = [entry for base in cls.__mro__ for entry in self._by_type.get(base, ())]
        matched.sort(key=lambda entry: (-entry.priority, entry.order))
        result = self._cache[cls] = tuple(matched)
        return result

    def queued(self, listener_id: str) -> tuple[Listener, ...]:
        """The queued or deferrable registrations with this id: the consumer's allow-list (empty if unknown)."""
        return tuple(self._queued.get(listener_id, ()))

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """Every registration, in registration order."""
        return tuple(self._listeners)

    @property
    def queue_names(self) -> list[str]:
        """The work queues that queued listeners use (the default queue first, if one does).

        Only queues a listener uses: another application may publish to the default queue, and a worker of this
        one would dead-letter its messages as unknown listeners. With no queued listener yet, the default
        queue alone (where the first one will go unless it names a queue).
        """
        names = {entry.queue_name for entries in self._queued.values() for entry in entries}
        names = names or {self.default_queue}
        return sorted(names, key=lambda name: (name != self.default_queue, name))

    @property
    def all_queue_names(self) -> list[str]:
        """:attr:`queue_names` and the default queue: everywhere this app's messages and dead letters can be,
        those published before its listeners moved to queues of their own included (what the dead-letter
        commands and ``status`` look at; workers consume :attr:`queue_names`).
        """
        names = self.queue_names
        return names if self.default_queue in names else [self.default_queue, *names]

    def validate(self) -> None:
        """Check every service listener against the container: the service exists and has the method.

        Builds nothing when the container can tell the service's type; otherwise builds the service once.
        """
        problems: list[str] = []
        for entry in self._listeners:
            if not entry.is_service:
                continue
            assert entry.service_id is not None
            assert entry.method is not None
            if self.container is None or not self.container.has(entry.service_id):
                problems.append(f"{entry.id}: no service {entry.service_id!r} in the container")
                continue
            service_type = entry.service_type or self._type_of(entry.service_id)
            try:
                if service_type is None:
                    service_type = type(self.container.get(entry.service_id))
                _method_of(service_type, entry.service_id, entry.method)
            except ConfigurationError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigurationError("invalid listener registrations:\n  " + "\n  ".join(problems))

    def __repr__(self) -> str:
        queued = sum(len(entries) for entries in self._queued.values())
        return f"<ListenerProvider listeners={len(self._listeners)} queued={queued}>"


# -- helpers ---------------------------------------------------------------------------------------


def _callable_id(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "?"
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}:{qualname}"


def _is_async(func: Callable[..., Any]) -> bool:
    call = func if inspect.isroutine(func) else getattr(func, "__call__", func)  # noqa: B004
    return inspect.iscoroutinefunction(inspect.unwrap(call))


def _method_of(service_type: type, service_id: str, method: str) -> Callable[..., Any]:
    if method.startswith("_"):
        msg = f"{service_id}:{method}: listener methods must be public"
        raise ConfigurationError(msg)
    try:
        attr = inspect.getattr_static(service_type, method)
    except AttributeError:
        public = sorted(
            name for name, value in inspect.getmembers(service_type) if callable(value) and name[0] != "_"
        )
        msg = (
            f"{service_type.__qualname__} (service {service_id!r}) has no method {method!r}; "
            f"public methods: {', '.join(public) or 'none'}"
        )
        raise ConfigurationError(msg) from None
    if isinstance(attr, staticmethod):
        func: Callable[..., Any] = attr.__func__
        return func
    if isinstance(attr, classmethod):
        bound: Callable[..., Any] = getattr(service_type, method)
        return bound
    if not callable(attr):
        msg = f"{service_type.__qualname__}.{method} (service {service_id!r}) is not a method"
        raise ConfigurationError(msg)
    # A plain function: bind a placeholder for self so the signature shows what callers pass.
    return typing.cast("Callable[..., Any]", attr.__get__(object.__new__(_Unbound), _Unbound))


class _Unbound:
    """Stands in for ``self`` when a method's signature is inspected without building the service."""


def _event_type_of(func: Callable[..., Any], event_type: type | None, *, where: str) -> type:
    # Bound methods (and the placeholder-bound ones from _method_of) already hide self.
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        msg = f"cannot inspect the signature of {where}"
        raise ConfigurationError(msg) from exc
    try:
        signature.bind(object())
    except TypeError:
        msg = f"{where}{signature} cannot be called with a single event argument"
        raise ConfigurationError(msg) from None
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    annotation: Any = None
    if params:
        try:
            hints = typing.get_type_hints(inspect.unwrap(func))
        except Exception:
            hints = {}
        annotation = hints.get(params[0].name)
    if event_type is None:
        if not isinstance(annotation, type):
            msg = f"cannot infer the event type of {where}: annotate its event parameter or pass event_type="
            raise ConfigurationError(msg)
        return annotation
    if isinstance(annotation, type) and not issubclass(event_type, annotation):
        msg = (
            f"{where} takes {annotation.__qualname__}, which {event_type.__qualname__} events are not "
            "(the listener would receive events it does not declare)"
        )
        raise ConfigurationError(msg)
    return event_type
