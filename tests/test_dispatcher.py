"""EventDispatcher: in-process calls, stoppable events, queued listeners as messages."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

import pytest
from pydantic import BaseModel, field_serializer

from queueable import (
    ConfigurationError,
    EventDispatcher,
    ListenerProvider,
    PublishError,
    SerializationError,
    correlation_id,
    event_name,
)
from queueable import _wire as wire
from tests.fakes import CommentPosted, NotAModel, PostPublished, Recorder, RecordingTransport

COMMENT = CommentPosted(post_id=7, author="ann", text="first!")


@pytest.fixture(name="dispatcher")
def fixture_dispatcher(provider: ListenerProvider, transport: RecordingTransport) -> EventDispatcher:
    return EventDispatcher(provider, transport)


async def test_dispatch_returns_the_event_after_calling_listeners_in_order(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder
):
    """Sync and async listeners run in priority order and dispatch returns the same event object."""

    async def first(event: CommentPosted) -> None:
        recorder.record("first", event)

    def second(event: CommentPosted) -> None:
        recorder.record("second", event)

    provider.add_listener(second)
    provider.add_listener(first, priority=1)
    provider.add_listener_service("mailer", "notify_author", CommentPosted)

    assert await dispatcher.dispatch(COMMENT) is COMMENT
    assert recorder.names == ["first", "second", "notify_author"]


async def test_sync_listeners_run_in_a_worker_thread_unless_inline(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder
):
    """A slow sync listener must not block the loop: it runs in a thread; in_thread=False runs inline."""
    provider.add_listener(lambda e: recorder.record("threaded", e), CommentPosted)
    provider.add_listener(lambda e: recorder.record("inline", e), CommentPosted, in_thread=False)

    await dispatcher.dispatch(COMMENT)

    loop_thread = threading.get_ident()
    assert recorder.names == ["threaded", "inline"]
    assert recorder.threads[0] != loop_thread
    assert recorder.threads[1] == loop_thread


async def test_slow_sync_listener_leaves_the_loop_free(provider: ListenerProvider, dispatcher: EventDispatcher):
    """While a sync listener sleeps in its thread, other coroutines keep running."""
    ticks = 0
    release = threading.Event()

    def slow(event: CommentPosted) -> None:
        release.wait(5)

    async def ticker() -> None:
        nonlocal ticks
        while not release.is_set():
            ticks += 1
            if ticks >= 5:
                release.set()
            await asyncio.sleep(0.001)

    provider.add_listener(slow)
    await asyncio.gather(dispatcher.dispatch(COMMENT), ticker())
    assert ticks >= 5


async def test_stopped_propagation_skips_later_listeners(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder, transport: RecordingTransport
):
    """Once a listener stops propagation, neither later in-process nor later queued listeners run."""

    def stopper(event: PostPublished) -> None:
        recorder.record("stopper", event)
        event.stop_propagation()

    def after(event: PostPublished) -> None:
        recorder.record("after", event)

    provider.add_listener(stopper, priority=5)
    provider.add_listener(after)
    provider.add_listener(after, queue=True, id="queued_after")

    event = await dispatcher.dispatch(PostPublished(post_id=1, title="t"))
    assert event.is_propagation_stopped()
    assert recorder.names == ["stopper"]
    assert transport.batches == []


async def test_already_stopped_event_calls_nobody(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder
):
    """PSR-14: a stoppable event that is already stopped is returned untouched."""
    provider.add_listener(lambda e: recorder.record("x", e), PostPublished, in_thread=False)
    event = PostPublished(post_id=1, title="t")
    event.stop_propagation()
    await dispatcher.dispatch(event)
    assert recorder.calls == []


async def test_queued_listeners_are_published_not_called(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder, transport: RecordingTransport
):
    """Each queued listener becomes one message; all messages of a dispatch go out in one publish call."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    provider.add_listener_service("mailer", "notify_sync", CommentPosted, queue=True, queue_name="slow")
    provider.add_listener_service("mailer", "always_fails", CommentPosted, queue=True)

    await dispatcher.dispatch(COMMENT)

    assert recorder.calls == []
    assert len(transport.batches) == 1
    messages = transport.batches[0]
    assert [m.headers[wire.H_LISTENER] for m in messages] == [
        "mailer:notify_author",
        "mailer:notify_sync",
        "mailer:always_fails",
    ]
    assert [m.queue for m in messages] == ["queueable", "slow", "queueable"]
    assert len({m.message_id for m in messages}) == 3
    assert len({m.correlation_id for m in messages}) == 1
    for message in messages:
        assert CommentPosted.model_validate_json(message.body) == COMMENT
        assert message.headers[wire.H_EVENT] == "blog.comment_posted"
        assert message.headers[wire.H_VERSION] == 1
        assert message.headers[wire.H_ATTEMPT] == 1
        assert message.headers[wire.H_WIRE] == wire.WIRE_VERSION
        assert message.content_type == "application/json"
        assert message.type == event_name(CommentPosted)


async def test_correlation_id_is_taken_from_the_context(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Messages dispatched while a correlation id is set carry it (how a request's events are linked)."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    token = correlation_id.set("req-42")
    try:
        await dispatcher.dispatch(COMMENT)
    finally:
        correlation_id.reset(token)
    assert transport.messages[0].correlation_id == "req-42"


class Unserializable(BaseModel):
    when: datetime

    @field_serializer("when")
    def _boom(self, value: datetime) -> str:
        msg = "no clock on the wire"
        raise ValueError(msg)


class Lossy(BaseModel):
    """Serializes to JSON that its own validation rejects."""

    count: int

    @field_serializer("count")
    def _as_words(self, value: int) -> str:
        return "many"


async def test_unserializable_event_fails_at_the_emitter(
    provider: ListenerProvider, transport: RecordingTransport
):
    """An event that cannot become JSON raises SerializationError in dispatch, and nothing is published."""

    def handler(event: Unserializable) -> None: ...

    provider.add_listener(handler, queue=True, id="handler")
    dispatcher = EventDispatcher(provider, transport)
    with pytest.raises(SerializationError, match="cannot serialize Unserializable"):
        await dispatcher.dispatch(Unserializable(when=datetime(2026, 1, 1)))  # noqa: DTZ001
    assert transport.batches == []


async def test_json_its_model_rejects_fails_at_the_emitter(
    provider: ListenerProvider, transport: RecordingTransport
):
    """JSON that the event's own model would reject in the worker is refused before publishing."""

    def handler(event: Lossy) -> None: ...

    provider.add_listener(handler, queue=True, id="handler")
    with pytest.raises(SerializationError, match="its own model rejects"):
        await EventDispatcher(provider, transport).dispatch(Lossy(count=3))
    assert transport.batches == []


async def test_queued_firehose_receives_model_events_only(
    provider: ListenerProvider, transport: RecordingTransport
):
    """A queued listener on BaseModel gets every model event; plain objects never match it."""

    def everything(event: BaseModel) -> None: ...

    provider.add_listener(everything, queue=True, id="everything")
    # A plain object does not match BaseModel's MRO, so nothing is queued at all.
    await EventDispatcher(provider, transport).dispatch(NotAModel())
    assert transport.batches == []
    await EventDispatcher(provider, transport).dispatch(COMMENT)
    assert transport.messages[0].headers[wire.H_EVENT] == "blog.comment_posted"


async def test_in_process_failure_propagates_and_publishes_nothing(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """An exception from an in-process listener reaches the caller; queued messages are not sent."""

    def broken(event: CommentPosted) -> None:
        msg = "listener bug"
        raise KeyError(msg)

    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    provider.add_listener(broken)
    with pytest.raises(KeyError, match="listener bug"):
        await dispatcher.dispatch(COMMENT)
    assert transport.batches == []


async def test_publish_error_reaches_the_emitter(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """A transport that cannot confirm makes dispatch raise, never report success."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    transport.fail_with = PublishError("nacked")
    with pytest.raises(PublishError, match="nacked"):
        await dispatcher.dispatch(COMMENT)


async def test_queued_listener_without_transport_is_a_configuration_error(provider: ListenerProvider):
    """A dispatcher with no transport says how to get one."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    with pytest.raises(ConfigurationError, match="no transport"):
        await EventDispatcher(provider).dispatch(COMMENT)


async def test_event_without_listeners_is_returned(dispatcher: EventDispatcher, transport: RecordingTransport):
    """No listeners: nothing happens, the event comes back."""
    assert await dispatcher.dispatch(COMMENT) is COMMENT
    assert transport.batches == []


async def test_a_listener_registered_after_a_dispatch_gets_the_next_one(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport, recorder: Recorder
):
    """The dispatcher caches a plan per event class; a registration invalidates it."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    await dispatcher.dispatch(COMMENT)
    provider.add_listener(lambda e: recorder.record("late", e), CommentPosted, in_thread=False)
    await dispatcher.dispatch(COMMENT)
    assert recorder.names == ["late"]
    assert len(transport.messages) == 2


async def test_a_provider_that_overrides_listeners_for_is_asked_on_every_dispatch(
    transport: RecordingTransport, recorder: Recorder
):
    """PSR-14: a provider may compute listeners per event; no plan is cached for it."""

    class PerEvent(ListenerProvider):
        def listeners_for(self, event: object) -> tuple:
            found = super().listeners_for(event)
            return found if getattr(event, "post_id", 0) % 2 else ()

    provider = PerEvent()
    provider.add_listener(lambda e: recorder.record("odd", e), CommentPosted, in_thread=False)
    dispatcher = EventDispatcher(provider, transport)
    for post_id in (1, 2, 3):
        await dispatcher.dispatch(CommentPosted(post_id=post_id, author="a", text="t"))
    assert [event.post_id for _, event in recorder.calls] == [1, 3]  # type: ignore[attr-defined]
