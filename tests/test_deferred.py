"""Dispatch modes in the dispatcher: ``deferred()`` scopes and publisher-decided ``defer=True``."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel, ConfigDict

from queueable import (
    App,
    ConfigurationError,
    DeadReason,
    EventDispatcher,
    ListenerProvider,
    PublishError,
    SerializationError,
    listener,
)
from queueable import _wire as wire
from queueable._dispatcher import correlation_id
from queueable.testing import TestTransport
from tests.fakes import Broken, CommentPosted, Mailer, NotAModel, Recorder, RecordingTransport

COMMENT = CommentPosted(post_id=7, author="ann", text="first!")


@pytest.fixture(name="dispatcher")
def fixture_dispatcher(provider: ListenerProvider, transport: RecordingTransport) -> EventDispatcher:
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    return EventDispatcher(provider, transport)


# -- deferred() --------------------------------------------------------------------------------------


async def test_deferred_publishes_nothing_until_the_block_ends_then_everything_in_one_batch(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Messages built inside the block are published together, in one transport call, when it ends."""
    async with dispatcher.deferred() as scope:
        await dispatcher.dispatch(COMMENT)
        await dispatcher.dispatch(CommentPosted(post_id=8, author="bob", text="second"))
        assert transport.batches == []
        assert len(scope.messages) == 2

    assert len(transport.batches) == 1
    assert [m.body for m in transport.batches[0]] == [
        COMMENT.model_dump_json().encode(),
        b'{"post_id":8,"author":"bob","text":"second"}',
    ]


async def test_a_deferred_message_is_the_message_a_direct_publish_would_send(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Deferral changes when a message is published, not what it contains."""
    await dispatcher.dispatch(COMMENT)
    async with dispatcher.deferred():
        await dispatcher.dispatch(COMMENT)

    direct, deferred = transport.messages
    volatile = {wire.H_CREATED}
    assert {k: v for k, v in direct.headers.items() if k not in volatile} == {
        k: v for k, v in deferred.headers.items() if k not in volatile
    }
    assert (direct.queue, direct.body, direct.type, direct.content_type) == (
        deferred.queue,
        deferred.body,
        deferred.type,
        deferred.content_type,
    )


async def test_a_deferred_message_keeps_its_dispatch_time_identity(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Id, correlation id and creation time are fixed at dispatch, not when the scope flushes."""
    async with dispatcher.deferred() as scope:
        token = correlation_id.set("req-1")
        before = time.time()
        await dispatcher.dispatch(COMMENT)
        after = time.time()
        correlation_id.reset(token)
        [shown] = scope.messages
        assert [m.message_id for m in scope.messages] == [shown.message_id]
        await asyncio.sleep(0.01)

    [sent] = transport.messages
    assert (sent.message_id, sent.correlation_id) == (shown.message_id, "req-1")
    assert before <= sent.timestamp <= after
    assert sent.headers[wire.H_CREATED] == wire.iso_now(sent.timestamp)


async def test_a_listener_added_after_a_dispatch_is_called_by_the_next_one(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder
):
    """The dispatcher's per-event-class shortcut follows changes to the provider."""
    async with dispatcher.deferred():
        await dispatcher.dispatch(COMMENT)
        provider.add_listener_service("mailer", "notify_sync", CommentPosted)
        await dispatcher.dispatch(COMMENT)
        assert recorder.names == ["notify_sync"]


async def test_in_process_listeners_run_at_dispatch_time_inside_a_scope(
    provider: ListenerProvider, dispatcher: EventDispatcher, recorder: Recorder
):
    """Only publishing is deferred: in-process listeners still run before dispatch returns."""
    provider.add_listener_service("mailer", "notify_sync", CommentPosted)
    async with dispatcher.deferred():
        await dispatcher.dispatch(COMMENT)
        assert recorder.names == ["notify_sync"]


class Opaque(BaseModel):
    """An event whose field holds something JSON cannot represent."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    payload: object


async def test_an_event_that_cannot_become_json_fails_at_dispatch_inside_a_scope(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Serializing happens at dispatch(): an unserializable event raises there, and the scope goes on."""
    provider.add_listener(lambda e: None, Opaque, queue=True, id="opaque")
    async with dispatcher.deferred():
        with pytest.raises(SerializationError, match="cannot serialize Opaque"):
            await dispatcher.dispatch(Opaque(payload=object()))
        await dispatcher.dispatch(COMMENT)
    assert len(transport.messages) == 1


async def test_json_its_model_rejects_is_refused_at_the_flush_and_the_rest_is_published(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Validation runs when the scope flushes: the bad message is never sent, the others are, then it raises."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")

    async def request() -> None:
        async with dispatcher.deferred() as scope:
            await dispatcher.dispatch(Broken(value=1))  # returns: the request is not charged the validation
            await dispatcher.dispatch(COMMENT)
            assert len(scope.messages) == 1  # only what will be published

    with pytest.raises(SerializationError, match="Broken serialized to JSON that its own model rejects") as caught:
        await request()
    assert [m.headers[wire.H_LISTENER] for m in transport.messages] == ["mailer:notify_author"]
    assert [m.headers[wire.H_LISTENER] for m in caught.value.messages] == ["broken"]
    assert caught.value.messages[0].message_id in str(caught.value)


async def test_flush_refuses_a_bad_message_and_the_scope_keeps_buffering(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """flush() publishes the good messages, raises for the bad one, and leaves an empty buffer behind."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")
    async with dispatcher.deferred() as scope:
        await dispatcher.dispatch(Broken(value=1))
        await dispatcher.dispatch(COMMENT)
        with pytest.raises(SerializationError):
            await scope.flush()
        assert len(transport.messages) == 1
        await dispatcher.dispatch(COMMENT)
    assert len(transport.messages) == 2


async def test_a_nested_scope_hands_over_unvalidated_and_the_outer_flush_refuses(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Leaving an inner scope validates nothing; the outermost flush does, in dispatch order."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")

    async def request() -> None:
        async with dispatcher.deferred():
            await dispatcher.dispatch(CommentPosted(post_id=1, author="a", text="outer"))
            async with dispatcher.deferred():
                await dispatcher.dispatch(Broken(value=1))
                await dispatcher.dispatch(CommentPosted(post_id=2, author="a", text="inner"))
            await dispatcher.dispatch(CommentPosted(post_id=3, author="a", text="outer again"))

    with pytest.raises(SerializationError):
        await request()
    assert [CommentPosted.model_validate_json(m.body).post_id for m in transport.messages] == [1, 2, 3]


async def test_a_refused_message_rides_along_as_a_note_when_the_block_raised(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """With discard_on_error=False the block's own exception propagates, and says what was refused."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")

    async def request() -> None:
        async with dispatcher.deferred(discard_on_error=False):
            await dispatcher.dispatch(Broken(value=1))
            await dispatcher.dispatch(COMMENT)
            msg = "handler bug"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="handler bug") as caught:
        await request()
    assert len(transport.messages) == 1
    assert any("its own model rejects" in note for note in caught.value.__notes__)


async def test_a_publish_failure_at_the_flush_also_names_the_refused_message(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """PublishError wins (the broker is the bigger problem) and carries the refusal as a note."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")
    transport.fail_with = PublishError("broker down")

    async def request() -> None:
        async with dispatcher.deferred():
            await dispatcher.dispatch(Broken(value=1))
            await dispatcher.dispatch(COMMENT)

    with pytest.raises(PublishError, match="broker down") as caught:
        await request()
    assert any("its own model rejects" in note for note in caught.value.__notes__)


async def test_an_exception_in_the_block_discards_the_buffer(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """By default a block that raises publishes nothing, and the exception propagates."""
    with pytest.raises(RuntimeError, match="boom"):  # noqa: PT012 - raised inside the scope under test
        async with dispatcher.deferred():
            await dispatcher.dispatch(COMMENT)
            raise RuntimeError("boom")
    assert transport.batches == []


async def test_discard_on_error_false_publishes_and_still_propagates(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """discard_on_error=False publishes what was buffered before the exception, then re-raises it."""
    with pytest.raises(RuntimeError, match="boom"):  # noqa: PT012 - raised inside the scope under test
        async with dispatcher.deferred(discard_on_error=False):
            await dispatcher.dispatch(COMMENT)
            raise RuntimeError("boom")
    assert len(transport.messages) == 1


async def test_a_publish_failure_at_flush_raises_from_the_block(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """If the broker does not confirm, leaving the block raises PublishError."""
    transport.fail_with = PublishError("nacked", message_ids=["x"])
    with pytest.raises(PublishError, match="nacked"):
        async with dispatcher.deferred():
            await dispatcher.dispatch(COMMENT)


async def test_a_nested_scope_hands_its_messages_to_the_outer_one(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Inner scopes flush with the outermost; an inner exception discards only the inner buffer."""
    async with dispatcher.deferred():
        async with dispatcher.deferred():
            await dispatcher.dispatch(CommentPosted(post_id=1, author="a", text="kept"))
        assert transport.batches == []
        with pytest.raises(RuntimeError):  # noqa: PT012 - raised inside the scope under test
            async with dispatcher.deferred():
                await dispatcher.dispatch(CommentPosted(post_id=2, author="a", text="dropped"))
                raise RuntimeError
        await dispatcher.dispatch(CommentPosted(post_id=3, author="a", text="outer"))

    assert len(transport.batches) == 1
    assert [CommentPosted.model_validate_json(m.body).post_id for m in transport.messages] == [1, 3]


async def test_concurrent_tasks_have_separate_scopes(dispatcher: EventDispatcher, transport: RecordingTransport):
    """Two requests deferring at the same time each publish only their own messages."""
    both_buffered = asyncio.Barrier(2)

    async def request(post_id: int, *, fail: bool) -> None:
        async with dispatcher.deferred():
            await dispatcher.dispatch(CommentPosted(post_id=post_id, author="a", text="t"))
            await both_buffered.wait()
            if fail:
                raise RuntimeError

    results = await asyncio.gather(request(1, fail=False), request(2, fail=True), return_exceptions=True)

    assert results[0] is None
    assert isinstance(results[1], RuntimeError)
    assert [CommentPosted.model_validate_json(m.body).post_id for m in transport.messages] == [1]


async def test_a_scope_buffers_only_its_own_dispatcher(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Another dispatcher (another transport) publishes right away inside someone else's scope."""
    other_transport = RecordingTransport()
    other = EventDispatcher(provider, other_transport)
    async with dispatcher.deferred():
        await other.dispatch(COMMENT)
        assert len(other_transport.messages) == 1
    assert transport.batches == []


async def test_an_outer_scope_still_buffers_its_dispatcher_inside_another_dispatchers_scope(
    provider: ListenerProvider, dispatcher: EventDispatcher, transport: RecordingTransport
):
    """Inside ``other.deferred()`` nested in this dispatcher's scope (the middleware's, say), this dispatcher's
    messages still wait for its own scope, and go with it when that block fails.
    """
    other = EventDispatcher(provider, RecordingTransport())
    with pytest.raises(RuntimeError, match="request fails"):  # noqa: PT012 - raised inside the scopes under test
        async with dispatcher.deferred():
            async with other.deferred():
                await dispatcher.dispatch(COMMENT)
                assert transport.batches == []
            msg = "request fails"
            raise RuntimeError(msg)
    assert transport.batches == []  # discarded with the failed block, not published from inside it


async def test_a_task_that_outlives_its_scope_publishes_its_later_dispatches(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """A task copies the context, scope included. When it dispatches after the block ended, nobody will flush
    that scope any more: the message is published at once (it used to go into the dead buffer and be lost).
    """
    release = asyncio.Event()

    async def later() -> None:
        await release.wait()
        await dispatcher.dispatch(CommentPosted(post_id=8, author="bob", text="late"))

    async with dispatcher.deferred():
        await dispatcher.dispatch(COMMENT)
        task = asyncio.create_task(later())
    assert [m.body for m in transport.messages] == [COMMENT.model_dump_json().encode()]
    release.set()
    await task
    assert len(transport.messages) == 2
    assert b'"late"' in transport.messages[1].body


async def test_a_validator_that_raises_at_the_flush_refuses_its_message_only(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """pydantic wraps only ValueError and AssertionError: a validator's KeyError at the flush used to abort
    materialize() and lose every message of the scope. It refuses that message; the others are published.
    """
    from tests.fakes import CommentPosted as Model  # noqa: PLC0415

    original = Model.__pydantic_validator__

    class Exploding:
        def validate_json(self, body: bytes) -> object:
            if b'"boom"' in body:
                raise KeyError("us")
            return original.validate_json(body)

    good = CommentPosted(post_id=1, author="ann", text="fine")
    bad = CommentPosted(post_id=2, author="boom", text="x")
    Model.__pydantic_validator__ = Exploding()  # type: ignore[assignment]
    try:
        with pytest.raises(SerializationError, match="KeyError"):  # noqa: PT012 - raised when the scope ends
            async with dispatcher.deferred():
                await dispatcher.dispatch(good)
                await dispatcher.dispatch(bad)
    finally:
        Model.__pydantic_validator__ = original  # type: ignore[misc]
    assert [m.body for m in transport.messages] == [good.model_dump_json().encode()]


async def test_flush_publishes_early_and_keeps_buffering(
    dispatcher: EventDispatcher, transport: RecordingTransport
):
    """flush() inside the block publishes what is buffered; later dispatches go out at the end."""
    async with dispatcher.deferred() as scope:
        await dispatcher.dispatch(COMMENT)
        await scope.flush()
        assert len(transport.batches) == 1
        await dispatcher.dispatch(COMMENT)
        assert len(transport.batches) == 1
    assert len(transport.batches) == 2


async def test_deferring_without_a_transport_fails_at_dispatch(provider: ListenerProvider):
    """A dispatcher with nowhere to publish says so at the emitter, not when the scope ends."""
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    dispatcher = EventDispatcher(provider)
    async with dispatcher.deferred():
        with pytest.raises(ConfigurationError, match="no transport"):
            await dispatcher.dispatch(COMMENT)


async def test_a_scope_cannot_be_entered_twice(dispatcher: EventDispatcher):
    """Reusing one Deferred object is a programming error."""
    scope = dispatcher.deferred()
    async with scope:
        with pytest.raises(RuntimeError, match="twice"):
            await scope.__aenter__()


# -- defer=True --------------------------------------------------------------------------------------


@pytest.fixture(name="defer_app")
def fixture_defer_app(app: App, recorder: Recorder) -> App:
    @app.service("audit")
    class Audit:
        @listener(deferrable=True, queue_name="audit")
        def record(self, event: CommentPosted) -> None:
            recorder.record("audit", event)

    app.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    return app


async def test_defer_sends_every_listener_through_the_queue(defer_app: App, recorder: Recorder):
    """defer=True publishes one message per listener, including in-process ones, and runs none here."""
    async with TestTransport(defer_app) as transport:
        await defer_app.dispatch(COMMENT, defer=True)
        assert recorder.names == []
        assert {name: len(q) for name, q in transport.queues.items() if q} == {"audit": 1, "queueable": 1}

        await transport.run_until_idle()

    assert sorted(recorder.names) == ["audit", "notify_author"]


async def test_without_defer_a_deferrable_listener_runs_in_process(defer_app: App, recorder: Recorder):
    """deferrable=True only allows deferral: a plain dispatch still calls the listener right away."""
    async with TestTransport(defer_app) as transport:
        await defer_app.dispatch(COMMENT)
        assert recorder.names == ["audit"]
        assert transport.pending == 1


async def test_a_deferred_listener_gets_its_retry_policy_in_the_worker(app: App, recorder: Recorder):
    """A deferred in-process listener that fails is retried and dead-lettered like a queued one."""
    from queueable import RetryPolicy  # noqa: PLC0415

    app.add_listener_service(
        "mailer", "always_fails", CommentPosted, deferrable=True, retry=RetryPolicy(max_attempts=2)
    )
    async with TestTransport(app) as transport:
        await app.dispatch(COMMENT, defer=True)
        await transport.run_until_idle(advance_time=True)

    assert recorder.names == ["always_fails", "always_fails"]
    assert [d.reason for d in transport.dead_letters] == [DeadReason.RETRIES_EXHAUSTED]


async def test_a_plain_callable_cannot_be_deferred_and_nothing_is_published(defer_app: App, recorder: Recorder):
    """A closure cannot run in a worker: defer=True raises before publishing or calling anything."""
    defer_app.add_listener(lambda e: recorder.record("closure", e), CommentPosted)
    async with TestTransport(defer_app) as transport:
        with pytest.raises(ConfigurationError, match="plain callable"):
            await defer_app.dispatch(COMMENT, defer=True)
        assert transport.pending == 0
    assert recorder.names == []


async def test_a_service_listener_must_opt_in_to_deferral(app: App):
    """An in-process service listener without deferrable=True cannot be deferred (a worker would refuse it)."""
    app.add_listener_service("mailer", "notify_sync", CommentPosted)
    async with TestTransport(app) as transport:
        with pytest.raises(ConfigurationError, match="deferrable=True"):
            await app.dispatch(COMMENT, defer=True)
        assert transport.pending == 0


async def test_the_worker_refuses_a_message_for_an_in_process_listener(app: App, recorder: Recorder):
    """A forged message naming a non-deferrable in-process listener is dead-lettered, never invoked."""
    app.add_listener_service("mailer", "notify_sync", CommentPosted)
    async with TestTransport(app) as transport:
        forged = wire.OutgoingMessage(
            queue="queueable",
            body=COMMENT.model_dump_json().encode(),
            headers={wire.H_LISTENER: "mailer:notify_sync", wire.H_EVENT: "blog.comment_posted"},
        )
        await transport.publish([forged])
        await transport.run_until_idle()

    assert recorder.names == []
    assert [d.reason for d in transport.dead_letters] == [DeadReason.UNKNOWN_LISTENER]


def test_deferrable_needs_a_pydantic_event(provider: ListenerProvider):
    """A deferrable listener's event must travel as JSON, so it must be a pydantic model."""

    class Legacy(Mailer):
        def on_plain(self, event: NotAModel) -> None:
            """Takes an event that is not a model."""

    with pytest.raises(ConfigurationError, match="deferrable listener"):
        provider.add_listener_service("mailer", "on_plain", deferrable=True, service_type=Legacy)


async def test_defer_inside_a_deferred_scope_is_buffered(defer_app: App, recorder: Recorder):
    """The two modes compose: deferred listeners' messages wait for the scope like queued ones."""
    async with TestTransport(defer_app) as transport:
        async with defer_app.dispatcher.deferred():
            await defer_app.dispatch(COMMENT, defer=True)
            assert transport.pending == 0
        assert transport.pending == 2
