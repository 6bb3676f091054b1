"""Event identity on the wire: stable names, schema versions, and the ``Stoppable`` base model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, PrivateAttr

from queueable.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["EventRegistry", "Stoppable", "event", "event_name", "event_version", "find_event_class"]

T = TypeVar("T", bound=type[Any])

_NAME = "__queueable_event_name__"
_VERSION = "__queueable_event_version__"


def event(name: str | None = None, *, version: int = 1) -> Callable[[T], T]:
    """Give an event class a stable wire name and a schema version.

    ::

        @event("blog.comment_posted", version=2)
        class CommentPosted(BaseModel):
            post_id: int

    Without this decorator an event is named ``module.QualName`` at version 1; name events explicitly before
    you move or rename their classes, since queued messages carry the name.

    .. versionadded:: 0.1
    """
    if version < 1:
        msg = f"event version must be >= 1, got {version}"
        raise ConfigurationError(msg)

    def decorate(cls: T) -> T:
        # Set on the class itself: subclasses get their own default name rather than inheriting this one.
        setattr(cls, _NAME, name or _default_name(cls))
        setattr(cls, _VERSION, version)
        cls.__queueable_event_owner__ = cls
        return cls

    return decorate


def _default_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own(cls: type, attr: str) -> Any:
    # Only what `event()` set on this very class counts; a subclass of a named event is a different event.
    if cls.__dict__.get("__queueable_event_owner__") is cls:
        return cls.__dict__.get(attr)
    return None


def event_name(cls: type) -> str:
    """The wire name of an event class."""
    return _own(cls, _NAME) or _default_name(cls)


def event_version(cls: type) -> int:
    """The schema version of an event class (1 unless set with :func:`event`)."""
    version: int | None = _own(cls, _VERSION)
    return version or 1


def find_event_class(base: type, name: str) -> type[BaseModel] | None:
    """Return the pydantic class named ``name`` that is ``base`` or one of its (already imported) subclasses.

    This is how a worker turns the event name of a message into a class: only classes below a type that a
    registered listener listens to are candidates, and nothing is imported.
    """
    seen: set[type] = set()
    stack: list[type] = [base]
    found: type[BaseModel] | None = None
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if isinstance(cls, type) and issubclass(cls, BaseModel) and event_name(cls) == name:
            if found is not None and found is not cls:
                msg = f"two event classes share the wire name {name!r}: {found!r} and {cls!r}"
                raise ConfigurationError(msg)
            found = cls
        stack.extend(cls.__subclasses__())
    return found


class EventRegistry:
    """Maps wire names to the event classes an application knows; never imports anything.

    The provider registers the event type of every queued listener. A worker resolves the event name of a
    message with :meth:`resolve`, which only considers that listener's type and its already-imported
    subclasses (a queued listener on ``BaseModel`` sees every model, as a firehose should). Answers are
    cached, including misses, up to a bound (names in messages come from outside).
    """

    _MAX_CACHED = 10_000

    def __init__(self) -> None:
        self._by_name: dict[str, type[BaseModel]] = {}
        self._resolved: dict[tuple[type, str], type[BaseModel] | None] = {}

    def register(self, cls: type[BaseModel]) -> None:
        """Know ``cls`` by its wire name; two classes with one name are a configuration error."""
        name = event_name(cls)
        existing = self._by_name.get(name)
        if existing is not None and existing is not cls:
            msg = f"two event classes share the wire name {name!r}: {existing!r} and {cls!r}"
            raise ConfigurationError(msg)
        self._by_name[name] = cls

    def get(self, name: str) -> type[BaseModel] | None:
        """The registered class named ``name``, if any (subclasses are found by :meth:`resolve`)."""
        return self._by_name.get(name)

    def resolve(self, name: str, *, within: type) -> type[BaseModel] | None:
        """The class named ``name`` that is ``within`` or one of its subclasses, else ``None``."""
        key = (within, name)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        registered = self._by_name.get(name)
        if registered is not None and issubclass(registered, within):
            found: type[BaseModel] | None = registered
        else:
            found = find_event_class(within, name)
        if len(self._resolved) < self._MAX_CACHED:
            self._resolved[key] = found
        return found

    def names(self) -> list[str]:
        """Every registered wire name, sorted."""
        return sorted(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"<EventRegistry events={len(self._by_name)}>"


class Stoppable(BaseModel):
    """Base for events whose propagation a listener may stop (PSR-14 ``StoppableEventInterface``).

    The flag is private state: it is never serialized, so a queued copy of the event always starts afresh.
    Listeners queued *before* propagation stopped are still published; those after it are not.
    """

    _propagation_stopped: bool = PrivateAttr(default=False)

    def stop_propagation(self) -> None:
        """Prevent the listeners after the current one from being called."""
        self._propagation_stopped = True

    def is_propagation_stopped(self) -> bool:
        """Whether a listener stopped propagation."""
        return self._propagation_stopped
