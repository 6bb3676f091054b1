"""SyncDispatcher: blocking dispatch from plain threads over a background event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import pytest

from queueable import (
    App,
    ConfigurationError,
    EventDispatcher,
    ListenerProvider,
    PublishError,
    SerializationError,
    TransportClosedError,
    correlation_id,
)
from queueable.sync import SyncDispatcher
from tests.fakes import Broken, CommentPosted, Recorder, RecordingTransport

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from queueable import OutgoingMessage

COMMENT = CommentPosted(post_id=7, author="ann", text="first!")


class SlowTransport(RecordingTransport):
    """Confirms after ``delay`` seconds and tracks how many publishes overlap."""

    def __init__(self, delay: float = 0.05) -> None:
        super().__init__()
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.loops: set[int] = set()

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        self.loops.add(id(asyncio.get_running_loop()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            await super().publish(messages)
        finally:
            self.active -= 1


@pytest.fixture(name="slow")
def fixture_slow() -> SlowTransport:
    return SlowTransport()


@pytest.fixture(name="events")
def fixture_events(provider: ListenerProvider, slow: SlowTransport) -> Iterator[SyncDispatcher]:
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    events = SyncDispatcher(EventDispatcher(provider, slow))
    yield events
    events.close()


def test_dispatch_blocks_until_the_message_is_confirmed(events: SyncDispatcher, slow: SlowTransport):
    """When dispatch() returns, the transport has confirmed the message."""
    assert events.dispatch(COMMENT) is COMMENT
    assert [m.body for m in slow.messages] == [COMMENT.model_dump_json().encode()]


def test_publish_errors_reach_the_caller(events: SyncDispatcher, slow: SlowTransport):
    """A broker that does not confirm makes dispatch() raise PublishError in the calling thread."""
    slow.fail_with = PublishError("nacked", message_ids=["m1"])
    with pytest.raises(PublishError, match="nacked") as info:
        events.dispatch(COMMENT)
    assert info.value.message_ids == ["m1"]


def test_configuration_errors_reach_the_caller(
    provider: ListenerProvider, events: SyncDispatcher, slow: SlowTransport
):
    """defer=True with a plain callable raises ConfigurationError here too, and nothing is published."""
    provider.add_listener(lambda e: None, CommentPosted)
    with pytest.raises(ConfigurationError, match="plain callable"):
        events.dispatch(COMMENT, defer=True)
    assert slow.messages == []


def test_a_timeout_raises_publish_error(events: SyncDispatcher, slow: SlowTransport):
    """A confirm that takes longer than timeout= is reported as PublishError, not success."""
    slow.delay = 1.0
    with pytest.raises(PublishError, match="not confirmed within"):
        events.dispatch(COMMENT, timeout=0.05)


def test_a_listeners_own_timeout_error_is_not_reported_as_a_confirm_timeout(provider: ListenerProvider):
    """On 3.11 concurrent.futures.TimeoutError is TimeoutError: a listener's own (its timeout=) became
    PublishError('not confirmed ... may or may not have been published') although nothing was published.
    """

    async def slow_listener(event: CommentPosted) -> None:
        await asyncio.sleep(1)

    provider.add_listener(slow_listener, CommentPosted, timeout=0.05)
    with SyncDispatcher(EventDispatcher(provider, RecordingTransport())) as events, pytest.raises(TimeoutError):
        events.dispatch(COMMENT)


def test_a_dispatch_that_close_gives_up_on_raises_publish_error(provider: ListenerProvider):
    """close(timeout) cancels what is still waiting: the blocked caller gets PublishError, not a bare
    concurrent.futures.CancelledError.
    """
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    events = SyncDispatcher(EventDispatcher(provider, SlowTransport(delay=5)))
    errors: list[BaseException] = []

    def dispatch() -> None:
        try:
            events.dispatch(COMMENT)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=dispatch)
    caller.start()
    while not events._inflight:
        threading.Event().wait(0.01)
    events.close(timeout=0.1)
    caller.join(5)
    [error] = errors
    assert isinstance(error, PublishError)
    assert "cancelled by close()" in str(error)


def test_a_forked_child_does_not_wait_for_its_parents_dispatches(provider: ListenerProvider):
    """The child inherits the parent's in-flight futures, which nothing in the child will ever complete: its
    close() waited its whole timeout for them.
    """
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    events = SyncDispatcher(EventDispatcher(provider, SlowTransport(delay=2)))
    caller = threading.Thread(target=lambda: events.dispatch(COMMENT))
    caller.start()
    while not events._inflight:
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: one dispatch of its own, then close, within 1 s or exit 1
        code = 1
        try:
            events.timeout = 5
            events.target.transport.delay = 0  # type: ignore[union-attr]
            events.dispatch(COMMENT)
            started = time.monotonic()
            events.close(timeout=3)
            code = 0 if time.monotonic() - started < 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    caller.join(5)
    events.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_many_threads_dispatch_concurrently_on_one_loop(events: SyncDispatcher, slow: SlowTransport):
    """Dispatches from several threads all confirm, overlapping on the single background loop."""
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(5):
            events.dispatch(CommentPosted(post_id=n * 100 + i, author="t", text="x"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len(slow.messages) == 40
    assert slow.max_active > 1
    assert len(slow.loops) == 1


def test_the_callers_correlation_id_travels_to_the_loop(events: SyncDispatcher, slow: SlowTransport):
    """Context variables set in the calling thread are seen by the dispatch on the loop thread."""
    token = correlation_id.set("req-42")
    try:
        events.dispatch(COMMENT)
    finally:
        correlation_id.reset(token)
    assert slow.messages[0].correlation_id == "req-42"


def test_deferred_publishes_once_at_the_end(events: SyncDispatcher, slow: SlowTransport):
    """The blocking deferred() buffers dispatches and publishes them in one batch when the block ends."""
    with events.deferred():
        events.dispatch(COMMENT)
        events.dispatch(COMMENT)
        assert slow.batches == []
    assert [len(batch) for batch in slow.batches] == [2]


def test_deferred_refuses_json_its_model_rejects_after_publishing_the_rest(
    provider: ListenerProvider, events: SyncDispatcher, slow: SlowTransport
):
    """Validation runs at the end of the block: the good message is confirmed, then SerializationError."""
    provider.add_listener(lambda e: None, Broken, queue=True, id="broken")

    def request() -> None:
        with events.deferred():
            events.dispatch(Broken(value=1))
            events.dispatch(COMMENT)

    with pytest.raises(SerializationError, match="its own model rejects") as caught:
        request()
    assert [len(batch) for batch in slow.batches] == [1]
    assert [m.headers["x-queueable-listener"] for m in caught.value.messages] == ["broken"]


def test_deferred_discards_on_error(events: SyncDispatcher, slow: SlowTransport):
    """An exception in the blocking deferred() block discards the buffer."""

    def request() -> None:
        with events.deferred():
            events.dispatch(COMMENT)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        request()
    assert slow.batches == []


def test_close_waits_for_inflight_dispatches_then_refuses_new_ones(events: SyncDispatcher, slow: SlowTransport):
    """close() lets a dispatch already waiting for its confirm finish, closes the transport, stops the thread."""
    slow.delay = 0.3
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(events.dispatch(COMMENT)))
    thread.start()
    while not slow.active:  # the publish is in flight
        threading.Event().wait(0.005)

    events.close()
    thread.join(5)

    assert results == [COMMENT]
    assert len(slow.messages) == 1
    assert slow.closed
    assert events._thread is not None
    assert not events._thread.is_alive()
    with pytest.raises(TransportClosedError):
        events.dispatch(COMMENT)


def test_close_is_idempotent_and_works_before_first_use(provider: ListenerProvider):
    """Closing an unused dispatcher twice is harmless and starts no thread."""
    events = SyncDispatcher(EventDispatcher(provider, RecordingTransport()))
    events.close()
    events.close()
    assert events._thread is None


def test_an_app_with_the_embedded_transport_runs_queued_listeners_before_close_returns(
    app: App, recorder: Recorder
):
    """With memory:// the queued listener runs on the loop; leaving the with block waits for it."""
    app.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    with SyncDispatcher(app) as events:
        events.dispatch(COMMENT)
    assert recorder.names == ["notify_author"]


def test_dispatching_from_the_loop_thread_is_refused_instead_of_deadlocking(
    provider: ListenerProvider, events: SyncDispatcher
):
    """An inline listener that calls the blocking dispatcher on its own loop thread gets RuntimeError."""

    def reenter(event: CommentPosted) -> None:
        events.dispatch(CommentPosted(post_id=0, author="loop", text="again"))

    provider.add_listener(reenter, in_thread=False)
    with pytest.raises(RuntimeError, match="own loop thread"):
        events.dispatch(COMMENT)
