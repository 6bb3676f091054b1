"""Event wire names, versions, the class lookup a worker uses, and the JSON round trip."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from queueable import ConfigurationError, event, event_name, event_version
from queueable._dispatcher import encode_event
from queueable._events import EventRegistry, find_event_class
from tests.fakes import CommentPosted, PostPublished, SpamCommentPosted


class Unnamed(BaseModel):
    value: int


def test_default_name_is_module_and_qualname():
    """Without @event, the wire name is module.QualName at version 1."""
    assert event_name(Unnamed) == "tests.test_events.Unnamed"
    assert event_version(Unnamed) == 1


def test_explicit_name_and_version():
    """@event sets a stable name and a schema version."""
    assert event_name(PostPublished) == "blog.post_published"
    assert event_version(PostPublished) == 2


def test_subclass_does_not_inherit_the_name():
    """A subclass of a named event is a different event with its own default name."""
    assert event_name(SpamCommentPosted) == "tests.fakes.SpamCommentPosted"
    assert event_version(SpamCommentPosted) == 1


def test_version_must_be_positive():
    """Version 0 is refused at decoration time."""
    with pytest.raises(ConfigurationError, match="version must be >= 1"):
        event("x", version=0)


def test_find_event_class_only_searches_below_the_listener_type():
    """A worker resolves names only among subclasses of the listener's type, never by import."""
    assert find_event_class(CommentPosted, "blog.comment_posted") is CommentPosted
    assert find_event_class(CommentPosted, "tests.fakes.SpamCommentPosted") is SpamCommentPosted
    assert find_event_class(CommentPosted, "blog.post_published") is None
    assert find_event_class(CommentPosted, "os.system") is None


def test_two_classes_with_one_name_are_ambiguous():
    """Two event classes sharing a wire name below one listener type are a configuration error."""

    @event("dup.name")
    class Base(BaseModel):
        a: int = 0

    @event("dup.name")
    class Other(Base):
        pass

    with pytest.raises(ConfigurationError, match=r"share the wire name 'dup\.name'"):
        find_event_class(Base, "dup.name")
    del Other


class Everything(BaseModel):
    text: str
    number: int
    ratio: float
    flag: bool
    when: datetime
    ident: UUID
    amount: Decimal
    tags: list[str]
    extra: dict[str, int]
    maybe: int | None = None


events = st.builds(
    Everything,
    text=st.text(),
    number=st.integers(min_value=-(2**63), max_value=2**63),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    when=st.datetimes(timezones=st.just(UTC)),
    amount=st.decimals(allow_nan=False, allow_infinity=False, places=4, max_value=10**12, min_value=-(10**12)),
    tags=st.lists(st.text(max_size=5), max_size=5),
    extra=st.dictionaries(st.text(max_size=5), st.integers(), max_size=5),
    maybe=st.none() | st.integers(),
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_any_valid_event_survives_the_json_round_trip(original: Everything):
    """What the emitter encodes, the worker decodes to an equal event."""
    body = encode_event(original)
    assert Everything.model_validate_json(body) == original


def test_registry_resolves_only_within_the_listener_type():
    """The registry knows registered names and finds subclasses, but never crosses into other types."""
    registry = EventRegistry()
    registry.register(CommentPosted)
    assert registry.get("blog.comment_posted") is CommentPosted
    assert registry.resolve("blog.comment_posted", within=CommentPosted) is CommentPosted
    assert registry.resolve("tests.fakes.SpamCommentPosted", within=CommentPosted) is SpamCommentPosted
    assert registry.resolve("blog.comment_posted", within=PostPublished) is None
    assert registry.resolve("builtins.object", within=CommentPosted) is None
    assert registry.names() == ["blog.comment_posted"]


def test_registry_refuses_a_second_class_with_the_same_name():
    """Registering two classes under one wire name fails at registration, not in a worker."""

    @event("blog.comment_posted")
    class Impostor(BaseModel):
        pass

    registry = EventRegistry()
    registry.register(CommentPosted)
    with pytest.raises(ConfigurationError, match="share the wire name"):
        registry.register(Impostor)
