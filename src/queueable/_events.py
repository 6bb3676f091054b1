"""Event identity on the wire: stable names, schema versions, and the ``Stoppable`` base model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, PrivateAttr

from queueable.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Stoppable", "event", "event_name", "event_version", "find_event_class"]

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
